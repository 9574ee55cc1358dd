"""What the feedback commands need before (or without) opening a database: the names of roles and of import
and export kinds (with the old names they replace), a project's defaults and the checks of its settings, and
:class:`StoreError`.

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

#: a project's defaults, today's labeling interface (InstructGPT's): rate each output 1-7 and flag it
DEFAULT_PROJECT = "default"  # the project of items imported without one (and of every item before projects)
FLAGS = ("fails_instruction", "harmful", "made_up_facts")
RATING_RANGE = (1, 7)
RATING_LIMITS = (0, 10)  # every rating scale lies within these
MAX_PROJECT_NAME_CHARS = 64
MAX_FLAG_CHARS = 64
MAX_FLAGS = 20
MAX_INSTRUCTIONS_CHARS = 100_000


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


# ------------------------------------------------------------------------------------ project settings


def check_project_name(name: object) -> str:
    """A project's name: non-empty, without leading or trailing spaces, at most 64 characters."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise StoreError("must be non-empty, without leading or trailing spaces", field="name")
    if len(name) > MAX_PROJECT_NAME_CHARS:
        raise StoreError(f"is longer than {MAX_PROJECT_NAME_CHARS} characters", field="name")
    return name


def check_instructions(text: object) -> str:
    """A project's instructions to labelers (Markdown or plain text, shown as written; may be empty)."""
    if not isinstance(text, str):
        raise StoreError(f"expected text, got {type(text).__name__}", field="instructions")
    if len(text) > MAX_INSTRUCTIONS_CHARS:
        raise StoreError(f"is longer than {MAX_INSTRUCTIONS_CHARS} characters", field="instructions")
    return text


def check_rating_scale(scale: object) -> tuple[int, int]:
    """A rating scale ``(lowest, highest)``: whole numbers within :data:`RATING_LIMITS`, lowest below highest."""
    low_limit, high_limit = RATING_LIMITS
    if (not isinstance(scale, list | tuple) or len(scale) != 2
            or not all(isinstance(value, int) and not isinstance(value, bool) for value in scale)):
        raise StoreError(f"expected two whole numbers (lowest, highest), got {str(scale)[:40]}", field="rating_scale")
    low, high = scale
    if not low_limit <= low < high <= high_limit:
        raise StoreError(f"{low}-{high} is not a scale: the lowest rating must be below the highest, both from "
                         f"{low_limit} to {high_limit} (e.g. 1-5)", field="rating_scale")
    return low, high


def check_flags(flags: object) -> tuple[str, ...]:
    """A project's flag names, in the order shown: at most :data:`MAX_FLAGS` distinct (case-insensitively),
    non-empty names without leading or trailing spaces or commas; none at all is allowed."""
    if not isinstance(flags, list | tuple) or not all(isinstance(flag, str) for flag in flags):
        raise StoreError("expected a list of flag names", field="flags")
    if len(flags) > MAX_FLAGS:
        raise StoreError(f"has {len(flags)} flags; at most {MAX_FLAGS} are allowed", field="flags")
    seen: set[str] = set()
    for position, flag in enumerate(flags, start=1):
        if not flag.strip() or flag != flag.strip() or "," in flag:
            raise StoreError(f"flag {position} ({flag!r}) must be non-empty, without commas or leading or trailing "
                             "spaces", field="flags")
        if len(flag) > MAX_FLAG_CHARS:
            raise StoreError(f"flag {position} is longer than {MAX_FLAG_CHARS} characters", field="flags")
        if flag.lower() in seen:
            raise StoreError(f"flag {flag!r} is given twice", field="flags")
        seen.add(flag.lower())
    return tuple(flags)


def parse_rating_scale(text: str) -> tuple[int, int]:
    """``"1-5"`` as the checked scale ``(1, 5)`` (the command line's and the admin page's way to write it)."""
    low, dash, high = text.strip().partition("-")
    try:
        scale = (int(low), int(high)) if dash else None
    except ValueError:
        scale = None
    if scale is None:
        raise StoreError(f"expected LOWEST-HIGHEST such as 1-5, got {text[:40]!r}", field="rating_scale")
    return check_rating_scale(scale)


def parse_flags(text: str) -> tuple[str, ...]:
    """``"a,b,c"`` as the checked flag names (spaces around each name are dropped; an empty text is no flags)."""
    return check_flags([flag.strip() for flag in text.split(",")] if text.strip() else [])
