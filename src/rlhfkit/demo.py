"""The embedded default (``rlhfkit demo``): everything built offline from a built-in task, run as a pipeline.

``rlhfkit demo`` writes, under ``out_dir``::

    data/         corpus.jsonl, heldout_text.jsonl, sft_train.jsonl, sft_eval.jsonl, eval_prompts.jsonl,
                  rank_prompts.jsonl (from the task; heldout_text: documents no stage trains on, for the
                  alignment tax)
    tokenizer/    byte-level BPE trained on the task's text
    pretrain/     base model: next-token prediction on the corpus
    sft/          step 1: supervised fine-tuning on simulated labelers' demonstrations
    sample/, rank/
                  step 2's input: K samples of the SFT policy per prompt, ranked by the simulated labeler
    rm/           step 2: reward model trained on the rankings (InstructGPT loss)
    ppo/          step 3: PPO from the SFT policy against the reward model, KL penalty to SFT
    dpo/          the RL-free alternative: DPO from the SFT policy on the same rankings
    samples/      <model>.jsonl: held-out prompts, completions, gold and reward-model scores of every model
    summary.json  every model (and the half-way PPO / DPO checkpoints) on held-out prompts: gold score,
                  win rates against SFT, reward-model score, KL to SFT; the reward model's gold accuracy;
                  the seconds of every stage
    report.html   the report (rlhfkit report); illustration.svg / .png: the three steps (rlhfkit illustrate)

After the task data and the tokenizer, the demo is an ordinary pipeline (:mod:`rlhfkit.pipeline`):
``config.yaml`` in ``out_dir`` is a pipeline config that ``rlhfkit pipeline --config`` runs again, and
running the demo again skips every stage that finished with the same settings.

A verifiable task (``--set task=sums``: prompts with exact answers, :meth:`rlhfkit.tasks.Task.answer`) runs
another recipe: ``data/rl_prompts.jsonl`` (train prompts with their ``answer``) instead of the rank prompts, and
pretrain -> SFT -> GRPO rewarded by ``exact_answer`` (the ``ppo/`` stage) -> evaluation -> report, with no
samples, rankings, reward model, DPO or illustration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from rich.console import Console

from rlhfkit.config import (
    DataConfig,
    DPOConfig,
    DPOSection,
    ModelConfig,
    OnlineDPOConfig,
    OnlineDPOSection,
    PPOConfig,
    PPOSection,
    PretrainConfig,
    RewardConfig,
    RewardSourceConfig,
    Section,
    SFTConfig,
    SFTSection,
    TrainConfig,
    load_config,
)
from rlhfkit.data.readers import write_jsonl
from rlhfkit.models.tokenizer import train_bpe_tokenizer
from rlhfkit.pipeline import (
    STAGES,
    EvalStage,
    PipelineConfig,
    RankStage,
    ReportStage,
    SampleStage,
    StageRunner,
    run_pipeline,
)
from rlhfkit.tasks import Task, get_task


class StageSchedule(Section):
    """Optimisation settings of one demo stage."""

    max_steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(16, gt=0)
    warmup_steps: int = Field(20, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"


class DPOSchedule(StageSchedule):
    """The DPO stage: its schedule and the KL strength beta."""

    beta: float = Field(0.3, gt=0)


class OnlineDPOSchedule(DPOSchedule):
    """The online DPO stage (run with ``online_dpo_enabled``): ``max_steps`` steps, each ``batch_size`` rank prompts
    with ``k`` samples of the policy being trained, ranked by the task's simulated labeler (as the rank stage ranks
    SFT's), one DPO step on their pairs. The default, 100 x 20, asks for as many rankings as the rank stage (2000 of
    4): offline and online DPO learn from the same number of labels."""

    ref_update_every: int | None = Field(None, gt=0)
    pairs: Literal["all", "best_worst"] = "best_worst"


class PPOSchedule(StageSchedule):
    """The PPO stage: ``max_steps`` iterations of ``rollout_batch_size`` prompts each."""

    rollout_batch_size: int = Field(64, gt=0)
    minibatch_size: int = Field(16, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "constant"
    ppo_epochs: int = Field(2, gt=0)
    # the demo's own default, given to the typed PPOSection as ppo.kl_coef (the library's default is PPOSection's)
    kl_coef: float = Field(0.1, ge=0)


class GRPOSchedule(StageSchedule):
    """The GRPO stage of a verifiable task: ``max_steps`` iterations of ``rollout_batch_size`` prompts with
    ``num_generations`` samples each, rewarded by the exact answer alone (no reward model, no KL penalty by
    default: ``beta`` in TRL's GRPO)."""

    rollout_batch_size: int = Field(8, gt=0)
    num_generations: int = Field(8, ge=2)
    scheduler: Literal["cosine", "linear", "constant"] = "constant"
    minibatch_size: int = Field(32, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    kl_coef: float = Field(0.0, ge=0)
    # the evaluation's temperature: at 1.0 a worked answer (~30 tokens) goes wrong more often than a direct one, and
    # GRPO at 1.0 learnt to answer directly (measured before the corpus taught the copies; docs/tasks.md)
    temperature: float = Field(0.7, gt=0)
    # DAPO's dynamic sampling (ppo.dynamic_sampling): groups all right or all wrong give way to other groups
    dynamic_sampling: bool = False


class DemoConfig(Section):
    """Sizes of the embedded default; the defaults finish in a few minutes on 2 CPU cores (a task's own defaults,
    :data:`TASK_DEFAULTS`, apply under the settings given through :func:`load_demo_config`)."""

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
    # every sampling stage (sample, PPO / GRPO rollouts, online DPO, eval) draws from the 50 likeliest tokens: what the
    # demo's figures were measured with (0 = the whole distribution: one run gave PPO 50.5 % and DPO 50.7 % against
    # SFT, against 54.6 % and 51.7 % with 50; README)
    top_k: int = Field(50, ge=0)
    # > 0: the evaluation's "sft-bo<N>" row, the best of N SFT samples by the reward model. Off by default:
    # N = 16 doubles the evaluation (118 s against 61 s on a quiet 2-core EPYC)
    best_of_n: int = Field(0, ge=0)
    # SFT must run long enough for the policy to condition on the prompt's subject. Gold score (and the
    # share of answers on the prompt's topic) on the held-out prompts, which ask about subjects no
    # demonstration covers / on fresh samples of training prompts: 300 steps of 32, 0.30 (33 %) / 0.53
    # (66 %); 600 steps, 0.40 (47 %) / 0.68 (85 %), the demonstrations' own mean (~0.68) on training prompts.
    pretrain: StageSchedule = StageSchedule(max_steps=300, lr=3e-3, batch_size=32)
    sft: StageSchedule = StageSchedule(max_steps=600, lr=2e-3, batch_size=32)
    # sft.loss_average (rlhfkit.config.SFTSection): how SFT averages its tokens; the sums task's "dataset"
    sft_loss_average: Literal["batch", "dataset"] = "batch"
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
    # online DPO beside offline DPO, from SFT on the rank prompts (off by default: it adds a stage)
    online_dpo_enabled: bool = False
    # best-against-worst pairs at 5e-5 were the best of five settings on seed 0 (all pairs at 3e-5 and 1e-4, the
    # reward model as the judge, a reference refreshed every 25 steps), chosen on the held-out prompts themselves;
    # on seed 1 they did not beat offline DPO (README)
    online_dpo: OnlineDPOSchedule = OnlineDPOSchedule(max_steps=100, lr=5e-5, batch_size=20, warmup_steps=5)
    # A verifiable task (one whose prompts have exact answers, such as ``sums``) runs another recipe: pretrain ->
    # SFT -> GRPO on ``rl_prompts`` train prompts with the ``exact_answer`` reward -> evaluation; the ``sample``,
    # ``rank``, ``rm``, ``ppo`` and ``dpo`` settings above are then unused.
    rl_prompts: int = Field(2000, gt=0)
    grpo: GRPOSchedule = GRPOSchedule(max_steps=200, lr=1e-4, warmup_steps=0)


#: The demo's defaults that differ by task, under the settings a user gives (key by key). ``sums``: short answers
#: (64 tokens hold a question and its worked answer) and pretraining long enough for the model to learn to copy a
#: sum and to add two numbers, which a worked answer needs.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # copying a sum's digits into a worked answer is learnt suddenly, at a step that varies from run to run (900
    # cosine-decayed steps: 1 % and 100 % of sums copied in two runs; 1200 at a constant rate: 68-98 %; docs/tasks.md)
    # SFT that weighs a worked answer's tokens as much as a direct one's keeps the demonstrations' share of each form
    "sums": {"max_length": 64, "corpus_docs": 8000, "pretrain": {"max_steps": 1200, "scheduler": "constant"},
             "sft_loss_average": "dataset"},
}


def load_demo_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DemoConfig:
    """``rlhfkit demo``'s config: :class:`DemoConfig`'s defaults, the task's :data:`TASK_DEFAULTS`, then the YAML file
    ``path`` and the ``--set`` ``overrides``."""
    config = load_config(DemoConfig, path, overrides)
    if config.task in TASK_DEFAULTS:
        config = load_config(DemoConfig, path, overrides, base=TASK_DEFAULTS[config.task])
    return config


DATA_FILES = ("corpus", "heldout_text", "sft_train", "sft_eval", "eval_prompts", "rank_prompts")


def is_verifiable(task: Task) -> bool:
    """Whether ``task``'s prompts have exact answers (:meth:`Task.answer`), so the demo trains with GRPO on them."""
    return task.answer(task.prompts(1)[0]) is not None


def prepare_task_data(config: DemoConfig, data: Path) -> None:
    """Write the task's corpus, demonstrations and prompts as JSONL files (:data:`DATA_FILES`) into ``data``; for a
    verifiable task, ``rl_prompts.jsonl`` instead of ``rank_prompts.jsonl``: train prompts with their ``answer``."""
    task = get_task(config.task)
    paths = {name: data / f"{name}.jsonl" for name in DATA_FILES}
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
    if is_verifiable(task):
        rl_prompts = task.prompts(config.rl_prompts, split="train", seed=config.seed + 2)
        write_jsonl(data / "rl_prompts.jsonl", ({"prompt": p, "answer": task.answer(p)} for p in rl_prompts))
        return
    rank_prompts = task.prompts(config.rank_prompts, split="train", seed=config.seed + 1)
    write_jsonl(paths["rank_prompts"], ({"prompt": p} for p in rank_prompts))


def _tokenizer_texts(data: Path):
    for name in ("corpus", "sft_train"):
        for line in (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            yield from (row[k] for k in ("text", "prompt", "completion") if k in row)


def _train(config: DemoConfig, stage: str, schedule: StageSchedule, *, log_every: int = 25, **settings) -> TrainConfig:
    """A stage's optimisation loop: its schedule, evaluated at its end, saved half-way (a point of the KL frontier);
    ``output_dir`` is the stage's directory, as the pipeline sets it."""
    return TrainConfig(output_dir=str(Path(config.out_dir) / stage), max_steps=schedule.max_steps, lr=schedule.lr,
                       batch_size=schedule.batch_size, warmup_steps=schedule.warmup_steps,
                       scheduler=schedule.scheduler, log_every=log_every,
                       eval_every=schedule.max_steps, save_every=max(schedule.max_steps // 2, 1), **settings)


def demo_pipeline(config: DemoConfig) -> PipelineConfig:
    """The demo's stages as a pipeline config; ``{data:...}`` and ``{tokenizer}`` are the demo's own stages.

    Every section is built as its stage's typed config (so each setting is checked here, and each default has one
    home: the demo's in :class:`DemoConfig`, the others in :mod:`rlhfkit.config`); the pipeline config holds the
    settings they were given.
    """
    def data(train: str, **more) -> DataConfig:
        return DataConfig(train=train, max_length=config.max_length, max_prompt_length=config.max_length // 2, **more)

    new_tokens = config.max_length // 2
    ppo, dpo = config.ppo, config.dpo
    sft_policy = ModelConfig(name_or_path="{sft}")
    sections: dict[str, Section] = {
        "pretrain": PretrainConfig(
            model=ModelConfig(preset=config.preset, tokenizer="{tokenizer}",
                              architecture={"hidden_size": config.hidden_size,
                                            "num_hidden_layers": config.num_hidden_layers}),
            data=DataConfig(train="{data:corpus.jsonl}", max_length=config.max_length),
            train=_train(config, "pretrain", config.pretrain)),
        "sft": SFTConfig(model=ModelConfig(name_or_path="{pretrain}"),
                         data=data("{data:sft_train.jsonl}", eval="{data:sft_eval.jsonl}"),
                         train=_train(config, "sft", config.sft), sft=SFTSection(loss_average=config.sft_loss_average)),
    }
    if is_verifiable(get_task(config.task)):
        return _pipeline(config, {**sections, **_verifiable_sections(config, data)})
    models = {"pretrain": "{pretrain}", "sft": "{sft}", "ppo": "{ppo}", "dpo": "{dpo}", **_half_way("ppo", ppo),
              **_half_way("dpo", dpo)}
    if config.online_dpo_enabled:
        online = config.online_dpo
        models |= {"online_dpo": "{online_dpo}", **_half_way("online_dpo", online)}
        sections["online_dpo"] = OnlineDPOConfig(
            model=sft_policy, data=data("{data:rank_prompts.jsonl}"),
            train=_train(config, "online_dpo", online, log_every=5), dpo=DPOSection(beta=online.beta),
            online=OnlineDPOSection(task=config.task, rollout_batch_size=online.batch_size, num_generations=config.k,
                                    max_new_tokens=new_tokens, temperature=config.sample_temperature,
                                    top_k=config.top_k, pairs=online.pairs, ref_update_every=online.ref_update_every))
    sections |= {
        "sample": SampleStage(model="{sft}", prompts="{data:rank_prompts.jsonl}", k=config.k,
                              max_new_tokens=new_tokens, temperature=config.sample_temperature, top_k=config.top_k,
                              batch_size=128),
        "rank": RankStage(),
        "rm": RewardConfig(model=sft_policy, data=data("{rank}"), train=_train(config, "rm", config.rm, log_every=50)),
        "ppo": PPOConfig(model=sft_policy, data=data("{data:sft_train.jsonl}"),
                         train=_train(config, "ppo", ppo, log_every=1),
                         ppo=PPOSection(reward_model="{rm}", rollout_batch_size=ppo.rollout_batch_size,
                                        minibatch_size=ppo.minibatch_size, ppo_epochs=ppo.ppo_epochs,
                                        kl_coef=ppo.kl_coef, max_new_tokens=new_tokens,
                                        temperature=config.sample_temperature, top_k=config.top_k,
                                        # every rollout is logged: the report plots their proxy against their gold
                                        samples_to_log=ppo.rollout_batch_size)),
        "dpo": DPOConfig(model=sft_policy, data=data("{rank}"), train=_train(config, "dpo", dpo, log_every=50),
                         dpo=DPOSection(beta=dpo.beta, precompute_reference=True)),
        "eval": EvalStage(models=models, prompts="{data:eval_prompts.jsonl}", reward_model="{rm}", reference="{sft}",
                          baseline="sft", heldout_text="{data:heldout_text.jsonl}", max_new_tokens=new_tokens,
                          temperature=config.eval_temperature, top_k=config.top_k, rm_gold_samples=config.k,
                          best_of_n=config.best_of_n),
        "report": ReportStage(),
    }
    return _pipeline(config, sections)


def _half_way(stage: str, schedule: StageSchedule, name: str | None = None) -> dict[str, str]:
    """``{"<name>@<half>": "{<stage>:checkpoint-<half>}"}``: the model saved half-way, a point of the KL frontier."""
    half = schedule.max_steps // 2
    return {f"{name or stage}@{half}": f"{{{stage}:checkpoint-{half}}}"} if half >= 1 else {}


def _verifiable_sections(config: DemoConfig, data: Callable[..., DataConfig]) -> dict[str, Section]:
    """A verifiable task's stages after SFT: GRPO (the ``ppo`` stage with group baselines) rewarded by
    ``exact_answer`` on the ``answer`` field of ``rl_prompts.jsonl``, and the evaluation of every model by the
    task's gold judge (the answer's correctness), with no reward model anywhere."""
    grpo, new_tokens = config.grpo, config.max_length // 2
    models = {"pretrain": "{pretrain}", "sft": "{sft}", "grpo": "{ppo}", **_half_way("ppo", grpo, "grpo")}
    return {
        "ppo": PPOConfig(model=ModelConfig(name_or_path="{sft}"), data=data("{data:rl_prompts.jsonl}"),
                         train=_train(config, "ppo", grpo, log_every=5),
                         ppo=PPOSection(rewards=[RewardSourceConfig(function="exact_answer")], advantage="grpo",
                                        samples_per_prompt=grpo.num_generations,
                                        rollout_batch_size=grpo.rollout_batch_size,
                                        minibatch_size=grpo.minibatch_size, ppo_epochs=grpo.ppo_epochs,
                                        kl_coef=grpo.kl_coef, max_new_tokens=new_tokens, temperature=grpo.temperature,
                                        top_k=config.top_k,
                                        samples_to_log=grpo.num_generations,
                                        dynamic_sampling=grpo.dynamic_sampling)),
        "eval": EvalStage(models=models, prompts="{data:eval_prompts.jsonl}", baseline="sft",
                          heldout_text="{data:heldout_text.jsonl}", max_new_tokens=new_tokens,
                          temperature=config.eval_temperature, top_k=config.top_k),
        # the illustration draws step 2's rankings, which this recipe has none of
        "report": ReportStage(illustrate=False),
    }


def _pipeline(config: DemoConfig, sections: dict[str, Section]) -> PipelineConfig:
    """The pipeline config of ``sections``, run in :data:`STAGES`' order."""
    return PipelineConfig(out_dir=config.out_dir, seed=config.seed, task=config.task,
                          stages=[stage.name for stage in STAGES if stage.name in sections],
                          **{name: section.model_dump(mode="json", exclude_unset=True)
                             for name, section in sections.items()})


def run_demo(config: DemoConfig, console: Console | None = None) -> dict:
    """The three steps on the built-in task, then the gold judge's evaluation of every model.

    Task data -> tokenizer -> pretrain -> SFT (step 1) -> sample K and rank -> reward model (step 2) ->
    PPO (step 3); SFT -> DPO on the same rankings; evaluation, report and illustration. Returns the
    run's ``summary.json``.
    """
    console = console or Console(stderr=True)
    out = Path(config.out_dir)
    runner = StageRunner(out, console)
    data = out / "data"
    data_config = config.model_dump(include={"task", "seed", "corpus_docs", "heldout_docs", "sft_prompts",
                                             "sft_eval_prompts", "eval_prompts", "rank_prompts", "rl_prompts"})
    runner.run("data", data_config, set(), lambda: prepare_task_data(config, data))
    runner.run("tokenizer", {"vocab_size": config.vocab_size}, {"data"},
               lambda: train_bpe_tokenizer(_tokenizer_texts(data), vocab_size=config.vocab_size,
                                           save_dir=out / "tokenizer"))
    run_pipeline(demo_pipeline(config), console, source="rlhfkit demo", runner=runner)
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))
