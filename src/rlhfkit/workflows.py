"""The work between and after the training stages, one implementation each: the command line (``rlhfkit sample``,
``rank``, ...) and the pipeline's stages call the same functions, so the same input meets the same checks.

* :func:`generate_completions`: one completion per prompt (``rlhfkit generate``).
* :func:`sample_completions`: K completions per prompt, for labelers to rank (``rlhfkit sample``, stage ``sample``).
* :func:`rank_samples`: a built-in task's simulated labeler ranks the samples (``rlhfkit rank``, stage ``rank``);
  :func:`collect_rankings`: the rankings of any data source, such as the feedback app's database (stage ``rank``
  with ``rank.feedback``).
* :func:`score_records`: a reward model scores a file's completions (``rlhfkit score``).
* :func:`best_of_n`: the best of n samples by a reward model, as SFT data (``rlhfkit best-of-n``).
* :func:`evaluate`: models compared on held-out prompts (``rlhfkit eval``, stage ``eval``), with the sampling
  controls of ``generate`` and several samples per prompt (:func:`check_eval_sampling`).

Each reads its inputs (records are checked as they are read: a bad one stops the run with a
:class:`~rlhfkit.data.records.DataError` naming the file, line and field), writes its outputs, reports one
line on ``console`` and returns what it counted.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from rlhfkit.config import ConfigError, ModelConfig
from rlhfkit.data.readers import iter_jsonl, read_records, read_texts, write_jsonl
from rlhfkit.data.records import DataError, PromptRecord, prompt_fields
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.tasks import Task, get_task


def load_task(name: str) -> Task:
    """The built-in task ``name`` (its simulated labeler and gold judge); a :class:`ConfigError` otherwise."""
    try:
        return get_task(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _row(record: PromptRecord, **fields) -> dict:
    """An output row for a prompt record: its prompt (and tools, :func:`prompt_fields`), ``fields``, and its ``id``
    when it has one."""
    row = {**prompt_fields(record.prompt), **fields}
    return row if record.id is None else {**row, "id": record.id}


def _prompts_and_policy(model: str, prompts: str | Path, limit: int | None):
    """The prompt records (checked) and the policy with its tokenizer; the records first, so a bad file fails fast."""
    from rlhfkit.models.load import load_causal_lm

    records = read_records(prompts, "prompt", limit=limit)
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=model))
    return records, policy, tokenizer


def generate_completions(model: str, prompts: str | Path, out: str | Path, sampling: SamplingConfig, *,
                         seed: int = 0, console: Console) -> int:
    """One completion per prompt, written as ``{prompt, completion, finished[, id]}`` rows; returns their count."""
    from rlhfkit.rollout.generate import generate

    records, policy, tokenizer = _prompts_and_policy(model, prompts, None)
    generations = generate(policy, tokenizer, [r.prompt for r in records], sampling, seed=seed)
    count = write_jsonl(out, (_row(r, completion=g.text, finished=g.finished)
                              for r, g in zip(records, generations, strict=True)))
    console.print(f"{count} completions written to {out}")
    return count


def sample_completions(model: str, prompts: str | Path, out: str | Path, sampling: SamplingConfig, *, k: int,
                       seed: int = 0, limit: int | None = None, finished_only: bool = False,
                       console: Console) -> int:
    """K completions per prompt (step 2's input), written as ``{prompt, completions[, id]}`` rows.

    With ``finished_only``, samples cut off at ``sampling.max_new_tokens`` are left out: trained on as if they
    ended there, they would teach models to stop mid-sentence. Returns the number of prompts written. A
    temperature of 0 (greedy decoding) is refused, as the pipeline's ``sample.temperature`` is: its K completions
    would all be equal, and there would be nothing to rank.
    """
    from rlhfkit.rollout.generate import generate_k

    if sampling.temperature <= 0:
        raise ConfigError(f"sample: temperature must be > 0, got {sampling.temperature} (greedy decoding gives K "
                         "equal completions: nothing to rank)")

    records, policy, tokenizer = _prompts_and_policy(model, prompts, limit)
    groups = generate_k(policy, tokenizer, [r.prompt for r in records], k, sampling, seed=seed)
    rows = (_row(r, completions=[g.text for g in group if g.finished or not finished_only])
            for r, group in zip(records, groups, strict=True))
    count = write_jsonl(out, rows)
    console.print(f"{count} prompts x {k} completions written to {out}")
    return count


@dataclass(frozen=True)
class Samples:
    """One row of a samples file (:func:`sample_completions`' output)."""

    line: int
    prompt: str
    completions: list[str]
    id: str | None


def read_samples(path: str | Path) -> Iterator[Samples]:
    """The rows of a samples file; a row without a text prompt or a list of text completions stops the run
    with a :class:`DataError` naming the file, line and field."""
    for line, row in iter_jsonl(path):
        prompt, completions = row.get("prompt"), row.get("completions")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("expected a non-empty string (the task's prompts are text)", source=str(path), line=line,
                            field="prompt")
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise DataError("expected a list of strings", source=str(path), line=line, field="completions")
        yield Samples(line, prompt, completions, None if row.get("id") is None else str(row["id"]))


def rank_samples(samples: str | Path, out: str | Path, *, task: str, seed: int = 0,
                 temperature: float | None = None, console: Console) -> int:
    """The task's simulated labeler ranks every row of ``samples`` (noisy; equal texts tied, empty ones dropped).

    A row with fewer than two distinct non-empty completions has nothing to rank and is skipped. ``temperature``
    is the labeler's noise (default: the task's). Returns the number of ranking records written to ``out``.
    """
    judge = load_task(task)
    rng = random.Random(seed)
    records, skipped, dropped = [], 0, 0
    for row in read_samples(samples):
        try:
            record = judge.rank_samples(row.prompt, row.completions, rng=rng, temperature=temperature, id=row.id)
        except ValueError as error:  # a prompt the task did not write: its labeler has nothing to judge by
            raise DataError(str(error), source=str(samples), line=row.line, field="prompt") from None
        dropped += sum(not c.strip() for c in row.completions)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    count = write_jsonl(out, records)
    console.print(f"{count} rankings by the {task} simulated labeler written to {out}"
                  + (f"; {dropped} empty completions dropped" if dropped else "")
                  + (f"; {skipped} prompts skipped (fewer than 2 distinct non-empty completions)" if skipped else ""))
    return count


def collect_rankings(source: str, out: str | Path, *, console: Console) -> int:
    """The ranking records of any data source :func:`~rlhfkit.data.readers.read_records` reads (a file, a dataset,
    the feedback app's database URL: the rankings its labelers have submitted so far), written to ``out``."""
    count = write_jsonl(out, read_records(source, "ranking"))
    console.print(f"{count} rankings from {source} written to {out}")
    return count


def score_records(model: str, data: str | Path, out: str | Path, *, normalize: bool = True, task: str | None = None,
                  batch_size: int = 32, max_length: int | None = None, max_prompt_length: int | None = None,
                  console: Console) -> dict:
    """Add the reward model's reward to each row of ``data``: ``reward`` for a completion, ``rewards`` for a
    completions list, ``reward_chosen``/``reward_rejected`` for a pair; written to ``out``.

    Returns the summary: records, completions, mean reward, the accuracy against the file's own rankings and
    pairs (a reward tie counts half) and, with ``task``, the agreement with its gold judge.
    """
    from rlhfkit.data.records import parse_record
    from rlhfkit.evaluate.gold import gold_pairwise_accuracy
    from rlhfkit.models.reward import load_for_scoring, score_texts
    from rlhfkit.trainers.reward import iter_scorable

    judge = load_task(task) if task is not None else None
    rows = list(iter_scorable(data))
    reward_model, tokenizer = load_for_scoring(model)
    flat = [(prompt, text) for _, _, prompt, texts, _ in rows for text in texts]
    rewards = score_texts(reward_model, tokenizer, [p for p, _ in flat], [t for _, t in flat], batch_size=batch_size,
                          max_length=max_length, max_prompt_length=max_prompt_length, normalize=normalize)
    out_rows, per_row, agree, pairs, start = [], [], 0.0, 0, 0
    for line, row, _, texts, field in rows:
        values, start = rewards[start:start + len(texts)], start + len(texts)
        per_row.append(values)
        if field == "completion":
            out_rows.append({**row, "reward": values[0]})
        elif field == "chosen":
            out_rows.append({**row, "reward_chosen": values[0], "reward_rejected": values[1]})
        else:
            out_rows.append({**row, "rewards": values})
        if field == "chosen" or "ranking" in row or "pairs" in row:
            for w, lo in parse_record(row, "ranking", source=str(data), line=line).pairs():
                pairs += 1
                agree += 1.0 if values[w] > values[lo] else 0.5 if values[w] == values[lo] else 0.0
    write_jsonl(out, out_rows)
    summary = {"records": len(out_rows), "completions": len(rewards),
               "reward_mean": sum(rewards) / len(rewards), "normalized": normalize}
    if pairs:
        summary.update({"accuracy": agree / pairs, "pairs": pairs})
    if judge is not None:
        scored = [(r[2], r[3], v) for r, v in zip(rows, per_row, strict=True) if len(r[3]) >= 2]
        summary.update(gold_pairwise_accuracy(judge, [s[0] for s in scored], [s[1] for s in scored],
                                              [s[2] for s in scored]))
    console.print(f"{len(out_rows)} records scored, written to {out}")
    return summary


def best_of_n(model: str, reward_model: str, prompts: str | Path, out: str | Path, sampling: SamplingConfig, *,
              n: int, seed: int = 0, limit: int | None = None, console: Console) -> dict:
    """Sample ``n`` completions per prompt and keep the one ``reward_model`` scores highest, written as SFT data
    (``{prompt, completion, reward, n[, id]}``); its KL to the policy is log n - (n - 1) / n. Returns the summary."""
    from rlhfkit.evaluate.overoptimisation import best_of_n_kl
    from rlhfkit.models.reward import load_for_scoring
    from rlhfkit.rollout.best_of_n import sample_best_of_n

    records, policy, tokenizer = _prompts_and_policy(model, prompts, limit)
    scorer = load_for_scoring(reward_model)
    with console.status(f"sampling {len(records)} prompts x {n} and scoring them"):
        picks = sample_best_of_n(policy, tokenizer, scorer, [r.prompt for r in records], n, sampling, seed=seed,
                                 score_batch_size=sampling.batch_size)
    count = write_jsonl(out, (_row(r, completion=pick.text, reward=pick.score, n=n)
                              for r, pick in zip(records, picks, strict=True)))
    every = [s for pick in picks for s in pick.scores]
    console.print(f"{count} best-of-{n} completions written to {out}")
    return {"prompts": count, "n": n, "reward/best_mean": sum(p.score for p in picks) / count,
            "reward/sample_mean": sum(every) / len(every), "kl_analytic": best_of_n_kl(n)}


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured: the report (``eval.json``), the prompts, and the task that judged."""

    report: dict
    prompts: list
    task: Task | None


def check_eval_sampling(sampling: SamplingConfig, samples_per_prompt: int) -> None:
    """The checks of ``rlhfkit eval``'s and the pipeline eval stage's sampling: ``top_p`` in (0, 1] (a nucleus
    of no probability holds no token), and no several samples per prompt with greedy decoding (temperature 0):
    every sample would be the same completion, counted as if it were a new one."""
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"eval: top_p must be in (0, 1], got {sampling.top_p}")
    if samples_per_prompt > 1 and sampling.temperature <= 0:
        raise ConfigError(f"eval: {samples_per_prompt} samples per prompt need a temperature > 0 (greedy decoding "
                          "gives one completion per prompt, repeated)")


def evaluate(models: dict[str, str], prompts: str | Path, out: str | Path, sampling: SamplingConfig, *,
             samples_dir: str | Path | None = None, task: str | None = None, reward_model: str | None = None,
             reference: str | None = None, baseline: str | None = None, heldout_text: str | Path | None = None,
             limit: int | None = None, seed: int = 0, best_of_n: int = 0, samples_per_prompt: int = 1) -> Evaluation:
    """Compare ``models`` (name -> checkpoint) on the same prompts: the task's gold judge, the reward model, KL to
    ``reference``, win rates against ``baseline`` (see :func:`rlhfkit.evaluate.compare.evaluate_models`), over
    ``samples_per_prompt`` samples of every prompt (win-rate intervals bootstrap whole prompts).

    Writes the report to ``out`` (``eval.json``) and every model's samples to ``samples_dir/<name>.jsonl``
    (default: ``samples/`` beside ``out``).
    """
    from rlhfkit.evaluate.compare import evaluate_models

    check_eval_sampling(sampling, samples_per_prompt)
    judge = load_task(task) if task else None
    texts = [r.prompt for r in read_records(prompts, "prompt", limit=limit)]
    report, samples = evaluate_models(models, texts, sampling, task=judge, reward_model=reward_model,
                                      reference=reference, baseline=baseline,
                                      heldout_texts=read_texts(heldout_text) if heldout_text else (), seed=seed,
                                      best_of_n=best_of_n, samples_per_prompt=samples_per_prompt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    samples_dir = Path(samples_dir) if samples_dir is not None else out.parent / "samples"
    for name, rows in samples.items():
        write_jsonl(samples_dir / f"{name}.jsonl", rows)
    return Evaluation(report, texts, judge)
