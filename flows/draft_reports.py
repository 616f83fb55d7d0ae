"""The main job: draft preliminary reports for new studies, end to end, idempotent and resumable.

    discover (PACS query → ledger rows)
      → per chunk of studies (one Prefect task), studies in flight bounded by a semaphore:
          context (EHR) → images (PACS) → draft (model) → validate → write (EHR transaction)
      → summary

Every stage change is saved in the ledger before the next begins, so a crash anywhere resumes
on re-run: written studies are skipped, drafted ones are written without drafting again, the
rest start over at their stage. Writes are conditional creates on ids stable per (accession,
model version), so even a crash between the EHR's commit and the ledger's cannot duplicate a
report. Failures are recorded with their reason and retried on the next run until
``job.max_attempts``, then dead-lettered. Nothing is dropped.

Connectors are injected (``Services``): the same flow runs against a hospital, the dev servers
or folder sources. Tasks are thin wrappers; the plain functions are what tests call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydicom.dataset import Dataset

from connectors.ehr import Ehr, EhrContext
from connectors.ledger_store import LedgerStore, NewStudy
from connectors.pacs import ImageSource, StudyQuery, StudyRef, Watermark, sort_instances
from medvlm.errors import (
    EhrNotFoundError,
    EngineUnavailableError,
    LedgerUnavailableError,
    MedvlmError,
    one_line,
)
from medvlm.settings import JobSettings, host_timezone
from pipeline.ehr_rules import created_ids
from pipeline.fhir_resources import (
    ModelIdentity,
    StudyLinks,
    build_document_reference,
    build_draft_bundle,
    draft_id,
)
from pipeline.identity import check_patient_identity
from pipeline.imaging import PixelBudget, image_to_png, study_images, study_reference
from pipeline.ledger import (
    DraftJob,
    JobState,
    advance,
    count_states,
    fail,
    resume_stage,
    skip,
)
from pipeline.prompts import ModelInput
from pipeline.report import DraftReport, DraftResult
from pipeline.reportable import not_reportable_reason, select_reportable
from pipeline.study import header_value, prepare_study
from pipeline.subgroups import SUBGROUP_HEADER_KEYWORDS, subgroup_attributes
from serving.clients import Drafter

T = TypeVar("T")

log = logging.getLogger("medvlm.flows")

FLAG_NO_ORDER = "no-order-in-ehr"
FLAG_NO_EHR_CONTEXT = "missing-ehr-context"
FLAG_BURNED_IN = "burned-in-annotation"
SKIP_SIGNED = "signed-before-draft"
SKIP_PATIENT_MISMATCH = "patient-mismatch"
SKIP_BURNED_IN = "burned-in-annotation"


@dataclass
class Services:
    """Everything the flow talks to, built once by the caller and injected."""

    source: ImageSource
    ehr: Ehr
    drafter: Drafter
    ledger: LedgerStore
    model: ModelIdentity
    job: JobSettings
    max_images: int = 4
    patient_identifier_system: str | None = None
    patient_identifier_issuers: Mapping[str, str] = field(default_factory=dict)
    accession_system: str | None = None
    site_timezone: dt.tzinfo = field(default_factory=host_timezone)
    source_name: str = "default"
    on_progress: Callable[[DraftJob], None] | None = None


@dataclass(frozen=True)
class RunSummary:
    model_version: str
    discovered: int
    attempted: int
    counts: dict[str, int]
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flags: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """A safety rule says this study gets no draft; ``reason`` starts with its code."""

    reason: str


@dataclass(frozen=True)
class _Fetched:
    model_input: ModelInput
    links: StudyLinks
    flags: list[str]
    sources: tuple[str, ...]


def discover(services: Services, query: StudyQuery | None) -> list[StudyRef]:
    """Find studies and register one ledger row per (study, model version).

    ``query`` None: the studies new since the saved watermark of this source (the first run
    sees every study the source holds). The watermark moves only after registration.
    """
    watermark = None
    if query is None:
        saved = services.ledger.watermark(services.source_name)
        found, watermark = services.source.new_studies_since(
            Watermark.from_dict(saved) if saved is not None else None
        )
        studies = list(found)
    else:
        studies = list(services.source.find_studies(query))
    services.ledger.register(
        (NewStudy(s.study_uid, study_reference(s.study_uid), s.accession_number) for s in studies),
        services.model.version,
    )
    if watermark is not None:
        services.ledger.save_watermark(services.source_name, watermark.to_dict())
    return studies


def _ehr_context(
    services: Services, job: DraftJob, dicom_patient_id: str | None
) -> tuple[EhrContext | None, list[str]]:
    """The order's context; without an order, the Patient found by the DICOM PatientID (MRN)."""
    if job.accession_number:
        try:
            context = services.ehr.gather_context(job.accession_number)
            return context, []
        except EhrNotFoundError:
            pass
    patient = (
        services.ehr.find_patient(dicom_patient_id, services.patient_identifier_system)
        if dicom_patient_id
        else None
    )
    if patient is None or patient.id is None:
        return None, [FLAG_NO_ORDER, FLAG_NO_EHR_CONTEXT]
    context = services.ehr.gather_context(job.accession_number or "", patient_id=patient.id)
    return context, [FLAG_NO_ORDER]


