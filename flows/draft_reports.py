"""The main job: draft preliminary reports for new studies, end to end, idempotent and resumable.

    discover (PACS query → ledger rows)
      → one pipeline over the pending jobs, claimed from the ledger as places free up
        (several workers may share the ledger: each takes other jobs, under a lease):
          fetch (EHR context, PACS headers, chosen images)  ≤ job.fetch_concurrency at once
          draft (model)                                     ≤ model capacity at once
          write (EHR: DraftWriter)                          ≤ job.write_concurrency at once
        every study moves through the stages on its own, so the model is kept busy while other
        studies are being fetched and written; at most the sum of the three limits are alive
        (backpressure: memory does not grow with the batch)
      → summary (counts by SQL aggregate; failures, skips and flags of this run)

Every stage change is saved in the ledger before the next begins (concurrent saves share one
commit), so a crash anywhere resumes on re-run: written studies are skipped, drafted ones are
written without drafting again, the rest start over at their stage. Every resource written has
a key stable per (accession, model version); ``writing`` is saved before the first request, and
a study found in it (a crash, a lost answer) is looked up in the EHR by those keys before
anything is sent again (``connectors.draft_writer``), so even a crash between the EHR's commit
and the ledger's cannot duplicate a report, whatever the EHR offers. Failures are recorded with
their reason and retried on the next run until ``job.max_attempts``, then dead-lettered; a
study that waits for a service that is down spends no attempt (``connectors.circuit``).
Nothing is dropped.

The model capacity is ``job.concurrency`` when set, else what the model service takes
(``Services.model_capacity``: replicas × max_ongoing_requests), so extra replicas are used.

Connectors are injected (``Services``): the same job runs against a hospital, the dev servers
or folder sources. This module is plain code and does not import Prefect: the Prefect flow and
its tasks are thin wrappers in ``flows.deployments``, and a ``medvlm run`` with nothing to do
never loads Prefect. The plain functions are what tests call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import multiprocessing
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from connectors.draft_writer import DraftWriter, WriteStrategy, choose_strategy
from connectors.ehr import Ehr, EhrContext
from connectors.ledger_store import LedgerStore, NewStudy
from connectors.pacs import (
    ImageSource,
    InstanceStore,
    StudyQuery,
    StudyRef,
    Watermark,
    sort_instances,
)
from flows.study_images import load_model_images
from medvlm.errors import (
    EhrNotFoundError,
    EngineUnavailableError,
    LeaseLostError,
    LedgerUnavailableError,
    MedvlmError,
    ModelServiceStartError,
    ServiceDownError,
    one_line,
)
from medvlm.settings import JobSettings, host_timezone
from pipeline.ehr_rules import modifier_extension_urls
from pipeline.fhir_resources import (
    ModelIdentity,
    StudyLinks,
    WriteOptions,
    build_device,
    build_draft_resources,
    device_key,
    draft_id,
    written_types,
)
from pipeline.identity import check_patient_identity
from pipeline.imaging import study_reference
from pipeline.ledger import (
    TERMINAL,
    DraftJob,
    JobState,
    advance,
    fail,
    resume_stage,
    skip,
)
from pipeline.prompts import ModelInput
from pipeline.report import DraftReport, DraftResult
from pipeline.reportable import not_reportable_reason, select_reportable
from pipeline.sr import build_sr, is_sr
from pipeline.study import header_value, prepare_study
from pipeline.subgroups import SUBGROUP_HEADER_KEYWORDS, subgroup_attributes
from serving.clients import Drafter

T = TypeVar("T")

# Failures that are not a study's: the run stops and its studies stay where they were.
_STOPS_RUN = (LedgerUnavailableError, ModelServiceStartError)

log = logging.getLogger("medvlm.flows")

FLAG_NO_ORDER = "no-order-in-ehr"
FLAG_NO_EHR_CONTEXT = "missing-ehr-context"
FLAG_BURNED_IN = "burned-in-annotation"
FLAG_IMAGES_LEFT_OUT = "images-left-out"
SKIP_SIGNED = "signed-before-draft"
SKIP_PATIENT_MISMATCH = "patient-mismatch"
SKIP_BURNED_IN = "burned-in-annotation"
SKIP_MODIFIER_EXTENSION = "modifier-extension"


@dataclass
class Services:
    """Everything the flow talks to, built once by the caller and injected.

    ``model_capacity``: requests the model service takes at once (replicas ×
    max_ongoing_requests); the run keeps that many studies at the model unless
    ``job.concurrency`` says otherwise. ``image_processes``: processes a run decodes and
    encodes images in (0: in the fetch threads).
    """

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
    pseudonym_key: bytes | None = field(default=None, repr=False)
    source_name: str = "default"
    ehr_name: str = "default"
    model_capacity: int = 16
    image_processes: int = 0
    on_progress: Callable[[DraftJob], None] | None = None
    _writer: DraftWriter | None = field(default=None, init=False, repr=False)
    _writer_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def writer(self) -> DraftWriter:
        """The run's one ``DraftWriter`` (strategy from ``job.write_strategy``, ``auto``: the
        EHR's CapabilityStatement, read on the first write)."""
        with self._writer_lock:
            if self._writer is None:
                strategy = WriteStrategy(self.job.write_strategy)
                if strategy is WriteStrategy.AUTO:
                    strategy = choose_strategy(
                        "auto", self.ehr.capabilities(), written_types(self.job.write_target)
                    )
                    log.info("EHR writes: %s (from the server's CapabilityStatement)", strategy)
                self._writer = DraftWriter(
                    self.ehr,
                    strategy,
                    attempts=self.job.write_attempts,
                    backoff_s=self.job.write_backoff_s,
                )
            return self._writer

    def write_options(self) -> WriteOptions:
        job = self.job
        return WriteOptions(
            target=job.write_target,
            identifier_system=job.identifier_system,
            organization=job.organization,
            organization_display=job.organization_display,
        )


