"""The ``rlhfkit`` command line: one sub-command per stage, all sharing ``--config`` and ``--set``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from rlhfkit import cli_public
from rlhfkit.cli_common import console, fail_cleanly
from rlhfkit.data.records import DataError
from rlhfkit.feedback import cli as feedback_cli

# torch, transformers and the trainers are imported inside the commands that use them: the feedback
# commands and `serve` start in well under a second (tests/test_feedback_cli.py checks the import graph)

app = typer.Typer(help="Align language models with human feedback: SFT, reward models, PPO, DPO.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.callback()
def _quiet_libraries() -> None:
    """rlhfkit shows its own progress; transformers' per-file loading and saving bars are noise.

    Without importing transformers (seconds): the Hub's switch, which transformers reads when it loads."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _sampling(**settings):
    """The rollout's SamplingConfig (imported here: its module loads torch)."""
    from rlhfkit.rollout.generate import SamplingConfig

    return SamplingConfig(**settings)


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: a.b=value (repeatable).")]


def _train(config_class, run, config: Path | None, overrides: list[str] | None, base: dict | None = None) -> None:
    """Load a stage config (``base`` defaults, file, ``--set`` overrides), run the stage, print its last metrics."""
    from rlhfkit.config import load_config

    metrics = run(load_config(config_class, config, overrides or [], base=base), console)
    console.print_json(json.dumps(metrics))


