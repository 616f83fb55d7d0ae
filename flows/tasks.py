"""On-demand drafting: FHIR Tasks that ask for a draft, taken and ended through the main job.

    search requested Tasks (code draft-imaging-report, ``_lastUpdated`` ≥ the watermark)
      → claim each: If-Match update to ``accepted``, owner the model's Device (a 412: another
        worker or the requester changed it first — lost, not an error; a cancelled Task is
        never claimed: only ``requested``/``received`` are)
      → resolve: the focus ImagingStudy's UID or the basedOn order's accession number, found
        in the PACS; registered in the ledger (one row per study and model version, as
        ``discover`` does) and claimed there (``LedgerStore.claim_jobs``); ``in-progress``
        with the ledger stage as ``businessStatus``
      → the main pipeline over those jobs (``flows.draft_reports.run_pending``: fetch, the
        safety checks, draft, write gate, idempotent write)
      → ``completed`` with output → the DiagnosticReport (DocumentReference), or ``failed``
        with the reason (``pipeline.tasks.outcome_of_job``); ``rejected`` when the Task itself
        cannot be acted on. A job not ended in this pass (a failure the ledger retries, a
        service that stayed down, a study another worker holds) leaves its Task in progress.

Tasks ``accepted`` or ``in-progress`` with this model's Device as owner are taken up again by
every pass, whichever worker of the model version runs it (a worker that died, a job not ended):
their study is resolved again, its job run if open and free, the Task ended as the ledger has it.

Every Task update is sent with If-Match of the version this worker holds, so a Task is drafted
at most once even with several workers polling the same server, and a Task cancelled by its
requester meanwhile is not overwritten (its update answers 412). The ledger's stable ids make a
second Task for the same study cost nothing: a written job completes it at once with the same
report. Messages name Tasks by logical id and studies by ``study-…`` references, never by
identifiers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task

from connectors.ehr import TaskQueue
from connectors.ledger_store import NewStudy
from connectors.pacs import StudyQuery
from flows.draft_reports import RunTally, Services, model_device, run_pending
from medvlm.errors import ConfigurationError, EhrNotFoundError, MedvlmError, one_line
from pipeline.imaging import study_reference
from pipeline.ledger import TERMINAL, DraftJob
from pipeline.tasks import (
    DRAFT_IMAGING_REPORT,
    TASK_CODE_SYSTEM,
    InvalidTaskTransitionError,
    TaskReason,
    TaskRefusal,
    accept,
    complete,
    fail,
    outcome_of_job,
    progress,
    reject,
    task_target,
    wanted_references,
)

log = logging.getLogger("medvlm.flows.tasks")

#: Searched again below the watermark: a Task committed by the server with a ``lastUpdated``
#: a little older than one already seen (concurrent commits) is still found.
WATERMARK_OVERLAP = dt.timedelta(seconds=60)

#: Statuses of a Task a worker holds and has not ended.
HELD = ("accepted", "in-progress")

#: Refusals that end a Task as ``rejected`` (it cannot be acted on); the others end it failed.
_REJECTED = frozenset({TaskReason.UNREADABLE_TASK, TaskReason.PATIENT_MISMATCH})


def watermark_source(services: Services) -> str:
    """Names the Task watermark in the ledger's watermark table (per EHR)."""
    return f"fhir-task:{services.ehr_name}"[:200]


@dataclass
class TaskTally:
    """What one pass over the requested Tasks did (Tasks by ``Task/{id}``)."""

    found: int = 0  # requested
    taken_up: int = 0  # held by this model's Device from an earlier pass (accepted, in progress)
    completed: list[tuple[str, str]] = field(default_factory=list)  # (task, draft reference)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (task, reason: detail)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # another worker or the requester was first
    not_claimable: list[str] = field(default_factory=list)  # no longer requested
    pending: list[str] = field(default_factory=list)  # in-progress: the study is not done yet
    run: RunTally | None = None


@dataclass
class _Claimed:
    task: Task
    job_id: int
    study_uid: str


def _task_ref(task: Task) -> str:
    return f"Task/{task.id}"


def _stage(task: Task) -> str | None:
    """The ledger stage a Task's ``businessStatus`` shows (its first coding's code)."""
    codings = task.businessStatus.coding or [] if task.businessStatus is not None else []
    return codings[0].code if codings else None


def _owner(task: Task) -> str | None:
    return task.owner.reference if task.owner is not None else None


R = TypeVar("R", ImagingStudy, ServiceRequest)
T = TypeVar("T")


