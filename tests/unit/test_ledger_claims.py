"""Several workers on one ledger: claims with leases, conditional saves, and the schema's
migrations (SQLite here; the same on PostgreSQL with real processes in
tests/integration/test_ledger_workers.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from connectors.ledger_schema import current_revision, head_revision
from connectors.ledger_store import _OPEN_STATES, LedgerStore, NewStudy, open_engine
from connectors.pacs import StudyQuery
from flows.draft_reports import discover, draft_pending
from medvlm.errors import LeaseLostError, LedgerSchemaBehindError
from medvlm.settings import JobSettings
from pipeline.ledger import DraftJob, JobState, advance, fail, skip
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import STUDY_DATE, VERSION, World
from tests.unit.test_ledger import select_plan

pytestmark = pytest.mark.unit

LEASE_S = 60.0


def _store(tmp_path: Path) -> LedgerStore:
    return LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))


def _register(store: LedgerStore, n: int, version: str = "v1") -> list[DraftJob]:
    store.register([NewStudy(f"1.9.{i}", f"study-{i}", None) for i in range(n)], version)
    return store.jobs(version)


def _expire(store: LedgerStore, jobs: list[DraftJob]) -> None:
    """The leases run out (as if their worker had stopped renewing a while ago)."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with store._engine.begin() as connection:
        for job in jobs:
            connection.execute(
                text("UPDATE draft_job SET lease_until = :past WHERE id = :id"),
                {"past": past, "id": job.id},
            )


def _row(store: LedgerStore, job: DraftJob) -> DraftJob:
    (row,) = store.jobs(job.model_version, [job.study_uid])
    return row


# -- claims --------------------------------------------------------------------------------------


def test_workers_claim_different_jobs_oldest_first_and_stamped(tmp_path: Path) -> None:
    store = _store(tmp_path)
    jobs = _register(store, 7)
    before = dt.datetime.now(dt.UTC)
    first = store.claim_page("v1", "worker-a", limit=3, lease_s=LEASE_S)
    second = store.claim_page("v1", "worker-b", limit=3, lease_s=LEASE_S)
    third = store.claim_page("v1", "worker-c", limit=3, lease_s=LEASE_S)
    assert [j.id for j in first + second + third] == [j.id for j in jobs]
    assert [len(first), len(second), len(third)] == [3, 3, 1]
    assert store.claim_page("v1", "worker-d", limit=3, lease_s=LEASE_S) == []
    for job in first:
        assert job.claimed_by == "worker-a" and job.version == 1
        assert job.lease_until is not None
        assert before + dt.timedelta(seconds=LEASE_S - 1) < job.lease_until
        assert _row(store, job).claimed_by == "worker-a"
    with pytest.raises(ValueError, match="at least one"):
        store.claim_page("v1", "worker-a", limit=0, lease_s=LEASE_S)


def test_claims_take_open_jobs_only_and_pass_over_held_ones(tmp_path: Path) -> None:
    store = _store(tmp_path)
    jobs = _register(store, 6)
    written, skipped, dead, failed = jobs[:4]
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN):
        advance(written, state)
    skip(skipped, "signed-before-draft")
    fail(dead, "undecodable", max_attempts=1)
    fail(failed, "timeout", max_attempts=3)
    store.save([written, skipped, dead, failed])
    held = store.claim_page("v1", "worker-a", limit=1, lease_s=LEASE_S)
    assert [j.id for j in held] == [failed.id]  # failed is open: retried
    assert [j.id for j in store.claim_page("v1", "worker-b", limit=9, lease_s=LEASE_S)] == [
        jobs[4].id,
        jobs[5].id,
    ]
    assert store.claim_page("v1", "worker-c", limit=9, lease_s=LEASE_S) == []
    assert store.claim_page("v2", "worker-a", limit=9, lease_s=LEASE_S) == []


