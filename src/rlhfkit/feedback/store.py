"""The feedback app's database: users, items, assignments and answers (SQLAlchemy 2 + Alembic).

This is the only module of the app that speaks SQL. :class:`Store` opens any SQLAlchemy URL: an embedded
SQLite file by default (WAL journal, foreign keys on, a busy timeout, write transactions that take the
write lock up front with ``BEGIN IMMEDIATE``), PostgreSQL for teams (``postgresql+psycopg://...``). It is
safe to share one :class:`Store` between threads: every method opens its own session, and returns frozen
dataclasses (:class:`User`, :class:`Item`, :class:`Answer`), never ORM objects.

Items are of three kinds: ``demonstration`` (write a completion for a prompt), ``ranking`` (rate, flag and
rank K >= 2 completions) and ``ab`` (judge two completions). Each item needs ``replicas`` labelers; a
labeler asks :meth:`Store.next_item` for work, which assigns them an item, and answers it with
:meth:`Store.submit` or :meth:`Store.skip` (each one transaction; a second answer to the same item
returns the first). :meth:`Store.export` writes the answers as the records rlhfkit's trainers read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
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
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from rlhfkit.data.records import DataError, RankingRecord, parse_record
from rlhfkit.feedback import agreement as agree

ROLES = ("admin", "labeler")
ITEM_KINDS = ("demonstration", "ranking", "ab")
FLAGS = ("fails_instruction", "harmful", "made_up_facts")  # InstructGPT's labeling flags
VERDICTS = ("a", "b", "tie")
EXPORT_KINDS = ("demonstrations", "rankings", "pairs", "ab")
RATING_RANGE = (1, 7)
MAX_COMPLETION_CHARS = 100_000  # a written demonstration
MAX_REASON_CHARS = 10_000  # a skip's reason
SQLITE_BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).parent / "migrations"
_POSTGRES_MIGRATION_LOCK = 0x726C6866  # pg_advisory_xact_lock key: one migrating process at a time


class StoreError(ValueError):
    """Bad input to the store; ``field`` names the offending field when there is one."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.message}" if self.field else self.message


class NotAssigned(PermissionError):
    """A labeler touched an item that is not assigned to them."""


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


