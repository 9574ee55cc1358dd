"""The feedback web app through its HTTP interface (FastAPI TestClient): every route, its authorization
failures, CSRF, XSS escaping, login rate limiting and size limits."""

from __future__ import annotations

import html
import json
import re

import pytest
from fastapi.testclient import TestClient

from rlhfkit.feedback.app import AppSettings, create_app, ranking_payload
from rlhfkit.feedback.security import LoginRateLimiter, hash_password
from rlhfkit.feedback.store import FLAGS, Store, StoreError, shown_order

XSS = "<script>alert('owned')</script>"
PASSWORDS = {"boss": "boss password", "ann": "ann password", "bob": "bob password"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.create_user("boss", hash_password(PASSWORDS["boss"]), "admin")
    store.create_user("ann", hash_password(PASSWORDS["ann"]))
    store.create_user("bob", hash_password(PASSWORDS["bob"]))
    store.import_prompts([{"prompt": f"Write a poem {XSS}", "id": "p1"}])
    store.import_samples([{"prompt": "Name a colour", "completions": ["red", f"blue {XSS}", "seven"], "id": "s1"}],
                         replicas=2)
    store.import_pairs([{"prompt": [{"role": "user", "content": "Say hi"}], "completions": ["hi", "go away"],
                         "id": "ab1", "meta": {"models": ["ppo", "sft"]}}])
    yield store
    store.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(store, clock):
    return create_app(store, secret_key="test secret", rate_limiter=LoginRateLimiter(3, 60, clock=clock),
                      settings=AppSettings())


def client(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def page_token(response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
    assert match, response.text
    return match.group(1)


def login(app, username: str, password: str | None = None) -> tuple[TestClient, str]:
    """A client logged in through the login form, and its CSRF token."""
    browser = client(app)
    token = page_token(browser.get("/login"))
    response = browser.post("/login", data={"username": username, "password": password or PASSWORDS[username],
                                            "csrf_token": token})
    assert response.status_code == 303, response.text
    return browser, page_token(browser.get("/queue"))


def open_item(browser: TestClient, kind: str) -> int:
    response = browser.get(f"/next?kind={kind}")
    assert response.status_code == 303
    return int(response.headers["location"].rsplit("/", 1)[1])


# by position shown: output A (the first card) rated 6 and ranked first, ..., output C flagged
RANKING_FORM = {"rating_0": "6", "rating_1": "3", "rating_2": "1", "flags_2": "made_up_facts",
                "rank_0": "1", "rank_1": "2", "rank_2": "3"}


def ranking_form(store: Store, username: str, item_id: int, ratings: list[int], places: list[int],
                 flags: list[list[str]]) -> dict:
    """The ranking form that gives the item's completions these ratings, places and flags (in the item's
    indices), laid out as the page shows them to the user (shuffled: fields follow the positions shown)."""
    order = shown_order(store.user_by_name(username).id, item_id, len(ratings))
    form: dict = {}
    for position, index in enumerate(order):
        form[f"rating_{position}"] = str(ratings[index])
        form[f"rank_{position}"] = str(places[index])
        form[f"flags_{position}"] = flags[index]
    return form


# ----------------------------------------------------------------------------------------- log in/out


def test_pages_need_a_login(app):
    browser = client(app)
    for path in ("/", "/queue", "/next?kind=ranking", "/items/1", "/admin", "/admin/export/pairs"):
        response = browser.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=%2F"), path
    for path in ("/api/me", "/api/next", "/api/admin/progress"):
        assert browser.get(path).status_code == 401, path


def test_login_sets_a_hardened_session_cookie_and_goes_to_the_home_of_the_role(app):
    browser = client(app)
    token = page_token(browser.get("/login"))
    response = browser.post("/login", data={"username": "ann", "password": PASSWORDS["ann"], "csrf_token": token})
    assert (response.status_code, response.headers["location"]) == (303, "/queue")
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=43200" in cookie
    assert page_token(browser.get("/queue")) != token  # a fresh CSRF token at login
    boss, _ = login(app, "boss")
    assert boss.get("/").headers["location"] == "/admin"


def test_login_follows_only_local_next_paths(app):
    for target, expected in (("/items/1", "/items/1"), ("//evil.example/x", "/queue"),
                             ("https://evil.example/", "/queue"), ("/\\evil.example", "/queue")):
        browser = client(app)
        token = page_token(browser.get("/login"))
        response = browser.post("/login", data={"username": "ann", "password": PASSWORDS["ann"], "csrf_token": token,
                                                "next": target})
        assert response.headers["location"] == expected, target


def test_wrong_password_and_unknown_user_are_refused_alike(app):
    browser = client(app)
    token = page_token(browser.get("/login"))
    wrong = browser.post("/login", data={"username": "ann", "password": "nope", "csrf_token": token})
    unknown = browser.post("/login", data={"username": "zed", "password": "nope", "csrf_token": token})
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong user name or password." in wrong.text and "Wrong user name or password." in unknown.text
    assert browser.get("/queue").status_code == 303  # still logged out


def test_login_rate_limit_per_account_then_released_after_the_window(app, clock):
    browser = client(app)
    token = page_token(browser.get("/login"))
    for _ in range(3):
        assert browser.post("/login", data={"username": "ann", "password": "x", "csrf_token": token}).status_code == 401
    refused = browser.post("/login", data={"username": "ann", "password": PASSWORDS["ann"], "csrf_token": token})
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert "Too many failed logins" in refused.text
    api = client(app).post("/api/login", json={"username": "ann", "password": PASSWORDS["ann"]})
    assert api.status_code == 429  # the same account through the API
    clock.now += 61
    ok = browser.post("/login", data={"username": "ann", "password": PASSWORDS["ann"], "csrf_token": token})
    assert ok.status_code == 303


def test_login_rate_limit_per_client_covers_password_spraying(app):
    browser = client(app)
    token = page_token(browser.get("/login"))
    for number in range(12):  # at most two failures per account, twelve (4 x 3) from this client
        name = ("ann", "bob", "zed", "cy", "di", "ed")[number % 6]
        assert browser.post("/login", data={"username": name, "password": "x", "csrf_token": token}).status_code == 401
    refused = browser.post("/login", data={"username": "boss", "password": PASSWORDS["boss"], "csrf_token": token})
    assert refused.status_code == 429


def test_rate_limiter_backs_off_more_after_each_failure_and_success_clears():
    clock = Clock()
    limiter = LoginRateLimiter(2, 10, max_lockout_s=35, forget_after_s=1000, clock=clock)
    limiter.failed("ann", "10.0.0.1")
    clock.now += 6
    limiter.failed("ann", "10.0.0.1")
    assert limiter.retry_after("ann", "10.0.0.1") == 10 and limiter.retry_after("ann", "10.0.0.2") == 0
    for wait in (20, 35, 35):  # doubles after each further failure, up to max_lockout_s
        clock.now += 11
        limiter.failed("ann", "10.0.0.1")
        assert limiter.retry_after("ann", "10.0.0.1") == wait
    limiter.succeeded("ann", "10.0.0.1")
    assert limiter.retry_after("ann", "10.0.0.1") == 0
    limiter.failed("bob", "10.0.0.3")
    limiter.failed("bob", "10.0.0.3")
    clock.now += 1000  # forgotten
    assert limiter.retry_after("bob", "10.0.0.3") == 0
    with pytest.raises(ValueError):
        LoginRateLimiter(0, 10)


def test_logout_ends_the_session(app):
    browser, token = login(app, "ann")
    assert browser.post("/logout", data={"csrf_token": token}).headers["location"] == "/login"
    assert browser.get("/queue").status_code == 303


def test_deactivated_account_is_logged_out(app, store):
    browser, _ = login(app, "ann")
    with store.engine.begin() as connection:
        connection.exec_driver_sql("UPDATE users SET active = 0 WHERE username = 'ann'")
    assert browser.get("/queue").status_code == 303
    token = page_token(browser.get("/login"))
    assert browser.post("/login", data={"username": "ann", "password": PASSWORDS["ann"],
                                        "csrf_token": token}).status_code == 401


# ---------------------------------------------------------------------------------------------- CSRF


def _post_routes(app) -> list[str]:
    return sorted(route.path for route in app.routes if "POST" in getattr(route, "methods", ()))


def test_every_form_post_needs_the_csrf_token(app):
    browser, token = login(app, "boss")
    item_id = open_item(browser, "demonstration")
    paths = {path.replace("{item_id}", str(item_id)) for path in _post_routes(app) if path != "/api/login"}
    paths = {path.replace("{answer_id}", "1").replace("{user_id}", "2").replace("{token_id}", "1")
             .replace("{project_id}", "1") for path in paths}
    assert paths == {"/login", "/logout", "/account/password", f"/items/{item_id}", f"/items/{item_id}/skip",
                     "/admin/users", "/admin/import", "/admin/answers/1/review", "/admin/assignments/release",
                     "/admin/users/2/active", "/admin/users/2/password", "/admin/tokens/1/revoke",
                     "/account/tokens", "/account/tokens/1/revoke", "/api/me/password", "/api/tokens",
                     "/api/tokens/1/revoke", "/api/admin/users/2/active", "/api/admin/users/2/password",
                     f"/api/items/{item_id}/answer", f"/api/items/{item_id}/skip", "/api/admin/answers/1/review",
                     "/api/admin/assignments/release", "/admin/projects", "/admin/projects/1", "/api/admin/projects"}
    for path in sorted(paths):
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": ""}):
            response = browser.post(path, data={"completion": "x", "reason": "x", **data})
            assert response.status_code == 403, (path, data)
        assert browser.post(path, json={"completion": "x"}, headers={"X-CSRF-Token": "forged"}).status_code == 403
    puts = [route.path for route in app.routes if "PUT" in getattr(route, "methods", ())]
    assert puts == ["/api/items/{item_id}/answer", "/api/admin/projects/{project_id}"]
    for path in (f"/api/items/{item_id}/answer", "/api/admin/projects/1"):
        assert browser.put(path, json={"completion": "x", "flags": []},
                           headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert store_answers(app) == 0 and app_store(app).user(2).active and app_store(app).tokens() == []
    assert [(project.name, project.flags) for project in app_store(app).projects()] == [("default", FLAGS)]
    assert browser.get("/queue").status_code == 200  # still logged in: the forged logout did nothing
    assert browser.post("/logout", data={"csrf_token": token}).status_code == 303


def store_answers(app) -> int:
    return sum(row["answers"] + row["skipped"] for row in app_store(app).progress())


def app_store(app) -> Store:
    for route in app.routes:  # the store is reachable through any endpoint's closure
        for cell in getattr(getattr(route, "endpoint", None), "__closure__", None) or ():
            if isinstance(cell.cell_contents, Store):
                return cell.cell_contents
    raise AssertionError("no store")


def test_api_login_takes_json_only(app):
    browser = client(app)
    form = browser.post("/api/login", data={"username": "ann", "password": PASSWORDS["ann"]})
    assert form.status_code == 415  # a cross-site form cannot log a victim in
    response = browser.post("/api/login", json={"username": "ann", "password": PASSWORDS["ann"]})
    assert response.status_code == 200 and response.json()["role"] == "labeler"
    assert browser.get("/api/me").json()["csrf_token"] == response.json()["csrf_token"]
    assert browser.post("/api/login", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    assert browser.post("/api/login", json=["ann"]).status_code == 422


# ------------------------------------------------------------------------------------------ labeling


def test_queue_shows_the_labelers_progress(app):
    browser, token = login(app, "ann")
    page = browser.get("/queue")
    assert page.status_code == 200 and "Write demonstrations" in page.text and "Judge A/B pairs" in page.text
    item_id = open_item(browser, "ab")
    browser.post(f"/items/{item_id}", data={"csrf_token": token, "verdict": "a"})
    assert "You answered 1, skipped 0." in browser.get("/queue").text


def test_write_a_demonstration(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "demonstration")
    page = browser.get(f"/items/{item_id}")
    assert page.status_code == 200 and "Write the response" in page.text
    response = browser.post(f"/items/{item_id}", data={"csrf_token": token, "completion": "Roses\r\nare red"})
    assert (response.status_code, response.headers["location"]) == (303, "/next?kind=demonstration&project=1")
    [answer] = store.answers("demonstration")
    assert answer.payload == {"completion": "Roses\nare red"}  # the browser's CRLF newlines normalised
    again = browser.get(f"/items/{item_id}")
    assert "You answered this item" in again.text
    assert browser.get("/next?kind=demonstration").headers["location"] == "/queue"  # nothing left
    assert "Nothing left to do" in browser.get("/queue").text


def test_a_tool_using_chat_prompt_shows_its_calls_and_results(app, store):
    chat = [{"role": "user", "content": "How warm is it in Paris?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "get_temperature", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "name": "get_temperature", "content": "22"}]
    store.import_prompts([{"prompt": chat, "id": "tools1"}])
    browser, token = login(app, "ann")
    first = open_item(browser, "demonstration")
    browser.post(f"/items/{first}", data={"csrf_token": token, "completion": "A poem."})
    page = html.unescape(browser.get(f"/items/{open_item(browser, 'demonstration')}").text)
    assert 'call get_temperature {"city": "Paris"}' in page  # the call, not an empty assistant turn
    assert re.search(r"tool\s+\(get_temperature\)", page) and "How warm is it in Paris?" in page


def test_rate_flag_and_rank_with_ties(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ranking")
    page = browser.get(f"/items/{item_id}")
    assert page.text.count('draggable="true"') == 3 and "Makes up facts" in page.text
    form = {**ranking_form(store, "ann", item_id, [6, 3, 1], [1, 1, 3], [[], [], ["made_up_facts"]]),
            "csrf_token": token}
    assert browser.post(f"/items/{item_id}", data=form).status_code == 303
    [answer] = store.answers("ranking")
    assert answer.payload == {"ratings": [6, 3, 1], "flags": [[], [], ["made_up_facts"]], "ranking": [[0, 1], [2]]}
    assert answer.shown_order == shown_order(store.user_by_name("ann").id, item_id, 3)
    [record] = store.export("rankings")
    assert record["ranking"] == [[0, 1], [2]] and record["labeler"] == "ann"


@pytest.mark.parametrize(("change", "message"), [
    ({"rating_1": ""}, "Not saved: output B rating: choose a rating"),
    ({"rating_1": "9"}, "expected an integer from 1 to 7"),
    ({"rank_2": "zero"}, "is not a whole number"),
    ({"rank_2": "0"}, "must be 1 (the best) or more"),
    ({"rank_0": "1", "rank_1": "1", "rank_2": "1"}, "ties every completion"),
    ({"flags_0": "boring"}, "expected a list of flags"),
])
def test_a_bad_ranking_is_refused_and_what_was_entered_is_kept(app, store, change, message):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ranking")
    response = browser.post(f"/items/{item_id}", data={**RANKING_FORM, **change, "csrf_token": token})
    assert response.status_code == 422
    assert "Not saved:" in response.text and message in response.text
    assert 'value="6" required\n               checked' in response.text or re.search(
        r'name="rating_0" value="6"[^>]*checked', response.text)
    assert store.answers("ranking") == []


def test_ranking_payload_groups_places_best_first():
    from starlette.datastructures import FormData

    form = FormData([("rating_0", "2"), ("rating_1", "7"), ("rating_2", "7"), ("flags_0", "harmful"),
                     ("flags_0", "fails_instruction"), ("rank_0", "5"), ("rank_1", "2"), ("rank_2", "2")])
    flags = ["harmful", "fails_instruction"]
    assert ranking_payload(form, [0, 1, 2]) == {"ratings": [2, 7, 7], "flags": [flags, [], []],
                                                "ranking": [[1, 2], [0]]}
    # shown as item completions 2, 0, 1: position p of the form is completion order[p]
    assert ranking_payload(form, [2, 0, 1]) == {"ratings": [7, 7, 2], "flags": [[], [], flags],
                                                "ranking": [[0, 1], [2]]}
    with pytest.raises(StoreError, match="choose a place: rank every output") as error:
        ranking_payload(FormData([("rating_0", "1")]), [0])
    assert error.value.field == "output A place"


def test_judge_an_ab_pair_without_seeing_which_model_wrote_what(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ab")
    page = browser.get(f"/items/{item_id}")
    assert "go away" in page.text and "ppo" not in page.text and "sft" not in page.text
    assert browser.post(f"/items/{item_id}", data={"csrf_token": token, "verdict": "b"}).status_code == 303
    [record] = store.export("ab")
    assert (record["verdict"], record["meta"]["models"]) == ("b", ["ppo", "sft"])


def client_login_api(app, username: str) -> TestClient:
    browser = client(app)
    assert browser.post("/api/login", json={"username": username, "password": PASSWORDS[username]}).status_code == 200
    return browser


def test_bad_verdict_and_empty_demonstration_are_refused(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ab")
    assert browser.post(f"/items/{item_id}", data={"csrf_token": token, "verdict": "c"}).status_code == 422
    demo = open_item(browser, "demonstration")
    response = browser.post(f"/items/{demo}", data={"csrf_token": token, "completion": "   "})
    assert response.status_code == 422 and "is empty" in response.text
    assert store.answers() == []


def test_skip_with_a_reason(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "demonstration")
    refused = browser.post(f"/items/{item_id}/skip", data={"csrf_token": token, "reason": " "})
    assert refused.status_code == 422 and "skip reason" in refused.text
    response = browser.post(f"/items/{item_id}/skip", data={"csrf_token": token, "reason": "unclear prompt"})
    assert response.status_code == 303
    [answer] = store.answers()
    assert answer.skipped and answer.payload == {"reason": "unclear prompt"}
    assert "You skipped this item" in browser.get(f"/items/{item_id}").text


def test_double_submit_writes_one_answer_and_a_different_one_is_409(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ab")
    for verdict in ("a", "a"):
        assert browser.post(f"/items/{item_id}", data={"csrf_token": token, "verdict": verdict}).status_code == 303
    other = browser.post(f"/items/{item_id}", data={"csrf_token": token, "verdict": "b"})
    assert other.status_code == 409
    assert "Not saved: you already answered this item differently" in other.text
    assert "A is better" in other.text and "Change my answer" in other.text  # the answer that stands, and how
    [answer] = store.answers()
    assert answer.payload == {"verdict": "a"}


def test_unknown_kind_and_unknown_item_are_404(app):
    browser, _ = login(app, "ann")
    assert browser.get("/next?kind=poetry").status_code == 404
    missing = browser.get("/items/999")
    assert missing.status_code == 404 and "no such item in your queue" in missing.text
    assert browser.get("/nowhere").status_code == 404


# ------------------------------------------------------------------------------- cross-labeler access


def test_a_labeler_cannot_see_or_answer_another_labelers_item(app, store):
    ann, _ = login(app, "ann")
    bob, bob_token = login(app, "bob")
    item_id = open_item(ann, "demonstration")  # replicas=1: assigned to ann only
    assert bob.get(f"/items/{item_id}").status_code == 404
    assert bob.post(f"/items/{item_id}", data={"csrf_token": bob_token, "completion": "mine"}).status_code == 404
    assert bob.post(f"/items/{item_id}/skip", data={"csrf_token": bob_token, "reason": "x"}).status_code == 404
    api = bob.post(f"/api/items/{item_id}/answer", json={"completion": "mine"}, headers={"X-CSRF-Token": bob_token})
    assert api.status_code == 404
    assert bob.get("/next?kind=demonstration").headers["location"] == "/queue"  # nothing for bob
    assert store.answers() == []


def test_labelers_are_refused_every_admin_route(app, store):
    browser, token = login(app, "ann")
    for path in ("/admin", "/admin/export/rankings", "/admin/agreement.json", "/admin/review", "/api/admin/progress",
                 "/api/admin/answers", "/api/admin/assignments"):
        assert browser.get(path).status_code == 403, path
    for path in ("/admin/answers/1/review", "/admin/assignments/release"):
        assert browser.post(path, data={"csrf_token": token, "status": "accepted"}).status_code == 403, path
    created = browser.post("/admin/users", data={"csrf_token": token, "username": "mallory",
                                                 "password": "long password", "role": "admin"})
    imported = browser.post("/admin/import", data={"csrf_token": token, "kind": "prompts", "replicas": "1"},
                            files={"file": ("p.jsonl", b'{"prompt": "x"}\n')})
    assert created.status_code == imported.status_code == 403
    assert [user.username for user in store.users()] == ["boss", "ann", "bob"]
    assert sum(row["items"] for row in store.progress()) == 3


# ------------------------------------------------------------------------------------------------ XSS


def test_user_text_is_escaped_everywhere(app, store):
    browser, token = login(app, "ann")
    for kind in ("demonstration", "ranking"):
        page = browser.get(f"/items/{open_item(browser, kind)}")
        assert XSS not in page.text and "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in page.text
    boss, boss_token = login(app, "boss")
    boss.post("/admin/users", data={"csrf_token": boss_token, "username": f"x{XSS}", "password": "long password",
                                    "role": "labeler"})
    admin = boss.get("/admin")
    assert XSS not in admin.text and "x&lt;script&gt;" in admin.text
    policy = admin.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert admin.headers["x-frame-options"] == "DENY" and admin.headers["x-content-type-options"] == "nosniff"
    assert admin.headers["cache-control"] == "no-store"


def test_templates_have_no_inline_script():
    from rlhfkit.feedback.app import HERE

    for template in (HERE / "templates").glob("*.html"):
        text = template.read_text(encoding="utf-8")
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(r"\son[a-z]+=", text), template.name  # no inline event handlers (the CSP forbids them)
        assert "|safe" not in text.replace(" ", ""), template.name


# --------------------------------------------------------------------------------------------- admin


def test_admin_page_shows_progress_agreement_and_accounts(app, store):
    for name in ("ann", "bob"):  # the same ranking, whatever order each of them was shown
        browser, token = login(app, name)
        item_id = open_item(browser, "ranking")
        form = ranking_form(store, name, item_id, [6, 3, 1], [1, 2, 3], [[], [], []])
        assert browser.post(f"/items/{item_id}", data={**form, "csrf_token": token}).status_code == 303
    boss, _ = login(app, "boss")
    page = boss.get("/admin")
    assert page.status_code == 200
    assert "<td>ranking</td><td>1</td><td>1</td><td>2</td>" in page.text.replace("\n", "").replace("        ", "")
    assert "1.000" in page.text  # ann and bob agree perfectly
    report = boss.get("/admin/agreement.json").json()
    assert report["overall"]["pairwise_agreement"] == 1.0 and report["per_item"][0]["labelers"] == ["ann", "bob"]
    assert {row["kind"]: row["answers"] for row in boss.get("/api/admin/progress").json()["progress"]}["ranking"] == 2


def test_admin_creates_accounts(app, store):
    boss, token = login(app, "boss")
    boss.post("/admin/users", data={"csrf_token": token, "username": "cara", "password": "cara password",
                                    "role": "labeler"})
    assert "Created the labeler account" in boss.get("/admin/users").text
    for data, message in (({"username": "cara", "password": "long password", "role": "labeler"}, "is taken"),
                          ({"username": "dan", "password": "short", "role": "labeler"}, "at least 8 characters"),
                          ({"username": "dan", "password": "long password", "role": "root"}, "unknown role")):
        boss.post("/admin/users", data={"csrf_token": token, **data})
        assert message in boss.get("/admin/users").text, data
    assert [user.username for user in store.users()] == ["boss", "ann", "bob", "cara"]
    cara, _ = login(app, "cara", "cara password")
    assert cara.get("/queue").status_code == 200


def test_admin_imports_prompts_samples_and_pairs(app, store):
    boss, token = login(app, "boss")
    samples = b'{"prompt": "Q", "completions": ["x", "y", "z"]}\n{"prompt": "R", "completions": ["u", "v"]}\n'
    response = boss.post("/admin/import", data={"csrf_token": token, "kind": "samples", "replicas": "3"},
                         files={"file": ("samples.jsonl", samples)})
    assert response.status_code == 303
    assert "Imported 2 samples from samples.jsonl into project “default”, 3 labeler(s) each." in boss.get("/admin").text
    boss.post("/admin/import", data={"csrf_token": token, "kind": "prompts", "replicas": "1"},
              files={"file": ("prompts.csv", b"prompt\nHello\nBye\n")})
    progress = {row["kind"]: row for row in store.progress()}
    assert (progress["ranking"]["items"], progress["ranking"]["answers_needed"]) == (3, 2 + 6)
    assert progress["demonstration"]["items"] == 3
    pair = b'{"prompt": "S", "completions": ["a", "b"]}\n'
    before = progress["ab"]["items"]
    for kind in ("ab", "pairs"):  # "pairs", the old name of "ab": imported, with a note
        boss.post("/admin/import", data={"csrf_token": token, "kind": kind, "replicas": "1"},
                  files={"file": ("ab.jsonl", pair)})
        page = boss.get("/admin").text
        assert "Imported 1 A/B pairs from ab.jsonl into project “default”, 1 labeler(s) each." in page
        assert ("it is now &#39;ab&#39;" in page) == (kind == "pairs")
    assert {row["kind"]: row["items"] for row in store.progress()}["ab"] == before + 2


def test_a_bad_import_names_file_line_and_field_and_writes_nothing(app, store):
    boss, token = login(app, "boss")
    bad = b'{"prompt": "Q", "completions": ["x", "y"]}\n\n{"prompt": "R", "completions": ["u"]}\n'
    boss.post("/admin/import", data={"csrf_token": token, "kind": "samples", "replicas": "1"},
              files={"file": ("bad.jsonl", bad)})
    page = boss.get("/admin").text
    assert "Nothing imported: bad.jsonl, line 3, field &#39;completions&#39;: needs at least 2 completions" in page
    boss.post("/admin/import", data={"csrf_token": token, "kind": "samples", "replicas": "0"},
              files={"file": ("ok.jsonl", b'{"prompt": "Q", "completions": ["x", "y"]}\n')})
    assert "at least 1 labeler per item" in boss.get("/admin").text
    boss.post("/admin/import", data={"csrf_token": token, "kind": "samples", "replicas": "1", "project": "99"},
              files={"file": ("ok.jsonl", b'{"prompt": "Q", "completions": ["x", "y"]}\n')})
    assert "Nothing imported: choose a project" in boss.get("/admin").text
    boss.post("/admin/import", data={"csrf_token": token, "kind": "samples", "replicas": "1"})
    assert "choose a file" in boss.get("/admin").text
    assert sum(row["items"] for row in store.progress()) == 3


def test_exports_are_what_the_trainers_read(app, store, tmp_path):
    from rlhfkit.data.readers import read_records

    ann, token = login(app, "ann")
    item_id = open_item(ann, "ranking")
    ann.post(f"/items/{item_id}", data={**RANKING_FORM, "csrf_token": token})
    boss, _ = login(app, "boss")
    response = boss.get("/admin/export/rankings")
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="rankings.jsonl"'
    rows = [json.loads(line) for line in response.text.splitlines()]
    assert rows == list(store.export("rankings"))
    path = tmp_path / "rankings.jsonl"
    path.write_text(response.text, encoding="utf-8")
    [record] = read_records(path, "ranking")
    order = shown_order(store.user_by_name("ann").id, item_id, 3)  # RANKING_FORM ranks them as shown
    assert record.completions == ("red", f"blue {XSS}", "seven") and record.ranking == tuple((i,) for i in order)
    assert record.meta["shown_order"] == order
    pairs = boss.get("/admin/export/pairs-from-rankings").text.splitlines()
    assert len(pairs) == 3
    old = boss.get("/admin/export/pairs")  # the old name: a permanent redirect to the new one
    assert old.status_code == 308 and old.headers["location"] == "/admin/export/pairs-from-rankings"
    assert boss.get("/admin/export/pairs", follow_redirects=True).text.splitlines() == pairs
    assert boss.get("/admin/export/poems").status_code == 404


# --------------------------------------------------------------------------------------------- JSON API


def test_api_next_answer_and_skip(app, store):
    browser = client_login_api(app, "ann")
    token = browser.get("/api/me").json()["csrf_token"]
    item = browser.get("/api/next", params={"kind": "ranking"}).json()["item"]
    order = shown_order(store.user_by_name("ann").id, item["id"], 3)
    assert item == {"id": item["id"], "kind": "ranking", "prompt": "Name a colour",
                    "completions": ["red", f"blue {XSS}", "seven"], "shown_order": order,
                    "project": {"id": 1, "name": "default", "instructions": "", "rating_scale": [1, 7],
                                "flags": list(FLAGS)}}
    payload = {"ratings": [7, 2, 1], "flags": [[], [], ["made_up_facts"]], "ranking": [0, 1, 2]}
    answer = browser.post(f"/api/items/{item['id']}/answer", json=payload, headers={"X-CSRF-Token": token})
    assert answer.status_code == 200 and answer.json()["answer"]["payload"]["ranking"] == [[0], [1], [2]]
    assert answer.json()["answer"]["shown_order"] == order and answer.json()["warnings"] == []
    again = browser.post(f"/api/items/{item['id']}/answer", json=payload, headers={"X-CSRF-Token": token})
    assert again.json()["answer"]["id"] == answer.json()["answer"]["id"]  # a double submit returns the first answer
    demo = browser.get("/api/next", params={"kind": "demonstration"}).json()["item"]
    invalid = browser.post(f"/api/items/{demo['id']}/answer", json={"completion": 3}, headers={"X-CSRF-Token": token})
    assert invalid.status_code == 422 and invalid.json()["field"] == "completion"
    garbage = browser.post(f"/api/items/{demo['id']}/answer", content=b"{", headers={"X-CSRF-Token": token,
                                                                                   "content-type": "application/json"})
    assert garbage.status_code == 400
    skipped = browser.post(f"/api/items/{demo['id']}/skip", json={"reason": "off topic"},
                           headers={"X-CSRF-Token": token})
    assert skipped.json()["answer"]["skipped"] is True
    assert browser.get("/api/next", params={"kind": "demonstration"}).json() == {"item": None}
    assert browser.get("/api/next", params={"kind": "poems"}).status_code == 422


# ----------------------------------------------------------------------------------------- size limits


def test_oversized_requests_are_refused(app, store):
    boss, token = login(app, "boss")
    big = boss.post("/admin/import", data={"csrf_token": token, "kind": "prompts", "replicas": "1"},
                    files={"file": ("big.jsonl", b"x" * (AppSettings().max_import_mib * 2**20 + 1))})
    assert big.status_code == 413
    streamed = boss.post("/api/login", content=iter([b"x" * (1 << 20)] * 33),
                         headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    ann, ann_token = login(app, "ann")
    item_id = open_item(ann, "demonstration")
    long = ann.post(f"/items/{item_id}", data={"csrf_token": ann_token, "completion": "y" * 100_001})
    assert long.status_code == 422 and "longer than 100000 characters" in long.text
    assert sum(row["items"] for row in store.progress()) == 3 and store.answers() == []


def test_secure_cookies_for_https(store):
    app = create_app(store, secret_key="k", https_only=True)
    browser = client(app)
    token = page_token(browser.get("/login"))
    response = browser.post("/login", data={"username": "ann", "password": PASSWORDS["ann"], "csrf_token": token})
    assert "secure" in response.headers["set-cookie"].lower()


def test_a_session_signed_with_another_key_is_not_accepted(store):
    browser, _ = login(create_app(store, secret_key="key one"), "ann")
    other = create_app(store, secret_key="key two")
    stolen = client(other)
    stolen.cookies = browser.cookies
    assert stolen.get("/queue").status_code == 303


# ------------------------------------------------------------------------ data quality (issue 25)


def test_the_outputs_are_shown_shuffled_per_labeler_and_the_same_on_reload(app, store):
    texts = ["red", f"blue {XSS}".replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;"), "seven"]

    def shown(browser, item_id: int) -> list[int]:
        page = browser.get(f"/items/{item_id}").text
        return sorted(range(3), key=lambda index: page.index(f'<div class="text completion">{texts[index]}</div>'))

    ann, _ = login(app, "ann")
    item_id = open_item(ann, "ranking")
    assert shown(ann, item_id) == shown(ann, item_id) == shown_order(store.user_by_name("ann").id, item_id, 3)
    page = ann.get(f"/items/{item_id}").text
    assert re.findall(r'name="rank_\d" min="1" max="3"\s+value=""', page) and "Output A" in page  # starts empty
    bob, _ = login(app, "bob")
    assert shown(bob, open_item(bob, "ranking")) == shown_order(store.user_by_name("bob").id, item_id, 3)


def test_an_empty_or_partial_ranking_is_refused_with_a_clear_4xx(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ranking")
    empty = {key: value for key, value in RANKING_FORM.items() if not key.startswith("rank_")}
    response = browser.post(f"/items/{item_id}", data={**empty, "csrf_token": token})
    assert response.status_code == 422
    assert "Not saved: output A place: choose a place: rank every output" in response.text
    api = client_login_api(app, "bob")
    api_token = api.get("/api/me").json()["csrf_token"]
    bob_item = api.get("/api/next", params={"kind": "ranking"}).json()["item"]["id"]
    for ranking, message in ((None, "expected a list of tie groups"), ([0, 1], "does not rank completions [2]")):
        refused = api.post(f"/api/items/{bob_item}/answer", headers={"X-CSRF-Token": api_token},
                           json={"ratings": [1, 2, 3], "flags": [[], [], []], "ranking": ranking})
        assert refused.status_code == 422 and refused.json()["field"] == "ranking"
        assert message in refused.json()["error"]
    assert store.answers() == []


def test_a_contradicting_ranking_is_saved_only_once_confirmed_and_the_api_flags_it(app, store):
    browser, token = login(app, "ann")
    item_id = open_item(browser, "ranking")
    form = {"rating_0": "1", "rating_1": "2", "rating_2": "7", "rank_0": "1", "rank_1": "2", "rank_2": "3",
            "csrf_token": token}
    warned = browser.post(f"/items/{item_id}", data=form)
    assert warned.status_code == 200 and store.answers() == []
    assert "Not saved yet: your ranking contradicts your ratings." in warned.text
    assert "output C is rated 7 but ranked below output A, rated 1" in warned.text
    assert 'id="submit-anyway"' in warned.text
    assert browser.post(f"/items/{item_id}", data={**form, "confirm_contradiction": "1"}).status_code == 303
    [answer] = store.answers()
    api = client_login_api(app, "bob")
    api_token = api.get("/api/me").json()["csrf_token"]
    bob_item = api.get("/api/next", params={"kind": "ranking"}).json()["item"]["id"]
    accepted = api.post(f"/api/items/{bob_item}/answer", headers={"X-CSRF-Token": api_token},
                        json={"ratings": [1, 2, 7], "flags": [[], [], []], "ranking": [0, 1, 2]})
    assert accepted.status_code == 200
    assert accepted.json()["warnings"][0] == "completion 1 is rated 2 but ranked below completion 0, rated 1"


def test_answers_are_edited_with_history_until_reviewed_and_conflicts_are_409(app, store):
    api = client_login_api(app, "ann")
    headers = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    item = api.get("/api/next", params={"kind": "demonstration"}).json()["item"]
    url = f"/api/items/{item['id']}/answer"
    assert api.get(url).status_code == 404
    assert api.put(url, json={"completion": "x"}, headers=headers).status_code == 422  # nothing to change yet
    first = api.post(url, json={"completion": "first"}, headers=headers).json()["answer"]
    conflict = api.post(url, json={"completion": "second"}, headers=headers)
    assert conflict.status_code == 409 and conflict.json()["answer"]["payload"] == {"completion": "first"}
    edited = api.put(url, json={"completion": "second"}, headers=headers)
    assert edited.status_code == 200 and edited.json()["answer"]["version"] == 2
    read = api.get(url).json()
    assert [version["payload"]["completion"] for version in read["history"]] == ["first", "second"]
    assert [record["completion"] for record in store.export("demonstrations")] == ["second"]
    boss = client_login_api(app, "boss")
    boss_headers = {"X-CSRF-Token": boss.get("/api/me").json()["csrf_token"]}
    [listed] = boss.get("/api/admin/answers", params={"status": "submitted"}).json()["answers"]
    assert (listed["id"], listed["labeler"], listed["version"]) == (first["id"], "ann", 2)
    review = boss.post(f"/api/admin/answers/{first['id']}/review", json={"status": "accepted"}, headers=boss_headers)
    assert review.status_code == 200 and review.json()["answer"]["status"] == "accepted"
    final = api.put(url, json={"completion": "third"}, headers=headers)
    assert final.status_code == 409 and "accepted this answer" in final.json()["error"]
    assert boss.post(f"/api/admin/answers/{first['id']}/review", json={"status": "rejected"},
                     headers=boss_headers).status_code == 409
    missing = boss.post("/api/admin/answers/999/review", json={"status": "accepted"}, headers=boss_headers)
    assert missing.status_code == 422
    assert api.get("/api/admin/answers").status_code == 403
    page, _ = login(app, "ann")
    shown = page.get(f"/items/{item['id']}").text
    assert "An admin has accepted this answer." in shown and "Change my answer" not in shown
    assert "Every version of your answer" in shown and "first" in shown


def test_a_rejected_answer_sends_its_item_to_another_labeler(app, store):
    ann, token = login(app, "ann")
    item_id = open_item(ann, "demonstration")
    ann.post(f"/items/{item_id}", data={"csrf_token": token, "completion": "lazy"})
    bob, _ = login(app, "bob")
    assert bob.get("/next?kind=demonstration").headers["location"] == "/queue"  # nothing left for bob
    boss = client_login_api(app, "boss")
    [answer] = store.answers("demonstration")
    boss.post(f"/api/admin/answers/{answer.id}/review", json={"status": "rejected"},
              headers={"X-CSRF-Token": boss.get("/api/me").json()["csrf_token"]})
    assert open_item(bob, "demonstration") == item_id


def test_an_expired_assignment_goes_to_another_labeler(store, clock):
    app = create_app(store, secret_key="k", rate_limiter=LoginRateLimiter(3, 60, clock=clock),
                     settings=AppSettings(assignment_ttl_minutes=30))
    ann, _ = login(app, "ann")
    item_id = open_item(ann, "demonstration")
    bob, _ = login(app, "bob")
    assert bob.get("/next?kind=demonstration").headers["location"] == "/queue"
    with store.engine.begin() as connection:  # ann opened it 31 minutes ago and went away
        connection.exec_driver_sql("UPDATE assignments SET created_at = datetime(created_at, '-31 minutes')")
    assert open_item(bob, "demonstration") == item_id
    assert ann.get(f"/items/{item_id}").status_code == 404


def test_the_admin_sees_and_releases_open_assignments(app, store):
    ann, _ = login(app, "ann")
    item_id = open_item(ann, "demonstration")
    boss, token = login(app, "boss")
    page = boss.get("/admin").text
    assert "1 item(s) opened and not answered yet; each goes to another labeler 120" in page
    api = client_login_api(app, "boss")
    headers = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    listed = api.get("/api/admin/assignments").json()
    assert [(row["item_id"], row["username"]) for row in listed["assignments"]] == [(item_id, "ann")]
    assert api.post("/api/admin/assignments/release", json={"username": "nobody"}, headers=headers).status_code == 422
    assert api.post("/api/admin/assignments/release", json={"older_than_minutes": 60},
                    headers=headers).json() == {"released": 0}
    assert boss.post("/admin/assignments/release", data={"csrf_token": token, "older_than_minutes": "0"}
                     ).status_code == 303
    assert "Released 1 open assignment(s)" in boss.get("/admin").text
    assert store.open_assignments() == []


def test_the_review_page_accepts_and_rejects_answers(app, store):
    ann, token = login(app, "ann")
    item_id = open_item(ann, "ranking")
    ann.post(f"/items/{item_id}", data={**RANKING_FORM, "csrf_token": token})
    demo = open_item(ann, "demonstration")
    ann.post(f"/items/{demo}", data={"csrf_token": token, "completion": f"my poem {XSS}"})
    boss, boss_token = login(app, "boss")
    page = boss.get("/admin/review")
    assert page.status_code == 200 and page.text.count('class="card review"') == 2
    assert "Ranking, best first" in page.text and "A &gt; B &gt; C" in page.text and XSS not in page.text
    ranking, poem = store.answers()
    accepted = boss.post(f"/admin/answers/{ranking.id}/review", data={"csrf_token": boss_token, "status": "accepted"})
    assert accepted.headers["location"] == "/admin/review"
    boss.post(f"/admin/answers/{poem.id}/review", data={"csrf_token": boss_token, "status": "rejected",
                                                          "next": "/admin/review?status=rejected"})
    assert "goes back to the queue" in boss.get("/admin/review?status=rejected").text
    assert "No submitted answers" in boss.get("/admin/review").text
    again = boss.post(f"/admin/answers/{poem.id}/review", data={"csrf_token": boss_token, "status": "accepted"})
    assert again.status_code == 303 and "Not reviewed: this answer was already rejected" in boss.get("/admin").text
    assert [answer.status for answer in store.answers()] == ["accepted", "rejected"]
    assert boss.get("/admin/review?status=maybe").status_code == 404
    assert "Previous page" in boss.get("/admin/review?status=accepted&page=2").text


# ------------------------------------------------------------------------------------ accounts and tokens


def test_an_admin_deactivates_and_reactivates_a_labeler(app, store):
    ann, ann_token = login(app, "ann")
    item_id = open_item(ann, "demonstration")
    boss, token = login(app, "boss")
    ann_id = store.user_by_name("ann").id
    assert boss.post(f"/admin/users/{ann_id}/active", data={"csrf_token": token, "active": "0"}).status_code == 303
    assert "Deactivated “ann”" in boss.get("/admin/users").text
    assert ann.get("/queue").status_code == 303  # her live session ended
    assert client(app).post("/api/login", json={"username": "ann", "password": PASSWORDS["ann"]}).status_code == 401
    bob, _ = login(app, "bob")
    assert open_item(bob, "demonstration") == item_id  # her open assignment was released
    boss.post(f"/admin/users/{ann_id}/active", data={"csrf_token": token, "active": "1"})
    assert "Reactivated “ann”" in boss.get("/admin/users").text
    login(app, "ann")
    boss_id = store.user_by_name("boss").id
    boss.post(f"/admin/users/{boss_id}/active", data={"csrf_token": token, "active": "0"})
    assert "you cannot deactivate your own account" in boss.get("/admin/users").text and store.user(boss_id).active
    assert boss.post("/admin/users/999/active", data={"csrf_token": token, "active": "0"}).status_code == 404
    api = client_login_api(app, "boss")
    headers = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    assert api.post(f"/api/admin/users/{ann_id}/active", json={"active": "no"}, headers=headers).status_code == 422
    assert api.post(f"/api/admin/users/{ann_id}/active", json={"active": False},
                    headers=headers).json() == {"id": ann_id, "username": "ann", "active": False}
    listed = {row["username"]: row for row in api.get("/api/admin/users").json()["users"]}
    assert listed["ann"]["active"] is False and listed["ann"]["id"] == ann_id and listed["bob"]["open_assignments"] == 1
    assert ann_token and client_login_api(app, "bob").get("/api/admin/users").status_code == 403


def test_an_admin_resets_a_password_and_the_accounts_sessions_end(app, store):
    ann, _ = login(app, "ann")
    boss, token = login(app, "boss")
    ann_id = store.user_by_name("ann").id
    boss.post(f"/admin/users/{ann_id}/password", data={"csrf_token": token, "new_password": "short"})
    assert "Password of “ann” not changed: field &#39;new password&#39;: must be at least 8 characters" in boss.get(
        "/admin/users").text
    assert ann.get("/queue").status_code == 200
    boss.post(f"/admin/users/{ann_id}/password", data={"csrf_token": token, "new_password": "ann's new password"})
    assert "every session of theirs ended" in boss.get("/admin/users").text
    assert ann.get("/queue").status_code == 303
    login(app, "ann", "ann's new password")
    api = client_login_api(app, "boss")
    headers = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    assert api.post(f"/api/admin/users/{ann_id}/password", json={"new_password": "third password"},
                    headers=headers).status_code == 200
    login(app, "ann", "third password")
    missing = api.post("/api/admin/users/999/password", json={"new_password": "x" * 10}, headers=headers)
    assert missing.status_code == 404


def test_api_tokens_work_on_the_json_api_until_revoked_or_the_account_is_deactivated(app, store):
    ann, token = login(app, "ann")
    page = ann.post("/account/tokens", data={"csrf_token": token, "name": "my script"})
    secret = re.search(r'<code class="secret">([^<]+)</code>', page.text).group(1)
    assert "shown only this once" in page.text and secret not in ann.get("/account").text
    assert secret not in str(ann.cookies.values())
    script = client(app)  # no cookie: the token alone
    bearer = {"Authorization": f"Bearer {secret}"}
    assert script.get("/api/me", headers=bearer).json() == {"username": "ann", "role": "labeler", "csrf_token": None}
    item = script.get("/api/next?kind=demonstration", headers=bearer).json()["item"]
    answered = script.post(f"/api/items/{item['id']}/answer", json={"completion": "by a script"}, headers=bearer)
    assert answered.status_code == 200  # no CSRF token needed with an API token
    assert script.get("/queue", headers=bearer).status_code == 303  # pages take no tokens
    assert script.get("/api/admin/progress", headers=bearer).status_code == 403  # a labeler's token
    for header in ("Bearer nonsense", "Basic YW5uOnB3", "Bearer "):
        refused = script.get("/api/me", headers={"Authorization": header})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", header
    # a bad token is refused even beside a valid session cookie (no CSRF check is skipped for it)
    forged = ann.post(f"/api/items/{item['id']}/skip", json={"reason": "x"}, headers={"Authorization": "Bearer no"})
    assert forged.status_code == 401
    made = script.post("/api/tokens", json={"name": "second"}, headers=bearer)
    assert made.status_code == 201 and made.json()["token"].startswith("rlhfkit_")
    listed = script.get("/api/tokens", headers=bearer).json()["tokens"]
    assert [row["name"] for row in listed] == ["my script", "second"] and "token" not in listed[0]
    assert script.post("/api/tokens", json={"name": "second"}, headers=bearer).status_code == 422
    boss = client_login_api(app, "boss")
    boss_headers = {"X-CSRF-Token": boss.get("/api/me").json()["csrf_token"]}
    assert [row["username"] for row in boss.get("/api/admin/tokens").json()["tokens"]] == ["ann", "ann"]
    bob = client_login_api(app, "bob")
    bob_headers = {"X-CSRF-Token": bob.get("/api/me").json()["csrf_token"]}
    assert bob.post(f"/api/tokens/{listed[1]['id']}/revoke", headers=bob_headers).status_code == 404  # not his
    revoked = boss.post(f"/api/tokens/{listed[1]['id']}/revoke", headers=boss_headers)  # an admin revokes any
    assert revoked.json()["revoked_at"] is not None
    assert script.get("/api/me", headers={"Authorization": f"Bearer {made.json()['token']}"}).status_code == 401
    boss.post(f"/api/admin/users/{store.user_by_name('ann').id}/active", json={"active": False}, headers=boss_headers)
    assert script.get("/api/me", headers=bearer).status_code == 401  # a deactivated account's token
    boss.post(f"/api/admin/users/{store.user_by_name('ann').id}/active", json={"active": True}, headers=boss_headers)
    assert script.get("/api/me", headers=bearer).status_code == 200
    ann, token = login(app, "ann")
    ann.post(f"/account/tokens/{listed[0]['id']}/revoke", data={"csrf_token": token})
    assert "Revoked the API token “my script”" in ann.get("/account").text
    assert script.get("/api/me", headers=bearer).status_code == 401
    assert ann.post(f"/account/tokens/{listed[0]['id'] + 99}/revoke", data={"csrf_token": token}).status_code == 404


def test_the_admin_lists_and_revokes_every_token_and_a_bad_name_is_refused(app, store):
    ann, token = login(app, "ann")
    refused = ann.post("/account/tokens", data={"csrf_token": token, "name": " "})
    assert refused.status_code == 422 and "token name" in refused.text and store.tokens() == []
    made, _ = store.create_token(store.user_by_name("ann").id, f"nightly {XSS}")
    boss, boss_token = login(app, "boss")
    page = boss.get("/admin/users").text
    assert f'id="token-{made.id}"' in page and XSS not in page
    boss.post(f"/admin/tokens/{made.id}/revoke", data={"csrf_token": boss_token})
    assert "Revoked the API token" in boss.get("/admin/users").text and not store.tokens()[0].active
    assert boss.post("/admin/tokens/999/revoke", data={"csrf_token": boss_token}).status_code == 404


# -------------------------------------------------------------------------------------------- review page


def test_the_review_page_searches_filters_pages_and_shows_each_labelers_progress(app, store, monkeypatch):
    import rlhfkit.feedback.app as app_module

    monkeypatch.setattr(app_module, "REVIEW_PAGE_SIZE", 2)
    store.import_prompts([{"prompt": f"Describe city {number}"} for number in range(3)], replicas=2)
    for name in ("ann", "bob"):
        browser, token = login(app, name)
        for _ in range(2):
            item_id = open_item(browser, "demonstration")
            browser.post(f"/items/{item_id}", data={"csrf_token": token, "completion": f"{name} on Paris"})
        item_id = open_item(browser, "ranking")
        form = ranking_form(store, name, item_id, [6, 3, 3], [1, 2, 3] if name == "ann" else [1, 3, 2],
                            [[], [], []])
        browser.post(f"/items/{item_id}", data={**form, "csrf_token": token})
    boss, _ = login(app, "boss")
    page = boss.get("/admin/review").text
    assert "6 answer(s); page 1 of 3." in page and page.count('class="card review"') == 2
    assert "Next page" in page and "Previous page" not in page
    labelers = page[page.index('id="labelers"'):page.index("</section>", page.index('id="labelers"'))]
    assert "0.667" in labelers  # ann and bob rank the shared item alike on 2 of its 3 pairs
    assert boss.get("/admin/review?page=3").text.count('class="card review"') == 2
    found = boss.get("/admin/review?q=BOB+on+paris&status=").text
    assert "2 answer(s)" in found and found.count("· bob") == 2
    assert "2 answer(s)" in boss.get("/admin/review?labeler=ann&kind=demonstration").text
    assert "3 answer(s)" in boss.get("/admin/review?labeler=ann").text
    assert "Name a colour" in boss.get("/admin/review?q=colour&kind=ranking").text
    assert "No answers to ab items here." in boss.get("/admin/review?status=&kind=ab").text
    assert boss.get("/admin/review?labeler=nobody").status_code == 404
    api = client_login_api(app, "boss")
    listed = api.get("/api/admin/answers?labeler=bob&q=paris&limit=1").json()
    assert listed["total"] == 2 and len(listed["answers"]) == 1 and listed["answers"][0]["labeler"] == "bob"
    assert api.get("/api/admin/answers?labeler=nobody").status_code == 422
    assert api.get("/api/admin/answers?limit=0").status_code == 422


# -------------------------------------------------------------------------------------- projects

GUIDE = f"Rate how helpful each answer is.\nNever reward {XSS}."


@pytest.fixture
def likert(store):
    """A 1-5 project with its own flags and instructions, and one ranking item in it."""
    project = store.create_project("likert", instructions=GUIDE, rating_scale=(1, 5), flags=("off_topic", "rude"))
    store.import_samples([{"prompt": "Name a tree", "completions": ["oak", "pine", "rock"], "id": "L1"}],
                         project_id=project.id, replicas=2)
    return project


def test_the_item_page_shows_the_projects_instructions_scale_and_flags(app, store, likert):
    browser, _ = login(app, "ann")
    response = browser.get(f"/next?kind=ranking&project={likert.id}")
    assert response.headers["location"] == "/items/4"
    page = browser.get("/items/4").text
    assert 'id="instructions"' in page and "Rate how helpful each answer is.<br />\nNever reward &lt;script&gt;" in page
    assert re.findall(r'name="rating_0" value="(\d+)"', page) == ["1", "2", "3", "4", "5"]
    assert re.findall(r'name="rating_0" value="\d+" required\s+data-rating-key="(\d)"', page) == list("12345")
    assert "Rate each output 1 (worst) to 5 (best)" in page and "<kbd>1</kbd>–<kbd>5</kbd> rate it" in page
    assert re.findall(r'name="flags_0" value="([^"]+)"\s+data-flag-key="(\w)"', page) == [("off_topic", "o"),
                                                                                        ("rude", "r")]
    assert "harmful" not in page
    default_page = browser.get(f"/items/{open_item(browser, 'demonstration')}").text  # the default project
    assert 'id="instructions"' not in default_page and "project <span id=\"project-name\">default" in default_page


def test_ratings_outside_the_projects_scale_and_other_flags_are_refused(app, store, likert):
    browser, token = login(app, "ann")
    browser.get(f"/next?kind=ranking&project={likert.id}")
    form = ranking_form(store, "ann", 4, [5, 3, 1], [1, 2, 3], [[], [], []])
    for bad, message in (({"rating_0": "6"}, "expected an integer from 1 to 5, got 6"),
                         ({"flags_0": "harmful"}, "list of flags from (&#39;off_topic&#39;, &#39;rude&#39;)")):
        response = browser.post("/items/4", data={"csrf_token": token, **form, **bad})
        assert response.status_code == 422 and message in response.text
    api = client_login_api(app, "ann")
    csrf = api.get("/api/me").json()["csrf_token"]
    response = api.post("/api/items/4/answer", headers={"X-CSRF-Token": csrf},
                        json={"ratings": [7, 3, 1], "flags": [[], [], []], "ranking": [0, 1, 2]})
    assert response.status_code == 422 and response.json()["field"] == "ratings[0]"
    assert store_answers(app) == 0
    response = browser.post("/items/4", data={"csrf_token": token, **form,
                                              "flags_0": "rude"})
    assert response.headers["location"] == f"/next?kind=ranking&project={likert.id}"
    [answer] = store.answers("ranking")
    assert answer.payload["ratings"] == [5, 3, 1] and "Rude" not in browser.get("/items/4").text
    assert "rude" in browser.get("/items/4").text  # a project's own flag is shown as it is named


def test_the_queue_lists_each_projects_work_and_keeps_them_apart(app, store, likert):
    browser, _ = login(app, "ann")
    page = browser.get("/queue").text
    assert "Project default" in page and "Project likert" in page
    assert f'href="/next?kind=ranking&amp;project={likert.id}"' in page
    assert f'href="/next?kind=demonstration&amp;project={likert.id}"' not in page  # likert has rankings only
    assert browser.get(f"/next?kind=ranking&project={likert.id}").headers["location"] == "/items/4"
    assert browser.get("/next?kind=ranking&project=1").headers["location"] == "/items/2"
    assert browser.get("/next?kind=ranking&project=99").status_code == 404
    api = client_login_api(app, "bob")
    item = api.get("/api/next", params={"kind": "ranking", "project": "likert"}).json()["item"]
    assert (item["id"], item["project"]["rating_scale"], item["project"]["instructions"]) == (4, [1, 5], GUIDE)
    assert api.get("/api/next", params={"project": "nope"}).status_code == 422


def test_admins_create_change_import_into_and_export_projects(app, store):
    boss, token = login(app, "boss")
    response = boss.post("/admin/projects", data={"csrf_token": token, "name": "safety", "instructions": "Be strict.",
                                                  "rating_scale": "1-5", "flags": "unsafe, pii"})
    assert response.status_code == 303
    safety = store.project_by_name("safety")
    assert (safety.instructions, safety.rating_scale, safety.flags) == ("Be strict.", (1, 5), ("unsafe", "pii"))
    boss.post("/admin/projects", data={"csrf_token": token, "name": "bad", "rating_scale": "5-1", "flags": ""})
    assert "Project not created: field &#39;rating_scale&#39;: 5-1 is not a scale" in boss.get("/admin").text
    boss.post(f"/admin/projects/{safety.id}", data={"csrf_token": token, "instructions": "Stricter.",
                                                    "rating_scale": "1-7", "flags": "unsafe,,pii"})
    assert "Project not changed: field &#39;flags&#39;: flag 2" in boss.get("/admin").text
    boss.post(f"/admin/projects/{safety.id}", data={"csrf_token": token, "instructions": "Stricter.",
                                                    "rating_scale": "1-7", "flags": "unsafe"})
    assert store.project(safety.id).rating_scale == (1, 7) and store.project(safety.id).instructions == "Stricter."
    boss.post("/admin/import", data={"csrf_token": token, "kind": "ab", "replicas": "1", "project": str(safety.id)},
              files={"file": ("ab.jsonl", b'{"prompt": "S", "completions": ["a", "b"], "id": "S1"}\n')})
    assert "into project “safety”" in boss.get("/admin").text
    ann, ann_token = login(app, "ann")
    item_id = int(ann.get(f"/next?kind=ab&project={safety.id}").headers["location"].rsplit("/", 1)[1])
    ann.post(f"/items/{item_id}", data={"csrf_token": ann_token, "verdict": "b"})
    ann.post(f"/items/{open_item(ann, 'ab')}", data={"csrf_token": ann_token, "verdict": "a"})  # the default's
    rows = [json.loads(line) for line in boss.get("/admin/export/ab?project=safety").text.splitlines()]
    assert [(row["id"], row["verdict"], row["meta"]["project"]) for row in rows] == [("S1", "b", "safety")]
    assert len(boss.get("/admin/export/ab").text.splitlines()) == 2
    assert boss.get("/admin/export/ab?project=nope").status_code == 404
    assert boss.get("/admin/export/pairs?project=safety").headers["location"] == (
        "/admin/export/pairs-from-rankings?project=safety")


def test_the_json_api_creates_lists_and_changes_projects(app, store):
    api = client_login_api(app, "boss")
    csrf = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    created = api.post("/api/admin/projects", headers=csrf,
                       json={"name": "likert", "rating_scale": [1, 5], "flags": ["off_topic"]})
    assert created.status_code == 201 and created.json()["rating_scale"] == [1, 5]
    bad = api.post("/api/admin/projects", headers=csrf, json={"name": "x", "rating_scale": [0, 0]})
    assert bad.status_code == 422 and bad.json()["field"] == "rating_scale"
    duplicate = api.post("/api/admin/projects", headers=csrf, json={"name": "x", "flags": ["a", "A"]})
    assert duplicate.status_code == 422 and "given twice" in duplicate.json()["error"]
    changed = api.put(f"/api/admin/projects/{created.json()['id']}", headers=csrf, json={"instructions": "Read."})
    assert changed.json()["instructions"] == "Read." and changed.json()["flags"] == ["off_topic"]
    assert api.put("/api/admin/projects/99", headers=csrf, json={}).status_code == 404
    listed = api.get("/api/admin/projects").json()["projects"]
    assert [(row["name"], sum(kind["items"] for kind in row["progress"])) for row in listed] == [
        ("default", 3), ("likert", 0)]
    assert api.get("/api/admin/progress", params={"project": "likert"}).json()["progress"][1]["items"] == 0
    labeler = client_login_api(app, "ann")
    assert labeler.post("/api/admin/projects", json={"name": "mine"},
                        headers={"X-CSRF-Token": labeler.get("/api/me").json()["csrf_token"]}).status_code == 403


def script_elements(page: str) -> list[str]:
    """The opening tags of every script element of a page."""
    return re.findall(r"<script\b[^>]*>", page, flags=re.IGNORECASE)


def test_instructions_are_rendered_as_markdown_and_their_html_stays_text(app, store):
    guide = (f"Rate **helpfulness** only.\n\n- read the prompt\n- then the outputs\n\n{XSS} "
             "[the guide](https://example.com/guide) [bad](javascript:alert(1))")
    project = store.create_project("guided", instructions=guide)
    store.import_prompts([{"prompt": "Write a limerick"}], project_id=project.id)
    browser, _ = login(app, "ann")
    item_id = int(browser.get(f"/next?kind=demonstration&project={project.id}").headers["location"].rsplit("/", 1)[1])
    boss, _ = login(app, "boss")
    for page in (browser.get(f"/items/{item_id}").text, browser.get("/queue").text, boss.get("/admin").text):
        assert "<strong>helpfulness</strong>" in page
        assert "<ul>\n<li>read the prompt</li>\n<li>then the outputs</li>\n</ul>" in page
        assert script_elements(page) == ['<script src="/static/app.js" defer>']  # the app's own, no other
        assert XSS not in page and "&lt;script&gt;alert('owned')&lt;/script&gt;" in page
        assert '<a href="https://example.com/guide" rel="noopener noreferrer">the guide</a>' in page
        assert 'href="javascript:' not in page
    admin_page = boss.get("/admin").text
    assert f'id="instructions-preview-{project.id}"' in admin_page


def test_review_agreement_and_open_assignments_per_project(app, store, likert):
    """Two labelers rank likert's item alike; ann also writes a demonstration in the default project and bob leaves
    one open there: each page and API shows one project's part when asked."""
    for name in ("ann", "bob"):
        browser, token = login(app, name)
        assert browser.get(f"/next?kind=ranking&project={likert.id}").headers["location"] == "/items/4"
        form = ranking_form(store, name, 4, [5, 3, 1], [1, 2, 3], [[], [], []])
        assert browser.post("/items/4", data={"csrf_token": token, **form}).status_code == 303
    ann, token = login(app, "ann")
    ann.post(f"/items/{open_item(ann, 'demonstration')}", data={"csrf_token": token, "completion": "a poem"})
    bob, _ = login(app, "bob")
    open_item(bob, "ab")  # open in the default project, unanswered
    boss, boss_token = login(app, "boss")
    page = boss.get("/admin/review?status=&project=likert").text
    assert "2 answer(s)" in page and page.count('class="card review"') == 2 and "Name a tree" in page
    assert '<option value="likert" selected>likert</option>' in page and "a poem" not in page
    labelers = page[page.index('id="labelers"'):page.index("</section>", page.index('id="labelers"'))]
    assert re.search(r"ann</a></td>\s*<td>1</td>", labelers) and "1.000" in labelers
    assert "project=likert" in page[page.index('id="labelers"'):]  # its links keep the project
    everything = boss.get("/admin/review?status=").text
    assert "3 answer(s)" in everything and "project default" in everything and "project likert" in everything
    assert boss.get("/admin/review?project=nope").status_code == 404
    api = client_login_api(app, "boss")
    assert api.get("/api/admin/answers", params={"project": "likert"}).json()["total"] == 2
    assert api.get("/api/admin/answers", params={"project": "default"}).json()["total"] == 1
    assert api.get("/api/admin/answers", params={"project": "nope"}).status_code == 422
    stats = {row["username"]: row for row in api.get("/api/admin/users", params={"project": "default"}).json()["users"]}
    assert (stats["ann"]["answers"], stats["bob"]["answers"], stats["bob"]["open_assignments"]) == (1, 0, 1)
    # agreement
    assert [row["labelers"] for row in boss.get("/admin/agreement.json?project=likert").json()["per_item"]] == [
        ["ann", "bob"]]
    assert boss.get("/admin/agreement.json?project=default").json()["per_item"] == []
    assert boss.get("/admin/agreement.json?project=nope").status_code == 404
    # open assignments and their release
    admin_likert = boss.get("/admin?project=likert").text
    assert "0 item(s) opened and not answered yet" in admin_likert
    assert 'name="project" value="likert"' in admin_likert and "/admin/agreement.json?project=likert" in admin_likert
    assert "1 item(s) opened and not answered yet" in boss.get("/admin?project=default").text
    assert [row["project"] for row in api.get("/api/admin/assignments").json()["assignments"]] == ["default"]
    assert api.get("/api/admin/assignments", params={"project": "likert"}).json()["assignments"] == []
    released = boss.post("/admin/assignments/release", data={"csrf_token": boss_token, "older_than_minutes": "0",
                                                             "project": "likert"})
    assert released.headers["location"] == "/admin?project=likert#assignments"
    assert "Released 0 open assignment(s) of project “likert”" in boss.get(released.headers["location"]).text
    headers = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    assert api.post("/api/admin/assignments/release", json={"project": "nope"}, headers=headers).status_code == 422
    assert api.post("/api/admin/assignments/release", json={"project": "default"},
                    headers=headers).json() == {"released": 1}


def test_projects_are_renamed_to_free_names_only(app, store, likert):
    boss, token = login(app, "boss")
    page = boss.get("/admin").text
    assert re.search(r'id="name-1"[^>]*readonly', page) and not re.search(rf'id="name-{likert.id}"[^>]*readonly', page)
    boss.post(f"/admin/projects/{likert.id}", data={"csrf_token": token, "name": "five point"})
    assert "Changed the project “five point”" in boss.get("/admin").text
    assert store.project(likert.id).name == "five point" and store.project(likert.id).instructions == GUIDE
    boss.post(f"/admin/projects/{likert.id}", data={"csrf_token": token, "name": "default"})
    assert ("Project not changed: field &#39;name&#39;: a project named &#39;default&#39; exists already"
            in boss.get("/admin").text)
    boss.post("/admin/projects/1", data={"csrf_token": token, "name": "general"})
    assert "the project &#39;default&#39; keeps its name" in boss.get("/admin").text
    api = client_login_api(app, "boss")
    csrf = {"X-CSRF-Token": api.get("/api/me").json()["csrf_token"]}
    renamed = api.put(f"/api/admin/projects/{likert.id}", headers=csrf, json={"name": "likert-5"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "likert-5"
    taken = api.put(f"/api/admin/projects/{likert.id}", headers=csrf, json={"name": "default"})
    assert taken.status_code == 422 and taken.json()["field"] == "name" and "exists already" in taken.json()["error"]
    assert api.get("/api/next", params={"project": "likert-5"}).json()["item"]["project"]["name"] == "likert-5"
