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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from connectors.ehr import Ehr, EhrContext
from connectors.ledger_store import LedgerStore, NewStudy
from connectors.pacs import ImageSource, StudyQuery, StudyRef, Watermark, sort_instances
from medvlm.errors import EhrNotFoundError, MedvlmError
from medvlm.settings import JobSettings
from pipeline.context import study_context
from pipeline.fhir_resources import (
    ModelIdentity,
    StudyLinks,
    build_document_reference,
    build_draft_bundle,
    draft_id,
)
from pipeline.imaging import PixelBudget, image_to_png, study_images, study_reference
from pipeline.ledger import DraftJob, JobState, advance, count_states, fail, resume_stage
from pipeline.prompts import ModelInput, StudyContext
from pipeline.report import DraftReport
from pipeline.subgroups import SUBGROUP_HEADER_KEYWORDS, subgroup_attributes
from serving.clients import Drafter

log = logging.getLogger("medvlm.flows")

FLAG_NO_ORDER = "no-order-in-ehr"
FLAG_NO_EHR_CONTEXT = "missing-ehr-context"


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
    source_name: str = "default"
    on_progress: Callable[[DraftJob], None] | None = None


@dataclass(frozen=True)
class RunSummary:
    model_version: str
    discovered: int
    attempted: int
    counts: dict[str, int]
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Fetched:
    model_input: ModelInput
    links: dict[str, Any]
    flags: list[str]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


def fetch(services: Services, job: DraftJob) -> _Fetched:
    """EHR context and study images for one job (blocking I/O; runs in a worker thread)."""
    by_series: dict[str, list[Any]] = {}
    for ds in services.source.iter_instances(job.study_uid):
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    by_series = {uid: sort_instances(instances) for uid, instances in by_series.items()}
    first = next(iter(by_series.values()))[0] if by_series else None
    context, flags = _ehr_context(
        services, job, str(first.get("PatientID", "")) or None if first is not None else None
    )

    def header(keyword: str) -> str | None:
        value = first.get(keyword) if first is not None else None
        return str(value) if value not in (None, "") else None

    # Captured before the images are decoded, so a study that fails to decode is still counted
    # in its groups' failure rates.
    job.subgroups = subgroup_attributes(
        context.patient if context is not None else None,
        {keyword: header(keyword) for keyword in SUBGROUP_HEADER_KEYWORDS},
    )
    images = study_images(
        by_series,
        reference=job.study_ref,
        max_images=services.max_images,
        budget=PixelBudget(max_side=services.job.max_image_side),
    )

    modality = header("Modality") or "OT"
    if context is not None:
        prompt_context = study_context(
            modality=modality,
            body_part=header("BodyPartExamined"),
            study_description=header("StudyDescription"),
            service_request=context.service_request,
            conditions=context.conditions,
            prior_reports=context.prior_reports,
        )
    else:
        prompt_context = StudyContext(
            modality=modality,
            body_part=header("BodyPartExamined"),
            study_description=header("StudyDescription"),
        )
    links: dict[str, Any] = {}
    if context is not None:
        links["patient"] = f"Patient/{context.patient.id}"
        if context.service_request is not None:
            links["service_request"] = f"ServiceRequest/{context.service_request.id}"
        matching = [
            s
            for s in context.imaging_studies
            if any(
                (i.value or "").removeprefix("urn:oid:") == job.study_uid
                for i in s.identifier or []
            )
        ]
        if matching:
            links["imaging_study"] = f"ImagingStudy/{matching[0].id}"
    if header("StudyDate"):
        date = str(header("StudyDate"))
        time_of_day = (header("StudyTime") or "000000")[:6].ljust(6, "0")
        links["study_started"] = (
            dt.datetime.strptime(date + time_of_day, "%Y%m%d%H%M%S")
            .replace(tzinfo=dt.UTC)
            .isoformat()
        )
    model_input = ModelInput(
        reference=job.study_ref,
        images_png=tuple(image_to_png(image) for image in images),
        context=prompt_context,
    )
    return _Fetched(model_input, links, flags)


def write(services: Services, job: DraftJob) -> dict[str, Any]:
    """Write a drafted job into the EHR; returns the resource ids the server reports."""
    if job.draft is None:
        raise MedvlmError(f"{job.study_ref}: no stored draft to write")
    patient = job.links.get("patient")
    if patient is None:
        raise EhrNotFoundError(
            f"{job.study_ref}: no Patient in the EHR for this study; cannot write the draft"
        )
    report = DraftReport.model_validate(job.draft)
    started = job.links.get("study_started")
    links = StudyLinks(
        accession_number=job.accession_number or job.study_uid,
        patient=patient,
        service_request=job.links.get("service_request"),
        imaging_study=job.links.get("imaging_study"),
        study_started=dt.datetime.fromisoformat(started) if started else None,
    )
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
    ids: dict[str, list[str]] = {}
    for entry in response.entry or []:
        location = entry.response.location if entry.response else None
        if location:
            kind, _, rest = str(location).partition("/")
            ids.setdefault(kind, []).append(rest.split("/")[0])
    return ids


async def process_job(services: Services, job: DraftJob, *, dry_run: bool = False) -> DraftJob:
    """Take one job as far as it can go, saving each stage; failures are recorded, not raised."""
    stage = resume_stage(job)
    if stage is None:
        return job
    if job.state is JobState.FAILED:
        advance(job, stage)
    try:
        if stage in (JobState.DISCOVERED, JobState.FETCHED):
            started = time.perf_counter()
            fetched = await asyncio.to_thread(fetch, services, job)
            timings = {**job.timings, "fetch_s": round(time.perf_counter() - started, 3)}
            if job.state is JobState.DISCOVERED:
                advance(job, JobState.FETCHED, links=fetched.links, flags=fetched.flags)
            else:
                job.links, job.flags = fetched.links, fetched.flags
            services.ledger.save([job])
            result = await services.drafter.draft(fetched.model_input)
            timings["draft_s"] = round(result.latency_s, 3)
            advance(
                job,
                JobState.DRAFTED,
                draft=result.report.model_dump(mode="json"),
                output_sha256=result.output_sha256,
                draft_id=draft_id(job.accession_number or job.study_uid, services.model.version),
                timings=timings,
            )
            services.ledger.save([job])
        if dry_run:
            return job
        started = time.perf_counter()
        ids = await asyncio.to_thread(write, services, job)
        advance(
            job,
            JobState.WRITTEN,
            fhir_ids=ids,
            reason=None,
            timings={**job.timings, "write_s": round(time.perf_counter() - started, 3)},
        )
    except MedvlmError as exc:
        fail(job, str(exc), max_attempts=services.job.max_attempts)
        log.warning("%s failed at %s: %s", job.study_ref, job.failed_stage, exc)
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
    discovered = discover_task(services, query)
    pending = services.ledger.pending(services.model.version)
    size = services.job.chunk_size
    for start in range(0, len(pending), size):
        draft_chunk_task(services, pending[start : start + size], dry_run)
    jobs = services.ledger.jobs(services.model.version)
    counts = {state.value: n for state, n in count_states(jobs).items()}
    failures = [
        (job.study_ref, job.reason or "")
        for job in jobs
        if job.state in (JobState.FAILED, JobState.DEAD_LETTERED)
    ]
    return RunSummary(services.model.version, discovered, len(pending), counts, failures)
