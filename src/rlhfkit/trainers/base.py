"""The recipe of every stage that trains on a dataset with a loss (pretrain, SFT, RM, DPO), on the engine.

A stage supplies the model, tokenized examples and a loss; the :class:`~rlhfkit.engine.loop.Engine` supplies
the rest (AdamW with warmup + cosine/linear decay, gradient clipping, mixed precision where the device has it,
``metrics.jsonl``, crash-safe checkpoints, exact resume, a plain HF ``final/`` model). This module adds
what a dataset brings: micro-batches in a seeded order, gradient accumulation over them, evaluation (the
token-weighted loss or the stage's own), and the logged loss, perplexity and throughput.

Data order is a pure function of (seed, micro-batch index): micro-batch ``i`` is slice
``i % n_batches`` of the order drawn for epoch ``i // n_batches`` (:func:`epoch_order`: a seeded
permutation, by default grouped by length so that a micro-batch holds little padding). Resuming at
optimizer step ``s`` therefore continues at micro-batch ``s * grad_accum`` with nothing but ``s`` saved.

Data parallelism (``torchrun`` / ``accelerate launch`` with N processes): ``train.batch_size`` is the
global batch. Process ``r`` takes examples ``r, r + N, ...`` of each micro-batch, and its loss is
weighted by its share of the micro-batch's units (tokens, pairs), so that the gradient DDP averages is
the gradient of the whole micro-batch's loss: N processes train the same model as one process, step for
step (tested to a tight tolerance; under FSDP2 too). A final micro-batch of an epoch with fewer examples
than processes is left out. Logged losses and token counts cover all processes, a stage's own per-batch
metrics (a reward model's accuracy) process 0's share; only process 0 writes files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from rlhfkit.config import TrainConfig
from rlhfkit.engine.accelerator import refuse_lora_under_fsdp
from rlhfkit.engine.checkpoint import load_weights
from rlhfkit.engine.errors import TrainingError
from rlhfkit.engine.loop import Engine
from rlhfkit.engine.metrics import MetricsWindow
from rlhfkit.engine.sharding import state_loader
from rlhfkit.models.card import write_model_card
from rlhfkit.models.load import save_model

#: The step log of the trainers that sample as they train (PPO's rollouts, online DPO's judged samples)
SAMPLES_FILE = "samples.jsonl"
LENGTH_GROUP_BATCHES = 50  # micro-batches per length-sorted group of :func:`epoch_order` (as transformers' 50)

# (model, batch) -> (loss to minimise, number of units it averages over[, {metric name: batch value}])
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple]
# (model, eval examples) -> {metric name: value}; logged with an ``eval/`` prefix
EvalFn = Callable[[torch.nn.Module, Sequence[Any]], dict[str, float]]
# (training-set positions of the whole micro-batch, this process's share of it, collated)
MicroBatch = tuple[list[int], dict[str, torch.Tensor]]


def epoch_order(n_examples: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None) -> list[int]:
    """The order of the training examples in one epoch, from ``seed`` alone.

    Without ``lengths``: a random permutation. With them, grouped by length (the bucketing of
    fairseq and of transformers' ``LengthGroupedSampler``): the permutation's full batches are cut into
    groups of :data:`LENGTH_GROUP_BATCHES` batches, each group is sorted by length (longest first) and
    cut into batches again, and the batches are shuffled; a last partial batch stays last. Which
    examples meet in a batch and the order of the batches stay random, but a batch holds examples of
    similar lengths, so little of it is padding.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_examples, generator=generator).tolist()
    if lengths is None:
        return order
    full = n_examples // batch_size * batch_size
    group = batch_size * LENGTH_GROUP_BATCHES
    batches = []
    for start in range(0, full, group):
        members = sorted(order[start:min(start + group, full)], key=lambda i: -lengths[i])
        batches += [members[b:b + batch_size] for b in range(0, len(members), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]] + order[full:]


def model_card(trainer: Engine, directory: Path, metrics: dict[str, float]) -> None:
    """Every trainer's :meth:`~rlhfkit.engine.loop.Engine.describe_final`: the Hugging Face model card of ``final/``
    (:func:`~rlhfkit.models.card.write_model_card`)."""
    write_model_card(directory, stage=trainer.stage, config=trainer.config, metrics=metrics)