def _read_or_none(queue: TaskQueue, model: type[R], rid: str | None) -> R | None:
    if rid is None:
        return None
    try:
        return queue.read(model, rid)
    except EhrNotFoundError:
        return None


class _Tasks:
    """One pass: the queue, the run's tally and the Task updates, each with If-Match."""

    def __init__(self, services: Services, queue: TaskQueue) -> None:
        self.services = services
        self.queue = queue
        self.tally = TaskTally()
        self.left_requested: list[Task] = []  # not claimed for a passing fault: next pass

    def update(self, task: Task) -> Task | None:
        """Send one change; None (logged, counted lost) when the Task moved meanwhile."""
        updated = self.queue.update_task(task)
        if updated is None:
            log.info(
                "%s: changed by another worker or its requester first; left to them",
                _task_ref(task),
            )
            self.tally.lost.append(_task_ref(task))
        return updated

    def end(self, task: Task, reason: TaskReason, detail: str) -> None:
        """``failed`` (``rejected`` for a Task that cannot be acted on) with its reason."""
        detail = one_line(detail, limit=500)
        ended = (reject if reason in _REJECTED else fail)(task, reason, detail)
        if self.update(ended) is None:
            return
        into = self.tally.rejected if ended.status == "rejected" else self.tally.failed
        into.append((_task_ref(task), f"{reason.value}: {detail}"))
        log.info("%s %s: %s: %s", _task_ref(task), ended.status, reason.value, detail)

    def guarded(self, step: Callable[..., T], task: Task, *args: Any) -> T | None:
        """``step(*args)``; an EHR or PACS error (after its retries) leaves this Task as it is
        now (counted pending, logged) and the pass goes on with the others."""
        try:
            return step(*args)
        except MedvlmError as exc:
            log.warning("%s: left as it is: %s", _task_ref(task), exc)
            self.tally.pending.append(_task_ref(task))
            return None

    def claim(self, task: Task, device: str) -> _Claimed | None:
        """Take the Task (If-Match to ``accepted``), find its study and take its ledger job;
        None when the Task is not this worker's to draft (or it was ended here)."""
        ref = _task_ref(task)
        try:
            accepted = accept(task, device)
        except InvalidTaskTransitionError:
            self.tally.not_claimable.append(ref)
            return None
        try:
            mine = self.update(accepted)
        except MedvlmError as exc:  # the EHR did not answer: still requested, the next pass
            log.warning("%s: not claimed (%s); left for the next pass", ref, exc)
            self.left_requested.append(task)
            return None
        if mine is None:
            return None
        return self.take_up(mine)

    def take_up(self, task: Task) -> _Claimed | None:
        """Find the study of a Task this worker's Device holds (``accepted`` or ``in-progress``)
        and its ledger job, and set the Task ``in-progress`` with the job's stage; end it when
        it cannot be drafted. An EHR or PACS error is raised (``guarded``): the Task stays
        held, and the next pass takes it up again."""
        resolved = self.resolve(task)
        if isinstance(resolved, TaskRefusal):
            self.end(task, resolved.reason, resolved.detail)
            return None
        if resolved.id is None:
            return None
        if task.status != "in-progress" or _stage(task) != resolved.state.value:
            updated = self.update(progress(task, resolved.state))
            if updated is None:
                return None
            task = updated
        return _Claimed(task, resolved.id, resolved.study_uid)

    def resolve(self, task: Task) -> DraftJob | TaskRefusal:
        """The ledger job of the study the Task asks for (registered if new), or why not."""
        services = self.services
        focus_id, order_id = wanted_references(task)
        target = task_target(
            task,
            _read_or_none(self.queue, ImagingStudy, focus_id),
            _read_or_none(self.queue, ServiceRequest, order_id),
            accession_system=services.accession_system,
        )
        if isinstance(target, TaskRefusal):
            return target
        if target.study_uid is not None:
            query = StudyQuery(study_uid=target.study_uid)
            named = f"{study_reference(target.study_uid)} ({target.imaging_study})"
        else:
            query = StudyQuery(accession_number=target.accession_number)
            named = f"the study of {target.service_request}"
        found = list(services.source.find_studies(query))
        if not found:
            return TaskRefusal(
                TaskReason.UNKNOWN_STUDY, f"{_task_ref(task)}: the PACS holds no {named}"
            )
        if len(found) > 1:
            return TaskRefusal(
                TaskReason.DRAFT_FAILED,
                f"{_task_ref(task)}: {len(found)} studies in the PACS match {named}",
            )
        study = found[0]
        version = services.model.version
        services.ledger.register(
            [NewStudy(study.study_uid, study_reference(study.study_uid), study.accession_number)],
            version,
        )
        (job,) = services.ledger.jobs(version, [study.study_uid])
        return job

    def finish(self, claimed: _Claimed, job: DraftJob) -> None:
        """End the Task as the ledger has its job: completed with the draft, or failed; a job
        not ended (retried later, a service that stayed down, another worker's) leaves the Task
        in progress, with its stage, for a later pass."""
        task, ref = claimed.task, _task_ref(claimed.task)
        outcome = outcome_of_job(job.state, job.reason, job.error_type, job.fhir_ids or {})
        if outcome.pending:
            self.tally.pending.append(ref)
            log.warning(
                "%s: %s is still %s; the Task stays in progress", ref, job.study_ref, job.state
            )
            return
        if outcome.reason is not None:
            self.end(task, outcome.reason, outcome.detail)
            return
        if self.update(complete(task, outcome.outputs)) is not None:
            self.tally.completed.append((ref, outcome.outputs[0]))
            log.info("%s completed: %s (%s)", ref, outcome.outputs[0], job.study_ref)


