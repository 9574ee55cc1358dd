"""The stop on a non-finite loss or gradient: the weights are not updated, the last good checkpoint
stays, and ``nonfinite_batch.json`` names the step and the training examples of the step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

from rlhfkit.engine.checkpoint import checkpoints
from rlhfkit.engine.errors import TrainingError

NONFINITE_FILE = "nonfinite_batch.json"  # written when a non-finite loss or gradient stops a run


def stop_non_finite(run_dir: Path, stage: str, step: int, what: str, positions: list[int], *,
                    write: bool) -> NoReturn:
    """Raise the :class:`TrainingError` of a non-finite ``what`` (``"loss (nan)"``) at ``step``; with ``write``
    (process 0) first record the step and ``positions``, the positions in the training data of the step's
    examples (every process's)."""
    if write:
        record = {"stage": stage, "step": step, "what": what, "example_positions": sorted(set(positions))}
        (run_dir / NONFINITE_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
    last = checkpoints(run_dir)
    kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
    raise TrainingError(f"[{stage}] non-finite {what} at step {step}; {kept}; the step's examples are "
                        f"listed in {run_dir / NONFINITE_FILE}")
