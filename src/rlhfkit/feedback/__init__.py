"""The human-feedback app: labelers write demonstrations, rate and rank outputs and judge A/B pairs.

* :mod:`rlhfkit.feedback.store`: the database (SQLAlchemy 2 + Alembic migrations); the only module
  that speaks SQL. SQLite (WAL mode) by default, any SQLAlchemy URL (PostgreSQL for teams).
* :mod:`rlhfkit.feedback.agreement`: inter-labeler agreement (pairwise agreement, Kendall tau).
* :mod:`rlhfkit.feedback.security`: password hashing, CSRF tokens, login rate limiting.
* :mod:`rlhfkit.feedback.app`: the FastAPI web app (server-rendered pages, a little plain JavaScript).
* :mod:`rlhfkit.feedback.cli`: ``rlhfkit serve``, ``rlhfkit export`` and ``rlhfkit feedback ...``.
"""