def fetch(services: Services, job: DraftJob) -> _Fetched | Skip:
    """EHR context and study images for one job (blocking I/O; runs in a worker thread).

    Only reportable instances (``job.reportable_sop_classes`` / ``_modalities``) are decoded;
    a study without any is skipped, as is one with burned-in annotation when the settings say
    so. The prompt's priors are the signed radiology reports from before this study, never
    this order's own report.
    """
    reportable = select_reportable(
        services.source.iter_instances(job.study_uid),
        sop_classes=services.job.reportable_sop_classes,
        modalities=services.job.reportable_modalities,
    )
    if not reportable.instances:
        return Skip(not_reportable_reason(reportable))
    first = sort_instances(reportable.instances)[0]
    flags: list[str] = []
    if reportable.burned_in_annotation:
        if services.job.skip_burned_in_annotation:
            return Skip(SKIP_BURNED_IN)
        flags.append(FLAG_BURNED_IN)
    context, ehr_flags = _ehr_context(services, job, header_value(first, "PatientID"))
    flags += ehr_flags
    # Captured before the images are decoded, so a study that fails to decode (or is skipped
    # as signed) still counts in its groups' failure (skip) rates.
    job.subgroups = subgroup_attributes(
        context.patient if context is not None else None,
        {keyword: header_value(first, keyword) for keyword in SUBGROUP_HEADER_KEYWORDS},
    )
    order = context.service_request if context is not None else None
    # Checked again right before the write; here it saves drafting (a backfill of signed
    # studies costs no model time).
    signed = _signed(
        services, job.accession_number, f"ServiceRequest/{order.id}" if order else None
    )
    if signed is not None:
        return signed
    prepared = prepare_study(
        first,
        context,
        study_uid=job.study_uid,
        accession_number=job.accession_number,
        accession_system=services.accession_system,
        site_timezone=services.site_timezone,
    )
    by_series: dict[str, list[Dataset]] = {}
    for ds in reportable.instances:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    images = study_images(
        {uid: sort_instances(instances) for uid, instances in by_series.items()},
        reference=job.study_ref,
        max_images=services.max_images,
        budget=PixelBudget(max_side=services.job.max_image_side),
    )
    model_input = ModelInput(
        reference=job.study_ref,
        images_png=tuple(image_to_png(image) for image in images),
        context=prepared.prompt.context,
    )
    return _Fetched(model_input, prepared.links, [*flags, *prepared.flags], prepared.prompt.sources)


def _signed(services: Services, accession: str | None, order: str | None) -> Skip | None:
    """A skip when a radiologist has already signed this order (final/amended/corrected)."""
    signed = services.ehr.find_final_report(accession, order)
    if signed is None:
        return None
    return Skip(f"{SKIP_SIGNED}: DiagnosticReport/{signed.id} is {signed.status}")


def write_gate(services: Services, accession: str | None, links: StudyLinks) -> Skip | None:
    """Whether the draft may be written now: checked in the write step itself, also on resume.

    No draft lands on an order a radiologist has already signed (a final, amended or corrected
    DiagnosticReport based on it or carrying its accession number), nor on a Patient the
    images do not belong to (DICOM PatientID/IssuerOfPatientID against Patient.identifier).
    """
    signed = _signed(services, accession, links.service_request)
    if signed is not None:
        return signed
    if links.dicom_patient is None or links.patient is None:
        return Skip(
            f"{SKIP_PATIENT_MISMATCH}: the images' patient identity was not recorded "
            "(drafted by an older release); requeue the study"
        )
    check = check_patient_identity(
        links.dicom_patient,
        services.ehr.read_patient(links.patient.removeprefix("Patient/")),
        system=services.patient_identifier_system,
        issuer_systems=services.patient_identifier_issuers,
    )
    return None if check.matches else Skip(f"{SKIP_PATIENT_MISMATCH}: {check.detail}")


