"""The fairness monitor end to end: ledger → signed reports in a real FHIR server → Prefect flow.

Drafts are planted in the ledger directly (the drafting itself is the main job's tests); the
signed reports are real DiagnosticReports (status final) in the session's FHIR server, found by
the monitor through the orders the drafts point to.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.measurereport import MeasureReport
from fhir.resources.R4B.patient import Patient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from sqlmodel import Session
from typer.testing import CliRunner

from connectors.fhir import FhirEhr, build_http_client
from connectors.ledger_store import LedgerStore, open_engine
from flows.fairness import FairnessServices, fairness_monitor
from medvlm.settings import EhrSettings, FairnessSettings
from pipeline.fairness_fhir import parse_alerts
from pipeline.ledger import DraftJob, FairnessRun, JobState, SignedReportLabels
from tests.fairness_data import WINDOW_END, WINDOW_START, Case, cohort, created_at

pytestmark = [pytest.mark.integration]

ACCESSION_SYSTEM = "urn:medvlm-test:accession"
UNSIGNED_EVERY = 10  # every 10th study has no signed report yet


@dataclass
class Cohort:
    ledger_url: str
    system: str
    shift: dt.timedelta
    signed: int

    @property
    def window(self) -> tuple[dt.datetime, dt.datetime]:
        return WINDOW_START + self.shift, WINDOW_END + self.shift


def _entry(resource: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{key}",
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }


def _load(
    cases: list[Case], ehr: FhirEhr, ledger: LedgerStore, prefix: str, shift: dt.timedelta
) -> int:
    """Orders and signed reports into the FHIR server; one written draft per case in the ledger."""
    patient = Patient.model_validate(
        {"resourceType": "Patient", "identifier": [{"system": "urn:t", "value": prefix}]}
    )
    assert patient.identifier is not None
    ref = f"Patient/{ehr.conditional_create(patient, patient.identifier[0]).resource.id}"
    subject = {"reference": ref}
    signed = 0
    jobs: list[DraftJob] = []
    for start in range(0, len(cases), 60):
        chunk = cases[start : start + 60]
        entries: list[dict[str, Any]] = []
        for case in chunk:
            order_key = str(uuid.uuid4())
            entries.append(
                _entry(
                    {
                        "resourceType": "ServiceRequest",
                        "status": "completed",
                        "intent": "order",
                        "identifier": [
                            {"system": ACCESSION_SYSTEM, "value": f"{prefix}-{case.index}"}
                        ],
                        "subject": subject,
                    },
                    order_key,
                )
            )
            if case.index % UNSIGNED_EVERY == 0:
                continue
            signed += 1
            entries.append(
                _entry(
                    {
                        "resourceType": "DiagnosticReport",
                        "status": "final",
                        "code": {"text": "XR chest"},
                        "subject": subject,
                        "basedOn": [{"reference": f"urn:uuid:{order_key}"}],
                        "issued": "2026-11-01T08:00:00Z",
                        "conclusion": case.signed_text,
                    },
                    str(uuid.uuid4()),
                )
            )
        response = ehr.transaction(
            Bundle.model_validate(
                {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            )
        )
        locations = [str(e.response.location) for e in response.entry or [] if e.response]
        orders = [loc for loc in locations if "ServiceRequest/" in loc]
        assert len(orders) == len(chunk), locations[:3]
        for case, location in zip(chunk, orders, strict=True):
            order = "ServiceRequest/" + location.split("ServiceRequest/")[1].split("/")[0]
            job = DraftJob(
                study_uid=f"2.25.{uuid.uuid4().int}",
                study_ref=f"study-{prefix}-{case.index}",
                accession_number=f"{prefix}-{case.index}",
                model_version="tiny-1",
                state=JobState.WRITTEN,
                links={"service_request": order, "patient": ref},
                subgroups=case.subgroups,
                draft=case.draft.model_dump(mode="json"),
                timings={"draft_s": 1.5},
                created_at=created_at(case) + shift,
            )
            jobs.append(job)
    ledger.save(jobs)
    return signed


@pytest.fixture
def ehr(fhir_base_url: str) -> Iterator[FhirEhr]:
    settings = EhrSettings.model_validate(
        {"kind": "fhir", "base_url": fhir_base_url, "accession_system": ACCESSION_SYSTEM}
    )
    client = build_http_client(settings)
    yield FhirEhr(client, settings)
    client.close()


def _cohort(ehr: FhirEhr, tmp_path: Path, *, planted: bool, shift_days: int) -> Cohort:
    prefix = uuid.uuid4().hex[:8]
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    shift = dt.timedelta(days=shift_days)
    cases = cohort(planted=planted, per_group=100)
    signed = _load(cases, ehr, LedgerStore(open_engine(ledger_url)), prefix, shift)
    return Cohort(ledger_url, f"urn:medvlm-test:{prefix}", shift, signed)


def _services(ehr: FhirEhr, world: Cohort, tmp_path: Path) -> FairnessServices:
    return FairnessServices(
        ledger=LedgerStore(open_engine(world.ledger_url)),
        ehr=ehr,
        settings=FairnessSettings(
            n_boot=200, trend_windows=2, min_group_size=30, report_dir=tmp_path / "reports"
        ),
        identifier_system=world.system,
    )


def test_planted_disparity_alerts_and_the_measure_report_lands_once(
    ehr: FhirEhr,
    tmp_path: Path,
    fhir_base_url: str,
    prefect_api: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = _cohort(ehr, tmp_path, planted=True, shift_days=0)
    services = _services(ehr, world, tmp_path)
    with caplog.at_level(logging.ERROR):
        outcome = fairness_monitor(services, *world.window)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("fairness alert" in m and "sex=female" in m for m in errors)
    assert len(outcome.alert_events) == len(outcome.alerts)  # one Prefect event per alert
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["draft-fairness"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert "sex=female" in str(artifact.data)

    report = outcome.report
    assert report.with_final_report == world.signed < report.drafted
    assert outcome.alerted
    assert any("underdiagnosis_rate" in a and "sex=female" in a for a in outcome.alerts)
    html = outcome.html_path.read_text()
    assert "sex=female" in html and "<svg" in html

    assert outcome.measure_report_id is not None
    with httpx.Client(base_url=fhir_base_url, timeout=30) as client:
        stored = client.get(f"/MeasureReport/{outcome.measure_report_id}")
        assert stored.status_code == 200
        measure = MeasureReport.model_validate(stored.json())
        assert measure.status == "complete" and measure.type == "summary"
        assert parse_alerts(measure) == outcome.alerts
        assert {g.code.coding[0].code for g in measure.group or []} >= {"underdiagnosis_rate"}
        # Its measure canonical (url|version) resolves to the one Measure the flow wrote, found
        # by the tag it was written under (this server searches Measure by _tag, not by url).
        url, version = measure.measure.split("|")
        tag_measure = f"{world.system}:fairness-measure|{version}"
        definitions = client.get("/Measure", params={"_tag": tag_measure}).json().get("entry", [])
        assert [(e["resource"]["url"], e["resource"]["version"]) for e in definitions] == [
            (url, version)
        ]

        # Re-running the same window: the same MeasureReport (no duplicate), labels from cache.
        again = fairness_monitor(services, *world.window)
        assert again.measure_report_id == outcome.measure_report_id
        assert again.alerts == outcome.alerts
        # Even when the ledger lost its record (a crash after the EHR committed), the writer's
        # look-up of the run's tag finds the one already written (this server lists no
        # conditional create for MeasureReport: the write is a search, then a plain create).
        identifier = measure.identifier[0]
        with Session(open_engine(world.ledger_url)) as session:
            session.delete(session.get(FairnessRun, identifier.value))
            session.commit()
        third = fairness_monitor(services, *world.window)
        assert third.measure_report_id == outcome.measure_report_id
        (tag,) = measure.meta.tag
        found = client.get("/MeasureReport", params={"_tag": f"{tag.system}|{tag.code}"}).json()
        assert len(found.get("entry", [])) == 1
        # Three runs, one Measure.
        again_definitions = client.get("/Measure", params={"_tag": tag_measure}).json()
        assert len(again_definitions.get("entry", [])) == 1
    cached = services.ledger.signed_labels(
        [j.study_uid for j in services.ledger.jobs("tiny-1")], "rules-v1"
    )
    assert len(cached) == world.signed
    assert all(isinstance(row, SignedReportLabels) for row in cached.values())


def _cli_environment(
    monkeypatch: pytest.MonkeyPatch, home: Path, fhir_base_url: str, world: Cohort, **extra: str
) -> None:
    """Settings for ``medvlm fairness`` from the environment, as an operator would set them."""
    for key, value in {
        "MEDVLM_HOME": str(home),
        "MEDVLM_EHR__KIND": "fhir",
        "MEDVLM_EHR__BASE_URL": fhir_base_url,
        "MEDVLM_EHR__ACCESSION_SYSTEM": ACCESSION_SYSTEM,
        "MEDVLM_JOB__LEDGER_URL": world.ledger_url,
        "MEDVLM_JOB__IDENTIFIER_SYSTEM": world.system,
        "MEDVLM_FAIRNESS__N_BOOT": "200",
        **extra,
    }.items():
        monkeypatch.setenv(key, value)


def test_no_disparity_no_alert_and_the_cli_exits_zero(
    ehr: FhirEhr,
    tmp_path: Path,
    fhir_base_url: str,
    prefect_api: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medvlm.cli import app

    world = _cohort(ehr, tmp_path, planted=False, shift_days=-400)
    since, until = world.window
    _cli_environment(
        monkeypatch, tmp_path / "home", fhir_base_url, world, MEDVLM_FAIRNESS__TREND_WINDOWS="1"
    )
    result = CliRunner().invoke(
        app, ["fairness", "--since", since.isoformat(), "--until", until.isoformat()]
    )
    assert result.exit_code == 0, result.output
    assert "ALERT" not in result.output and "MeasureReport/" in result.output
    reports = list((tmp_path / "home" / "fairness").glob("fairness-*.html"))
    assert len(reports) == 1 and "No alert rule fired" in reports[0].read_text()


def test_the_cli_exits_3_and_names_the_group_when_a_rule_fires(
    ehr: FhirEhr,
    tmp_path: Path,
    fhir_base_url: str,
    prefect_api: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medvlm.cli import app

    world = _cohort(ehr, tmp_path, planted=True, shift_days=-800)
    since, until = world.window
    _cli_environment(
        monkeypatch,
        tmp_path / "home",
        fhir_base_url,
        world,
        MEDVLM_FAIRNESS__WRITE_MEASURE_REPORT="false",
    )
    result = CliRunner().invoke(
        app, ["fairness", "--since", since.date().isoformat(), "--until", until.isoformat()]
    )
    assert result.exit_code == 3, result.output
    assert "ALERT" in result.output and "sex=female" in result.output
    assert "MeasureReport/" not in result.output