@app.command()
@fail_cleanly
def pretrain(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Pretrain a causal LM on raw text (next-token prediction)."""
    from rlhfkit.config import PretrainConfig
    from rlhfkit.trainers.pretrain import run_pretrain

    _train(PretrainConfig, run_pretrain, config, set_)


@app.command()
@fail_cleanly
def sft(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Supervised fine-tuning on demonstrations (loss on the response only)."""
    from rlhfkit.config import SFTConfig
    from rlhfkit.trainers.sft import run_sft

    _train(SFTConfig, run_sft, config, set_)


@app.command()
@fail_cleanly
def dpo(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train a policy from preferences: DPO, IPO, robust DPO, hinge, ORPO, KTO or SimPO (dpo.loss)."""
    from rlhfkit.config import DPOConfig
    from rlhfkit.trainers.dpo import run_dpo

    _train(DPOConfig, run_dpo, config, set_)


@app.command("online-dpo")
@fail_cleanly
def online_dpo(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Online DPO: the policy's own samples, ranked by a reward model, reward functions or a task's labeler as it
    trains, and a DPO-family loss on their pairs (online.ref_update_every: iterative DPO)."""
    from rlhfkit.config import OnlineDPOConfig
    from rlhfkit.trainers.online_dpo import run_online_dpo

    _train(OnlineDPOConfig, run_online_dpo, config, set_)


@app.command()
@fail_cleanly
def tokenizer(
    data: Annotated[Path, typer.Option(help="Text records ({'text': ...} JSONL or .txt) to train on.")],
    out: Annotated[Path, typer.Option(help="Directory for the tokenizer (HF format).")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 1024,
) -> None:
    """Train a byte-level BPE tokenizer (with pad/EOS tokens and a chat template) locally."""
    from rlhfkit.data.readers import read_texts
    from rlhfkit.models.tokenizer import train_bpe_tokenizer

    trained = train_bpe_tokenizer(read_texts(data), vocab_size=vocab_size, save_dir=out)
    console.print(f"tokenizer with {len(trained)} tokens written to {out}")


@app.command()
@fail_cleanly
def generate(
    model: Annotated[str, typer.Option(help="Model directory (HF format) or hub id.")],
    prompts: Annotated[Path, typer.Option(help="Prompt records: JSONL, JSON, parquet, CSV or dataset dir.")],
    out: Annotated[Path, typer.Option(help="Output JSONL: prompt + completion per line.")],
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 1.0,
    top_p: float = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> None:
    """Sample one completion per prompt from a checkpoint (stops at EOS)."""
    from rlhfkit import workflows

    sampling = _sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         batch_size=batch_size)
    workflows.generate_completions(model, prompts, out, sampling, seed=seed, console=console)


@app.command()
@fail_cleanly
def sample(
    model: Annotated[str, typer.Option(help="Policy directory (HF format), e.g. runs/sft/final.")],
    prompts: Annotated[Path, typer.Option(help="Prompt records: JSONL, JSON, parquet, CSV or dataset dir.")],
    out: Annotated[Path, typer.Option(help="Output JSONL: {prompt, completions: [K texts]} per prompt.")],
    k: Annotated[int, typer.Option("--k", min=2, help="Completions per prompt (for labelers to rank).")] = 4,
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(help="> 0 (greedy decoding would make all K equal).")] = 1.0,
    top_p: float = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per generate() call.")] = 32,
    seed: int = 0,
) -> None:
    """Sample K completions per prompt from a checkpoint, to be ranked (step 2 of InstructGPT)."""
    from rlhfkit import workflows

    sampling = _sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         batch_size=batch_size)
    workflows.sample_completions(model, prompts, out, sampling, k=k, seed=seed, console=console)


@app.command()
@fail_cleanly
def rank(
    task: Annotated[str, typer.Option(help="Built-in task whose simulated labeler ranks (e.g. tinyworld).")],
    samples: Annotated[Path, typer.Option(help="JSONL from `rlhfkit sample`: {prompt, completions}.")],
    out: Annotated[Path, typer.Option(help="Output JSONL of ranking records.")],
    seed: int = 0,
    temperature: Annotated[float | None, typer.Option(help="Labeler noise (default: the task's).")] = None,
) -> None:
    """Rank sampled completions with a built-in task's simulated labeler (noisy, ties for equal texts)."""
    from rlhfkit import workflows

    workflows.rank_samples(samples, out, task=task, seed=seed, temperature=temperature, console=console)


@app.command()
@fail_cleanly
def rm(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Train a reward model on K-way rankings or pairwise preferences (InstructGPT loss)."""
    from rlhfkit.config import RewardConfig
    from rlhfkit.trainers.reward import run_reward

    _train(RewardConfig, run_reward, config, set_)


@app.command()
@fail_cleanly
def score(
    model: Annotated[str, typer.Option(help="Reward model directory, e.g. runs/rm/final.")],
    data: Annotated[Path, typer.Option(help="JSONL with prompt + completion, completions or chosen/rejected.")],
    out: Annotated[Path, typer.Option(help="Output JSONL: the input rows plus reward(s).")],
    raw: Annotated[bool, typer.Option(help="Skip the stored normalisation (raw model output).")] = False,
    task: Annotated[str | None, typer.Option(help="Also report agreement with this built-in task's gold "
                                                  "judge (pairs ordered by gold score).")] = None,
    batch_size: int = 32,
    max_length: Annotated[int | None, typer.Option(help="Tokens read per (prompt, completion); default and "
                                                        "upper bound: the model's training window (else 512).")] = None,
    max_prompt_length: Annotated[int | None, typer.Option(help="Prompt tokens kept (its end); default and upper "
                                                               "bound: the training window's (else 256).")] = None,
) -> None:
    """Add a reward to each record: `reward` for a completion, `rewards` for a completions list,
    `reward_chosen`/`reward_rejected` for a pair. Reports accuracy against the file's own rankings: the share of
    their pairs the rewards order alike, an exact tie of two rewards counting as half right."""
    from rlhfkit import workflows

    summary = workflows.score_records(model, data, out, normalize=not raw, task=task, batch_size=batch_size,
                                      max_length=max_length, max_prompt_length=max_prompt_length, console=console)
    console.print_json(json.dumps(summary))


@app.command("best-of-n")
@fail_cleanly
def best_of_n(
    model: Annotated[str, typer.Option(help="Policy directory (HF format), e.g. runs/sft/final.")],
    reward_model: Annotated[str, typer.Option(help="Reward model directory that picks, e.g. runs/rm/final.")],
    prompts: Annotated[Path, typer.Option(help="Prompt records: JSONL, JSON, parquet, CSV or dataset dir.")],
    out: Annotated[Path, typer.Option(help="Output JSONL: {prompt, completion, reward, n} per prompt.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Completions sampled per prompt; the best is kept.")] = 16,
    max_new_tokens: int = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding (all n would be equal).")] = 1.0,
    top_p: float = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per generate() and reward-model call.")] = 32,
    seed: int = 0,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
) -> None:
    """Best-of-n: sample n completions per prompt, keep the one the reward model scores highest.

    The output is SFT data (prompt + completion), for rejection-sampling fine-tuning as in Llama 2:
    `rlhfkit sft --set data.train=best.jsonl`. Its KL to the policy is log n - (n - 1) / n."""
    from rlhfkit import workflows

    sampling = _sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         batch_size=batch_size)
    summary = workflows.best_of_n(model, reward_model, prompts, out, sampling, n=n, seed=seed, limit=limit,
                                  console=console)
    console.print_json(json.dumps(summary))


@app.command()
@fail_cleanly
def ppo(config: ConfigOption = None, set_: SetOption = None) -> None:
    """PPO (or RLOO / GRPO) of a policy against a frozen reward model, with a KL penalty to the reference."""
    from rlhfkit.config import PPOConfig
    from rlhfkit.trainers.ppo import run_ppo

    _train(PPOConfig, run_ppo, config, set_)


@app.command()
@fail_cleanly
def grpo(
    config: ConfigOption = None,
    set_: SetOption = None,
    num_generations: Annotated[int | None, typer.Option(min=2, help="Completions per prompt, a group: "
                                                         "ppo.samples_per_prompt (TRL's name).")] = None,
    epsilon: Annotated[float | None, typer.Option(min=0.0, help="Clip range: ppo.clip_range.")] = None,
    beta: Annotated[float | None, typer.Option(min=0.0, help="KL coefficient: ppo.kl_coef.")] = None,
) -> None:
    """GRPO: the PPO trainer from TRL's GRPO defaults (groups of 8, no KL penalty, one pass per rollout)."""
    from rlhfkit.config import GRPO_DEFAULTS, PPOConfig
    from rlhfkit.trainers.ppo import run_ppo

    named = {"ppo.samples_per_prompt": num_generations, "ppo.clip_range": epsilon, "ppo.kl_coef": beta}
    overrides = [f"{key}={value}" for key, value in named.items() if value is not None]
    _train(PPOConfig, run_ppo, config, [*overrides, *(set_ or [])], base=GRPO_DEFAULTS)


def _named_models(spec: str) -> dict[str, str]:
    """``sft=runs/sft/final,ppo=runs/ppo/final`` -> {"sft": ..., "ppo": ...}."""
    from rlhfkit.config import ConfigError

    models: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--models {spec!r}: expected NAME=PATH[,NAME=PATH...], e.g. sft=runs/sft/final")
        if name.strip() in models:
            raise ConfigError(f"--models {spec!r}: the name {name.strip()!r} is given twice")
        models[name.strip()] = path.strip()
    return models


@app.command("eval")
@fail_cleanly
def evaluate(
    models: Annotated[str, typer.Option(help="NAME=PATH pairs, comma-separated: sft=runs/sft/final,ppo=...")],
    prompts: Annotated[Path, typer.Option(help="Held-out prompt records (JSONL, JSON, parquet, CSV, dataset).")],
    out: Annotated[Path, typer.Option(help="Directory for eval.json and samples/<name>.jsonl.")] = Path("runs/eval"),
    task: Annotated[str | None, typer.Option(help="Built-in task whose gold judge scores the samples.")] = None,
    reward_model: Annotated[str | None, typer.Option(help="Reward model that scores the samples.")] = None,
    reference: Annotated[str | None, typer.Option(help="Reference policy for KL (e.g. the SFT model).")] = None,
    baseline: Annotated[str | None, typer.Option(help="Win rates against this model (default: the first).")] = None,
    heldout_text: Annotated[Path | None, typer.Option(help="Raw text records ({\"text\"}) for held-out "
                                                           "perplexity (the alignment tax).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens sampled at most per completion.")] = 64,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Sampling temperature (default 0.7); 0 for "
                                                                    "greedy decoding.")] = None,
    greedy: Annotated[bool, typer.Option(help="Greedy decoding (temperature 0).")] = False,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling: the smallest set of tokens "
                                                                "with this probability.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the K likeliest tokens; 0 disables top-k.")] = 0,
    samples_per_prompt: Annotated[int, typer.Option(min=1, help="Completions per prompt, each judged as a row; "
                                                                "win-rate intervals bootstrap whole prompts.")] = 1,
    batch_size: int = 32,
    seed: int = 0,
    best_of_n: Annotated[int, typer.Option(min=0, help="Also a '<baseline>-bo<N>' row: best-of-N of the baseline "
                                                       "picked by --reward-model, with the analytic KL.")] = 0,
) -> None:
    """Compare models on the same prompts: gold judge, reward model, KL to a reference, win rates."""
    from rlhfkit import workflows
    from rlhfkit.config import ConfigError
    from rlhfkit.evaluate.compare import comparison_table

    named = _named_models(models)
    if baseline is not None and baseline not in named:
        raise ConfigError(f"--baseline {baseline!r} is not one of --models ({', '.join(named)})")
    if best_of_n and not reward_model:
        raise ConfigError("--best-of-n needs --reward-model (it picks the best of the N samples)")
    if greedy and temperature:
        raise ConfigError(f"--greedy is temperature 0; it cannot go with --temperature {temperature}")
    temperature = 0.0 if greedy else 0.7 if temperature is None else temperature
    sampling = _sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                         batch_size=batch_size)
    evaluation = workflows.evaluate(named, prompts, out / "eval.json", sampling, task=task, reward_model=reward_model,
                                    reference=reference, baseline=baseline, heldout_text=heldout_text, limit=limit,
                                    seed=seed, best_of_n=best_of_n, samples_per_prompt=samples_per_prompt)
    each = f" x {samples_per_prompt} samples" if samples_per_prompt > 1 else ""
    console.print(comparison_table(evaluation.report, f"{len(evaluation.prompts)} prompts{each} from {prompts}"))
    console.print(f"written to {out / 'eval.json'} and {out / 'samples'}/")


