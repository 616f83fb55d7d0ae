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

Several workers share one ledger (PostgreSQL) by claims: ``claim_page`` takes free jobs for a
lease in one transaction (no two workers get the same job), ``renew`` extends the leases,
``release`` gives back what a run did not finish, and ``save`` writes a job only at the
version it read, so a worker that lost a job cannot overwrite its new holder's progress. The
schema is Alembic's (``connectors.ledger_schema``), checked or migrated by ``open_engine``.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    Select,
    bindparam,
    event,
    func,
    literal,
    literal_column,
    or_,
    union_all,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, create_engine, select
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from connectors.ledger_schema import current_revision, head_revision, require_head, upgrade
from medvlm.errors import LeaseLostError, LedgerUnavailableError
from pipeline.ledger import (
    TERMINAL,
    DiscoveryWatermark,
    DraftJob,
    EhrDevice,
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
# Set by claims (and a save's bump of the version), never from a job's in-memory values.
_CLAIM = frozenset({"claimed_by", "lease_until", "version"})
# Claims tried on PostgreSQL while every free candidate is locked by other claimers.
_CLAIM_TRIES = 20
# PostgreSQL's SQLSTATEs for a transaction aborted by another's (deadlock_detected,
# serialization_failure): nothing is wrong with the ledger, the transaction is tried again.
_CONFLICTS = frozenset({"40P01", "40001"})
_CONFLICT_TRIES = 5
# JSON columns a new job starts with empty (``draft`` starts NULL).
_LISTS = ("flags", "context_sources")
_DICTS = ("timings", "links", "subgroups", "fhir_ids")


log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a database error (``LedgerUnavailableError`` or SQLAlchemy's), if any."""
    if isinstance(exc, LedgerUnavailableError):
        exc = exc.__cause__ or exc
    state = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return state if isinstance(state, str) else None


def _worker_gone(worker: str, host: str) -> bool:
    """Whether ``host:pid:suffix`` names a process of this host that no longer exists."""
    _, _, rest = worker.partition(f"{host}:")
    pid, _, suffix = rest.partition(":")
    if not pid.isdigit() or not suffix:
        return False  # not a default worker id: its owner is not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _disk_full(exc: BaseException, state: str | None) -> bool:
    """PostgreSQL's disk_full (SQLSTATE 53100) or SQLite's SQLITE_FULL (13)."""
    if state == "53100":
        return True
    return getattr(getattr(exc, "orig", None), "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _retrying_conflicts(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``method`` (one transaction) again when PostgreSQL aborted it for a deadlock or a
    serialization failure; its changes were rolled back, so it is run whole. Up to
    ``_CONFLICT_TRIES`` times, with a short random backoff; then the error stands."""

    @functools.wraps(method)
    def tried(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        # Arguments are read again by each try: the methods take sequences, not iterators.
        for attempt in Retrying(
            retry=retry_if_exception(lambda exc: _sqlstate(exc) in _CONFLICTS),
            stop=stop_after_attempt(_CONFLICT_TRIES),
            wait=wait_random_exponential(multiplier=0.02, max=0.5),
            before_sleep=lambda state: log.warning(
                "ledger %s: transaction aborted by the database (SQLSTATE %s), trying again",
                method.__name__,
                _sqlstate(state.outcome.exception()) if state.outcome else None,
            ),
            reraise=True,
        ):
            with attempt:
                return method(*args, **kwargs)
        raise AssertionError("unreachable: tenacity reraises")

    return tried


@dataclass(frozen=True)
class NewStudy:
    """A discovered study to register."""

    study_uid: str
    study_ref: str
    accession_number: str | None


def open_engine(url: str) -> Engine:
    """Create the engine, with the ledger's schema at this release's revision.

    SQLite is migrated here (an embedded ledger has one user). A PostgreSQL ledger is shared by
    workers and migrated only by ``medvlm db upgrade``: one that is behind raises
    ``LedgerSchemaBehindError`` (``connectors.ledger_schema``).
    """
    engine = ledger_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            if current_revision(engine) != head_revision():
                upgrade(engine)
        else:
            require_head(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def ledger_engine(url: str) -> Engine:
    """The engine alone, schema neither checked nor migrated (``medvlm db``): SQLite gets its
    folder, WAL and a busy timeout."""
    is_sqlite = url.startswith("sqlite")
    database = make_url(url).database
    if is_sqlite and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": 30} if is_sqlite else {},
        pool_pre_ping=not is_sqlite,
        # A database error's message quotes the statement's parameters (accession numbers, a
        # job's links): it is chained to LedgerUnavailableError, and Prefect logs the chain of
        # a failed task or flow.
        hide_parameters=True,
    )
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def _first_open_ids(
    model_version: str, limit: int, *, after_id: int | None = None, where: Any = None
) -> Select[tuple[int]]:
    """The ids of the first ``limit`` open jobs (above ``after_id``; matching ``where``).

    Per open state, the first ``limit`` ids above the cursor: a range of the (model version,
    state, id) index each, however many rows are written, skipped or still to come. The page is
    the first ``limit`` of their union. (One query over all open states would either sort every
    pending id or walk the model version's rows in id order, finished ones included.) A
    ``where`` on other columns is checked on the rows the ranges reach, in id order, until
    ``limit`` match: claimed rows are passed over, finished ones never read.
    """
    table = DraftJob.__table__  # type: ignore[attr-defined]
    first_ids = []
    for state in _OPEN_STATES:
        ids = sa_select(table.c.id).where(
            table.c.model_version == model_version, table.c.state == state
        )
        if after_id is not None:
            ids = ids.where(table.c.id > after_id)
        if where is not None:
            ids = ids.where(where)
        first = ids.order_by(table.c.id).limit(limit).subquery()
        first_ids.append(sa_select(first.c.id))
    candidates = union_all(*first_ids).subquery()
    return sa_select(candidates.c.id).order_by(candidates.c.id).limit(limit)


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
            state = _sqlstate(exc)
            backend = self._engine.url.get_backend_name()
            if _disk_full(exc, state):
                raise LedgerUnavailableError(
                    f"job ledger ({backend}): its disk is full ({type(exc).__name__}); the "
                    "change was rolled back: free space, then run again (studies resume where "
                    "they were)"
                ) from exc
            raise LedgerUnavailableError(
                f"job ledger ({backend}): {type(exc).__name__}"
                + (f" (SQLSTATE {state})" if state else "")
            ) from exc

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """An ORM session (for reading models); see ``_ledger_errors``."""
        with self._ledger_errors(), Session(self._engine) as session:
            yield session

    @contextmanager
    def _transaction(self, *, immediate: bool = False) -> Iterator[Connection]:
        """One transaction for Core statements, committed on success, rolled back on any
        exception; see ``_ledger_errors``. Cheaper than a session (a save is on a run's path).

        ``immediate``: on SQLite, take the database's write lock first (``BEGIN IMMEDIATE``),
        for a transaction that reads before it writes: a deferred one would fail, not wait,
        when another connection wrote in between (WAL's busy snapshot).
        """
        with self._ledger_errors(), self._engine.begin() as connection:
            if immediate and self._is_sqlite:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection

    @property
    def _is_sqlite(self) -> bool:
        return self._engine.dialect.name == "sqlite"

    def _lock(self, connection: Connection, ids: Iterable[int]) -> None:
        """On PostgreSQL, lock the rows ``ids`` in ascending id order before a transaction
        changes several of them. Every such transaction (save, renew, release) takes its rows
        in the same order, so two of them (one worker's renewal and its own save, in two
        threads) wait for each other instead of deadlocking. SQLite has one writer at a time."""
        if self._is_sqlite:
            return
        table = DraftJob.__table__  # type: ignore[attr-defined]
        ordered = sorted(set(ids))
        for start in range(0, len(ordered), _CHUNK):
            chunk = ordered[start : start + _CHUNK]
            query = sa_select(table.c.id).where(table.c.id.in_(chunk)).order_by(table.c.id)
            connection.execute(query.with_for_update()).all()

    def _clock(self, connection: Connection) -> dt.datetime:
        """Now, for leases: PostgreSQL's clock (the transaction's start), so that workers on
        hosts whose clocks differ agree on when a lease runs out; SQLite is on this host."""
        if self._is_sqlite:
            return dt.datetime.now(dt.UTC)
        now: dt.datetime = connection.execute(sa_select(func.now())).scalar_one()
        return now

    @_retrying_conflicts
    def register(self, studies: Sequence[NewStudy], model_version: str) -> int:
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
        page = _first_open_ids(model_version, limit, after_id=after_id)
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

    @_retrying_conflicts
    def claim_page(
        self, model_version: str, worker: str, *, limit: int = _CHUNK, lease_s: float
    ) -> list[DraftJob]:
        """Take up to ``limit`` open jobs no other worker holds, oldest first, for ``lease_s``.

        A job is free when unclaimed or when its lease has run out (its worker died or stalled).
        The taken rows get ``claimed_by = worker``, ``lease_until = now + lease_s`` and a new
        ``version`` (a save by the previous holder then fails: ``save``), in one transaction
        with the read: PostgreSQL locks the rows it takes (``FOR UPDATE SKIP LOCKED``: workers
        claiming at the same moment take different jobs, none waits), SQLite holds its write
        lock (``BEGIN IMMEDIATE``). The read is the index ranges of ``pending_page``. Empty:
        nothing is free now (jobs held by live workers are theirs).
        """
        if limit < 1:
            raise ValueError(f"a page holds at least one job, not {limit}")
        table = DraftJob.__table__  # type: ignore[attr-defined]
        for attempt in range(_CLAIM_TRIES):
            with self._transaction(immediate=True) as connection:
                now = self._clock(connection)
                free = or_(table.c.claimed_by.is_(None), table.c.lease_until < now)
                candidates = _first_open_ids(model_version, limit, where=free).subquery()
                query = (
                    sa_select(table.c.id)
                    .where(table.c.id.in_(sa_select(candidates.c.id)), free)
                    .order_by(table.c.id)
                    .limit(limit)
                )
                if not self._is_sqlite:
                    query = query.with_for_update(skip_locked=True)
                ids = list(connection.execute(query).scalars())
                if ids:
                    connection.execute(
                        update(table)
                        .where(table.c.id.in_(ids))
                        .values(
                            claimed_by=worker,
                            lease_until=now + dt.timedelta(seconds=lease_s),
                            version=table.c.version + 1,
                        )
                    )
                    with Session(bind=connection) as session:
                        read = select(DraftJob).where(col(DraftJob.id).in_(ids))
                        return list(session.exec(read.order_by(col(DraftJob.id))).all())
                if self._is_sqlite:
                    return []
                # PostgreSQL found none it could lock: nothing is free, or every free candidate
                # is being claimed by another worker at this moment (its transaction holds the
                # rows). Only the first ends the claiming; the second is over in milliseconds.
                left = connection.execute(sa_select(func.count()).select_from(candidates))
                if left.scalar_one() == 0:
                    return []
            time.sleep(min(0.01 * 2**attempt, 0.5))
        return []

    @_retrying_conflicts
    def renew(self, jobs: Sequence[DraftJob], worker: str, lease_s: float) -> list[DraftJob]:
        """Extend the leases ``worker`` still holds on ``jobs`` to now + ``lease_s``.

        Returns the jobs it no longer holds (taken by another worker after the lease ran out,
        released, or finished): not renewed. Renewing changes no ``version``, so saves of the
        same jobs in flight meanwhile stay valid.
        """
        jobs = [job for job in jobs if job.id is not None]
        table = DraftJob.__table__  # type: ignore[attr-defined]
        held: set[int] = set()
        with self._transaction() as connection:
            self._lock(connection, (job.id for job in jobs if job.id is not None))
            until = self._clock(connection) + dt.timedelta(seconds=lease_s)
            for start in range(0, len(jobs), _CHUNK):
                ids = [job.id for job in jobs[start : start + _CHUNK]]
                statement = (
                    update(table)
                    .where(table.c.id.in_(ids), table.c.claimed_by == worker)
                    .values(lease_until=until)
                    .returning(table.c.id)
                )
                held.update(connection.execute(statement).scalars())
        lost = []
        for job in jobs:
            if job.id in held:
                job.lease_until = until
            else:
                lost.append(job)
        return lost

    @_retrying_conflicts
    def release(self, jobs: Sequence[DraftJob], worker: str) -> int:
        """Free the claims ``worker`` holds on ``jobs`` (a run ending with jobs not finished:
        failed ones, to be retried by the next run, or ones it never started). Jobs another
        worker holds now are left alone. Returns how many were released."""
        jobs = list(jobs)
        ids = [job.id for job in jobs if job.id is not None]
        table = DraftJob.__table__  # type: ignore[attr-defined]
        released = 0
        with self._transaction() as connection:
            self._lock(connection, ids)
            for start in range(0, len(ids), _CHUNK):
                statement = (
                    update(table)
                    .where(table.c.id.in_(ids[start : start + _CHUNK]))
                    .where(table.c.claimed_by == worker)
                    .values(claimed_by=None, lease_until=None)
                )
                released += connection.execute(statement).rowcount
        for job in jobs:
            if job.claimed_by == worker:
                job.claimed_by = job.lease_until = None
        return released

    @_retrying_conflicts
    def claim_jobs(self, ids: Sequence[int], worker: str, *, lease_s: float) -> list[DraftJob]:
        """Take these jobs (by id) for ``worker`` for ``lease_s``, each only if it is open (not
        written, skipped or dead-lettered) and free (unclaimed, its lease run out, or already
        ``worker``'s), as ``claim_page`` does for the oldest open jobs: for a caller that knows
        which studies it wants (a FHIR Task names one: flows.tasks). Returns the jobs taken,
        in id order; the others are another live worker's or finished."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        table = DraftJob.__table__  # type: ignore[attr-defined]
        with self._transaction(immediate=True) as connection:
            self._lock(connection, ids)
            now = self._clock(connection)
            free = or_(
                table.c.claimed_by.is_(None),
                table.c.lease_until < now,
                table.c.claimed_by == worker,
            )
            taken = list(
                connection.execute(
                    update(table)
                    .where(table.c.id.in_(ids), free)
                    .where(table.c.state.in_(_OPEN_STATES))
                    .values(
                        claimed_by=worker,
                        lease_until=now + dt.timedelta(seconds=lease_s),
                        version=table.c.version + 1,
                    )
                    .returning(table.c.id)
                ).scalars()
            )
            if not taken:
                return []
            with Session(bind=connection) as session:
                read = select(DraftJob).where(col(DraftJob.id).in_(taken))
                return list(session.exec(read.order_by(col(DraftJob.id))).all())

    @_retrying_conflicts
    def release_claims_of_dead_workers(self, host: str) -> list[str]:
        """Free the jobs held by workers of this ``host`` whose process is gone (a run killed
        on this machine: its leases would keep its studies from the next run for
        ``job.lease_s``). Only worker ids of the default form ``host:pid:suffix`` are judged;
        a pid that is alive (perhaps reused by another process) keeps its claims until they
        run out. Returns the workers whose claims were freed."""
        table = DraftJob.__table__  # type: ignore[attr-defined]
        with self._transaction() as connection:
            holders = connection.execute(
                sa_select(table.c.claimed_by)
                .where(table.c.claimed_by.like(f"{host}:%"))
                .where(table.c.lease_until > self._clock(connection))
                .distinct()
            ).scalars()
            dead = [worker for worker in holders if _worker_gone(worker, host)]
            if dead:
                connection.execute(
                    update(table)
                    .where(table.c.claimed_by.in_(dead))
                    .values(claimed_by=None, lease_until=None)
                )
        return dead

    @_retrying_conflicts
    def save(self, jobs: Sequence[DraftJob]) -> None:
        """Persist changed jobs in one transaction, each only if nobody changed it meanwhile.

        A registered job (it has an id) is an ``UPDATE ... WHERE id = ? AND version = ?`` of
        every column but its identity (id, study, model version, creation time) and its claim,
        bumping ``version`` (in the row and on the job). A job in a terminal state also gives
        up its claim. A job without an id is inserted whole (loading a ledger, e.g. in tests).

        A job whose row has moved to another version was claimed by another worker after this
        one's lease ran out: it is not written (the new holder's progress stands), the batch's
        other jobs are, and ``LeaseLostError`` names the lost ones once the rest is committed.
        A job whose row is gone (deleted) saves nothing at all: ``LookupError``.
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
        registered = [job for job in jobs if job.id is not None]
        columns = [c.name for c in table.columns if c.name not in _IDENTITY | _CLAIM]
        statement = update(table).where(
            table.c.id == bindparam("job_id"), table.c.version == bindparam("expected")
        )
        rows = []
        for job in registered:
            row = {"job_id": job.id, "expected": job.version, "version": job.version + 1}
            row |= {name: getattr(job, name) for name in columns}
            if job.state in TERMINAL:
                row |= {"claimed_by": None, "lease_until": None}
            rows.append(row)
        with self._transaction() as connection:
            self._lock(connection, (job.id for job in registered if job.id is not None))
            if new:
                connection.execute(table.insert(), new)
            saved = self._conditional_updates(connection, statement, rows)
            missed = [job for job in registered if job.id not in saved]
            if missed:
                there = set(
                    connection.execute(
                        sa_select(table.c.id).where(table.c.id.in_([j.id for j in missed]))
                    ).scalars()
                )
                gone = len(missed) - len(there)
                if gone:
                    raise LookupError(  # rolls the transaction back
                        f"save(): {gone} of {len(registered)} jobs are not in the ledger "
                        "(deleted?); nothing was saved"
                    )
        for job in registered:
            if job.id in saved:
                job.version += 1
                if job.state in TERMINAL:
                    job.claimed_by = job.lease_until = None
        if missed:
            refs = tuple(job.study_ref for job in missed)
            raise LeaseLostError(
                f"{len(missed)} of {len(registered)} jobs were taken by another worker "
                f"(lease ran out) and not saved: {', '.join(refs[:20])}",
                refs,
                tuple(job.id for job in missed if job.id is not None),
            )

    def _conditional_updates(
        self, connection: Connection, statement: Any, rows: list[dict[str, Any]]
    ) -> set[int]:
        """Run the save's conditional UPDATE over ``rows``; returns the ids it changed.

        SQLite (in process) runs one statement per row, its rowcount telling whether it
        applied. PostgreSQL first tries one executemany per group of rows with the same keys
        (the SET clause comes from the keys; terminal rows also clear the claim), one round
        trip, inside a savepoint: when every row applied, the usual case, that is all;
        otherwise (a lost lease, a deleted row) the savepoint is rolled back and the rows go
        one by one.
        """
        if not rows:
            return set()
        if not self._is_sqlite:
            groups: dict[frozenset[str], list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(frozenset(row), []).append(row)
            savepoint = connection.begin_nested()
            if all(
                connection.execute(statement, group).rowcount == len(group)
                for group in groups.values()
            ):
                savepoint.commit()
                return {row["job_id"] for row in rows}
            savepoint.rollback()
        return {row["job_id"] for row in rows if connection.execute(statement, row).rowcount == 1}

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

    def ehr_device(self, ehr: str, device_key: str) -> str | None:
        """``Device/{id}`` of the model in ``ehr`` as saved by an earlier write, or None."""
        with self._session() as session:
            row = session.get(EhrDevice, (ehr, device_key))
            return row.reference if row is not None else None

    def save_ehr_device(self, ehr: str, device_key: str, reference: str) -> None:
        """Remember the model's Device in ``ehr`` (the first writer's answer is kept)."""
        with self._session() as session:
            if session.get(EhrDevice, (ehr, device_key)) is None:
                session.add(EhrDevice(ehr=ehr, device_key=device_key, reference=reference))
                try:
                    session.commit()
                except IntegrityError:  # another worker saved it first: theirs stands
                    session.rollback()

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

    # -- pre-flight ---------------------------------------------------------------------------

    def ping(self, timeout_s: float = 10.0) -> None:
        """``SELECT 1`` on a connection of its own, opened within ``timeout_s`` (SQLite's busy
        timeout; libpq's ``connect_timeout`` on PostgreSQL): that the database answers
        (flows/preflight.py). Raises ``LedgerUnavailableError`` chained to the driver's error."""
        from sqlalchemy import text
        from sqlalchemy.pool import NullPool

        url = self._engine.url
        connect_args: dict[str, Any] = {}
        if self._is_sqlite:
            connect_args["timeout"] = timeout_s
        elif url.get_backend_name() == "postgresql":
            connect_args["connect_timeout"] = max(1, round(timeout_s))
        engine = create_engine(url, connect_args=connect_args, poolclass=NullPool)
        try:
            with self._ledger_errors(), engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
