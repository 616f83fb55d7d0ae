"""The main job end to end: real Orthanc, real FHIR server, Ray Serve + vLLM, Prefect.

Each test gets its own cohort (a unique study date and prefix), so tests do not see each
other's studies on the shared servers.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from connectors.dicomweb import DicomWebSource
from connectors.factory import build_image_source
from connectors.fhir import FhirEhr, build_http_client
from connectors.ledger_store import LedgerStore, open_engine
from connectors.pacs import StudyQuery
from flows.deployments import draft_reports
from flows.draft_reports import FLAG_NO_ORDER, Services
from medvlm.dev.sample_cohort import (
    ACCESSION_SYSTEM,
    MRN_SYSTEM,
    SEX_BY_CASE,
    SampleCase,
    sample_cohort,
)
from medvlm.dev.sample_data import CHEST_RADIOGRAPH, sample_file
from medvlm.dev.servers import OrthancInfo
from medvlm.dev.synthetic_dicom import make_study
from medvlm.settings import EhrSettings, JobSettings, MedvlmSettings, PacsSettings
from pipeline.fairness_types import ATTRIBUTES
from pipeline.fhir_resources import ModelIdentity
from pipeline.ledger import JobState
from pipeline.subgroups import age_band
from serving.clients import HandleDrafter, HttpDrafter

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class World:
    cases: list[SampleCase]
    broken_uid: str
    study_date: dt.date
    pacs: PacsSettings
    ehr_settings: EhrSettings
    ehr: FhirEhr
    job: JobSettings
    ledger_url: str

    @property
    def query(self) -> StudyQuery:
        return StudyQuery(date_from=self.study_date, date_to=self.study_date)

    def services(self, drafter: Any, source: Any) -> Services:
        return Services(
            source=source,
            ehr=self.ehr,
            drafter=drafter,
            ledger=LedgerStore(open_engine(self.ledger_url)),
            model=ModelIdentity(name="tiny-qwen2-vl", version="test-1", weights_sha256="0" * 64),
            job=self.job,
            max_images=2,
            patient_identifier_system=MRN_SYSTEM,
        )


@pytest.fixture
def world(
    orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path, prefect_api: None
) -> Iterator[World]:
    # A date of its own, decades back: other tests' new-study watermarks start from today and
    # must not see these studies as newer than theirs.
    study_date = dt.date(1950, 1, 1) + dt.timedelta(days=random.randrange(10_000))
    prefix = uuid.uuid4().hex[:6].upper()
    chest = pydicom.dcmread(sample_file(CHEST_RADIOGRAPH))
    cases = sample_cohort(chest, prefix=prefix, study_date=study_date)
    # One study whose pixels cannot be decoded: truncated pixel data.
    broken = make_study("CR", seed=99, accession=f"ACC-{prefix}-BAD", patient_id=f"SYN-{prefix}")
    for ds in broken:
        ds.StudyDate = study_date.strftime("%Y%m%d")
        ds.PixelData = ds.PixelData[:64]
    pacs = orthanc.pacs_settings()
    source = build_image_source(pacs)
    assert isinstance(source, DicomWebSource)
    try:
        for case in cases:
            assert source.store(case.datasets).failed == ()
        assert source.store(broken).failed == ()
    finally:
        source.close()
    ehr_settings = EhrSettings.model_validate(
        {"kind": "fhir", "base_url": fhir_base_url, "accession_system": ACCESSION_SYSTEM}
    )
    client = build_http_client(ehr_settings)
    ehr = FhirEhr(client, ehr_settings)
    for case in cases:
        assert case.bundle is not None
        ehr.transaction(Bundle.model_validate(case.bundle))
    yield World(
        cases=cases,
        broken_uid=str(broken[0].StudyInstanceUID),
        study_date=study_date,
        pacs=pacs,
        ehr_settings=ehr_settings,
        ehr=ehr,
        job=JobSettings(
            max_attempts=2,
            page_size=2,
            concurrency=2,
            identifier_system=f"urn:medvlm-test:{prefix}",
        ),
        ledger_url=f"sqlite:///{tmp_path / 'ledger.db'}",
    )
    client.close()


def _run(world: World, drafter: Any) -> Any:
    source = build_image_source(world.pacs)
    try:
        return draft_reports(world.services(drafter, source), world.query)
    finally:
        source.close()


def _reports_on_server(world: World, fhir_base_url: str) -> list[dict[str, Any]]:
    """Every DiagnosticReport with this test's identifier system, read back from the server."""
    store = LedgerStore(open_engine(world.ledger_url))
    found = []
    with httpx.Client(base_url=fhir_base_url, timeout=30) as client:
        for job in store.jobs("test-1"):
            if job.draft_id is None:
                continue
            bundle = client.get(
                "/DiagnosticReport",
                params={"identifier": f"{world.job.identifier_system}|{job.draft_id}"},
            ).json()
            found += [e["resource"] for e in bundle.get("entry", [])]
    return found


