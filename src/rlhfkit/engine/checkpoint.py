"""Checkpoint directories: written atomically, found again, and their weights loaded back.

``checkpoint-<step>/`` holds the model files (HF ``save_pretrained`` layout, LoRA adapters unmerged) and
``trainer_state.pt`` (step, optimizer, scheduler, RNG state and whatever a trainer adds); a directory
without the state file is incomplete and ignored.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhfkit.engine.errors import TrainingError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a partial one has no state file)."""
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


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


def load_weights(model: torch.nn.Module, directory: Path,
                 load_state_dict: Callable[[dict[str, torch.Tensor]], Any] | None = None) -> None:
    """Load weights written by :func:`rlhfkit.models.load.save_model` with ``merge_lora=False`` back into
    ``model``.

    ``load_state_dict(weights)`` puts the full state dict into the model and returns its missing and
    unexpected keys: by default ``model.load_state_dict(weights, strict=False)``; under FSDP the loader
    that shards them (:func:`rlhfkit.engine.sharding.state_loader`).
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