@dataclass(frozen=True)
class RunSummary:
    model_version: str
    discovered: int
    attempted: int
    counts: dict[str, int]
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flags: dict[str, int] = field(default_factory=dict)
    tally: RunTally | None = None


class _LeftPending(Exception):
    """A study stops where it is because a service it needs stayed down; not its failure."""

    def __init__(self, down: ServiceDownError) -> None:
        super().__init__(str(down))
        self.down = down


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

    While the PACS is known down (its breaker open: ``ServiceDownError``) discovery waits for
    it as a study's stage does (``_Stages._waiting``): probing, up to ``job.outage_wait_s``, at
    most ``job.outage_retries`` times; then the ``ServiceDownError`` is raised, with nothing
    registered (``run_draft_job`` ends the run with it as the run's outage, no study failed).
    """
    limits = services.job
    for waited in range(limits.outage_retries + 1):
        try:
            return _discover(services, query)
        except ServiceDownError as down:
            breaker = down.breaker
            if waited == limits.outage_retries or breaker is None:
                raise
            if not _wait_for_service(breaker, limits.outage_wait_s):
                raise
            log.info("discovery: %s answers again; going on", breaker.service)
    raise AssertionError("unreachable")


def _wait_for_service(breaker: Any, timeout_s: float) -> bool:
    """Probe ``breaker``'s service every ``probe_interval_s`` until it answers (True) or
    ``timeout_s`` has passed (False). Blocking: discovery holds no claim to renew meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not breaker.probe_once():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(breaker.probe_interval_s, remaining))
    return True


def discovery_outage(down: ServiceDownError) -> RunTally:
    """The tally of a run that ended at discovery because the PACS stayed down: no study
    taken, none failed, the outage said once."""
    log.error("run ended early: %s; no study was discovered, none failed", down)
    return RunTally(outage=str(down))


