"""Read records from files, saved datasets and the Hugging Face Hub; write JSON lines.

Sources :func:`read_records` understands:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line; errors name the file line.
* ``.json`` / ``.json.gz``: a JSON list of objects (errors name "record N", counting from 1) or,
  when the file does not start with ``[``, JSON lines.
* ``.parquet`` and ``.csv``, read with ``datasets``: errors name "row N" (from 1) for Parquet and
  the file line for CSV (the header is line 1, so the first row is line 2; a quoted cell that
  spans lines shifts the rows after it). CSV cells are read as text and an empty cell as null,
  so CSV suits records whose fields are strings (prompt/completion, chosen/rejected), not lists.
* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split``
  picks the split of a ``DatasetDict``, "train" by default).
* ``hf:NAME`` or ``hf:NAME:SPLIT``: a dataset on the Hugging Face Hub, through
  ``datasets.load_dataset`` (needs the network unless it is cached).
* any location a registered data source owns (:mod:`rlhfkit.data.sources`): the feedback app's database
  URL (``sqlite:///feedback.db``), whose exported answers are numbered "record N".
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

from rlhfkit.data.records import (
    RECORD_KINDS,
    DataError,
    Record,
    parse_record,
    record_to_dict,
)
from rlhfkit.data.sources import source_of

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
HUB_PREFIX = "hf:"
DEFAULT_SPLIT = "train"


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data source that does not exist; both a :class:`DataError` and a ``FileNotFoundError``."""


