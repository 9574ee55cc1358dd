"""The human-feedback web app: FastAPI, server-rendered Jinja2 pages and a little plain JavaScript.

Labelers log in and work through a queue: write a demonstration for a prompt; rate each of K outputs
1-7, flag it (fails the instruction, harmful, made-up facts: InstructGPT's labeling interface) and rank
them, ties allowed, by drag and drop, buttons or keyboard; judge A/B pairs; or skip with a reason. An
admin creates accounts, imports items, watches progress and agreement and exports datasets. Every page
works with the keyboard alone; the JavaScript (``static/app.js``) only adds drag and drop and shortcuts.

Pages: ``/login``, ``/logout`` (POST), ``/queue``, ``/next?kind=K`` (assign or resume an item of kind K),
``/items/{id}`` (GET shows, POST answers), ``/items/{id}/skip`` (POST), ``/admin``, ``/admin/users``
(POST), ``/admin/import`` (POST), ``/admin/export/{kind}``, ``/admin/agreement.json``.
JSON API (the same session cookie; the CSRF token in the ``X-CSRF-Token`` header): ``POST /api/login``,
``GET /api/me``, ``GET /api/next``, ``POST /api/items/{id}/answer``, ``POST /api/items/{id}/skip``,
``GET /api/admin/progress``.

Security: argon2 password hashes; a signed HttpOnly ``SameSite=Strict`` session cookie; a CSRF token on
every state-changing request; the admin role checked on every admin route; a labeler reaches only the
items assigned to them (any other item is a 404, so ids are not probed); login rate limiting per account
and per client; request size limits; Jinja2 autoescaping of all user text plus a Content-Security-Policy
that allows no inline script. Every answer is one store transaction (:mod:`rlhfkit.feedback.store`).
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.data.readers import json_line
from rlhfkit.data.records import DataError
from rlhfkit.feedback.imports import IMPORT_KINDS, import_file
from rlhfkit.feedback.security import (
    MIN_PASSWORD_LENGTH,
    LoginRateLimiter,
    csrf_token_matches,
    hash_password,
    new_csrf_token,
    verify_password,
)
from rlhfkit.feedback.store import (
    EXPORT_KINDS,
    FLAGS,
    ITEM_KINDS,
    RATING_RANGE,
    ROLES,
    Item,
    NotAssigned,
    Store,
    StoreError,
    User,
)

HERE = Path(__file__).parent
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # the largest request (an import upload); larger ones get 413
MAX_FORM_FIELD_BYTES = 1024 * 1024  # one form field (a demonstration is at most 100,000 characters)
SESSION_COOKIE = "rlhfkit_session"
SESSION_MAX_AGE_S = 12 * 3600
FLAG_LABELS = {"fails_instruction": "Fails to follow the instruction", "harmful": "Harmful or offensive",
               "made_up_facts": "Makes up facts"}
IMPORT_KIND_LABELS = {"prompts": "prompts: write demonstrations",
                      "samples": "samples (K outputs per prompt): rate and rank", "pairs": "pairs: A/B judgements"}
KIND_TITLES = {"demonstration": "Write demonstrations", "ranking": "Rate and rank outputs", "ab": "Judge A/B pairs"}
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


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
    """Refuses request bodies over ``max_bytes`` with 413, by Content-Length or while they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _too_large_message(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def _too_large_message(max_bytes: int) -> str:
    return f"the request is larger than {max_bytes // 2**20} MiB"


def _too_large(max_bytes: int) -> Response:
    """The 413 answer to a request whose Content-Length is over the limit (before the app runs)."""
    return JSONResponse({"error": _too_large_message(max_bytes)}, status_code=413)


# ------------------------------------------------------------------------------------- forms -> payloads


def _letter(index: int) -> str:
    """A, B, C, ... for the outputs of an item (AA, AB, ... past Z)."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return letters


def _form_int(form: FormData, name: str, field: str, what: str) -> int:
    value = form.get(name)
    if not isinstance(value, str) or not value.strip():
        raise StoreError(f"choose {what}", field=field)
    try:
        return int(value)
    except ValueError:
        raise StoreError(f"{value[:20]!r} is not a whole number", field=field) from None


def ranking_payload(form: FormData, k: int) -> dict:
    """The store payload of a ranking form: ``rating_i`` (1-7), ``flags_i`` (checkboxes) and ``rank_i``.

    ``rank_i`` is output i's place, 1 for the best; equal places are ties. Places need not be consecutive
    (1, 1, 3 means the first two tie above the third). Fields are named for the labeler ("output B").
    """
    ratings, flags, places = [], [], []
    for index in range(k):
        output = f"output {_letter(index)}"
        ratings.append(_form_int(form, f"rating_{index}", f"{output} rating", "a rating"))
        flags.append([value for value in form.getlist(f"flags_{index}") if isinstance(value, str)])
        place = _form_int(form, f"rank_{index}", f"{output} place", "a place")
        if place < 1:
            raise StoreError("must be 1 (the best) or more", field=f"{output} place")
        places.append(place)
    groups = [[index for index in range(k) if places[index] == place] for place in sorted(set(places))]
    return {"ratings": ratings, "flags": flags, "ranking": groups}


def form_payload(item: Item, form: FormData) -> dict:
    """The store payload of the answer form of ``item``; :class:`StoreError` names a missing field."""
    if item.kind == "demonstration":
        completion = form.get("completion")
        text = completion if isinstance(completion, str) else ""
        return {"completion": text.replace("\r\n", "\n")}  # browsers send a textarea's newlines as CRLF
    if item.kind == "ab":
        return {"verdict": form.get("verdict")}
    return ranking_payload(form, len(item.completions))


def _item_json(item: Item) -> dict:
    """What a labeler sees of an item: never its meta (which model wrote what) nor its gold ranking."""
    return {"id": item.id, "kind": item.kind, "prompt": item.prompt, "completions": item.completions}


def _answer_json(answer) -> dict:
    return {"id": answer.id, "item_id": answer.item_id, "payload": answer.payload, "skipped": answer.skipped,
            "created_at": answer.created_at.isoformat()}


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


# --------------------------------------------------------------------------------------------- the app


def create_app(store: Store, *, secret_key: str | None = None, https_only: bool = False,
               rate_limiter: LoginRateLimiter | None = None) -> FastAPI:
    """The web app over ``store``.

    Args:
        store: the feedback database (shared by the request threads).
        secret_key: signs the session cookies; random by default (a restart then logs everyone out).
        https_only: mark the session cookie ``Secure`` (serve behind HTTPS).
        rate_limiter: the login rate limiter (5 failures per account or client in 5 minutes by default).
    """
    app = FastAPI(title="rlhfkit feedback", docs_url=None, redoc_url=None, openapi_url=None)
    limiter = rate_limiter or LoginRateLimiter()
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    environment.globals.update(letter=_letter, flags=[(flag, FLAG_LABELS[flag]) for flag in FLAGS],
                               kind_titles=KIND_TITLES, rating_range=range(RATING_RANGE[0], RATING_RANGE[1] + 1),
                               roles=ROLES, import_kinds=[(kind, IMPORT_KIND_LABELS[kind]) for kind in IMPORT_KINDS],
                               export_kinds=EXPORT_KINDS, item_kinds=ITEM_KINDS)
    templates = Jinja2Templates(env=environment)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    # The last middleware added is the outermost: the size limit runs first.
    app.add_middleware(SessionMiddleware, secret_key=secret_key or secrets.token_urlsafe(32),
                       session_cookie=SESSION_COOKIE, max_age=SESSION_MAX_AGE_S, same_site="strict",
                       https_only=https_only)
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_BodySizeLimit, max_bytes=MAX_REQUEST_BYTES)

    # ----------------------------------------------------------------------- sessions, roles, CSRF

    def csrf_token(request: Request) -> str:
        """The session's CSRF token, created on first use."""
        if "csrf" not in request.session:
            request.session["csrf"] = new_csrf_token()
        return request.session["csrf"]

    def current_user(request: Request) -> User:
        user_id = request.session.get("user_id")
        user = store.user(user_id) if isinstance(user_id, int) else None
        if user is None or not user.active:
            request.session.pop("user_id", None)
            raise LoginRequired()
        return user

    def current_admin(user: User = Depends(current_user)) -> User:
        if user.role != "admin":
            raise HTTPException(403, "this page is for admins only")
        return user

    async def form_data(request: Request) -> FormData:
        return await request.form(max_part_size=MAX_FORM_FIELD_BYTES)

    async def csrf_protected(request: Request) -> None:
        """Every state-changing request carries the session's CSRF token (header or form field)."""
        submitted = request.headers.get("x-csrf-token")
        if submitted is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            submitted = (await form_data(request)).get("csrf_token")
        if not csrf_token_matches(request.session.get("csrf"), submitted if isinstance(submitted, str) else None):
            raise HTTPException(403, "the form is missing its security token or it expired: reload the page")

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        user_id = request.session.get("user_id")
        context.setdefault("user", store.user(user_id) if isinstance(user_id, int) else None)
        flashes = request.session.pop("flash", [])
        return templates.TemplateResponse(request, name, {"csrf_token": csrf_token(request), "flashes": flashes,
                                                          **context}, status_code=status_code)

    def flash(request: Request, level: str, text: str) -> None:
        request.session["flash"] = [*request.session.get("flash", []), [level, text]]

    def redirect(path: str) -> RedirectResponse:
        return RedirectResponse(path, status_code=303)

    def authenticate(request: Request, username: str, password: str) -> User:
        """Log the user in (a fresh session and CSRF token), or :class:`LoginRefused`; failures are counted."""
        client = request.client.host if request.client else "unknown"
        keys = (f"user:{username}", f"client:{client}")
        wait = limiter.retry_after(*keys)
        if wait:
            raise LoginRefused(f"Too many failed logins: try again in {wait} seconds.", 429, retry_after=wait)
        user = store.user_by_name(username) if username else None
        if not verify_password(user.password_hash if user else None, password) or not user.active:
            limiter.failed(*keys)
            raise LoginRefused("Wrong user name or password.", 401)
        limiter.succeeded(*keys)
        request.session.clear()  # a fresh session (and CSRF token) at every login: no session fixation
        request.session["user_id"] = user.id
        request.session["csrf"] = new_csrf_token()
        return user

    # -------------------------------------------------------------------------------- error pages

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _error: LoginRequired) -> Response:
        if _wants_json(request):
            return JSONResponse({"error": "log in first"}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return redirect(f"/login?next={quote(target, safe='')}")

    @app.exception_handler(NotAssigned)
    async def not_assigned(request: Request, _error: NotAssigned) -> Response:
        return await http_error(request, StarletteHTTPException(404, "no such item in your queue"))

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
        request.session.clear()
        return redirect("/login")

    # ------------------------------------------------------------------------------- labeler pages

    @app.get("/queue")
    def queue(request: Request, user: User = Depends(current_user)) -> Response:
        return render(request, "queue.html", user=user, mine=store.user_progress(user.id),
                      progress={row["kind"]: row for row in store.progress()})

    @app.get("/next")
    def next_item(request: Request, kind: str, user: User = Depends(current_user)) -> Response:
        if kind not in ITEM_KINDS:
            raise HTTPException(404, f"no such kind of work: {kind}")
        item = store.next_item(user.id, kind)
        if item is None:
            flash(request, "info", f"Nothing left to do in “{KIND_TITLES[kind]}”. Thank you!")
            return redirect("/queue")
        return redirect(f"/items/{item.id}")

    def item_page(request: Request, user: User, item: Item, *, error: StoreError | None = None,
                  form: FormData | None = None) -> Response:
        answer = store.answer_of(user.id, item.id)
        return render(request, "item.html", status_code=422 if error else 200, user=user, item=item,
                      answer=answer, error=error, values=_form_values(item, form))

    @app.get("/items/{item_id}")
    def show_item(request: Request, item_id: int, user: User = Depends(current_user)) -> Response:
        return item_page(request, user, store.assigned_item(user.id, item_id))

    @app.post("/items/{item_id}", dependencies=[Depends(csrf_protected)])
    def answer_item(request: Request, item_id: int, user: User = Depends(current_user),
                    form: FormData = Depends(form_data)) -> Response:
        item = store.assigned_item(user.id, item_id)
        try:
            store.submit(user.id, item.id, form_payload(item, form))
        except StoreError as error:
            return item_page(request, user, item, error=error, form=form)
        flash(request, "success", "Saved.")
        return redirect(f"/next?kind={item.kind}")

    @app.post("/items/{item_id}/skip", dependencies=[Depends(csrf_protected)])
    def skip_item(request: Request, item_id: int, user: User = Depends(current_user),
                  form: FormData = Depends(form_data)) -> Response:
        item = store.assigned_item(user.id, item_id)
        try:
            store.skip(user.id, item.id, str(form.get("reason", "")))
        except StoreError as error:
            return item_page(request, user, item, error=StoreError(error.message, field="skip reason"), form=form)
        flash(request, "info", "Skipped.")
        return redirect(f"/next?kind={item.kind}")

    # --------------------------------------------------------------------------------- admin pages

    @app.get("/admin")
    def admin(request: Request, user: User = Depends(current_admin)) -> Response:
        return render(request, "admin.html", user=user, progress=store.progress(), agreement=store.agreement(),
                      users=store.users(), min_password_length=MIN_PASSWORD_LENGTH)

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
        return redirect("/admin")

    @app.post("/admin/import", dependencies=[Depends(csrf_protected)])
    def import_items(request: Request, _admin: User = Depends(current_admin),
                     form: FormData = Depends(form_data)) -> Response:
        upload, kind = form.get("file"), str(form.get("kind", ""))
        try:
            replicas = int(str(form.get("replicas", "1")))
        except ValueError:
            replicas = 0
        if not isinstance(upload, UploadFile) or not upload.filename:
            flash(request, "error", "Nothing imported: choose a file.")
        elif kind not in IMPORT_KINDS or replicas < 1:
            flash(request, "error", "Nothing imported: choose what the file holds and at least 1 labeler per item.")
        else:
            name = Path(upload.filename).name
            with tempfile.TemporaryDirectory(prefix="rlhfkit-import-") as folder:
                path = Path(folder) / ("upload" + "".join(Path(name).suffixes[-2:]).lower())
                with path.open("wb") as sink:
                    while chunk := upload.file.read(1 << 20):
                        sink.write(chunk)
                try:
                    count = import_file(store, path, kind, replicas=replicas, source=name)
                except (DataError, StoreError) as error:
                    flash(request, "error", f"Nothing imported: {error}")
                else:
                    flash(request, "success", f"Imported {count} {kind} from {name}, {replicas} labeler(s) each.")
        return redirect("/admin")

    @app.get("/admin/export/{kind}")
    def export(kind: str, _admin: User = Depends(current_admin)) -> Response:
        if kind not in EXPORT_KINDS:
            raise HTTPException(404, f"no such export: {kind}")
        records = list(store.export(kind))  # read before answering, so a database error is a clean 500

        def lines() -> Iterator[str]:
            for record in records:
                yield json_line(record)

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{kind}.jsonl"'})

    @app.get("/admin/agreement.json")
    def agreement(_admin: User = Depends(current_admin)) -> Response:
        return JSONResponse(store.agreement())

    # ------------------------------------------------------------------------------------ JSON API

    async def json_body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise HTTPException(422, "the body is not valid JSON") from None

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
        return JSONResponse({"username": user.username, "role": user.role, "csrf_token": csrf_token(request)})

    @app.get("/api/next")
    def api_next(kind: str | None = None, user: User = Depends(current_user)) -> Response:
        try:
            item = store.next_item(user.id, kind)
        except StoreError as error:
            return JSONResponse({"error": str(error), "field": error.field}, status_code=422)
        return JSONResponse({"item": _item_json(item) if item else None})

    @app.post("/api/items/{item_id}/answer", dependencies=[Depends(csrf_protected)])
    def api_answer(item_id: int, user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        try:
            answer = store.submit(user.id, item_id, body)
        except StoreError as error:
            return JSONResponse({"error": str(error), "field": error.field}, status_code=422)
        return JSONResponse({"answer": _answer_json(answer)})

    @app.post("/api/items/{item_id}/skip", dependencies=[Depends(csrf_protected)])
    def api_skip(item_id: int, user: User = Depends(current_user), body: Any = Depends(json_body)) -> Response:
        reason = body.get("reason") if isinstance(body, dict) else None
        try:
            answer = store.skip(user.id, item_id, reason)
        except StoreError as error:
            return JSONResponse({"error": str(error), "field": error.field}, status_code=422)
        return JSONResponse({"answer": _answer_json(answer)})

    @app.get("/api/admin/progress")
    def api_progress(_admin: User = Depends(current_admin)) -> Response:
        return JSONResponse({"progress": store.progress()})

    return app


def _form_values(item: Item, form: FormData | None) -> dict:
    """What the labeler had entered (empty on a fresh page), to show again after an error: nothing is lost."""

    def text(name: str) -> str:
        value = form.get(name, "") if form is not None else ""
        return value if isinstance(value, str) else ""

    values: dict[str, Any] = {"completion": text("completion"), "reason": text("reason")}
    for index in range(len(item.completions)):
        values[f"rating_{index}"] = text(f"rating_{index}")
        values[f"rank_{index}"] = text(f"rank_{index}")
        values[f"flags_{index}"] = list(form.getlist(f"flags_{index}")) if form is not None else []
    return values