class ItemRow(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class AnswerRow(Base):
    __tablename__ = "answers"
    __table_args__ = (UniqueConstraint("user_id", "item_id", name="uq_answers_user_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


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
class Item:
    """One unit of work: a prompt to answer, K completions to rank, or an A/B pair to judge."""

    id: int
    kind: str
    prompt: str | list[dict]
    completions: list[str]  # [] for demonstration, K >= 2 for ranking, 2 for ab
    replicas: int
    meta: dict
    gold: list[list[int]] | None  # the gold ranking (groups best first) when given


@dataclass(frozen=True)
class Answer:
    """One labeler's answer to one item (``skipped`` answers hold ``{"reason": ...}``)."""

    id: int
    item_id: int
    user_id: int
    payload: dict
    skipped: bool
    created_at: datetime


def _user(row: UserRow) -> User:
    return User(row.id, row.username, row.role, row.password_hash, row.active)


def _item(row: ItemRow) -> Item:
    return Item(row.id, row.kind, row.prompt, list(row.completions), row.replicas, dict(row.meta), row.gold)


def _answer(row: AnswerRow) -> Answer:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)
    return Answer(row.id, row.item_id, row.user_id, row.payload, row.skipped, created)


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


def _validate_payload(item: ItemRow, payload: Any) -> dict:
    """The normalised payload of an answer to ``item``, or :class:`StoreError` naming the bad field."""
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
    low, high = RATING_RANGE
    for position, rating in enumerate(ratings):
        if not _is_int(rating) or not low <= rating <= high:
            raise StoreError(f"expected an integer from {low} to {high}, got {_shown(rating)}",
                             field=f"ratings[{position}]")
    flags = payload.get("flags")
    if not isinstance(flags, list) or len(flags) != k:
        raise StoreError(f"expected a list of {k} lists of flags, got {_shown(flags)}", field="flags")
    for position, chosen in enumerate(flags):
        if not isinstance(chosen, list) or any(flag not in FLAGS for flag in chosen):
            raise StoreError(f"expected a list of flags from {FLAGS}, got {_shown(chosen)}", field=f"flags[{position}]")
        if len(set(chosen)) != len(chosen):
            raise StoreError("repeats a flag", field=f"flags[{position}]")
    ranking = _ranking_groups(payload.get("ranking"), item.completions, "ranking")
    return {"ratings": list(ratings), "flags": [list(chosen) for chosen in flags], "ranking": ranking}


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
    """Bring the database to the newest Alembic revision (one transaction; concurrent callers wait)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.execution_options(rlhfkit_write=True).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_POSTGRES_MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


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

    # ----------------------------------------------------------------------------------------- import

    def _import(self, rows: list[ItemRow]) -> int:
        with self._writer() as session:
            session.add_all(rows)
            session.commit()
        return len(rows)

    @staticmethod
    def _check_replicas(replicas: int) -> None:
        if not _is_int(replicas) or replicas < 1:
            raise StoreError(f"must be a positive integer, got {_shown(replicas)}", field="replicas")

    def import_prompts(self, records: Iterable[dict], *, replicas: int = 1, source: str = "<records>") -> int:
        """Add ``{"prompt", "id"?, "meta"?}`` records as demonstration items; all or nothing.

        Returns the number of items created. A bad record raises :class:`DataError` naming ``source``, the
        record's number (from 1) and the field, and nothing is written.
        """
        self._check_replicas(replicas)

        def build(check: _ImportChecker) -> ItemRow:
            prompt, source_id, meta = check.base()
            return ItemRow(kind="demonstration", source_id=source_id, prompt=prompt, completions=[],
                           replicas=replicas, meta=meta, gold=None)

        return self._import(_records(records, source, build))

    def import_samples(self, records: Iterable[dict], *, replicas: int = 1, source: str = "<records>") -> int:
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

        return self._import(_records(records, source, build))

    def import_pairs(self, records: Iterable[dict], *, replicas: int = 1, source: str = "<records>") -> int:
        """Add ``{"prompt", "completions": [a, b], "id"?, "meta"?}`` records as A/B items.

        ``meta.models`` (the two models' names, in display order) is exported with the verdicts. All or
        nothing, as :meth:`import_prompts`.
        """
        self._check_replicas(replicas)

        def build(check: _ImportChecker) -> ItemRow:
            prompt, source_id, meta = check.base()
            return ItemRow(kind="ab", source_id=source_id, prompt=prompt, completions=check.completions(exactly=2),
                           replicas=replicas, meta=meta, gold=None)

        return self._import(_records(records, source, build))

    # ------------------------------------------------------------------------------------------ queue

    def next_item(self, user_id: int, kind: str | None = None) -> Item | None:
        """The user's open assignment (of ``kind`` when given); else a newly assigned item; else None.

        A new assignment is the oldest item the user has neither answered nor skipped whose answers plus
        the open assignments of other labelers are fewer than its replicas. Skipped answers do not count
        towards the replicas. Concurrent calls never assign an item beyond its replicas.
        """
        if kind is not None and kind not in ITEM_KINDS:
            raise StoreError(f"unknown kind {_shown(kind)}; expected one of {ITEM_KINDS}", field="kind")
        open_query = self._open_assignment(user_id, kind)
        with self._reader() as session:  # the common case, without waiting for the write lock
            row = session.scalars(open_query).first()
            if row is not None:
                return _item(row)
        with self._writer() as session:
            if session.scalar(select(UserRow.id).where(UserRow.id == user_id).with_for_update()) is None:
                raise StoreError(f"no user with id {user_id}", field="user_id")
            row = session.scalars(open_query).first()  # assigned by a concurrent call meanwhile
            if row is not None:
                return _item(row)
            after = 0
            while candidates := session.scalars(self._candidates(user_id, kind, after)).all():
                for candidate in candidates:  # lock, then count again: another labeler may have taken it
                    locked = session.scalar(select(ItemRow).where(ItemRow.id == candidate).with_for_update())
                    if self._taken(session, candidate) < locked.replicas:
                        session.add(AssignmentRow(user_id=user_id, item_id=candidate))
                        session.commit()
                        return _item(locked)
                after = candidates[-1]
            return None

    @staticmethod
    def _open_assignment(user_id: int, kind: str | None):
        """The item of the user's oldest open (unanswered) assignment, of ``kind`` when given."""
        answered = select(AnswerRow.id).where(AnswerRow.user_id == user_id, AnswerRow.item_id == AssignmentRow.item_id)
        query = (select(ItemRow).join(AssignmentRow, AssignmentRow.item_id == ItemRow.id)
                 .where(AssignmentRow.user_id == user_id, ~answered.exists()))
        if kind is not None:
            query = query.where(ItemRow.kind == kind)
        return query.order_by(AssignmentRow.id).limit(1)

    @staticmethod
    def _taken(session: Session, item_id: int) -> int:
        """Non-skipped answers to the item plus its open (unanswered) assignments."""
        answers = session.scalar(select(func.count()).select_from(AnswerRow)
                                 .where(AnswerRow.item_id == item_id, AnswerRow.skipped.is_(False)))
        answered = select(AnswerRow.id).where(AnswerRow.user_id == AssignmentRow.user_id,
                                              AnswerRow.item_id == AssignmentRow.item_id)
        open_assignments = session.scalar(select(func.count()).select_from(AssignmentRow)
                                          .where(AssignmentRow.item_id == item_id, ~answered.exists()))
        return answers + open_assignments

    @staticmethod
    def _candidates(user_id: int, kind: str | None, after: int, limit: int = 50):
        """Ids (above ``after``) of the oldest items the user has no assignment for that seem to need answers."""
        answers = (select(func.count()).select_from(AnswerRow)
                   .where(AnswerRow.item_id == ItemRow.id, AnswerRow.skipped.is_(False)).scalar_subquery())
        answered = select(AnswerRow.id).where(AnswerRow.user_id == AssignmentRow.user_id,
                                              AnswerRow.item_id == AssignmentRow.item_id)
        open_assignments = (select(func.count()).select_from(AssignmentRow)
                            .where(AssignmentRow.item_id == ItemRow.id, ~answered.exists()).scalar_subquery())
        mine = select(AssignmentRow.id).where(AssignmentRow.user_id == user_id, AssignmentRow.item_id == ItemRow.id)
        query = select(ItemRow.id).where(ItemRow.id > after, ~mine.exists(),
                                         answers + open_assignments < ItemRow.replicas)
        if kind is not None:
            query = query.where(ItemRow.kind == kind)
        return query.order_by(ItemRow.id).limit(limit)

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

        Payloads: demonstration ``{"completion"}``; ranking ``{"ratings": [1..7] * K, "flags": [[flag, ...]]
        * K, "ranking": tie groups best first}``; ab ``{"verdict": "a" | "b" | "tie"}``. Raises
        :class:`NotAssigned` when the item is not assigned to the user and :class:`StoreError` naming the
        bad field. A second submit (or skip) of the same item returns the first answer unchanged, even
        when the two race.
        """
        return self._answer(user_id, item_id, lambda item: _validate_payload(item, payload), skipped=False)

    def skip(self, user_id: int, item_id: int, reason: str) -> Answer:
        """Skip an assigned item with a reason (an answer with ``skipped=True``); the rules of :meth:`submit`."""

        def build(_item_row: ItemRow) -> dict:
            if not isinstance(reason, str) or not reason.strip():
                raise StoreError("is empty", field="reason")
            if len(reason) > MAX_REASON_CHARS:
                raise StoreError(f"is longer than {MAX_REASON_CHARS} characters", field="reason")
            return {"reason": reason}

        return self._answer(user_id, item_id, build, skipped=True)

    def _answer(self, user_id: int, item_id: int, build, *, skipped: bool) -> Answer:
        with self._writer() as session:
            item = session.scalar(select(ItemRow).join(AssignmentRow, AssignmentRow.item_id == ItemRow.id)
                                  .where(AssignmentRow.user_id == user_id, ItemRow.id == item_id))
            if item is None:
                raise NotAssigned(f"item {item_id} is not assigned to user {user_id}")
            existing = self._existing_answer(session, user_id, item_id)
            if existing is not None:
                return existing
            row = AnswerRow(user_id=user_id, item_id=item_id, payload=build(item), skipped=skipped)
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # a concurrent submit of the same (user, item) won
                session.rollback()
                existing = self._existing_answer(session, user_id, item_id)
                if existing is None:
                    raise
                return existing
            return _answer(row)

    def answer_of(self, user_id: int, item_id: int) -> Answer | None:
        """The user's answer to the item (skips included), or None."""
        with self._reader() as session:
            return self._existing_answer(session, user_id, item_id)

    @staticmethod
    def _existing_answer(session: Session, user_id: int, item_id: int) -> Answer | None:
        row = session.scalar(select(AnswerRow).where(AnswerRow.user_id == user_id, AnswerRow.item_id == item_id))
        return _answer(row) if row else None

    # ---------------------------------------------------------------------------------------- reports

    def item(self, item_id: int) -> Item | None:
        """The item with this id, or None."""
        with self._reader() as session:
            row = session.get(ItemRow, item_id)
            return _item(row) if row else None

    def answers(self, kind: str | None = None) -> list[Answer]:
        """Every answer (skipped ones included), oldest first; only answers to items of ``kind`` when given."""
        if kind is not None and kind not in ITEM_KINDS:
            raise StoreError(f"unknown kind {_shown(kind)}; expected one of {ITEM_KINDS}", field="kind")
        query = select(AnswerRow).order_by(AnswerRow.id)
        if kind is not None:
            query = query.join(ItemRow, ItemRow.id == AnswerRow.item_id).where(ItemRow.kind == kind)
        with self._reader() as session:
            return [_answer(row) for row in session.scalars(query)]

    def progress(self) -> list[dict]:
        """Per item kind: ``{"kind", "items", "answers_needed", "answers", "skipped", "complete_items"}``.

        ``answers_needed`` is the sum of the items' replicas, ``answers`` the non-skipped answers (at most
        the replicas per item count), ``complete_items`` the items with as many answers as replicas.
        """
        answers = (select(AnswerRow.item_id, func.count().label("n")).where(AnswerRow.skipped.is_(False))
                   .group_by(AnswerRow.item_id).subquery())
        skipped = (select(AnswerRow.item_id, func.count().label("n")).where(AnswerRow.skipped.is_(True))
                   .group_by(AnswerRow.item_id).subquery())
        query = (select(ItemRow.kind, ItemRow.replicas, func.coalesce(answers.c.n, 0), func.coalesce(skipped.c.n, 0))
                 .outerjoin(answers, answers.c.item_id == ItemRow.id)
                 .outerjoin(skipped, skipped.c.item_id == ItemRow.id))
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

    def user_progress(self, user_id: int) -> dict[str, dict[str, int]]:
        """The user's own work per item kind: ``{kind: {"answered", "skipped"}}``."""
        query = (select(ItemRow.kind, AnswerRow.skipped, func.count())
                 .join(AnswerRow, AnswerRow.item_id == ItemRow.id).where(AnswerRow.user_id == user_id)
                 .group_by(ItemRow.kind, AnswerRow.skipped))
        counts = {kind: {"answered": 0, "skipped": 0} for kind in ITEM_KINDS}
        with self._reader() as session:
            for kind, skipped, count in session.execute(query):
                counts[kind]["skipped" if skipped else "answered"] = count
        return counts

    def _answered(self, kinds: tuple[str, ...]) -> list[tuple[ItemRow, AnswerRow, str]]:
        """(item, answer, username) of every non-skipped answer to items of ``kinds``, oldest answer first."""
        query = (select(ItemRow, AnswerRow, UserRow.username)
                 .join(AnswerRow, AnswerRow.item_id == ItemRow.id).join(UserRow, UserRow.id == AnswerRow.user_id)
                 .where(ItemRow.kind.in_(kinds), AnswerRow.skipped.is_(False)).order_by(AnswerRow.id))
        with self._reader() as session:
            return [tuple(row) for row in session.execute(query)]

    def agreement(self) -> dict:
        """Inter-labeler agreement over ranking and A/B answers (see :mod:`rlhfkit.feedback.agreement`).

        Returns ``{"per_item": [{"item_id", "labelers", "pairwise_agreement", "kendall_tau"}] (items with
        at least two labelers), "per_labeler": [{"username", "items", "pairwise_agreement", "kendall_tau",
        "gold_agreement"}], "overall": {"pairwise_agreement", "kendall_tau", "gold_agreement"}}``; a value
        is None where it is undefined. An A/B verdict counts as a ranking of the two completions.
        """
        by_item: dict[int, tuple[dict[str, list[list[int]]], list[list[int]] | None]] = {}
        for item, answer, username in self._answered(("ranking", "ab")):
            rankings, _ = by_item.setdefault(item.id, ({}, item.gold))
            rankings[username] = _answer_ranking(item, answer.payload)
        per_item = [{"item_id": item_id, "labelers": sorted(rankings), **agree.item_agreement(rankings)}
                    for item_id, (rankings, _) in sorted(by_item.items()) if len(rankings) >= 2]
        labelers = agree.labeler_agreement(by_item.values())
        per_labeler = [{"username": name, **values} for name, values in sorted(labelers.items())]
        return {"per_item": per_item, "per_labeler": per_labeler, "overall": agree.overall_agreement(by_item.values())}

    def export(self, kind: str) -> Iterator[dict]:
        """The answers as the records rlhfkit's trainers read; skipped answers are never exported.

        ``kind``: ``"demonstrations"`` (``{"prompt", "completion"}``), ``"rankings"`` (``{"prompt",
        "completions", "ranking", "meta": {"ratings", "flags"}}``, the ranking flat when it has no ties),
        ``"pairs"`` (every untied pair of every ranking, ``{"prompt", "chosen", "rejected"}``) or ``"ab"``
        (``{"prompt", "completions", "verdict", "meta"}``, the item's meta with the models). Every record
        has ``"id"`` (the imported record's id, else the item's) and ``"labeler"`` (the username).
        """
        if kind not in EXPORT_KINDS:
            raise StoreError(f"unknown export kind {_shown(kind)}; expected one of {EXPORT_KINDS}", field="kind")
        item_kind = {"demonstrations": "demonstration", "rankings": "ranking", "pairs": "ranking", "ab": "ab"}[kind]
        for item, answer, username in self._answered((item_kind,)):
            common = {"id": item.source_id if item.source_id is not None else str(item.id), "labeler": username}
            payload = answer.payload
            if kind == "demonstrations":
                yield {"prompt": item.prompt, "completion": payload["completion"], **common}
            elif kind == "ab":
                yield {"prompt": item.prompt, "completions": list(item.completions), "verdict": payload["verdict"],
                       **common, "meta": dict(item.meta)}
            else:
                groups = payload["ranking"]
                record = RankingRecord(item.prompt, tuple(item.completions), tuple(tuple(g) for g in groups))
                if kind == "pairs":
                    for winner, loser in record.pairs():
                        yield {"prompt": item.prompt, "chosen": item.completions[winner],
                               "rejected": item.completions[loser], **common}
                else:
                    ranking = [g[0] for g in groups] if all(len(g) == 1 for g in groups) else groups
                    yield {"prompt": item.prompt, "completions": list(item.completions), "ranking": ranking,
                           **common, "meta": {"ratings": payload["ratings"], "flags": payload["flags"]}}