def _discover(services: Services, query: StudyQuery | None) -> list[StudyRef]:
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
        [NewStudy(s.study_uid, study_reference(s.study_uid), s.accession_number) for s in studies],
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


def fetch(
    services: Services, job: DraftJob, image_processes: Executor | None = None
) -> _Fetched | Skip:
    """EHR context and study images for one job (blocking I/O; runs in a worker thread).

    Only reportable instances (``job.reportable_sop_classes`` / ``_modalities``) are decoded;
    a study without any is skipped, as is one with burned-in annotation when the settings say
    so. The prompt's priors are the signed radiology reports from before this study, never
    this order's own report.
    """
    reportable = select_reportable(
        services.source.instance_headers(job.study_uid),
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
    if context is not None and (refused := _not_understood(context)) is not None:
        return refused
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
        pseudonym_key=services.pseudonym_key,
    )
    images = load_model_images(
        services.source,
        job.study_uid,
        list(reportable.instances),
        reference=job.study_ref,
        max_images=services.max_images,
        max_side=services.job.max_image_side,
        processes=image_processes,
    )
    if images.unusable:
        # Drafted from the instances that decode; the radiologist sees that some did not.
        flags.append(FLAG_IMAGES_LEFT_OUT)
        log.warning(
            "%s: %d instance(s) left out as unusable (%s)",
            job.study_ref,
            len(images.unusable),
            next(iter(images.unusable.values())),
        )
    model_input = ModelInput(
        reference=job.study_ref, images_png=tuple(images.pngs), context=prepared.prompt.context
    )
    return _Fetched(model_input, prepared.links, [*flags, *prepared.flags], prepared.prompt.sources)


def _not_understood(context: EhrContext) -> Skip | None:
    """A skip when a resource the draft would rest on (the Patient, the order, a Condition or a
    signed report the prompt may show) carries a modifier extension: none is understood here,
    and one may reverse the resource's meaning (``pipeline.ehr_rules.modifier_extension_urls``).
    """
    used = [
        context.patient,
        context.service_request,
        *context.conditions,
        *context.prior_reports,
    ]
    for resource in used:
        if resource is None:
            continue
        urls = modifier_extension_urls(resource)
        if urls:
            return Skip(
                f"{SKIP_MODIFIER_EXTENSION}: {resource.get_resource_type()}/{resource.id} "
                f"carries a modifierExtension this pipeline does not understand ({urls[0][:200]})"
            )
    return None


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
        key=services.pseudonym_key,
    )
    return None if check.matches else Skip(f"{SKIP_PATIENT_MISMATCH}: {check.detail}")


def model_device(services: Services) -> str:
    """``Device/{id}`` of the model in the EHR: the ledger's, else found or created once."""
    options = services.write_options()
    key = device_key(services.model, options.identifier_system)
    saved = f"{key.system}|{key.value}"[:400]
    return services.writer().device(
        build_device(services.model, system=options.identifier_system, options=options),
        key,
        lookup=lambda: services.ledger.ehr_device(services.ehr_name, saved),
        remember=lambda ref: services.ledger.save_ehr_device(services.ehr_name, saved, ref),
    )


def write(services: Services, job: DraftJob, *, resume: bool = False) -> dict[str, Any] | Skip:
    """Write a drafted job into the EHR unless the write gate says no; returns the resource
    ids written (or found: ``resume``, the ledger says an earlier attempt may have reached
    the EHR)."""
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
    issued = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=dt.UTC)
    resources = build_draft_resources(
        report,
        links,
        services.model,
        device=model_device(services),
        issued=issued,
        options=services.write_options(),
        sources=job.context_sources or (),
    )
    written = services.writer().write(resources, resume=resume)
    if services.job.store_sr:
        # After the EHR write: the draft is in the EHR whatever happens to its SR. A failure
        # here fails the job at the write stage; its retry finds the EHR resources by their
        # keys (resume) and stores the SR again under the same UID.
        written = {**written, SR_KEY: [store_sr(services, job, report, resources.draft_id)]}
    return written


