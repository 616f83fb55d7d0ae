"""The ``writing`` job state and the ``ehr_device`` table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``writing`` is saved before a draft's first request to the EHR, so a job found in it is looked
up there before anything is sent again (connectors.draft_writer). ``ehr_device`` remembers the
model's Device per EHR: written once per model version, not in every draft's request. On
PostgreSQL the ``jobstate`` enum type gains the value (SQLite stores the name as text).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Allowed inside the migration's transaction (PostgreSQL 12+); used only after commit.
        op.execute("ALTER TYPE jobstate ADD VALUE IF NOT EXISTS 'WRITING' AFTER 'DRAFTED'")
    if "ehr_device" not in sa.inspect(bind).get_table_names():
        op.create_table(
            "ehr_device",
            sa.Column("ehr", sa.String(length=200), primary_key=True),
            sa.Column("device_key", sa.String(length=400), primary_key=True),
            sa.Column("reference", sa.String(length=100), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )


def downgrade() -> None:
    # PostgreSQL cannot drop an enum value; jobs in ``writing`` go back to ``drafted`` (their
    # writer then sends without looking first, as releases before this one did).
    op.execute("UPDATE draft_job SET state = 'DRAFTED' WHERE state = 'WRITING'")
    op.execute("UPDATE draft_job SET failed_stage = 'DRAFTED' WHERE failed_stage = 'WRITING'")
    op.drop_table("ehr_device")
