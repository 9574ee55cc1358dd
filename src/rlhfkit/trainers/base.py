"""The optimisation loop every trainer shares, on accelerate.

A stage supplies the model, tokenized examples and a loss; this loop supplies the rest: micro-batches
in a seeded order, gradient accumulation, AdamW with warmup + cosine/linear decay, gradient clipping,
mixed precision where the device has it, evaluation, a progress bar, ``metrics.jsonl``, crash-safe
checkpoints with optimizer/scheduler/RNG state, exact resume, and a plain HF ``final/`` model.

Data order is a pure function of (seed, micro-batch index): micro-batch ``i`` is slice
``i % n_batches`` of the order drawn for epoch ``i // n_batches`` (:func:`epoch_order`: a seeded
permutation, by default grouped by length so that a micro-batch holds little padding). Resuming at
optimizer step ``s`` therefore continues at micro-batch ``s * grad_accum`` with nothing but ``s`` saved.

Data parallelism (``torchrun`` / ``accelerate launch`` with N processes): ``train.batch_size`` is the
global batch. Process ``r`` takes examples ``r, r + N, ...`` of each micro-batch, and its loss is
weighted by its share of the micro-batch's units (tokens, pairs), so that the gradient DDP averages is
the gradient of the whole micro-batch's loss: N processes train the same model as one process, step for
step (tested to a tight tolerance). A final micro-batch of an epoch with fewer examples than processes
is left out. Logged losses and token counts cover all processes, a stage's own per-batch metrics (a
reward model's accuracy) process 0's share; only process 0 writes files.

Engines (chosen by ``accelerate launch --config_file configs/accelerate/...``, see :func:`make_accelerator`):
DDP, and FSDP2 (torch ``fully_shard``, each process holding a shard of the weights, gradients and
optimizer state). Under FSDP every process joins the gathering of the full model and optimizer state for
a checkpoint and for ``final/``, process 0 writes them in the layout of a run without FSDP (but the
optimizer state keyed by parameter name, so such a checkpoint resumes under FSDP only), and resume shards
them again; 2 FSDP processes train the same model as 1 process (tested on CPU with gloo). LoRA and
``train.torch_compile`` under FSDP, FSDP version 1, DeepSpeed and Megatron-LM are refused: untested.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env, set_seed
from pydantic import BaseModel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import PreTrainedTokenizerBase

from rlhfkit.config import TrainConfig, save_config
from rlhfkit.models.load import save_model

CHECKPOINT_PREFIX = "checkpoint-"
# engines ``accelerate launch`` can ask for (through these environment flags) that rlhfkit refuses: untested
UNTESTED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
STATE_FILE = "trainer_state.pt"
NONFINITE_FILE = "nonfinite_batch.json"  # written when a non-finite loss or gradient stops a run
LENGTH_GROUP_BATCHES = 50  # micro-batches per length-sorted group of :func:`epoch_order` (as transformers' 50)

# (model, batch) -> (loss to minimise, number of units it averages over[, {metric name: batch value}])
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple]
# (model, eval examples) -> {metric name: value}; logged with an ``eval/`` prefix
EvalFn = Callable[[torch.nn.Module, Sequence[Any]], dict[str, float]]


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


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is left intact."""


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` in the run directory."""

    def __init__(self, run_dir: Path, stage: str):
        self.path = run_dir / "metrics.jsonl"
        self.stage = stage

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run that died after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a partial one has no state file)."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rng_states_of_processes() -> list[dict]:
    """:func:`rng_state` of every process, in process order (on every process; a collective when several)."""
    if not _process_group():
        return [rng_state()]
    states: list[dict | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the processes of the default process group, as a new tensor
    (``tensor`` itself without a process group): the ``reduce_sum`` of :mod:`rlhfkit.algorithms.advantages`."""
    if not _process_group():
        return tensor
    total = tensor.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def load_weights(model: torch.nn.Module, directory: Path,
                 load_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
    """Load weights written by :func:`save_model` with ``merge_lora=False`` back into ``model``.

    ``load_state_dict(weights)`` puts the full state dict into the model and returns its missing and
    unexpected keys: by default ``model.load_state_dict(weights, strict=False)``; under FSDP the loader
    that shards them (:func:`state_loader`).
    """
    from safetensors.torch import load_file

    if (directory / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
        return
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    weights = {name: tensor for file in files for name, tensor in load_file(directory / file).items()}
    load_state_dict = load_state_dict or partial(model.load_state_dict, strict=False)
    missing, unexpected = load_state_dict(weights)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise TrainingError(f"{directory}: checkpoint does not match the model "
                            f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")


def write_checkpoint(directory: Path, write: Callable[[Path], None], *, keep: int) -> None:
    """Crash-safe checkpoint: ``write`` fills a temporary directory that is then renamed to
    ``directory``, so a crash leaves either the old checkpoints or the complete new one; then only
    the newest ``keep`` checkpoints of the run are kept."""
    tmp = directory.parent / f".tmp-{directory.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    for old in checkpoints(directory.parent)[:-keep]:
        shutil.rmtree(old)


def build_optimizer(models: Sequence[torch.nn.Module], train: TrainConfig, stage: str,
                    lr_scales: Sequence[float] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``models`` (each with its own lr scale); matrices
    decay, biases and norm gains do not (the GPT-2/nanoGPT convention)."""
    groups = []
    for model, scale in zip(models, lr_scales or [1.0] * len(models), strict=True):
        params = [p for p in model.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay,
                    "lr": train.lr * scale},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": train.lr * scale}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TrainingError(f"{stage}: the model has no trainable parameters")
    # the fused kernel (CPU and GPU since torch 2.4) does the whole update in one pass per tensor:
    # about 50 ms less per step than foreach on the 14M-parameter preset on 2 CPU cores
    fused = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.adam_betas, **({"fused": True} if fused else
                                                                               {"foreach": True}))


def lr_multiplier(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate at ``step`` as a share of ``train.lr``: a linear warmup over ``warmup_steps``, then
    ``constant``, ``linear`` decay to zero at ``total_steps``, or half a ``cosine`` wave down to zero (the
    schedules of transformers' ``get_scheduler``, computed here: importing ``transformers.optimization``
    imports peft with it, about 140 MiB of resident memory for a run that may not use LoRA)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    """Warmup, then cosine or linear decay to zero (or a constant rate) over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, train.scheduler, warmup_steps=train.warmup_steps, total_steps=total_steps))


def make_accelerator(mixed_precision: str) -> Accelerator:
    """The accelerate ``Accelerator`` of a run, with the engine ``accelerate launch`` asked for.

    On a machine without a GPU it is told so (``cpu=True``), which is what makes ``torchrun`` processes
    there join one gloo process group (data parallel on CPU). ``train.batch_size`` is the global batch, so
    the learning-rate schedule takes one step per optimizer step whatever the number of processes
    (accelerate's default would step it once per process).

    The engine comes from the environment ``accelerate launch --config_file`` sets (the files in
    ``configs/accelerate/``): DDP, or FSDP version 2 (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``), also on
    CPU (:func:`_fsdp_on_cpu`). FSDP version 1, DeepSpeed and Megatron-LM stop the run here, untested.
    """
    for flag, engine in UNTESTED_ENGINES.items():
        if parse_flag_from_env(flag):
            raise TrainingError(f"{engine} is not supported: rlhfkit has not been tested with it (its configs in "
                                "configs/accelerate/ are untested). Use DDP or FSDP (fsdp_version: 2).")
    fsdp = FullyShardedDataParallelPlugin() if parse_flag_from_env("ACCELERATE_USE_FSDP") else None
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise TrainingError(f"FSDP version {fsdp.fsdp_version} is not supported (untested); set fsdp_version: 2 "
                            "in the accelerate config (configs/accelerate/fsdp-*.yaml)")
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(cpu=not has_gpu, mixed_precision=resolve_mixed_precision(mixed_precision),
                              fsdp_plugin=fsdp, step_scheduler_with_optimizer=False)
    if fsdp is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _fsdp_on_cpu(accelerator, fsdp)
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch a CPU run that asked for FSDP from DDP to accelerate's own FSDP2 code path.

    accelerate (1.15) takes the FSDP plugin only for GPU-type devices (the ``MULTI_GPU, MULTI_XPU, ...``
    branch of ``AcceleratorState.__init__``); with ``cpu=True`` it keeps ``MULTI_CPU`` and wraps the model
    in DDP without a word. torch's ``fully_shard`` itself works on CPU with gloo, so this does what that
    branch does on a GPU (the engine, the plugin, its mixed precision), and ``prepare``, ``no_sync``,
    ``clip_grad_norm_`` and ``get_state_dict`` then run accelerate's FSDP2 code unchanged.
    """
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# ---- FSDP: gathered state for checkpoints and final/, sharded again on resume ------------------
# Shared by the base loop and PPO. Each function is a collective under FSDP (every process calls it, in
# the same order); without FSDP it is the plain model's or optimizer's own state.
def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run's engine shards the weights over the processes (FSDP2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` (inductor, dynamic shapes), in place, each block ``model`` repeats: the modules of the
    classes its ``_no_split_modules`` name (a decoder layer). Regional compilation: the layers share one compiled
    graph, so the compile costs one layer, and varying batch shapes do not recompile. ``nn.Module.compile``
    leaves the weights and state-dict keys as they are. A model that names no block is compiled whole.
    Returns the number of modules compiled.
    """
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    blocks = [module for module in model.modules() if type(module).__name__ in names] or [model]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def refuse_lora_under_fsdp(stage: str, model: torch.nn.Module, sharded: bool) -> None:
    """Stop a run of ``stage`` that would train a LoRA ``model`` under FSDP (untested)."""
    if sharded and hasattr(model, "merge_and_unload"):
        raise TrainingError(f"{stage}: LoRA under FSDP is not supported yet (untested: the adapters' checkpoints "
                            "and the merged final/ model are not gathered from the shards). Use DDP with LoRA.")


def gather_model_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict to save ``model`` (as prepared) from: under FSDP gathered from every process's
    shard (complete on process 0 only); otherwise None (save the model's own)."""
    if not is_sharded(accelerator):
        return None
    weights = accelerator.get_state_dict(model)
    # the gathered dict holds one copy per name of a tied parameter (embeddings and lm_head): share them
    # again, so that save_pretrained, which finds tied weights by storage, writes one as without FSDP
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        original = first.setdefault(id(param), name)
        if original != name and name in weights:
            weights[name] = weights[original]
    return weights


