"""The one training loop, on accelerate: every trainer is an :class:`Engine` that fills in its hooks.

The engine owns what every stage does alike: the accelerator and process group, the seed, AdamW and the
learning-rate schedule, optimizer steps over micro-batches (gradient accumulation, clipping, the stop on a
non-finite loss or gradient), the step count, logging to ``metrics.jsonl`` and the experiment trackers of
``train.report_to`` (:mod:`rlhfkit.engine.trackers`), evaluation every
``train.eval_every`` steps, crash-safe checkpoints with optimizer/scheduler/RNG state, exact resume, and a
plain HF ``final/`` model. A trainer says what one step is (:meth:`Engine.train_step`: an optimizer step over a
dataset's micro-batches, or a PPO iteration of rollout and updates), what to log of it
(:meth:`Engine.log_record`), how to evaluate (:meth:`Engine.evaluate`), what a checkpoint holds beyond the
optimizer (:meth:`Engine.save_state`, :meth:`Engine.load_state`, :meth:`Engine.save_final`) and what ``final/``
gets beside the weights (:meth:`Engine.describe_final`: the trainers' model card).

Data parallelism (``torchrun`` / ``accelerate launch`` with N processes): every process runs the same
loop; :meth:`Engine.optimizer_step` takes each process's share of a micro-batch and the loss a trainer
weights by that share, so that the gradient DDP averages is the gradient of the whole micro-batch. Only
process 0 writes files; a checkpoint holds the RNG state of every process, each restored on resume with
the same number of processes (process 0's on every process otherwise).

FSDP2 (torch ``fully_shard``): every process joins the gathering of the full weights and optimizer state
for a checkpoint and for ``final/`` (:mod:`rlhfkit.engine.sharding`), process 0 writes them in the layout
of a run without FSDP (the optimizer state keyed by parameter name, so such a checkpoint resumes under
FSDP only), and resume shards them again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate.utils import set_seed
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rlhfkit.config import TrainConfig, save_config
from rlhfkit.engine.accelerator import gather_objects, is_sharded, make_accelerator
from rlhfkit.engine.checkpoint import CHECKPOINT_PREFIX, STATE_FILE, checkpoints, write_checkpoint
from rlhfkit.engine.compile import compile_repeated_blocks
from rlhfkit.engine.errors import TrainingError
from rlhfkit.engine.guard import stop_non_finite
from rlhfkit.engine.metrics import MetricsLog, truncate_step_log
from rlhfkit.engine.optim import build_optimizer, build_scheduler
from rlhfkit.engine.rng import rng_states_of_processes, set_rng_state
from rlhfkit.engine.sharding import (
    check_optimizer_layout,
    gather_model_state,
    gather_optimizer_state,
    load_optimizer_state,
)
from rlhfkit.engine.trackers import Trackers, accelerator_options, check_trackers

Micro = TypeVar("Micro")


class Engine:
    """The loop of one stage; a trainer subclasses it and fills in the hooks below.

    Set-up: ``Engine.__init__`` seeds the global RNG and makes the accelerator; the trainer then builds its
    model and calls :meth:`prepare`. ``train()`` runs to ``total_steps`` (resuming from the newest
    checkpoint) and returns the last logged metrics.
    """

    #: JSONL files of step records the trainer writes in the run directory besides ``metrics.jsonl``,
    #: truncated with it when a run resumes or starts afresh
    step_logs: tuple[str, ...] = ()
    #: the metrics the progress bar shows: {metric name: label}
    progress_metrics: dict[str, str] = {}
    #: whether each process draws a random stream of its own (PPO's samples): its checkpoints then resume
    #: with the number of processes that wrote them only
    own_random_streams: bool = False

    def __init__(self, *, stage: str, config: BaseModel, train: TrainConfig):
        self.stage, self.config, self.cfg = stage, config, train
        self.run_dir = Path(train.output_dir)
        set_seed(train.seed)  # dropout and any sampling draw from the global RNG (restored on resume)
        check_trackers(train.report_to)
        self.accelerator = make_accelerator(train.mixed_precision, **accelerator_options(train.report_to, self.run_dir))
        self.world = self.accelerator.num_processes
        self.sharded = is_sharded(self.accelerator)
        if train.torch_compile and self.sharded:
            raise TrainingError(f"{stage}: train.torch_compile under FSDP is not supported yet (untested)")
        self.metrics = MetricsLog(self.run_dir, stage)
        self.trackers = Trackers(self.accelerator, train.report_to, self.run_dir, stage=stage, project=train.project,
                                 run_name=train.run_name)
        self.step = 0

    @property
    def rank(self) -> int:
        """This process's index (0 without data parallelism)."""
        return self.accelerator.process_index

    def prepare(self, model: torch.nn.Module, *, total_steps: int, optimizer_steps: int | None = None,
                parts: Sequence[torch.nn.Module] | None = None, lr_scales: Sequence[float] | None = None) -> None:
        """Compile ``model`` (``train.torch_compile``), build AdamW over the trainable parameters of ``parts``
        (default: the whole model; each part with its ``lr_scales`` entry) and the schedule over
        ``optimizer_steps`` optimizer steps (default ``total_steps``), and prepare the three with accelerate:
        ``self.model``, ``self.optimizer``, ``self.scheduler``. ``total_steps`` is the number of loop steps."""
        if self.cfg.torch_compile:
            compile_repeated_blocks(model)
        self.total_steps = total_steps
        optimizer = build_optimizer(parts or [model], self.cfg, self.stage, lr_scales)
        scheduler = build_scheduler(optimizer, self.cfg, optimizer_steps or total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)

    def start_own_random_stream(self) -> None:
        """For a trainer with :attr:`own_random_streams`, once its weights are built from the shared seed: process
        ``r > 0`` is reseeded with ``train.seed + r`` (its own sampling stream); process 0 keeps the stream of a
        one-process run."""
        if self.rank > 0:
            set_seed(self.cfg.seed, device_specific=True)

    # ---- the hooks a trainer fills in -----------------------------------------------------------
    def train_step(self) -> None:
        """One step of the loop (``self.step`` counts those done before it)."""
        raise NotImplementedError

    def log_record(self, elapsed_s: float, steps: int) -> dict[str, float]:
        """The metrics to log at a log step: the ``steps`` steps since the last log step took ``elapsed_s``
        seconds. Called on every process after ``self.step`` has advanced."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (``eval/`` names), before the first step, every ``train.eval_every`` steps and at
        the end; none by default."""
        return {}

    def save_state(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """Write the model files of a checkpoint into ``directory`` (process 0) from ``weights``, the full
        state dict gathered under FSDP (None otherwise); return what the state file holds besides the step,
        optimizer, scheduler and RNG state."""
        raise NotImplementedError

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        """Load the model files of checkpoint ``directory`` and the trainer's entries of its ``state`` (on every
        process; the optimizer, scheduler, RNG state and step are the engine's)."""
        raise NotImplementedError

    def save_final(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
        """Write the trained model to ``directory`` (``final/``) in plain HF format (process 0)."""
        raise NotImplementedError

    def describe_final(self, directory: Path, metrics: dict[str, float]) -> None:
        """Add what describes the saved model to ``directory`` (``final/``), given the last ``metrics`` (process 0,
        after :meth:`save_final`); nothing by default."""

    # ---- optimizer steps ------------------------------------------------------------------------
    def optimizer_step(self, micro_batches: Sequence[Micro], loss: Callable[[Micro], tuple[torch.Tensor, float]],
                       example_positions: list[int]) -> float:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns the gradient norm.

        ``loss(micro)`` returns the loss of this process's share of the micro-batch to backpropagate
        (weighted by the share, see the module docstring) and the whole micro-batch's loss value, equal on
        every process. The norm is measured (and, with ``train.max_grad_norm``, clipped) before every update:
        a non-finite loss or gradient stops the run before it reaches the weights, naming
        ``example_positions``, this process's examples of the step (positions in the training data).
        """
        for index, micro in enumerate(micro_batches):
            last_micro = index == len(micro_batches) - 1
            with nullcontext() if last_micro else self.accelerator.no_sync(self.model):
                micro_loss, loss_value = loss(micro)
                if not math.isfinite(loss_value):
                    self._stop_non_finite(f"loss ({loss_value})", example_positions)
                self.accelerator.backward(micro_loss / len(micro_batches))
        # the norm over every process's shard under FSDP: accelerate recognises the prepared model by the exact
        # list of its parameters
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            self._stop_non_finite(f"gradient norm ({grad_norm})", example_positions)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _stop_non_finite(self, what: str, positions: list[int]) -> None:
        """Stop on a non-finite loss or gradient norm (every process gets here together: both are reduced
        over the processes), recording every process's examples of the step."""
        everyone = [p for share in gather_objects(list(positions)) for p in share]
        stop_non_finite(self.run_dir, self.stage, self.step + 1, what, everyone,
                        write=self.accelerator.is_main_process)

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run to ``total_steps`` (resuming if a checkpoint exists); return the last logged metrics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            save_config(self.config, self.run_dir)
        self._resume()
        try:
            self.trackers.start(self.config.model_dump(mode="json"), resumed=self.step > 0)
            return self._train()
        finally:  # also when the run stops on an error: no tracker run is left open
            self.trackers.finish()

    def _train(self) -> dict[str, float]:
        if self.step == 0 and self.cfg.eval_at_start:
            self._log(self.evaluate())  # the starting point of the eval curve
        last: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        with self._progress() as progress:
            task = progress.add_task(self.stage, total=self.total_steps, completed=self.step, status="")
            while self.step < self.total_steps:
                self.train_step()
                self.step += 1
                window_steps += 1
                log_now = self.step % self.cfg.log_every == 0 or self.step == self.total_steps
                record = self.log_record(time.perf_counter() - window_start, window_steps) if log_now else {}
                if log_now:
                    last = dict(record)
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:  # also between log steps
                    evaluated = self.evaluate()
                    record.update(evaluated)
                    last.update(evaluated)
                self._log(record)
                if log_now:
                    progress.update(task, status=" ".join(f"{label} {record[name]:.3f}" for name, label
                                                          in self.progress_metrics.items() if name in record))
                    window_start, window_steps = time.perf_counter(), 0
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save_checkpoint()
                progress.update(task, completed=self.step)
        final_eval = self.evaluate()
        self._log(final_eval)
        last.update(final_eval)
        self.save_checkpoint()
        weights = gather_model_state(self.accelerator, self.model)  # on every process
        if self.accelerator.is_main_process:
            self.save_final(self.run_dir / "final", weights)
            self.describe_final(self.run_dir / "final", last)
        self.accelerator.wait_for_everyone()
        return last

    def _log(self, record: dict[str, float]) -> None:
        """Write ``record`` at this step to ``metrics.jsonl`` and the trackers (process 0)."""
        if record and self.accelerator.is_main_process:
            self.metrics.write(self.step, record)
            self.trackers.log(self.step, record)

    def log_table(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        """Log ``rows`` (sampled completions with their rewards) as table ``name`` at this step to the trackers that
        have tables (process 0; the trainer keeps its own JSONL of them)."""
        self.trackers.table(name, rows, self.step)

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                        disable=not (self.cfg.progress and self.accelerator.is_main_process))

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (temp dir, then rename) from process 0; keep the newest
        ``train.save_total_limit``. ``rng`` is process 0's RNG state and, with several processes,
        ``rng_per_process`` every process's."""
        directory = self.run_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if directory in checkpoints(self.run_dir):  # this very state is saved (the last periodic save, or a resume)
            return directory
        rng_states = rng_states_of_processes()  # collectives: every process takes part
        weights = gather_model_state(self.accelerator, self.model)
        optimizer = gather_optimizer_state(self.accelerator, self.model, self.optimizer)

        def write(tmp: Path) -> None:
            state = {"step": self.step, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                     "rng": rng_states[0], **self.save_state(tmp, weights)}
            if self.world > 1:
                state["rng_per_process"] = rng_states
            torch.save(state, tmp / STATE_FILE)

        if self.accelerator.is_main_process:
            write_checkpoint(directory, write, keep=self.cfg.save_total_limit)
        self.accelerator.wait_for_everyone()
        return directory

    def _resume(self) -> None:
        """Continue from the newest checkpoint (with ``train.resume``), or start afresh; either way the step
        logs keep only the records up to the step the run goes on from."""
        found = checkpoints(self.run_dir) if self.cfg.resume else []
        if found:
            latest = found[-1]
            state = torch.load(latest / STATE_FILE, weights_only=False)
            per_process = state.get("rng_per_process", [state["rng"]])  # one state per process that wrote it
            if self.own_random_streams and len(per_process) != self.world:
                raise TrainingError(f"{self.stage}: {latest} was written by {len(per_process)} process(es) and holds "
                                    f"each one's random state; resume it with {len(per_process)}, not {self.world}")
            check_optimizer_layout(self.stage, latest, state["optimizer"], self.sharded)
            self.load_state(latest, state)
            load_optimizer_state(self.accelerator, self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(per_process[self.rank] if len(per_process) == self.world else state["rng"])
            self.step = state["step"]
        if self.accelerator.is_main_process:  # one writer: processes rewriting a file at once could lose lines
            for path in (self.metrics.path, *(self.run_dir / name for name in self.step_logs)):
                truncate_step_log(path, self.step)
        self.accelerator.wait_for_everyone()
        if found:
            self.accelerator.print(f"[{self.stage}] resumed from {latest} at step {self.step}")