def _suffix(path: Path) -> str | None:
    """The supported suffix ``path`` ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix)), None)


def _open_binary(path: Path) -> IO[bytes]:
    """Open a file for reading bytes, decompressing ``.gz`` files."""
    if not path.exists():
        raise DataFileNotFoundError("no such file", source=str(path))
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, source: str, line: int) -> Any:
    """Decode one UTF-8 JSON text, raising :class:`DataError` at ``line`` if it is not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"is not valid UTF-8 (byte {raw[exc.start : exc.start + 1]!r} at offset {exc.start})",
            source=source,
            line=line,
        ) from None
    try:
        return json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=source, line=line) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file.

    Line numbers count from 1 and include blank lines, which are skipped. ``.jsonl.gz`` files
    are decompressed. A line that is not UTF-8, not JSON or not a JSON object raises
    :class:`DataError` naming the file and line.
    """
    path = Path(path)
    source = str(path)
    with _open_binary(path) as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            obj = _decode(raw, source, number)
            if not isinstance(obj, dict):
                raise DataError(
                    f"expected a JSON object, got {type(obj).__name__}", source=source, line=number
                )
            yield number, obj


def _iter_json(path: Path) -> tuple[str, Iterator[tuple[int, Any]]]:
    """The unit and rows of a ``.json`` file: a list of objects, or else JSON lines."""
    with _open_binary(path) as stream:
        raw = stream.read()
    if not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "line", iter_jsonl(path)
    try:
        items = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError("is not valid UTF-8", source=str(path), line=line) from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno})", source=str(path), line=exc.lineno
        ) from None
    return "record", enumerate(items, start=1)


def _load_parquet(path: Path) -> Any:
    """Load a Parquet file with ``datasets``, turning its failures into :class:`DataError`."""
    import datasets

    try:
        return datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # datasets and pyarrow raise many types for unreadable files
        raise DataError(f"cannot read as Parquet: {exc}", source=str(path)) from exc


def _load_csv(path: Path) -> Any:
    """Load a CSV file with ``datasets``, every cell as text and an empty cell as null.

    Reading text keeps values such as "NA" or "007" as written, and an id column with empty cells
    as "7" rather than the float 7.0.
    """
    import datasets

    try:
        with open(path, encoding="utf-8", newline="") as stream:
            header = next(csv.reader(stream), [])
        features = datasets.Features({name: datasets.Value("string") for name in header})
        return datasets.Dataset.from_csv(str(path), features=features, keep_default_na=False, na_values=[""])
    except Exception as exc:  # csv, datasets, pyarrow and pandas raise many types for unreadable files
        raise DataError(f"cannot read as CSV: {exc}", source=str(path)) from exc


def _load_disk_dataset(path: Path, split: str | None) -> tuple[str, Any]:
    """A split of a directory written by ``save_to_disk``, and its source label."""
    import datasets

    source = str(path)
    try:
        loaded = datasets.load_from_disk(source)
    except FileNotFoundError as exc:  # what datasets raises for a directory it does not recognise
        raise DataError(f"is not a dataset directory written by save_to_disk ({exc})", source=source) from exc
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise DataError(f"holds one dataset without splits; split {split!r} cannot apply", source=source)
        return source, loaded
    split = split or DEFAULT_SPLIT
    if split not in loaded:
        raise DataError(f"has no split {split!r}; available splits: {', '.join(loaded)}", source=source)
    return f"{source} (split {split!r})", loaded[split]


def _load_hub_dataset(spec: str, split: str | None) -> tuple[str, Any]:
    """A split of a Hub dataset named ``hf:NAME`` or ``hf:NAME:SPLIT``, and its source label."""
    import datasets

    name, _, spec_split = spec[len(HUB_PREFIX) :].partition(":")
    if not name:
        raise DataError("names no dataset; use hf:NAME or hf:NAME:SPLIT", source=spec)
    if spec_split and split is not None and spec_split != split:
        raise DataError(f"names split {spec_split!r} but split {split!r} was asked for", source=spec)
    split = spec_split or split or DEFAULT_SPLIT
    source = f"{HUB_PREFIX}{name}:{split}"
    try:
        return source, datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, unknown split: all stop the run here
        raise DataError(f"cannot load from the Hugging Face Hub: {exc}", source=source) from exc


def _rows(path: str | os.PathLike, split: str | None) -> tuple[str, str, Iterator[tuple[int, Any]]]:
    """The source label, position unit and numbered raw rows of any supported source."""
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        source, dataset = _load_hub_dataset(path, split)
        return source, "row", enumerate(dataset, start=1)
    path = Path(path)
    if path.is_dir():
        source, dataset = _load_disk_dataset(path, split)
        return source, "row", enumerate(dataset, start=1)
    if not path.exists():
        raise DataFileNotFoundError("no such file or directory", source=str(path))
    suffix = _suffix(path)
    if suffix is None:
        raise DataError(
            f"unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}, a directory written "
            f"by save_to_disk, or {HUB_PREFIX}NAME[:SPLIT]",
            source=str(path),
        )
    if split is not None:
        raise DataError(f"is a single file without splits; split {split!r} cannot apply", source=str(path))
    if suffix in (".jsonl", ".jsonl.gz"):
        return str(path), "line", iter_jsonl(path)
    if suffix in (".json", ".json.gz"):
        unit, rows = _iter_json(path)
        return str(path), unit, rows
    if suffix == ".parquet":
        return str(path), "row", enumerate(_load_parquet(path), start=1)
    # The CSV header is line 1, so the first row is line 2.
    return str(path), "line", enumerate(_load_csv(path), start=2)


def read_records(
    path: str | os.PathLike,
    kind: str,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Read and validate every record of ``kind`` from a file, dataset directory, ``hf:`` name or registered source.

    Args:
        path: a ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet`` or ``.csv`` file, a
            directory written by ``save_to_disk``, ``hf:NAME`` / ``hf:NAME:SPLIT``, or a location that a
            registered data source owns (:mod:`rlhfkit.data.sources`), such as the URL of a feedback database
            (``sqlite:///feedback.db``, ``postgresql+psycopg://...``): its labelers' answers, as ``rlhfkit export``
            writes them (demonstrations, rankings, or preference pairs).
        kind: one of :data:`~rlhfkit.data.records.RECORD_KINDS`.
        split: the split of a ``DatasetDict`` directory or Hub dataset ("train" when None); must
            be None for a single file or dataset.
        limit: read at most this many records (the first ones).

    Raises:
        DataFileNotFoundError: the path (or a source's database file) does not exist.
        DataError: an unsupported source, an unreadable row, an invalid record, or no records.
        ValueError: an unknown ``kind`` or a ``limit`` below 1.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {RECORD_KINDS}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    registered = source_of(path)
    if registered is not None:
        found = registered.rows(path, kind, split)
        source, unit, rows = found.source, found.unit, found.rows
    else:
        source, unit, rows = _rows(path, split)
    records: list[Record] = []
    for position, obj in rows:
        records.append(parse_record(obj, kind, source=source, line=position, unit=unit))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError("contains no records", source=source)
    return records


def read_texts(path: str | os.PathLike, *, split: str | None = None, limit: int | None = None) -> list[str]:
    """Read raw documents for pretraining or tokenizer training.

    A ``.txt`` file holds documents separated by blank lines; every other source holds records
    with a non-empty string field ``text``.
    """
    if Path(path).suffix == ".txt":
        if not Path(path).exists():
            raise DataFileNotFoundError("no such file or directory", source=str(path))
        documents = [d.strip() for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()]
        documents = documents[:limit]
    else:
        source, unit, rows = _rows(path, split)
        documents = []
        for position, obj in rows:
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                problem = "is missing" if not isinstance(obj, dict) or "text" not in obj else \
                    f"must be a non-empty string, got {type(text).__name__}"
                raise DataError(problem, source=source, line=position, field="text", unit=unit)
            documents.append(text)
            if limit is not None and len(documents) >= limit:
                break
    if not documents:
        raise DataError("contains no documents", source=str(path))
    return documents


def json_line(row: dict) -> str:
    """One JSON line as rlhfkit writes them: UTF-8 text (not ASCII escapes), ending in a newline."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict | Record]) -> int:
    """Write rows as JSON lines, atomically, and return how many were written.

    Records are written in their JSON form (:func:`~rlhfkit.data.records.record_to_dict`). The
    file is written to a temporary file in the same directory and moved into place, so readers
    never see a partial file; parent directories are created. A path ending in ``.gz`` is
    gzip-compressed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    count = 0
    try:
        # os.open with mode 0o666 lets the umask decide the permissions, as a plain open() does.
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as raw:
            compress = path.name.lower().endswith(".gz")
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if compress else nullcontext(raw) as sink:
                for row in rows:
                    if isinstance(row, Record):
                        row = record_to_dict(row)
                    elif not isinstance(row, dict):
                        raise TypeError(f"cannot write a {type(row).__name__} as a JSON line")
                    sink.write(json_line(row).encode("utf-8"))
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return count
