"""On-demand drafting through FHIR R4 Task: the project's codes, what a Task asks for, and its
state changes as pure functions. No I/O (the connector reads and updates Tasks; the flow
``flows.tasks`` drives them).

A client asks for a draft by creating a Task (``status=requested``, ``intent=order``) whose
``code`` is ``draft-imaging-report`` of ``TASK_CODE_SYSTEM`` and whose ``focus`` is the
ImagingStudy (its identifier carries the Study Instance UID) or whose ``basedOn`` is the order
(its identifier carries the accession number). A worker then moves it (FHIR R4 task.html state
machine):

    requested ──claim (If-Match)──→ accepted ──→ in-progress (businessStatus: the ledger stage)
                                       │              ├──→ completed (output → the draft)
                                       │              └──→ failed (statusReason)
                                       └──→ rejected (statusReason: the Task cannot be acted on)

Each change is a function returning an updated copy; the input Task is never modified. A
change the state machine does not allow raises ``InvalidTaskTransitionError`` (a cancelled
Task is never accepted). Reasons and details never carry patient data: they are the ledger's
PHI-free reasons or logical ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task

from pipeline.ledger import JobState

#: The project's canonical URLs are URNs (``urn:medvlm-pipeline:…``, as the draft and finding
#: identifier systems in pipeline.fhir_resources and pipeline.finding_codes).
TASK_CODE_SYSTEM = "urn:medvlm-pipeline:task"
DRAFT_IMAGING_REPORT = "draft-imaging-report"
TASK_REASON_SYSTEM = "urn:medvlm-pipeline:task-status-reason"
TASK_STAGE_SYSTEM = "urn:medvlm-pipeline:task-business-status"
TASK_OUTPUT_SYSTEM = "urn:medvlm-pipeline:task-output"
DRAFT_OUTPUT = "draft"
DICOM_UID_SYSTEM = "urn:dicom:uid"

#: Statuses a worker may claim a Task from (``received``: a server or router took it in).
CLAIMABLE = frozenset({"requested", "received"})
_ACTIVE = frozenset({"accepted", "in-progress"})
_DONE = frozenset({"completed", "failed", "rejected", "cancelled", "entered-in-error"})

__all__ = [
    "CLAIMABLE",
    "DRAFT_IMAGING_REPORT",
    "TASK_CODE_SYSTEM",
    "TASK_REASON_SYSTEM",
    "TASK_STAGE_SYSTEM",
    "InvalidTaskTransitionError",
    "TaskOutcome",
    "TaskReason",
    "TaskRefusal",
    "TaskTarget",
    "accept",
    "complete",
    "fail",
    "outcome_of_job",
    "progress",
    "reject",
    "task_code_systems",
    "task_target",
    "wanted_references",
]


class TaskReason(StrEnum):
    """``Task.statusReason`` codes of ``TASK_REASON_SYSTEM``."""

    SIGNED_BEFORE_DRAFT = "signed-before-draft"
    PATIENT_MISMATCH = "patient-mismatch"
    UNDECODABLE = "undecodable"
    UNKNOWN_STUDY = "unknown-study"
    NOT_REPORTABLE = "not-reportable"
    MODIFIER_EXTENSION = "modifier-extension"
    BURNED_IN_ANNOTATION = "burned-in-annotation"
    DRAFT_FAILED = "draft-failed"
    UNREADABLE_TASK = "unreadable-task"


_REASON_TEXT: dict[TaskReason, str] = {
    TaskReason.SIGNED_BEFORE_DRAFT: "The order already has a signed report; no draft is made.",
    TaskReason.PATIENT_MISMATCH: "The images do not belong to the order's or the Task's patient.",
    TaskReason.UNDECODABLE: "None of the study's chosen images could be decoded.",
    TaskReason.UNKNOWN_STUDY: "The PACS holds no study matching the Task's focus or order.",
    TaskReason.NOT_REPORTABLE: "The study holds no image the model may be shown.",
    TaskReason.MODIFIER_EXTENSION: "A resource the draft rests on carries a modifierExtension.",
    TaskReason.BURNED_IN_ANNOTATION: "The images carry burned-in annotation (skipped by policy).",
    TaskReason.DRAFT_FAILED: "The draft could not be made or written; see the detail.",
    TaskReason.UNREADABLE_TASK: "The Task names neither an ImagingStudy nor an order to draft.",
}

_STAGE_TEXT: dict[JobState, str] = {
    JobState.DISCOVERED: "Study found; fetching images and clinical context.",
    JobState.FETCHED: "Images and context fetched; drafting.",
    JobState.DRAFTED: "Drafted; writing the preliminary report.",
    JobState.WRITING: "Writing the preliminary report.",
    JobState.WRITTEN: "Preliminary report written.",
    JobState.SKIPPED: "Not drafted (a safety rule).",
    JobState.FAILED: "Failed; retried.",
    JobState.DEAD_LETTERED: "Failed for good.",
}


class InvalidTaskTransitionError(ValueError):
    """A Task state change the machine does not allow (e.g. accepting a cancelled Task)."""


def _code_system(url: str, name: str, title: str, concepts: Mapping[str, str]) -> CodeSystem:
    return CodeSystem.model_validate(
        {
            "resourceType": "CodeSystem",
            "url": url,
            "name": name,
            "title": title,
            "status": "active",
            "experimental": False,
            "publisher": "medvlm-pipeline",
            "caseSensitive": True,
            "content": "complete",
            "count": len(concepts),
            "concept": [
                {"code": code, "display": code.replace("-", " "), "definition": text}
                for code, text in concepts.items()
            ],
        }
    )


def task_code_systems() -> tuple[CodeSystem, ...]:
    """The CodeSystems a Task exchanged with this pipeline uses, as published resources: its
    ``code``, its ``statusReason`` codes, its ``businessStatus`` codes and its output type."""
    return (
        _code_system(
            TASK_CODE_SYSTEM,
            "MedvlmTaskCode",
            "medvlm-pipeline Task codes",
            {
                DRAFT_IMAGING_REPORT: "Draft a preliminary radiology report for an imaging "
                "study (its focus ImagingStudy, or the study of its basedOn order)."
            },
        ),
        _code_system(
            TASK_REASON_SYSTEM,
            "MedvlmTaskStatusReason",
            "medvlm-pipeline Task status reasons",
            {reason.value: text for reason, text in _REASON_TEXT.items()},
        ),
        _code_system(
            TASK_STAGE_SYSTEM,
            "MedvlmTaskBusinessStatus",
            "medvlm-pipeline Task business status (the draft job's stage)",
            {state.value: text for state, text in _STAGE_TEXT.items()},
        ),
        _code_system(
            TASK_OUTPUT_SYSTEM,
            "MedvlmTaskOutput",
            "medvlm-pipeline Task output types",
            {DRAFT_OUTPUT: "The preliminary DiagnosticReport or DocumentReference drafted."},
        ),
    )


def is_draft_task(task: Task) -> bool:
    """Whether the Task's ``code`` is ``draft-imaging-report`` of ``TASK_CODE_SYSTEM``."""
    codings = task.code.coding or [] if task.code is not None else []
    return any(c.system == TASK_CODE_SYSTEM and c.code == DRAFT_IMAGING_REPORT for c in codings)


