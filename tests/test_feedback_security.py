"""Security of the feedback app: password hashing and CSRF primitives, then one test (or more) for each
finding of issue 25: logout and password changes end sessions on the server, nobody can lock an account
for everyone, request bodies are small and malformed or too deep JSON is a 400."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.testclient import TestClient

from rlhfkit.feedback.app import AppSettings, create_app
from rlhfkit.feedback.security import (
    LoginRateLimiter,
    SessionKeyError,
    csrf_token_matches,
    hash_password,
    new_csrf_token,
    session_key_from_file,
    verify_password,
)
from rlhfkit.feedback.store import Store


def test_passwords_are_salted_argon2id_hashes():
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first.startswith("$argon2id$") and first != second  # a fresh salt each time
    assert verify_password(first, "correct horse") and verify_password(second, "correct horse")
    assert not verify_password(first, "correct horse ")
    assert not verify_password("not a hash", "correct horse")


def test_an_unknown_account_never_verifies():
    assert not verify_password(None, "rlhfkit: a password nobody has")  # not even the dummy hash's password
    assert not verify_password("", "anything")


def test_csrf_tokens_are_random_and_compared_exactly():
    token = new_csrf_token()
    assert len(token) >= 43 and token != new_csrf_token()
    assert csrf_token_matches(token, token)
    assert not csrf_token_matches(token, token[:-1])
    assert not csrf_token_matches(token, None) and not csrf_token_matches(None, token)
    assert not csrf_token_matches("", "")


# ------------------------------------------------------- the findings of issue 25, one test (or more) each


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.create_user("boss", hash_password("boss password"), "admin")
    store.create_user("ann", hash_password("ann password"))
    yield store
    store.close()


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(store, clock):
    return create_app(store, secret_key="test secret", rate_limiter=LoginRateLimiter(5, 60, clock=clock),
                      settings=AppSettings())


def api_client(app, address: str = "10.0.0.1") -> TestClient:
    return TestClient(app, follow_redirects=False, client=(address, 40000))


def api_login(browser: TestClient, username: str, password: str) -> httpx.Response:
    return browser.post("/api/login", json={"username": username, "password": password})


def test_logout_ends_the_session_on_the_server_so_a_copied_cookie_stops_working(app):
    browser = api_client(app)
    token = api_login(browser, "ann", "ann password").json()["csrf_token"]
    stolen = api_client(app, "10.6.6.6")
    stolen.cookies = browser.cookies  # the cookie as it was before logout (e.g. copied from the machine)
    assert stolen.get("/api/me").status_code == 200
    assert browser.post("/logout", headers={"X-CSRF-Token": token}).status_code == 303
    assert stolen.get("/api/me").status_code == 401
    assert stolen.get("/queue").status_code == 303  # to the login page


def test_a_password_change_ends_every_other_session_and_keeps_this_one(app, store):
    laptop, phone = api_client(app), api_client(app, "10.0.0.2")
    token = api_login(laptop, "ann", "ann password").json()["csrf_token"]
    api_login(phone, "ann", "ann password")
    wrong = laptop.post("/api/me/password", json={"current_password": "guess", "new_password": "new password"},
                        headers={"X-CSRF-Token": token})
    assert wrong.status_code == 422 and wrong.json()["field"] == "current password"
    changed = laptop.post("/api/me/password", json={"current_password": "ann password",
                                                    "new_password": "new password"}, headers={"X-CSRF-Token": token})
    assert changed.status_code == 200
    assert phone.get("/api/me").status_code == 401
    assert laptop.get("/api/me").status_code == 200  # a fresh session for the client that changed it
    assert api_login(api_client(app), "ann", "new password").status_code == 200


def test_the_password_page_changes_it_and_logs_out_other_sessions(app):
    other = api_client(app, "10.0.0.9")
    api_login(other, "ann", "ann password")
    browser = api_client(app)
    api_login(browser, "ann", "ann password")
    page = browser.get("/account")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    short = browser.post("/account/password", data={"csrf_token": token, "current_password": "ann password",
                                                    "new_password": "short"})
    assert short.status_code == 422 and "new password: must be at least 8 characters" in short.text
    done = browser.post("/account/password", data={"csrf_token": token, "current_password": "ann password",
                                                   "new_password": "a better password"})
    assert done.status_code == 303 and other.get("/api/me").status_code == 401
    assert "Password changed" in browser.get("/account").text


def test_nobody_can_lock_an_account_for_everyone(app, clock):
    attacker = api_client(app, "10.6.6.6")
    for _ in range(5):
        assert api_login(attacker, "boss", "guess").status_code == 401
    refused = api_login(attacker, "boss", "boss password")
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert api_login(api_client(app, "10.0.0.1"), "boss", "boss password").status_code == 200  # the owner


def test_the_back_off_grows_with_each_further_failure(app, clock):
    attacker = api_client(app, "10.6.6.6")
    for _ in range(5):
        api_login(attacker, "ann", "guess")
    waits = []
    for _ in range(3):
        clock.now += 3600
        assert api_login(attacker, "ann", "guess").status_code == 401  # allowed once the wait is over
        waits.append(int(api_login(attacker, "ann", "guess").headers["retry-after"]))
    assert waits == [120, 240, 480]


def test_a_client_spraying_many_accounts_is_slowed_down_but_only_that_client(app):
    sprayer = api_client(app, "10.6.6.6")
    for number in range(20):  # 4 x 5 failures over many accounts, none of them five times
        assert api_login(sprayer, f"user{number % 10}", "guess").status_code == 401
    assert api_login(sprayer, "ann", "ann password").status_code == 429
    assert api_login(api_client(app, "10.0.0.1"), "ann", "ann password").status_code == 200


def test_bodies_are_limited_to_a_few_kib_but_for_answers_and_imports(app):
    browser = api_client(app)
    big_login = browser.post("/api/login", content=b'{"username": "' + b"x" * 20_000 + b'"}',
                             headers={"content-type": "application/json"})
    assert big_login.status_code == 413 and "16 KiB" in big_login.json()["error"]
    streamed = browser.post("/api/login", content=iter([b"x" * 4096] * 8), headers={"content-type": "application/json"})
    assert streamed.status_code == 413  # no Content-Length: counted while it streams in
    assert browser.get("/login").status_code == 200
    settings = AppSettings()
    assert settings.max_body_bytes("/api/login") == settings.max_body_bytes("/logout") == 16 * 1024
    assert settings.max_body_bytes("/items/3") == settings.max_body_bytes("/api/items/3/answer") == 2**20
    assert settings.max_body_bytes("/admin/import") == 32 * 2**20


def test_malformed_and_too_deep_json_is_a_400_not_a_500(app):
    browser = api_client(app)
    for body in (b"{", b"\xff\xfe", b"[" * 200_000 + b"]" * 200_000, b"[" * 5_000, b"[" * 17 + b"]" * 17):
        response = browser.post("/api/login", content=body, headers={"content-type": "application/json"})
        assert response.status_code in (400, 413), body[:20]
    deep = browser.post("/api/login", content=b"[" * 17 + b"]" * 17, headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "deeper than 16" in deep.json()["error"]
    token = api_login(browser, "ann", "ann password").json()["csrf_token"]
    nested = browser.post("/api/items/1/answer", content=b"[" * 200_000 + b"]" * 200_000,
                          headers={"content-type": "application/json", "X-CSRF-Token": token})
    assert nested.status_code == 400  # under the 1 MiB answer limit: the parser's depth is what refuses it
    assert browser.post("/api/items/1/answer", content=b'{"completion": ',
                        headers={"content-type": "application/json", "X-CSRF-Token": token}).status_code == 400


def test_settings_come_from_the_environment_with_clear_errors():
    settings = AppSettings.from_env({"RLHFKIT_ASSIGNMENT_TTL_MINUTES": "30", "RLHFKIT_MAX_BODY_KIB": "4",
                                     "RLHFKIT_MAX_IMPORT_MIB": ""})
    assert settings == AppSettings(assignment_ttl_minutes=30, max_body_kib=4)
    assert AppSettings.from_env({"RLHFKIT_ASSIGNMENT_TTL_MINUTES": "0"}).assignment_ttl is None
    with pytest.raises(ValueError, match="RLHFKIT_MAX_BODY_KIB='lots' is not an integer"):
        AppSettings.from_env({"RLHFKIT_MAX_BODY_KIB": "lots"})
    with pytest.raises(ValueError, match="must be 0"):
        AppSettings(assignment_ttl_minutes=-1)


# ------------------------------------------------------------------ the session key kept across restarts


def test_the_session_key_is_generated_once_into_a_0600_file(tmp_path):
    import stat

    path = tmp_path / "keys" / "feedback.db.session-key"
    key = session_key_from_file(path)
    assert len(key) >= 43 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_key_from_file(path) == key  # read back, not replaced
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    other = session_key_from_file(tmp_path / "other.session-key")
    assert other != key


def test_the_session_key_file_is_private_whatever_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o000)
    try:
        path = tmp_path / "open.session-key"
        session_key_from_file(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(("mode", "content", "message"), [
    (0o644, "k" * 43, "can be read or written by others"),
    (0o620, "k" * 43, "chmod 600"),
    (0o600, "short", "fewer than 32"),
])
def test_a_session_key_file_others_can_read_or_too_short_is_refused(tmp_path, mode, content, message):
    path = tmp_path / "feedback.db.session-key"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(SessionKeyError, match=message):
        session_key_from_file(path)


def test_importing_the_security_module_computes_no_hash():
    """A hash takes as long as a login: the dummy one is made when the web app starts, not at import (every
    command imports this module's package), and unknown accounts are still checked against it."""
    import subprocess
    import sys

    script = ("import time; from argon2 import PasswordHasher\n"
              "calls = []\n"
              "original = PasswordHasher.hash\n"
              "PasswordHasher.hash = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)\n"
              "import rlhfkit.feedback.security as security\n"
              "print(len(calls))\n"
              "security.warm_up().join()\n"
              "print(len(calls), security.verify_password(None, 'x'), len(calls))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1", "False", "1"]
