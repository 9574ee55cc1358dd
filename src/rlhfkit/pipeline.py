"""``rlhfkit pipeline``: the stages of one YAML config, each in its own run directory, skipped when done.

A pipeline config names the stages to run and holds one section per stage::

    out_dir: runs/my-pipeline
    task: tinyworld                 # optional: its simulated labeler ranks, its gold judge evaluates
    stages: [pretrain, sft, sample, rank, rm, ppo, dpo, eval, report]
    sft:                            # an ordinary stage config (as for `rlhfkit sft --config`)
      model: {name_or_path: "{pretrain}"}
      data: {train: data/demos.jsonl}
      train: {max_steps: 300}
    sample: {model: "{sft}", prompts: data/prompts.jsonl, k: 4}
    rank: {}                        # ranks "{sample}" with the task's simulated labeler (or a feedback db)
    rm: {model: {name_or_path: "{sft}"}, data: {train: "{rank}"}, train: {max_steps: 500}}
    ...

The stages, their order, sections and outputs are defined once, in :data:`STAGES`.

``{stage}`` in any string stands for that stage's output (:attr:`Stage.output`): a trainer's ``final/``
model, the sample stage's ``samples.jsonl``, the rank stage's ``rankings.jsonl``; ``{stage:NAME}`` for
``NAME`` inside the stage's directory (``{ppo:checkpoint-15}``). Those references are the pipeline's
dependency graph. Trainer stages write to ``out_dir/<stage>`` (``train.output_dir`` is set for them).

Experiment trackers: ``report_to: [wandb]`` at the top applies to every trainer stage (a stage's
``train.report_to`` overrides it); the stages are runs named by stage in one project named after ``out_dir``
(``train.project``). Which trackers report is no part of a stage's fingerprint: adding one re-runs nothing.

Every section is validated before the first stage starts, so a typo in ``dpo`` fails at once, naming
the file, line and key. Each stage records in ``<stage>/stage.json`` the fingerprint of its resolved
config, of the files it reads and of the stages it depends on:

* finished with the same fingerprint: skipped;
* interrupted with the same fingerprint: run again, and trainers resume from their last checkpoint;
* anything else (a changed config, a changed input file, a re-run upstream stage): its directory is
  cleared and it runs from scratch. A change therefore re-runs the stage and every stage downstream.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator
from rich.console import Console

from rlhfkit import workflows
from rlhfkit.config import (
    ConfigError,
    DPOConfig,
    OnlineDPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    Section,
    SFTConfig,
    Tracker,
    key_lines,
    load_config,
    save_config,
    validate_config,
)
from rlhfkit.engine.trackers import check_trackers
from rlhfkit.rollout.generate import SamplingConfig

# the train keys that say where a run reports, left out of a stage's fingerprint
TRACKING_KEYS = ("report_to", "project", "run_name")
_REFERENCE = re.compile(r"\{([a-z_]+)(?::([^{}]+))?\}")


class SampleStage(Section):
    """Step 2's input: ``k`` samples per prompt from a policy, the completions labelers rank."""

    model: str = "{sft}"
    prompts: str
    k: int = Field(4, ge=2)
    limit: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    # a sample cut off at the length limit, trained on as if it ended there, teaches models to stop mid-sentence
    finished_only: bool = True


class RankStage(Section):
    """Rankings of the samples: by the pipeline task's simulated labeler, or by people in the feedback app.

    With ``feedback`` (a database URL of ``rlhfkit serve``), the rankings labelers have submitted so far
    are exported from it; otherwise the task's simulated labeler ranks ``samples``.
    """

    samples: str | None = None
    labeler_temperature: float | None = Field(None, gt=0)
    feedback: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> RankStage:
        if self.feedback and self.samples:
            raise ValueError("give rank.samples (ranked by the task's simulated labeler) or rank.feedback, not both")
        if not self.feedback and not self.samples:
            self.samples = "{sample}"
        return self


