"""The feedback app's database: users, items, assignments and answers (SQLAlchemy 2 + Alembic).

This is the only module of the app that speaks SQL. :class:`Store` opens any SQLAlchemy URL: an embedded
SQLite file by default (WAL journal, foreign keys on, a busy timeout, write transactions that take the
write lock up front with ``BEGIN IMMEDIATE``), PostgreSQL for teams (``postgresql+psycopg://...``). It is
safe to share one :class:`Store` between threads: every method opens its own session, and returns frozen
dataclasses (:class:`User`, :class:`Item`, :class:`Answer`), never ORM objects.

Every item belongs to a project (:class:`Project`: its instructions to labelers, rating scale and flags; the
project named ``default``, with 1-7 and InstructGPT's three flags, holds the items imported without one).
Queues, answers' validation, progress, exports, the answers to review, labelers' statistics, agreement and open
assignments can each be narrowed to one project.

Items are of three kinds: ``demonstration`` (write a completion for a prompt), ``ranking`` (rate, flag and
rank K >= 2 completions) and ``ab`` (judge two completions). Each item needs ``replicas`` labelers; a
labeler asks :meth:`Store.next_item` for work, which assigns them an item, and answers it with
:meth:`Store.submit` or :meth:`Store.skip` (each one transaction; the same answer sent twice is stored
once, a different second answer is an :class:`AnswerConflict`). An assignment left unanswered expires
after the caller's time limit, or an admin releases it (:meth:`Store.release_assignments`), and the item
goes to another labeler.

Ranking items show their outputs in an order shuffled per labeler and item (:func:`shown_order`, the same
on every reload); answers are always in the item's own indices and keep the order shown beside them.

A labeler may change their answer (:meth:`Store.edit`) until an admin reviews it
(:meth:`Store.review`: accepted or rejected; a rejected answer no longer counts, so the item goes back to
the queue). Every version is kept (:meth:`Store.history`); exports use the latest. The app's login
sessions live here too, so logging out or changing the password ends them on the server, and so do the
scripts' API tokens (:meth:`Store.create_token`; only their SHA-256 is stored). An admin deactivates an
account (:meth:`Store.set_active`): its sessions end, its open assignments are released and its tokens are
refused until it is reactivated.
:meth:`Store.export` writes the answers as the records rlhfkit's trainers read.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import statistics
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    cast,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from rlhfkit.data.records import DataError, RankingRecord, parse_record
from rlhfkit.feedback import agreement as agree
from rlhfkit.feedback.common import (
    DEFAULT_PROJECT,
    EXPORT_KINDS,
    FLAGS,
    RATING_RANGE,
    ROLES,
    StoreError,
    check_flags,
    check_instructions,
    check_project_name,
    check_rating_scale,
    export_kind,
)

ITEM_KINDS = ("demonstration", "ranking", "ab")
VERDICTS = ("a", "b", "tie")
SUBMITTED, ACCEPTED, REJECTED = "submitted", "accepted", "rejected"  # an answer's review status
REVIEW_VERDICTS = (ACCEPTED, REJECTED)
MAX_COMPLETION_CHARS = 100_000  # a written demonstration
MAX_REASON_CHARS = 10_000  # a skip's reason
MAX_TOKEN_NAME_CHARS = 64
TOKEN_PREFIX = "rlhfkit_"  # API tokens start with it, so a leaked one is easy to recognise
SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).parent / "migrations"
_POSTGRES_MIGRATION_LOCK = 0x726C6866  # pg_advisory_xact_lock key: one migrating process at a time


class NotAssigned(PermissionError):
    """A labeler touched an item that is not assigned to them."""


class AnswerConflict(Exception):
    """The answer cannot be written as asked: ``answer`` is the one that stays (the app answers 409)."""

    def __init__(self, message: str, answer: Answer) -> None:
        super().__init__(message)
        self.message = message
        self.answer = answer


# ---------------------------------------------------------------------------------------------- models


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """The declarative base of the feedback tables."""


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("username", name="uq_users_username"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ProjectRow(Base):
    """A labeling project: its items share instructions, a rating scale and flags, a queue and exports."""

    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("name", name="uq_projects_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    instructions: Mapped[str] = mapped_column(Text)
    rating_min: Mapped[int] = mapped_column(Integer)
    rating_max: Mapped[int] = mapped_column(Integer)
    flags: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ItemRow(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", name="fk_items_project_id_projects"),
                                            index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    source_id: Mapped[str | None] = mapped_column(String(255))  # the "id" of the imported record
    prompt: Mapped[Any] = mapped_column(JSON)
    completions: Mapped[list] = mapped_column(JSON)
    replicas: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column(JSON)
    gold: Mapped[list | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AssignmentRow(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("user_id", "item_id", name="uq_assignments_user_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)  # expiry


class AnswerRow(Base):
    """A labeler's answer to an item: its latest version (every version is in ``answer_versions``)."""

    __tablename__ = "answers"
    __table_args__ = (UniqueConstraint("user_id", "item_id", name="uq_answers_user_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    shown_order: Mapped[list | None] = mapped_column(JSON)  # a ranking's item indices in the order shown
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    status: Mapped[str] = mapped_column(String(16), default=SUBMITTED, server_default=SUBMITTED)
    reviewed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL",
                                                               name="fk_answers_reviewed_by_users"))
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AnswerVersionRow(Base):
    """One version of an answer, as the labeler gave it (the audit trail)."""

    __tablename__ = "answer_versions"
    __table_args__ = (UniqueConstraint("answer_id", "version", name="uq_answer_versions_answer_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    answer_id: Mapped[int] = mapped_column(ForeignKey("answers.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[dict] = mapped_column(JSON)
    skipped: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class SessionRow(Base):
    """A logged-in session; the cookie holds the token, the table only its SHA-256 (a leak logs nobody in)."""

    __tablename__ = "sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiTokenRow(Base):
    """A named API token for scripts (``Authorization: Bearer ...``); only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(MAX_TOKEN_NAME_CHARS))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# ------------------------------------------------------------------------------------- returned values


@dataclass(frozen=True)
class User:
    """A labeler or admin account."""

    id: int
    username: str
    role: str
    password_hash: str
    active: bool


@dataclass(frozen=True)
class Project:
    """A labeling project: the instructions shown on every task, the rating scale and the flags of its outputs."""

    id: int
    name: str
    instructions: str
    rating_scale: tuple[int, int]  # (lowest, highest), both allowed
    flags: tuple[str, ...]
    created_at: datetime

    @property
    def ratings(self) -> range:
        """Every rating of the scale, lowest first."""
        return range(self.rating_scale[0], self.rating_scale[1] + 1)


@dataclass(frozen=True)
class Item:
    """One unit of work: a prompt to answer, K completions to rank, or an A/B pair to judge."""

    id: int
    kind: str
    prompt: str | list[dict]
    completions: list[str]  # [] for demonstration, K >= 2 for ranking, 2 for ab
    replicas: int
    meta: dict
    gold: list[list[int]] | None  # the gold ranking (groups best first) when given
    project_id: int


@dataclass(frozen=True)
class Answer:
    """One labeler's answer to one item, its latest version (``skipped`` answers hold ``{"reason": ...}``).

    ``shown_order``: a ranking item's completion indices in the order the labeler saw them (else None);
    ``status``: ``submitted``, ``accepted`` or ``rejected`` (by an admin's review).
    """

    id: int
    item_id: int
    user_id: int
    payload: dict
    skipped: bool
    created_at: datetime
    shown_order: list[int] | None
    version: int
    status: str


@dataclass(frozen=True)
class AnswerVersion:
    """One version of an answer, oldest first in :meth:`Store.history`."""

    version: int
    payload: dict
    skipped: bool
    created_at: datetime


@dataclass(frozen=True)
class ApiToken:
    """An API token as listed: never its secret, which is shown once, when it is made."""

    id: int
    user_id: int
    username: str
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _api_token(row: ApiTokenRow, username: str) -> ApiToken:
    return ApiToken(row.id, row.user_id, username, row.name, _utc(row.created_at),
                    _utc(row.revoked_at) if row.revoked_at else None)


def _user(row: UserRow) -> User:
    return User(row.id, row.username, row.role, row.password_hash, row.active)


def _item(row: ItemRow) -> Item:
    return Item(row.id, row.kind, row.prompt, list(row.completions), row.replicas, dict(row.meta), row.gold,
                row.project_id)


def _project(row: ProjectRow) -> Project:
    return Project(row.id, row.name, row.instructions, (row.rating_min, row.rating_max), tuple(row.flags),
                   _utc(row.created_at))


def _utc(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; every stored datetime is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _timestamp(moment: datetime | None) -> str | None:
    """An exported time: ISO 8601 in UTC (``2026-12-07T09:30:00.123456+00:00``), None when unknown."""
    return _utc(moment).isoformat() if moment is not None else None


def export_meta(imported: dict, labeling: dict) -> dict:
    """An export record's ``meta``: the ``meta`` given at import and the fields of the labeling (``labeling``).

    A labeling field wins a name it shares with the import's meta; the import's meta is then also kept whole
    under ``import_meta``, so nothing given at import is lost.
    """
    meta = {**imported, **labeling}
    if any(key in imported for key in labeling):
        meta["import_meta"] = dict(imported)
    return meta


def _answer(row: AnswerRow) -> Answer:
    return Answer(row.id, row.item_id, row.user_id, row.payload, row.skipped, _utc(row.created_at),
                  row.shown_order, row.version, row.status)


def shown_order(user_id: int, item_id: int, k: int) -> list[int]:
    """The order in which labeler ``user_id`` sees item ``item_id``'s ``k`` outputs: a shuffle of
    ``range(k)`` that is the same on every call for this labeler and item (so a reload shows the same
    page) and differs between labelers (so no output gains from always being shown first)."""
    seed = hashlib.sha256(f"rlhfkit shown order {user_id} {item_id}".encode()).digest()
    order = list(range(k))
    random.Random(seed).shuffle(order)
    return order


def contradictions(ratings: list[int], ranking: list[list[int]]) -> list[tuple[int, int]]:
    """Pairs ``(better_rated, worse_rated)`` of completion indices that the ranking puts the other way round.

    A ranking contradicts the ratings where an output rated higher is ranked below one rated lower; the
    app warns about it but accepts it (the labeler may have seen something the 1-7 scale misses).
    """
    place = {index: position for position, group in enumerate(ranking) for index in group}
    return [(high, low) for high in place for low in place
            if ratings[high] > ratings[low] and place[high] > place[low]]


# ------------------------------------------------------------------------------------------ validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: error messages never echo a whole (possibly huge) input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _ImportChecker:
    """Validates one imported record, raising :class:`DataError` at its source, record number and field."""

    def __init__(self, obj: Any, source: str, number: int) -> None:
        self.obj = obj
        self.source = source
        self.number = number

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(message, source=self.source, line=self.number, field=field, unit="record")

    def base(self) -> tuple[Any, str | None, dict]:
        """The prompt, id and meta of the record (through rlhfkit's prompt record validation)."""
        if not isinstance(self.obj, dict):
            raise self.error(None, f"expected an object, got {_type_name(self.obj)}")
        fields = {key: self.obj.get(key) for key in ("prompt", "id", "meta")}
        record = parse_record(fields, "prompt", source=self.source, line=self.number, unit="record")
        return record.prompt, record.id, dict(record.meta or {})

    def completions(self, exactly: int | None = None) -> list[str]:
        """The non-empty completion strings, at least two (``exactly`` of them when given)."""
        value = self.obj.get("completions")
        if value is None:
            raise self.error("completions", "is missing" if "completions" not in self.obj else "is null")
        if not isinstance(value, list):
            raise self.error("completions", f"expected a list of strings, got {_type_name(value)}")
        if exactly is not None and len(value) != exactly:
            raise self.error("completions", f"needs exactly {exactly} completions, got {len(value)}")
        if len(value) < 2:
            raise self.error("completions", f"needs at least 2 completions, got {len(value)}")
        for position, text in enumerate(value):
            if not isinstance(text, str):
                raise self.error(f"completions[{position}]", f"expected a string, got {_type_name(text)}")
            if not text.strip():
                raise self.error(f"completions[{position}]", "is empty")
        return list(value)

    def gold(self, completions: list[str]) -> list[list[int]] | None:
        """The optional gold ranking of the completions, as tie groups best first."""
        value = self.obj.get("gold")
        if value is None:
            return None
        try:
            groups = _ranking_groups(value, completions, "gold")
        except StoreError as error:
            raise self.error(error.field, error.message) from None
        return groups


def _records(records: Iterable[Any], source: str, build) -> list[ItemRow]:
    """Validate every record with ``build(checker) -> ItemRow`` before anything is written."""
    return [build(_ImportChecker(obj, source, number)) for number, obj in enumerate(records, start=1)]


def _ranking_groups(value: Any, completions: list[str], field: str) -> list[list[int]]:
    """Tie groups best first covering every completion index once; a bare index is a group of one.

    Identical completions must share a group (trainers reject a ranking that separates them), and at
    least two groups are needed (a ranking that ties everything prefers nothing).
    """
    k = len(completions)
    if not isinstance(value, list):
        raise StoreError(f"expected a list of tie groups, best first, got {_type_name(value)}", field=field)
    groups = [entry if isinstance(entry, list) else [entry] for entry in value]
    seen: set[int] = set()
    for group in groups:
        if not group:
            raise StoreError("has an empty tie group", field=field)
        for index in group:
            if not _is_int(index):
                raise StoreError(f"index {_shown(index)} is not an integer", field=field)
            if not 0 <= index < k:
                raise StoreError(f"index {index} is out of range for {k} completions", field=field)
            if index in seen:
                raise StoreError(f"index {index} appears more than once", field=field)
            seen.add(index)
    if len(seen) != k:
        missing = sorted(set(range(k)) - seen)
        raise StoreError(f"does not rank completions {missing}", field=field)
    if len(groups) < 2:
        raise StoreError("ties every completion, so it prefers none", field=field)
    group_of = {index: position for position, group in enumerate(groups) for index in group}
    first_seen: dict[str, int] = {}
    for index, text in enumerate(completions):
        twin = first_seen.setdefault(text, index)
        if group_of[twin] != group_of[index]:
            raise StoreError(f"completions {twin} and {index} are identical but ranked apart (tie them)", field=field)
    return [sorted(group) for group in groups]


def validate_answer(item: ItemRow | Item, payload: Any, project: Project) -> dict:
    """The normalised payload of an answer to ``item`` (of ``project``: a ranking's ratings are on its scale, its
    flags among the project's), or :class:`StoreError` naming the bad field."""
    if not isinstance(payload, dict):
        raise StoreError(f"expected an object, got {_type_name(payload)}", field="payload")
    if item.kind == "demonstration":
        completion = payload.get("completion")
        if not isinstance(completion, str):
            raise StoreError(f"expected a string, got {_type_name(completion)}", field="completion")
        if not completion.strip():
            raise StoreError("is empty", field="completion")
        if len(completion) > MAX_COMPLETION_CHARS:
            raise StoreError(f"is longer than {MAX_COMPLETION_CHARS} characters", field="completion")
        return {"completion": completion}
    if item.kind == "ab":
        verdict = payload.get("verdict")
        if verdict not in VERDICTS:
            raise StoreError(f"expected one of {VERDICTS}, got {_shown(verdict)}", field="verdict")
        return {"verdict": verdict}
    k = len(item.completions)
    ratings = payload.get("ratings")
    if not isinstance(ratings, list) or len(ratings) != k:
        raise StoreError(f"expected a list of {k} ratings, got {_shown(ratings)}", field="ratings")
    low, high = project.rating_scale
    for position, rating in enumerate(ratings):
        if not _is_int(rating) or not low <= rating <= high:
            raise StoreError(f"expected an integer from {low} to {high}, got {_shown(rating)}",
                             field=f"ratings[{position}]")
    flags = payload.get("flags")
    if not isinstance(flags, list) or len(flags) != k:
        raise StoreError(f"expected a list of {k} lists of flags, got {_shown(flags)}", field="flags")
    for position, chosen in enumerate(flags):
        if not isinstance(chosen, list) or any(flag not in project.flags for flag in chosen):
            raise StoreError(f"expected a list of flags from {project.flags}, got {_shown(chosen)}",
                             field=f"flags[{position}]")
        if len(set(chosen)) != len(chosen):
            raise StoreError("repeats a flag", field=f"flags[{position}]")
    ranking = _ranking_groups(payload.get("ranking"), item.completions, "ranking")
    return {"ratings": list(ratings), "flags": [list(chosen) for chosen in flags], "ranking": ranking}


def _skip_payload(reason: Any) -> dict:
    if not isinstance(reason, str) or not reason.strip():
        raise StoreError("is empty", field="reason")
    if len(reason) > MAX_REASON_CHARS:
        raise StoreError(f"is longer than {MAX_REASON_CHARS} characters", field="reason")
    return {"reason": reason}


def _same_or_conflict(existing: Answer, payload: dict, skipped: bool) -> Answer:
    """The stored answer when the new one is the same (a double submit); else :class:`AnswerConflict`."""
    if existing.payload == payload and existing.skipped == skipped:
        return existing
    what = "skipped" if existing.skipped else "answered"
    raise AnswerConflict(f"you already {what} this item differently; change your answer instead", existing)


def _like_escape(text: str) -> str:
    """``text`` as a literal inside a LIKE pattern (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _name_taken(name: str) -> str:
    """The error message for a project name in use."""
    return f"a project named {name!r} exists already"


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _answer_ranking(item: ItemRow, payload: dict) -> list[list[int]]:
    """A ranking or A/B answer as a ranking of the item's completions."""
    return payload["ranking"] if item.kind == "ranking" else agree.verdict_ranking(payload["verdict"])


# ------------------------------------------------------------------------------------------- the store


def _configure_sqlite(engine: Engine) -> None:
    """WAL journal, foreign keys and a busy timeout on every connection; BEGIN (IMMEDIATE) issued by us.

    pysqlite's own transaction handling is turned off so that SQLAlchemy's transactions are real SQLite
    transactions; connections from :attr:`Store._writer` begin with ``BEGIN IMMEDIATE``, which takes the
    write lock before the first read, so a read-then-write transaction never fails on a stale snapshot.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}", "journal_mode=WAL", "foreign_keys=ON",
                       "synchronous=FULL"):  # FULL: a commit survives a power cut too, not only a crash
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        immediate = connection.get_execution_options().get("rlhfkit_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _create_engine(url: str) -> Engine:
    """An engine for ``url``, set up for many threads (SQLite: WAL, shared pool, no same-thread check)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    memory = url in ("sqlite://", "sqlite:///:memory:")
    if memory:  # one shared connection: fine for tests, no concurrency
        engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    else:
        engine = create_engine(url, connect_args={"check_same_thread": False}, pool_size=10, max_overflow=20)
    _configure_sqlite(engine)
    return engine


def upgrade_database(engine: Engine) -> None:
    """Bring the database to the newest Alembic revision (one transaction; concurrent callers wait).

    On SQLite the foreign keys are off while it runs, as SQLite asks for schema changes that rebuild a table
    (with them on, dropping the old copy of ``items`` would delete every answer through ``ON DELETE CASCADE``);
    they are checked before the transaction commits.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.execution_options(rlhfkit_write=True).connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # outside any transaction: SQLite ignores the pragma inside one
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_POSTGRES_MIGRATION_LOCK})")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the migration left rows whose foreign keys point nowhere; nothing changed")
        finally:
            if sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


class Store:
    """The feedback database: one per process, shared by all threads.

    Args:
        url: a SQLAlchemy URL, ``sqlite:///feedback.db`` by default; ``postgresql+psycopg://...`` for
            PostgreSQL. ``sqlite://`` is an in-memory database for single-threaded use (tests).
        migrate: run the Alembic migrations up to the newest revision first.
    """

    def __init__(self, url: str = "sqlite:///feedback.db", *, migrate: bool = True) -> None:
        self.url = url
        self.engine = _create_engine(url)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(rlhfkit_write=True), expire_on_commit=False)
        if migrate:
            upgrade_database(self.engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # ------------------------------------------------------------------------------------------ users

    def create_user(self, username: str, password_hash: str, role: str = "labeler") -> User:
        """Create an account; :class:`StoreError` when the name is taken or malformed or the role unknown."""
        if not isinstance(username, str) or not username.strip() or username != username.strip():
            raise StoreError("must be non-empty, without leading or trailing spaces", field="username")
        if len(username) > 64:
            raise StoreError("is longer than 64 characters", field="username")
        if role not in ROLES:
            raise StoreError(f"unknown role {_shown(role)}; expected one of {ROLES}", field="role")
        if not isinstance(password_hash, str) or not password_hash:
            raise StoreError("is empty", field="password_hash")
        with self._writer() as session:
            if session.scalar(select(UserRow.id).where(UserRow.username == username)) is not None:
                raise StoreError(f"{username!r} is taken", field="username")
            row = UserRow(username=username, password_hash=password_hash, role=role, active=True)
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                raise StoreError(f"{username!r} is taken", field="username") from None
            return _user(row)

    def user(self, user_id: int) -> User | None:
        """The user with this id, or None."""
        with self._reader() as session:
            row = session.get(UserRow, user_id)
            return _user(row) if row else None

    def user_by_name(self, username: str) -> User | None:
        """The user with this name, or None."""
        with self._reader() as session:
            row = session.scalar(select(UserRow).where(UserRow.username == username))
            return _user(row) if row else None

    def users(self) -> list[User]:
        """Every user, in creation order."""
        with self._reader() as session:
            return [_user(row) for row in session.scalars(select(UserRow).order_by(UserRow.id))]

    def set_active(self, user_id: int, active: bool) -> User:
        """Deactivate (``active=False``) or reactivate an account, in one transaction.

        A deactivated account cannot log in, its sessions end and its open (unanswered) assignments are
        released, so their items go to other labelers; its answers stay, and its API tokens are refused
        until it is reactivated. :class:`StoreError` for an unknown user.
        """
        with self._writer() as session:
            row = session.scalar(select(UserRow).where(UserRow.id == user_id).with_for_update())
            if row is None:
                raise StoreError(f"no user with id {user_id}", field="user_id")
            row.active = bool(active)
            if not active:
                session.execute(delete(SessionRow).where(SessionRow.user_id == user_id))
                session.execute(self._release(user_id, None, None))
            session.commit()
            return _user(row)

    # --------------------------------------------------------------------------------------- projects

    def create_project(self, name: str, *, instructions: str = "", rating_scale: tuple[int, int] = RATING_RANGE,
                       flags: Sequence[str] = FLAGS) -> Project:
        """A new project (by default with today's 1-7 scale and InstructGPT's three flags); :class:`StoreError`
        naming the field for a taken or malformed name, a bad scale (5-1, 0-0) or bad flag names."""
        row = ProjectRow(name=check_project_name(name), instructions=check_instructions(instructions),
                         flags=list(check_flags(flags)))
        row.rating_min, row.rating_max = check_rating_scale(rating_scale)
        with self._writer() as session:
            if session.scalar(select(ProjectRow.id).where(ProjectRow.name == name)) is not None:
                raise StoreError(_name_taken(name), field="name")
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                raise StoreError(_name_taken(name), field="name") from None
            return _project(row)

    def update_project(self, project_id: int, *, name: str | None = None, instructions: str | None = None,
                       rating_scale: tuple[int, int] | None = None, flags: Sequence[str] | None = None) -> Project:
        """Rename a project or change its instructions, rating scale or flags (those given), in one transaction.

        A new name must be free; the default project keeps its name (items imported without a project go into the
        project of that name). A new scale must still hold every rating of the project's answers and new flags
        every flag they use, so no answer becomes invalid. :class:`StoreError` naming the field otherwise, or for
        an unknown project.
        """
        new_name = None if name is None else check_project_name(name)
        new_flags = None if flags is None else check_flags(flags)
        new_scale = None if rating_scale is None else check_rating_scale(rating_scale)
        new_instructions = None if instructions is None else check_instructions(instructions)
        with self._writer() as session:
            row = session.scalar(select(ProjectRow).where(ProjectRow.id == project_id).with_for_update())
            if row is None:
                raise StoreError(f"no project with id {project_id}", field="project")
            if new_name is not None and new_name != row.name:
                self._check_rename(session, row, new_name)
                row.name = new_name
            if new_scale is not None or new_flags is not None:
                self._check_answers_fit(session, row, new_scale, new_flags)
            if new_instructions is not None:
                row.instructions = new_instructions
            if new_scale is not None:
                row.rating_min, row.rating_max = new_scale
            if new_flags is not None:
                row.flags = list(new_flags)
            try:
                session.commit()
            except IntegrityError:  # a concurrent create or rename took the name
                raise StoreError(_name_taken(new_name), field="name") from None
            return _project(row)

    @staticmethod
    def _check_rename(session: Session, project: ProjectRow, name: str) -> None:
        """:class:`StoreError` when ``project`` cannot be renamed ``name``: it is the default project, or another
        project has that name."""
        if project.name == DEFAULT_PROJECT:
            raise StoreError(f"the project {DEFAULT_PROJECT!r} keeps its name: items imported without a project go "
                             "into it", field="name")
        if session.scalar(select(ProjectRow.id).where(ProjectRow.name == name)) is not None:
            raise StoreError(_name_taken(name), field="name")

    @staticmethod
    def _check_answers_fit(session: Session, project: ProjectRow, scale: tuple[int, int] | None,
                           flags: tuple[str, ...] | None) -> None:
        """:class:`StoreError` when the project's ranking answers (latest versions) have a rating outside
        ``scale`` or a flag not in ``flags`` (each when given)."""
        payloads = session.scalars(select(AnswerRow.payload).join(ItemRow, ItemRow.id == AnswerRow.item_id)
                                   .where(ItemRow.project_id == project.id, ItemRow.kind == "ranking",
                                          AnswerRow.skipped.is_(False)))
        ratings: set[int] = set()
        used: set[str] = set()
        for payload in payloads:
            ratings.update(payload["ratings"])
            used.update(flag for chosen in payload["flags"] for flag in chosen)
        if scale is not None:
            outside = sorted(rating for rating in ratings if not scale[0] <= rating <= scale[1])
            if outside:
                raise StoreError(f"answers in project {project.name!r} already give ratings {outside}, outside "
                                 f"{scale[0]}-{scale[1]}", field="rating_scale")
        if flags is not None:
            dropped = sorted(used - set(flags))
            if dropped:
                raise StoreError(f"answers in project {project.name!r} already use the flags {dropped}; keep them",
                                 field="flags")

    def project(self, project_id: int) -> Project | None:
        """The project with this id, or None."""
        with self._reader() as session:
            row = session.get(ProjectRow, project_id)
            return _project(row) if row else None

    def project_by_name(self, name: str) -> Project | None:
        """The project with this name, or None."""
        with self._reader() as session:
            row = session.scalar(select(ProjectRow).where(ProjectRow.name == name))
            return _project(row) if row else None

    def projects(self) -> list[Project]:
        """Every project, in creation order (the default project first)."""
        with self._reader() as session:
            return [_project(row) for row in session.scalars(select(ProjectRow).order_by(ProjectRow.id))]

    def _check_project(self, project_id: int | None) -> None:
        """:class:`StoreError` when ``project_id`` is given and names no project."""
        if project_id is not None and self.project(project_id) is None:
            raise StoreError(f"no project with id {project_id}", field="project")

    @staticmethod
    def _project_id(session: Session, project_id: int | None) -> int:
        """``project_id`` when it names a project, the default project's id when None; else :class:`StoreError`."""
        query = select(ProjectRow.id).where(ProjectRow.name == DEFAULT_PROJECT if project_id is None
                                            else ProjectRow.id == project_id)
        found = session.scalar(query)
        if found is None:
            raise StoreError(f"no project {DEFAULT_PROJECT!r}" if project_id is None
                             else f"no project with id {project_id}", field="project")
        return found

    # ----------------------------------------------------------------------------------------- import

    def _import(self, rows: list[ItemRow], project_id: int | None) -> int:
        with self._writer() as session:
            project = self._project_id(session, project_id)
            for row in rows:
                row.project_id = project
            session.add_all(rows)
            session.commit()
        return len(rows)

    @staticmethod
    def _check_replicas(replicas: int) -> None:
        if not _is_int(replicas) or replicas < 1:
            raise StoreError(f"must be a positive integer, got {_shown(replicas)}", field="replicas")

    def import_prompts(self, records: Iterable[dict], *, replicas: int = 1, source: str = "<records>",
                       project_id: int | None = None) -> int:
        """Add ``{"prompt", "id"?, "meta"?}`` records as demonstration items; all or nothing.

        The items go into project ``project_id`` (the default project when None; :class:`StoreError` for an
        unknown one). Returns the number of items created. A bad record raises :class:`DataError` naming
        ``source``, the record's number (from 1) and the field, and nothing is written.
        """
        self._check_replicas(replicas)

        def build(check: _ImportChecker) -> ItemRow:
            prompt, source_id, meta = check.base()
            return ItemRow(kind="demonstration", source_id=source_id, prompt=prompt, completions=[],
                           replicas=replicas, meta=meta, gold=None)

        return self._import(_records(records, source, build), project_id)

    def import_samples(self, records: Iterable[dict], *, replicas: int = 1, source: str = "<records>",
                       project_id: int | None = None) -> int:
        """Add ``{"prompt", "completions": [>= 2], "id"?, "meta"?, "gold"?}`` records as ranking items.

        ``gold`` is an optional gold ranking (tie groups best first) to measure labelers against. All or
        nothing, as :meth:`import_prompts`.
        """
        self._check_replicas(replicas)

        def build(check: _ImportChecker) -> ItemRow:
            prompt, source_id, meta = check.base()
            completions = check.completions()
            return ItemRow(kind="ranking", source_id=source_id, prompt=prompt, completions=completions,
                           replicas=replicas, meta=meta, gold=check.gold(completions))

        return self._import(_records(records, source, build), project_id)

    def import_pairs(self, records: Iterable[dict], *, replicas: int = 1, source: str = "<records>",
                     project_id: int | None = None) -> int:
        """Add ``{"prompt", "completions": [a, b], "id"?, "meta"?}`` records as A/B items.

        ``meta.models`` (the two models' names, in display order) is exported with the verdicts. All or
        nothing, as :meth:`import_prompts`.
        """
        self._check_replicas(replicas)

        def build(check: _ImportChecker) -> ItemRow:
            prompt, source_id, meta = check.base()
            return ItemRow(kind="ab", source_id=source_id, prompt=prompt, completions=check.completions(exactly=2),
                           replicas=replicas, meta=meta, gold=None)

        return self._import(_records(records, source, build), project_id)

    # ------------------------------------------------------------------------------------------ queue

    def next_item(self, user_id: int, kind: str | None = None, *, project_id: int | None = None,
                  assignment_ttl: timedelta | None = None) -> Item | None:
        """The user's open assignment (of ``kind`` and in project ``project_id`` when given); else a newly
        assigned item (the same filters); else None. :class:`StoreError` for an unknown kind or project.

        A new assignment is the oldest item the user has neither answered nor skipped whose answers plus
        the open assignments of other labelers are fewer than its replicas. Skipped and rejected answers
        do not count towards the replicas. Concurrent calls never assign an item beyond its replicas.
        With ``assignment_ttl``, open assignments older than that are released first, so an item opened
        and abandoned goes to the next labeler who asks.
        """
        if kind is not None and kind not in ITEM_KINDS:
            raise StoreError(f"unknown kind {_shown(kind)}; expected one of {ITEM_KINDS}", field="kind")
        self._check_project(project_id)
        expired_before = _now() - assignment_ttl if assignment_ttl is not None else None
        open_query = self._open_assignment(user_id, kind, project_id, expired_before)
        with self._reader() as session:  # the common case, without waiting for the write lock
            row = session.scalars(open_query).first()
            if row is not None:
                return _item(row)
        with self._writer() as session:
            if session.scalar(select(UserRow.id).where(UserRow.id == user_id).with_for_update()) is None:
                raise StoreError(f"no user with id {user_id}", field="user_id")
            if expired_before is not None:
                session.execute(delete(AssignmentRow).where(AssignmentRow.created_at < expired_before,
                                                            ~self._assignment_answered().exists()))
            row = session.scalars(open_query).first()  # assigned by a concurrent call meanwhile
            if row is not None:
                return _item(row)
            after = 0
            while candidates := session.scalars(self._candidates(user_id, kind, project_id, after)).all():
                for candidate in candidates:  # lock, then count again: another labeler may have taken it
                    locked = session.scalar(select(ItemRow).where(ItemRow.id == candidate).with_for_update())
                    if self._taken(session, candidate) < locked.replicas:
                        session.add(AssignmentRow(user_id=user_id, item_id=candidate))
                        session.commit()
                        return _item(locked)
                after = candidates[-1]
            return None

    @staticmethod
    def _assignment_answered():
        """The answer to an assignment (a correlated subquery: use ``.exists()``)."""
        return select(AnswerRow.id).where(AnswerRow.user_id == AssignmentRow.user_id,
                                          AnswerRow.item_id == AssignmentRow.item_id)

    @staticmethod
    def _counted_answer():
        """Answers that count towards an item's replicas: neither skipped nor rejected."""
        return (AnswerRow.skipped.is_(False)) & (AnswerRow.status != REJECTED)

    @staticmethod
    def _of_kind_and_project(query, kind: str | None, project_id: int | None):
        """``query`` (over items) narrowed to items of ``kind`` and of project ``project_id``, each when given."""
        if kind is not None:
            query = query.where(ItemRow.kind == kind)
        if project_id is not None:
            query = query.where(ItemRow.project_id == project_id)
        return query

    @staticmethod
    def _of_project(query, item_id, project_id: int | None):
        """``query`` (over answers or assignments, whose item is ``item_id``) narrowed to the items of project
        ``project_id`` when given (a subquery: no join needed, so it works in a DELETE too)."""
        if project_id is None:
            return query
        return query.where(item_id.in_(select(ItemRow.id).where(ItemRow.project_id == project_id)))

    def _open_assignment(self, user_id: int, kind: str | None, project_id: int | None,
                         expired_before: datetime | None):
        """The item of the user's oldest open (unanswered, unexpired) assignment, of ``kind`` and in project
        ``project_id`` when given."""
        query = (select(ItemRow).join(AssignmentRow, AssignmentRow.item_id == ItemRow.id)
                 .where(AssignmentRow.user_id == user_id, ~self._assignment_answered().exists()))
        query = self._of_kind_and_project(query, kind, project_id)
        if expired_before is not None:
            query = query.where(AssignmentRow.created_at >= expired_before)
        return query.order_by(AssignmentRow.id).limit(1)

    def _taken(self, session: Session, item_id: int) -> int:
        """Counted answers to the item plus its open (unanswered) assignments."""
        answers = session.scalar(select(func.count()).select_from(AnswerRow)
                                 .where(AnswerRow.item_id == item_id, self._counted_answer()))
        open_assignments = session.scalar(select(func.count()).select_from(AssignmentRow)
                                          .where(AssignmentRow.item_id == item_id,
                                                 ~self._assignment_answered().exists()))
        return answers + open_assignments

    def _candidates(self, user_id: int, kind: str | None, project_id: int | None, after: int, limit: int = 50):
        """Ids (above ``after``) of the oldest items (of ``kind``, in ``project_id``, when given) the user has no
        assignment for that seem to need answers."""
        answers = (select(func.count()).select_from(AnswerRow)
                   .where(AnswerRow.item_id == ItemRow.id, self._counted_answer()).scalar_subquery())
        open_assignments = (select(func.count()).select_from(AssignmentRow)
                            .where(AssignmentRow.item_id == ItemRow.id, ~self._assignment_answered().exists())
                            .scalar_subquery())
        mine = select(AssignmentRow.id).where(AssignmentRow.user_id == user_id, AssignmentRow.item_id == ItemRow.id)
        query = select(ItemRow.id).where(ItemRow.id > after, ~mine.exists(),
                                         answers + open_assignments < ItemRow.replicas)
        return self._of_kind_and_project(query, kind, project_id).order_by(ItemRow.id).limit(limit)

    def release_assignments(self, *, user_id: int | None = None, item_id: int | None = None,
                            older_than: timedelta | None = None, project_id: int | None = None) -> int:
        """Release open (unanswered) assignments, so their items go to the next labeler who asks.

        Only those of ``user_id``, of ``item_id``, older than ``older_than`` and of the items of project
        ``project_id`` when given (all open ones when none is). Returns how many were released;
        :class:`StoreError` for an unknown project.
        """
        self._check_project(project_id)
        with self._writer() as session:
            released = session.execute(self._release(user_id, item_id, older_than, project_id)).rowcount
            session.commit()
        return released

    def _release(self, user_id: int | None, item_id: int | None, older_than: timedelta | None,
                 project_id: int | None = None):
        """The DELETE of the open assignments :meth:`release_assignments` releases."""
        query = self._of_project(delete(AssignmentRow).where(~self._assignment_answered().exists()),
                                 AssignmentRow.item_id, project_id)
        if user_id is not None:
            query = query.where(AssignmentRow.user_id == user_id)
        if item_id is not None:
            query = query.where(AssignmentRow.item_id == item_id)
        if older_than is not None:
            query = query.where(AssignmentRow.created_at < _now() - older_than)
        return query

    def open_assignments(self, project_id: int | None = None) -> list[dict]:
        """Every open (unanswered) assignment (to the items of project ``project_id`` when given), oldest first:
        ``{"item_id", "kind", "project", "username", "assigned_at"}`` (``project``: the project's name)."""
        self._check_project(project_id)
        query = (select(AssignmentRow.item_id, ItemRow.kind, ProjectRow.name, UserRow.username,
                        AssignmentRow.created_at)
                 .join(ItemRow, ItemRow.id == AssignmentRow.item_id).join(UserRow, UserRow.id == AssignmentRow.user_id)
                 .join(ProjectRow, ProjectRow.id == ItemRow.project_id)
                 .where(~self._assignment_answered().exists()).order_by(AssignmentRow.id))
        query = self._of_kind_and_project(query, None, project_id)
        with self._reader() as session:
            return [{"item_id": item_id, "kind": kind, "project": project, "username": username,
                     "assigned_at": _utc(created)}
                    for item_id, kind, project, username, created in session.execute(query)]

    def assigned_item(self, user_id: int, item_id: int) -> Item:
        """The item, if it is assigned to the user (answered or not); else :class:`NotAssigned`."""
        with self._reader() as session:
            row = session.scalar(select(ItemRow).join(AssignmentRow, AssignmentRow.item_id == ItemRow.id)
                                 .where(AssignmentRow.user_id == user_id, ItemRow.id == item_id))
            if row is None:
                raise NotAssigned(f"item {item_id} is not assigned to user {user_id}")
            return _item(row)

    def submit(self, user_id: int, item_id: int, payload: dict) -> Answer:
        """Answer an assigned item in one transaction; the payload is validated for the item's kind.

        Payloads: demonstration ``{"completion"}``; ranking ``{"ratings": [rating] * K, "flags": [[flag, ...]]
        * K, "ranking": tie groups best first}`` (ratings on the item's project's scale, flags among its flags; in
        the item's indices, whatever order was shown); ab ``{"verdict": "a" | "b" | "tie"}``. Raises
        :class:`NotAssigned` when the item is not assigned to the user and :class:`StoreError` naming the bad
        field. The same answer sent again (a double submit, even a racing one) returns the stored answer; a
        different one raises :class:`AnswerConflict` (change an answer with :meth:`edit`).
        """
        return self._answer(user_id, item_id, lambda item, project: validate_answer(item, payload, project),
                            skipped=False)

    def skip(self, user_id: int, item_id: int, reason: str) -> Answer:
        """Skip an assigned item with a reason (an answer with ``skipped=True``); the rules of :meth:`submit`."""
        return self._answer(user_id, item_id, lambda _item, _project: _skip_payload(reason), skipped=True)

    def _assigned_row(self, session: Session, user_id: int, item_id: int) -> ItemRow:
        item = session.scalar(select(ItemRow).join(AssignmentRow, AssignmentRow.item_id == ItemRow.id)
                              .where(AssignmentRow.user_id == user_id, ItemRow.id == item_id))
        if item is None:
            raise NotAssigned(f"item {item_id} is not assigned to user {user_id}")
        return item

    def _answer(self, user_id: int, item_id: int, build, *, skipped: bool) -> Answer:
        """Store the first answer to an assigned item: ``build(item, project)`` makes (and checks) its payload."""
        with self._writer() as session:
            item = self._assigned_row(session, user_id, item_id)
            payload = build(item, _project(session.get(ProjectRow, item.project_id)))
            existing = self._existing_answer(session, user_id, item_id)
            if existing is not None:
                return _same_or_conflict(existing, payload, skipped)
            order = shown_order(user_id, item_id, len(item.completions)) if item.kind == "ranking" else None
            row = AnswerRow(user_id=user_id, item_id=item_id, payload=payload, skipped=skipped, shown_order=order)
            session.add(row)
            try:
                session.flush()
                session.add(AnswerVersionRow(answer_id=row.id, version=1, payload=payload, skipped=skipped))
                session.commit()
            except IntegrityError:  # a concurrent submit of the same (user, item) won
                session.rollback()
                existing = self._existing_answer(session, user_id, item_id)
                if existing is None:
                    raise
                return _same_or_conflict(existing, payload, skipped)
            return _answer(row)

    def edit(self, user_id: int, item_id: int, payload: dict) -> Answer:
        """Replace the user's answer to the item with a new version (the old ones stay in :meth:`history`).

        Validated as :meth:`submit`. :class:`StoreError` when there is no answer yet; :class:`AnswerConflict`
        when the item was skipped or an admin has reviewed the answer (reviewed answers are final). The
        same payload as the latest version changes nothing.
        """
        with self._writer() as session:
            item = self._assigned_row(session, user_id, item_id)
            new = validate_answer(item, payload, _project(session.get(ProjectRow, item.project_id)))
            row = session.scalar(select(AnswerRow).where(AnswerRow.user_id == user_id, AnswerRow.item_id == item_id)
                                 .with_for_update())
            if row is None:
                raise StoreError("there is no answer to change yet: submit one first", field="item_id")
            if row.skipped:
                raise AnswerConflict("you skipped this item; a skip cannot be changed", _answer(row))
            if row.status != SUBMITTED:
                raise AnswerConflict(f"an admin has {row.status} this answer; it can no longer be changed",
                                     _answer(row))
            if row.payload == new:
                return _answer(row)
            row.version += 1
            row.payload = new
            session.add(AnswerVersionRow(answer_id=row.id, version=row.version, payload=new, skipped=False))
            session.commit()
            return _answer(row)

    def history(self, answer_id: int) -> list[AnswerVersion]:
        """Every version of the answer, oldest first ([] for an unknown id)."""
        query = (select(AnswerVersionRow).where(AnswerVersionRow.answer_id == answer_id)
                 .order_by(AnswerVersionRow.version))
        with self._reader() as session:
            return [AnswerVersion(row.version, row.payload, row.skipped, _utc(row.created_at))
                    for row in session.scalars(query)]

    def review(self, answer_id: int, reviewer_id: int, verdict: str) -> Answer:
        """An admin accepts or rejects an answer (``verdict``: ``accepted`` or ``rejected``); final either way.

        A rejected answer is never exported and no longer counts towards the item's replicas, so the item
        goes back to the queue (of the other labelers). :class:`StoreError` for an unknown answer or
        verdict, :class:`AnswerConflict` for a skip or an answer already reviewed.
        """
        if verdict not in REVIEW_VERDICTS:
            raise StoreError(f"expected one of {REVIEW_VERDICTS}, got {_shown(verdict)}", field="status")
        with self._writer() as session:
            row = session.scalar(select(AnswerRow).where(AnswerRow.id == answer_id).with_for_update())
            if row is None:
                raise StoreError(f"no answer with id {answer_id}", field="answer_id")
            if row.skipped:
                raise AnswerConflict("a skipped item has no answer to review", _answer(row))
            if row.status != SUBMITTED:
                raise AnswerConflict(f"this answer was already {row.status}", _answer(row))
            row.status, row.reviewed_by, row.reviewed_at = verdict, reviewer_id, _now()
            session.commit()
            return _answer(row)

    def answer_of(self, user_id: int, item_id: int) -> Answer | None:
        """The user's answer to the item (skips included), or None."""
        with self._reader() as session:
            return self._existing_answer(session, user_id, item_id)

    @staticmethod
    def _existing_answer(session: Session, user_id: int, item_id: int) -> Answer | None:
        row = session.scalar(select(AnswerRow).where(AnswerRow.user_id == user_id, AnswerRow.item_id == item_id))
        return _answer(row) if row else None

    # --------------------------------------------------------------------------------------- sessions

    def create_session(self, user_id: int, lifetime: timedelta) -> str:
        """A new login session for the user: returns its token (kept by the client; the database keeps a hash).

        Expired sessions of every user are deleted on the way.
        """
        token = secrets.token_urlsafe(32)
        now = _now()
        with self._writer() as session:
            session.execute(delete(SessionRow).where(SessionRow.expires_at < now))
            session.add(SessionRow(token_hash=_token_hash(token), user_id=user_id, created_at=now,
                                   expires_at=now + lifetime))
            session.commit()
        return token

    def session_user(self, token: str) -> User | None:
        """The active user of an unexpired session, or None (unknown, ended or expired token)."""
        query = (select(UserRow).join(SessionRow, SessionRow.user_id == UserRow.id)
                 .where(SessionRow.token_hash == _token_hash(token), SessionRow.expires_at > _now(),
                        UserRow.active.is_(True)))
        with self._reader() as session:
            row = session.scalar(query)
            return _user(row) if row else None

    def end_session(self, token: str) -> None:
        """End one session (log out); an unknown token is ignored."""
        with self._writer() as session:
            session.execute(delete(SessionRow).where(SessionRow.token_hash == _token_hash(token)))
            session.commit()

    def set_password(self, user_id: int, password_hash: str) -> None:
        """Change the user's password hash and end every session of theirs, in one transaction."""
        if not isinstance(password_hash, str) or not password_hash:
            raise StoreError("is empty", field="password_hash")
        with self._writer() as session:
            row = session.get(UserRow, user_id)
            if row is None:
                raise StoreError(f"no user with id {user_id}", field="user_id")
            row.password_hash = password_hash
            session.execute(delete(SessionRow).where(SessionRow.user_id == user_id))
            session.commit()

    # ------------------------------------------------------------------------------------- API tokens

    def create_token(self, user_id: int, name: str) -> tuple[ApiToken, str]:
        """A new API token of the user, named ``name`` (unique among the user's unrevoked tokens).

        Returns the token as listed and its secret (``rlhfkit_...``), which is never stored, only its
        SHA-256: show it once. :class:`StoreError` for a bad or taken name or an unknown user.
        """
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise StoreError("must be non-empty, without leading or trailing spaces", field="name")
        if len(name) > MAX_TOKEN_NAME_CHARS:
            raise StoreError(f"is longer than {MAX_TOKEN_NAME_CHARS} characters", field="name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._writer() as session:
            user = session.scalar(select(UserRow).where(UserRow.id == user_id).with_for_update())
            if user is None:
                raise StoreError(f"no user with id {user_id}", field="user_id")
            taken = select(ApiTokenRow.id).where(ApiTokenRow.user_id == user_id, ApiTokenRow.name == name,
                                                 ApiTokenRow.revoked_at.is_(None))
            if session.scalar(taken) is not None:
                raise StoreError(f"{user.username} already has a token named {name!r}", field="name")
            row = ApiTokenRow(user_id=user_id, name=name, token_hash=_token_hash(secret))
            session.add(row)
            session.commit()
            return _api_token(row, user.username), secret

    def tokens(self, user_id: int | None = None) -> list[ApiToken]:
        """The API tokens (of ``user_id`` when given; revoked ones too), oldest first."""
        query = (select(ApiTokenRow, UserRow.username).join(UserRow, UserRow.id == ApiTokenRow.user_id)
                 .order_by(ApiTokenRow.id))
        if user_id is not None:
            query = query.where(ApiTokenRow.user_id == user_id)
        with self._reader() as session:
            return [_api_token(row, username) for row, username in session.execute(query)]

    def revoke_token(self, token_id: int, *, user_id: int | None = None) -> ApiToken:
        """Revoke an API token for good (of ``user_id`` only, when given: a user revokes their own).

        Revoking a revoked token changes nothing. :class:`StoreError` for an unknown token (or another
        user's, with ``user_id``).
        """
        with self._writer() as session:
            query = select(ApiTokenRow).where(ApiTokenRow.id == token_id)
            if user_id is not None:
                query = query.where(ApiTokenRow.user_id == user_id)
            row = session.scalar(query.with_for_update())
            if row is None:
                raise StoreError(f"no API token with id {token_id}", field="token_id")
            if row.revoked_at is None:
                row.revoked_at = _now()
            username = session.scalar(select(UserRow.username).where(UserRow.id == row.user_id))
            session.commit()
            return _api_token(row, username)

    def token_user(self, secret: str) -> User | None:
        """The active user of an unrevoked API token, or None (unknown or revoked token, deactivated user)."""
        query = (select(UserRow).join(ApiTokenRow, ApiTokenRow.user_id == UserRow.id)
                 .where(ApiTokenRow.token_hash == _token_hash(secret), ApiTokenRow.revoked_at.is_(None),
                        UserRow.active.is_(True)))
        with self._reader() as session:
            row = session.scalar(query)
            return _user(row) if row else None

    # ---------------------------------------------------------------------------------------- reports

    def item(self, item_id: int) -> Item | None:
        """The item with this id, or None."""
        with self._reader() as session:
            row = session.get(ItemRow, item_id)
            return _item(row) if row else None

    def answers(self, kind: str | None = None, *, status: str | None = None, skipped: bool | None = None,
                user_id: int | None = None, search: str | None = None, project_id: int | None = None,
                limit: int | None = None, offset: int = 0) -> list[Answer]:
        """Every answer (skipped ones included), oldest first; only answers to items of ``kind``, with review
        ``status`` (``submitted``, ``accepted``, ``rejected``), skipped or not, by ``user_id``, holding the
        text ``search`` (:meth:`_answer_filter`) and to the items of project ``project_id`` when given; a page of
        ``limit`` answers from ``offset`` on when given."""
        query = self._answer_filter(select(AnswerRow), kind, status, skipped, user_id, search, project_id)
        with self._reader() as session:
            return [_answer(row) for row in session.scalars(query.order_by(AnswerRow.id).offset(offset).limit(limit))]

    def count_answers(self, kind: str | None = None, *, status: str | None = None, skipped: bool | None = None,
                      user_id: int | None = None, search: str | None = None, project_id: int | None = None) -> int:
        """How many answers :meth:`answers` gives with the same filters (without ``limit``)."""
        query = self._answer_filter(select(func.count()).select_from(AnswerRow), kind, status, skipped, user_id,
                                    search, project_id)
        with self._reader() as session:
            return session.scalar(query)

    def _answer_filter(self, query, kind: str | None, status: str | None, skipped: bool | None, user_id: int | None,
                       search: str | None, project_id: int | None):
        """``query`` (over answers) narrowed to the filters of :meth:`answers`; :class:`StoreError` for an unknown
        kind, status or project.

        ``search`` matches the item's prompt and completions and the answer (a written demonstration, a skip's
        reason): a substring, case-insensitive for ASCII letters. It is looked for in the JSON the database
        stores, so it matches text as written, quotes, newlines and other characters included.
        """
        if kind is not None and kind not in ITEM_KINDS:
            raise StoreError(f"unknown kind {_shown(kind)}; expected one of {ITEM_KINDS}", field="kind")
        statuses = (SUBMITTED, *REVIEW_VERDICTS)
        if status is not None and status not in statuses:
            raise StoreError(f"unknown status {_shown(status)}; expected one of {statuses}", field="status")
        self._check_project(project_id)
        query = self._of_project(query, AnswerRow.item_id, project_id)
        if kind is not None or search:
            query = query.join(ItemRow, ItemRow.id == AnswerRow.item_id)
        if kind is not None:
            query = query.where(ItemRow.kind == kind)
        if status is not None:
            query = query.where(AnswerRow.status == status)
        if skipped is not None:
            query = query.where(AnswerRow.skipped.is_(skipped))
        if user_id is not None:
            query = query.where(AnswerRow.user_id == user_id)
        if search:
            pattern = "%" + _like_escape(json.dumps(search.lower())[1:-1]) + "%"
            query = query.where(or_(*(func.lower(cast(column, Text)).like(pattern, escape="\\")
                                      for column in (ItemRow.prompt, ItemRow.completions, AnswerRow.payload))))
        return query

    def progress(self, project_id: int | None = None) -> list[dict]:
        """Per item kind: ``{"kind", "items", "answers_needed", "answers", "skipped", "complete_items"}``, over the
        items of project ``project_id`` when given (else all).

        ``answers_needed`` is the sum of the items' replicas, ``answers`` the counted answers (neither
        skipped nor rejected; at most the replicas per item count), ``complete_items`` the items with as
        many answers as replicas.
        """
        self._check_project(project_id)
        answers = (select(AnswerRow.item_id, func.count().label("n")).where(self._counted_answer())
                   .group_by(AnswerRow.item_id).subquery())
        skipped = (select(AnswerRow.item_id, func.count().label("n")).where(AnswerRow.skipped.is_(True))
                   .group_by(AnswerRow.item_id).subquery())
        query = (select(ItemRow.kind, ItemRow.replicas, func.coalesce(answers.c.n, 0), func.coalesce(skipped.c.n, 0))
                 .outerjoin(answers, answers.c.item_id == ItemRow.id)
                 .outerjoin(skipped, skipped.c.item_id == ItemRow.id))
        query = self._of_kind_and_project(query, None, project_id)
        totals = {kind: {"kind": kind, "items": 0, "answers_needed": 0, "answers": 0, "skipped": 0,
                         "complete_items": 0} for kind in ITEM_KINDS}
        with self._reader() as session:
            for kind, replicas, answered, skips in session.execute(query):
                total = totals[kind]
                total["items"] += 1
                total["answers_needed"] += replicas
                total["answers"] += min(answered, replicas)
                total["skipped"] += skips
                total["complete_items"] += answered >= replicas
        return list(totals.values())

    def user_progress(self, user_id: int, project_id: int | None = None) -> dict[str, dict[str, int]]:
        """The user's own work per item kind (in project ``project_id`` when given): ``{kind: {"answered",
        "skipped"}}``."""
        query = (select(ItemRow.kind, AnswerRow.skipped, func.count())
                 .join(AnswerRow, AnswerRow.item_id == ItemRow.id).where(AnswerRow.user_id == user_id))
        query = self._of_kind_and_project(query, None, project_id).group_by(ItemRow.kind, AnswerRow.skipped)
        counts = {kind: {"answered": 0, "skipped": 0} for kind in ITEM_KINDS}
        with self._reader() as session:
            for kind, skipped, count in session.execute(query):
                counts[kind]["skipped" if skipped else "answered"] = count
        return counts

    def labeler_stats(self, project_id: int | None = None) -> list[dict]:
        """Per account, in creation order: ``{"id", "username", "role", "active", "answers", "skipped", "submitted",
        "accepted", "rejected", "open_assignments", "median_seconds"}``, over the items of project ``project_id``
        when given (every account is listed; :class:`StoreError` for an unknown project).

        ``answers`` counts the answers that are not skips, by review status in ``submitted``, ``accepted`` and
        ``rejected``. ``median_seconds`` is the median time from the item's assignment (the labeler opened it)
        to the first version of the answer, over the answers that are not skips (None without any).
        """
        self._check_project(project_id)
        stats = {user.id: {"id": user.id, "username": user.username, "role": user.role, "active": user.active,
                           "answers": 0, "skipped": 0, SUBMITTED: 0, ACCEPTED: 0, REJECTED: 0,
                           "open_assignments": 0, "median_seconds": None} for user in self.users()}
        counts = (self._of_project(select(AnswerRow.user_id, AnswerRow.skipped, AnswerRow.status, func.count()),
                                   AnswerRow.item_id, project_id)
                  .group_by(AnswerRow.user_id, AnswerRow.skipped, AnswerRow.status))
        open_assignments = (self._of_project(select(AssignmentRow.user_id, func.count())
                                             .where(~self._assignment_answered().exists()),
                                             AssignmentRow.item_id, project_id)
                            .group_by(AssignmentRow.user_id))
        times = self._of_project(select(AnswerRow.user_id, AssignmentRow.created_at, AnswerRow.created_at)
                                 .join(AssignmentRow, (AssignmentRow.user_id == AnswerRow.user_id)
                                       & (AssignmentRow.item_id == AnswerRow.item_id))
                                 .where(AnswerRow.skipped.is_(False)), AnswerRow.item_id, project_id)
        seconds: dict[int, list[float]] = {}
        with self._reader() as session:
            for user_id, skipped, status, count in session.execute(counts):
                if skipped:
                    stats[user_id]["skipped"] += count
                else:
                    stats[user_id]["answers"] += count
                    stats[user_id][status] += count
            for user_id, count in session.execute(open_assignments):
                stats[user_id]["open_assignments"] = count
            for user_id, opened, answered in session.execute(times):
                seconds.setdefault(user_id, []).append(max(0.0, (_utc(answered) - _utc(opened)).total_seconds()))
        for user_id, values in seconds.items():
            stats[user_id]["median_seconds"] = statistics.median(values)
        return list(stats.values())

    def _answered(self, kinds: tuple[str, ...], project_id: int | None) -> list[tuple[ItemRow, AnswerRow, str]]:
        """(item, answer, username) of every counted answer (neither skipped nor rejected) to items of
        ``kinds`` (in project ``project_id`` when given), latest versions, oldest answer first."""
        query = (select(ItemRow, AnswerRow, UserRow.username)
                 .join(AnswerRow, AnswerRow.item_id == ItemRow.id).join(UserRow, UserRow.id == AnswerRow.user_id)
                 .where(ItemRow.kind.in_(kinds), self._counted_answer()).order_by(AnswerRow.id))
        query = self._of_kind_and_project(query, None, project_id)
        with self._reader() as session:
            return [tuple(row) for row in session.execute(query)]

    def agreement(self, kinds: tuple[str, ...] = ("ranking", "ab"), project_id: int | None = None) -> dict:
        """Inter-labeler agreement over the answers to items of ``kinds``, rankings and A/B verdicts by default
        (see :mod:`rlhfkit.feedback.agreement`), and of project ``project_id`` when given (:class:`StoreError` for
        an unknown one).

        Returns ``{"per_item": [{"item_id", "labelers", "pairwise_agreement", "kendall_tau"}] (items with
        at least two labelers), "per_labeler": [{"username", "items", "pairwise_agreement", "kendall_tau",
        "gold_agreement"}], "overall": {"pairwise_agreement", "kendall_tau", "gold_agreement"}}``; a value
        is None where it is undefined. An A/B verdict counts as a ranking of the two completions.
        """
        by_item: dict[int, tuple[dict[str, list[list[int]]], list[list[int]] | None]] = {}
        if not kinds or any(kind not in ("ranking", "ab") for kind in kinds):
            raise StoreError(f"agreement is measured on ranking and ab items, not {_shown(kinds)}", field="kinds")
        self._check_project(project_id)
        for item, answer, username in self._answered(tuple(kinds), project_id):
            rankings, _ = by_item.setdefault(item.id, ({}, item.gold))
            rankings[username] = _answer_ranking(item, answer.payload)
        per_item = [{"item_id": item_id, "labelers": sorted(rankings), **agree.item_agreement(rankings)}
                    for item_id, (rankings, _) in sorted(by_item.items()) if len(rankings) >= 2]
        labelers = agree.labeler_agreement(by_item.values())
        per_labeler = [{"username": name, **values} for name, values in sorted(labelers.items())]
        return {"per_item": per_item, "per_labeler": per_labeler, "overall": agree.overall_agreement(by_item.values())}

    def export(self, kind: str, project_id: int | None = None) -> Iterator[dict]:
        """The answers (to the items of project ``project_id`` when given) as the records rlhfkit's trainers read;
        skipped answers are never exported.

        ``kind``: ``"demonstrations"`` (``{"prompt", "completion"}``), ``"rankings"`` (``{"prompt",
        "completions", "ranking"}``, the ranking flat when it has no ties, in the item's indices),
        ``"pairs-from-rankings"`` (every untied pair of every ranking, ``{"prompt", "chosen", "rejected"}``) or
        ``"ab"`` (``{"prompt", "completions", "verdict"}``). Every record has ``"id"`` (the imported record's id,
        else the item's), ``"labeler"`` (the username) and ``"meta"``: the ``meta`` given at import with how
        the answer came about (:func:`export_meta`): ``project`` (the project's name), ``opened_at`` (the item
        assigned to the labeler), ``answered_at`` (the first version), ``updated_at`` (the latest), ``version``,
        ``review_status`` (``"submitted"`` or ``"accepted"``), ``shown_order`` (the outputs' indices in the order
        the labeler saw them) and, for rankings, ``ratings`` and ``flags`` (pairs: ``chosen_index`` and
        ``rejected_index``). Rejected answers are left out; an edited answer is exported as its latest version.
        The old name ``"pairs"`` of ``"pairs-from-rankings"`` works, with a :class:`DeprecationWarning`.
        """
        kind, deprecated = export_kind(kind) if isinstance(kind, str) else (kind, None)
        if deprecated:
            warnings.warn(deprecated, DeprecationWarning, stacklevel=2)
        if kind not in EXPORT_KINDS:
            raise StoreError(f"unknown export kind {_shown(kind)}; expected one of {EXPORT_KINDS}", field="kind")
        self._check_project(project_id)
        item_kind = {"demonstrations": "demonstration", "rankings": "ranking", "pairs-from-rankings": "ranking",
                     "ab": "ab"}[kind]
        for item, answer, username, project, opened_at, updated_at in self._exported(item_kind, project_id):
            common = {"id": item.source_id if item.source_id is not None else str(item.id), "labeler": username}
            payload = answer.payload
            how = {"project": project, "opened_at": _timestamp(opened_at), "answered_at": _timestamp(answer.created_at),
                   "updated_at": _timestamp(updated_at if answer.version > 1 and updated_at else answer.created_at),
                   "version": answer.version,
                   "review_status": answer.status}
            if kind == "demonstrations":
                yield {"prompt": item.prompt, "completion": payload["completion"], **common,
                       "meta": export_meta(item.meta, how)}
            elif kind == "ab":  # shown as imported (the A/B order is drawn when the pairs are made)
                yield {"prompt": item.prompt, "completions": list(item.completions), "verdict": payload["verdict"],
                       **common, "meta": export_meta(item.meta, {**how, "shown_order": [0, 1]})}
            else:
                how["shown_order"] = answer.shown_order
                groups = payload["ranking"]
                record = RankingRecord(item.prompt, tuple(item.completions), tuple(tuple(g) for g in groups))
                if kind == "pairs-from-rankings":
                    for winner, loser in record.pairs():
                        yield {"prompt": item.prompt, "chosen": item.completions[winner],
                               "rejected": item.completions[loser], **common,
                               "meta": export_meta(item.meta, {**how, "chosen_index": winner,
                                                               "rejected_index": loser})}
                else:
                    ranking = [g[0] for g in groups] if all(len(g) == 1 for g in groups) else groups
                    yield {"prompt": item.prompt, "completions": list(item.completions), "ranking": ranking,
                           **common, "meta": export_meta(item.meta, {"ratings": payload["ratings"],
                                                                     "flags": payload["flags"], **how})}

    def _exported(self, kind: str, project_id: int | None) -> list[tuple]:
        """(item, answer, username, project name, opened at, latest version at) of :meth:`_answered`'s answers to
        items of ``kind`` (in project ``project_id`` when given): when the labeler was given the item (None if
        that assignment is gone) and when the latest version was written."""
        latest = (select(func.max(AnswerVersionRow.created_at)).where(AnswerVersionRow.answer_id == AnswerRow.id)
                  .correlate(AnswerRow).scalar_subquery())
        query = (select(ItemRow, AnswerRow, UserRow.username, ProjectRow.name, AssignmentRow.created_at, latest)
                 .join(AnswerRow, AnswerRow.item_id == ItemRow.id).join(UserRow, UserRow.id == AnswerRow.user_id)
                 .join(ProjectRow, ProjectRow.id == ItemRow.project_id)
                 .outerjoin(AssignmentRow, (AssignmentRow.item_id == ItemRow.id)
                            & (AssignmentRow.user_id == AnswerRow.user_id))
                 .where(self._counted_answer()).order_by(AnswerRow.id))
        query = self._of_kind_and_project(query, kind, project_id)
        with self._reader() as session:
            return [tuple(row) for row in session.execute(query)]
