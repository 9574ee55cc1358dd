"""The embedded default: build everything offline from a built-in task and run the stages in order.

``rlhfkit demo`` writes, under ``out_dir``::

    data/         corpus.jsonl, heldout_text.jsonl, sft_train.jsonl, sft_eval.jsonl, eval_prompts.jsonl (from
                  the task; heldout_text: documents no stage trains on, for the alignment tax)
    tokenizer/    byte-level BPE trained on the task's text
    pretrain/     base model: next-token prediction on the corpus
    sft/          step 1: supervised fine-tuning on simulated labelers' demonstrations
    data/samples.jsonl, data/rankings.jsonl
                  step 2's input: K samples of the SFT policy per prompt, ranked by the simulated labeler
    rm/           step 2: reward model trained on the rankings (InstructGPT loss)
    ppo/          step 3: PPO from the SFT policy against the reward model, KL penalty to SFT
    dpo/          the RL-free alternative: DPO from the SFT policy on the same rankings
    samples/      <model>.jsonl: held-out prompts, completions, gold and reward-model scores of every model
    summary.json  every model (and the half-way PPO / DPO checkpoints) on held-out prompts: gold score,
                  win rates against SFT, reward-model score, KL to SFT; the reward model's gold accuracy
    report.html   the report (rlhfkit report); illustration.svg / .png: the three steps (rlhfkit illustrate)

Every stage's config is an ordinary stage config (validated, written to its run directory), so any
stage can be re-run by hand with ``rlhfkit <stage> --config <run>/config.yaml``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import Field
from rich.console import Console
from rich.table import Table

from rlhfkit.config import (
    DPOConfig,
    ModelConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    Section,
    SFTConfig,
    load_config,
    save_config,
)
from rlhfkit.data.readers import read_records, read_texts, write_jsonl
from rlhfkit.evaluate.compare import comparison_table, evaluate_models
from rlhfkit.evaluate.gold import gold_pairwise_accuracy
from rlhfkit.evaluate.illustrate import illustrate
from rlhfkit.evaluate.report import write_report
from rlhfkit.models.load import load_causal_lm
from rlhfkit.models.reward import load_for_scoring, score_texts
from rlhfkit.models.tokenizer import train_bpe_tokenizer
from rlhfkit.rollout.generate import SamplingConfig, generate_k
from rlhfkit.tasks import get_task
from rlhfkit.tasks.base import Task
from rlhfkit.trainers.dpo import run_dpo
from rlhfkit.trainers.ppo import run_ppo
from rlhfkit.trainers.pretrain import run_pretrain
from rlhfkit.trainers.reward import run_reward
from rlhfkit.trainers.sft import run_sft


class StageSchedule(Section):
    """Optimisation settings of one demo stage."""

    max_steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(16, gt=0)
    warmup_steps: int = Field(20, ge=0)


class DPOSchedule(StageSchedule):
    """The DPO stage: its schedule and the KL strength beta."""

    beta: float = Field(0.3, gt=0)


class PPOSchedule(StageSchedule):
    """The PPO stage: ``max_steps`` iterations of ``rollout_batch_size`` prompts each."""

    rollout_batch_size: int = Field(64, gt=0)
    minibatch_size: int = Field(16, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    kl_coef: float = Field(0.1, ge=0)


class DemoConfig(Section):
    """Sizes of the embedded default; the defaults finish in a few minutes on 2 CPU cores."""

    out_dir: str = "runs/demo"
    task: str = "tinyworld"
    seed: int = 0
    preset: str = "tiny"
    hidden_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    vocab_size: int = Field(1024, gt=256)
    corpus_docs: int = Field(2000, gt=0)
    heldout_docs: int = Field(200, gt=0)
    sft_prompts: int = Field(2000, gt=0)
    sft_eval_prompts: int = Field(64, gt=0)
    eval_prompts: int = Field(400, gt=0)
    max_length: int = Field(128, gt=8)
    eval_temperature: float = Field(0.7, ge=0)
    # SFT must run long enough for the policy to condition on the prompt's subject: at 200 steps of 16 the
    # SFT model scored 0.20 by the gold judge, at 300 steps of 32 0.34-0.36, at 400 steps 0.38
    # (demonstrations: ~0.69); 300 keeps the whole demo within 10 minutes on 2 cores.
    pretrain: StageSchedule = StageSchedule(max_steps=300, lr=3e-3, batch_size=32)
    sft: StageSchedule = StageSchedule(max_steps=300, lr=2e-3, batch_size=32)
    # Step 2: the SFT policy samples ``k`` completions for each of ``rank_prompts`` train prompts at
    # ``sample_temperature``; the task's simulated labeler ranks them (noisy, length-biased).
    rank_prompts: int = Field(2000, gt=0)
    k: int = Field(4, ge=2)
    sample_temperature: float = Field(0.7, gt=0)
    rm: StageSchedule = StageSchedule(max_steps=750, lr=1e-3, batch_size=8, warmup_steps=5)
    # Step 3. Both must stay close to SFT: the labeler's length bias, learnt by the reward model and
    # present in the preferences, pulls a policy optimised hard past the gold judge's ideal length.
    ppo: PPOSchedule = PPOSchedule(max_steps=30, lr=5e-5, warmup_steps=0)
    dpo: DPOSchedule = DPOSchedule(max_steps=400, lr=3e-5, batch_size=16, warmup_steps=5)


def prepare_task_data(config: DemoConfig) -> dict[str, Path]:
    """Write the task's corpus, demonstrations and held-out prompts as JSONL; return their paths."""
    task = get_task(config.task)
    data = Path(config.out_dir) / "data"
    paths = {name: data / f"{name}.jsonl"
             for name in ("corpus", "heldout_text", "sft_train", "sft_eval", "eval_prompts", "rank_prompts")}
    if all(p.exists() for p in paths.values()):
        return paths
    write_jsonl(paths["corpus"], ({"text": t} for t in task.pretraining_corpus(config.corpus_docs,
                                                                                  seed=config.seed)))
    # documents of the same world that no stage trains on: the alignment tax is measured on them
    write_jsonl(paths["heldout_text"], ({"text": t} for t in task.pretraining_corpus(config.heldout_docs,
                                                                                        seed=config.seed + 1000)))
    train_prompts = task.prompts(config.sft_prompts, split="train", seed=config.seed)
    write_jsonl(paths["sft_train"], task.demonstrations(train_prompts, seed=config.seed))
    held_out = task.prompts(config.sft_eval_prompts + config.eval_prompts, split="test", seed=config.seed)
    write_jsonl(paths["sft_eval"], task.demonstrations(held_out[:config.sft_eval_prompts], seed=config.seed + 1))
    write_jsonl(paths["eval_prompts"], ({"prompt": p} for p in held_out[config.sft_eval_prompts:]))
    rank_prompts = task.prompts(config.rank_prompts, split="train", seed=config.seed + 1)
    write_jsonl(paths["rank_prompts"], ({"prompt": p} for p in rank_prompts))
    return paths