def _local_id(reference: str | None, rtype: str) -> str | None:
    """``id`` of a relative ``rtype/id`` reference (a trailing ``/_history/n`` ignored)."""
    if not reference:
        return None
    parts = reference.split("/")
    if len(parts) >= 2 and parts[0] == rtype and parts[1]:
        return parts[1]
    return None


@dataclass(frozen=True)
class TaskRefusal:
    """The Task cannot be acted on: why (a ``TaskReason``) and a PHI-free detail."""

    reason: TaskReason
    detail: str


@dataclass(frozen=True)
class TaskTarget:
    """What a Task asks to draft: the study by its UID, or by the order's accession number.
    ``repr`` leaves the accession number out (it identifies a patient's order)."""

    study_uid: str | None
    accession_number: str | None
    imaging_study: str | None = None  # ImagingStudy/{id} the Task's focus names
    service_request: str | None = None  # ServiceRequest/{id} of its basedOn

    def __repr__(self) -> str:
        return (
            f"TaskTarget(study_uid={self.study_uid!r}, imaging_study={self.imaging_study!r}, "
            f"service_request={self.service_request!r})"
        )


def wanted_references(task: Task) -> tuple[str | None, str | None]:
    """The logical ids the caller must read to find the Task's study: (ImagingStudy id of its
    ``focus``, ServiceRequest id of its first ``basedOn``)."""
    focus = _local_id(task.focus.reference if task.focus else None, "ImagingStudy")
    order = next(
        (
            sid
            for ref in task.basedOn or []
            if (sid := _local_id(ref.reference, "ServiceRequest")) is not None
        ),
        None,
    )
    return focus, order


def _study_uid(study: ImagingStudy) -> str | None:
    for identifier in study.identifier or []:
        value = identifier.value or ""
        if identifier.system == DICOM_UID_SYSTEM or value.startswith("urn:oid:"):
            uid = value.removeprefix("urn:oid:")
            if uid:
                return uid
    return None


