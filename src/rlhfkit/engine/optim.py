"""AdamW and the learning-rate schedules of every trainer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch

from rlhfkit.config import TrainConfig
from rlhfkit.engine.errors import TrainingError


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
