"""Security primitives of the feedback app: password hashing, CSRF tokens and login rate limiting.

* Passwords are stored as argon2id hashes (argon2-cffi; the salt and parameters live in the hash).
* CSRF: each session holds a random token (:func:`new_csrf_token`); every state-changing request must
  send it back (a form field or the ``X-CSRF-Token`` header), compared in constant time
  (:func:`csrf_token_matches`). A page of another site can neither read the token nor set the header.
* :class:`LoginRateLimiter` refuses logins after repeated failures for one account or one client.
"""

from __future__ import annotations

import hmac
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("rlhfkit: a password nobody has")


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted; the parameters are stored in the hash)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; a malformed hash never matches.

    ``password_hash=None`` (no such account) verifies against a dummy hash, so an unknown user name takes
    as long to refuse as a wrong password and the timing does not tell which accounts exist.
    """
    try:
        matches = _hasher.verify(password_hash or _DUMMY_HASH, password)
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
    """At most ``max_failures`` failed logins per key within ``window_s`` seconds (a sliding window).

    The app keys failures by account name and by client address, so guessing one account's password and
    spraying many accounts from one client are both slowed down. A successful login clears its key.
    Thread-safe; ``clock`` is injectable for tests.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or window_s <= 0:
            raise ValueError("max_failures must be >= 1 and window_s > 0")
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key, deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if failures:
            self._failures[key] = failures
        else:
            self._failures.pop(key, None)
        return failures

    def retry_after(self, *keys: str) -> int:
        """Seconds until a login for these keys is allowed again; 0 when it is allowed now."""
        now = self._clock()
        with self._lock:
            waits = [failures[0] + self.window_s - now for key in keys
                     if len(failures := self._recent(key, now)) >= self.max_failures]
        return math.ceil(max(waits)) if waits else 0

    def failed(self, *keys: str) -> None:
        """Record a failed login for each key."""
        now = self._clock()
        with self._lock:
            for key in keys:
                self._failures[key] = self._recent(key, now)
                self._failures[key].append(now)

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of these keys."""
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