human_app = typer.Typer(help="Win rates judged by people, through the feedback app's A/B tasks.",
                        no_args_is_help=True)
app.add_typer(human_app, name="human")


@human_app.command("pairs")
@fail_cleanly
def human_pairs(
    run_dir: Annotated[Path, typer.Argument(help="A run with samples/<model>.jsonl (pipeline, demo or eval).")],
    models: Annotated[str, typer.Option(help="Models to compare with the baseline, comma-separated.")],
    out: Annotated[Path, typer.Option(help="A/B records to import: rlhfkit feedback import OUT --kind ab.")],
    baseline: Annotated[str, typer.Option(help="The model every other one is compared with.")] = "sft",
    seed: Annotated[int, typer.Option(help="Seed of the random left/right order of each pair.")] = 0,
) -> None:
    """Write A/B pairs (each model's output and the baseline's for the same prompt, in a random order)."""
    from rlhfkit.config import ConfigError
    from rlhfkit.data.readers import iter_jsonl, write_jsonl
    from rlhfkit.evaluate.human import ab_pairs

    names = [name.strip() for name in models.split(",") if name.strip()]
    samples = {}
    for name in (*names, baseline):
        path = run_dir / "samples" / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no samples of {name!r} in {run_dir}")
        samples[name] = [row for _, row in iter_jsonl(path)]
    try:
        records = ab_pairs(samples, names, baseline, seed=seed)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    console.print(f"{write_jsonl(out, records)} A/B pairs written to {out}; "
                  f"load them with: rlhfkit feedback import {out} --kind ab")


