"""Argilla's exported records, read as rlhfkit rankings, preference pairs and demonstrations.

Argilla (2.x) exports a dataset's records in two shapes, both read here (:func:`read_argilla`, ``rlhfkit
convert-argilla``):

* **nested**: ``dataset.records.to_json(path)`` (a JSON list; ``rg.Dataset.to_disk`` writes it as
  ``records.json`` in its folder) or the same objects as JSON lines. Each record is ``{"id", "fields": {...},
  "metadata": {...}, "responses": {question: [{"value", "user_id", "status"?}, ...]}, "suggestions": {...}}``.
* **flattened**: ``dataset.records.to_datasets()`` (saved with ``save_to_disk``, or written as Parquet or JSON).
  The fields are columns, and each question has the columns ``QUESTION.responses`` (the values),
  ``QUESTION.responses.users`` and ``QUESTION.responses.status``, one entry per labeler.

A ranking question's response is the list of its options, best first (Argilla 2's SDK) or a list of
``{"value": option, "rank": n}`` (Argilla's API and 1.x exports), where equal ranks are ties. The options name
the record's text fields that hold the completions (``options`` maps them where they do not); the completions
keep the order of the fields in the record, so every labeler's ranking of a record has the same completions.
A text question's response is the demonstration written for the prompt field.

One rlhfkit record comes from each labeler's response (``labeler``: Argilla's user id); responses marked
``discarded`` or ``draft`` are left out and counted, as are records without a response to the question. A row
that breaks the format stops the read with a :class:`~rlhfkit.data.records.DataError` naming the file, its
line (or record) and the field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.data.public import PublicData, SkipRow, Where, convert_rows
from rlhfkit.data.readers import _rows
from rlhfkit.data.records import DataError, Record

#: what ``read_argilla`` makes of the responses: rankings and their pairs (a ranking question), demonstrations
#: (a text question)
ARGILLA_KINDS = ("rankings", "pairs", "demonstrations")
RECORDS_FILE = "records.json"  # the records in a folder written by rg.Dataset.to_disk
KEPT_STATUSES = (None, "submitted")  # nested exports of some versions carry no status: kept


@dataclass(frozen=True)
class _Response:
    """One labeler's response to the question, and the field its value is in (for errors)."""

    value: Any
    user: str | None
    status: str | None
    field: str


def _responses(row: dict, question: str, where: Where) -> list[_Response]:
    """Every response to ``question`` in a nested or a flattened record."""
    if isinstance(row.get("responses"), dict):
        answers = row["responses"].get(question)
        if answers is None:
            return []
        if not isinstance(answers, list):
            raise where.error(f"responses.{question}", f"expected a list of responses, got {type(answers).__name__}")
        found = []
        for number, answer in enumerate(answers):
            field = f"responses.{question}[{number}]"
            if not isinstance(answer, dict) or "value" not in answer:
                raise where.error(field, "expected an object with value and user_id")
            found.append(_Response(answer["value"], _text_or_none(answer.get("user_id")), answer.get("status"),
                                   f"{field}.value"))
        return found
    key = f"{question}.responses"
    values = row.get(key)
    if values is None:
        return []
    if not isinstance(values, list):
        raise where.error(key, f"expected a list of responses, got {type(values).__name__}")
    columns = {}
    for suffix in ("users", "status"):
        column = row.get(f"{key}.{suffix}")
        if column is None:
            column = [None] * len(values)
        if not isinstance(column, list) or len(column) != len(values):
            raise where.error(f"{key}.{suffix}", f"expected a list of {len(values)} entries, one per response")
        columns[suffix] = column
    rows = zip(values, columns["users"], columns["status"], strict=True)
    return [_Response(value, _text_or_none(user), status, f"{key}[{number}]")
            for number, (value, user, status) in enumerate(rows)]


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _ranked_options(value: Any, field: str, where: Where) -> list[list[str]]:
    """A ranking response as tie groups of option names, best first."""
    if isinstance(value, list) and value and all(isinstance(option, str) for option in value):
        return [[option] for option in value]
    if not isinstance(value, list) or not value or not all(isinstance(entry, dict) for entry in value):
        raise where.error(field, "expected the ranked options, best first: a list of option names or of "
                                 f"{{value, rank}} objects, got {type(value).__name__}")
    by_rank: dict[int, list[str]] = {}
    for number, entry in enumerate(value):
        option, rank = entry.get("value"), entry.get("rank", number + 1)
        if not isinstance(option, str):
            raise where.error(f"{field}[{number}].value", "expected the name of an option (a string)")
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise where.error(f"{field}[{number}].rank", f"expected an integer rank, got {type(rank).__name__}")
        by_rank.setdefault(rank, []).append(option)
    return [by_rank[rank] for rank in sorted(by_rank)]