def test_batch_drafts_every_study_and_records_the_undecodable_one(
    world: World, serve_handle: Any, fhir_base_url: str
) -> None:
    summary = _run(world, HandleDrafter(serve_handle))
    ledger = LedgerStore(open_engine(world.ledger_url))
    jobs = {job.study_uid: job for job in ledger.jobs("test-1")}
    assert summary.discovered == len(world.cases) + 1

    broken = jobs[world.broken_uid]
    assert broken.state is JobState.FAILED
    # Truncated pixel data: the PACS payload no longer parses (or, where it does, the pixels
    # do not decode); either way the reason names the study, not the patient.
    assert broken.reason is not None and broken.reason.startswith(broken.study_ref)
    assert "malformed" in broken.reason or "cannot be decoded" in broken.reason
    for case in world.cases:
        assert jobs[case.study_uid].state is JobState.WRITTEN, jobs[case.study_uid].reason

    reports = _reports_on_server(world, fhir_base_url)
    assert len(reports) == len(world.cases)
    with httpx.Client(base_url=fhir_base_url, timeout=30) as client:
        for report in reports:
            assert report["status"] == "preliminary"
            assert report["meta"]["security"][0]["code"] == "AIAST"
            assert report["subject"]["reference"].startswith("Patient/")
            assert report["imagingStudy"][0]["reference"].startswith("ImagingStudy/")
            provenance = client.get(
                "/Provenance", params={"target": f"DiagnosticReport/{report['id']}"}
            ).json()
            (entry,) = provenance["entry"]
            who = entry["resource"]["agent"][0]["who"]["reference"]
            assert who.startswith("Device/")
            device = client.get(f"/{who}").json()
            assert device["version"][0]["value"] == "test-1"
    with_order = [r for r in reports if "basedOn" in r]
    assert len(with_order) == len(world.cases) - 1  # the US case has no order
    flagged = [job for job in jobs.values() if FLAG_NO_ORDER in job.flags]
    assert [job.study_uid for job in flagged] == [world.cases[-1].study_uid]
    # Fairness attributes captured at draft time: the EHR's sex, an age band (no birth date).
    for i, case in enumerate(world.cases):
        groups = jobs[case.study_uid].subgroups
        assert groups["sex"] == SEX_BY_CASE[i % len(SEX_BY_CASE)]
        born = dt.date(1950 + 7 * i, 1, 1)
        assert groups["age_band"] == age_band(born, world.study_date)
        assert groups["modality"] == str(case.datasets[0].Modality)
        assert set(groups) == set(ATTRIBUTES)


