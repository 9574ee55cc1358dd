"""Data sources beyond files and datasets: a package that holds records registers a reader for its locations.

:func:`~rlhfkit.data.readers.read_records` asks the registered sources first, so training data can come from
anywhere that can name its records with a string (the feedback app's database URL, for one) while ``data/``
imports none of the packages behind them. The feedback store is registered when ``rlhfkit`` is imported
(:mod:`rlhfkit.feedback.source`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SourceRows:
    """A source's raw rows: numbered objects to validate as records, and how error messages place them."""

    source: str  # the source as error messages name it (a database URL without its password)
    unit: str  # what the numbers count: "line", "row" or "record"
    rows: Iterator[tuple[int, Any]]


class DataSource(Protocol):
    """Records that live outside files, named by a location string (a URL)."""

    def owns(self, location: str) -> bool:
        """Whether ``location`` names data of this source (a cheap test of its form: nothing is opened)."""

    def rows(self, location: str, kind: str, split: str | None) -> SourceRows:
        """The raw rows of the records of ``kind`` (a record kind) at ``location``; a
        :class:`~rlhfkit.data.records.DataError` when there are none to read."""


_SOURCES: list[DataSource] = []


def register_source(source: DataSource) -> None:
    """Make ``read_records`` read the locations ``source`` owns (registering the same source twice is harmless)."""
    if source not in _SOURCES:
        _SOURCES.append(source)


def source_of(location: Any) -> DataSource | None:
    """The registered source that owns ``location``, if any (paths and ``hf:`` names are read by ``readers``)."""
    if not isinstance(location, str):
        return None
    return next((source for source in _SOURCES if source.owns(location)), None)
