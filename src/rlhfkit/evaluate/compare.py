"""Compare models on the same held-out prompts: gold judge, reward model, KL to a reference, win rates.

Every model samples ``samples_per_prompt`` completions per prompt (default one) with the same sampling settings
and seed; every sample is a row, judged on its own. Per model, over the rows:

* ``gold/score`` (mean), ``gold/stderr`` and ``gold/criteria`` (the mean of each of the judge's criteria,
  :func:`criterion_means`) when a built-in task judges;
* ``rm/score``: the mean (normalised) reward-model score when a reward model is given;
* ``kl``: KL(model || reference) estimated on the model's own samples, the mean over samples of
  ``sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)`` (the k1 estimator, unbiased), with both
  distributions at the sampling temperature;
* ``eos_rate``, ``length/tokens``, ``distinct/1``, ``distinct/2`` (diversity);
* ``heldout/ppl``: perplexity on held-out raw text, when given (the alignment tax).

With ``best_of_n = N`` and a reward model, one more row, ``<baseline>-bo<N>``: best-of-N of the baseline
policy picked by the reward model (an independent draw, seed + 1), judged like the others. Its ``kl`` is the
analytic ``log N - (N - 1) / N`` to the baseline policy (``kl_analytic: true``), the reference's KL when, as
usual, the baseline is the reference.

Win rates (:func:`rlhfkit.evaluate.metrics.win_rate`) of every model against a baseline, judged by the
gold judge and by the reward model, with bootstrap intervals: row ``i`` of a model meets row ``i`` of the
baseline (the same prompt, the same sample number), and the bootstrap resamples whole prompts, all their rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from rich.table import Table

from rlhfkit.algorithms.logprobs import sequence_logprobs
from rlhfkit.config import ModelConfig
from rlhfkit.data.collators import Example, PadCollator, encode_prompt, token_ids
from rlhfkit.evaluate.metrics import distinct_n, standard_error, win_rate
from rlhfkit.evaluate.overoptimisation import best_of_n_kl
from rlhfkit.models.load import load_causal_lm, position_ids_from_mask
from rlhfkit.models.reward import load_for_scoring, score_texts
from rlhfkit.rollout.best_of_n import sample_best_of_n
from rlhfkit.rollout.generate import Generation, SamplingConfig, generate
from rlhfkit.tasks.base import Task


@torch.no_grad()
def _summed_logprobs(model, tokenizer, examples: Sequence[Example], *, temperature: float = 1.0,
                     batch_size: int = 32) -> list[float]:
    """Per example, the summed log-probs of its ``loss_mask`` tokens under ``model`` (right-padded batches)."""
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    totals: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
        totals += sequence_logprobs(logits.float(), batch["input_ids"], batch["loss_mask"],
                                    temperature=temperature).tolist()
    return totals


def response_logprobs(model, tokenizer, prompts: Sequence, generations: Sequence[Generation], *,
                      temperature: float = 1.0, batch_size: int = 32) -> list[float]:
    """Summed log-probs of each sampled response (its EOS included when it ended) under ``model``."""
    examples = []
    for prompt, generation in zip(prompts, generations, strict=True):
        query = encode_prompt(tokenizer, prompt)
        response = list(generation.token_ids) + ([tokenizer.eos_token_id] if generation.finished else [])
        examples.append(Example(query + response, [0] * len(query) + [1] * len(response)))
    return _summed_logprobs(model, tokenizer, examples, temperature=temperature, batch_size=batch_size)


def text_perplexity(model, tokenizer, texts: Sequence[str], *, max_length: int = 512, batch_size: int = 16) -> float:
    """Perplexity of ``model`` on raw ``texts`` (each + EOS, cut at ``max_length`` tokens): exp of the mean
    negative log-likelihood per predicted token. On held-out pretraining text it measures what fine-tuning
    cost the model's language modelling (the "alignment tax" of Ouyang et al. 2022, section 4.2)."""
    examples = []
    for text in texts:
        ids = (token_ids(tokenizer, text) + [tokenizer.eos_token_id])[:max_length]
        examples.append(Example(ids, [1] * len(ids)))
    total = sum(_summed_logprobs(model, tokenizer, examples, batch_size=batch_size))
    predicted = sum(len(e.input_ids) - 1 for e in examples)  # every token but the first is predicted
    return math.exp(-total / predicted)


