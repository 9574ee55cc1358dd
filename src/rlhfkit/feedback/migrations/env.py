"""Alembic environment of the feedback store: run programmatically by :func:`rlhfkit.feedback.store.upgrade_database`.

The caller passes an open connection in ``config.attributes["connection"]`` (the store's engine, inside
its transaction); there is no alembic.ini. Offline (SQL script) mode is not supported.
"""

from __future__ import annotations

from alembic import context

from rlhfkit.feedback.store import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("the feedback store's migrations run through rlhfkit.feedback.store.upgrade_database")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