@human_app.command("verdicts")
@fail_cleanly
def human_verdicts(
    run_dir: Annotated[Path, typer.Argument(help="The run the pairs came from (its summary.json is updated).")],
    verdicts: Annotated[Path, typer.Option(help="A/B verdicts: rlhfkit export --kind ab.")],
    baseline: Annotated[str | None, typer.Option(help="Default: the run's baseline.")] = None,
) -> None:
    """Add the human win rates of the verdicts to RUN_DIR/summary.json (and its report, if written)."""
    from rlhfkit.data.readers import iter_jsonl
    from rlhfkit.evaluate.compare import comparison_table
    from rlhfkit.evaluate.human import human_win_rates
    from rlhfkit.evaluate.report import write_report

    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path}: not found; run the pipeline's eval stage first")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    baseline = baseline or summary["baseline"]
    rates = human_win_rates((row for _, row in iter_jsonl(verdicts)), baseline, source=str(verdicts))
    if not rates:
        raise DataError(f"no verdict compares a model with {baseline!r}", source=str(verdicts))
    for name, rate in rates.items():
        summary.setdefault("win_rates", {}).setdefault(name, {})["human"] = rate
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    console.print(comparison_table(summary, f"{sum(r['wins'] + r['ties'] + r['losses'] for r in rates.values())} "
                                            f"human verdicts against {baseline}"))
    if (run_dir / "report.html").exists():
        console.print(f"report updated: {write_report(run_dir)}")


