"""What every ``rlhfkit`` command shares: the console it reports on, and how it ends on a user's mistake.

:mod:`rlhfkit.cli`, :mod:`rlhfkit.cli_public` and :mod:`rlhfkit.feedback.cli` import both from here, so the
command modules need not import each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.data.records import DataError
from rlhfkit.engine.errors import TrainingError
from rlhfkit.feedback.common import StoreError

console = Console(stderr=True)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that a user can fix (a config key, a record, a file, a database): a message, not a traceback.

    A function, called only when a command fails: the configs' module (pydantic) is not loaded by commands
    that never read a config, such as ``rlhfkit feedback ...`` and ``rlhfkit serve``."""
    from rlhfkit.config import ConfigError

    return (ConfigError, DataError, TrainingError, StoreError, FileNotFoundError)


def fail_cleanly(function: Callable) -> Callable:
    """Show configuration, data, training and store errors and missing files as one clear message (exit code 2)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            if not isinstance(error, user_errors()):
                raise
            console.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper
