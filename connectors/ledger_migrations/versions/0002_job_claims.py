"""Claims with leases on draft_job: claimed_by, lease_until, version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Several workers on one ledger take jobs by claim (``LedgerStore.claim_page``); ``version``
makes saves conditional. Existing rows start free, at version 0. A ledger whose draft_job
already has a column (one created by ``create_all`` of a model that had it) keeps it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("claimed_by", sa.String(length=200), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("0")),
    ]


def upgrade() -> None:
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("draft_job")}
    for column in _columns():
        if column.name not in present:
            op.add_column("draft_job", column)


def downgrade() -> None:
    for column in reversed(_columns()):
        op.drop_column("draft_job", column.name)