class EvalStage(Section):
    """``rlhfkit eval`` on held-out prompts; writes ``summary.json`` and ``samples/<model>.jsonl`` in ``out_dir`` and
    adds each model's results to its model card (``final/README.md``) where the model is one of this run's."""

    models: dict[str, str]
    prompts: str
    reward_model: str | None = None
    reference: str | None = None
    baseline: str | None = None
    heldout_text: str | None = None
    limit: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.7, ge=0)  # 0: greedy decoding
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: no top-k
    # every sample a row of its own; win-rate intervals bootstrap whole prompts
    samples_per_prompt: int = Field(1, gt=0)
    batch_size: int = Field(100, gt=0)
    # > 0: also sample this many completions per prompt from the reference and check how often the reward
    # model orders them as the task's gold judge does
    rm_gold_samples: int = Field(0, ge=0)
    # > 0: also a "<baseline>-bo<N>" row: best-of-N of the baseline picked by the reward model (analytic KL)
    best_of_n: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> EvalStage:
        if self.best_of_n and not self.reward_model:
            raise ValueError("eval.best_of_n needs eval.reward_model (it picks the best of the n samples)")
        workflows.check_eval_sampling(self.sampling, self.samples_per_prompt)
        return self

    @property
    def sampling(self) -> SamplingConfig:
        """How every model samples (the controls of ``rlhfkit eval``)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, batch_size=self.batch_size)


class ReportStage(Section):
    """``report.html`` of the run, and the three-step illustration."""

    illustrate: bool = True


@dataclass(frozen=True)
class Stage:
    """One stage a pipeline can run: its section's schema, its work, and what ``{name}`` stands for."""

    name: str
    section: type[Section]
    # runs the stage, its section validated and its references resolved, in ``out_dir/<name>``
    work: Callable[[Any, PipelineConfig, StageRunner, Console], None]
    # what ``{name}`` stands for, inside the stage's directory ("": the directory)
    output: str = ""
    # a trainer: ``train.output_dir`` is the stage's directory and ``train.seed`` defaults to the pipeline's
    trains: bool = False
    # the stage may be listed without a section of its own (its defaults are a complete config)
    defaults_suffice: bool = False
    # the stage reads the whole run directory, so it depends on every stage before it
    reads_the_run: bool = False


def _trainer(name: str, schema: type[Section], run: str) -> Stage:
    """The stage of a trainer: ``run`` (``module.function``, imported when the stage runs, so that a pipeline loads
    only the trainers it uses) trains on the stage's config; its output is the ``final/`` model."""
    module, function = run.rsplit(".", 1)

    def work(section: Section, pipeline: PipelineConfig, runner: StageRunner, console: Console) -> None:
        getattr(importlib.import_module(module), function)(section, console)

    return Stage(name, schema, work, output="final", trains=True)


def _sample(section: SampleStage, config: PipelineConfig, runner: StageRunner, console: Console) -> None:
    sampling = SamplingConfig(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                              top_p=section.top_p, top_k=section.top_k, batch_size=section.batch_size)
    workflows.sample_completions(section.model, section.prompts, runner.output("sample"), sampling, k=section.k,
                                 seed=config.seed, limit=section.limit, finished_only=section.finished_only,
                                 console=console)


def _rank(section: RankStage, config: PipelineConfig, runner: StageRunner, console: Console) -> None:
    if section.feedback:
        workflows.collect_rankings(section.feedback, runner.output("rank"), console=console)
    else:
        workflows.rank_samples(section.samples, runner.output("rank"), task=config.task, seed=config.seed,
                               temperature=section.labeler_temperature, console=console)