@app.command()
@fail_cleanly
def report(run_dir: Annotated[Path, typer.Argument(help="A pipeline run directory (with summary.json).")]) -> None:
    """Write RUN_DIR/report.html: models, win rates, training curves, over-optimisation, KL frontier, samples."""
    from rlhfkit.evaluate.report import write_report

    console.print(f"report written to {write_report(run_dir)}")


@app.command()
@fail_cleanly
def illustrate(run_dir: Annotated[Path, typer.Argument(help="A pipeline run directory.")],
               out: Annotated[Path | None, typer.Option(help="Directory for the files (default: RUN_DIR).")] = None,
               ) -> None:
    """Draw the three-step InstructGPT diagram with the run's prompts, outputs, ranking and reward."""
    from rlhfkit.evaluate.illustrate import illustrate as draw

    svg, png = draw(run_dir, out)
    console.print(f"illustration written to {svg} and {png}")


@app.command()
@fail_cleanly
def pipeline(config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML: stages and their sections.")],
             set_: SetOption = None) -> None:
    """Run the stages a pipeline config lists, each in its own run directory; finished stages are skipped."""
    from rlhfkit.pipeline import load_pipeline, run_pipeline

    pipeline_config, lines = load_pipeline(config, set_)
    seconds = run_pipeline(pipeline_config, console, source=str(config), lines=lines)
    console.print_json(json.dumps({"seconds": seconds}))


@app.command()
@fail_cleanly
def demo(config: ConfigOption = None, set_: SetOption = None) -> None:
    """The embedded default, offline: tiny model, pretrain, SFT, sample and rank, RM, PPO, DPO, evaluation (with
    --set task=sums: pretrain, SFT, GRPO on exact answers, evaluation)."""
    from rlhfkit.demo import load_demo_config, run_demo

    run_demo(load_demo_config(config, set_ or []), console)


def benchmarks_checkout(cwd: Path | None = None) -> Path:
    """The source checkout whose ``benchmarks/`` package ``rlhfkit bench`` runs: the current directory's, or
    the one this rlhfkit is installed from (an editable install); the benchmarks are not part of the wheel."""
    candidates = [cwd or Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    raise FileNotFoundError("rlhfkit bench runs the benchmarks of a source checkout (benchmarks/__main__.py), "
                            f"found in none of {', '.join(str(c) for c in candidates)}: run it from the "
                            "repository root")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
@fail_cleanly
def bench(ctx: typer.Context) -> None:
    """Every stage against TRL in one table: ``python -m benchmarks`` with the same arguments (see --help)."""
    import subprocess
    import sys

    root = benchmarks_checkout()
    raise typer.Exit(subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], cwd=root))


# commands that live beside their subject: public data and GGUF conversion; the feedback app's database
cli_public.register(app)
feedback_cli.register(app)
