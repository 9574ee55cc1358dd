"""Projects: each item belongs to one, with its own instructions, rating scale and flags; every existing item
goes into the project ``default`` (1-7 and InstructGPT's three flags, as before).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# the defaults as they were when projects came (a migration never follows later changes of the code)
DEFAULT_PROJECT = {"name": "default", "instructions": "", "rating_min": 1, "rating_max": 7,
                   "flags": ["fails_instruction", "harmful", "made_up_facts"]}


def upgrade() -> None:
    """Create the projects table and the default project, and put every item in it."""
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("rating_min", sa.Integer(), nullable=False),
        sa.Column("rating_max", sa.Integer(), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_projects_name"),
    )
    op.bulk_insert(projects, [{**DEFAULT_PROJECT, "created_at": datetime.now(timezone.utc)}])
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("project_id", sa.Integer(), nullable=True))
    op.execute("UPDATE items SET project_id = (SELECT id FROM projects WHERE name = 'default')")
    with op.batch_alter_table("items") as batch:
        batch.alter_column("project_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_items_project_id_projects", "projects", ["project_id"], ["id"])
        batch.create_index("ix_items_project_id", ["project_id"])


def downgrade() -> None:
    """Drop the items' project and the projects (every item stays; the projects' settings are lost)."""
    with op.batch_alter_table("items") as batch:
        batch.drop_index("ix_items_project_id")
        batch.drop_constraint("fk_items_project_id_projects", type_="foreignkey")
        batch.drop_column("project_id")
    op.drop_table("projects")
