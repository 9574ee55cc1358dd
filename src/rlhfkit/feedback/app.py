"""The human-feedback web app: FastAPI, server-rendered Jinja2 pages and a little plain JavaScript.

Labelers log in and work through a queue per project: write a demonstration for a prompt; rate each of K
outputs on the project's scale (1-7 by default), flag it (by default: fails the instruction, harmful, made-up
facts: InstructGPT's labeling interface) and rank them, ties allowed, by drag and drop, buttons or keyboard;
judge A/B pairs; or skip with a reason. Every task shows its project's instructions, written in Markdown
(:func:`render_markdown`: raw HTML in them is shown as text). An admin creates, changes and renames projects,
creates accounts, imports items into a project, reviews answers, watches progress, agreement and open
assignments and exports datasets (all projects or one). Every page
works with the keyboard alone; the JavaScript (``static/app.js``) only adds drag and drop and shortcuts.

A ranking item shows its outputs in an order shuffled per labeler and item (the same on every reload);
the form's fields follow the positions shown (output A is the first card) and :func:`ranking_payload`
maps them back to the item's indices. The ranking starts empty and must be given; a ranking that
contradicts the ratings is saved only once the labeler confirms it. A different second answer is refused
(409) and the page shows the answer that stands; the labeler changes it with "Edit" until an admin has
reviewed it, and every version is kept.

Pages: ``/login``, ``/logout`` (POST), ``/account`` (change the password; make and revoke API tokens:
``/account/tokens``, ``/account/tokens/{id}/revoke``), ``/queue`` (the projects with their progress),
``/next?kind=K&project=ID`` (assign or resume an item of kind K in project ID; any project without it),
``/items/{id}`` (GET shows, ``?edit=1`` to change the answer; POST answers or, with ``edit=1``, changes it),
``/items/{id}/skip`` (POST), ``/admin``, ``/admin/users`` (the accounts; POST creates one),
``/admin/users/{id}/active`` and ``/admin/users/{id}/password`` (POST: deactivate or reactivate, set a new
password), ``/admin/tokens/{id}/revoke`` (POST), ``/admin/projects`` (POST: create a project),
``/admin/projects/{id}`` (POST: change or rename it), ``/admin/import`` (POST, into a project), ``/admin/review``
(answers to accept or reject, searched and filtered, a page at a time, with each labeler's progress, time per item and
agreement), ``/admin/answers/{id}/review`` (POST), ``/admin/assignments/release`` (POST),
``/admin/export/{kind}?project=NAME`` (one project's answers; every project's without it),
``/admin/agreement.json``. ``/admin``, ``/admin/review``, ``/admin/agreement.json`` and the release form take a
project (``?project=NAME``, a select on the pages): the reports, answers and assignments of that project alone.
JSON API (the same session cookie and the CSRF token in the ``X-CSRF-Token`` header, or an API token in
``Authorization: Bearer <token>``, which needs no CSRF token): ``POST /api/login``, ``GET /api/me``,
``POST /api/me/password``, ``GET|POST /api/tokens``, ``POST /api/tokens/{id}/revoke``,
``GET /api/next?kind=K&project=NAME``,
``GET|POST|PUT /api/items/{id}/answer`` (read with its history, answer, change), ``POST /api/items/{id}/skip``,
``GET /api/admin/users``, ``POST /api/admin/users/{id}/active``, ``POST /api/admin/users/{id}/password``,
``GET /api/admin/tokens``, ``GET|POST /api/admin/projects``, ``PUT /api/admin/projects/{id}`` (change or rename),
``GET /api/admin/progress?project=NAME``, ``GET /api/admin/answers?project=NAME``,
``POST /api/admin/answers/{id}/review``, ``GET /api/admin/assignments?project=NAME``,
``POST /api/admin/assignments/release`` (``{"project": NAME}`` among its filters),
``GET /api/admin/users?project=NAME``.
In the API a ranking is always in the item's indices; the item carries ``shown_order``, the order to show its
completions in, and its ``project`` (name, instructions, rating scale and flags).

Security: argon2 password hashes; server-side sessions (the signed HttpOnly ``SameSite=Strict`` cookie
holds a random token, ended on the server at logout, at a password change and when an admin deactivates the
account or sets its password); API tokens stored as SHA-256 only, refused once revoked or while their account
is deactivated, and taken on the JSON API alone (a request with one is never authenticated by its cookie, so
it needs no CSRF token); a CSRF token on every
state-changing request; the admin role checked on every admin route; a labeler reaches only the items
assigned to them (any other item is a 404, so ids are not probed); login back-off per account and client
(a correct password from another client is never locked out) and per client; request size limits (a few
KiB but for answers and imports) and a 400 for malformed or too deeply nested JSON; Jinja2 autoescaping
of all user text plus a Content-Security-Policy that allows no inline script. Every answer is one store
transaction (:mod:`rlhfkit.feedback.store`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.data.readers import json_line
from rlhfkit.data.records import DataError
from rlhfkit.feedback.common import DEFAULT_PROJECT, OLD_EXPORT_KINDS, import_kind, parse_flags, parse_rating_scale
from rlhfkit.feedback.imports import IMPORT_KINDS, import_file
from rlhfkit.feedback.security import (
    MIN_PASSWORD_LENGTH,
    LoginRateLimiter,
    csrf_token_matches,
    hash_password,
    new_csrf_token,
    verify_password,
    warm_up,
)
from rlhfkit.feedback.store import (
    EXPORT_KINDS,
    FLAGS,
    ITEM_KINDS,
    RATING_RANGE,
    REVIEW_VERDICTS,
    ROLES,
    Answer,
    AnswerConflict,
    ApiToken,
    Item,
    NotAssigned,
    Project,
    Store,
    StoreError,
    User,
    contradictions,
    shown_order,
    validate_answer,
)

HERE = Path(__file__).parent
MAX_ANSWER_BYTES = 1024 * 1024  # an answer or skip (a demonstration is at most 100,000 characters)
MAX_FORM_FIELD_BYTES = 1024 * 1024  # one form field
MAX_JSON_DEPTH = 16  # the deepest JSON body accepted (answers need 3 levels)
ANSWER_ROUTE = re.compile(r"/(api/)?items/\d+(/answer|/skip)?")  # the routes that take MAX_ANSWER_BYTES
IMPORT_ROUTE = "/admin/import"
REVIEW_PAGE_SIZE = 50
SESSION_COOKIE = "rlhfkit_session"
SESSION_MAX_AGE_S = 12 * 3600
FLAG_LABELS = {"fails_instruction": "Fails to follow the instruction", "harmful": "Harmful or offensive",
               "made_up_facts": "Makes up facts"}
FLAG_KEYS = {"fails_instruction": "f", "harmful": "h", "made_up_facts": "m"}  # shortcut keys on the ranking page
RESERVED_KEYS = frozenset("jk")  # the ranking page's keys to move between outputs: never a flag's
IMPORT_KIND_LABELS = {"prompts": "prompts: write demonstrations",
                      "samples": "samples (K outputs per prompt): rate and rank",
                      "ab": "A/B pairs: judge which is better"}
EXPORT_KIND_LABELS = {"demonstrations": "demonstrations", "rankings": "rankings (with ratings and flags)",
                      "pairs-from-rankings": "chosen/rejected pairs drawn from the rankings",
                      "ab": "verdicts of the A/B pairs"}
KIND_TITLES = {"demonstration": "Write demonstrations", "ranking": "Rate and rank outputs", "ab": "Judge A/B pairs"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


@dataclass(frozen=True)
class AppSettings:
    """The server's settings; :meth:`from_env` reads them from ``RLHFKIT_*`` environment variables.

    Attributes:
        assignment_ttl_minutes: an item opened but not answered within this time goes to the next
            labeler who asks (``RLHFKIT_ASSIGNMENT_TTL_MINUTES``; 0 never expires).
        max_body_kib: the largest request body of every route but answers and imports
            (``RLHFKIT_MAX_BODY_KIB``); answers and skips take up to 1 MiB.
        max_import_mib: the largest import upload (``RLHFKIT_MAX_IMPORT_MIB``).
    """

    assignment_ttl_minutes: float = 120.0
    max_body_kib: int = 16
    max_import_mib: int = 32

    def __post_init__(self) -> None:
        if self.assignment_ttl_minutes < 0:
            raise ValueError(f"assignment_ttl_minutes must be 0 (never) or more, got {self.assignment_ttl_minutes}")
        if self.max_body_kib < 1 or self.max_import_mib < 1:
            raise ValueError("max_body_kib and max_import_mib must be at least 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AppSettings:
        """The settings, each from its environment variable where it is set; a bad value is a ValueError."""
        values: dict[str, Any] = {}
        for field, kind in (("assignment_ttl_minutes", float), ("max_body_kib", int), ("max_import_mib", int)):
            name = f"RLHFKIT_{field.upper()}"
            if environ.get(name, "").strip():
                try:
                    values[field] = kind(environ[name])
                except ValueError:
                    raise ValueError(f"{name}={environ[name]!r} is not a{'n integer' if kind is int else ' number'}"
                                     ) from None
        return cls(**values)

    @property
    def assignment_ttl(self) -> timedelta | None:
        return timedelta(minutes=self.assignment_ttl_minutes) if self.assignment_ttl_minutes else None

    def max_body_bytes(self, path: str) -> int:
        """The largest body accepted on ``path``."""
        if path == IMPORT_ROUTE:
            return self.max_import_mib * 2**20
        if ANSWER_ROUTE.fullmatch(path):
            return MAX_ANSWER_BYTES
        return self.max_body_kib * 2**10


class LoginRequired(Exception):
    """The request needs a logged-in, active user."""


class LoginRefused(Exception):
    """Wrong credentials (401) or too many failed logins (429, with the seconds to wait)."""

    def __init__(self, message: str, status: int, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


# ------------------------------------------------------------------------------------------ middleware


class _SecurityHeaders:
    """Adds the security headers to every response, and ``Cache-Control: no-store`` to all but static files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _BodySizeLimit:
    """Refuses request bodies over the route's limit (:meth:`AppSettings.max_body_bytes`) with 413, by
    Content-Length before the app runs, or while they stream in."""

    def __init__(self, app: ASGIApp, settings: AppSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.settings.max_body_bytes(scope["path"])
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > max_bytes:
            await JSONResponse({"error": _too_large_message(max_bytes)}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise HTTPException(413, _too_large_message(max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def _too_large_message(max_bytes: int) -> str:
    size = f"{max_bytes // 2**20} MiB" if max_bytes >= 2**20 else f"{max_bytes // 2**10} KiB"
    return f"the request is larger than {size}"


def _json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        current, depth = stack.pop()
        children = current.values() if isinstance(current, dict) else current if isinstance(current, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_body(body: bytes) -> Any:
    """A request's JSON body; 400 when it is not JSON or nests deeper than :data:`MAX_JSON_DEPTH`."""
    try:
        value = json.loads(body)
    except RecursionError:  # nested so deep that the parser gave up
        raise HTTPException(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        raise HTTPException(400, f"the body is not valid JSON: {error}") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise HTTPException(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return value


# ------------------------------------------------------------------------------------- forms -> payloads


def _letter(index: int) -> str:
    """A, B, C, ... for the outputs of an item (AA, AB, ... past Z)."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return letters


@dataclass(frozen=True)
class Choice:
    """A rating or flag on the ranking page: its value, the label shown and its shortcut key (None: no key)."""

    value: Any
    label: str
    key: str | None


def flag_label(flag: str) -> str:
    """How a flag is shown: the default flags' descriptions, any other flag as its project names it."""
    return FLAG_LABELS.get(flag, flag)


def rating_choices(project: Project) -> list[Choice]:
    """The ratings of the project's scale, lowest first, each keyed by its digit (10 by 0 where the scale has no 0)."""
    low = project.rating_scale[0]
    return [Choice(value, str(value), str(value % 10) if value < 10 or low > 0 else None)
            for value in project.ratings]


def flag_choices(project: Project) -> list[Choice]:
    """The project's flags in its order, each with a shortcut key: a default flag its own (f, h, m), any other
    the first letter of its name that no other flag (and not j or k, which move between outputs) has taken."""
    taken = set(RESERVED_KEYS) | {FLAG_KEYS[flag] for flag in project.flags if flag in FLAG_KEYS}
    keys: dict[str, str | None] = {}
    for flag in project.flags:
        key = FLAG_KEYS.get(flag) or next((c for c in flag.lower() if "a" <= c <= "z" and c not in taken), None)
        taken.add(key)
        keys[flag] = key
    return [Choice(flag, flag_label(flag), keys[flag]) for flag in project.flags]


def _markdown_renderer() -> MarkdownIt:
    """CommonMark without raw HTML (``<script>`` is shown as text), a line break where the text has one (plain-text
    instructions keep their lines), and links that open without handing over this page (``rel="noopener
    noreferrer"``). Links with unsafe schemes (``javascript:``) stay text; the CSP blocks other sites' images."""
    markdown = MarkdownIt("commonmark", {"html": False, "breaks": True})

    def link_open(renderer, tokens, index, options, env) -> str:
        tokens[index].attrSet("rel", "noopener noreferrer")
        return renderer.renderToken(tokens, index, options, env)

    markdown.add_render_rule("link_open", link_open)
    return markdown


_MARKDOWN = _markdown_renderer()


def render_markdown(text: str) -> Markup:
    """A project's instructions (Markdown) as safe HTML for the pages (the templates' ``markdown`` filter)."""
    return Markup(_MARKDOWN.render(text))


def _form_int(form: FormData, name: str, field: str, what: str) -> int:
    value = form.get(name)
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"choose {what}", field=field)
    try:
        return int(value)
    except ValueError:
        raise StoreError(f"{value[:20]!r} is not a whole number", field=field) from None


def ranking_payload(form: FormData, order: list[int]) -> dict:
    """The store payload of a ranking form, in the item's indices.

    The form's fields follow the positions shown: ``rating_p`` (on the project's scale), ``flags_p`` (checkboxes) and
    ``rank_p`` for the output shown at position p, which is the item's completion ``order[p]``. ``rank_p``
    is its place, 1 for the best; equal places are ties, and places need not be consecutive (1, 1, 3 means
    the first two tie above the third). Every output needs a place: the ranking starts empty. Fields are
    named as the labeler sees them ("output B").
    """
    k = len(order)
    ratings: list[int] = [0] * k
    flags: list[list[str]] = [[] for _ in range(k)]
    places: dict[int, int] = {}
    for position, index in enumerate(order):
        output = f"output {_letter(position)}"
        ratings[index] = _form_int(form, f"rating_{position}", f"{output} rating", "a rating")
        flags[index] = [value for value in form.getlist(f"flags_{position}") if isinstance(value, str)]
        place = _form_int(form, f"rank_{position}", f"{output} place",
                          "a place: rank every output (drag the cards, or “Rank as shown”)")
        if place < 1:
            raise StoreError("must be 1 (the best) or more", field=f"{output} place")
        places[index] = place
    groups = [sorted(index for index in places if places[index] == place) for place in sorted(set(places.values()))]
    return {"ratings": ratings, "flags": flags, "ranking": groups}


def ranking_form_values(payload: dict, order: list[int]) -> dict[str, Any]:
    """The ranking form's field values (by position shown) that give back ``payload``: to edit an answer."""
    place_of, place = {}, 1
    for group in payload["ranking"]:
        for index in group:
            place_of[index] = place
        place += len(group)
    values: dict[str, Any] = {}
    for position, index in enumerate(order):
        values[f"rating_{position}"] = str(payload["ratings"][index])
        values[f"rank_{position}"] = str(place_of[index])
        values[f"flags_{position}"] = list(payload["flags"][index])
    return values


def contradiction_messages(payload: dict, order: list[int]) -> list[str]:
    """Where a ranking answer contradicts its own ratings, in the labeler's letters ([] when it does not)."""
    position = {index: place for place, index in enumerate(order)}
    ratings = payload["ratings"]
    return [f"output {_letter(position[high])} is rated {ratings[high]} but ranked below output "
            f"{_letter(position[low])}, rated {ratings[low]}"
            for high, low in contradictions(ratings, payload["ranking"])]


def answer_summary(item: Item, payload: dict, skipped: bool, order: list[int] | None) -> list[tuple[str, str]]:
    """An answer as the labeler gave it, as (label, text) rows: their letters, places and words, no JSON."""
    if skipped:
        return [("Skipped because", payload["reason"])]
    if item.kind == "demonstration":
        return [("Your response", payload["completion"])]
    if item.kind == "ab":
        return [("Verdict", {"a": "A is better", "b": "B is better", "tie": "Tie"}[payload["verdict"]])]
    shown = order or list(range(len(item.completions)))
    letter_of = {index: _letter(position) for position, index in enumerate(shown)}
    ranking = " > ".join(" = ".join(sorted(letter_of[index] for index in group)) for group in payload["ranking"])
    rows = [("Ranking, best first", ranking)]
    for position, index in enumerate(shown):
        chosen = ", ".join(flag_label(flag) for flag in payload["flags"][index]) or "no flags"
        rows.append((f"Output {_letter(position)}", f"rated {payload['ratings'][index]}; {chosen}"))
    return rows


def form_payload(item: Item, form: FormData, order: list[int] | None) -> dict:
    """The store payload of the answer form of ``item`` (a ranking shown in ``order``); :class:`StoreError`
    names a missing field."""
    if item.kind == "demonstration":
        completion = form.get("completion")
        text = completion if isinstance(completion, str) else ""
        return {"completion": text.replace("\r\n", "\n")}  # browsers send a textarea's newlines as CRLF
    if item.kind == "ab":
        return {"verdict": form.get("verdict")}
    return ranking_payload(form, order)


def _next_url(item: Item) -> str:
    """Where the labeler goes after ``item``: the next item of its kind in its project."""
    return f"/next?{urlencode({'kind': item.kind, 'project': item.project_id})}"


def _order(user: User, item: Item) -> list[int] | None:
    """The order in which the user sees a ranking item's outputs (None for other kinds)."""
    return shown_order(user.id, item.id, len(item.completions)) if item.kind == "ranking" else None


def _item_json(user: User, item: Item, project: Project) -> dict:
    """What a labeler sees of an item (of ``project``): never its meta (which model wrote what) nor its gold
    ranking."""
    return {"id": item.id, "kind": item.kind, "prompt": item.prompt, "completions": item.completions,
            "shown_order": _order(user, item), "project": _project_json(project)}


def _project_json(project: Project) -> dict:
    return {"id": project.id, "name": project.name, "instructions": project.instructions,
            "rating_scale": list(project.rating_scale), "flags": list(project.flags)}


def _answer_json(answer: Answer) -> dict:
    return {"id": answer.id, "item_id": answer.item_id, "payload": answer.payload, "skipped": answer.skipped,
            "created_at": answer.created_at.isoformat(), "shown_order": answer.shown_order,
            "version": answer.version, "status": answer.status}


def _token_json(token: ApiToken) -> dict:
    return {"id": token.id, "name": token.name, "username": token.username, "created_at": token.created_at.isoformat(),
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None}


def _ranking_warnings(item: Item, payload: dict) -> list[str]:
    """The API's warnings about an accepted answer: where a ranking contradicts its ratings (item indices)."""
    if item.kind != "ranking":
        return []
    ratings = payload["ratings"]
    return [f"completion {high} is rated {ratings[high]} but ranked below completion {low}, rated {ratings[low]}"
            for high, low in contradictions(ratings, payload["ranking"])]


def _safe_next(target: str | None, default: str) -> str:
    """A local path to go to after logging in: never another site (``//host``, ``https://...``)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


def _home(user: User) -> str:
    """Where a user lands: admins on the admin page, labelers on their queue."""
    return "/admin" if user.role == "admin" else "/queue"


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def bearer_token(request: Request) -> str | None:
    """The API token of a JSON API request's ``Authorization: Bearer <token>`` header; None without the header
    (and on pages, which take no tokens); 401 for another kind of Authorization header."""
    header = request.headers.get("authorization")
    if header is None or not _wants_json(request):
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "expected the header Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


# --------------------------------------------------------------------------------------------- the app


def draft_key(user_id: int, item_id: int) -> str:
    """The browser's localStorage key of a labeler's unsaved answer to an item (static/app.js keeps it)."""
    return f"rlhfkit-draft:{user_id}:{item_id}"


def create_app(store: Store, *, secret_key: str | None = None, https_only: bool = False,
               rate_limiter: LoginRateLimiter | None = None, settings: AppSettings | None = None) -> FastAPI:
    """The web app over ``store``.

    Args:
        store: the feedback database (shared by the request threads; it also holds the login sessions).
        secret_key: signs the session cookies; random by default (a restart then logs everyone out;
            `rlhfkit serve` passes the one kept in its session key file).
        https_only: mark the session cookie ``Secure`` (serve behind HTTPS).
        rate_limiter: the login back-off (:class:`LoginRateLimiter`'s defaults when not given).
        settings: assignment expiry and body size limits; :meth:`AppSettings.from_env` when not given.
    """
    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None)
    warm_up()  # the unknown-account hash, ready before the first login
    limiter = rate_limiter or LoginRateLimiter()
    settings = settings or AppSettings.from_env()
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    environment.filters["markdown"] = render_markdown
    environment.filters["json_text"] = lambda value: json.dumps(value, ensure_ascii=False)  # autoescaped after
    environment.globals.update(letter=_letter, kind_titles=KIND_TITLES, roles=ROLES,
                               import_kinds=[(kind, IMPORT_KIND_LABELS[kind]) for kind in IMPORT_KINDS],
                               export_kinds=[(kind, EXPORT_KIND_LABELS[kind]) for kind in EXPORT_KINDS],
                               item_kinds=ITEM_KINDS, draft_key=draft_key)
    templates = Jinja2Templates(env=environment)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # The last middleware added is the outermost: the size limit runs first.
    app.add_middleware(SessionMiddleware, secret_key=secret_key or secrets.token_urlsafe(32),
                       session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE_S, same_site="strict",
                       https_only=https_only)
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_BodySizeLimit, settings=settings)

    # ----------------------------------------------------------------------- sessions, roles, CSRF

    def csrf_token(request: Request) -> str:
        """The session's CSRF token, created on first use."""
        if "csrf" not in request.session:
            request.session["csrf"] = new_csrf_token()
        return request.session["csrf"]

    def session_user(request: Request) -> User | None:
        """The user of the request's server-side session, if it is still open (and the user active)."""
        token = request.session.get("token")
        return store.session_user(token) if isinstance(token, str) else None

    def current_user(request: Request) -> User:
        """The user of the request: its API token's (``Authorization: Bearer``, JSON API only: then the token
        alone counts, never the cookie) or its session's; else 401 (API) or the login page."""
        token = bearer_token(request)
        if token is not None:
            user = store.token_user(token)
            if user is None:
                raise HTTPException(401, "the API token is unknown or revoked, or its account is deactivated",
                                    headers={"WWW-Authenticate": "Bearer"})
            return user
        user = session_user(request)
        if user is None:
            request.session.pop("token", None)
            raise LoginRequired()
        return user

    def current_admin(user: User = Depends(current_user)) -> User:
        if user.role != "admin":
            raise HTTPException(403, "this page is for admins only")
        return user

    async def form_data(request: Request) -> FormData:
        return await request.form(max_part_size=MAX_FORM_FIELD_BYTES)

    async def csrf_protected(request: Request) -> None:
        """Every state-changing request carries the session's CSRF token (header or form field), but for
        requests with an API token: no browser adds that header to a request of another site, and such a
        request is never authenticated by its cookie (:func:`current_user`)."""
        if bearer_token(request) is not None:
            return
        submitted = request.headers.get("x-csrf-token")
        if submitted is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            submitted = (await form_data(request)).get("csrf_token")
        if not csrf_token_matches(request.session.get("csrf"), submitted if isinstance(submitted, str) else None):
            raise HTTPException(403, "the form is missing its security token or it expired: reload the page")

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        if "user" not in context:
            context["user"] = session_user(request)
        flashes = request.session.pop("flash", [])
        # the item whose answer (or skip) was just stored: the page tells the browser to drop its draft
        saved_item = request.session.pop("saved_item", None)
        context.setdefault("saved_draft", draft_key(context["user"].id, saved_item)
                           if context["user"] is not None and isinstance(saved_item, int) else None)
        return templates.TemplateResponse(request, name, {"csrf_token": csrf_token(request), "flashes": flashes,
                                                          **context}, status_code=status_code)

    def flash(request: Request, level: str, text: str) -> None:
        request.session["flash"] = [*request.session.get("flash", []), [level, text]]

    def redirect(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)

    def start_session(request: Request, user: User) -> None:
        """A fresh cookie session (and CSRF token) bound to a new server-side session: no session fixation."""
        request.session.clear()
        request.session["token"] = store.create_session(user.id, timedelta(seconds=SESSION_MAX_AGE_S))
        request.session["csrf"] = new_csrf_token()

    def end_session(request: Request) -> None:
        token = request.session.get("token")
        if isinstance(token, str):
            store.end_session(token)
        request.session.clear()

    def authenticate(request: Request, username: str, password: str) -> User:
        """Log the user in, or :class:`LoginRefused`; failures are counted per account and client."""
        client = request.client.host if request.client else "unknown"
        wait = limiter.retry_after(username, client)
        if wait:
            raise LoginRefused(f"Too many failed logins: try again in {wait} seconds.", 429, retry_after=wait)
        user = store.user_by_name(username) if username else None
        if not verify_password(user.password_hash if user else None, password) or not user.active:
            limiter.failed(username, client)
            raise LoginRefused("Wrong user name or password.", 401)
        limiter.succeeded(username, client)
        start_session(request, user)
        return user

    def change_password(request: Request, user: User, current: str, new: str) -> None:
        """Check the current password, store the new one and end every session of the user; this client
        gets a fresh session (unless it came with an API token). :class:`StoreError` names the bad field."""
        if not verify_password(user.password_hash, current):
            raise StoreError("is wrong", field="current password")
        set_password(user, new, field="new password")
        if bearer_token(request) is None:
            start_session(request, user)

    def set_password(user: User, new: str, *, field: str) -> None:
        """Store a new password (at least :data:`MIN_PASSWORD_LENGTH` characters) and end every session of the
        user. :class:`StoreError` names ``field`` when it is too short."""
        if len(new) < MIN_PASSWORD_LENGTH:
            raise StoreError(f"must be at least {MIN_PASSWORD_LENGTH} characters", field=field)
        store.set_password(user.id, hash_password(new))

    def account_of(user_id: int) -> User:
        """The account an admin route names, or 404."""
        account = store.user(user_id)
        if account is None:
            raise HTTPException(404, f"no account with id {user_id}")
        return account

    def set_active(admin: User, account: User, active: bool) -> User:
        """Deactivate or reactivate an account (:meth:`Store.set_active`); an admin cannot deactivate themself
        (:class:`StoreError`), so there is always someone left to reactivate accounts."""
        if account.id == admin.id and not active:
            raise StoreError("you cannot deactivate your own account", field="active")
        return store.set_active(account.id, active)

    # -------------------------------------------------------------------------------- error pages

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _error: LoginRequired) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": "log in first"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return redirect(f"/login?next={quote(target, safe='')}")

    @app.exception_handler(NotAssigned)
    async def not_assigned(request: Request, _error: NotAssigned) -> Response:
        message = "no such item in your queue (an item left unanswered goes to another labeler after a while)"
        return await http_error(request, StarletteHTTPException(404, message))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)
        return render(request, "error.html", status_code=error.status_code, status=error.status_code,
                      message=error.detail)

    # ------------------------------------------------------------------------------ log in and out

    @app.get("/")
    def home(request: Request) -> Response:
        user = current_user(request)
        return redirect(_home(user))

    @app.get("/login")
    def login_page(request: Request, next: str = "") -> Response:
        return render(request, "login.html", next=_safe_next(next, ""), error=None, username="")

    @app.post("/login", dependencies=[Depends(csrf_protected)])
    def login(request: Request, form: FormData = Depends(form_data)) -> Response:
        username, password = str(form.get("username", "")), str(form.get("password", ""))
        target = str(form.get("next", ""))
        try:
            user = authenticate(request, username, password)
        except LoginRefused as refused:
            response = render(request, "login.html", status_code=refused.status, next=_safe_next(target, ""),
                              error=refused.message, username=username)
            if refused.retry_after:
                response.headers["Retry-After"] = str(refused.retry_after)
            return response
        return redirect(_safe_next(target, _home(user)))

    @app.post("/logout", dependencies=[Depends(csrf_protected)])
    def logout(request: Request) -> Response:
        end_session(request)
        return redirect("/login")

    def account_page(request: Request, user: User, *, status_code: int = 200, error: StoreError | None = None,
                     new_token: tuple[ApiToken, str] | None = None) -> Response:
        """The user's account page: the password form and their API tokens (a new one's secret shown once)."""
        return render(request, "account.html", status_code=status_code, user=user, error=error,
                      min_password_length=MIN_PASSWORD_LENGTH, tokens=store.tokens(user.id), new_token=new_token)

    @app.get("/account")
    def account(request: Request, user: User = Depends(current_user)) -> Response:
        return account_page(request, user)

    @app.post("/account/password", dependencies=[Depends(csrf_protected)])
    def account_password(request: Request, user: User = Depends(current_user),
                         form: FormData = Depends(form_data)) -> Response:
        try:
            change_password(request, user, str(form.get("current_password", "")), str(form.get("new_password", "")))
        except StoreError as error:
            return account_page(request, user, status_code=422, error=error)
        flash(request, "success", "Password changed; every other session of yours was logged out.")
        return redirect("/account")

    @app.post("/account/tokens", dependencies=[Depends(csrf_protected)])
    def create_token(request: Request, user: User = Depends(current_user),
                     form: FormData = Depends(form_data)) -> Response:
        """A new API token, its secret on this page only (never put in a redirect or the cookie)."""
        try:
            new_token = store.create_token(user.id, str(form.get("name", "")))
        except StoreError as error:
            return account_page(request, user, status_code=422, error=StoreError(error.message, field="token name"))
        return account_page(request, user, new_token=new_token)

    @app.post("/account/tokens/{token_id}/revoke", dependencies=[Depends(csrf_protected)])
    def revoke_own_token(request: Request, token_id: int, user: User = Depends(current_user)) -> Response:
        try:
            token = store.revoke_token(token_id, user_id=user.id)
        except StoreError as error:
            raise HTTPException(404, error.message) from None
        flash(request, "success", f"Revoked the API token “{token.name}”.")
        return redirect("/account")

    # ------------------------------------------------------------------------------- labeler pages

    @app.get("/queue")
    def queue(request: Request, user: User = Depends(current_user)) -> Response:
        """The projects with items, each with its kinds of work, the team's progress and the user's own."""
        projects = []
        for project in store.projects():
            progress = {row["kind"]: row for row in store.progress(project.id)}
            if any(row["items"] for row in progress.values()):
                projects.append({"project": project, "progress": progress,
                                 "mine": store.user_progress(user.id, project.id)})
        return render(request, "queue.html", user=user, projects=projects)

    @app.get("/next")
    def next_item(request: Request, kind: str, project: int | None = None,
                  user: User = Depends(current_user)) -> Response:
        """The user's next item of ``kind`` in project ``project`` (any project's without it)."""
        if kind not in ITEM_KINDS:
            raise HTTPException(404, f"no such kind of work: {kind}")
        try:
            item = store.next_item(user.id, kind, project_id=project, assignment_ttl=settings.assignment_ttl)
        except StoreError as error:
            raise HTTPException(404, error.message) from None
        if item is None:
            flash(request, "info", f"Nothing left to do in “{KIND_TITLES[kind]}”. Thank you!")
            return redirect("/queue")
        return redirect(f"/items/{item.id}")

    def item_page(request: Request, user: User, item: Item, *, status_code: int = 200, editing: bool = False,
                  error: StoreError | None = None, conflict: str | None = None, warnings: list[str] = (),
                  form: FormData | None = None) -> Response:
        """The item with its project's instructions: its answer form (empty, as entered, or the answer to edit;
        ratings and flags as the project has them), or the answer with its history."""
        order = _order(user, item)
        project = store.project(item.project_id)
        answer = store.answer_of(user.id, item.id)
        editable = answer is not None and not answer.skipped and answer.status == "submitted"
        editing = editing and editable
        values = _form_values(item, form, order)
        if editing and form is None:
            values.update(ranking_form_values(answer.payload, order) if item.kind == "ranking"
                          else {"completion": answer.payload.get("completion", "")})
        # an answer is shown in the order it was given in (answers from before shuffling have none: as imported)
        history = [(version, answer_summary(item, version.payload, version.skipped, answer.shown_order))
                   for version in store.history(answer.id)] if answer is not None else []
        summary = answer_summary(item, answer.payload, answer.skipped, answer.shown_order) if answer else None
        return render(request, "item.html", status_code=status_code, user=user, item=item, order=order,
                      answer=answer, editing=editing, editable=editable, history=history, error=error,
                      conflict=conflict, warnings=list(warnings), values=values, summary=summary, project=project,
                      ratings=rating_choices(project), flags=flag_choices(project),
                      next_url=_next_url(item))

    @app.get("/items/{item_id}")
    def show_item(request: Request, item_id: int, edit: bool = False, user: User = Depends(current_user)) -> Response:
        return item_page(request, user, store.assigned_item(user.id, item_id), editing=edit)

    @app.post("/items/{item_id}", dependencies=[Depends(csrf_protected)])
    def answer_item(request: Request, item_id: int, user: User = Depends(current_user),
                    form: FormData = Depends(form_data)) -> Response:
        item = store.assigned_item(user.id, item_id)
        editing, order = form.get("edit") == "1", _order(user, item)
        try:
            payload = validate_answer(item, form_payload(item, form, order), store.project(item.project_id))
            warnings = contradiction_messages(payload, order) if order is not None else []
            if warnings and form.get("confirm_contradiction") != "1":
                return item_page(request, user, item, editing=editing, warnings=warnings, form=form)
            (store.edit if editing else store.submit)(user.id, item.id, payload)
        except StoreError as error:
            return item_page(request, user, item, status_code=422, editing=editing, error=error, form=form)
        except AnswerConflict as conflict:
            return item_page(request, user, item, status_code=409, conflict=conflict.message)
        flash(request, "success", "Changed." if editing else "Saved.")
        request.session["saved_item"] = item.id
        return redirect(f"/items/{item.id}" if editing else _next_url(item))

    @app.post("/items/{item_id}/skip", dependencies=[Depends(csrf_protected)])
    def skip_item(request: Request, item_id: int, user: User = Depends(current_user),
                  form: FormData = Depends(form_data)) -> Response:
        item = store.assigned_item(user.id, item_id)
        try:
            store.skip(user.id, item.id, str(form.get("reason", "")))
        except StoreError as error:
            return item_page(request, user, item, status_code=422, form=form,
                             error=StoreError(error.message, field="skip reason"))
        except AnswerConflict as conflict:
            return item_page(request, user, item, status_code=409, conflict=conflict.message)
        flash(request, "info", "Skipped.")
        request.session["saved_item"] = item.id
        return redirect(_next_url(item))

    # --------------------------------------------------------------------------------- admin pages

    def named_project(name: str) -> Project:
        """The project a request names, or 404."""
        found = store.project_by_name(name)
        if found is None:
            raise HTTPException(404, f"no project named {name[:64]!r}")
        return found

    def chosen_project(name: str | None) -> Project | None:
        """The project a page's ``?project=NAME`` chooses: None (every project) without a name, else 404 when
        there is no such project."""
        return named_project(name) if name else None

    @app.get("/admin")
    def admin(request: Request, project: str = "", user: User = Depends(current_admin)) -> Response:
        """Progress, agreement and open assignments (of every project, or of the one named ``project``); the
        projects, with their settings and exports; import and export."""
        chosen = chosen_project(project)
        project_id = chosen.id if chosen else None
        projects = [{"project": found, "progress": store.progress(found.id)} for found in store.projects()]
        return render(request, "admin.html", user=user, chosen=chosen, progress=store.progress(project_id),
                      agreement=store.agreement(project_id=project_id), projects=projects,
                      default_flags=", ".join(FLAGS), default_scale="{}-{}".format(*RATING_RANGE),
                      users=store.users(), min_password_length=MIN_PASSWORD_LENGTH,
                      open_assignments=store.open_assignments(project_id), settings=settings,
                      project_query=urlencode({"project": chosen.name}) if chosen else "")

    @app.get("/admin/users")
    def users_page(request: Request, admin: User = Depends(current_admin)) -> Response:
        """The accounts: create, deactivate or reactivate, reset a password; every API token, to revoke."""
        return render(request, "users.html", user=admin, accounts=store.labeler_stats(), tokens=store.tokens(),
                      min_password_length=MIN_PASSWORD_LENGTH)

    @app.post("/admin/users", dependencies=[Depends(csrf_protected)])
    def create_user(request: Request, _admin: User = Depends(current_admin),
                    form: FormData = Depends(form_data)) -> Response:
        username, password, role = (str(form.get(name, "")) for name in ("username", "password", "role"))
        try:
            if len(password) < MIN_PASSWORD_LENGTH:
                raise StoreError(f"must be at least {MIN_PASSWORD_LENGTH} characters", field="password")
            created = store.create_user(username, hash_password(password), role)
        except StoreError as error:
            flash(request, "error", f"Account not created: {error}")
        else:
            flash(request, "success", f"Created the {created.role} account “{created.username}”.")
        return redirect("/admin/users")

    @app.post("/admin/users/{user_id}/active", dependencies=[Depends(csrf_protected)])
    def set_active_form(request: Request, user_id: int, admin: User = Depends(current_admin),
                        form: FormData = Depends(form_data)) -> Response:
        account = account_of(user_id)
        try:
            changed = set_active(admin, account, form.get("active") == "1")
        except StoreError as error:
            flash(request, "error", f"Not changed: {error.message}.")
        else:
            flash(request, "success", f"Reactivated “{changed.username}”." if changed.active else
                  f"Deactivated “{changed.username}”: logged out, open assignments released, API tokens refused.")
        return redirect("/admin/users")

    @app.post("/admin/users/{user_id}/password", dependencies=[Depends(csrf_protected)])
    def reset_password_form(request: Request, user_id: int, _admin: User = Depends(current_admin),
                            form: FormData = Depends(form_data)) -> Response:
        account = account_of(user_id)
        try:
            set_password(account, str(form.get("new_password", "")), field="new password")
        except StoreError as error:
            flash(request, "error", f"Password of “{account.username}” not changed: {error}")
        else:
            flash(request, "success", f"New password set for “{account.username}”; every session of theirs ended.")
        return redirect("/admin/users")

    @app.post("/admin/tokens/{token_id}/revoke", dependencies=[Depends(csrf_protected)])
    def revoke_token_form(request: Request, token_id: int, _admin: User = Depends(current_admin)) -> Response:
        try:
            token = store.revoke_token(token_id)
        except StoreError as error:
            raise HTTPException(404, error.message) from None
        flash(request, "success", f"Revoked the API token “{token.name}” of {token.username}.")
        return redirect("/admin/users")

    @app.post("/admin/import", dependencies=[Depends(csrf_protected)])
    def import_items(request: Request, _admin: User = Depends(current_admin),
                     form: FormData = Depends(form_data)) -> Response:
        upload, (kind, deprecated) = form.get("file"), import_kind(str(form.get("kind", "")))
        try:
            replicas = int(str(form.get("replicas", "1")))
        except ValueError:
            replicas = 0
        chosen = str(form.get("project") or "")  # the project's id; none: the default project
        if not chosen:
            project = store.project_by_name(DEFAULT_PROJECT)
        else:
            project = store.project(int(chosen)) if chosen.isdigit() else None
        if not isinstance(upload, UploadFile) or not upload.filename:
            flash(request, "error", "Nothing imported: choose a file.")
        elif kind not in IMPORT_KINDS or replicas < 1 or project is None:
            flash(request, "error", "Nothing imported: choose a project, what the file holds and at least 1 labeler "
                                    "per item.")
        else:
            name = Path(upload.filename).name
            with tempfile.TemporaryDirectory(prefix="rlhfkit-import-") as folder:
                path = Path(folder) / ("upload" + "".join(Path(name).suffixes[-2:]).lower())
                with path.open("wb") as sink:
                    while chunk := upload.file.read(1 << 20):
                        sink.write(chunk)
                try:
                    count = import_file(store, path, kind, replicas=replicas, source=name, project_id=project.id)
                except (DataError, StoreError) as error:
                    flash(request, "error", f"Nothing imported: {error}")
                else:
                    flash(request, "success", f"Imported {count} {'A/B pairs' if kind == 'ab' else kind} from {name} "
                                              f"into project “{project.name}”, {replicas} labeler(s) each.")
                    if deprecated:
                        flash(request, "info", f"Note: {deprecated}.")
        return redirect("/admin")

    def form_project_settings(form: FormData) -> dict:
        """The project settings of an admin form (name, instructions, rating scale "1-5", flags "a, b"), those
        given; :class:`StoreError` names a bad one."""
        settings: dict[str, Any] = {}
        if isinstance(form.get("name"), str):
            settings["name"] = form["name"]
        if isinstance(form.get("instructions"), str):
            settings["instructions"] = form["instructions"].replace("\r\n", "\n")
        if isinstance(form.get("rating_scale"), str):
            settings["rating_scale"] = parse_rating_scale(form["rating_scale"])
        if isinstance(form.get("flags"), str):
            settings["flags"] = parse_flags(form["flags"])
        return settings

    @app.post("/admin/projects", dependencies=[Depends(csrf_protected)])
    def create_project(request: Request, _admin: User = Depends(current_admin),
                       form: FormData = Depends(form_data)) -> Response:
        try:
            created = store.create_project(**{"name": "", **form_project_settings(form)})
        except StoreError as error:
            flash(request, "error", f"Project not created: {error}")
        else:
            flash(request, "success", f"Created the project “{created.name}”: import items into it below.")
        return redirect("/admin#projects")

    @app.post("/admin/projects/{project_id}", dependencies=[Depends(csrf_protected)])
    def update_project(request: Request, project_id: int, _admin: User = Depends(current_admin),
                       form: FormData = Depends(form_data)) -> Response:
        try:
            changed = store.update_project(project_id, **form_project_settings(form))
        except StoreError as error:
            flash(request, "error", f"Project not changed: {error}")
        else:
            flash(request, "success", f"Changed the project “{changed.name}”.")
        return redirect("/admin#projects")

    def labeler_id(username: str) -> int | None:
        """The id of the labeler a filter names (None for every labeler); :class:`StoreError` when unknown."""
        if not username:
            return None
        account = store.user_by_name(username)
        if account is None:
            raise StoreError(f"no account {username[:64]!r}", field="labeler")
        return account.id

    @app.get("/admin/review")
    def review_page(request: Request, status: str = "submitted", kind: str = "", labeler: str = "", q: str = "",
                    project: str = "", page: int = 1, admin: User = Depends(current_admin)) -> Response:
        """Answers to accept or reject, oldest first, :data:`REVIEW_PAGE_SIZE` a page, filtered by status (empty:
        every status), kind, labeler and project (by name; empty: every project) and searched for ``q`` (prompt,
        outputs, answer); above them, each labeler's progress, median time per item and agreement on rankings (in
        that project when one is chosen)."""
        if page < 1:
            raise HTTPException(404, "pages start at 1")
        chosen = chosen_project(project)
        project_id = chosen.id if chosen else None
        filters = {"kind": kind or None, "status": status or None, "skipped": False, "search": q.strip() or None,
                   "project_id": project_id}
        try:
            filters["user_id"] = labeler_id(labeler)
            total = store.count_answers(**filters)
            answers = store.answers(**filters, limit=REVIEW_PAGE_SIZE, offset=(page - 1) * REVIEW_PAGE_SIZE)
        except StoreError as error:
            raise HTTPException(404, str(error)) from None
        names = {user.id: user.username for user in store.users()}
        projects = store.projects()
        project_names = {found.id: found.name for found in projects}
        rows = []
        for answer in answers:
            item = store.item(answer.item_id)
            rows.append({"answer": answer, "item": item, "labeler": names[answer.user_id],
                         "project": project_names[item.project_id],
                         "order": answer.shown_order or list(range(len(item.completions))),
                         "summary": answer_summary(item, answer.payload, False, answer.shown_order)})
        agreement = {row["username"]: row for row in store.agreement(("ranking",), project_id)["per_labeler"]}
        query = {"status": status, "kind": kind, "labeler": labeler, "q": q, "project": chosen.name if chosen else ""}

        def link(**changes: Any) -> str:
            """This page with the filters changed as given."""
            return f"/admin/review?{urlencode({**query, **changes})}"

        return render(request, "review.html", user=admin, rows=rows, page=page, total=total,
                      pages=max(1, -(-total // REVIEW_PAGE_SIZE)), statuses=("submitted", *REVIEW_VERDICTS),
                      labelers=store.labeler_stats(project_id), agreement=agreement, names=sorted(names.values()),
                      projects=projects, chosen=chosen, query=query, here=link(page=page), link=link)

    @app.post("/admin/answers/{answer_id}/review", dependencies=[Depends(csrf_protected)])
    def review_answer(request: Request, answer_id: int, admin: User = Depends(current_admin),
                      form: FormData = Depends(form_data)) -> Response:
        try:
            answer = store.review(answer_id, admin.id, form.get("status"))
        except (StoreError, AnswerConflict) as error:
            flash(request, "error", f"Not reviewed: {error}")
        else:
            back = " (its item goes back to the queue)" if answer.status == "rejected" else ""
            flash(request, "success", f"Answer {answer.id} {answer.status}{back}.")
        return redirect(_safe_next(str(form.get("next", "")), "/admin/review"))

    @app.post("/admin/assignments/release", dependencies=[Depends(csrf_protected)])
    def release_assignments(request: Request, _admin: User = Depends(current_admin),
                            form: FormData = Depends(form_data)) -> Response:
        """Release the open assignments older than ``older_than_minutes`` (0: all), of the project named
        ``project`` only when given; back to the admin page of that project."""
        chosen = chosen_project(str(form.get("project") or ""))
        try:
            minutes = float(str(form.get("older_than_minutes", "0")) or "0")
        except ValueError:
            minutes = -1.0
        if minutes < 0:
            flash(request, "error", "Nothing released: give the age in minutes (0 releases every open assignment).")
        else:
            released = store.release_assignments(older_than=timedelta(minutes=minutes) if minutes else None,
                                                 project_id=chosen.id if chosen else None)
            where = f" of project “{chosen.name}”" if chosen else ""
            flash(request, "success", f"Released {released} open assignment(s){where}; their items go to the next "
                                      "labelers.")
        return redirect(f"/admin?{urlencode({'project': chosen.name})}#assignments" if chosen else "/admin#assignments")

    @app.get("/admin/export/{kind}")
    def export(request: Request, kind: str, project: str | None = None,
               _admin: User = Depends(current_admin)) -> Response:
        """The answers of every project, or of the project named ``project``, as a JSONL download."""
        if kind in OLD_EXPORT_KINDS:  # an old link or script: the same records under the new name
            query = f"?{request.url.query}" if request.url.query else ""
            return RedirectResponse(f"/admin/export/{OLD_EXPORT_KINDS[kind]}{query}", status_code=308)
        if kind not in EXPORT_KINDS:
            raise HTTPException(404, f"no such export: {kind}")
        chosen = chosen_project(project)
        # read before answering, so a database error is a clean 500
        records = list(store.export(kind, chosen.id if chosen else None))
        filename = f"{kind}-project-{chosen.id}.jsonl" if chosen else f"{kind}.jsonl"

        def lines() -> Iterator[str]:
            for record in records:
                yield json_line(record)

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/admin/agreement.json")
    def agreement(project: str = "", _admin: User = Depends(current_admin)) -> Response:
        """The full agreement report (per item too), of every project or of the one named ``project``."""
        chosen = chosen_project(project)
        return JSONResponse(store.agreement(project_id=chosen.id if chosen else None))

    # ------------------------------------------------------------------------------------ JSON API

    async def json_body(request: Request) -> Any:
        return parse_json_body(await request.body())

    def api_project(name: str | None) -> int | None:
        """The id of the project a JSON API request names (None when it names none); :class:`StoreError` when
        there is no such project."""
        if name is None:
            return None
        found = store.project_by_name(name)
        if found is None:
            raise StoreError(f"no project named {name[:64]!r}", field="project")
        return found.id

    def store_error(error: StoreError) -> JSONResponse:
        return JSONResponse({"error": str(error), "field": error.field}, status_code=422)

    def conflict_error(conflict: AnswerConflict) -> JSONResponse:
        return JSONResponse({"error": conflict.message, "answer": _answer_json(conflict.answer)}, status_code=409)

    @app.post("/api/login")
    async def api_login(request: Request) -> Response:
        # JSON only: a page of another site cannot send a JSON body without CORS, so no CSRF token is needed.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send the credentials as application/json")
        body = await json_body(request)
        if not isinstance(body, dict):
            raise HTTPException(422, "expected an object with username and password")
        try:
            user = await run_in_threadpool(authenticate, request, str(body.get("username", "")),
                                           str(body.get("password", "")))
        except LoginRefused as refused:
            headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after else None
            return JSONResponse({"error": refused.message}, status_code=refused.status, headers=headers)
        return JSONResponse({"username": user.username, "role": user.role, "csrf_token": request.session["csrf"]})

    @app.get("/api/me")
    def api_me(request: Request, user: User = Depends(current_user)) -> Response:
        token = csrf_token(request) if bearer_token(request) is None else None  # an API token needs none
        return JSONResponse({"username": user.username, "role": user.role, "csrf_token": token})

    @app.post("/api/me/password", dependencies=[Depends(csrf_protected)])
    def api_password(request: Request, user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        if not isinstance(body, dict):
            raise HTTPException(422, "expected an object with current_password and new_password")
        try:
            change_password(request, user, str(body.get("current_password", "")), str(body.get("new_password", "")))
        except StoreError as error:
            return store_error(error)
        return JSONResponse({"csrf_token": request.session.get("csrf")})

    @app.get("/api/tokens")
    def api_tokens(user: User = Depends(current_user)) -> Response:
        """The user's own API tokens (never their secrets)."""
        return JSONResponse({"tokens": [_token_json(token) for token in store.tokens(user.id)]})

    @app.post("/api/tokens", dependencies=[Depends(csrf_protected)])
    def api_create_token(user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        """``{"name"}``: a new token of the user; its secret is in this answer only (``token``)."""
        if not isinstance(body, dict):
            raise HTTPException(422, "expected an object with the token's name")
        try:
            token, secret = store.create_token(user.id, body.get("name"))
        except StoreError as error:
            return store_error(error)
        return JSONResponse({**_token_json(token), "token": secret}, status_code=201)

    @app.post("/api/tokens/{token_id}/revoke", dependencies=[Depends(csrf_protected)])
    def api_revoke_token(token_id: int, user: User = Depends(current_user)) -> Response:
        """Revoke one of the user's tokens (an admin: anyone's)."""
        try:
            token = store.revoke_token(token_id, user_id=None if user.role == "admin" else user.id)
        except StoreError as error:
            raise HTTPException(404, error.message) from None
        return JSONResponse(_token_json(token))

    @app.get("/api/next")
    def api_next(kind: str | None = None, project: str | None = None, user: User = Depends(current_user)) -> Response:
        """The user's next item (of ``kind``, in the project named ``project``, when given), or null."""
        try:
            project_id = api_project(project)
            item = store.next_item(user.id, kind, project_id=project_id, assignment_ttl=settings.assignment_ttl)
        except StoreError as error:
            return store_error(error)
        return JSONResponse({"item": _item_json(user, item, store.project(item.project_id)) if item else None})

    @app.get("/api/items/{item_id}/answer")
    def api_read_answer(item_id: int, user: User = Depends(current_user)) -> Response:
        store.assigned_item(user.id, item_id)
        answer = store.answer_of(user.id, item_id)
        if answer is None:
            raise HTTPException(404, "you have not answered this item yet")
        history = [{"version": version.version, "payload": version.payload, "skipped": version.skipped,
                    "created_at": version.created_at.isoformat()} for version in store.history(answer.id)]
        return JSONResponse({"answer": _answer_json(answer), "history": history})

    def api_write_answer(item_id: int, user: User, body: Any, write) -> Response:
        try:
            answer = write(user.id, item_id, body)
        except StoreError as error:
            return store_error(error)
        except AnswerConflict as conflict:
            return conflict_error(conflict)
        warnings = _ranking_warnings(store.assigned_item(user.id, item_id), answer.payload)
        return JSONResponse({"answer": _answer_json(answer), "warnings": warnings})

    @app.post("/api/items/{item_id}/answer", dependencies=[Depends(csrf_protected)])
    def api_answer(item_id: int, user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        """A first answer; the same one again returns it, a different one is 409 (change it with PUT)."""
        return api_write_answer(item_id, user, body, store.submit)

    @app.put("/api/items/{item_id}/answer", dependencies=[Depends(csrf_protected)])
    def api_edit(item_id: int, user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        """Change an answer (a new version) until an admin reviews it; 409 once reviewed or for a skip."""
        return api_write_answer(item_id, user, body, store.edit)

    @app.post("/api/items/{item_id}/skip", dependencies=[Depends(csrf_protected)])
    def api_skip(item_id: int, user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        reason = body.get("reason") if isinstance(body, dict) else None
        try:
            answer = store.skip(user.id, item_id, reason)
        except StoreError as error:
            return store_error(error)
        except AnswerConflict as conflict:
            return conflict_error(conflict)
        return JSONResponse({"answer": _answer_json(answer)})

    @app.get("/api/admin/users")
    def api_users(project: str | None = None, _admin: User = Depends(current_admin)) -> Response:
        """Every account with its id and its work (:meth:`Store.labeler_stats`), in the project named ``project``
        when given."""
        try:
            return JSONResponse({"users": store.labeler_stats(api_project(project))})
        except StoreError as error:
            return store_error(error)

    @app.post("/api/admin/users/{user_id}/active", dependencies=[Depends(csrf_protected)])
    def api_set_active(user_id: int, admin: User = Depends(current_admin), body: Any = Depends(json_body)) -> Response:
        """``{"active": false}`` deactivates the account (its sessions end, its open assignments are released),
        ``{"active": true}`` reactivates it."""
        account = account_of(user_id)
        if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            return store_error(StoreError("expected true or false", field="active"))
        try:
            changed = set_active(admin, account, body["active"])
        except StoreError as error:
            return store_error(error)
        return JSONResponse({"id": changed.id, "username": changed.username, "active": changed.active})

    @app.post("/api/admin/users/{user_id}/password", dependencies=[Depends(csrf_protected)])
    def api_reset_password(user_id: int, _admin: User = Depends(current_admin),
                           body: Any = Depends(json_body)) -> Response:
        """``{"new_password"}``: the admin sets a new password; every session of the account ends."""
        account = account_of(user_id)
        password = body.get("new_password") if isinstance(body, dict) else None
        if not isinstance(password, str):
            return store_error(StoreError("expected a string", field="new_password"))
        try:
            set_password(account, password, field="new_password")
        except StoreError as error:
            return store_error(error)
        return JSONResponse({"id": account.id, "username": account.username})

    @app.get("/api/admin/tokens")
    def api_all_tokens(_admin: User = Depends(current_admin)) -> Response:
        """Every account's API tokens (never their secrets)."""
        return JSONResponse({"tokens": [_token_json(token) for token in store.tokens()]})

    @app.get("/api/admin/progress")
    def api_progress(project: str | None = None, _admin: User = Depends(current_admin)) -> Response:
        """Progress per item kind, of every project or of the one named ``project``."""
        try:
            return JSONResponse({"progress": store.progress(api_project(project))})
        except StoreError as error:
            return store_error(error)

    @app.get("/api/admin/projects")
    def api_projects(_admin: User = Depends(current_admin)) -> Response:
        """Every project with its settings and its progress per item kind."""
        return JSONResponse({"projects": [{**_project_json(project), "progress": store.progress(project.id)}
                                          for project in store.projects()]})

    def project_body(body: Any) -> dict:
        """The settings of a JSON project body (``name``, ``instructions``, ``rating_scale`` [low, high], ``flags``),
        those given; checked by the store."""
        if not isinstance(body, dict):
            raise HTTPException(422, "expected an object with the project's name and settings")
        return {field: body[field] for field in ("name", "instructions", "rating_scale", "flags") if field in body}

    @app.post("/api/admin/projects", dependencies=[Depends(csrf_protected)])
    def api_create_project(_admin: User = Depends(current_admin), body: Any = Depends(json_body)) -> Response:
        """``{"name", "instructions"?, "rating_scale"?: [1, 5], "flags"?: [...]}``: a new project (201)."""
        try:
            created = store.create_project(**{"name": None, **project_body(body)})
        except StoreError as error:
            return store_error(error)
        return JSONResponse(_project_json(created), status_code=201)

    @app.put("/api/admin/projects/{project_id}", dependencies=[Depends(csrf_protected)])
    def api_update_project(project_id: int, _admin: User = Depends(current_admin),
                           body: Any = Depends(json_body)) -> Response:
        """``{"name"?, "instructions"?, "rating_scale"?, "flags"?}``: rename or change a project (a new name must be
        free, a new scale or flags must still fit its answers)."""
        if store.project(project_id) is None:
            raise HTTPException(404, f"no project with id {project_id}")
        try:
            changed = store.update_project(project_id, **project_body(body))
        except StoreError as error:
            return store_error(error)
        return JSONResponse(_project_json(changed))

    @app.get("/api/admin/answers")
    def api_answers(kind: str | None = None, status: str | None = None, labeler: str = "", q: str = "",
                    project: str | None = None, limit: int | None = None, offset: int = 0,
                    _admin: User = Depends(current_admin)) -> Response:
        """Answers to review (``status=submitted``), or any others, of one ``labeler``, holding the text ``q`` and in
        the project named ``project`` when given; skips are left out. ``total`` counts them all; ``limit`` and
        ``offset`` page them."""
        if (limit is not None and limit < 1) or offset < 0:
            return store_error(StoreError("limit must be 1 or more and offset 0 or more", field="limit"))
        try:
            filters = {"kind": kind, "status": status, "skipped": False, "user_id": labeler_id(labeler),
                       "search": q.strip() or None, "project_id": api_project(project)}
            answers = store.answers(**filters, limit=limit, offset=offset)
            total = store.count_answers(**filters)
        except StoreError as error:
            return store_error(error)
        names = {user.id: user.username for user in store.users()}
        return JSONResponse({"total": total, "answers": [{**_answer_json(answer), "labeler": names[answer.user_id]}
                                                         for answer in answers]})

    @app.post("/api/admin/answers/{answer_id}/review", dependencies=[Depends(csrf_protected)])
    def api_review(answer_id: int, admin: User = Depends(current_admin), body: Any = Depends(json_body)) -> Response:
        """``{"status": "accepted" | "rejected"}``; a rejected answer's item goes back to the queue."""
        if not isinstance(body, dict):
            raise HTTPException(422, f"expected an object with status: one of {REVIEW_VERDICTS}")
        try:
            answer = store.review(answer_id, admin.id, body.get("status"))
        except StoreError as error:
            return store_error(error)
        except AnswerConflict as conflict:
            return conflict_error(conflict)
        return JSONResponse({"answer": _answer_json(answer)})

    @app.get("/api/admin/assignments")
    def api_assignments(project: str | None = None, _admin: User = Depends(current_admin)) -> Response:
        """The open (unanswered) assignments, oldest first (in the project named ``project`` when given)."""
        try:
            rows = store.open_assignments(api_project(project))
        except StoreError as error:
            return store_error(error)
        return JSONResponse({"assignments": [{**row, "assigned_at": row["assigned_at"].isoformat()} for row in rows],
                             "assignment_ttl_minutes": settings.assignment_ttl_minutes})

    @app.post("/api/admin/assignments/release", dependencies=[Depends(csrf_protected)])
    def api_release(_admin: User = Depends(current_admin), body: Any = Depends(json_body)) -> Response:
        """Release open assignments: ``{"username"?, "item_id"?, "older_than_minutes"?, "project"?}`` (all when
        empty)."""
        if not isinstance(body, dict):
            raise HTTPException(422, "expected an object with username, item_id, older_than_minutes or project (each "
                                     "optional)")
        username, item_id, minutes = body.get("username"), body.get("item_id"), body.get("older_than_minutes")
        project = body.get("project")
        if project is not None and not isinstance(project, str):
            return store_error(StoreError("expected a project's name", field="project"))
        user = store.user_by_name(username) if isinstance(username, str) else None
        if username is not None and user is None:
            return store_error(StoreError(f"no user named {str(username)[:64]!r}", field="username"))
        if item_id is not None and (not isinstance(item_id, int) or isinstance(item_id, bool)):
            return store_error(StoreError("expected an item id (an integer)", field="item_id"))
        if minutes is not None and (not isinstance(minutes, int | float) or isinstance(minutes, bool) or minutes < 0):
            return store_error(StoreError("expected a number of minutes, 0 or more", field="older_than_minutes"))
        try:
            released = store.release_assignments(user_id=user.id if user else None, item_id=item_id,
                                                 older_than=timedelta(minutes=minutes) if minutes else None,
                                                 project_id=api_project(project))
        except StoreError as error:
            return store_error(error)
        return JSONResponse({"released": released})

    return app


def _form_values(item: Item, form: FormData | None, order: list[int] | None) -> dict:
    """What the labeler had entered (empty on a fresh page: the ranking starts empty), to show again after
    an error or a warning: nothing is lost. Ranking fields are by position shown."""

    def text(name: str) -> str:
        value = form.get(name, "") if form is not None else ""
        return value if isinstance(value, str) else ""

    values: dict[str, Any] = {"completion": text("completion"), "reason": text("reason")}
    for position in range(len(order or ())):
        values[f"rating_{position}"] = text(f"rating_{position}")
        values[f"rank_{position}"] = text(f"rank_{position}")
        values[f"flags_{position}"] = list(form.getlist(f"flags_{position}")) if form is not None else []
    return values