def _accession(order: ServiceRequest, accession_system: str | None) -> str | None:
    for identifier in order.identifier or []:
        if not identifier.value:
            continue
        if accession_system is not None and identifier.system == accession_system:
            return identifier.value
        codings = identifier.type.coding or [] if identifier.type is not None else []
        if accession_system is None and any(c.code == "ACSN" for c in codings):
            return identifier.value
    return None


def _subject(resource: ImagingStudy | ServiceRequest | None) -> str | None:
    if resource is None or resource.subject is None:
        return None
    return resource.subject.reference


def task_target(
    task: Task,
    imaging_study: ImagingStudy | None,
    order: ServiceRequest | None,
    *,
    accession_system: str | None,
) -> TaskTarget | TaskRefusal:
    """The study a Task asks to draft, from the resources its ``focus`` and ``basedOn`` name
    (read by the caller: ``wanted_references``; None when absent or not found).

    The focus ImagingStudy's Study Instance UID (identifier ``urn:dicom:uid``) wins; else the
    order's accession number (identifier of ``accession_system``, or typed ACSN). A Task whose
    ``for`` names another Patient than the study or the order is refused ``patient-mismatch``;
    one naming neither study nor order (or whose resources carry neither identifier)
    ``unreadable-task``, or ``unknown-study`` when it names one the EHR does not hold.
    """
    if not is_draft_task(task):
        return TaskRefusal(
            TaskReason.UNREADABLE_TASK, f"Task/{task.id}: code is not {DRAFT_IMAGING_REPORT}"
        )
    focus_id, order_id = wanted_references(task)
    if focus_id is None and order_id is None:
        return TaskRefusal(
            TaskReason.UNREADABLE_TASK,
            f"Task/{task.id}: neither focus ImagingStudy nor basedOn ServiceRequest",
        )
    patient = task.for_fhir.reference if task.for_fhir is not None else None
    for resource in (imaging_study, order):
        subject = _subject(resource)
        if patient and subject and subject != patient and resource is not None:
            return TaskRefusal(
                TaskReason.PATIENT_MISMATCH,
                f"Task/{task.id}: for is not the subject of "
                f"{resource.get_resource_type()}/{resource.id}",
            )
    study_uid = _study_uid(imaging_study) if imaging_study is not None else None
    accession = _accession(order, accession_system) if order is not None else None
    if study_uid is None and accession is None:
        named = [
            f"ImagingStudy/{focus_id}" if focus_id else None,
            f"ServiceRequest/{order_id}" if order_id else None,
        ]
        found = imaging_study is not None or order is not None
        return TaskRefusal(
            TaskReason.UNREADABLE_TASK if found else TaskReason.UNKNOWN_STUDY,
            f"Task/{task.id}: "
            + ("no study UID or accession number on " if found else "not in the EHR: ")
            + ", ".join(n for n in named if n),
        )
    return TaskTarget(
        study_uid,
        accession,
        f"ImagingStudy/{imaging_study.id}" if imaging_study is not None else None,
        f"ServiceRequest/{order.id}" if order is not None else None,
    )


# -- state changes -----------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def _changed(task: Task, allowed_from: frozenset[str], to: str, **fields: object) -> Task:
    if task.status not in allowed_from:
        raise InvalidTaskTransitionError(f"Task/{task.id}: {task.status} → {to} is not allowed")
    data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["status"] = to
    data.update({k: v for k, v in fields.items() if v is not None})
    for name, value in fields.items():
        if value is None:
            data.pop(name, None)
    return Task.model_validate(data)


def _stamp(now: datetime | None) -> str:
    return _now(now).isoformat()


def _concept(system: str, code: str, display: str, text: str | None = None) -> dict[str, object]:
    concept: dict[str, object] = {"coding": [{"system": system, "code": code, "display": display}]}
    if text:
        concept["text"] = text[:1000]
    return concept


def accept(task: Task, owner: str, *, now: datetime | None = None) -> Task:
    """A worker takes the Task: ``accepted``, ``owner`` the model's ``Device/{id}``. Only from
    ``requested``/``received``: a cancelled (or already taken) Task is never accepted."""
    return _changed(
        task,
        CLAIMABLE,
        "accepted",
        owner={"reference": owner},
        lastModified=_stamp(now),
        statusReason=None,
        businessStatus=None,
    )


