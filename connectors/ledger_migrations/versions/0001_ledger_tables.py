"""The ledger's tables as the releases before migrations created them.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Also adopts a ledger those releases created (``SQLModel.metadata.create_all`` on every open,
then the columns and indexes added since): tables that exist are kept with their rows and only
gain the nullable columns and the indexes they lack; missing tables are created.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# pipeline.ledger.JobState as stored (SQLAlchemy's Enum keeps the member names). Datetimes are
# SQLModel's UTCDateTime: TIMESTAMP WITH TIME ZONE on PostgreSQL.
_JOB_STATES = ("DISCOVERED", "FETCHED", "DRAFTED", "WRITTEN", "SKIPPED", "FAILED", "DEAD_LETTERED")


def _tables() -> sa.MetaData:
    metadata = sa.MetaData()
    job_state = sa.Enum(*_JOB_STATES, name="jobstate")
    sa.Table(
        "draft_job",
        metadata,
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False, index=True),
        sa.Column("study_ref", sa.String(length=32), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=True, index=True),
        sa.Column("model_version", sa.String(length=200), nullable=False, index=True),
        sa.Column("state", job_state, nullable=False, index=True),
        sa.Column("failed_stage", job_state, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("error_type", sa.String(length=100), nullable=True),
        sa.Column("flags", sa.JSON(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("links", sa.JSON(), nullable=True),
        sa.Column("context_sources", sa.JSON(), nullable=True),
        sa.Column("draft", sa.JSON(), nullable=True),
        sa.Column("output_sha256", sa.String(length=64), nullable=True),
        sa.Column("draft_id", sa.String(length=64), nullable=True),
        sa.Column("subgroups", sa.JSON(), nullable=True),
        sa.Column("fhir_ids", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_uid", "model_version", name="uq_study_model"),
        sa.Index("ix_draft_job_version_state_id", "model_version", "state", "id"),
    )
    sa.Table(
        "discovery_watermark",
        metadata,
        sa.Column("source", sa.String(length=200), primary_key=True),
        sa.Column("value", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    sa.Table(
        "signed_report_labels",
        metadata,
        sa.Column("study_uid", sa.String(length=64), primary_key=True),
        sa.Column("labeler", sa.String(length=64), primary_key=True),
        sa.Column("report_ref", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
    )
    sa.Table(
        "fairness_run",
        metadata,
        sa.Column("key", sa.String(length=64), primary_key=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("measure_report_id", sa.String(length=64), nullable=False),
        sa.Column("alerts", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    return metadata


def upgrade() -> None:
    bind = op.get_bind()
    metadata = _tables()
    inspector = sa.inspect(bind)
    present = set(inspector.get_table_names())
    # New tables, with their indexes (and on PostgreSQL the jobstate enum type, once).
    metadata.create_all(bind, tables=[t for t in metadata.sorted_tables if t.name not in present])
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in columns:
                continue
            if not column.nullable:
                raise RuntimeError(f"ledger column {table.name}.{column.name} is missing")
            op.add_column(table.name, column.copy())
        indexes = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    _tables().drop_all(bind)