def criterion_means(task: Task, prompts: Sequence, texts: Sequence[str]) -> dict[str, float]:
    """The mean of each of the gold judge's criteria (:meth:`Task.gold_details`) over the completions it
    applies to (a criterion of one prompt type is averaged over that type's prompts only): which failures
    a model's gold score is made of, e.g. ``topic``, the share of completions about the prompt's subject."""
    values: dict[str, list[float]] = {}
    for prompt, text in zip(prompts, texts, strict=True):
        for name, value in task.gold_details(prompt, text).items():
            values.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sorted(values.items())}


def evaluate_models(models: Mapping[str, str], prompts: Sequence, sampling: SamplingConfig, *,
                    task: Task | None = None, reward_model: str | None = None, reference: str | None = None,
                    baseline: str | None = None, heldout_texts: Sequence[str] = (), seed: int = 0,
                    best_of_n: int = 0, samples_per_prompt: int = 1) -> tuple[dict, dict[str, list[dict]]]:
    """Sample, judge and compare ``models`` (name -> checkpoint directory) on ``prompts``.

    With ``heldout_texts`` (raw text the models were not trained on) each model's ``heldout/ppl`` too. With
    ``best_of_n > 0`` (needs ``reward_model``) the ``<baseline>-bo<N>`` row of the module docstring too.

    Returns ``(report, samples)``: ``report["models"][name]`` holds the metrics of the module docstring,
    ``report["win_rates"][name]`` the win rates against ``baseline`` (default: the first model) by
    ``gold`` and by ``rm``, their intervals from a bootstrap over distinct prompts (a prompt listed twice, or
    sampled ``samples_per_prompt`` times, is one cluster of its rows); ``samples[name]`` one
    ``{"prompt", "completion", ...scores}`` row per sample, the ``samples_per_prompt`` samples of a prompt together.
    """
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
    given, prompts = prompts, [p for p in prompts for _ in range(samples_per_prompt)]  # one row per sample
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {sorted(models)}")
    runs = [(name, path, 0) for name, path in models.items()]
    if best_of_n > 0:
        if not reward_model:
            raise ValueError("best_of_n needs a reward model to pick the best of the samples")
        if f"{baseline}-bo{best_of_n}" in models:
            raise ValueError(f"a model is already named {baseline}-bo{best_of_n}, the best-of-n row's name")
        runs.append((f"{baseline}-bo{best_of_n}", models[baseline], best_of_n))
    scorer = load_for_scoring(reward_model) if reward_model else None
    ref = load_causal_lm(ModelConfig(name_or_path=reference))[0] if reference else None
    temperature = sampling.temperature or 1.0
    report: dict = {"prompts": len(given), "distinct_prompts": len(set(given)),
                    "samples_per_prompt": samples_per_prompt, "baseline": baseline, "models": {}, "win_rates": {}}
    samples: dict[str, list[dict]] = {}
    for name, path, n in runs:
        model, tokenizer = load_causal_lm(ModelConfig(name_or_path=path))
        if n:
            generations = [pick.best for pick in sample_best_of_n(model, tokenizer, scorer, prompts, n, sampling,
                                                                  seed=seed + 1)]
        else:
            generations = generate(model, tokenizer, prompts, sampling, seed=seed)
        texts = [g.text for g in generations]
        rows = [{"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True)]
        metrics = {"eos_rate": sum(g.finished for g in generations) / len(generations),
                   "length/tokens": sum(len(g.token_ids) for g in generations) / len(generations),
                   "distinct/1": distinct_n(texts, 1), "distinct/2": distinct_n(texts, 2)}
        if task is not None:
            gold = [task.gold_score(p, t) for p, t in zip(prompts, texts, strict=True)]
            metrics.update({"gold/score": sum(gold) / len(gold), "gold/stderr": standard_error(gold),
                            "gold/criteria": criterion_means(task, prompts, texts)})
            for row, value in zip(rows, gold, strict=True):
                row["gold"] = value
        if scorer is not None:
            rewards = score_texts(*scorer, prompts, texts)
            metrics["rm/score"] = sum(rewards) / len(rewards)
            for row, value in zip(rows, rewards, strict=True):
                row["rm"] = value
        if n:
            metrics.update({"kl": best_of_n_kl(n), "kl_analytic": True})
        elif ref is not None:
            ours = response_logprobs(model, tokenizer, prompts, generations, temperature=temperature)
            theirs = response_logprobs(ref, tokenizer, prompts, generations, temperature=temperature)
            metrics["kl"] = sum(a - b for a, b in zip(ours, theirs, strict=True)) / len(ours)
        if heldout_texts and not n:  # best-of-n is no autoregressive model: no perplexity of its own
            metrics["heldout/ppl"] = text_perplexity(model, tokenizer, heldout_texts)
        report["models"][name] = metrics
        samples[name] = rows
    for name in samples:
        if name == baseline:
            continue
        report["win_rates"][name] = {
            judge: win_rate([r[judge] for r in samples[name]], [r[judge] for r in samples[baseline]], seed=seed,
                            groups=prompts)
            for judge in ("gold", "rm") if judge in samples[name][0]}
    return report, samples


def comparison_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows (model first) of an :func:`evaluate_models` report or a pipeline summary.

    Columns that no model fills (no gold judge, no reward model, no reference) are left out.
    """
    baseline = report.get("baseline")
    columns = {"gold score": lambda m, w: (f"{m['gold/score']:.3f} ± {m['gold/stderr']:.3f}"
                                           if "gold/score" in m else ""),
               f"win rate vs {baseline} (gold)": lambda m, w: _interval(w.get("gold")),
               f"win rate vs {baseline} (RM)": lambda m, w: _interval(w.get("rm")),
               f"win rate vs {baseline} (human)": lambda m, w: _interval(w.get("human")),
               "on topic": lambda m, w: (f"{m['gold/criteria']['topic']:.0%}"
                                         if "topic" in m.get("gold/criteria", {}) else ""),
               "RM score": lambda m, w: f"{m['rm/score']:.2f}" if "rm/score" in m else "",
               "KL to reference": lambda m, w: (f"{m['kl']:.2f}" + (" (analytic)" if m.get("kl_analytic") else "")
                                                if "kl" in m else ""),
               "held-out ppl": lambda m, w: f"{m['heldout/ppl']:.2f}" if "heldout/ppl" in m else "",
               "ended with EOS": lambda m, w: f"{m['eos_rate']:.0%}",
               "tokens": lambda m, w: f"{m['length/tokens']:.1f}",
               "distinct-2": lambda m, w: f"{m['distinct/2']:.2f}" if "distinct/2" in m else ""}
    rows = [[cell(m, report.get("win_rates", {}).get(name, {})) for cell in columns.values()]
            for name, m in report["models"].items()]
    keep = [i for i in range(len(columns)) if any(row[i] for row in rows)]
    headers = ["model", *(h for i, h in enumerate(columns) if i in keep)]
    return headers, [[name, *(row[i] for i in keep)] for name, row in zip(report["models"], rows, strict=True)]


def comparison_table(report: dict, title: str, caption: str | None = None) -> Table:
    """The models of an :func:`evaluate_models` report (or a pipeline summary) as a rich table."""
    headers, rows = comparison_rows(report)
    table = Table(title=title, caption=caption)
    for header in headers:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _interval(result: dict | None) -> str:
    return f"{result['win_rate']:.1%} [{result['low']:.1%}, {result['high']:.1%}]" if result else ""
