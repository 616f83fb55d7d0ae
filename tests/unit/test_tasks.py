"""FHIR Task handling as pure functions (pipeline/tasks.py): the published CodeSystems, what a
requested Task asks to draft, its state changes and how a draft job's end becomes its outcome."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task

from pipeline.ledger import JobState
from pipeline.tasks import (
    DRAFT_IMAGING_REPORT,
    TASK_CODE_SYSTEM,
    TASK_REASON_SYSTEM,
    TASK_STAGE_SYSTEM,
    InvalidTaskTransitionError,
    TaskReason,
    TaskRefusal,
    TaskTarget,
    accept,
    complete,
    fail,
    outcome_of_job,
    progress,
    reject,
    task_code_systems,
    task_target,
    wanted_references,
)

pytestmark = pytest.mark.unit

ACCESSION_SYSTEM = "urn:example:accession"
NOW = dt.datetime(2026, 12, 2, 7, 0, tzinfo=dt.UTC)


def _task(status: str = "requested", for_patient: str | None = None, **fields: Any) -> Task:
    if for_patient is not None:
        fields["for"] = {"reference": for_patient}
    return Task.model_validate(
        {
            "resourceType": "Task",
            "id": "t1",
            "meta": {"versionId": "1"},
            "status": status,
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": DRAFT_IMAGING_REPORT}]},
            **fields,
        }
    )


def _study(uid: str = "1.2.3.4", subject: str = "Patient/p1") -> ImagingStudy:
    return ImagingStudy.model_validate(
        {
            "resourceType": "ImagingStudy",
            "id": "is1",
            "status": "available",
            "subject": {"reference": subject},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        }
    )


def _order(accession: str = "ACC-1", subject: str = "Patient/p1") -> ServiceRequest:
    return ServiceRequest.model_validate(
        {
            "resourceType": "ServiceRequest",
            "id": "sr1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": subject},
            "identifier": [{"system": ACCESSION_SYSTEM, "value": accession}],
        }
    )


def test_the_code_systems_are_valid_resources_holding_every_code_used() -> None:
    systems = {cs.url: cs for cs in task_code_systems()}
    assert set(systems) >= {TASK_CODE_SYSTEM, TASK_REASON_SYSTEM, TASK_STAGE_SYSTEM}
    codes = {url: {c.code for c in cs.concept or []} for url, cs in systems.items()}
    assert DRAFT_IMAGING_REPORT in codes[TASK_CODE_SYSTEM]
    assert codes[TASK_REASON_SYSTEM] == {r.value for r in TaskReason}
    assert codes[TASK_STAGE_SYSTEM] == {s.value for s in JobState}
    for cs in systems.values():
        assert cs.status == "active" and cs.content == "complete"
        assert cs.count == len(cs.concept or [])


def test_a_focus_imaging_study_gives_its_study_uid() -> None:
    task = _task(focus={"reference": "ImagingStudy/is1"})
    assert wanted_references(task) == ("is1", None)
    target = task_target(task, _study(), None, accession_system=ACCESSION_SYSTEM)
    assert isinstance(target, TaskTarget)
    assert target.study_uid == "1.2.3.4" and target.imaging_study == "ImagingStudy/is1"


def test_a_based_on_order_gives_its_accession_number_kept_out_of_repr() -> None:
    task = _task(basedOn=[{"reference": "ServiceRequest/sr1"}])
    assert wanted_references(task) == (None, "sr1")
    target = task_target(task, None, _order("ACC-SECRET"), accession_system=ACCESSION_SYSTEM)
    assert isinstance(target, TaskTarget)
    assert target.accession_number == "ACC-SECRET" and target.study_uid is None
    assert "ACC-SECRET" not in repr(target)


def test_a_task_naming_nothing_to_draft_is_unreadable() -> None:
    refused = task_target(_task(), None, None, accession_system=ACCESSION_SYSTEM)
    assert isinstance(refused, TaskRefusal) and refused.reason is TaskReason.UNREADABLE_TASK
    other_code = _task(focus={"reference": "ImagingStudy/is1"})
    other_code = other_code.model_copy(update={"code": None})
    refused = task_target(other_code, _study(), None, accession_system=ACCESSION_SYSTEM)
    assert isinstance(refused, TaskRefusal) and refused.reason is TaskReason.UNREADABLE_TASK


def test_a_focus_the_ehr_does_not_hold_is_an_unknown_study() -> None:
    task = _task(focus={"reference": "ImagingStudy/gone"})
    refused = task_target(task, None, None, accession_system=ACCESSION_SYSTEM)
    assert isinstance(refused, TaskRefusal) and refused.reason is TaskReason.UNKNOWN_STUDY
    assert "ImagingStudy/gone" in refused.detail


def test_a_task_for_another_patient_is_a_patient_mismatch() -> None:
    task = _task(focus={"reference": "ImagingStudy/is1"}, for_patient="Patient/p2")
    refused = task_target(task, _study(), None, accession_system=ACCESSION_SYSTEM)
    assert isinstance(refused, TaskRefusal) and refused.reason is TaskReason.PATIENT_MISMATCH
    same = _task(focus={"reference": "ImagingStudy/is1"}, for_patient="Patient/p1")
    assert isinstance(task_target(same, _study(), None, accession_system=None), TaskTarget)


def test_the_happy_path_requested_accepted_in_progress_completed() -> None:
    task = _task(focus={"reference": "ImagingStudy/is1"})
    accepted = accept(task, "Device/d1", now=NOW)
    assert task.status == "requested"  # the input is not changed
    assert accepted.status == "accepted" and accepted.owner is not None
    assert accepted.owner.reference == "Device/d1"
    running = progress(accepted, JobState.FETCHED, now=NOW)
    assert running.status == "in-progress" and running.businessStatus is not None
    assert running.businessStatus.coding[0].code == "fetched"  # type: ignore[index]
    assert progress(running, JobState.DRAFTED).status == "in-progress"
    done = complete(running, ["DiagnosticReport/r1"], now=NOW)
    assert done.status == "completed"
    assert [o.valueReference.reference for o in done.output or []] == ["DiagnosticReport/r1"]  # type: ignore[union-attr]
    assert done.focus is not None and done.focus.reference == "ImagingStudy/is1"


def test_failed_and_rejected_carry_the_reason_code_and_its_detail() -> None:
    running = progress(accept(_task(), "Device/d1"), JobState.DISCOVERED)
    failed = fail(running, TaskReason.UNKNOWN_STUDY, "Task/t1: no study in the PACS")
    assert failed.status == "failed" and failed.statusReason is not None
    assert failed.statusReason.coding[0].system == TASK_REASON_SYSTEM  # type: ignore[index]
    assert failed.statusReason.coding[0].code == "unknown-study"  # type: ignore[index]
    assert failed.statusReason.text == "Task/t1: no study in the PACS"
    rejected = reject(accept(_task(), "Device/d1"), TaskReason.UNREADABLE_TASK, "no focus")
    assert rejected.status == "rejected"


@pytest.mark.parametrize("status", ["cancelled", "accepted", "completed", "entered-in-error"])
def test_only_a_requested_task_can_be_claimed(status: str) -> None:
    with pytest.raises(InvalidTaskTransitionError):
        accept(_task(status), "Device/d1")


def test_a_cancelled_or_requested_task_is_never_completed() -> None:
    for status in ("cancelled", "requested"):
        with pytest.raises(InvalidTaskTransitionError):
            complete(_task(status), ["DiagnosticReport/r1"])
    with pytest.raises(InvalidTaskTransitionError):
        complete(progress(accept(_task(), "Device/d1"), JobState.DISCOVERED), [])


@pytest.mark.parametrize(
    ("state", "reason", "error_type", "ids", "expected"),
    [
        (JobState.WRITTEN, None, None, {"DiagnosticReport": ["r1"]}, None),
        (
            JobState.SKIPPED,
            "signed-before-draft: DiagnosticReport/9 is final",
            None,
            {},
            "signed-before-draft",
        ),
        (JobState.SKIPPED, "patient-mismatch: PatientID differs", None, {}, "patient-mismatch"),
        (JobState.SKIPPED, "not-reportable: SEG ×1", None, {}, "not-reportable"),
        (JobState.DEAD_LETTERED, "study-x: no usable image", "ImagingError", {}, "undecodable"),
        (JobState.DEAD_LETTERED, "EHR: HTTP 500", "EhrUnavailableError", {}, "draft-failed"),
    ],
)
def test_a_draft_jobs_end_becomes_the_tasks_outcome(
    state: JobState,
    reason: str | None,
    error_type: str | None,
    ids: dict[str, list[str]],
    expected: str | None,
) -> None:
    outcome = outcome_of_job(state, reason, error_type, ids)
    if expected is None:
        assert outcome.outputs == ("DiagnosticReport/r1",) and outcome.reason is None
    else:
        assert outcome.reason is not None and outcome.reason.value == expected
        assert outcome.detail == reason


def test_a_job_still_under_way_leaves_the_task_pending() -> None:
    for state in (JobState.DISCOVERED, JobState.FETCHED, JobState.DRAFTED, JobState.WRITING):
        assert outcome_of_job(state, None, None, {}).pending
    # A failure the ledger will retry: the Task waits for the job's end.
    assert outcome_of_job(JobState.FAILED, "EHR: HTTP 500", "EhrUnavailableError", {}).pending
    assert outcome_of_job(JobState.WRITTEN, None, None, {"DocumentReference": ["n1"]}).outputs == (
        "DocumentReference/n1",
    )