SR_KEY = "DicomSR"
"""The ledger's ``fhir_ids`` key of the SR stored in the PACS (its SOP Instance UID)."""


def store_sr(services: Services, job: DraftJob, report: DraftReport, tag: str) -> str:
    """Store the draft as a DICOM SR in the study's PACS (``job.store_sr``); its SOP Instance
    UID. The evidence is the study's reportable instances as the PACS lists them now."""
    if not isinstance(services.source, InstanceStore):
        raise MedvlmError(
            f"{job.study_ref}: job.store_sr is on, but the PACS connector "
            f"({type(services.source).__name__}) cannot store instances (DICOMweb STOW-RS only)"
        )
    headers = services.source.instance_headers(job.study_uid)
    evidence = select_reportable(headers).instances or [h for h in headers if not is_sr(h)]
    if not evidence:
        raise MedvlmError(f"{job.study_ref}: no source image left in the PACS to reference")
    sr = build_sr(report, services.model, draft_id=tag, evidence=evidence)
    result = services.source.store([sr])
    if result.failed:
        reasons = ", ".join(str(code) for _uid, code in result.failed)
        raise MedvlmError(f"{job.study_ref}: the PACS refused the draft SR (failure {reasons})")
    return str(sr.SOPInstanceUID)


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


@dataclass(frozen=True)
class StageLimits:
    """Studies each stage works on at once; their sum bounds the studies alive in a run."""

    fetch: int
    model: int
    write: int

    @property
    def alive(self) -> int:
        return self.fetch + self.model + self.write

    @classmethod
    def of(cls, services: Services) -> StageLimits:
        job = services.job
        return cls(
            fetch=job.fetch_concurrency,
            model=job.concurrency or services.model_capacity,
            write=job.write_concurrency,
        )


