"""Commands of the feedback app: ``rlhfkit serve``, ``rlhfkit export`` and ``rlhfkit feedback ...``.

``rlhfkit.cli`` adds them to its app with :func:`register`. Every command takes ``--db``: a SQLAlchemy URL
(``postgresql+psycopg://user@host/db`` for teams) or the path of a SQLite file (``sqlite:///feedback.db``
by default). Bad data, bad input and missing files end with one clear message and exit code 2, as in the
rest of the ``rlhfkit`` command line.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhfkit.data.records import DataError
from rlhfkit.feedback.store import EXPORT_KINDS, ROLES, Store, StoreError

DEFAULT_DB = "sqlite:///feedback.db"
IMPORT_KINDS = ("prompts", "samples", "pairs")
MIN_PASSWORD_LENGTH = 8
POSTGRES_DRIVERS = ("psycopg", "psycopg2")

console = Console(stderr=True)
DbOption = Annotated[str, typer.Option("--db", help="SQLAlchemy URL (postgresql+psycopg://...) or SQLite file path.")]


def _fail_cleanly(function: Callable) -> Callable:
    """Show data, store and connection errors and missing files as one clear message (exit code 2)."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (DataError, StoreError, FileNotFoundError, ArgumentError) as error:
            console.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False)
            raise typer.Exit(2) from None
        except OperationalError as error:  # the database cannot be reached or opened
            console.print(f"[bold red]error:[/] cannot use the database: {escape(str(error.orig))}", markup=True,
                          highlight=False)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as error:
            if error.name not in POSTGRES_DRIVERS:
                raise
            console.print(f"[bold red]error:[/] the PostgreSQL driver is not installed ({escape(str(error))}): "
                          + escape("pip install 'rlhfkit[postgres]'"), markup=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def database_url(db: str) -> str:
    """``db`` as a SQLAlchemy URL: a file path becomes ``sqlite:///PATH``, and a plain ``postgresql://`` (or
    ``postgres://``) URL uses the psycopg 3 driver; other URLs are kept."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser()}"
    scheme, rest = db.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else db


@contextmanager
def open_store(db: str, *, create: bool) -> Iterator[Store]:
    """The store at ``db``, closed afterwards; unless ``create``, a missing SQLite file is an error."""
    from sqlalchemy.engine import make_url

    url = database_url(db)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not create and not Path(parsed.database).exists():
            raise FileNotFoundError(f"{parsed.database}: no such database file")
    store = Store(url)
    try:
        yield store
    finally:
        store.close()


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"expected one of {', '.join(choices)}", param_hint=option)
    return value


def read_import(path: Path, kind: str) -> tuple[list[dict], list[int] | None]:
    """The records of an import file and, for JSON lines the store validates, the file line of each.

    Prompts are read with rlhfkit's readers (JSONL, JSON, CSV with a ``prompt`` column, Parquet), which
    validate them and name file lines themselves; samples and pairs are JSON lines, validated by the store.
    """
    from rlhfkit.data.readers import iter_jsonl, read_records
    from rlhfkit.data.records import record_to_dict

    if kind == "prompts":
        records = read_records(path, "prompt")
        return [record_to_dict(record) for record in records], None
    if not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        raise DataError(f"{kind} are read from JSON lines (.jsonl or .jsonl.gz)", source=str(path))
    rows = list(iter_jsonl(path))
    if not rows:
        raise DataError("contains no records", source=str(path))
    return [row for _, row in rows], [line for line, _ in rows]


def register(app: typer.Typer) -> None:
    """Add ``export`` and the ``feedback`` sub-app (add-user, import, progress, agreement) to ``app``.

    ``rlhfkit serve`` joins them with the web app (``rlhfkit.feedback.app``, not built yet).
    """
    feedback = typer.Typer(help="The human-feedback app's database: accounts, imports, progress, agreement.",
                           no_args_is_help=True)
    app.add_typer(feedback, name="feedback")

    @app.command("export")
    @_fail_cleanly
    def export(
        kind: Annotated[str, typer.Option(help=f"What to export: {', '.join(EXPORT_KINDS)}.")],
        out: Annotated[Path, typer.Option(help="Output JSONL file (.gz to compress).")],
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Write the labelers' answers as the records rlhfkit's trainers read (skipped items left out)."""
        from rlhfkit.data.readers import write_jsonl

        _choice(kind, EXPORT_KINDS, "--kind")
        with open_store(db, create=False) as store:
            count = write_jsonl(out, store.export(kind))
        print(json.dumps({"kind": kind, "records": count, "out": str(out)}))

    @feedback.command("add-user")
    @_fail_cleanly
    def add_user(
        username: Annotated[str, typer.Argument(help="The account's login name.")],
        password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                              help="Password (asked for, hidden, when not given).")],
        role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")] = "labeler",
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Create a labeler or admin account (the password is stored as an argon2 hash)."""
        from rlhfkit.feedback.security import hash_password

        _choice(role, ROLES, "--role")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise typer.BadParameter(f"must be at least {MIN_PASSWORD_LENGTH} characters", param_hint="--password")
        with open_store(db, create=True) as store:
            user = store.create_user(username, hash_password(password), role)
        print(json.dumps({"id": user.id, "username": user.username, "role": user.role}))

    @feedback.command("import")
    @_fail_cleanly
    def import_(
        path: Annotated[Path, typer.Argument(help="Records: JSONL (prompts also CSV with a 'prompt' column).")],
        kind: Annotated[str, typer.Option(help="prompts (to write demonstrations for), samples (K completions "
                                               "to rank: rlhfkit sample's output) or pairs (A/B).")],
        replicas: Annotated[int, typer.Option(min=1, help="How many labelers answer each item.")] = 1,
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Add items for labelers: all of the file or, on the first bad record, nothing."""
        _choice(kind, IMPORT_KINDS, "--kind")
        records, lines = read_import(path, kind)
        with open_store(db, create=True) as store:
            method = {"prompts": store.import_prompts, "samples": store.import_samples, "pairs": store.import_pairs}
            try:
                count = method[kind](records, replicas=replicas, source=str(path))
            except DataError as error:  # name the file line, not the record number
                if lines is None or error.line is None:
                    raise
                raise DataError(error.message, source=error.source, line=lines[error.line - 1],
                                field=error.field) from None
        print(json.dumps({"kind": kind, "items": count, "replicas": replicas, "db": store.url}))

    @feedback.command("progress")
    @_fail_cleanly
    def progress(db: DbOption = DEFAULT_DB) -> None:
        """How far the labelers are, per item kind."""
        with open_store(db, create=False) as store:
            rows = store.progress()
        table = Table(title="Labeling progress")
        for column in ("kind", "items", "complete items", "answers", "needed", "skipped", "done"):
            table.add_column(column, justify="left" if column == "kind" else "right")
        for row in rows:
            done = f"{row['answers'] / row['answers_needed']:.0%}" if row["answers_needed"] else "-"
            table.add_row(row["kind"], str(row["items"]), str(row["complete_items"]), str(row["answers"]),
                          str(row["answers_needed"]), str(row["skipped"]), done)
        Console().print(table)

    @feedback.command("agreement")
    @_fail_cleanly
    def agreement(
        db: DbOption = DEFAULT_DB,
        out: Annotated[Path | None, typer.Option(help="Also write the full report (per item too) as JSON.")] = None,
    ) -> None:
        """Agreement between labelers (pairwise agreement, Kendall tau-b) and with gold, on rankings and A/B."""
        with open_store(db, create=False) as store:
            report = store.agreement()

        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        table = Table(title="Agreement per labeler")
        for column in ("labeler", "items", "pairwise agreement", "Kendall tau-b", "gold agreement"):
            table.add_column(column, justify="left" if column == "labeler" else "right")
        for row in report["per_labeler"]:
            table.add_row(row["username"], str(row["items"]), show(row["pairwise_agreement"]),
                          show(row["kendall_tau"]), show(row["gold_agreement"]))
        overall = report["overall"]
        table.add_section()
        table.add_row("[bold]overall[/]", "", show(overall["pairwise_agreement"]), show(overall["kendall_tau"]),
                      show(overall["gold_agreement"]))
        table.caption = f"{len(report['per_item'])} items answered by two or more labelers"
        Console().print(table)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