def submodule_state(weights: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of a :func:`gather_model_state` dict under submodule ``prefix``, without it (None stays None)."""
    if weights is None:
        return None
    return {name[len(prefix) + 1:]: tensor for name, tensor in weights.items() if name.startswith(prefix + ".")}


def gather_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer) -> dict:
    """The state dict of ``optimizer`` (as prepared, over ``model``'s parameters): under FSDP the full one,
    keyed by parameter name (complete on process 0 only); otherwise the optimizer's own, keyed by index."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def check_optimizer_layout(stage: str, directory: Path, optimizer_state: dict, sharded: bool) -> None:
    """Refuse to resume a checkpoint written under FSDP without it, or the other way round: the optimizer
    state is keyed by parameter name under FSDP (:func:`gather_optimizer_state`), else by index."""
    by_name = any(isinstance(key, str) for key in optimizer_state["state"])
    if optimizer_state["state"] and by_name != sharded:
        raise TrainingError(f"{stage}: {directory} was written {'under' if by_name else 'without'} FSDP; "
                            f"resume it {'under' if by_name else 'without'} FSDP too")


def state_loader(accelerator: Accelerator, model: torch.nn.Module,
                 prefix: str = "") -> Callable[[dict[str, torch.Tensor]], Any]:
    """The ``load_state_dict`` of :func:`load_weights` for submodule ``prefix`` of ``model`` (as prepared;
    the whole model by default): under FSDP every process passes the full weights and keeps its shard of
    them, otherwise ``load_state_dict(weights, strict=False)`` of the unwrapped submodule."""
    if not is_sharded(accelerator):
        return partial(accelerator.unwrap_model(model).get_submodule(prefix).load_state_dict, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = f"{prefix}." if prefix else ""

    def load(weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        options = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(model, {own + name: t for name, t in weights.items()},
                                                   options=options)
        # the submodule's own names, as its load_state_dict would report them
        return ([name[len(own):] for name in missing if name.startswith(own)],
                [name[len(own):] if name.startswith(own) else name for name in unexpected])
    return load


def load_optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Put a checkpoint's optimizer state back (under FSDP: every process keeps its shard of the full state)."""
    if not is_sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 on a GPU that supports it, else full precision.

    On CPU ``auto`` stays fp32 although fp32 is not always fastest there: on a CPU with native bf16
    (``avx512_bf16`` or AMX) bf16 autocast speeds the matrix products up (PPO on the small preset: 1.33x
    less CPU time per iteration than fp32 on an AMD EPYC with ``avx512_bf16``), but it changes results at
    bf16 rounding, and whether the demo's results hold with it has not been checked, so it is asked for:
    ``mixed_precision: bf16``.
    """
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class Trainer:
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
    """

    def __init__(self, *, stage: str, config: BaseModel, train: TrainConfig, model: torch.nn.Module,
                 tokenizer: PreTrainedTokenizerBase, train_examples: Sequence[Any],
                 eval_examples: Sequence[Any] = (), collator: Callable, loss_fn: LossFn,
                 eval_fn: EvalFn | None = None, log_ppl: bool = True,
                 example_length: Callable[[Any], int] = lambda example: len(example.input_ids)):
        if not train_examples:
            raise TrainingError(f"{stage}: no training examples")
        self.stage, self.config, self.cfg = stage, config, train
        self.tokenizer, self.collator, self.loss_fn = tokenizer, collator, loss_fn
        self.eval_fn, self.log_ppl = eval_fn, log_ppl
        self.train_examples, self.eval_examples = list(train_examples), list(eval_examples)
        self.lengths = [example_length(e) for e in self.train_examples] if train.group_by_length else None
        self.run_dir = Path(train.output_dir)
        set_seed(train.seed)  # dropout and any sampling draw from the global RNG (restored on resume)
        self.accelerator = make_accelerator(train.mixed_precision)
        self.world = self.accelerator.num_processes
        self.sharded = is_sharded(self.accelerator)
        refuse_lora_under_fsdp(stage, model, self.sharded)
        if train.torch_compile and self.sharded:
            raise TrainingError(f"{stage}: train.torch_compile under FSDP is not supported yet (untested)")
        if train.batch_size % self.world:
            raise TrainingError(f"{stage}: train.batch_size ({train.batch_size}) is the global batch and must be a "
                                f"multiple of the number of processes ({self.world})")
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if train.torch_compile:
            compile_repeated_blocks(model)
        full, rest = divmod(len(self.train_examples), train.batch_size)
        self.n_batches = full + (rest >= self.world)  # every process needs an example of the last batch
        if self.n_batches == 0:
            raise TrainingError(f"{stage}: {len(self.train_examples)} training examples for {self.world} processes")
        self.total_steps = train.max_steps or math.ceil(train.epochs * self.n_batches / train.grad_accum)
        optimizer = build_optimizer([model], train, stage)
        scheduler = build_scheduler(optimizer, train, self.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.metrics = MetricsLog(self.run_dir, stage)
        self.step = 0
        if self.world > 1:
            self.accelerator.print(f"[{stage}] data parallel over {self.world} processes "
                                   f"({self.accelerator.distributed_type.value}, global batch {train.batch_size})")

    # ---- data order -------------------------------------------------------------------------
    def _micro_batches(self, start: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(training-set positions, micro-batch) from index ``start`` on, in the seeded order (module docstring)."""
        index = start
        order_epoch, order = None, []
        while True:
            epoch, position = divmod(index, self.n_batches)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(len(self.train_examples), self.cfg.batch_size,
                                                        self.cfg.seed * 100_003 + epoch, self.lengths)
            chunk = order[position * self.cfg.batch_size:(position + 1) * self.cfg.batch_size]
            share = chunk[self.accelerator.process_index::self.world]
            batch = self.collator([self.train_examples[i] for i in share])
            yield chunk, {k: v.to(self.accelerator.device) for k, v in batch.items()}
            index += 1

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (temp dir, then rename); keep the newest N."""
        final = self.run_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        if final in checkpoints(self.run_dir):  # this very state is saved (the last periodic save, or a resume)
            return final
        weights = gather_model_state(self.accelerator, self.model)  # on every process
        optimizer = gather_optimizer_state(self.accelerator, self.model, self.optimizer)

        def write(directory: Path) -> None:
            save_model(self.accelerator.unwrap_model(self.model), self.tokenizer, str(directory), merge_lora=False,
                       state_dict=weights)
            torch.save({"step": self.step, "optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict(), "rng": rng_state()}, directory / STATE_FILE)

        if self.accelerator.is_main_process:
            write_checkpoint(final, write, keep=self.cfg.save_total_limit)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> None:
        found = checkpoints(self.run_dir)
        if not (self.cfg.resume and found):
            return
        latest = found[-1]
        state = torch.load(latest / STATE_FILE, weights_only=False)
        check_optimizer_layout(self.stage, latest, state["optimizer"], self.sharded)
        load_weights(self.accelerator.unwrap_model(self.model), latest, state_loader(self.accelerator, self.model))
        load_optimizer_state(self.accelerator, self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if self.accelerator.is_main_process:  # one writer: processes rewriting the file at once could lose lines
            self.metrics.truncate_after(self.step)
        self.accelerator.wait_for_everyone()
        self.accelerator.print(f"[{self.stage}] resumed from {latest} at step {self.step}")

    # ---- evaluation ---------------------------------------------------------------------------
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

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run to ``total_steps`` (resuming if a checkpoint exists); return the last metrics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            save_config(self.config, self.run_dir)
        self._resume()
        if self.step == 0 and self.eval_examples and self.cfg.eval_at_start:
            self._log(self.evaluate())  # the starting point of the eval curve
        self.model.train()
        batches = self._micro_batches(self.step * self.cfg.grad_accum)
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        window_stats: dict[str, float] = {}
        window_counts: dict[str, int] = {}
        last: dict[str, float] = {}
        with self._progress() as progress:
            task = progress.add_task(self.stage, total=self.total_steps, completed=self.step, status="")
            while self.step < self.total_steps:
                step_loss = self._optimizer_step(batches)
                self.step += 1
                window_loss, window_steps = window_loss + step_loss, window_steps + 1
                window_tokens += self._tokens_in_step
                for name, value in self._stats_in_step.items():
                    window_stats[name] = window_stats.get(name, 0.0) + value
                    window_counts[name] = window_counts.get(name, 0) + self._stat_counts[name]
                log_now = self.step % self.cfg.log_every == 0 or self.step == self.total_steps
                record: dict[str, float] = {}
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    loss = window_loss / window_steps
                    last = record = {
                        "loss": loss, **({"ppl": math.exp(min(loss, 50.0))} if self.log_ppl else {}),
                        **{name: total / window_counts[name] for name, total in window_stats.items()},
                        "lr": self.scheduler.get_last_lr()[0], "grad_norm": self._grad_norm,
                        "tokens_per_s": window_tokens / elapsed, "s_per_step": elapsed / window_steps}
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:  # also between log steps
                    evaluated = self.evaluate()
                    record.update(evaluated)
                    last.update(evaluated)
                if record:
                    self._log(record)
                if log_now:
                    progress.update(task, status=f"loss {loss:.3f}")
                    window_loss, window_steps, window_tokens, window_stats, window_counts = 0.0, 0, 0, {}, {}
                    window_start = time.perf_counter()
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save_checkpoint()
                progress.update(task, completed=self.step)
        final_eval = self.evaluate()
        if final_eval:
            self._log(final_eval)
            last.update(final_eval)
        self.save_checkpoint()
        weights = gather_model_state(self.accelerator, self.model)  # on every process
        if self.accelerator.is_main_process:
            save_model(self.accelerator.unwrap_model(self.model), self.tokenizer, str(self.run_dir / "final"),
                       state_dict=weights)
        self.accelerator.wait_for_everyone()
        return last

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean micro-batch loss."""
        # a metric is averaged over the micro-batches that report it (e.g. KTO's rewards of desirable
        # completions, absent from a batch without any)
        total, self._tokens_in_step, self._stats_in_step, self._stat_counts = 0.0, 0, {}, {}
        positions: list[int] = []
        for micro in range(self.cfg.grad_accum):
            chunk, batch = next(batches)
            positions += chunk
            last_micro = micro == self.cfg.grad_accum - 1
            with self.accelerator.no_sync(self.model) if not last_micro else nullcontext():
                loss, units, *extra = self.loss_fn(self.model, batch)
                tokens = batch["attention_mask"].sum()
                weight = 1.0
                if self.world > 1:  # this process's share of the micro-batch (see the module docstring)
                    units = torch.as_tensor(units, dtype=torch.float32, device=loss.device)
                    local = torch.stack([units, loss.detach().float() * units, tokens.float()])
                    all_units, all_loss, tokens = self.accelerator.reduce(local, "sum").unbind()
                    weight = units * self.world / all_units
                    loss_value = all_loss / all_units
                else:
                    loss_value = loss.detach()
                if not torch.isfinite(loss_value):
                    self._stop_non_finite(f"loss ({loss_value.item()})", positions)
                self.accelerator.backward(loss * weight / self.cfg.grad_accum)
            total += loss_value.item()
            self._tokens_in_step += int(tokens)
            for name, value in (extra[0] if extra else {}).items():
                self._stats_in_step[name] = self._stats_in_step.get(name, 0.0) + float(value)
                self._stat_counts[name] = self._stat_counts.get(name, 0) + 1
        # the norm is measured (and, with max_grad_norm, clipped) before every update: a non-finite
        # gradient stops the run before it reaches the weights
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            self._stop_non_finite(f"gradient norm ({grad_norm})", positions)
        self._grad_norm = grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / self.cfg.grad_accum

    def _stop_non_finite(self, what: str, positions: list[int]) -> None:
        """Stop the run on a non-finite loss or gradient: the weights are not updated, the last good
        checkpoint stays, and ``nonfinite_batch.json`` names the step and the training examples of the step
        (their positions in the training data)."""
        step = self.step + 1
        if self.accelerator.is_main_process:
            record = {"stage": self.stage, "step": step, "what": what, "example_positions": sorted(positions)}
            (self.run_dir / NONFINITE_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
        last = checkpoints(self.run_dir)
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
        raise TrainingError(f"[{self.stage}] non-finite {what} at step {step}; {kept}; the step's examples are "
                            f"listed in {self.run_dir / NONFINITE_FILE}")

    def _log(self, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            self.metrics.write(self.step, metrics)

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                        disable=not (self.cfg.progress and self.accelerator.is_main_process))
