"""Commands of the feedback app: ``rlhfkit serve``, ``rlhfkit export`` and ``rlhfkit feedback ...``.

``rlhfkit.cli`` adds them to its app with :func:`register`. Every command takes ``--db``: a SQLAlchemy URL
(``postgresql+psycopg://user@host/db`` for teams) or the path of a SQLite file (``sqlite:///feedback.db``
by default). Bad data, bad input and missing files end with one clear message and exit code 2, as in the
rest of the ``rlhfkit`` command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhfkit.cli_common import console, fail_cleanly
from rlhfkit.feedback.common import (
    DEFAULT_PROJECT,
    EXPORT_KINDS,
    IMPORT_KINDS,
    OLD_EXPORT_KINDS,
    OLD_IMPORT_KINDS,
    ROLES,
    StoreError,
    export_kind,
    import_kind,
    parse_flags,
    parse_rating_scale,
)

if TYPE_CHECKING:  # the store (SQLAlchemy) is loaded by the commands that open one, not by --help
    from rlhfkit.feedback.store import Project, Store, User

DEFAULT_DB = "sqlite:///feedback.db"
POSTGRES_DRIVERS = ("psycopg", "psycopg2")

DbOption = Annotated[str, typer.Option("--db", help="SQLAlchemy URL (postgresql+psycopg://...) or SQLite file path.")]
ProjectOption = Annotated[str | None, typer.Option(
    "--project", help=f"The project's name (rlhfkit feedback project list); default: the project {DEFAULT_PROJECT!r}.")]
OnlyProjectOption = Annotated[str | None, typer.Option(
    "--project", help="Only this project's items (its name; default: every project).")]
InstructionsOption = Annotated[Path | None, typer.Option(
    exists=True, dir_okay=False, readable=True,
    help="A text or Markdown file of instructions, shown to labelers on every task of the project.")]
RatingScaleOption = Annotated[str | None, typer.Option(
    help="The ratings of each output, LOWEST-HIGHEST within 0-10 (default for a new project: 1-7).")]
FlagsOption = Annotated[str | None, typer.Option(
    help="Comma-separated flag names labelers can tick on each output ('' for none; default for a new project: "
         "fails_instruction,harmful,made_up_facts).")]
# the store's names of a project's fields -> the options (or argument) that give them
PROJECT_PARAMETERS = {"name": "NAME", "instructions": "--instructions", "rating_scale": "--rating-scale",
                      "flags": "--flags", "project": "--project"}


def database_url(db: str) -> str:
    """``db`` as a SQLAlchemy URL: a file path becomes ``sqlite:///PATH``, and a plain ``postgresql://`` (or
    ``postgres://``) URL uses the psycopg 3 driver; other URLs are kept."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser()}"
    scheme, rest = db.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else db


@contextmanager
def open_store(db: str, *, create: bool) -> Iterator[Store]:
    """The store at ``db``, closed afterwards; unless ``create``, a missing SQLite file is an error.

    A database that cannot be used (an unknown or malformed URL, no connection, a missing PostgreSQL
    driver), here or while the store is in use, is a :class:`StoreError` that says why.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, OperationalError

    from rlhfkit.feedback.store import Store

    try:
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
    except ArgumentError as error:
        raise StoreError(str(error)) from None
    except OperationalError as error:  # the database cannot be reached or opened
        raise StoreError(f"cannot use the database: {error.orig}") from None
    except ModuleNotFoundError as error:
        if error.name not in POSTGRES_DRIVERS:
            raise
        raise StoreError(f"the PostgreSQL driver is not installed ({error}): pip install 'rlhfkit[postgres]'") \
            from None


def default_session_key_file(db: str) -> Path | None:
    """Where ``rlhfkit serve`` keeps the session key of database ``db`` unless told: beside a SQLite file
    (``feedback.db`` -> ``feedback.db.session-key``); for a server database, in the user's configuration folder
    (``~/.config/rlhfkit/feedback-session-<hash of the URL>.key``); ``None`` for an in-memory database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(database_url(db))
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.database.startswith("file:"):
            return None
        return Path(f"{parsed.database}.session-key")
    digest = hashlib.sha256(parsed.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "rlhfkit" / f"feedback-session-{digest}.key"


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"expected one of {', '.join(choices)}", param_hint=option)
    return value


