"""The job ledger's database: SQLite (WAL) by default, PostgreSQL by URL.

The only place that opens ledger sessions. Rows and transitions are defined in
``pipeline.ledger``; this module registers studies idempotently, lists what a run still has to
do, and saves jobs. Inserts use ``ON CONFLICT DO NOTHING ... RETURNING`` so a re-run (or two
workers) never creates a second row for the same (study, model version); on PostgreSQL the
rowcount of such an insert is -1, hence ``RETURNING``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, SQLModel, col, create_engine, select

from pipeline.ledger import TERMINAL, DiscoveryWatermark, DraftJob, JobState, count_states


@dataclass(frozen=True)
class NewStudy:
    """A discovered study to register."""

    study_uid: str
    study_ref: str
    accession_number: str | None


def open_engine(url: str) -> Engine:
    """Create the engine and the tables; SQLite gets WAL and a busy timeout."""
    is_sqlite = url.startswith("sqlite")
    database = make_url(url).database
    if is_sqlite and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": 30} if is_sqlite else {},
        pool_pre_ping=not is_sqlite,
    )
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    SQLModel.metadata.create_all(engine)
    return engine


class LedgerStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def register(self, studies: Iterable[NewStudy], model_version: str) -> int:
        """Insert a row per new (study, model version); existing rows are left as they are.

        Returns how many rows were new.
        """
        rows: list[dict[str, object]] = [
            {
                "study_uid": s.study_uid,
                "study_ref": s.study_ref,
                "accession_number": s.accession_number,
                "model_version": model_version,
                "state": JobState.DISCOVERED,
                "flags": [],
                "timings": {},
                "fhir_ids": {},
                "links": {},
                "attempts": 0,
            }
            for s in studies
        ]
        if not rows:
            return 0
        insert = pg_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        table = DraftJob.__table__  # type: ignore[attr-defined]
        statement = (
            insert(table)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["study_uid", "model_version"])
            .returning(table.c.id)
        )
        with Session(self._engine) as session:
            inserted = session.execute(statement).all()
            session.commit()
        return len(inserted)

    def jobs(self, model_version: str, study_uids: Sequence[str] | None = None) -> list[DraftJob]:
        """Jobs of a model version, optionally limited to some studies, oldest first."""
        with Session(self._engine) as session:
            query = select(DraftJob).where(DraftJob.model_version == model_version)
            if study_uids is not None:
                query = query.where(col(DraftJob.study_uid).in_(list(study_uids)))
            return list(session.exec(query.order_by(col(DraftJob.id))).all())

    def pending(self, model_version: str) -> list[DraftJob]:
        """Jobs a run still has to do: everything not written or dead-lettered."""
        with Session(self._engine) as session:
            query = (
                select(DraftJob)
                .where(DraftJob.model_version == model_version)
                .where(col(DraftJob.state).not_in(list(TERMINAL)))
                .order_by(col(DraftJob.id))
            )
            return list(session.exec(query).all())

    def save(self, jobs: Iterable[DraftJob]) -> None:
        """Persist changed jobs in one transaction."""
        with Session(self._engine) as session:
            for job in jobs:
                session.merge(job)
            session.commit()

    def counts(self, model_version: str) -> dict[JobState, int]:
        return count_states(self.jobs(model_version))

    def watermark(self, source: str) -> dict[str, Any] | None:
        """The saved new-study watermark of ``source``, or None before the first run."""
        with Session(self._engine) as session:
            row = session.get(DiscoveryWatermark, source)
            return dict(row.value) if row is not None else None

    def save_watermark(self, source: str, value: dict[str, Any]) -> None:
        """Save it; call only after the studies it covers are registered (nothing is lost)."""
        with Session(self._engine) as session:
            session.merge(DiscoveryWatermark(source=source, value=value))
            session.commit()
