"""What the feedback commands need before (or without) opening a database: the names of roles and of import
and export kinds, and :class:`StoreError`.

Nothing here imports SQLAlchemy, so ``rlhfkit feedback --help`` and a mistyped option answer at once;
:mod:`rlhfkit.feedback.store` re-exports all of it.
"""

from __future__ import annotations

ROLES = ("admin", "labeler")
IMPORT_KINDS = ("prompts", "samples", "pairs")
EXPORT_KINDS = ("demonstrations", "rankings", "pairs", "ab")


class StoreError(ValueError):
    """Bad input to the store; ``field`` names the offending field when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.message}" if self.field else self.message