def _last_updated(task: Task) -> dt.datetime | None:
    stamp = task.meta.lastUpdated if task.meta is not None else None
    return stamp if isinstance(stamp, dt.datetime) else None


def draft_requested_tasks(
    services: Services, *, since: dt.datetime | None = None, queue: TaskQueue | None = None
) -> TaskTally:
    """Draft what the requested ``draft-imaging-report`` Tasks ask for, once each.

    ``since``: look at Tasks changed from then on; None: from the saved watermark (less
    ``WATERMARK_OVERLAP``), or every requested Task on the first pass. ``queue``: where the
    Tasks are (default: ``services.ehr``, which must then be a FHIR EHR).
    """
    candidate: object = queue if queue is not None else services.ehr
    if not isinstance(candidate, TaskQueue):
        raise ConfigurationError(
            "on-demand drafting through FHIR Task needs a FHIR EHR (MEDVLM_EHR__KIND=fhir)"
        )
    queue = candidate
    ledger, source = services.ledger, watermark_source(services)
    if since is None:
        saved = ledger.watermark(source)
        if saved is not None and saved.get("last_updated"):
            since = dt.datetime.fromisoformat(str(saved["last_updated"])) - WATERMARK_OVERLAP
    tasks = queue.search_tasks(TASK_CODE_SYSTEM, DRAFT_IMAGING_REPORT, since=since)
    # Tasks taken earlier and not ended (a worker that died, a study not done in its pass):
    # whichever worker of this model version comes next takes them up (every update If-Match).
    held = [
        task
        for status in HELD
        for task in queue.search_tasks(TASK_CODE_SYSTEM, DRAFT_IMAGING_REPORT, status=status)
    ]
    run = _Tasks(services, queue)
    run.tally.found = len(tasks)
    if not tasks and not held:
        return run.tally
    device = model_device(services)
    held = [task for task in held if _owner(task) == device]
    run.tally.taken_up = len(held)
    claimed = [c for task in held if (c := run.guarded(run.take_up, task, task))]
    claimed += [c for task in tasks if (c := run.guarded(run.claim, task, task, device))]
    taken = {
        job.id: job
        for job in ledger.claim_jobs(
            [c.job_id for c in claimed], services.job.worker_id, lease_s=services.job.lease_s
        )
    }
    open_jobs = [job for job in taken.values() if job.state not in TERMINAL]
    try:
        if open_jobs:
            run.tally.run = asyncio.run(run_pending(services, [open_jobs]))
    finally:
        ledger.release(
            [job for job in taken.values() if job.state not in TERMINAL], services.job.worker_id
        )
    for c in claimed:
        job = taken.get(c.job_id)
        if job is None:  # finished, or held by another live worker: as the ledger has it
            (job,) = ledger.jobs(services.model.version, [c.study_uid])
        run.guarded(run.finish, c.task, c, job)
    # The watermark moves to the newest Task seen, or stays below one left requested.
    stamps = [_last_updated(t) for t in (run.left_requested or tasks)]
    known = [stamp for stamp in stamps if stamp is not None]
    if known:
        mark = min(known) if run.left_requested else max(known)
        ledger.save_watermark(source, {"last_updated": mark.isoformat()})
    return run.tally