class _Reader:
    """Turns one exported record into rlhfkit records (see the module docstring)."""

    def __init__(self, kind: str, question: str, prompt_field: str, options: Mapping[str, str]) -> None:
        self.kind = kind
        self.question = question
        self.prompt_field = prompt_field
        self.options = dict(options)

    def __call__(self, row: dict, where: Where) -> list[Record]:
        nested = isinstance(row.get("fields"), dict)
        fields, prefix = (row["fields"], "fields.") if nested else (row, "")
        if self.prompt_field not in fields:
            raise where.error(prefix + self.prompt_field, "is missing (the prompt; --prompt-field names another field)")
        responses = _responses(row, self.question, where)
        kept = [response for response in responses if response.status in KEPT_STATUSES]
        if not kept:
            raise SkipRow("no submitted response to question " + repr(self.question) if responses else
                          "no response to question " + repr(self.question))
        record_id = row.get("id") if row.get("id") is not None else row.get("_server_id")
        common = {"prompt": fields[self.prompt_field], "id": _text_or_none(record_id)}
        metadata = row.get("metadata") if nested else None
        if isinstance(metadata, dict) and metadata:
            common["meta"] = dict(metadata)
        records: list[Record] = []
        for response in kept:
            labeler = {"labeler": response.user} if response.user is not None else {}
            if self.kind == "demonstrations":
                if not isinstance(response.value, str):
                    raise where.error(response.field, f"expected the text a labeler wrote, got "
                                                      f"{type(response.value).__name__} (is {self.question!r} a "
                                                      "text question?)")
                records.append(where.parse({**common, **labeler, "completion": response.value}, "demonstration"))
                continue
            ranking = self._ranking(fields, prefix, response, where)
            record = where.parse({**common, **labeler, **ranking}, "ranking")
            records.extend(record.to_preferences() if self.kind == "pairs" else [record])
        return records

    def _ranking(self, fields: dict, prefix: str, response: _Response, where: Where) -> dict:
        """``{"completions", "ranking"}`` of one ranking response: the option fields' texts, in field order."""
        groups = _ranked_options(response.value, response.field, where)
        named: dict[str, str] = {}  # field -> option
        for option in (option for group in groups for option in group):
            field = self.options.get(option, option)
            if field in named:
                raise where.error(response.field, f"ranks option {option!r} more than once")
            if field not in fields:
                raise where.error(response.field, f"ranks option {option!r}, which is no field of the record "
                                                  f"(map it to one: --option {option}=FIELD)")
            text = fields[field]
            if not isinstance(text, str) or not text.strip():
                raise where.error(prefix + field, "expected the text of a completion (a non-empty string)")
            named[field] = option
        if len(named) < 2:
            raise where.error(response.field, f"ranks {len(named)} option(s); a ranking needs at least 2")
        order = [field for field in fields if field in named]
        index = {named[field]: position for position, field in enumerate(order)}
        return {"completions": [fields[field] for field in order],
                "ranking": [sorted(index[option] for option in group) for group in groups]}


def read_argilla(path: str | os.PathLike, kind: str, *, question: str, prompt_field: str = "prompt",
                 options: Mapping[str, str] | None = None, split: str | None = None) -> PublicData:
    """Read Argilla's exported records (see the module docstring) as rlhfkit records.

    Args:
        path: ``records.json`` (``to_json``), a folder written by ``rg.Dataset.to_disk`` (its ``records.json``)
            or by ``save_to_disk`` (``to_datasets()``), or a JSON, JSON-lines or Parquet file of records.
        kind: ``"rankings"`` and ``"pairs"`` (every untied chosen/rejected pair of each ranking) from a ranking
            question, ``"demonstrations"`` from a text question.
        question: the name of the question whose responses to read.
        prompt_field: the field that holds the prompt (a string, or a chat of ``{"role", "content"}``).
        options: ranking option -> the field with its text, where the options are not named after the fields.
        split: the split of a saved ``DatasetDict``.

    Raises:
        ValueError: an unknown ``kind``.
        DataError: a row that breaks the format (file, line and field named), or no records at all.
    """
    if kind not in ARGILLA_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(ARGILLA_KINDS)}")
    location = Path(path)
    if location.is_dir() and (location / RECORDS_FILE).is_file():
        location = location / RECORDS_FILE
    source, unit, rows = _rows(location, split)
    data = convert_rows(rows, _Reader(kind, question, prompt_field, options or {}), source=source, unit=unit)
    if not data.records:
        raise DataError(f"holds no {kind} from question {question!r} ({data.rows} records read, skipped: "
                        f"{dict(data.skipped)})", source=source)
    return data
