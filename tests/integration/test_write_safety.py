"""Clinically safe write-back, against the real FHIR server, Orthanc and the real model.

No draft on an order that is already signed (checked before drafting and again right before the
write, also on resume), none on a patient the images do not belong to, no answer in the prompt,
nothing for objects that are not images, one bad study never stops the others, and the study's
clinical time in the right zone. Writes are counted by a loopback proxy in front of the real
FHIR server (tests/integration/loopback.py).
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from connectors.dicomweb import DicomWebSource
from connectors.factory import build_image_source
from connectors.fhir import FhirEhr, build_http_client
from connectors.ledger_store import LedgerStore, open_engine
from connectors.pacs import StudyQuery
from flows.draft_reports import RunSummary, Services, run_draft_job
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM, ehr_bundle
from medvlm.dev.servers import OrthancInfo
from medvlm.dev.synthetic_dicom import make_study
from medvlm.settings import EhrSettings, JobSettings
from pipeline.fhir_resources import ModelIdentity
from pipeline.imaging import study_reference
from pipeline.ledger import DraftJob, JobState
from pipeline.prompts import ModelInput, context_text
from pipeline.report import DraftResult
from serving.clients import HandleDrafter
from tests.integration.loopback import FhirProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VERSION = "safety-1"


class WatchingDrafter:
    """The real model (through its Serve handle), with the inputs it was given recorded.

    ``fail_for``: references for which an unexpected exception is raised instead: a fault the
    real model cannot be made to produce on demand (a bug in a backend).
    """

    def __init__(self, inner: HandleDrafter, fail_for: frozenset[str] = frozenset()) -> None:
        self.inner = inner
        self.fail_for = fail_for
        self.inputs: dict[str, ModelInput] = {}

    async def draft(self, model_input: ModelInput) -> DraftResult:
        self.inputs[model_input.reference] = model_input
        if model_input.reference in self.fail_for:
            raise RuntimeError("a backend bug")
        return await self.inner.draft(model_input)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Site:
    """One test's studies in the real Orthanc and records in the real FHIR server."""

    orthanc: OrthancInfo
    fhir_base_url: str
    proxy: FhirProxy
    ledger_url: str
    study_date: dt.date
    prefix: str
    draft_system: str
    accessions: list[str] = field(default_factory=list)
    version: str = VERSION

    def add(
        self,
        *,
        image_patient_id: str | None = None,
        change: Callable[[Dataset], None] | None = None,
        datasets: list[Dataset] | None = None,
        earlier_prior: bool = False,
    ) -> str:
        """A CR study (or ``datasets``) and its patient, order, condition and priors; returns
        its Study Instance UID."""
        i = len(self.accessions)
        mrn, accession = f"SYN-{self.prefix}-{i:03d}", f"ACC-{self.prefix}-{i:02d}"
        studies = datasets or make_study(
            "CR",
            seed=random.randrange(10**6),
            accession=accession,
            patient_id=image_patient_id or mrn,
            study_date=self.study_date,
        )
        study_uid = pydicom.uid.generate_uid()
        for ds in studies:
            ds.StudyInstanceUID = study_uid
            ds.AccessionNumber = accession
            ds.PatientID = image_patient_id or mrn
            ds.StudyDate = self.study_date.strftime("%Y%m%d")
            if change is not None:
                change(ds)
        bundle = ehr_bundle(
            mrn=mrn,
            accession=accession,
            study_uid=study_uid,
            modality="CR",
            reason="Cough",
            condition="Asthma",
            # Dated 2023: after these studies (their dates are decades back).
            prior_impression=f"LATER PRIOR {self.prefix}-{i}.",
            sex="female",
            birth_date="1930-01-01",
        )
        with self.ehr() as ehr:
            ehr.transaction(Bundle.model_validate(bundle))
            if earlier_prior:
                self.post(
                    ehr,
                    self.report(accession, "earlier", "1949-06-01T09:00:00Z", "EARLIER PRIOR."),
                    mrn,
                )
        source = build_image_source(self.orthanc.pacs_settings())
        assert isinstance(source, DicomWebSource)
        try:
            assert source.store(studies).failed == ()
        finally:
            source.close()
        self.accessions.append(accession)
        return study_uid

    @staticmethod
    def report(accession: str, key: str, when: str, conclusion: str) -> dict[str, Any]:
        return {
            "resourceType": "DiagnosticReport",
            "identifier": [{"system": "urn:medvlm-test:signed", "value": f"{accession}-{key}"}],
            "status": "final",
            "category": [{"coding": [{"system": "http://loinc.org", "code": "LP29684-5"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
            "effectiveDateTime": when,
            "conclusion": conclusion,
        }

    def post(self, ehr: FhirEhr, report: dict[str, Any], mrn: str) -> None:
        patient = ehr.find_patient(mrn, MRN_SYSTEM)
        assert patient is not None
        report = report | {"subject": {"reference": f"Patient/{patient.id}"}}
        with httpx.Client(base_url=self.fhir_base_url, timeout=30, trust_env=False) as client:
            client.post("/DiagnosticReport", json=report).raise_for_status()

    def sign(self, accession: str, conclusion: str = "THE SIGNED ANSWER.") -> None:
        """The radiologist signs the order: a final report based on it."""
        with self.ehr() as ehr:
            order = ehr.find_service_request(accession)
            assert order is not None and order.subject is not None
            report = self.report(accession, "signed", "2026-11-02T12:00:00Z", conclusion) | {
                "basedOn": [{"reference": f"ServiceRequest/{order.id}"}],
                "subject": {"reference": order.subject.reference},
            }
            with httpx.Client(base_url=self.fhir_base_url, timeout=30, trust_env=False) as c:
                c.post("/DiagnosticReport", json=report).raise_for_status()

    def ehr(self, base_url: str | None = None, **settings: Any) -> _OpenEhr:
        return _OpenEhr(base_url or self.fhir_base_url, **settings)

    def run(
        self,
        drafter: Any,
        *,
        dry_run: bool = False,
        ehr_settings: dict[str, Any] | None = None,
        pacs_settings: dict[str, Any] | None = None,
        on_progress: Callable[[DraftJob], None] | None = None,
        **job: Any,
    ) -> RunSummary:
        source = build_image_source(self.orthanc.pacs_settings(**(pacs_settings or {})))
        try:
            with self.ehr(self.proxy.base_url, **(ehr_settings or {})) as ehr:
                services = Services(
                    source=source,
                    ehr=ehr,
                    drafter=drafter,
                    ledger=LedgerStore(open_engine(self.ledger_url)),
                    model=ModelIdentity("tiny-qwen2-vl", self.version, random_weights=True),
                    job=JobSettings.model_validate(
                        {"identifier_system": self.draft_system, "max_attempts": 2, **job}
                    ),
                    max_images=2,
                    patient_identifier_system=MRN_SYSTEM,
                    accession_system=ACCESSION_SYSTEM,
                    site_timezone=ZoneInfo("Europe/Berlin"),
                    on_progress=on_progress,
                )
                query = StudyQuery(date_from=self.study_date, date_to=self.study_date)
                return run_draft_job(services, query, dry_run)
        finally:
            source.close()

    def job(self, study_uid: str) -> DraftJob:
        (job,) = LedgerStore(open_engine(self.ledger_url)).jobs(self.version, [study_uid])
        return job

    def drafts_on_server(self) -> list[dict[str, Any]]:
        """Every resource the pipeline wrote for this test's drafts, read from the server."""
        found = []
        jobs = LedgerStore(open_engine(self.ledger_url)).jobs(self.version)
        with httpx.Client(base_url=self.fhir_base_url, timeout=30, trust_env=False) as client:
            for draft_id in {job.draft_id for job in jobs if job.draft_id}:
                for rtype in ("DiagnosticReport", "Observation", "Provenance"):
                    bundle = client.get(
                        f"/{rtype}", params={"_tag": f"{self.draft_system}|{draft_id}"}
                    ).json()
                    found += [e["resource"] for e in bundle.get("entry", [])]
        return found


class _OpenEhr:
    def __init__(self, base_url: str, **settings: Any) -> None:
        self.settings = EhrSettings.model_validate(
            {
                "kind": "fhir",
                "base_url": base_url,
                "accession_system": ACCESSION_SYSTEM,
                **settings,
            }
        )

    def __enter__(self) -> FhirEhr:
        self.client = build_http_client(self.settings)
        return FhirEhr(self.client, self.settings)

    def __exit__(self, *exc: object) -> None:
        self.client.close()


@contextmanager
def open_site(
    orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path, **fields: Any
) -> Iterator[Site]:
    """A test's own site: a date of its own, decades back (see test_draft_flow.py),
    identifiers of its own, and a proxy in front of the real FHIR server."""
    study_date = dt.date(1950, 1, 1) + dt.timedelta(days=random.randrange(10_000))
    prefix = uuid.uuid4().hex[:6].upper()
    with FhirProxy(fhir_base_url) as proxy:
        yield Site(
            orthanc,
            fhir_base_url,
            proxy,
            f"sqlite:///{tmp_path / 'ledger.db'}",
            study_date,
            prefix,
            f"urn:medvlm-test:{prefix}",
            **{key: value(prefix) if callable(value) else value for key, value in fields.items()},
        )


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path) as opened:
        yield opened


@pytest.fixture
def model(serve_handle: Any) -> WatchingDrafter:
    return WatchingDrafter(HandleDrafter(serve_handle))


def test_a_signed_order_is_skipped_with_zero_writes(site: Site, model: WatchingDrafter) -> None:
    study = site.add()
    site.sign(site.accessions[0])
    summary = site.run(model)
    job = site.job(study)
    assert job.state is JobState.SKIPPED and job.attempts == 0
    assert (job.reason or "").startswith("signed-before-draft: DiagnosticReport/")
    assert site.proxy.writes == [] and site.drafts_on_server() == []
    # Never drafted: the model never saw the study, let alone its signed report.
    assert model.inputs == {}
    assert summary.skipped == [(job.study_ref, job.reason)] and not summary.failures


def test_an_order_signed_after_drafting_is_skipped_when_the_draft_would_be_written(
    site: Site, model: WatchingDrafter
) -> None:
    study = site.add()
    site.run(model, dry_run=True)
    assert site.job(study).state is JobState.DRAFTED
    site.sign(site.accessions[0])
    site.run(model)
    job = site.job(study)
    assert job.state is JobState.SKIPPED and (job.reason or "").startswith("signed-before-draft")
    assert site.proxy.writes == [] and site.drafts_on_server() == []


def test_images_of_another_patient_are_never_written_on_this_order(
    site: Site, model: WatchingDrafter
) -> None:
    study = site.add(image_patient_id=f"SYN-{site.prefix}-OTHER")
    site.run(model)
    job = site.job(study)
    assert job.state is JobState.SKIPPED
    assert job.reason == "patient-mismatch: PatientID matches no Patient.identifier"
    assert site.proxy.writes == [] and site.drafts_on_server() == []


def test_the_prompt_holds_priors_from_before_the_study_and_nothing_later(
    site: Site, model: WatchingDrafter
) -> None:
    study = site.add(earlier_prior=True)
    site.run(model)
    assert site.job(study).state is JobState.WRITTEN
    text = context_text(model.inputs[study_reference(study)].context)
    assert "EARLIER PRIOR." in text
    assert "LATER PRIOR" not in text  # the 2023 report postdates this study
    sources = site.job(study).context_sources
    assert sum(s.startswith("DiagnosticReport/") for s in sources) == 1


def test_an_unexpected_exception_fails_one_study_and_the_other_four_are_written(
    site: Site, serve_handle: Any
) -> None:
    studies = [site.add() for _ in range(5)]
    drafter = WatchingDrafter(
        HandleDrafter(serve_handle), fail_for=frozenset({study_reference(studies[2])})
    )
    summary = site.run(drafter, page_size=5, concurrency=5)
    assert summary.counts["written"] == 4 and summary.counts["failed"] == 1
    assert len(summary.failures) == 1  # what makes `medvlm run` exit with code 3
    failed = site.job(studies[2])
    assert failed.error_type == "RuntimeError" and failed.attempts == 1
    assert "unexpected RuntimeError" in (failed.reason or "")
    reports = [r for r in site.drafts_on_server() if r["resourceType"] == "DiagnosticReport"]
    assert len(reports) == 4


def test_legacy_study_time_with_an_offset_is_drafted_at_the_right_instant(
    site: Site, model: WatchingDrafter
) -> None:
    def legacy(ds: Dataset) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ds.StudyTime = "10:15:00"  # written with colons by old modalities
        ds.TimezoneOffsetFromUTC = "+0100"

    study = site.add(change=legacy)
    site.run(model)
    job = site.job(study)
    assert job.state is JobState.WRITTEN, job.reason
    (report,) = [r for r in site.drafts_on_server() if r["resourceType"] == "DiagnosticReport"]
    assert report["effectiveDateTime"] == f"{site.study_date.isoformat()}T10:15:00+01:00"
    # A later run over another window is unaffected by it.
    other = Site(**{**site.__dict__, "accessions": [], "study_date": dt.date(1949, 12, 31)})
    other_study = other.add()
    other.run(model)
    assert other.job(other_study).state is JobState.WRITTEN


def _segmentation(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.Modality = "SEG"


def test_segmentations_and_dose_grids_are_skipped_with_their_reasons(
    site: Site, model: WatchingDrafter
) -> None:
    seg = site.add(change=_segmentation)
    dose = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    dose.SeriesInstanceUID = pydicom.uid.generate_uid()
    dose.SOPInstanceUID = dose.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    rtdose = site.add(datasets=[dose])
    site.run(model)
    assert site.job(seg).reason == "not-reportable: Segmentation Storage (SEG) ×1"
    assert site.job(rtdose).reason == "not-reportable: RT Dose Storage (RTDOSE) ×1"
    assert {site.job(seg).state, site.job(rtdose).state} == {JobState.SKIPPED}
    assert model.inputs == {} and site.proxy.writes == [] and site.drafts_on_server() == []
