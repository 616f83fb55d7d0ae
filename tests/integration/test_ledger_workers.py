"""Several workers on one PostgreSQL ledger, each a real OS process: claims, leases, migrations.

The ledger is a real PostgreSQL 15 (the ``postgres`` fixture, a fresh database per test); the
workers run tests/integration/ledger_worker.py (the product's ``draft_pending``, a folder PACS
and EHR, the scripted drafter).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, make_url, text
from sqlmodel import SQLModel

from connectors.ledger_schema import alembic_config, head_revision, upgrade
from connectors.ledger_store import (
    _OPEN_STATES,
    LedgerStore,
    NewStudy,
    ledger_engine,
    open_engine,
)
from medvlm.errors import LedgerSchemaBehindError
from pipeline.imaging import study_reference
from pipeline.ledger import DraftJob, JobState
from tests.integration.conftest_servers import PostgresServer
from tests.unit.test_flow_states import VERSION, World
from tests.unit.test_ledger import select_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MEDVLM = str(Path(sys.executable).parent / "medvlm")


def _world(root: Path, studies: int, ledger_url: str) -> World:
    """``studies`` studies in a folder PACS and their orders in a folder EHR, registered in the
    PostgreSQL ledger."""
    world = World(root)
    for _ in range(studies):
        world.add()
    with _ledger(ledger_url) as store:
        new = [
            NewStudy(c.study_uid, study_reference(c.study_uid), c.accession) for c in world.cases
        ]
        assert store.register(new, VERSION) == studies
    return world


@contextmanager
def _ledger(url: str) -> Iterator[LedgerStore]:
    engine = open_engine(url)
    try:
        yield LedgerStore(engine)
    finally:
        engine.dispose()


def _upgrade(url: str) -> tuple[str | None, str]:
    engine = ledger_engine(url)
    try:
        return upgrade(engine)
    finally:
        engine.dispose()


def _run_workers(
    world: World, ledger_url: str, *, lease_s: float, kill_after: dict[str, int] | None = None
) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """Four workers until every job is done; returns their exit codes and the record."""
    record = world.root / "record.tsv"
    go = world.root / "go"
    workers: dict[str, subprocess.Popen[bytes]] = {}
    for n in range(4):
        name = f"worker-{n}"
        args = {
            "ledger_url": ledger_url,
            "root": str(world.root),
            "worker": name,
            "lease_s": lease_s,
            "record": str(record),
            "go": str(go),
            "kill_after": (kill_after or {}).get(name),
            "deadline_s": 240,
        }
        workers[name] = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.ledger_worker", json.dumps(args)],
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while len(list(world.root.glob("ready-*"))) < len(workers):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(w.poll() is None for w in workers.values()), "a worker ended early"
            time.sleep(0.1)
        go.touch()
        codes = {name: worker.wait(timeout=300) for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
    lines = record.read_text().splitlines()
    return codes, [(w, ref, event) for w, ref, event in (line.split("\t") for line in lines)]


def _drafts_per_order(world: World) -> dict[str, int]:
    per_order: dict[str, int] = defaultdict(int)
    for report in world.drafts():
        (order,) = report["basedOn"]
        per_order[order["reference"]] += 1
    return per_order


def test_four_worker_processes_draft_400_studies_each_once(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database()
    _upgrade(url)
    world = _world(tmp_path, 400, url)
    codes, record = _run_workers(world, url, lease_s=30)
    assert codes == dict.fromkeys(codes, 0)
    drafted = defaultdict(list)
    written = defaultdict(list)
    for worker, ref, event in record:
        if event == "draft":
            drafted[ref].append(worker)
        elif event == JobState.WRITTEN:
            written[ref].append(worker)
    refs = {case.ref for case in world.cases}
    assert set(drafted) == set(written) == refs
    assert all(len(workers) == 1 for workers in drafted.values())  # no study drafted twice
    assert all(written[ref] == drafted[ref] for ref in refs)  # written by who drafted it
    assert {w for (w,) in drafted.values()} == {f"worker-{n}" for n in range(4)}
    with _ledger(url) as store:
        assert store.counts(VERSION)[JobState.WRITTEN] == 400
        jobs = store.jobs(VERSION)
    assert all(job.claimed_by is None and job.lease_until is None for job in jobs)
    per_order = _drafts_per_order(world)
    assert len(per_order) == 400 and set(per_order.values()) == {1}


def test_the_studies_of_a_killed_worker_are_taken_over_after_its_leases_run_out(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database()
    _upgrade(url)
    world = _world(tmp_path, 80, url)
    codes, record = _run_workers(world, url, lease_s=3, kill_after={"worker-0": 3})
    assert codes.pop("worker-0") == -signal.SIGKILL
    assert codes == dict.fromkeys(codes, 0)
    drafted_by_killed = {ref for worker, ref, event in record if worker == "worker-0"}
    finished_by_killed = {
        ref for worker, ref, event in record if worker == "worker-0" and event != "draft"
    }
    in_flight = drafted_by_killed - finished_by_killed
    written = defaultdict(list)
    for worker, ref, event in record:
        if event == JobState.WRITTEN:
            written[ref].append(worker)
    assert all(len(workers) == 1 for workers in written.values())
    # What it held when it died was finished by the others once its leases ran out (a study
    # it had saved as written just before, without recording it, is not among these).
    taken_over = {ref for ref in in_flight if ref in written}
    assert taken_over and all(written[ref] != ["worker-0"] for ref in taken_over)
    with _ledger(url) as store:
        assert store.counts(VERSION)[JobState.WRITTEN] == 80  # nothing lost
    per_order = _drafts_per_order(world)
    assert len(per_order) == 80 and set(per_order.values()) == {1}


# -- one worker's transactions against each other --------------------------------------------


def _claimed(store: LedgerStore, n: int, worker: str) -> list[DraftJob]:
    store.register([NewStudy(f"1.7.{i}", f"study-{i}", None) for i in range(n)], VERSION)
    jobs = store.claim_page(VERSION, worker, limit=n, lease_s=60)
    assert len(jobs) == n
    return jobs


def test_a_renewal_and_saves_of_the_same_jobs_in_two_threads_wait_instead_of_deadlocking(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A run renews its leases in one thread while its saves commit in another (CI saw the
    renewal die of a deadlock: the save took the rows in its own order, the renewal in id
    order). Saves here go in descending id order, as a batch of finished studies may."""
    url = postgres.create_database()
    _upgrade(url)
    errors: list[BaseException] = []
    with _ledger(url) as store:
        jobs = _claimed(store, 300, "worker-a")
        backwards = sorted(jobs, key=lambda job: -(job.id or 0))

        def saves() -> None:
            try:
                for _ in range(25):
                    store.save(backwards)
            except BaseException as exc:
                errors.append(exc)

        def renewals() -> None:
            try:
                for _ in range(25):
                    assert store.renew(jobs, "worker-a", 60) == []
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=saves), threading.Thread(target=renewals)]
        with caplog.at_level(logging.WARNING, logger="connectors.ledger_store"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
        assert errors == []
        assert not [r for r in caplog.records if "aborted by the database" in r.getMessage()]
        assert {job.version for job in store.jobs(VERSION)} == {1 + 25}


def test_a_transaction_chosen_as_a_deadlock_victim_is_run_again(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A real deadlock with another client: it holds row 2 and then asks for row 1 while the
    renewal holds row 1 and waits for row 2. PostgreSQL aborts the renewal (its wait began
    first, so its deadlock check runs first); the renewal is tried again and succeeds."""
    import psycopg

    url = postgres.create_database()
    _upgrade(url)
    database = make_url(url).database
    connect = functools.partial(
        psycopg.connect, host=postgres.host, port=postgres.port, user="medvlm", dbname=database
    )
    with connect(autocommit=True) as admin:
        # The renewal checks for a deadlock 3 s into its wait (the other client, 30 s): by then
        # the other client waits too, however loaded the machine, so the renewal is the victim.
        admin.execute(f"ALTER DATABASE \"{database}\" SET deadlock_timeout = '3s'")
    with _ledger(url) as store, connect(autocommit=True) as watch, connect() as other:
        first, second = _claimed(store, 2, "worker-a")
        other.execute("SET deadlock_timeout = '30s'")
        other.execute("SELECT id FROM draft_job WHERE id = %s FOR UPDATE", [second.id])
        outcome: list[Any] = []
        renewal = threading.Thread(
            target=lambda: outcome.append(store.renew([first, second], "worker-a", 600))
        )
        with caplog.at_level(logging.WARNING, logger="connectors.ledger_store"):
            renewal.start()
            deadline = time.monotonic() + 60
            while not _lock_waits(watch):
                assert time.monotonic() < deadline, "the renewal never waited for row 2"
                time.sleep(0.05)
            other.execute("SELECT id FROM draft_job WHERE id = %s FOR UPDATE", [first.id])
            other.commit()
            renewal.join(timeout=60)
        assert outcome == [[]]
        assert [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()] == [
            "ledger renew: transaction aborted by the database (SQLSTATE 40P01), trying again"
        ]
        assert all(job.lease_until is not None for job in store.jobs(VERSION))


def _lock_waits(connection: Any) -> int:
    """How many backends wait for a lock now (``connection`` in autocommit: a transaction
    would see one snapshot of pg_stat_activity)."""
    row = connection.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchone()
    return int(row[0]) if row else 0


def test_a_claim_on_a_large_postgresql_ledger_reads_the_state_index(
    postgres: PostgresServer,
) -> None:
    """50,000 jobs, 1 in 100 still open: the claim's SELECT ... FOR UPDATE SKIP LOCKED finds
    the open ones through an index on their state, never by reading the table."""
    url = postgres.create_database()
    _upgrade(url)
    with _ledger(url) as store:
        store.register([NewStudy(f"1.8.{i}", f"study-{i}", None) for i in range(50_000)], VERSION)
        with store._engine.begin() as connection:
            connection.execute(text("UPDATE draft_job SET state = 'WRITTEN' WHERE id % 100 <> 0"))
        with store._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("ANALYZE draft_job"))
        claimed: list[DraftJob] = []

        def claim() -> None:
            claimed.extend(store.claim_page(VERSION, "worker-a", limit=50, lease_s=60))

        plan = select_plan(store, claim, containing="SKIP LOCKED")
    assert len(claimed) == 50 and all(job.id is not None and job.id % 100 == 0 for job in claimed)
    # One index range per open state (PostgreSQL picks the state index or the composite one,
    # by its statistics): the work follows the open jobs, not the 50,000 rows.
    ranges = [line for line in plan if "Index Cond: (state = " in line]
    assert len(ranges) == len(_OPEN_STATES), plan
    assert not any("Seq Scan" in line for line in plan), plan


# -- the schema ----------------------------------------------------------------------------------


def test_db_upgrade_run_twice_at_once_on_a_fresh_database(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database()
    env = {**os.environ, "MEDVLM_HOME": str(tmp_path), "MEDVLM_JOB__LEDGER_URL": url}
    runs = [
        subprocess.Popen(
            [MEDVLM, "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all(head_revision() in output for output in outputs)
    current = subprocess.run(
        [MEDVLM, "db", "current"], env=env, capture_output=True, text=True, timeout=300
    )
    assert current.returncode == 0 and "up to date" in current.stdout, current.stdout
    with _ledger(url) as store, store._engine.connect() as connection:  # at head: opens
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_opening_a_ledger_that_is_behind_says_to_run_db_upgrade(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    with pytest.raises(LedgerSchemaBehindError, match=r"no revision .*`medvlm db upgrade`"):
        open_engine(url)
    engine = ledger_engine(url)
    command.upgrade(alembic_config(engine), "0001")
    with pytest.raises(LedgerSchemaBehindError, match=r"revision 0001, .*`medvlm db upgrade`"):
        open_engine(url)
    assert "version" not in {c["name"] for c in inspect(engine).get_columns("draft_job")}
    engine.dispose()


def test_a_postgresql_ledger_from_before_migrations_is_adopted_with_its_rows(
    postgres: PostgresServer,
) -> None:
    url = postgres.create_database()
    engine = ledger_engine(url)
    command.upgrade(alembic_config(engine), "0001")  # the tables create_all made
    row: dict[str, Any] = {"uid": "1.2.3", "ref": "study-old", "at": "2026-01-01"}
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(
            text(
                "INSERT INTO draft_job (study_uid, study_ref, model_version, state, attempts, "
                "flags, timings, links, context_sources, subgroups, fhir_ids, created_at, "
                "updated_at) VALUES (:uid, :ref, 'v0', 'FAILED', 1, '[]', '{}', '{}', '[]', "
                "'{}', '{}', :at, :at)"
            ),
            row,
        )
    assert upgrade(engine) == (None, head_revision())
    engine.dispose()
    with _ledger(url) as store:
        (job,) = store.jobs("v0")
        (claimed,) = store.claim_page("v0", "worker-a", limit=5, lease_s=60)
    assert (job.study_ref, job.state, job.version, job.claimed_by) == (
        "study-old",
        JobState.FAILED,
        0,
        None,
    )
    assert claimed.id == job.id and claimed.version == 1


def test_the_ledger_password_comes_from_a_file_escaped_and_a_wrong_one_is_one_line(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """A database role that must give its password (SCRAM), a password with every character a
    URL reserves, from a file as a mounted Kubernetes Secret gives it (newline included): the
    ledger migrates and works; the URL was never pasted by hand. A wrong password fails the
    pre-flight in one line naming the ledger, never the password."""
    import psycopg
    from psycopg import sql

    from flows.preflight import check_ledger
    from medvlm.settings import JobSettings

    password = "p@ss:w/rd%2F#?&=+ ü"
    role, database = PostgresServer.password_role, f"pw_{os.getpid()}_{time.time_ns()}"
    with psycopg.connect(
        host=postgres.host, port=postgres.port, user="medvlm", dbname="postgres", autocommit=True
    ) as admin:
        admin.execute(
            sql.SQL(
                "DO $$ BEGIN CREATE ROLE {} LOGIN; EXCEPTION WHEN duplicate_object THEN "
                "NULL; END $$"
            ).format(sql.Identifier(role))
        )
        admin.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )
    url = f"postgresql+psycopg://{role}@{postgres.host}:{postgres.port}/{database}"
    secret = tmp_path / "ledger-password"
    secret.write_text(password + "\n", encoding="utf-8")

    job = JobSettings(ledger_url=url, ledger_password_file=secret)
    assert job.ledger_url is not None and make_url(job.ledger_url).password == password
    _upgrade(job.ledger_url)
    with _ledger(job.ledger_url) as store:
        uid = "1.2.826.0.1.3680043.8.498.99"
        store.register([NewStudy(uid, study_reference(uid), "ACC-PW")], VERSION)
        assert [j.study_uid for j in store.jobs(VERSION)] == [uid]
    assert check_ledger(job.ledger_url, 10).ok

    wrong = JobSettings(ledger_url=url, ledger_password="not-" + password)
    assert wrong.ledger_url is not None
    result = check_ledger(wrong.ledger_url, 10)
    assert not result.ok
    line = f"{result.where}: {result.detail}"
    assert result.detail == "credentials refused", line
    assert f"{postgres.host}:{postgres.port}/{database}" in result.where
    assert "p@ss" not in line and "p%40ss" not in line and "\n" not in line.strip()
