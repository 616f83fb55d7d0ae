from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, create_engine, select

from connectors.ledger_store import _OPEN_STATES, LedgerStore, NewStudy, open_engine
from pipeline.ledger import (
    TERMINAL,
    DraftJob,
    InvalidTransitionError,
    JobState,
    advance,
    count_states,
    fail,
    resume_stage,
    skip,
)

pytestmark = pytest.mark.unit


def _job() -> DraftJob:
    return DraftJob(study_uid="1.2.3", study_ref="study-abc", model_version="v1")


def test_happy_path_ends_written_and_needs_nothing_more() -> None:
    job = _job()
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN):
        advance(job, state)
    assert job.state is JobState.WRITTEN
    assert resume_stage(job) is None


def test_stages_cannot_be_skipped_or_left_after_written() -> None:
    job = _job()
    with pytest.raises(InvalidTransitionError, match="study-abc"):
        advance(job, JobState.WRITTEN)
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN):
        advance(job, state)
    with pytest.raises(InvalidTransitionError):
        advance(job, JobState.DISCOVERED)


def test_failure_resumes_at_the_failed_stage_then_dead_letters_at_the_limit() -> None:
    job = _job()
    advance(job, JobState.FETCHED)
    fail(job, "model output cut at max_tokens", max_attempts=2)
    assert job.state is JobState.FAILED and job.attempts == 1
    assert resume_stage(job) is JobState.FETCHED
    advance(job, JobState.FETCHED)
    fail(job, "again", max_attempts=2)
    assert job.state is JobState.DEAD_LETTERED
    assert job.reason == "again" and job.failed_stage is JobState.FETCHED
    assert resume_stage(job) is None


