"""Password hashing and CSRF token primitives of the feedback app (rate limiting: test_feedback_app.py)."""

from __future__ import annotations

from rlhfkit.feedback.security import csrf_token_matches, hash_password, new_csrf_token, verify_password


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
