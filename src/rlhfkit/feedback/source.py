"""The feedback app's database as a data source: trainers read its URL as they read ``rlhfkit export``'s files.

``data.train: sqlite:///feedback.db`` (or ``postgresql+psycopg://...``) reads the labelers' answers so far, as
:meth:`~rlhfkit.feedback.store.Store.export` writes them: demonstrations, rankings, or the rankings' preference
pairs. Registered with :func:`rlhfkit.data.sources.register_source` when ``rlhfkit`` is imported; SQLAlchemy is
imported only when such a URL is read.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.data.readers import DataFileNotFoundError
from rlhfkit.data.records import DataError
from rlhfkit.data.sources import SourceRows

# record kind -> what the store exports for it
EXPORTS = {"demonstration": "demonstrations", "ranking": "rankings", "preference": "pairs-from-rankings"}
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")


def is_database_url(location: str) -> bool:
    """Whether ``location`` is a SQLAlchemy URL of a feedback database (``sqlite:///f.db``, ``postgresql+psycopg://``)."""
    if not isinstance(location, str) or "://" not in location:
        return False
    return location.split("://", 1)[0].split("+", 1)[0].lower() in DATABASE_SCHEMES


class FeedbackStoreSource:
    """The labelers' answers in a feedback database, read as records (see the module docstring)."""

    def owns(self, location: str) -> bool:
        return is_database_url(location)

    def rows(self, location: str, kind: str, split: str | None) -> SourceRows:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import SQLAlchemyError

        from rlhfkit.feedback.store import Store

        parsed = make_url(location)
        source = parsed.render_as_string(hide_password=True)
        if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
            raise DataFileNotFoundError("no such database file", source=source)
        if kind not in EXPORTS:
            raise DataError(f"a feedback database holds {', '.join(EXPORTS)} records, not {kind} records",
                            source=source)
        if split is not None:
            raise DataError(f"is a feedback database without splits; split {split!r} cannot apply", source=source)
        store = Store(location, migrate=False)
        try:
            rows = list(store.export(EXPORTS[kind]))
        except SQLAlchemyError as error:
            raise DataError(f"cannot read the feedback database: {getattr(error, 'orig', None) or error}",
                            source=source) from None
        finally:
            store.close()
        return SourceRows(source, "record", enumerate(rows, start=1))


FEEDBACK_STORE = FeedbackStoreSource()
