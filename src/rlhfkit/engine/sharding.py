"""FSDP2: the full weights and optimizer state gathered from every process's shard (for a checkpoint and
for ``final/``), and sharded again on resume.

Each function is a collective under FSDP (every process calls it, in the same order); without FSDP it is
the plain model's or optimizer's own state. Process 0 writes what is gathered in the layout of a run
without FSDP, except that the optimizer state is keyed by parameter name, so such a checkpoint resumes
under FSDP only (:func:`check_optimizer_layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from rlhfkit.engine.accelerator import is_sharded
from rlhfkit.engine.errors import TrainingError


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


def full_model_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of ``model`` (as prepared) on every process, to copy it into an unsharded module (a
    frozen reference): under FSDP gathered from every process's shard (a collective), otherwise the model's own."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


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
