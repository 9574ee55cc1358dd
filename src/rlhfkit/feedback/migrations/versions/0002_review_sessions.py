"""Answers keep every version, a review status and the order shown; server-side login sessions;
assignments indexed by age (they expire).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the answers' new columns, the answer_versions table (version 1 of every existing answer) and sessions."""
    with op.batch_alter_table("answers") as batch:
        batch.add_column(sa.Column("shown_order", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="submitted"))
        batch.add_column(sa.Column("reviewed_by", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key("fk_answers_reviewed_by_users", "users", ["reviewed_by"], ["id"],
                                 ondelete="SET NULL")
    op.create_table(
        "answer_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("answer_id", sa.Integer(), sa.ForeignKey("answers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("skipped", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("answer_id", "version", name="uq_answer_versions_answer_version"),
    )
    op.execute("INSERT INTO answer_versions (answer_id, version, payload, skipped, created_at) "
               "SELECT id, 1, payload, skipped, created_at FROM answers")
    op.create_table(
        "sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_index("ix_assignments_created_at", "assignments", ["created_at"])  # finding expired assignments


def downgrade() -> None:
    """Drop the sessions and answer versions and the answers' new columns (their latest versions stay)."""
    op.drop_index("ix_assignments_created_at", table_name="assignments")
    op.drop_index("ix_sessions_user_id", table_name="sessions")
    op.drop_table("sessions")
    op.drop_table("answer_versions")
    with op.batch_alter_table("answers") as batch:
        batch.drop_constraint("fk_answers_reviewed_by_users", type_="foreignkey")
        for column in ("reviewed_at", "reviewed_by", "status", "version", "shown_order"):
            batch.drop_column(column)