class Trainer(Engine):
    """Runs the loop for one stage; the stage gives its examples, collator and loss.

    Examples are any objects the ``collator`` turns into a batch of tensors holding at least an
    ``attention_mask`` (for token counts); ``loss_fn(model, batch)`` returns the loss and the number
    of units it averages over (tokens for language modelling, pairs for a reward model), which
    weighs batches in :meth:`evaluate`. It may return a third element, a dict of per-batch metrics
    (e.g. a reward model's ``accuracy``), averaged over the logging window and logged with the loss.
    ``eval_fn(model, eval_examples)``, when given, replaces the default evaluation (token-weighted loss
    and perplexity) with the stage's own metrics; ``log_ppl=False`` leaves perplexity out of the logs
    of stages whose loss is not a language-model loss. ``example_length(example)`` is the width of the
    row(s) the collator pads an example into (default: ``len(example.input_ids)``), by which
    ``train.group_by_length`` groups the batches.

    ``example_units(example)``, when given, is the number of units an example adds to its micro-batch
    (target tokens for a language-model loss; it must agree with what ``loss_fn`` counts). Each micro-batch's
    mean loss is then scaled by its units over the training set's mean units per micro-batch, so that the
    objective is the mean over every unit of the training set: each target token weighs the same whatever
    micro-batch it lands in. A plain per-batch mean gives a token of a batch of short sequences more weight
    than one of a batch of long ones; ``group_by_length`` makes such batches the rule, and a model
    fine-tuned on a mix of short and long answers then prefers the short ones (measured on the ``sums``
    task: the share of worked answers fell from the demonstrations' 50 % to 28 %). This is the per-token
    normalisation that transformers adopted for gradient accumulation (``num_items_in_batch``), applied
    across batches too. SFT uses it under ``sft.loss_average: dataset``.
    """


    progress_metrics = {"loss": "loss"}

    def __init__(self, *, stage: str, config: BaseModel, train: TrainConfig, model: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerBase, train_examples: Sequence[Any],
                 eval_examples: Sequence[Any] = (), collator: Callable, loss_fn: LossFn,
                 eval_fn: EvalFn | None = None, log_ppl: bool = True,
                 example_length: Callable[[Any], int] = lambda example: len(example.input_ids),
                 example_units: Callable[[Any], int] | None = None):
        if not train_examples:
            raise TrainingError(f"{stage}: no training examples")
        self.tokenizer, self.collator, self.loss_fn = tokenizer, collator, loss_fn
        self.eval_fn, self.log_ppl = eval_fn, log_ppl
        self.train_examples, self.eval_examples = list(train_examples), list(eval_examples)
        self.lengths = [example_length(e) for e in self.train_examples] if train.group_by_length else None
        super().__init__(stage=stage, config=config, train=train)
        refuse_lora_under_fsdp(stage, model, self.sharded)
        if train.batch_size % self.world:
            raise TrainingError(f"{stage}: train.batch_size ({train.batch_size}) is the global batch and must be a "
                                f"multiple of the number of processes ({self.world})")
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        full, rest = divmod(len(self.train_examples), train.batch_size)
        self.n_batches = full + (rest >= self.world)  # every process needs an example of the last batch
        if self.n_batches == 0:
            raise TrainingError(f"{stage}: {len(self.train_examples)} training examples for {self.world} processes")
        # the training set's mean units per micro-batch: the constant every micro-batch's loss sum is divided by
        self.units_per_batch = (sum(map(example_units, self.train_examples)) * train.batch_size
                                / len(self.train_examples) if example_units else None)
        self.prepare(model, total_steps=train.max_steps or math.ceil(train.epochs * self.n_batches / train.grad_accum))
        self.model.train()
        self.window = MetricsWindow()  # the loss and the stage's metrics since the last log step
        self._window_tokens = 0
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its order): the epoch being read
        if self.world > 1:
            self.accelerator.print(f"[{stage}] data parallel over {self.world} processes "
                                   f"({self.accelerator.distributed_type.value}, global batch {train.batch_size})")

    # ---- data order -------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> MicroBatch:
        """Micro-batch ``index`` of the seeded order (module docstring): the training-set positions of the
        whole micro-batch and this process's share of it, collated."""
        epoch, position = divmod(index, self.n_batches)
        if self._order[0] != epoch:
            self._order = epoch, epoch_order(len(self.train_examples), self.cfg.batch_size,
                                             self.cfg.seed * 100_003 + epoch, self.lengths)
        chunk = self._order[1][position * self.cfg.batch_size:(position + 1) * self.cfg.batch_size]
        share = chunk[self.rank::self.world]
        batch = self.collator([self.train_examples[i] for i in share])
        return chunk, {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ---- the engine's hooks -------------------------------------------------------------------
    def train_step(self) -> None:
        start = self.step * self.cfg.grad_accum
        self._optimizer_step([self._micro_batch(start + i) for i in range(self.cfg.grad_accum)])

    def _optimizer_step(self, micro_batches: list[MicroBatch]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean micro-batch loss."""
        self._tokens_in_step, total = 0, 0.0

        def loss(micro: MicroBatch) -> tuple[torch.Tensor, float]:
            nonlocal total
            loss, units, *extra = self.loss_fn(self.model, micro[1])
            tokens = micro[1]["attention_mask"].sum()
            units = torch.as_tensor(units, dtype=torch.float32, device=loss.device)
            weight = 1.0
            if self.world > 1:  # this process's share of the micro-batch (see the module docstring)
                local = torch.stack([units, loss.detach().float() * units, tokens.float()])
                all_units, all_loss, tokens = self.accelerator.reduce(local, "sum").unbind()
                weight = units * self.world / all_units
                loss_value = (all_loss / all_units).item()
            else:
                loss_value = loss.detach().item()
            if self.units_per_batch:  # the dataset's mean units per micro-batch, not this one's (class docstring)
                weight = units * self.world / self.units_per_batch
            total += loss_value
            self._tokens_in_step += int(tokens)
            # a metric is averaged over the micro-batches that report it (e.g. KTO's rewards of desirable
            # completions, absent from a batch without any)
            self.window.add(extra[0] if extra else {})
            return loss * weight, loss_value

        positions = [p for chunk, _ in micro_batches for p in chunk[self.rank::self.world]]
        self._grad_norm = self.optimizer_step(micro_batches, loss, positions)
        step_loss = total / self.cfg.grad_accum
        self.window.add({"loss": step_loss})
        self._window_tokens += self._tokens_in_step
        return step_loss

    def log_record(self, elapsed_s: float, steps: int) -> dict[str, float]:
        means = self.window.means()
        loss = means.pop("loss")
        lr = self.scheduler.get_last_lr()[0]
        # the learning rate also under TRL's name (docs/trl-names.md); ``lr`` stays for what reads it already
        record = {"loss": loss, **({"ppl": math.exp(min(loss, 50.0))} if self.log_ppl else {}), **means,
                  "lr": lr, "learning_rate": lr, "grad_norm": self._grad_norm,
                  "tokens_per_s": self._window_tokens / elapsed_s, "s_per_step": elapsed_s / steps}
        self._window_tokens = 0
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss over the eval set, and its perplexity (or the stage's ``eval_fn``)."""
        if not self.eval_examples:
            return {}
        self.model.eval()
        if self.eval_fn is not None:
            metrics = self.eval_fn(self.model, self.eval_examples)
            self.model.train()
            return {f"eval/{name}": value for name, value in metrics.items()}
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        total, count = 0.0, 0.0
        for start in range(0, len(self.eval_examples), size):
            batch = self.collator(self.eval_examples[start:start + size])
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            loss, n_tokens, *_ = self.loss_fn(self.model, batch)
            total += loss.item() * n_tokens.item()
            count += n_tokens.item()
        self.model.train()
        loss = total / count
        return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}

    def save_state(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        save_model(self.accelerator.unwrap_model(self.model), self.tokenizer, str(directory), merge_lora=False,
                   state_dict=weights)
        return {}

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        load_weights(self.accelerator.unwrap_model(self.model), directory, state_loader(self.accelerator, self.model))

    describe_final = model_card

    def save_final(self, directory: Path, weights: dict[str, torch.Tensor] | None) -> None:
        save_model(self.accelerator.unwrap_model(self.model), self.tokenizer, str(directory), state_dict=weights)