def progress(task: Task, stage: JobState, *, now: datetime | None = None) -> Task:
    """``in-progress`` with ``businessStatus`` the draft job's ledger stage."""
    return _changed(
        task,
        _ACTIVE,
        "in-progress",
        businessStatus=_concept(
            TASK_STAGE_SYSTEM, stage.value, stage.value, _STAGE_TEXT.get(stage)
        ),
        lastModified=_stamp(now),
    )


def complete(task: Task, outputs: Sequence[str], *, now: datetime | None = None) -> Task:
    """``completed`` with one ``output`` (type ``draft``) per drafted resource (``Type/id``)."""
    if not outputs:
        raise InvalidTaskTransitionError(f"Task/{task.id}: completed needs the draft's reference")
    return _changed(
        task,
        _ACTIVE,
        "completed",
        businessStatus=_concept(
            TASK_STAGE_SYSTEM,
            JobState.WRITTEN.value,
            JobState.WRITTEN.value,
            _STAGE_TEXT[JobState.WRITTEN],
        ),
        output=[
            {
                "type": _concept(TASK_OUTPUT_SYSTEM, DRAFT_OUTPUT, "preliminary draft"),
                "valueReference": {"reference": ref},
            }
            for ref in outputs
        ],
        lastModified=_stamp(now),
    )


def fail(task: Task, reason: TaskReason, detail: str, *, now: datetime | None = None) -> Task:
    """``failed`` with ``statusReason`` (the code, and the PHI-free detail as its text)."""
    return _changed(
        task,
        _ACTIVE,
        "failed",
        statusReason=_concept(TASK_REASON_SYSTEM, reason.value, reason.value, detail),
        lastModified=_stamp(now),
    )


def reject(task: Task, reason: TaskReason, detail: str, *, now: datetime | None = None) -> Task:
    """``rejected`` (the Task cannot be acted on, before any work) with ``statusReason``."""
    return _changed(
        task,
        CLAIMABLE | {"accepted"},
        "rejected",
        statusReason=_concept(TASK_REASON_SYSTEM, reason.value, reason.value, detail),
        lastModified=_stamp(now),
    )


# -- a draft job's end, as a Task outcome --------------------------------------------------------

#: Error types of a study whose images did not decode (pipeline.imaging, connectors.pacs).
_UNDECODABLE_ERRORS = frozenset({"ImagingError", "InvalidDicomError"})

_SKIP_REASONS = {
    reason.value: reason
    for reason in (
        TaskReason.SIGNED_BEFORE_DRAFT,
        TaskReason.PATIENT_MISMATCH,
        TaskReason.NOT_REPORTABLE,
        TaskReason.MODIFIER_EXTENSION,
        TaskReason.BURNED_IN_ANNOTATION,
    )
}


@dataclass(frozen=True)
class TaskOutcome:
    """How a Task ends for a draft job: ``outputs`` (completed), or ``reason`` and ``detail``
    (failed); neither (``pending``): the job is not finished (retried by a later run)."""

    outputs: tuple[str, ...] = ()
    reason: TaskReason | None = None
    detail: str = ""

    @property
    def pending(self) -> bool:
        return not self.outputs and self.reason is None


def outcome_of_job(
    state: JobState,
    reason: str | None,
    error_type: str | None,
    fhir_ids: Mapping[str, Sequence[str]],
) -> TaskOutcome:
    """The Task outcome of a draft job as the ledger has it.

    ``written``: completed with the DiagnosticReport (or DocumentReference) written; skipped:
    failed with the safety rule's code (the reason starts with it); dead-lettered: failed,
    ``undecodable`` when no image decoded, else ``draft-failed``. Anything else, a failure that
    will be retried included, is pending: the Task stays in progress until the job ends.
    """
    if state is JobState.WRITTEN:
        outputs = tuple(
            f"{rtype}/{rid}"
            for rtype in ("DiagnosticReport", "DocumentReference")
            for rid in fhir_ids.get(rtype, ())
        )
        if outputs:
            return TaskOutcome(outputs=outputs)
        return TaskOutcome(
            reason=TaskReason.DRAFT_FAILED, detail="written, but no report id was recorded"
        )
    text = (reason or "")[:1000]
    if state is JobState.SKIPPED:
        code = text.split(":", 1)[0].strip()
        return TaskOutcome(reason=_SKIP_REASONS.get(code, TaskReason.DRAFT_FAILED), detail=text)
    if state is JobState.DEAD_LETTERED:
        why = (
            TaskReason.UNDECODABLE if error_type in _UNDECODABLE_ERRORS else TaskReason.DRAFT_FAILED
        )
        return TaskOutcome(reason=why, detail=text)
    return TaskOutcome()