def _kind(value: str, resolve, choices: tuple[str, ...], old: dict[str, str]) -> str:
    """A --kind value under its current name; an old name works, with a deprecation message on stderr."""
    kind, deprecated = resolve(value)
    if deprecated:
        console.print(f"[bold yellow]warning:[/] {escape(deprecated)}", highlight=False)
    if kind not in choices:
        olds = ", ".join(f"{name} (now {new})" for name, new in old.items())
        raise typer.BadParameter(f"expected one of {', '.join(choices)}; old names: {olds}", param_hint="--kind")
    return kind


def project_settings(instructions: Path | None, rating_scale: str | None, flags: str | None) -> dict:
    """The project settings the options give (only those given), checked; a usage error names the bad option."""
    settings: dict = {}
    try:
        if instructions is not None:
            settings["instructions"] = instructions.read_text(encoding="utf-8")
        if rating_scale is not None:
            settings["rating_scale"] = parse_rating_scale(rating_scale)
        if flags is not None:
            settings["flags"] = parse_flags(flags)
    except StoreError as error:
        raise typer.BadParameter(error.message, param_hint=PROJECT_PARAMETERS[error.field]) from None
    except UnicodeDecodeError as error:
        raise typer.BadParameter(f"{instructions} is not UTF-8 text ({error.reason})",
                                 param_hint="--instructions") from None
    return settings


@contextmanager
def project_errors(parameters: dict[str, str] = PROJECT_PARAMETERS) -> Iterator[None]:
    """A :class:`StoreError` about a project's field as a usage error naming the option that gave it (``parameters``:
    the store's field names -> the command's options)."""
    try:
        yield
    except StoreError as error:
        if error.field not in parameters:
            raise
        raise typer.BadParameter(error.message, param_hint=parameters[error.field]) from None


def named_project(store: Store, name: str | None) -> Project:
    """The project named ``name`` (the default project when None), or a usage error naming ``--project``."""
    found = store.project_by_name(name if name is not None else DEFAULT_PROJECT)
    if found is None:
        raise typer.BadParameter(f"no project {name!r}; create it with rlhfkit feedback project create {name}",
                                 param_hint="--project")
    return found