def _sample_k(config: DemoConfig, policy_dir: Path, prompts: list[str], seed: int):
    """``config.k`` samples per prompt from a saved policy, at the demo's sampling temperature."""
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(policy_dir)))
    sampling = SamplingConfig(max_new_tokens=config.max_length // 2, temperature=config.sample_temperature,
                              batch_size=128)
    return generate_k(policy, tokenizer, prompts, config.k, sampling, seed=seed)


def sample_and_rank(config: DemoConfig, task: Task, policy_dir: Path, prompts_path: Path, out: Path) -> int:
    """Step 2's data: ``k`` samples per prompt from the policy, ranked by the task's simulated labeler.

    Writes ``samples.jsonl`` (what labelers are shown) and ``rankings.jsonl`` into ``out``; returns the
    number of rankings (prompts with two or more distinct finished samples). A sample cut
    off at the length limit is left out: trained on as if it ended there, it would teach the models to
    stop mid-sentence.
    """
    import random

    prompts = [r.prompt for r in read_records(prompts_path, "prompt")]
    groups = _sample_k(config, policy_dir, prompts, config.seed)
    samples = [{"prompt": p, "completions": [g.text for g in group if g.finished]}
               for p, group in zip(prompts, groups, strict=True)]
    write_jsonl(out / "samples.jsonl", samples)
    rng = random.Random(config.seed)
    records = (task.rank_samples(row["prompt"], row["completions"], rng=rng) for row in samples)
    return write_jsonl(out / "rankings.jsonl", (r for r in records if r is not None))