class _GroupCommit:
    """Ledger saves of concurrent studies, committed together.

    Each caller resumes once its job is durable (the ledger's rule: a stage is saved before
    the next begins); saves that arrive while a commit runs go into the next one, so a busy
    run pays one commit per batch of stage changes, not one per change.
    """

    def __init__(self, ledger: LedgerStore, executor: Executor) -> None:
        self._ledger = ledger
        self._executor = executor
        self._queue: list[tuple[DraftJob, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def save(self, job: DraftJob) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((job, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await loop.run_in_executor(
                    self._executor, self._ledger.save, [job for job, _ in batch]
                )
            except LeaseLostError as exc:
                # Only the lost jobs' waiters get it; the batch's other jobs were saved.
                lost = set(exc.job_ids)
                for job, done in batch:
                    if done.done():
                        continue
                    if job.id in lost:
                        done.set_exception(
                            LeaseLostError(
                                f"{job.study_ref}: taken by another worker (lease ran out)",
                                (job.study_ref,),
                                (job.id,) if job.id is not None else (),
                            )
                        )
                    else:
                        done.set_result(None)
            except BaseException as exc:
                # Handed to every waiter (LedgerUnavailableError then stops the run).
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)


class _Stages:
    """The stage limits of one run, its I/O threads, its ledger saves and the model's load."""

    def __init__(
        self,
        services: Services,
        limits: StageLimits,
        executor: Executor,
        image_processes: Executor | None = None,
    ) -> None:
        self.services = services
        self._image_processes = image_processes
        self._fetch = asyncio.Semaphore(limits.fetch)
        self._model = asyncio.Semaphore(limits.model)
        self._write = asyncio.Semaphore(limits.write)
        self._executor = executor
        self._saves = _GroupCommit(services.ledger, executor)
        self._at_model = 0
        self._since = time.perf_counter()
        self.model_busy_s = 0.0  # ∫ requests at the model dt: / wall time = mean in flight
        self.completion_tokens = 0
        self.outage: ServiceDownError | None = None  # a service stayed down: take no more

    def _io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _model_load(self, change: int) -> None:
        now = time.perf_counter()
        self.model_busy_s += self._at_model * (now - self._since)
        self._at_model += change
        self._since = now

    def settle(self) -> None:
        """Bring ``model_busy_s`` up to now."""
        self._model_load(0)

    async def save(self, job: DraftJob) -> None:
        await self._saves.save(job)

    async def _waiting(self, job: DraftJob, call: Callable[[bool], T]) -> T:
        """``call(again)`` in an I/O thread; while the service it needs is down (its breaker
        open: ``ServiceDownError``) the study waits for it, probing, up to
        ``job.outage_wait_s``, then runs ``call(True)`` — at most ``job.outage_retries`` times.
        A study that cannot go on is left where it is (``_LeftPending``): not failed, no
        attempt spent, and the run takes no new studies (``outage``)."""
        limits = self.services.job
        again = False
        for waited in range(limits.outage_retries + 1):
            if self.outage is not None:
                raise _LeftPending(self.outage)
            try:
                return await self._io(call, again)
            except ServiceDownError as down:
                breaker = down.breaker
                if waited == limits.outage_retries or breaker is None:
                    self.outage = self.outage or down
                    raise _LeftPending(down) from None
                if not await self._wait_for(breaker, limits.outage_wait_s):
                    self.outage = self.outage or down
                    raise _LeftPending(down) from None
                log.info("%s: %s answers again; going on", job.study_ref, breaker.service)
                again = True
        raise AssertionError("unreachable")

    async def _wait_for(self, breaker: Any, timeout_s: float) -> bool:
        """Probe ``breaker``'s service in an I/O thread every ``probe_interval_s`` (sleeping
        here, not in a thread: the ledger's leases are renewed meanwhile) until it answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self._io(breaker.probe_once):
            remaining = deadline - loop.time()
            if remaining <= 0 or self.outage is not None:
                return False
            await asyncio.sleep(min(breaker.probe_interval_s, remaining))
        return True

    async def fetch(self, job: DraftJob) -> _Fetched | Skip:
        async with self._fetch:
            return await _timed(
                job,
                "fetch_s",
                self._waiting(job, lambda _again: fetch(self.services, job, self._image_processes)),
            )

    async def draft(self, job: DraftJob, model_input: ModelInput) -> DraftResult:
        async with self._model:
            self._model_load(+1)
            try:
                result = await _timed(job, "draft_s", _draft(self.services, model_input))
            finally:
                self._model_load(-1)
            self.completion_tokens += result.completion_tokens
            return result

    async def write(self, job: DraftJob, *, resume: bool) -> dict[str, Any] | Skip:
        async with self._write:
            # After waiting for the EHR the write resumes: it may have reached the EHR.
            return await _timed(
                job,
                "write_s",
                self._waiting(job, lambda again: write(self.services, job, resume=resume or again)),
            )


async def _process_job(stages: _Stages, job: DraftJob, *, dry_run: bool) -> DraftJob:
    """Take one job as far as it can go, saving each stage.

    The per-study error boundary: whatever goes wrong for this study, at any stage, is recorded
    on it (type, one-line reason, timings so far) and counted as an attempt, and the run goes
    on. Only a failure of the ledger itself stops the run.
    """
    services = stages.services
    stage = resume_stage(job)
    if stage is None:
        return job
    try:
        if job.state is JobState.FAILED:
            advance(job, stage)
        if stage in (JobState.DISCOVERED, JobState.FETCHED):
            fetched = await stages.fetch(job)
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
                await stages.save(job)
                result = await stages.draft(job, fetched.model_input)
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
                await stages.save(job)
        if job.state in (JobState.DRAFTED, JobState.WRITING) and not dry_run:
            # Saved before the first request: a job found in ``writing`` may be in the EHR.
            resume = job.state is JobState.WRITING
            if not resume:
                advance(job, JobState.WRITING)
                await stages.save(job)
            written = await stages.write(job, resume=resume)
            if isinstance(written, Skip):
                skip(job, written.reason)
            else:
                advance(job, JobState.WRITTEN, fhir_ids=written, reason=None, error_type=None)
    except _STOPS_RUN:
        raise
    except LeaseLostError:  # another worker has the study now: not this run's to record
        raise
    except _LeftPending as left:
        # Where it was (no attempt spent): the next run, or a worker, takes it from there.
        log.info("%s left pending at %s: %s", job.study_ref, job.state, left.down)
        if services.on_progress is not None:
            services.on_progress(job)
        return job
    except Exception as exc:  # the per-study boundary: recorded on the study, never raised
        failed_at = job.state
        reason = failure_reason(exc, job, failed_at)
        fail(job, reason, max_attempts=services.job.max_attempts, error_type=type(exc).__name__)
        log.warning("%s failed at %s: %s", job.study_ref, failed_at, reason)
        log.debug("%s: traceback of the failure", job.study_ref, exc_info=True)
    if job.state is JobState.SKIPPED:
        log.info("%s skipped: %s", job.study_ref, job.reason)
    await stages.save(job)
    if services.on_progress is not None:
        services.on_progress(job)
    return job


@dataclass
class RunTally:
    """What one run did with the jobs it took, and how busy it kept the model."""

    attempted: int = 0
    states: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    flags: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # taken by another worker: not attempted
    stage_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    model_busy_s: float = 0.0
    completion_tokens: int = 0
    outage: str | None = None  # a service stayed down: the run ended early, the rest pending

    @property
    def model_mean_in_flight(self) -> float:
        """Mean requests at the model over the run (its batch occupancy as the flow sees it)."""
        return self.model_busy_s / self.wall_s if self.wall_s > 0 else 0.0

    def record(self, job: DraftJob) -> None:
        self.attempted += 1
        self.states[job.state.value] = self.states.get(job.state.value, 0) + 1
        if job.state in (JobState.FAILED, JobState.DEAD_LETTERED):
            self.failures.append((job.study_ref, job.reason or ""))
        elif job.state is JobState.SKIPPED:
            self.skipped.append((job.study_ref, job.reason or ""))
        for flag in job.flags or []:
            self.flags[flag] = self.flags.get(flag, 0) + 1
        for name, seconds in (job.timings or {}).items():
            self.stage_s[name] = self.stage_s.get(name, 0.0) + seconds


class _Claims:
    """The jobs a run holds by claim: taken as places in the pipeline free up, their leases
    renewed while the run holds them, released when it ends.

    A job that ends in a terminal state gave its claim up with that save; one that ends
    otherwise (failed, to be retried by the next run; drafted in a dry run) stays held, so
    that no worker takes it again in this run, and is released at the end.
    """

    def __init__(self, services: Services, executor: Executor) -> None:
        self._ledger = services.ledger
        self._version = services.model.version
        self._worker = services.job.worker_id
        self._lease_s = services.job.lease_s
        self._page_size = services.job.page_size
        self._executor = executor
        self.held: dict[int, DraftJob] = {}

    def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs)
        )

    async def next_page(self, alive: asyncio.Semaphore) -> list[DraftJob]:
        """Claim as many jobs as the pipeline has free places (at least one, waited for; at
        most ``job.page_size``), so claimed jobs do not wait for a place while their leases
        run. Each job returned holds one place of ``alive``. Empty: nothing left to claim."""
        await alive.acquire()
        places = 1
        while places < self._page_size and not alive.locked():
            await alive.acquire()
            places += 1
        try:
            page: list[DraftJob] = await self._io(
                self._ledger.claim_page,
                self._version,
                self._worker,
                limit=places,
                lease_s=self._lease_s,
            )
        except BaseException:
            for _ in range(places):
                alive.release()
            raise
        for _ in range(places - len(page)):
            alive.release()
        self.held.update((job.id, job) for job in page if job.id is not None)
        return page

    def finished(self, job: DraftJob) -> None:
        if job.state in TERMINAL and job.id is not None:
            self.held.pop(job.id, None)  # its save gave the claim up

    def lost(self, job: DraftJob) -> None:
        if job.id is not None:
            self.held.pop(job.id, None)

    async def renew_periodically(self) -> None:
        """Every lease_s/3, extend the leases of the held jobs; a job found lost (its lease
        ran out and another worker took it) is let go here, and its next save fails."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            jobs = list(self.held.values())
            if not jobs:
                continue
            lost = await self._io(self._ledger.renew, jobs, self._worker, self._lease_s)
            for job in lost:
                # A terminal save that committed during the renewal gave the claim up itself.
                if job.state in TERMINAL or job.id is None:
                    continue
                if self.held.pop(job.id, None) is not None:
                    log.warning(
                        "%s: lease lost to another worker; this run lets the study go",
                        job.study_ref,
                    )

    def release_all(self) -> None:
        """Give back the claims still held (blocking; the run's I/O threads are gone)."""
        if not self.held:
            return
        jobs = list(self.held.values())
        try:
            released = self._ledger.release(jobs, self._worker)
        except LedgerUnavailableError as exc:
            # Not raised over the run's own outcome: the leases run out by themselves.
            log.warning(
                "could not release %d claimed jobs (%s); others take them after job.lease_s",
                len(jobs),
                exc,
            )
            return
        self.held.clear()
        log.debug("released %d claimed jobs", released)


async def run_pending(
    services: Services,
    pages: Iterable[Sequence[DraftJob]] | None = None,
    *,
    dry_run: bool = False,
    limits: StageLimits | None = None,
) -> RunTally:
    """Drive jobs through fetch → draft → write, each stage bounded.

    ``pages`` None: the jobs are claimed from the ledger (``LedgerStore.claim_page``, as
    ``job.worker_id`` for ``job.lease_s``) as places in the pipeline free up, so other
    workers on the same ledger take other jobs; ``_Claims`` renews and releases them. Given
    ``pages`` (jobs the caller has, no claims) are read one at a time in an I/O thread as
    studies finish. Either way at most ``limits.alive`` jobs are in progress.

    A job another worker took meanwhile (its lease ran out) is dropped with a warning and not
    counted (``RunTally.lost``); the run goes on. A ledger failure cancels the rest and is
    raised.
    """
    limits = limits or StageLimits.of(services)
    tally = RunTally()
    started = time.perf_counter()
    # Threads for blocking I/O (PACS, EHR, ledger); the default executor is sized by CPUs.
    executor = ThreadPoolExecutor(
        max_workers=limits.fetch + limits.write + 2, thread_name_prefix="medvlm-io"
    )
    processes = services.image_processes
    image_pool = (
        ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
        if processes
        else None
    )
    stages = _Stages(services, limits, executor, image_pool)
    alive = asyncio.Semaphore(limits.alive)
    claims = _Claims(services, executor) if pages is None else None
    loop = asyncio.get_running_loop()
    if claims is not None:
        # A run killed on this machine left its studies claimed: take them back now rather
        # than after their leases run out.
        dead = await loop.run_in_executor(
            executor, services.ledger.release_claims_of_dead_workers, socket.gethostname()
        )
        for worker in dead:
            log.warning("took back the studies of %s, a run on this host that is gone", worker)

    async def one(job: DraftJob) -> None:
        try:
            try:
                done = await _process_job(stages, job, dry_run=dry_run)
            except LeaseLostError:
                log.warning("%s: taken by another worker (lease ran out); dropped", job.study_ref)
                tally.lost.append(job.study_ref)
                if claims is not None:
                    claims.lost(job)
                return
            tally.record(done)
            if claims is not None:
                claims.finished(done)
        finally:
            alive.release()

    try:
        async with asyncio.TaskGroup() as group:
            if claims is not None:
                renewing = group.create_task(claims.renew_periodically())
                while stages.outage is None and (page := await claims.next_page(alive)):
                    for job in page:
                        group.create_task(one(job))  # its place in ``alive`` is taken
                for _ in range(limits.alive):  # every job done
                    await alive.acquire()
                renewing.cancel()
            else:
                page_iterator = iter(pages or ())
                while (
                    stages.outage is None
                    and (given := await loop.run_in_executor(executor, next, page_iterator, None))
                    is not None
                ):
                    for job in given:
                        await alive.acquire()
                        group.create_task(one(job))
    except BaseExceptionGroup as failed:
        errors: list[BaseException] = list(failed.exceptions)
        raise next((e for e in errors if isinstance(e, _STOPS_RUN)), errors[0]) from None
    finally:
        try:
            await services.drafter.aclose()
        finally:
            executor.shutdown(wait=True)
            if image_pool is not None:
                image_pool.shutdown(wait=True, cancel_futures=True)
            if claims is not None:
                claims.release_all()
    tally.wall_s = time.perf_counter() - started
    stages.settle()
    tally.model_busy_s = stages.model_busy_s
    tally.completion_tokens = stages.completion_tokens
    if stages.outage is not None:
        tally.outage = str(stages.outage)
        log.error("run ended early: %s; the studies not done stay pending", stages.outage)
    return tally


async def process_chunk(
    services: Services, jobs: Sequence[DraftJob], *, dry_run: bool = False
) -> list[DraftJob]:
    """Process these jobs (one page) with the run's stage limits; returns them updated."""
    await run_pending(services, [jobs], dry_run=dry_run)
    return list(jobs)


def pending_pages(services: Services) -> Iterator[list[DraftJob]]:
    """The jobs still to do, in keyset pages of ``job.page_size`` (oldest first), unclaimed:
    for a reader that changes nothing (a run claims its jobs: ``run_pending``).

    A job finished or failed meanwhile is behind the cursor and is not read again.
    """
    return services.ledger.pending_pages(services.model.version, page_size=services.job.page_size)


def has_pending(services: Services) -> bool:
    """Whether any job of the model version is left to do (one indexed read)."""
    return bool(services.ledger.pending_page(services.model.version, limit=1))


def summarize(services: Services, discovered: int, tally: RunTally) -> RunSummary:
    """The ledger's counts per state (one aggregate query) with this run's failures, skips
    and flags."""
    return RunSummary(
        services.model.version,
        discovered,
        tally.attempted,
        {state.value: n for state, n in services.ledger.counts(services.model.version).items()},
        failures=tally.failures,
        skipped=tally.skipped,
        flags=tally.flags,
        tally=tally,
    )


def run_draft_job(
    services: Services,
    query: StudyQuery | None,
    dry_run: bool = False,
    *,
    discover_step: Callable[[Services, StudyQuery | None], int] | None = None,
    drafting_step: Callable[[Services, bool], RunTally] | None = None,
) -> RunSummary:
    """The main job as plain code: discover, drive the pending jobs through the stages, summarize.

    The Prefect flow passes its tasks as the steps; tests call this directly. A PACS down for
    longer than discovery waits (``discover``) ends the run there: ``RunTally.outage``.
    """
    try:
        discovered = (discover_step or (lambda s, q: len(discover(s, q))))(services, query)
    except ServiceDownError as down:  # the PACS stayed down: end here, nothing failed
        return summarize(services, 0, discovery_outage(down))
    tally = (drafting_step or draft_pending)(services, dry_run)
    return summarize(services, discovered, tally)


def draft_pending(services: Services, dry_run: bool = False) -> RunTally:
    """Every pending job of the model version that no other worker holds, claimed as the
    pipeline takes them, through one bounded pipeline."""
    return asyncio.run(run_pending(services, dry_run=dry_run))
