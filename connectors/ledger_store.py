"""The job ledger's database: SQLite (WAL) by default, PostgreSQL by URL.

The only place that opens ledger sessions. Rows and transitions are defined in
``pipeline.ledger``; this module registers studies idempotently, lists what a run still has to
do, and saves jobs. Inserts use ``ON CONFLICT DO NOTHING ... RETURNING`` so a re-run (or two
workers) never creates a second row for the same (study, model version); on PostgreSQL the
rowcount of such an insert is -1, hence ``RETURNING``.

What a run asks costs in proportion to its batch, not to the ledger: counts are one
``GROUP BY`` over the (model version, state, id) index, pending jobs come in keyset pages
(``id > last ORDER BY id LIMIT n``) read from that index, and a save is one ``UPDATE`` by
primary key per job, all jobs of a save in one transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    bindparam,
    event,
    func,
    inspect,
    literal,
    literal_column,
    text,
    union_all,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url
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
)

# Ids per ``IN (...)`` list (well under SQLite's limit on bound variables: 32,766, or 999
# before SQLite 3.32), and the default page size.
_CHUNK = 500
# What a run still has to do; an equality list (not NOT IN) so the index is searched per state.
_OPEN_STATES = tuple(s for s in JobState if s not in TERMINAL)
# A job's identity: set by ``register`` and never changed by a save.
_IDENTITY = frozenset({"id", "study_uid", "model_version", "created_at"})
# JSON columns a new job starts with empty (``draft`` starts NULL).
_LISTS = ("flags", "context_sources")
_DICTS = ("timings", "links", "subgroups", "fhir_ids")


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
    _add_new_indexes(engine)
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


def _add_new_indexes(engine: Engine) -> None:
    """Create the indexes introduced after a ledger was created (e.g. the one pending pages and
    counts read), as ``create_all`` does for a new table only."""
    table = DraftJob.__table__  # type: ignore[attr-defined]
    present = {ix["name"] for ix in inspect(engine).get_indexes(table.name)}
    missing = [ix for ix in table.indexes if ix.name not in present]
    if not missing:
        return
    with engine.begin() as connection:
        for index in missing:
            index.create(connection, checkfirst=True)


class LedgerStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _ledger_errors(self) -> Iterator[None]:
        """Database errors become ``LedgerUnavailableError``, which stops a run (no study is
        to blame when the ledger itself fails)."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise LedgerUnavailableError(
                f"job ledger ({self._engine.url.get_backend_name()}): {type(exc).__name__}"
            ) from exc

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """An ORM session (for reading models); see ``_ledger_errors``."""
        with self._ledger_errors(), Session(self._engine) as session:
            yield session

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction for Core statements, committed on success, rolled back on any
        exception; see ``_ledger_errors``. Cheaper than a session (a save is on a run's path)."""
        with self._ledger_errors(), self._engine.begin() as connection:
            yield connection

    def register(self, studies: Iterable[NewStudy], model_version: str) -> int:
        """Insert a row per new (study, model version); existing rows are left as they are.

        Returns how many rows were new.
        """
        rows = [
            {
                "study_uid": s.study_uid,
                "study_ref": s.study_ref,
                "accession_number": s.accession_number,
            }
            for s in studies
        ]
        if not rows:
            return 0
        insert = pg_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        table = DraftJob.__table__  # type: ignore[attr-defined]
        now = dt.datetime.now(dt.UTC)
        # What every new row shares is part of the statement, not of each row's parameters:
        # the empty JSON values and zero as SQL literals, the rest bound with the column's type.
        # (Per-row values cost the most with psycopg, which parses every placeholder.)
        empty: dict[str, Any] = {name: literal_column("'[]'") for name in _LISTS} | {
            name: literal_column("'{}'") for name in _DICTS
        }
        statement = (
            insert(table)
            .values(
                model_version=literal(model_version, table.c.model_version.type),
                state=literal(JobState.DISCOVERED, table.c.state.type),
                attempts=literal_column("0"),
                created_at=literal(now, table.c.created_at.type),
                updated_at=literal(now, table.c.updated_at.type),
                **empty,
            )
            .on_conflict_do_nothing(index_elements=["study_uid", "model_version"])
            .returning(table.c.id)
        )
        # One statement compiled once, run over the rows; SQLAlchemy sends them as multi-row
        # VALUES batches ("insertmanyvalues") sized to the driver's limit on bound variables.
        with self._transaction() as connection:
            return len(connection.execute(statement, rows).all())

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
        """Jobs a run still has to do: everything not written, skipped or dead-lettered.

        All of them at once; a run reads them with ``pending_pages`` instead.
        """
        return [job for page in self.pending_pages(model_version) for job in page]

    def pending_page(
        self, model_version: str, after_id: int | None = None, limit: int = _CHUNK
    ) -> list[DraftJob]:
        """Up to ``limit`` pending jobs with an id above ``after_id``, oldest first.

        Keyset pagination: pass the last id of a page to get the next one. A job saved in a
        terminal state (or any state) meanwhile is neither repeated nor does it shift the pages.
        """
        if limit < 1:
            raise ValueError(f"a page holds at least one job, not {limit}")
        # Per open state, the first ``limit`` ids above the cursor: a range of the (model
        # version, state, id) index each, however many rows are written, skipped or still to
        # come. The page is the first ``limit`` of their union; then the rows are read by id.
        # (One query over all open states would either sort every pending id or walk the model
        # version's rows in id order, finished ones included.)
        table = DraftJob.__table__  # type: ignore[attr-defined]
        first_ids = []
        for state in _OPEN_STATES:
            ids = sa_select(table.c.id).where(
                table.c.model_version == model_version, table.c.state == state
            )
            if after_id is not None:
                ids = ids.where(table.c.id > after_id)
            first = ids.order_by(table.c.id).limit(limit).subquery()
            first_ids.append(sa_select(first.c.id))
        candidates = union_all(*first_ids).subquery()
        page = sa_select(candidates.c.id).order_by(candidates.c.id).limit(limit)
        query = select(DraftJob).where(col(DraftJob.id).in_(page)).order_by(col(DraftJob.id))
        with self._session() as session:
            return list(session.exec(query).all())

    def pending_pages(
        self, model_version: str, *, page_size: int = _CHUNK, after_id: int | None = None
    ) -> Iterator[list[DraftJob]]:
        """Every pending job, in pages of up to ``page_size`` read one at a time (oldest first).

        Each page is one query issued when the iterator is advanced; no session stays open in
        between, so jobs may be saved while the pages are read.
        """
        while page := self.pending_page(model_version, after_id=after_id, limit=page_size):
            yield page
            after_id = page[-1].id

    def save(self, jobs: Iterable[DraftJob]) -> None:
        """Persist changed jobs in one transaction.

        A registered job (it has an id) is one ``UPDATE ... WHERE id = ?`` of every column but
        its identity (id, study, model version, creation time), all sent as one executemany; a
        job without an id is inserted whole (loading a ledger, e.g. in tests).
        """
        jobs = list(jobs)
        if not jobs:
            return
        table = DraftJob.__table__  # type: ignore[attr-defined]
        new = [
            {c.name: getattr(job, c.name) for c in table.columns if c.name != "id"}
            for job in jobs
            if job.id is None
        ]
        columns = [c.name for c in table.columns if c.name not in _IDENTITY]
        changed = [
            {"job_id": job.id} | {name: getattr(job, name) for name in columns}
            for job in jobs
            if job.id is not None
        ]
        # The SET clause comes from the keys of the rows.
        statement = update(table).where(table.c.id == bindparam("job_id"))
        with self._transaction() as connection:
            if new:
                connection.execute(table.insert(), new)
            if not changed:
                return
            result = connection.execute(statement, changed)
            if self._engine.dialect.supports_sane_multi_rowcount and result.rowcount != len(
                changed
            ):
                raise LookupError(  # rolls the transaction back
                    f"save(): {len(changed) - result.rowcount} of {len(changed)} jobs are not in "
                    "the ledger (deleted?); nothing was saved"
                )

    def counts(self, model_version: str) -> dict[JobState, int]:
        """How many jobs of the model version are in each state (every state, zeros included),
        by one ``GROUP BY`` read from the index."""
        result = dict.fromkeys(JobState, 0)
        with self._session() as session:
            query = (
                select(DraftJob.state, func.count())
                .where(DraftJob.model_version == model_version)
                .group_by(DraftJob.state)
            )
            for state, count in session.exec(query).all():
                result[JobState(state)] = count
        return result

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