def write(services: Services, job: DraftJob) -> dict[str, Any] | Skip:
    """Write a drafted job into the EHR unless the write gate says no; returns the resource
    ids the server reports."""
    if job.draft is None:
        raise MedvlmError(f"{job.study_ref}: no stored draft to write")
    links = StudyLinks.model_validate(job.links)
    if links.patient is None:
        raise EhrNotFoundError(
            f"{job.study_ref}: no Patient in the EHR for this study; cannot write the draft"
        )
    gate = write_gate(services, job.accession_number, links)
    if gate is not None:
        return gate
    report = DraftReport.model_validate(job.draft)
    system = services.job.identifier_system
    issued = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=dt.UTC)
    if services.job.write_target == "document_reference":
        document = build_document_reference(
            report, links, services.model, issued=issued, system=system
        )
        identifier = document.identifier[0] if document.identifier else None
        assert identifier is not None
        result = services.ehr.conditional_create(document, identifier)
        return {"DocumentReference": [result.resource.id]}
    response = services.ehr.transaction(
        build_draft_bundle(report, links, services.model, issued=issued, system=system)
    )
    return created_ids(entry.response.location for entry in response.entry or [] if entry.response)


_PACKAGES = frozenset({"connectors", "flows", "medvlm", "pipeline", "serving", "tests"})


def failure_reason(exc: BaseException, job: DraftJob, stage: JobState) -> str:
    """One line for the ledger, free of colour codes and patient data.

    The project's own errors carry PHI-free messages by construction: their first line is
    kept. Anything else may echo input values in its message, so only its type and where it
    was raised are recorded; the traceback goes to the debug log.
    """
    if isinstance(exc, MedvlmError):
        return one_line(str(exc), limit=500) or type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    # The innermost frame in a file of this project's packages, else the innermost at all.
    ours = [f for f in frames if Path(f.filename).parent.name in _PACKAGES]
    where = ""
    if frames:
        last = (ours or frames)[-1]
        path = Path(last.filename)
        where = f" in {path.parent.name}/{path.name}:{last.lineno} ({last.name})"
    return f"{job.study_ref}: unexpected {type(exc).__name__} at the {stage} stage{where}"


async def _timed(job: DraftJob, name: str, work: Awaitable[T]) -> T:
    """Await ``work`` and record its seconds in ``job.timings``, also when it fails."""
    started = time.perf_counter()
    try:
        return await work
    finally:
        job.timings = {**job.timings, name: round(time.perf_counter() - started, 3)}


async def _draft(services: Services, model_input: ModelInput) -> DraftResult:
    timeout = services.job.draft_timeout_s
    try:
        return await asyncio.wait_for(services.drafter.draft(model_input), timeout)
    except TimeoutError:
        raise EngineUnavailableError(
            f"{model_input.reference}: no draft within {timeout:g} s (job.draft_timeout_s)"
        ) from None


async def process_job(services: Services, job: DraftJob, *, dry_run: bool = False) -> DraftJob:
    """Take one job as far as it can go, saving each stage.

    The per-study error boundary: whatever goes wrong for this study, at any stage, is recorded
    on it (type, one-line reason, timings so far) and counted as an attempt, and the run goes
    on. Only a failure of the ledger itself stops the run.
    """
    stage = resume_stage(job)
    if stage is None:
        return job
    try:
        if job.state is JobState.FAILED:
            advance(job, stage)
        if stage in (JobState.DISCOVERED, JobState.FETCHED):
            fetched = await _timed(job, "fetch_s", asyncio.to_thread(fetch, services, job))
            if isinstance(fetched, Skip):
                skip(job, fetched.reason)
            else:
                changes = {
                    "links": fetched.links.model_dump(mode="json"),
                    "flags": fetched.flags,
                    "context_sources": list(fetched.sources),
                }
                if job.state is JobState.DISCOVERED:
                    advance(job, JobState.FETCHED, **changes)
                else:
                    for name, value in changes.items():
                        setattr(job, name, value)
                services.ledger.save([job])
                result = await _timed(job, "draft_s", _draft(services, fetched.model_input))
                advance(
                    job,
                    JobState.DRAFTED,
                    draft=result.report.model_dump(mode="json"),
                    output_sha256=result.output_sha256,
                    draft_id=draft_id(
                        job.accession_number or job.study_uid, services.model.version
                    ),
                    timings={**job.timings, "draft_s": round(result.latency_s, 3)},
                )
                services.ledger.save([job])
        if job.state is JobState.DRAFTED and not dry_run:
            written = await _timed(job, "write_s", asyncio.to_thread(write, services, job))
            if isinstance(written, Skip):
                skip(job, written.reason)
            else:
                advance(job, JobState.WRITTEN, fhir_ids=written, reason=None, error_type=None)
    except LedgerUnavailableError:
        raise
    except Exception as exc:  # the per-study boundary: recorded on the study, never raised
        failed_at = job.state
        reason = failure_reason(exc, job, failed_at)
        fail(job, reason, max_attempts=services.job.max_attempts, error_type=type(exc).__name__)
        log.warning("%s failed at %s: %s", job.study_ref, failed_at, reason)
        log.debug("%s: traceback of the failure", job.study_ref, exc_info=True)
    if job.state is JobState.SKIPPED:
        log.info("%s skipped: %s", job.study_ref, job.reason)
    services.ledger.save([job])
    if services.on_progress is not None:
        services.on_progress(job)
    return job