def reward_model_gold_accuracy(config: DemoConfig, task: Task, rm_dir: Path, policy_dir: Path,
                               prompts: list[str]) -> dict[str, float]:
    """How often the reward model orders ``k`` fresh samples of held-out prompts as the gold judge does."""
    groups = [[g.text for g in group] for group in _sample_k(config, policy_dir, prompts, config.seed + 1)]
    model, tokenizer = load_for_scoring(str(rm_dir))
    rewards = iter(score_texts(model, tokenizer, [p for p, group in zip(prompts, groups, strict=True) for _ in group],
                               [text for group in groups for text in group], batch_size=64,
                               max_length=config.max_length, max_prompt_length=config.max_length // 2))
    return gold_pairwise_accuracy(task, prompts, groups, [[next(rewards) for _ in group] for group in groups])


def _tokenizer_texts(paths: dict[str, Path]):
    for name in ("corpus", "sft_train"):
        for line in paths[name].read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            yield from (row[k] for k in ("text", "prompt", "completion") if k in row)


def _train_section(config: DemoConfig, schedule: StageSchedule, output_dir: Path, *, log_every: int = 25) -> dict:
    return {"output_dir": str(output_dir), "seed": config.seed, "max_steps": schedule.max_steps,
            "lr": schedule.lr, "batch_size": schedule.batch_size, "warmup_steps": schedule.warmup_steps,
            "log_every": log_every, "eval_every": schedule.max_steps, "save_every": max(schedule.max_steps // 2, 1)}


class StageTimer:
    """Announces each stage with a rule on the console and records its wall time in seconds."""

    def __init__(self, console: Console):
        self.console, self.seconds = console, {}
        self._current: str | None = None
        self._started = 0.0

    def start(self, name: str, title: str | None = None) -> None:
        self.stop()
        self.console.rule(title or name)
        self._current, self._started = name, time.perf_counter()

    def stop(self) -> dict[str, float]:
        """End the current stage; return the seconds of every stage so far (and their ``total``)."""
        if self._current is not None:
            self.seconds[self._current] = round(time.perf_counter() - self._started, 1)
            self._current = None
        return {**self.seconds, "total": round(sum(self.seconds.values()), 1)}


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """The three steps on the built-in task, then the gold judge's evaluation of every model.

    Tokenizer -> pretrain -> SFT (step 1) -> sample K and rank -> reward model (step 2) -> PPO (step 3);
    SFT -> DPO on the same rankings.
    """
    console = console or Console(stderr=True)
    out = Path(config.out_dir)
    save_config(config, out)
    stages = StageTimer(console)
    stages.start("tokenizer")
    task = get_task(config.task)
    paths = prepare_task_data(config)
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_bpe_tokenizer(_tokenizer_texts(paths), vocab_size=config.vocab_size, save_dir=tokenizer_dir)

    stages.start("pretrain")
    architecture = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers}
    pretrain = load_config(PretrainConfig, base={
        "model": {"preset": config.preset, "tokenizer": str(tokenizer_dir), "architecture": architecture},
        "data": {"train": str(paths["corpus"]), "max_length": config.max_length},
        "train": _train_section(config, config.pretrain, out / "pretrain")})
    run_pretrain(pretrain, console)

    stages.start("sft", "sft (step 1)")
    sft_dir = out / "sft" / "final"
    sft = load_config(SFTConfig, base={
        "model": {"name_or_path": str(out / "pretrain" / "final")},
        "data": {"train": str(paths["sft_train"]), "eval": str(paths["sft_eval"]),
                 "max_length": config.max_length, "max_prompt_length": config.max_length // 2},
        "train": _train_section(config, config.sft, out / "sft")})
    run_sft(sft, console)

    stages.start("sample_and_rank", f"sample {config.k} per prompt and rank (step 2)")
    rankings = out / "data" / "rankings.jsonl"
    count = sample_and_rank(config, task, sft_dir, paths["rank_prompts"], rankings.parent)
    console.print(f"{count} rankings written to {rankings}")
    data = {"train": str(rankings), "max_length": config.max_length, "max_prompt_length": config.max_length // 2}

    stages.start("rm", "reward model (step 2)")
    run_reward(load_config(RewardConfig, base={
        "model": {"name_or_path": str(sft_dir)}, "data": data,
        "train": _train_section(config, config.rm, out / "rm", log_every=50)}), console)

    stages.start("ppo", "ppo (step 3)")
    ppo = config.ppo
    run_ppo(load_config(PPOConfig, base={
        "model": {"name_or_path": str(sft_dir)},
        "data": {"train": str(paths["sft_train"]), "max_length": config.max_length,
                 "max_prompt_length": config.max_length // 2},
        "train": {**_train_section(config, ppo, out / "ppo", log_every=1), "scheduler": "constant"},
        "ppo": {"reward_model": str(out / "rm" / "final"), "rollout_batch_size": ppo.rollout_batch_size,
                "minibatch_size": ppo.minibatch_size, "ppo_epochs": ppo.ppo_epochs, "kl_coef": ppo.kl_coef,
                "max_new_tokens": config.max_length // 2, "temperature": config.sample_temperature,
                # every rollout is logged: the report plots their proxy against their gold score
                "samples_to_log": ppo.rollout_batch_size}}), console)

    stages.start("dpo")
    run_dpo(load_config(DPOConfig, base={
        "model": {"name_or_path": str(sft_dir)}, "data": data,
        "train": _train_section(config, config.dpo, out / "dpo", log_every=50),
        "dpo": {"beta": config.dpo.beta, "precompute_reference": True}}), console)

    stages.start("evaluate")
    prompts = [r.prompt for r in read_records(paths["eval_prompts"], "prompt")]
    sampling = SamplingConfig(max_new_tokens=config.max_length // 2, temperature=config.eval_temperature,
                              batch_size=100)
    models = {name: str(out / name / "final") for name in ("pretrain", "sft", "ppo", "dpo")}
    for name, schedule in (("ppo", config.ppo), ("dpo", config.dpo)):  # half-way: a point of the KL frontier
        half = out / name / f"checkpoint-{max(schedule.max_steps // 2, 1)}"
        if half.exists() and half.name != f"checkpoint-{schedule.max_steps}":
            models[f"{name}@{schedule.max_steps // 2}"] = str(half)
    heldout = read_texts(paths["heldout_text"])
    report, samples = evaluate_models(models, prompts, sampling, task=task, reward_model=str(out / "rm" / "final"),
                                      reference=str(sft_dir), baseline="sft", heldout_texts=heldout,
                                      seed=config.seed)
    for name, rows in samples.items():
        write_jsonl(out / "samples" / f"{name}.jsonl", rows)
    summary: dict = {"task": config.task, "eval_prompts": len(prompts), "baseline": report["baseline"],
                     "models": report["models"], "win_rates": report["win_rates"]}
    summary["reward_model"] = reward_model_gold_accuracy(config, task, out / "rm" / "final", sft_dir, prompts)
    summary["seconds"] = stages.stop()
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    console.print(summary_table(summary))
    report_path = write_report(out)
    svg, png = illustrate(out)
    console.print(f"report: {report_path}\nillustration: {svg}, {png}")
    return summary


def summary_table(summary: dict) -> Table:
    """Every model of a run judged on held-out prompts, as a rich table."""
    rm = summary.get("reward_model")
    caption = (f"reward model orders {rm['gold/accuracy']:.1%} of {rm['gold/pairs']} sample pairs as the gold judge"
               if rm else None)
    return comparison_table(summary, f"{summary['eval_prompts']} held-out prompts ({summary['task']})", caption)
