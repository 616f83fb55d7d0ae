"""The job ledger's database: SQLite (WAL) by default, PostgreSQL by URL.

The only place that opens ledger sessions. Rows and transitions are defined in
``pipeline.ledger``; this module registers studies idempotently, lists what a run still has to
do, and saves jobs. Inserts use ``ON CONFLICT DO NOTHING ... RETURNING`` so a re-run (or two
workers) never creates a second row for the same (study, model version); on PostgreSQL the
rowcount of such an insert is -1, hence ``RETURNING``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel, col, create_engine, select

from medvlm.errors import LedgerUnavailableError
from pipeline.ledger import (
    TERMINAL,
    DiscoveryWatermark,
    DraftJob,
    FairnessRun,
    JobState,
    SignedReportLabels,
    count_states,
)


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
    _add_new_columns(engine)
    return engine


def _add_new_columns(engine: Engine) -> None:
    """Add columns introduced after a ledger was created (nullable JSON ones, e.g. subgroups).

    ``create_all`` creates missing tables only; a ledger from an earlier release would otherwise
    fail on its first query. Existing rows get NULL, which readers treat as empty.
    """
    table = DraftJob.__table__  # type: ignore[attr-defined]
    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    missing = [c for c in table.columns if c.name not in present]
    if not missing:
        return
    with engine.begin() as connection:
        for column in missing:
            if not column.nullable:
                raise RuntimeError(f"ledger column {column.name} is missing and not nullable")
            kind = column.type.compile(dialect=engine.dialect)
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


class LedgerStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """A session; database errors become ``LedgerUnavailableError``, which stops a run
        (no study is to blame when the ledger itself fails)."""
        try:
            with Session(self._engine) as session:
                yield session
        except SQLAlchemyError as exc:
            raise LedgerUnavailableError(
                f"job ledger ({self._engine.url.get_backend_name()}): {type(exc).__name__}"
            ) from exc

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
                "subgroups": {},
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
        with self._session() as session:
            inserted = session.execute(statement).all()
            session.commit()
        return len(inserted)

    def jobs(self, model_version: str, study_uids: Sequence[str] | None = None) -> list[DraftJob]:
        """Jobs of a model version, optionally limited to some studies, oldest first."""
        with self._session() as session:
            query = select(DraftJob).where(DraftJob.model_version == model_version)
            if study_uids is not None:
                query = query.where(col(DraftJob.study_uid).in_(list(study_uids)))
            return list(session.exec(query.order_by(col(DraftJob.id))).all())

    def jobs_between(
        self, since: dt.datetime, until: dt.datetime, model_version: str | None = None
    ) -> list[DraftJob]:
        """Jobs registered in ``[since, until)``, of one model version or all, oldest first.

        Naive datetimes are taken as UTC (the ledger's clock).
        """
        since, until = (t if t.tzinfo is None else t.astimezone(dt.UTC) for t in (since, until))
        with self._session() as session:
            query = select(DraftJob).where(
                col(DraftJob.created_at) >= since, col(DraftJob.created_at) < until
            )
            if model_version is not None:
                query = query.where(DraftJob.model_version == model_version)
            return list(session.exec(query.order_by(col(DraftJob.id))).all())

    def pending(self, model_version: str) -> list[DraftJob]:
        """Jobs a run still has to do: everything not written or dead-lettered."""
        with self._session() as session:
            query = (
                select(DraftJob)
                .where(DraftJob.model_version == model_version)
                .where(col(DraftJob.state).not_in(list(TERMINAL)))
                .order_by(col(DraftJob.id))
            )
            return list(session.exec(query).all())

    def save(self, jobs: Iterable[DraftJob]) -> None:
        """Persist changed jobs in one transaction."""
        with self._session() as session:
            for job in jobs:
                session.merge(job)
            session.commit()

    def counts(self, model_version: str) -> dict[JobState, int]:
        return count_states(self.jobs(model_version))

    def watermark(self, source: str) -> dict[str, Any] | None:
        """The saved new-study watermark of ``source``, or None before the first run."""
        with self._session() as session:
            row = session.get(DiscoveryWatermark, source)
            return dict(row.value) if row is not None else None

    def save_watermark(self, source: str, value: dict[str, Any]) -> None:
        """Save it; call only after the studies it covers are registered (nothing is lost)."""
        with self._session() as session:
            session.merge(DiscoveryWatermark(source=source, value=value))
            session.commit()

    def signed_labels(
        self, study_uids: Iterable[str], labeler: str
    ) -> dict[str, SignedReportLabels]:
        """Cached labels of signed reports for these studies (by study UID), for ``labeler``."""
        uids = list(study_uids)
        found: dict[str, SignedReportLabels] = {}
        with self._session() as session:
            for start in range(0, len(uids), 500):
                query = select(SignedReportLabels).where(
                    SignedReportLabels.labeler == labeler,
                    col(SignedReportLabels.study_uid).in_(uids[start : start + 500]),
                )
                found.update((row.study_uid, row) for row in session.exec(query).all())
        return found

    def save_signed_labels(self, rows: Iterable[SignedReportLabels]) -> None:
        with self._session() as session:
            for row in rows:
                session.merge(row)
            session.commit()

    def fairness_run(self, key: str) -> FairnessRun | None:
        with self._session() as session:
            return session.get(FairnessRun, key)

    def save_fairness_run(self, run: FairnessRun) -> None:
        with self._session() as session:
            session.merge(run)
            session.commit()
