"""Import files of items for labelers, shared by ``rlhfkit feedback import`` and the web app's import page.

Prompts (to write demonstrations for) are read with rlhfkit's readers: JSONL, JSON, CSV with a ``prompt``
column, Parquet. Samples (K completions to rank: ``rlhfkit sample``'s output) and A/B pairs are JSON lines,
validated by the store. Either the whole file is imported or, on the first bad record, nothing, with a
:class:`DataError` that names the file, its line and the field.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from rlhfkit.data.records import DataError
from rlhfkit.feedback.common import IMPORT_KINDS, import_kind

if TYPE_CHECKING:
    from rlhfkit.feedback.store import Store

__all__ = ["IMPORT_KINDS", "import_file", "read_import"]


def read_import(path: Path, kind: str, *, source: str | None = None) -> tuple[list[dict], list[int] | None]:
    """The records of an import file and, for JSON lines the store validates, the file line of each.

    ``source`` is the name errors give the file (its path by default; the uploaded name in the web app).
    """
    from rlhfkit.data.readers import iter_jsonl, read_records
    from rlhfkit.data.records import record_to_dict

    kind = import_kind(kind)[0]
    if kind not in IMPORT_KINDS:
        raise ValueError(f"unknown import kind {kind!r}; expected one of {IMPORT_KINDS}")
    name = source or str(path)
    try:
        if kind == "prompts":
            return [record_to_dict(record) for record in read_records(path, "prompt")], None
        if not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
            raise DataError(f"{kind} are read from JSON lines (.jsonl or .jsonl.gz)", source=name)
        rows = list(iter_jsonl(path))
    except DataError as error:
        if source is None:
            raise
        raise DataError(error.message, source=name, line=error.line, field=error.field, unit=error.unit) from None
    if not rows:
        raise DataError("contains no records", source=name)
    return [row for _, row in rows], [line for line, _ in rows]


def import_file(store: Store, path: Path, kind: str, *, replicas: int, source: str | None = None,
                project_id: int | None = None) -> int:
    """Add the file's records to ``store`` as items of ``kind`` in project ``project_id`` (the default project
    when None); all or nothing. Returns the number of items.

    The old name ``"pairs"`` of ``"ab"`` works, with a :class:`DeprecationWarning`."""
    kind, deprecated = import_kind(kind)
    if deprecated:
        warnings.warn(deprecated, DeprecationWarning, stacklevel=2)
    records, lines = read_import(path, kind, source=source)
    name = source or str(path)
    method = {"prompts": store.import_prompts, "samples": store.import_samples, "ab": store.import_pairs}[kind]
    try:
        return method(records, replicas=replicas, source=name, project_id=project_id)
    except DataError as error:  # the store numbers records: name the file line instead
        if lines is None or error.line is None:
            raise
        raise DataError(error.message, source=error.source, line=lines[error.line - 1], field=error.field) from None
