"""Built-in tasks: prompt distributions with a gold judge and simulated labelers.

``get_task(name)`` returns a fresh instance of a registered task; ``TASKS`` maps names to classes.
"""

from __future__ import annotations

from rlhfkit.tasks.base import Task
from rlhfkit.tasks.sums import Sums
from rlhfkit.tasks.tinyworld import TinyWorld

TASKS: dict[str, type[Task]] = {TinyWorld.name: TinyWorld, Sums.name: Sums}


def get_task(name: str) -> Task:
    """An instance of the task registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Sums", "Task", "TinyWorld", "get_task"]