def only_project(store: Store, name: str | None) -> int | None:
    """The id of the project an ``--project`` filter names (None without one: every project); a usage error when
    there is no such project."""
    return named_project(store, name).id if name is not None else None


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``export`` and the ``feedback`` sub-app (add-user, deactivate, reactivate, reset-password,
    add-token, tokens, revoke-token, project create/update/list, import, progress, release, agreement) to
    ``app``."""
    feedback = typer.Typer(help="The human-feedback app's database: accounts, API tokens, projects, imports, "
                                "progress, agreement.",
                           no_args_is_help=True)
    app.add_typer(feedback, name="feedback")
    projects = typer.Typer(help="Labeling projects: each has its own instructions, rating scale, flags, queue and "
                                "exports.", no_args_is_help=True)
    feedback.add_typer(projects, name="project")

    @app.command("serve")
    @fail_cleanly
    def serve(
        db: DbOption = DEFAULT_DB,
        host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
        secret_key: Annotated[str | None, typer.Option(
            envvar="RLHFKIT_SECRET_KEY",
            help="Key that signs session cookies (default: the one in the session key file).")] = None,
        secret_key_file: Annotated[Path | None, typer.Option(
            envvar="RLHFKIT_SECRET_KEY_FILE",
            help="File that keeps the session key, so a restart keeps everyone logged in; created with a random "
                 "key (mode 0600) if missing. Default: beside a SQLite database (DB.session-key), else "
                 "~/.config/rlhfkit/.")] = None,
        secure_cookies: Annotated[bool, typer.Option(
            help="Send the session cookie over HTTPS only (behind a TLS-terminating proxy).")] = False,
    ) -> None:
        """Run the human-feedback web app (labelers' queues and the admin's pages) on HOST:PORT."""
        import uvicorn

        from rlhfkit.feedback.app import create_app
        from rlhfkit.feedback.security import SessionKeyError, session_key_from_file

        if secret_key and secret_key_file:
            raise typer.BadParameter("give the session key or its file, not both (RLHFKIT_SECRET_KEY and "
                                     "RLHFKIT_SECRET_KEY_FILE count)", param_hint="--secret-key-file")
        with open_store(db, create=True) as store:
            key_file = None if secret_key else secret_key_file or default_session_key_file(db)
            if key_file is not None:
                try:
                    secret_key = session_key_from_file(key_file)
                except SessionKeyError as error:
                    raise typer.BadParameter(str(error), param_hint="--secret-key-file") from None
                console.print(f"session key: {escape(str(key_file))}", highlight=False)
            elif not secret_key:
                console.print("an in-memory database: a random session key (a restart loses everything anyway)")
            if not any(user.role == "admin" for user in store.users()):
                console.print("no admin account yet: create one with "
                              f"[bold]rlhfkit feedback add-user NAME --role admin --db {escape(db)}[/]")
            console.print(f"serving the feedback app on http://{host}:{port} (database {escape(store.url)})",
                          highlight=False)
            web_app = create_app(store, secret_key=secret_key, https_only=secure_cookies)
            uvicorn.run(web_app, host=host, port=port, log_level="warning")

    @app.command("export")
    @fail_cleanly
    def export(
        kind: Annotated[str, typer.Option(help="What to export: demonstrations, rankings, pairs-from-rankings "
                                               "(chosen/rejected pairs drawn from the rankings) or ab (the verdicts "
                                               "of A/B pairs).")],
        out: Annotated[Path, typer.Option(help="Output JSONL file (.gz to compress).")],
        db: DbOption = DEFAULT_DB,
        project: Annotated[str | None, typer.Option(help="Only this project's answers (default: every project's; "
                                                         "each record's meta names its project).")] = None,
    ) -> None:
        """Write the labelers' answers as the records rlhfkit's trainers read (skipped items left out)."""
        from rlhfkit.data.readers import write_jsonl

        kind = _kind(kind, export_kind, EXPORT_KINDS, OLD_EXPORT_KINDS)
        with open_store(db, create=False) as store:
            count = write_jsonl(out, store.export(kind, only_project(store, project)))
        print(json.dumps({"kind": kind, **({"project": project} if project is not None else {}), "records": count,
                          "out": str(out)}))

    @feedback.command("add-user")
    @fail_cleanly
    def add_user(
        username: Annotated[str, typer.Argument(help="The account's login name.")],
        password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                              help="Password (asked for, hidden, when not given).")],
        role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")] = "labeler",
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Create a labeler or admin account (the password is stored as an argon2 hash)."""
        from rlhfkit.feedback.security import MIN_PASSWORD_LENGTH, hash_password

        _choice(role, ROLES, "--role")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise typer.BadParameter(f"must be at least {MIN_PASSWORD_LENGTH} characters", param_hint="--password")
        with open_store(db, create=True) as store:
            user = store.create_user(username, hash_password(password), role)
        print(json.dumps({"id": user.id, "username": user.username, "role": user.role}))

    def account(store: Store, username: str, param_hint: str = "USERNAME") -> User:
        """The account named ``username``, or a usage error naming the parameter that gave it."""
        found = store.user_by_name(username)
        if found is None:
            raise typer.BadParameter(f"no account {username!r}", param_hint=param_hint)
        return found

    def set_active(username: str, db: str, active: bool) -> None:
        with open_store(db, create=False) as store:
            user = store.set_active(account(store, username).id, active)
        print(json.dumps({"username": user.username, "active": user.active}))

    @feedback.command("deactivate")
    @fail_cleanly
    def deactivate(
        username: Annotated[str, typer.Argument(help="The account to deactivate.")],
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Deactivate an account: it cannot log in, its sessions end, its open assignments go to other labelers
        and its API tokens are refused (its answers stay)."""
        set_active(username, db, False)

    @feedback.command("reactivate")
    @fail_cleanly
    def reactivate(
        username: Annotated[str, typer.Argument(help="The account to reactivate.")],
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Let a deactivated account log in again (its unrevoked API tokens work again too)."""
        set_active(username, db, True)

    @feedback.command("reset-password")
    @fail_cleanly
    def reset_password(
        username: Annotated[str, typer.Argument(help="The account whose password to set.")],
        password: Annotated[str, typer.Option(prompt="New password", hide_input=True, confirmation_prompt=True,
                                              help="The new password (asked for, hidden, when not given).")],
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Set a new password for an account; every session of the account ends."""
        from rlhfkit.feedback.security import MIN_PASSWORD_LENGTH, hash_password

        if len(password) < MIN_PASSWORD_LENGTH:
            raise typer.BadParameter(f"must be at least {MIN_PASSWORD_LENGTH} characters", param_hint="--password")
        with open_store(db, create=False) as store:
            user = account(store, username)
            store.set_password(user.id, hash_password(password))
        print(json.dumps({"username": user.username, "password": "changed"}))

    @feedback.command("add-token")
    @fail_cleanly
    def add_token(
        username: Annotated[str, typer.Argument(help="The account the token acts as.")],
        name: Annotated[str, typer.Option(help="What the token is for (unique among the account's tokens).")],
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Create an API token for scripts (Authorization: Bearer TOKEN on the JSON API); it is printed once and
        only its hash is stored."""
        with open_store(db, create=False) as store:
            token, secret = store.create_token(account(store, username).id, name)
        print(json.dumps({"id": token.id, "username": token.username, "name": token.name, "token": secret}))

    @feedback.command("tokens")
    @fail_cleanly
    def tokens(
        db: DbOption = DEFAULT_DB,
        user: Annotated[str | None, typer.Option(help="Only this account's tokens.")] = None,
    ) -> None:
        """List the API tokens (never their secrets), revoked ones too."""
        with open_store(db, create=False) as store:
            rows = store.tokens(account(store, user, "--user").id if user is not None else None)
        table = Table(title="API tokens")
        for column in ("id", "user", "name", "created", "revoked"):
            table.add_column(column, justify="right" if column == "id" else "left")
        for token in rows:
            table.add_row(str(token.id), escape(token.username), escape(token.name),
                          token.created_at.strftime("%Y-%m-%d %H:%M UTC"),
                          token.revoked_at.strftime("%Y-%m-%d %H:%M UTC") if token.revoked_at else "-")
        Console().print(table)

    @feedback.command("revoke-token")
    @fail_cleanly
    def revoke_token(
        token_id: Annotated[int, typer.Argument(help="The token's id (rlhfkit feedback tokens lists them).")],
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Revoke an API token for good."""
        with open_store(db, create=False) as store:
            token = store.revoke_token(token_id)
        print(json.dumps({"id": token.id, "username": token.username, "name": token.name,
                          "revoked_at": token.revoked_at.isoformat()}))

    @feedback.command("import")
    @fail_cleanly
    def import_(
        path: Annotated[Path, typer.Argument(help="Records: JSONL (prompts also CSV with a 'prompt' column).")],
        kind: Annotated[str, typer.Option(help="prompts (to write demonstrations for), samples (K completions "
                                               "to rate and rank: rlhfkit sample's output) or ab (A/B pairs to "
                                               "judge: rlhfkit human pairs' output).")],
        replicas: Annotated[int, typer.Option(min=1, help="How many labelers answer each item.")] = 1,
        db: DbOption = DEFAULT_DB,
        project: ProjectOption = None,
    ) -> None:
        """Add items for labelers to a project: all of the file or, on the first bad record, nothing."""
        from rlhfkit.feedback.imports import import_file

        kind = _kind(kind, import_kind, IMPORT_KINDS, OLD_IMPORT_KINDS)
        with open_store(db, create=True) as store:
            target = named_project(store, project)
            count = import_file(store, path, kind, replicas=replicas, project_id=target.id)
        print(json.dumps({"kind": kind, "items": count, "replicas": replicas, "project": target.name,
                          "db": store.url}))

    @projects.command("create")
    @fail_cleanly
    def create_project(
        name: Annotated[str, typer.Argument(help="The project's name (unique).")],
        instructions: InstructionsOption = None,
        rating_scale: RatingScaleOption = None,
        flags: FlagsOption = None,
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Create a project; import items into it with rlhfkit feedback import --project NAME."""
        settings = project_settings(instructions, rating_scale, flags)
        with open_store(db, create=True) as store, project_errors():
            created = store.create_project(name, **settings)
        print(json.dumps(_project_json(created)))

    @projects.command("update")
    @fail_cleanly
    def update_project(
        name: Annotated[str, typer.Argument(help="The project to change.")],
        new_name: Annotated[str | None, typer.Option(
            "--name", help="Rename the project (the new name must be free; 'default' keeps its name).")] = None,
        instructions: InstructionsOption = None,
        rating_scale: RatingScaleOption = None,
        flags: FlagsOption = None,
        db: DbOption = DEFAULT_DB,
    ) -> None:
        """Rename a project or change its instructions, rating scale or flags (those given); a new scale or flags
        must still fit every answer given so far."""
        settings = project_settings(instructions, rating_scale, flags)
        if new_name is not None:
            settings["name"] = new_name
        if not settings:
            raise typer.BadParameter("give what to change: --name, --instructions, --rating-scale or --flags",
                                     param_hint="NAME")
        with open_store(db, create=False) as store, project_errors({**PROJECT_PARAMETERS, "name": "--name"}):
            found = store.project_by_name(name)
            if found is None:
                raise typer.BadParameter(f"no project {name!r}", param_hint="NAME")
            changed = store.update_project(found.id, **settings)
        print(json.dumps(_project_json(changed)))

    @projects.command("list")
    @fail_cleanly
    def list_projects(db: DbOption = DEFAULT_DB) -> None:
        """List the projects: their items, rating scale, flags and the start of their instructions."""
        with open_store(db, create=False) as store:
            rows = [(project, sum(row["items"] for row in store.progress(project.id))) for project in store.projects()]
        table = Table(title="Projects")
        for column in ("name", "items", "rating scale", "flags", "instructions"):
            table.add_column(column, justify="right" if column == "items" else "left")
        for project, items in rows:
            first_line = project.instructions.strip().split("\n", 1)[0]
            table.add_row(escape(project.name), str(items), "{}-{}".format(*project.rating_scale),
                          escape(", ".join(project.flags) or "-"),
                          escape(first_line[:60] + ("..." if len(first_line) > 60 else "")) or "-")
        Console().print(table)

    @feedback.command("progress")
    @fail_cleanly
    def progress(db: DbOption = DEFAULT_DB, project: Annotated[str | None, typer.Option(
            help="Only this project (default: a table for each project with items).")] = None) -> None:
        """How far the labelers are, per project and item kind."""
        with open_store(db, create=False) as store:
            chosen = [named_project(store, project)] if project is not None else store.projects()
            tables = [(found, store.progress(found.id)) for found in chosen]
        if project is None:  # the projects with items; the default one alone when none has any
            tables = [(found, rows) for found, rows in tables if any(row["items"] for row in rows)] or tables[:1]
        for found, rows in tables:
            table = Table(title=f"Labeling progress: project {escape(found.name)}")
            for column in ("kind", "items", "complete items", "answers", "needed", "skipped", "done"):
                table.add_column(column, justify="left" if column == "kind" else "right")
            for row in rows:
                done = f"{row['answers'] / row['answers_needed']:.0%}" if row["answers_needed"] else "-"
                table.add_row(row["kind"], str(row["items"]), str(row["complete_items"]), str(row["answers"]),
                              str(row["answers_needed"]), str(row["skipped"]), done)
            Console().print(table)

    @feedback.command("release")
    @fail_cleanly
    def release(
        db: DbOption = DEFAULT_DB,
        user: Annotated[str | None, typer.Option(help="Only this labeler's open assignments.")] = None,
        item: Annotated[int | None, typer.Option(help="Only this item's open assignment.")] = None,
        older_than_minutes: Annotated[float | None, typer.Option(
            min=0, help="Only assignments opened longer ago than this.")] = None,
        project: OnlyProjectOption = None,
    ) -> None:
        """Release open (opened, unanswered) assignments, so their items go to the next labelers who ask."""
        from datetime import timedelta

        with open_store(db, create=False) as store:
            released = store.release_assignments(
                user_id=account(store, user, "--user").id if user is not None else None, item_id=item,
                older_than=timedelta(minutes=older_than_minutes) if older_than_minutes else None,
                project_id=only_project(store, project))
        print(json.dumps({"released": released}))

    @feedback.command("agreement")
    @fail_cleanly
    def agreement(
        db: DbOption = DEFAULT_DB,
        out: Annotated[Path | None, typer.Option(help="Also write the full report (per item too) as JSON.")] = None,
        project: OnlyProjectOption = None,
    ) -> None:
        """Agreement between labelers (pairwise agreement, Kendall tau-b) and with gold, on rankings and A/B (of one
        project's items with --project)."""
        with open_store(db, create=False) as store:
            report = store.agreement(project_id=only_project(store, project))

        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        table = Table(title="Agreement per labeler" + (f" in project {escape(project)}" if project is not None else ""))
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


def _project_json(project: Project) -> dict:
    """A project as the project commands print it."""
    return {"id": project.id, "name": project.name, "rating_scale": list(project.rating_scale),
            "flags": list(project.flags), "instructions_chars": len(project.instructions)}