def test_an_expired_lease_is_claimed_again_and_its_old_holder_can_no_longer_save_it(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    _register(store, 3)
    a_jobs = store.claim_page("v1", "worker-a", limit=3, lease_s=LEASE_S)
    assert store.claim_page("v1", "worker-b", limit=3, lease_s=LEASE_S) == []
    stale = a_jobs[1]
    _expire(store, [stale])
    (taken,) = store.claim_page("v1", "worker-b", limit=3, lease_s=LEASE_S)
    assert taken.id == stale.id and taken.claimed_by == "worker-b" and taken.version == 2
    advance(taken, JobState.FETCHED, flags=["from-b"])
    store.save([taken])

    # Worker A still thinks it holds all three: its save writes the two it holds, not the lost
    # one, and says which one was lost (by reference, nothing else).
    for job in a_jobs:
        advance(job, JobState.FETCHED, flags=["from-a"])
    with pytest.raises(LeaseLostError, match=r"1 of 3 .*study-1$") as lost:
        store.save(a_jobs)
    assert lost.value.study_refs == ("study-1",) and lost.value.job_ids == (stale.id,)
    assert _row(store, stale).flags == ["from-b"] and _row(store, stale).claimed_by == "worker-b"
    for job in (a_jobs[0], a_jobs[2]):
        row = _row(store, job)
        assert row.flags == ["from-a"] and row.version == 2 == job.version
    assert stale.version == 1  # not saved: not bumped
    # Renewal tells A the same.
    assert [j.id for j in store.renew(a_jobs, "worker-a", LEASE_S)] == [stale.id]


def test_renewal_extends_the_leases_held_and_changes_no_version(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _register(store, 2)
    jobs = store.claim_page("v1", "worker-a", limit=2, lease_s=5)
    first_until = jobs[0].lease_until
    assert first_until is not None
    assert store.renew(jobs, "worker-a", LEASE_S) == []
    for job in jobs:
        row = _row(store, job)
        assert row.version == job.version == 1
        assert job.lease_until is not None and job.lease_until > first_until
        assert row.lease_until is not None
        assert row.lease_until == job.lease_until
    # A renewal keeps a save that was read before it valid.
    advance(jobs[0], JobState.FETCHED)
    store.save([jobs[0]])
    assert store.renew(jobs, "worker-b", LEASE_S) == jobs  # B holds none of them


def test_a_terminal_save_gives_the_claim_up_and_release_frees_only_ones_own(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    _register(store, 4)
    done, failed, untouched = store.claim_page("v1", "worker-a", limit=3, lease_s=LEASE_S)
    (other,) = store.claim_page("v1", "worker-b", limit=1, lease_s=LEASE_S)
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN):
        advance(done, state)
    fail(failed, "timeout", max_attempts=3)
    store.save([done, failed])
    row = _row(store, done)
    assert (row.claimed_by, row.lease_until, done.claimed_by) == (None, None, None)
    assert _row(store, failed).claimed_by == "worker-a"  # held until the run ends
    assert store.release([done, failed, untouched, other], "worker-a") == 2
    assert _row(store, failed).claimed_by is None and _row(store, untouched).claimed_by is None
    assert _row(store, other).claimed_by == "worker-b"
    again = store.claim_page("v1", "worker-c", limit=9, lease_s=LEASE_S)
    assert [j.id for j in again] == [failed.id, untouched.id]


def test_a_deleted_row_still_saves_nothing_at_all(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first, second = _register(store, 2)
    with store._engine.begin() as connection:
        connection.execute(text("DELETE FROM draft_job WHERE id = :id"), {"id": second.id})
    advance(first, JobState.FETCHED)
    advance(second, JobState.FETCHED)
    with pytest.raises(LookupError, match="1 of 2"):
        store.save([first, second])
    assert _row(store, first).state is JobState.DISCOVERED and first.version == 0


def test_the_claim_reads_index_ranges_however_many_rows_are_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _register(store, 30)
    with store._engine.begin() as connection:
        connection.execute(text("UPDATE draft_job SET state = 'WRITTEN' WHERE id <= 25"))
    plan = select_plan(store, lambda: store.claim_page("v1", "worker-a", limit=3, lease_s=LEASE_S))
    ranges = [step for step in plan if "ix_draft_job_version_state_id" in step]
    assert len(ranges) == len(_OPEN_STATES), plan  # one index range per open state
    assert not [step for step in plan if step.startswith("SCAN draft_job")], plan


# -- the flow ------------------------------------------------------------------------------------


def test_two_runs_at_once_draft_every_study_once(tmp_path: Path) -> None:
    world = World(tmp_path)
    for _ in range(12):
        world.add()
    discover(
        world.services(ScriptedDrafter()), StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE)
    )
    drafters = {name: ScriptedDrafter() for name in ("worker-a", "worker-b")}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            # Three studies in flight at most: neither can take every study before the other
            # starts.
            limits = {"page_size": 3, "concurrency": 1, "fetch_concurrency": 1}
            draft_pending(
                world.services(drafters[name], worker_id=name, write_concurrency=1, **limits)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in drafters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    calls = [ref for drafter in drafters.values() for ref in drafter.calls]
    assert len(calls) == len(set(calls)) == 12
    assert all(drafter.calls for drafter in drafters.values())  # both took a share
    assert all(world.job(case).state is JobState.WRITTEN for case in world.cases)
    assert all(world.job(case).claimed_by is None for case in world.cases)
    assert len(world.drafts()) == 12


def test_a_study_taken_by_another_worker_is_dropped_not_failed_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    taken, other = world.add(), world.add()

    class AnotherWorkerTakesIt(ScriptedDrafter):
        async def draft(self, model_input: Any) -> Any:
            if model_input.reference == taken.ref:
                # Its lease ran out (a stalled worker) and another worker claimed it.
                _expire(world.ledger, [world.job(taken)])
                (job,) = world.ledger.claim_page(VERSION, "worker-b", limit=1, lease_s=LEASE_S)
                assert job.study_uid == taken.study_uid
            return await super().draft(model_input)

    summary = world.run(AnotherWorkerTakesIt(), page_size=2, concurrency=2, worker_id="worker-a")
    assert summary.tally is not None and summary.tally.lost == [taken.ref]
    assert summary.failures == [] and summary.attempted == 1
    row = world.job(taken)
    assert row.state is JobState.FETCHED and row.attempts == 0  # worker B's to finish
    assert row.claimed_by == "worker-b" and row.draft is None
    assert world.job(other).state is JobState.WRITTEN


def test_a_run_renews_its_leases_while_a_study_takes_longer_than_one(tmp_path: Path) -> None:
    world = World(tmp_path)
    case = world.add()
    seen: list[list[DraftJob]] = []

    class Slow(ScriptedDrafter):
        async def draft(self, model_input: Any) -> Any:
            await asyncio.sleep(2.5)  # 2.5 leases of 1 s
            seen.append(world.ledger.claim_page(VERSION, "worker-b", limit=5, lease_s=LEASE_S))
            return await super().draft(model_input)

    summary = world.run(Slow(), lease_s=1, worker_id="worker-a")
    assert seen == [[]]  # still held by worker A
    assert summary.counts["written"] == 1 and summary.tally is not None
    assert summary.tally.lost == []
    assert world.job(case).claimed_by is None


def test_a_run_releases_the_claims_of_studies_it_did_not_finish(tmp_path: Path) -> None:
    world = World(tmp_path)
    bad, good = world.add(), world.add()
    world.run(ScriptedDrafter({bad.ref: "invalid-json"}), worker_id="worker-a")
    job = world.job(bad)
    assert job.state is JobState.FAILED and (job.claimed_by, job.lease_until) == (None, None)
    assert world.job(good).state is JobState.WRITTEN


def test_worker_ids_differ_between_settings_loads() -> None:
    first, second = JobSettings(), JobSettings()
    assert first.worker_id != second.worker_id
    assert first.worker_id.count(":") == 2


# -- the schema ----------------------------------------------------------------------------------

# The ledger as releases before migrations created it (SQLModel.metadata.create_all).
OLD_DDL = """
CREATE TABLE draft_job (
    id INTEGER NOT NULL, study_uid VARCHAR(64) NOT NULL, study_ref VARCHAR(32) NOT NULL,
    accession_number VARCHAR(64), model_version VARCHAR(200) NOT NULL,
    state VARCHAR(13) NOT NULL, failed_stage VARCHAR(13), attempts INTEGER NOT NULL,
    reason VARCHAR, error_type VARCHAR(100), flags JSON, timings JSON, links JSON,
    context_sources JSON, draft JSON, output_sha256 VARCHAR(64), draft_id VARCHAR(64),
    subgroups JSON, fhir_ids JSON, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    PRIMARY KEY (id), CONSTRAINT uq_study_model UNIQUE (study_uid, model_version));
CREATE INDEX ix_draft_job_accession_number ON draft_job (accession_number);
CREATE INDEX ix_draft_job_state ON draft_job (state);
CREATE INDEX ix_draft_job_model_version ON draft_job (model_version);
CREATE INDEX ix_draft_job_version_state_id ON draft_job (model_version, state, id);
CREATE INDEX ix_draft_job_study_uid ON draft_job (study_uid);
CREATE TABLE discovery_watermark (source VARCHAR(200) NOT NULL, value JSON,
    updated_at DATETIME NOT NULL, PRIMARY KEY (source));
CREATE TABLE signed_report_labels (study_uid VARCHAR(64) NOT NULL, labeler VARCHAR(64) NOT NULL,
    report_ref VARCHAR(200) NOT NULL, status VARCHAR(20) NOT NULL, labels JSON,
    fetched_at DATETIME NOT NULL, PRIMARY KEY (study_uid, labeler));
CREATE TABLE fairness_run ("key" VARCHAR(64) NOT NULL, since DATETIME NOT NULL,
    until DATETIME NOT NULL, scope VARCHAR(200) NOT NULL, measure_report_id VARCHAR(64) NOT NULL,
    alerts JSON, created_at DATETIME NOT NULL, PRIMARY KEY ("key"));
INSERT INTO draft_job (id, study_uid, study_ref, model_version, state, attempts, flags, timings,
    links, context_sources, subgroups, fhir_ids, created_at, updated_at)
VALUES (1, '1.2.1', 'study-old-1', 'v0', 'WRITTEN', 0, '[]', '{}', '{}', '[]', '{}', '{}',
        '2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000'),
       (2, '1.2.2', 'study-old-2', 'v0', 'FAILED', 1, '["x"]', '{}', '{}', '[]', '{}', '{}',
        '2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000');
INSERT INTO discovery_watermark VALUES ('folder:/pacs', '{"date": "2026-01-01"}',
    '2026-01-01 00:00:00.000000');
"""


def test_a_ledger_from_before_migrations_is_upgraded_in_place_keeping_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(OLD_DDL)
    engine = open_engine(f"sqlite:///{path}")
    assert current_revision(engine) == head_revision()
    columns = {c["name"] for c in inspect(engine).get_columns("draft_job")}
    assert {"claimed_by", "lease_until", "version"} <= columns
    store = LedgerStore(engine)
    written, failed = store.jobs("v0")
    assert (written.state, failed.state, failed.flags) == (
        JobState.WRITTEN,
        JobState.FAILED,
        ["x"],
    )
    assert failed.version == 0 and failed.claimed_by is None
    assert store.watermark("folder:/pacs") == {"date": "2026-01-01"}
    (claimed,) = store.claim_page("v0", "worker-a", limit=5, lease_s=LEASE_S)
    assert claimed.id == failed.id
    open_engine(f"sqlite:///{path}")  # at head: nothing to do


def test_the_migrations_build_the_schema_the_models_declare(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_db_current_and_upgrade_on_an_embedded_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from medvlm.cli import app

    monkeypatch.setenv("MEDVLM_JOB__LEDGER_URL", f"sqlite:///{tmp_path / 'new' / 'ledger.db'}")
    runner = CliRunner()
    before = runner.invoke(app, ["db", "current"])
    assert before.exit_code == 0 and "revision none" in before.output, before.output
    assert "medvlm db upgrade" in before.output
    upgraded = runner.invoke(app, ["db", "upgrade"])
    assert upgraded.exit_code == 0
    assert f"from revision none to {head_revision()}" in upgraded.output
    again = runner.invoke(app, ["db", "upgrade"])
    assert again.exit_code == 0 and "already at revision" in again.output
    assert "up to date" in runner.invoke(app, ["db", "current"]).output


def test_a_lost_lease_error_crosses_process_boundaries_naming_references_only() -> None:
    error = LeaseLostError("1 of 2 jobs were taken by another worker: study-1", ("study-1",), (7,))
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.study_refs, copy.job_ids) == (str(error), ("study-1",), (7,))


def test_a_ledger_migrated_by_a_newer_release_is_refused_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    open_engine(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(LedgerSchemaBehindError, match="9999, which this release does not know"):
        open_engine(f"sqlite:///{path}")


def test_the_claims_of_a_killed_run_on_this_host_are_taken_back_and_no_others(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    store = _store(tmp_path)
    _register(store, 8)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = f"ward-host:{gone.stdout.strip()}:a1b2c3"  # a process that has exited
    alive = f"ward-host:{os.getpid()}:d4e5f6"
    other_host = f"other-host:{gone.stdout.strip()}:a1b2c3"
    custom = "ward-host:nightly-worker"  # not the default form: not judged
    for worker in (dead, alive, other_host, custom):
        assert len(store.claim_page("v1", worker, limit=2, lease_s=LEASE_S)) == 2
    assert store.release_claims_of_dead_workers("ward-host") == [dead]
    holders = {job.claimed_by for job in store.jobs("v1")}
    assert holders == {None, alive, other_host, custom}
    # The freed studies are anyone's again, at once.
    assert len(store.claim_page("v1", "ward-host:1:new", limit=8, lease_s=LEASE_S)) == 2
    assert store.release_claims_of_dead_workers("ward-host") == []