def _evaluate(section: EvalStage, config: PipelineConfig, runner: StageRunner, console: Console) -> None:
    from rlhfkit.evaluate.compare import comparison_table
    from rlhfkit.evaluate.gold import reward_model_gold_accuracy
    from rlhfkit.models.card import add_evaluation

    sampling = section.sampling
    models = {name: path for name, path in section.models.items() if Path(path).exists()}
    for name in section.models.keys() - models.keys():
        console.print(f"[yellow]eval: {name} ({section.models[name]}) does not exist, left out[/]")
    samples_dir = runner.out_dir / "samples"
    shutil.rmtree(samples_dir, ignore_errors=True)  # no stale samples of models left out now
    evaluation = workflows.evaluate(models, section.prompts, runner.output("eval"), sampling, samples_dir=samples_dir,
                                    task=config.task, reward_model=section.reward_model, reference=section.reference,
                                    baseline=section.baseline, heldout_text=section.heldout_text, limit=section.limit,
                                    seed=config.seed, best_of_n=section.best_of_n,
                                    samples_per_prompt=section.samples_per_prompt)
    report, task, prompts = evaluation.report, evaluation.task, evaluation.prompts
    summary: dict = {"task": config.task, "eval_prompts": len(prompts), **{key: report[key] for key in (
        "samples_per_prompt", "baseline", "models", "win_rates")}}
    if section.rm_gold_samples and task and section.reward_model and section.reference:
        summary["reward_model"] = reward_model_gold_accuracy(
            task, section.reward_model, section.reference, prompts, k=section.rm_gold_samples, sampling=sampling,
            seed=config.seed + 1)
    (runner.out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    run_dir = runner.out_dir.resolve()
    for name, path in models.items():  # the cards of this run's models; a model from elsewhere is left as it is
        if Path(path).resolve().is_relative_to(run_dir):
            add_evaluation(path, name, summary)
    rm = summary.get("reward_model")
    caption = (f"reward model orders {rm['gold/accuracy']:.1%} of {rm['gold/pairs']} sample pairs as the gold judge"
               + (f" (the simulated labelers: {rm['labeler/accuracy']:.1%})" if "labeler/accuracy" in rm else "")
               if rm else None)
    each = f" x {section.samples_per_prompt} samples" if section.samples_per_prompt > 1 else ""
    console.print(comparison_table(summary, f"{len(prompts)} held-out prompts{each} ({config.task or section.prompts})",
                                   caption))


def _report(section: ReportStage, config: PipelineConfig, runner: StageRunner, console: Console) -> None:
    from rlhfkit.evaluate.illustrate import illustrate
    from rlhfkit.evaluate.report import write_report

    console.print(f"report: {write_report(runner.out_dir)}")
    if section.illustrate:
        svg, png = illustrate(runner.out_dir)
        console.print(f"illustration: {svg}, {png}")


# Every stage, in pipeline order: the one list the pipeline's config, checks and runs are derived from.
STAGES: tuple[Stage, ...] = (
    _trainer("pretrain", PretrainConfig, "rlhfkit.trainers.pretrain.run_pretrain"),
    _trainer("sft", SFTConfig, "rlhfkit.trainers.sft.run_sft"),
    Stage("sample", SampleStage, _sample, output="samples.jsonl"),
    Stage("rank", RankStage, _rank, output="rankings.jsonl", defaults_suffice=True),
    _trainer("rm", RewardConfig, "rlhfkit.trainers.reward.run_reward"),
    _trainer("ppo", PPOConfig, "rlhfkit.trainers.ppo.run_ppo"),
    _trainer("dpo", DPOConfig, "rlhfkit.trainers.dpo.run_dpo"),
    _trainer("online_dpo", OnlineDPOConfig, "rlhfkit.trainers.online_dpo.run_online_dpo"),
    Stage("eval", EvalStage, _evaluate, output="eval.json"),
    Stage("report", ReportStage, _report, defaults_suffice=True, reads_the_run=True),
)
STAGE: dict[str, Stage] = {stage.name: stage for stage in STAGES}


class PipelineSettings(Section):
    """The pipeline's own keys: where it writes, its seed and task, and which stages to run, in order."""

    out_dir: str = "runs/pipeline"
    seed: int = 0
    task: str | None = None
    stages: list[Literal[tuple(STAGE)]] = Field(min_length=1)
    # the experiment trackers of every trainer stage (its train.report_to), see the module docstring
    report_to: list[Tracker] = []


# ... and one section per stage, validated as the stage's config once references are resolved (resolve_stages)
PipelineConfig = create_model(
    "PipelineConfig", __base__=PipelineSettings, __module__=__name__,
    __doc__="Which stages to run, in order, and one section per stage (see the module docstring).",
    **{stage.name: (dict[str, Any] | None, None) for stage in STAGES})


def file_digest(path: Path) -> str:
    """A content digest of an input: a file's bytes, or a directory's file names, sizes and modification times."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class StageRunner:
    """Runs stages under ``out_dir``, each once per fingerprint (see the module docstring)."""

    def __init__(self, out_dir: str | Path, console: Console):
        self.out_dir, self.console = Path(out_dir), console
        self.fingerprints: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def output(self, stage: str, name: str | None = None) -> Path:
        """Where ``{stage}`` (or ``{stage:name}``) points."""
        return self.out_dir / stage / (name or (STAGE[stage].output if stage in STAGE else ""))

    def resolve(self, value: Any, where: str = "") -> tuple[Any, set[str]]:
        """``value`` with every ``{stage}`` reference replaced by its path; also the stages it refers to."""
        used: set[str] = set()

        def replace(match: re.Match) -> str:
            stage = match.group(1)
            if stage not in STAGE and stage not in self.fingerprints:
                raise ConfigError(f"{where}: {{{stage}}} is not a stage (known: {', '.join(STAGE)})")
            used.add(stage)
            return str(self.output(stage, match.group(2)))

        if isinstance(value, str):
            return _REFERENCE.sub(replace, value), used
        if isinstance(value, dict):
            resolved = {}
            for key, item in value.items():
                resolved[key], refs = self.resolve(item, f"{where}.{key}" if where else str(key))
                used |= refs
            return resolved, used
        if isinstance(value, list):
            items = [self.resolve(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return [item for item, _ in items], used.union(*(refs for _, refs in items))
        return value, used

    def fingerprint(self, stage: str, config: dict, upstream: set[str]) -> str:
        """Hash of the stage's resolved config, the digests of the files it reads, and its upstream stages."""
        inputs, run_dir = {}, self.out_dir.resolve()
        for value in _strings(config):
            path = Path(value)
            if value.strip("./") and len(value) < 4096 and path.exists() and not path.resolve().is_relative_to(run_dir):
                inputs[value] = file_digest(path)
        if isinstance(config.get("train"), dict):  # where a run reports does not change what it computes
            config = {**config, "train": {k: v for k, v in config["train"].items() if k not in TRACKING_KEYS}}
        payload = {"stage": stage, "config": config, "inputs": inputs,
                   "upstream": {name: self.fingerprints.get(name) for name in sorted(upstream)}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, stage: str, config: dict, upstream: set[str], work: Callable[[], Any]) -> bool:
        """Run ``work`` for ``stage`` unless it finished with the same fingerprint; True when it ran."""
        missing = sorted(name for name in upstream if name not in self.fingerprints)
        if missing:
            raise ConfigError(f"stage {stage!r} uses the output of {', '.join(missing)}, which this pipeline "
                              f"neither runs before it nor finished earlier in {self.out_dir}")
        fingerprint = self.fingerprint(stage, config, upstream)
        directory = self.out_dir / stage
        state_path = directory / "stage.json"
        state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else None
        same = state is not None and state.get("fingerprint") == fingerprint
        if same and state.get("status") == "done":
            self.console.print(f"[dim]{stage}: done earlier with the same config, skipped[/]")
            self.fingerprints[stage], self.seconds[stage] = fingerprint, state.get("seconds", 0.0)
            return False
        if same:
            self.console.rule(f"{stage} (resuming an interrupted run)")
        else:
            if directory.exists():
                if state is None and any(directory.iterdir()):
                    raise ConfigError(f"{directory} exists and was not written by rlhfkit pipeline: move it away "
                                      "or choose another out_dir")
                shutil.rmtree(directory)
            self.console.rule(stage if state is None else f"{stage} (its config or inputs changed: from scratch)")
        directory.mkdir(parents=True, exist_ok=True)
        _write_state(state_path, {"fingerprint": fingerprint, "status": "running"})
        started = time.perf_counter()
        work()
        seconds = round(time.perf_counter() - started, 2)
        _write_state(state_path, {"fingerprint": fingerprint, "status": "done", "seconds": seconds})
        self.fingerprints[stage], self.seconds[stage] = fingerprint, seconds
        return True

    def adopt_finished(self, listed: list[str]) -> None:
        """Make the finished stages of earlier runs in ``out_dir`` that this run does not list usable as
        ``{stage}`` references (with their fingerprints, so a stage using them re-runs if they change)."""
        for state_path in sorted(self.out_dir.glob("*/stage.json")):
            stage = state_path.parent.name
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if stage not in listed and stage not in self.fingerprints and state.get("status") == "done":
                self.fingerprints[stage], self.seconds[stage] = state["fingerprint"], state.get("seconds", 0.0)


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _write_state(path: Path, state: dict) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(state), encoding="utf-8")
    temp.replace(path)


