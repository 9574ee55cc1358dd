"""What the feedback commands need before (or without) opening a database: the names of roles and of import
and export kinds (with the old names they replace), and :class:`StoreError`.

Nothing here imports SQLAlchemy, so ``rlhfkit feedback --help`` and a mistyped option answer at once;
:mod:`rlhfkit.feedback.store` re-exports all of it.
"""

from __future__ import annotations

ROLES = ("admin", "labeler")
#: what an import file holds: prompts to write demonstrations for, samples (K outputs) to rate and rank, or
#: A/B pairs (two outputs) to judge
IMPORT_KINDS = ("prompts", "samples", "ab")
#: what an export holds: demonstrations, rankings, the chosen/rejected pairs drawn from the rankings, A/B verdicts
EXPORT_KINDS = ("demonstrations", "rankings", "pairs-from-rankings", "ab")
#: the names before issue 25 (import "pairs" were A/B pairs, export "pairs" came from rankings: easily mixed
#: up); still accepted, with a deprecation message
OLD_IMPORT_KINDS = {"pairs": "ab"}
OLD_EXPORT_KINDS = {"pairs": "pairs-from-rankings"}


def import_kind(name: str) -> tuple[str, str | None]:
    """The import kind ``name`` stands for, and a deprecation message when it is an old name."""
    if name in OLD_IMPORT_KINDS:
        new = OLD_IMPORT_KINDS[name]
        return new, (f"import kind {name!r} is deprecated: it is now {new!r} (A/B pairs to judge), so that it is not "
                     "mistaken for the export of pairs drawn from rankings ('pairs-from-rankings')")
    return name, None


def export_kind(name: str) -> tuple[str, str | None]:
    """The export kind ``name`` stands for, and a deprecation message when it is an old name."""
    if name in OLD_EXPORT_KINDS:
        new = OLD_EXPORT_KINDS[name]
        return new, (f"export kind {name!r} is deprecated: it is now {new!r} (chosen/rejected pairs drawn from the "
                     "rankings), so that it is not mistaken for the A/B pairs of 'ab'")
    return name, None


class StoreError(ValueError):
    """Bad input to the store; ``field`` names the offending field when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.message}" if self.field else self.message
