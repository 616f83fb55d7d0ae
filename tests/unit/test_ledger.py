from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, create_engine, select

from pipeline.ledger import (
    DraftJob,
    InvalidTransitionError,
    JobState,
    advance,
    fail,
    resume_stage,
)

pytestmark = pytest.mark.unit


def _job() -> DraftJob:
    return DraftJob(study_uid="1.2.3", study_ref="study-abc", model_version="v1")


def test_happy_path_ends_written_and_needs_nothing_more() -> None:
    job = _job()
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITTEN):
        advance(job, state)
    assert job.state is JobState.WRITTEN
    assert resume_stage(job) is None


def test_stages_cannot_be_skipped_or_left_after_written() -> None:
    job = _job()
    with pytest.raises(InvalidTransitionError, match="study-abc"):
        advance(job, JobState.WRITTEN)
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITTEN):
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
    for state in (JobState.FETCHED, JobState.DRAFTED, JobState.WRITTEN):
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
