"""Security primitives of the feedback app: password hashing, CSRF tokens and login rate limiting.

* Passwords are stored as argon2id hashes (argon2-cffi; the salt and parameters live in the hash).
* CSRF: each session holds a random token (:func:`new_csrf_token`); every state-changing request must
  send it back (a form field or the ``X-CSRF-Token`` header), compared in constant time
  (:func:`csrf_token_matches`). A page of another site can neither read the token nor set the header.
* :class:`LoginRateLimiter` slows logins down after repeated failures for one account from one client
  (never for the account everywhere) and for one client over all accounts, with a growing back-off.
* :func:`session_key_from_file`: the key that signs session cookies, generated once and kept in a file
  only its owner can read (0600), so a restart of the server keeps everyone logged in.
"""

from __future__ import annotations

import functools
import hmac
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """The hash an unknown account's login is checked against (computed once: a hash takes as long as a
    login, so not at import, where it would slow every command down; :func:`warm_up` computes it early)."""
    return _hasher.hash("rlhfkit: a password nobody has")


def warm_up() -> threading.Thread:
    """Compute the dummy hash in the background (the web app does at start), so that even the first login
    of an unknown account takes no longer than a known one's."""
    thread = threading.Thread(target=_dummy_hash, name="rlhfkit-dummy-hash", daemon=True)
    thread.start()
    return thread


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted; the parameters are stored in the hash)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; a malformed hash never matches.

    ``password_hash=None`` (no such account) verifies against a dummy hash, so an unknown user name takes
    as long to refuse as a wrong password and the timing does not tell which accounts exist.
    """
    try:
        matches = _hasher.verify(password_hash or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False
    return matches and password_hash is not None


def new_csrf_token() -> str:
    """A fresh random CSRF token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def csrf_token_matches(expected: str | None, submitted: str | None) -> bool:
    """Whether the submitted token is the session's, in constant time; a missing token never matches."""
    if not expected or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


class LoginRateLimiter:
    """Growing back-off after failed logins, per account *and* client, and per client.

    After ``max_failures`` failures in a row for one account from one client, that client waits
    ``lockout_s`` before its next try at that account, and twice as long after every further failure (at
    most ``max_lockout_s``). Nobody can lock an account for everyone: the same account from another client
    is not slowed down, so the owner's correct password always works from their own machine. A client
    that sprays many accounts waits the same way after ``max_client_failures`` failures over all accounts
    (4 x ``max_failures`` by default: a team behind one address mistypes too). A successful login clears
    the failures of its account and client pair; failures are forgotten ``forget_after_s`` after the last
    one. Thread-safe; ``clock`` is injectable for tests.
    """

    def __init__(self, max_failures: int = 5, lockout_s: float = 60.0, *, max_lockout_s: float = 3600.0,
                 max_client_failures: int | None = None, forget_after_s: float = 24 * 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or lockout_s <= 0 or max_lockout_s < lockout_s or forget_after_s <= 0:
            raise ValueError("max_failures must be >= 1, lockout_s > 0, max_lockout_s >= lockout_s and "
                             "forget_after_s > 0")
        self.max_failures = max_failures
        self.max_client_failures = max_client_failures or 4 * max_failures
        self.lockout_s = lockout_s
        self.max_lockout_s = max_lockout_s
        self.forget_after_s = forget_after_s
        self._clock = clock
        self._failures: dict[tuple[str, ...], tuple[int, float]] = {}  # key -> (failures in a row, last one)
        self._lock = threading.Lock()

    def _keys(self, username: str, client: str) -> tuple[tuple[tuple[str, ...], int], ...]:
        """(key, failures allowed before the back-off) for the account-and-client pair and the client."""
        return (("account", username, client), self.max_failures), (("client", client), self.max_client_failures)

    def _wait(self, key: tuple[str, ...], allowed: int, now: float) -> float:
        count, last = self._failures.get(key, (0, now))
        if now - last >= self.forget_after_s:
            self._failures.pop(key, None)
            return 0.0
        if count < allowed:
            return 0.0
        lockout = min(self.max_lockout_s, self.lockout_s * 2.0 ** min(count - allowed, 64))
        return max(0.0, last + lockout - now)

    def retry_after(self, username: str, client: str) -> int:
        """Seconds until ``client`` may try ``username`` again; 0 when it may now."""
        now = self._clock()
        with self._lock:
            return math.ceil(max(self._wait(key, allowed, now) for key, allowed in self._keys(username, client)))

    def failed(self, username: str, client: str) -> None:
        """Record a failed login for ``username`` from ``client``."""
        now = self._clock()
        with self._lock:
            if len(self._failures) > 100_000:  # bound the memory a flood of made-up names can take
                self._failures = {key: value for key, value in self._failures.items()
                                  if now - value[1] < self.forget_after_s}
            for key, allowed in self._keys(username, client):
                self._wait(key, allowed, now)  # forgets an old streak
                count, _ = self._failures.get(key, (0, now))
                self._failures[key] = (count + 1, now)

    def succeeded(self, username: str, client: str) -> None:
        """Clear the failures of this account from this client (a client's spraying count stays)."""
        with self._lock:
            self._failures.pop(self._keys(username, client)[0][0], None)


MIN_SESSION_KEY_CHARS = 32


class SessionKeyError(ValueError):
    """The session key file cannot be used (readable by others, too short, not a file)."""


def session_key_from_file(path: Path) -> str:
    """The session-signing key kept in ``path``; generated (256 random bits) and written with mode 0600 when
    the file does not exist yet, with its folder (0700) if needed.

    Written to a private temporary file that is then linked to ``path``: a second server starting at the same
    moment reads the first one's complete key, never half of it, and never overwrites it. A key file that
    others can read or write, or that holds fewer than 32 characters, is refused (:class:`SessionKeyError`):
    whoever knows the key can forge session cookies.
    """
    path = Path(path).expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                os.fchmod(file.fileno(), 0o600)  # whatever the umask
                file.write(secrets.token_urlsafe(32) + "\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another server created it first: use theirs
        finally:
            temporary.unlink(missing_ok=True)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise SessionKeyError(f"{path}: the session key file is not a regular file")
    if info.st_mode & 0o077:
        raise SessionKeyError(f"{path}: the session key file can be read or written by others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); make it private: chmod 600 {path}")
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < MIN_SESSION_KEY_CHARS:
        raise SessionKeyError(f"{path}: the session key file holds {len(key)} characters, fewer than "
                              f"{MIN_SESSION_KEY_CHARS}; delete it to have a new key generated")
    return key
