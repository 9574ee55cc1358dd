"""The random state a checkpoint keeps (Python, NumPy, torch), of one process or of every process."""

from __future__ import annotations

import random

import numpy as np
import torch

from rlhfkit.engine.accelerator import gather_objects


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def rng_states_of_processes() -> list[dict]:
    """:func:`rng_state` of every process, in process order (on every process; a collective when several)."""
    return gather_objects(rng_state())