def test_one_row_per_study_and_model_version(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(_job())
        session.add(DraftJob(study_uid="1.2.3", study_ref="study-abc", model_version="v2"))
        session.commit()
        session.add(_job())
        with pytest.raises(IntegrityError):
            session.commit()
    with Session(engine) as session:
        rows = session.exec(select(DraftJob)).all()
        assert sorted(r.model_version for r in rows) == ["v1", "v2"]


def test_json_columns_round_trip(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    SQLModel.metadata.create_all(engine)
    job = _job()
    job.flags = ["missing-ehr-context"]
    job.timings = {"fetch": 0.5}
    job.fhir_ids = {"DiagnosticReport": ["dr-1"]}
    with Session(engine) as session:
        session.add(job)
        session.commit()
    with Session(engine) as session:
        again = session.exec(select(DraftJob)).one()
        assert again.flags == ["missing-ehr-context"]
        assert again.timings == {"fetch": 0.5}
        assert again.fhir_ids == {"DiagnosticReport": ["dr-1"]}
        assert again.state is JobState.DISCOVERED


def test_registering_twice_keeps_one_row_and_progress(tmp_path: Path) -> None:
    from connectors.ledger_store import LedgerStore, NewStudy, open_engine

    store = LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    studies = [NewStudy(f"1.2.{i}", f"study-{i}", f"ACC-{i}") for i in range(3)]
    assert store.register(studies, "v1") == 3
    (job, *_) = store.pending("v1")
    advance(job, JobState.FETCHED)
    store.save([job])
    assert store.register(studies, "v1") == 0
    assert store.register(studies[:1], "v2") == 1
    assert store.counts("v1")[JobState.FETCHED] == 1
    assert len(store.jobs("v1")) == 3


def test_pending_excludes_written_and_dead_lettered(tmp_path: Path) -> None:
    from connectors.ledger_store import LedgerStore, NewStudy, open_engine

    store = LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    store.register([NewStudy(f"1.3.{i}", f"study-{i}", None) for i in range(3)], "v1")
    done, dead, open_job = store.jobs("v1")
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN):
        advance(done, state)
    fail(dead, "undecodable pixels", max_attempts=1)
    store.save([done, dead])
    assert [j.study_uid for j in store.pending("v1")] == [open_job.study_uid]


def test_a_ledger_from_before_subgroups_gains_the_column(tmp_path: Path) -> None:
    from sqlalchemy import inspect, text

    from connectors.ledger_store import LedgerStore, NewStudy, open_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    SQLModel.metadata.create_all(old)
    with old.begin() as connection:  # the table as an earlier release created it
        connection.execute(text("ALTER TABLE draft_job DROP COLUMN subgroups"))
        connection.execute(
            text(
                "INSERT INTO draft_job (id, study_uid, study_ref, model_version, state, attempts, "
                "flags, timings, links, fhir_ids, created_at, updated_at) VALUES (1, '1.2.9', "
                "'study-old', 'v0', 'WRITTEN', 0, '[]', '{}', '{}', '{}', '2026-01-01', "
                "'2026-01-01')"
            )
        )
    old.dispose()
    engine = open_engine(url)
    assert "subgroups" in {c["name"] for c in inspect(engine).get_columns("draft_job")}
    store = LedgerStore(engine)
    (legacy,) = store.jobs("v0")
    assert legacy.state is JobState.WRITTEN and not legacy.subgroups
    store.register([NewStudy("1.2.10", "study-new", None)], "v1")
    (fresh,) = store.jobs("v1")
    fresh.subgroups = {"sex": "female"}
    store.save([fresh])
    assert store.jobs("v1")[0].subgroups == {"sex": "female"}
    open_engine(url)  # idempotent: nothing left to add


def _store(tmp_path: Path, name: str = "ledger.db") -> LedgerStore:
    return LedgerStore(open_engine(f"sqlite:///{tmp_path / name}"))


def _studies(prefix: str, n: int) -> list[NewStudy]:
    return [NewStudy(f"{prefix}.{i}", f"study-{prefix}-{i}", None) for i in range(n)]


def _mixed_states(store: LedgerStore, version: str) -> list[DraftJob]:
    """The version's jobs, cycled through every state (saved)."""
    jobs = store.jobs(version)
    for i, job in enumerate(jobs):
        match i % 8:
            case 7:
                for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITING):
                    advance(job, state)
            case 1:
                advance(job, JobState.FETCHED)
            case 2:
                advance(advance(job, JobState.FETCHED), JobState.DRAFTED)
            case 3:
                for state in (
                    JobState.FETCHED,
                    JobState.DRAFTED,
                    JobState.WRITING,
                    JobState.WRITTEN,
                ):
                    advance(job, state)
            case 4:
                skip(job, "signed-before-draft")
            case 5:
                fail(job, "timeout", max_attempts=3)
            case 6:
                fail(job, "undecodable pixels", max_attempts=1)
    store.save(jobs)
    return jobs