async def process_chunk(
    services: Services, jobs: Sequence[DraftJob], *, dry_run: bool = False
) -> list[DraftJob]:
    semaphore = asyncio.Semaphore(services.job.concurrency)

    async def bounded(job: DraftJob) -> DraftJob:
        async with semaphore:
            return await process_job(services, job, dry_run=dry_run)

    try:
        return list(await asyncio.gather(*(bounded(job) for job in jobs)))
    finally:
        await services.drafter.aclose()


def summarize(services: Services, discovered: int, attempted: int) -> RunSummary:
    """Counts per state, failures and skips with their reasons, and how often each flag fired."""
    jobs = services.ledger.jobs(services.model.version)
    flags: dict[str, int] = {}
    for job in jobs:
        for flag in job.flags or []:
            flags[flag] = flags.get(flag, 0) + 1
    return RunSummary(
        services.model.version,
        discovered,
        attempted,
        {state.value: n for state, n in count_states(jobs).items()},
        failures=[
            (job.study_ref, job.reason or "")
            for job in jobs
            if job.state in (JobState.FAILED, JobState.DEAD_LETTERED)
        ],
        skipped=[
            (job.study_ref, job.reason or "") for job in jobs if job.state is JobState.SKIPPED
        ],
        flags=flags,
    )


def run_draft_job(
    services: Services,
    query: StudyQuery | None,
    dry_run: bool = False,
    *,
    discover_step: Callable[[Services, StudyQuery | None], int] | None = None,
    chunk_step: Callable[[Services, list[DraftJob], bool], object] | None = None,
) -> RunSummary:
    """The main job as plain code: discover, process the pending jobs in chunks, summarize.

    The Prefect flow passes its tasks as the steps; tests call this directly.
    """
    discovered = (discover_step or (lambda s, q: len(discover(s, q))))(services, query)
    pending = services.ledger.pending(services.model.version)
    run_chunk = chunk_step or (
        lambda s, jobs, dry: asyncio.run(process_chunk(s, jobs, dry_run=dry))
    )
    size = services.job.chunk_size
    for start in range(0, len(pending), size):
        run_chunk(services, pending[start : start + size], dry_run)
    return summarize(services, discovered, len(pending))


@task(name="discover-studies", cache_policy=NO_CACHE)
def discover_task(services: Services, query: StudyQuery | None) -> int:
    return len(discover(services, query))


@task(name="draft-chunk", cache_policy=NO_CACHE)
def draft_chunk_task(services: Services, jobs: list[DraftJob], dry_run: bool) -> list[str]:
    done = asyncio.run(process_chunk(services, jobs, dry_run=dry_run))
    return [job.state.value for job in done]


@flow(name="draft-reports", validate_parameters=False, log_prints=True)
def draft_reports(
    services: Any,
    query: StudyQuery | None,
    dry_run: bool = False,
) -> RunSummary:
    """Discover → draft in chunks → summary. Studies already written are skipped.

    ``query`` None discovers the studies new since the source's saved watermark.

    ``services`` is a ``Services``; typed ``Any`` because Prefect derives a parameter schema
    from the signature and cannot for Protocol-typed fields.
    """
    assert isinstance(services, Services)
    return run_draft_job(
        services, query, dry_run, discover_step=discover_task, chunk_step=draft_chunk_task
    )