def test_second_run_creates_nothing_new_and_dead_letters_the_broken_study(
    world: World, serve_handle: Any, fhir_base_url: str
) -> None:
    _run(world, HandleDrafter(serve_handle))
    first = sorted(r["id"] for r in _reports_on_server(world, fhir_base_url))
    summary = _run(world, HandleDrafter(serve_handle))
    again = sorted(r["id"] for r in _reports_on_server(world, fhir_base_url))
    assert again == first
    assert summary.attempted == 1  # only the broken study was pending
    assert summary.counts["dead_lettered"] == 1
    assert summary.counts["written"] == len(world.cases)


KILLABLE_RUN = textwrap.dedent(
    """
    import asyncio, json, sys
    import httpx
    from connectors.fhir import FhirEhr, build_http_client
    from connectors.ledger_store import LedgerStore, open_engine
    from connectors.factory import build_image_source
    from connectors.pacs import StudyQuery
    from flows.draft_reports import Services, process_chunk, discover
    from medvlm.settings import EhrSettings, JobSettings, PacsSettings
    from pipeline.fhir_resources import ModelIdentity
    from serving.clients import HttpDrafter

    args = json.loads(sys.argv[1])
    async def main():
        ehr_settings = EhrSettings.model_validate(args["ehr"])
        ehr = FhirEhr(build_http_client(ehr_settings), ehr_settings)
        async with httpx.AsyncClient() as client:
            services = Services(
                source=build_image_source(PacsSettings.model_validate(args["pacs"])),
                ehr=ehr,
                drafter=HttpDrafter(client, args["serve_url"], api_key=args["api_key"]),
                ledger=LedgerStore(open_engine(args["ledger_url"])),
                model=ModelIdentity("tiny-qwen2-vl", "test-1", "0" * 64),
                job=JobSettings.model_validate(args["job"]),
                max_images=2,
                patient_identifier_system=args["mrn_system"],
            )
            import datetime as dt
            day = dt.date.fromisoformat(args["date"])
            discover(services, StudyQuery(date_from=day, date_to=day))
            pending = services.ledger.pending("test-1")
            for start in range(0, len(pending), 1):
                await process_chunk(services, pending[start:start + 1])
    asyncio.run(main())
    """
)


def test_killed_worker_resumes_with_zero_duplicates(
    world: World,
    serve_handle: Any,
    serve_url: str,
    settings: MedvlmSettings,
    fhir_base_url: str,
) -> None:
    import json

    assert settings.serving.api_key is not None
    args = {
        "ehr": world.ehr_settings.model_dump(mode="json"),
        "pacs": {
            **world.pacs.model_dump(mode="json"),
            "password": world.pacs.password.get_secret_value(),
        },  # type: ignore[union-attr]
        "serve_url": serve_url,
        "api_key": settings.serving.api_key.get_secret_value(),
        "ledger_url": world.ledger_url,
        "job": world.job.model_dump(mode="json"),
        "mrn_system": MRN_SYSTEM,
        "date": world.study_date.isoformat(),
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_RUN, json.dumps(args)],
        env={**os.environ},
        start_new_session=True,
    )
    ledger = LedgerStore(open_engine(world.ledger_url))
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            written = ledger.counts("test-1")[JobState.WRITTEN] if ledger.jobs("test-1") else 0
            if written >= 1:
                break
            assert worker.poll() is None, "worker ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("worker wrote nothing in time")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    counts = ledger.counts("test-1")
    assert counts[JobState.WRITTEN] < len(world.cases), "killed too late to prove anything"

    summary = _run(world, HandleDrafter(serve_handle))
    assert summary.counts["written"] == len(world.cases)
    reports = _reports_on_server(world, fhir_base_url)
    assert len(reports) == len(world.cases)
    assert len({r["id"] for r in reports}) == len(world.cases)


def test_http_drafter_backend_runs_the_same_flow(
    world: World, serve_url: str, settings: MedvlmSettings
) -> None:
    assert settings.serving.api_key is not None
    drafter = HttpDrafter(None, serve_url, api_key=settings.serving.api_key.get_secret_value())
    summary = _run(world, drafter)
    assert summary.counts["written"] == len(world.cases)