def test_counts_are_one_aggregate_equal_to_counting_the_rows(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.register(_studies("1.4", 40), "v1")
    store.register(_studies("1.4", 9), "v2")
    _mixed_states(store, "v1")
    statements: list[str] = []
    event.listen(store._engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    counts = store.counts("v1")
    (statement,) = statements
    assert "GROUP BY" in statement  # no row is loaded
    assert counts == count_states(store.jobs("v1"))
    assert set(counts) == set(JobState) and all(counts.values())
    assert store.counts("v2") == {**dict.fromkeys(JobState, 0), JobState.DISCOVERED: 9}
    assert store.counts("never-run") == dict.fromkeys(JobState, 0)


def test_pending_pages_are_the_open_jobs_in_id_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.register(_studies("1.5", 60), "v1")
    store.register(_studies("1.5", 5), "v2")
    jobs = _mixed_states(store, "v1")
    open_ids = [j.id for j in jobs if j.state not in TERMINAL]
    assert [j.id for j in store.pending("v1")] == open_ids
    pages = list(store.pending_pages("v1", page_size=4))
    assert [len(p) for p in pages[:-1]] == [4] * (len(pages) - 1) and 1 <= len(pages[-1]) <= 4
    assert [j.id for page in pages for j in page] == open_ids
    assert [j.id for j in store.pending_page("v1", after_id=open_ids[2], limit=3)] == open_ids[3:6]
    assert store.pending_page("v1", after_id=open_ids[-1]) == []
    with pytest.raises(ValueError, match="at least one"):
        store.pending_page("v1", limit=0)


def test_pending_pages_skip_nothing_while_jobs_are_finished_between_pages(
    tmp_path: Path,
) -> None:
    """What a run does: finish (or fail) each page before reading the next. An OFFSET page
    would shift by the finished rows and miss as many; the keyset page must not."""
    store = _store(tmp_path)
    store.register(_studies("1.6", 50), "v1")
    jobs = store.jobs("v1")
    ahead = {jobs[30].id, jobs[31].id, jobs[44].id}  # finished by another worker meanwhile
    seen: list[int | None] = []
    for n, page in enumerate(store.pending_pages("v1", page_size=6)):
        seen.extend(j.id for j in page)
        for i, job in enumerate(page):
            if i % 3 == 0:
                fail(job, "timeout", max_attempts=3)  # open, but behind the cursor
            else:
                for state in (
                    JobState.FETCHED,
                    JobState.DRAFTED,
                    JobState.WRITING,
                    JobState.WRITTEN,
                ):
                    advance(job, state)
        store.save(page)
        if n == 1:
            others = [j for j in store.jobs("v1") if j.id in ahead]
            for job in others:
                skip(job, "patient-mismatch")
            store.save(others)
    assert seen == [j.id for j in jobs if j.id not in ahead]
    assert len(set(seen)) == len(seen)
    # The failed ones are read again by the next run.
    assert [j.id for j in store.pending("v1")] == [j for k, j in enumerate(seen) if k % 6 % 3 == 0]


def select_plan(store: LedgerStore, call: Callable[[], object], containing: str = "") -> list[str]:
    """The plan of the first SELECT that ``call`` sends (one whose text has ``containing``):
    SQLite's EXPLAIN QUERY PLAN steps, or PostgreSQL's EXPLAIN lines."""
    captured: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(store._engine, "before_cursor_execute", capture)
    try:
        call()
    finally:
        event.remove(store._engine, "before_cursor_execute", capture)
    statement, parameters = next(
        (s, p) for s, p in captured if s.lstrip().startswith("SELECT") and containing in s
    )
    sqlite = store._engine.dialect.name == "sqlite"
    explain = "EXPLAIN QUERY PLAN" if sqlite else "EXPLAIN"
    with store._engine.connect() as connection:
        rows = connection.exec_driver_sql(f"{explain} {statement}", parameters)
        return [row[3] if sqlite else row[0] for row in rows]


def test_the_pending_page_query_reads_the_state_index(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.register(_studies("1.7", 30), "v1")
    _mixed_states(store, "v1")
    plan = select_plan(store, lambda: store.pending_page("v1", after_id=3, limit=5))
    ranges = [step for step in plan if "ix_draft_job_version_state_id" in step]
    assert len(ranges) == len(_OPEN_STATES), plan  # one index range per open state
    assert all("state=? AND id>?" in step for step in ranges), plan
    assert not [step for step in plan if step.startswith("SCAN draft_job")], plan


def test_save_writes_every_column_back(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.register([NewStudy("1.8.1", "study-181", "ACC-181")], "v1")
    (job,) = store.pending("v1")
    advance(
        job,
        JobState.FETCHED,
        flags=["missing-ehr-context", "prior-unavailable"],
        links={"patient": "Patient/p1", "order": None, "imaging": ["ImagingStudy/i1"]},
        context_sources=["Condition/c1"],
        subgroups={"sex": "female", "age_band": "60-69"},
    )
    advance(
        job,
        JobState.DRAFTED,
        draft={"findings": "No acute disease.", "impression": ["normal"], "score": 0.5},
        output_sha256="a" * 64,
        draft_id="draft-1",
        timings={"fetch_s": 0.25, "draft_s": 1.5},
    )
    fail(job, "EHR returned 503", max_attempts=5, error_type="HTTPStatusError")
    job.fhir_ids = {"DiagnosticReport": ["dr-1"], "Provenance": ["pv-1"]}
    job.updated_at = dt.datetime(2026, 11, 3, 4, 5, 6, 789, tzinfo=dt.UTC)
    store.save([job])
    (again,) = store.jobs("v1")
    assert again.state is JobState.FAILED and again.failed_stage is JobState.DRAFTED
    assert (again.attempts, again.reason, again.error_type) == (
        1,
        "EHR returned 503",
        "HTTPStatusError",
    )
    assert again.flags == ["missing-ehr-context", "prior-unavailable"]
    assert again.links == {"patient": "Patient/p1", "order": None, "imaging": ["ImagingStudy/i1"]}
    assert again.context_sources == ["Condition/c1"]
    assert again.subgroups == {"sex": "female", "age_band": "60-69"}
    assert again.draft == {"findings": "No acute disease.", "impression": ["normal"], "score": 0.5}
    assert (again.output_sha256, again.draft_id) == ("a" * 64, "draft-1")
    assert again.timings == {"fetch_s": 0.25, "draft_s": 1.5}
    assert again.fhir_ids == {"DiagnosticReport": ["dr-1"], "Provenance": ["pv-1"]}
    assert again.updated_at.replace(tzinfo=dt.UTC) == job.updated_at
    assert (again.study_uid, again.study_ref, again.accession_number) == (
        "1.8.1",
        "study-181",
        "ACC-181",
    )
    assert again.created_at == job.created_at  # identity columns are not rewritten
    # Back to NULL/empty as well.
    advance(again, JobState.DRAFTED, draft=None, flags=[], error_type=None)
    store.save([again])
    (last,) = store.jobs("v1")
    assert last.draft is None and last.flags == [] and last.failed_stage is None
    assert last.state is JobState.DRAFTED and last.attempts == 1


def test_save_is_all_or_nothing_and_inserts_a_job_without_id(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.register(_studies("1.9", 3), "v1")
    first, second, third = store.jobs("v1")
    loaded = DraftJob(
        study_uid="9.9",
        study_ref="study-99",
        model_version="v1",
        state=JobState.WRITTEN,
        subgroups={"sex": "male"},
        created_at=dt.datetime(2025, 1, 2, tzinfo=dt.UTC),
    )
    advance(first, JobState.FETCHED)
    store.save([first, loaded])
    (again,) = store.jobs("v1", ["9.9"])
    assert again.id is not None and again.subgroups == {"sex": "male"}
    assert again.created_at.replace(tzinfo=dt.UTC) == loaded.created_at
    assert store.counts("v1")[JobState.FETCHED] == 1
    with store._engine.begin() as connection:  # deleted behind the store's back
        connection.execute(text("DELETE FROM draft_job WHERE id = :id"), {"id": third.id})
    advance(first, JobState.DRAFTED)
    for job in (second, third):
        advance(job, JobState.FETCHED)
    with pytest.raises(LookupError, match="1 of 3"):
        store.save([first, second, third])
    assert store.counts("v1")[JobState.DISCOVERED] == 1  # nothing was saved
    assert store.jobs("v1", [first.study_uid])[0].state is JobState.FETCHED
    store.save([])


def test_register_counts_only_new_rows_across_statement_batches(tmp_path: Path) -> None:
    store = _store(tmp_path)
    studies = _studies("1.11", 2500)
    assert store.register(studies[::2], "v1") == 1250
    assert store.register(studies, "v1") == 1250
    assert store.register(studies + studies[:10], "v1") == 0
    assert len({j.study_uid for j in store.jobs("v1")}) == 2500


def test_a_ledger_from_before_the_state_index_gains_it(tmp_path: Path) -> None:
    from sqlalchemy import inspect

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    SQLModel.metadata.create_all(old)
    with old.begin() as connection:  # the table as an earlier release created it
        connection.execute(text("DROP INDEX ix_draft_job_version_state_id"))
    assert "ix_draft_job_version_state_id" not in {
        ix["name"] for ix in inspect(old).get_indexes("draft_job")
    }
    old.dispose()
    engine = open_engine(url)
    (index,) = [
        ix
        for ix in inspect(engine).get_indexes("draft_job")
        if ix["name"] == "ix_draft_job_version_state_id"
    ]
    assert index["column_names"] == ["model_version", "state", "id"]
    open_engine(url)  # idempotent: nothing left to add