def load_pipeline(path: str | Path | None, overrides: list[str] | None = None) -> tuple[PipelineConfig, dict]:
    """Read a pipeline config; return it and the line of every key in its file (for later error messages)."""
    config = load_config(PipelineConfig, path, overrides or [])
    lines = key_lines(Path(path).read_text(encoding="utf-8")) if path else {}
    return config, lines


def resolve_stages(config: PipelineConfig, runner: StageRunner, *, source: str = "<pipeline>",
                   lines: dict | None = None) -> dict[str, tuple[Section, set[str]]]:
    """Every listed stage's validated config (``{stage}`` references resolved) and the stages it uses."""
    if len(set(config.stages)) != len(config.stages):
        raise ConfigError(f"{source}: stages: each stage may be listed once, got {config.stages}")
    if [name for name in STAGE if name in config.stages] != list(config.stages):
        raise ConfigError(f"{source}: stages: list them in pipeline order ({', '.join(STAGE)}), got {config.stages}")
    if config.task is not None:
        workflows.load_task(config.task)  # an unknown task fails before any stage runs, as a bad section does
    resolved = {}
    for name in config.stages:
        stage, section = STAGE[name], getattr(config, name)
        if section is None and not stage.defaults_suffice:
            raise ConfigError(f"{source}: stages lists {name!r} but the config has no {name!r} section")
        tree = dict(section or {})
        if stage.trains:
            if not isinstance(tree.get("train", {}), dict):
                raise ConfigError(f"{source}: {name}.train must be a section")
            tree["train"] = {"seed": config.seed, "report_to": config.report_to,
                             "project": runner.out_dir.resolve().name, **tree.get("train", {}),
                             "output_dir": str(runner.out_dir / name)}
        # validate as written (so errors point at the file), then resolve references, defaults' included
        written = validate_config(stage.section, tree, source=source, lines=lines, prefix=(name,))
        values, used = runner.resolve(written.model_dump(mode="json"), name)
        if stage.reads_the_run:
            used |= set(runner.fingerprints) | set(resolved)
        resolved[name] = (stage.section.model_validate(values), used)
        if stage.trains:  # a tracker's missing package stops the pipeline before its first stage
            check_trackers(resolved[name][0].train.report_to, key=f"{name}.train.report_to")
    if "rank" in resolved and not resolved["rank"][0].feedback and config.task is None:
        raise ConfigError(f"{source}: the rank stage needs `task:` (its simulated labeler) or `rank.feedback:` "
                          "(a feedback-app database URL)")
    return resolved


def run_pipeline(config: PipelineConfig, console: Console | None = None, *, source: str = "<pipeline>",
                 lines: dict | None = None, runner: StageRunner | None = None) -> dict[str, float]:
    """Run the listed stages in order (see the module docstring); return the seconds of every stage."""
    console = console or Console(stderr=True)
    runner = runner or StageRunner(config.out_dir, console)
    runner.adopt_finished(list(config.stages))
    stages = resolve_stages(config, runner, source=source, lines=lines)
    save_config(config, runner.out_dir)
    for name, (section, used) in stages.items():
        runner.run(name, section.model_dump(mode="json"), used,
                   lambda name=name, section=section: STAGE[name].work(section, config, runner, console))
    seconds = {**runner.seconds, "total": round(sum(runner.seconds.values()), 1)}
    summary_path = runner.out_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary["seconds"] = seconds
        summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return seconds


