"""The NDJSON folder EHR: FHIR Bulk Data layout as source and idempotent, atomic sink."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.reference import Reference

from connectors.ehr import Ehr, conditional_entry, parse_resource
from connectors.factory import build_ehr
from connectors.ndjson import NdjsonEhr
from medvlm.errors import EhrConflictError, EhrInvalidResourceError, EhrNotFoundError
from medvlm.settings import EhrSettings

pytestmark = pytest.mark.unit

ACCESSION_SYSTEM = "urn:oid:2.25.1234567890.7"
MRN_SYSTEM = "urn:oid:2.25.1234567890.1"
REPORT_SYSTEM = "urn:oid:2.25.1234567890.8"
SYNTHETIC_NAME = "Synthetica"
ACTIVE = {"coding": [{"code": "active"}]}


def _write(folder: Path, rtype: str, *resources: dict[str, Any]) -> None:
    with (folder / f"{rtype}.ndjson").open("a") as handle:
        for data in resources:
            handle.write(json.dumps({"resourceType": rtype, **data}) + "\n")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A Bulk Data export of one synthetic patient (and one other patient's records)."""
    subject = {"reference": "Patient/SYN-0001"}
    other = {"reference": "Patient/SYN-0002"}
    _write(
        tmp_path,
        "Patient",
        {
            "id": "SYN-0001",
            "identifier": [{"system": MRN_SYSTEM, "value": "SYN-MRN-0001"}],
            "name": [{"family": SYNTHETIC_NAME}],
            "birthDate": "1970-01-01",
        },
        {"id": "SYN-0002", "gender": "male"},
    )
    _write(
        tmp_path,
        "ServiceRequest",
        {
            "id": "SYN-SR-1",
            "identifier": [{"system": ACCESSION_SYSTEM, "value": "SYN-ACC-0001"}],
            "status": "active",
            "intent": "order",
            "subject": subject,
        },
    )
    _write(
        tmp_path,
        "Condition",
        {"id": "SYN-C-1", "clinicalStatus": ACTIVE, "subject": subject},
        {"id": "SYN-C-2", "clinicalStatus": {"coding": [{"code": "resolved"}]}, "subject": subject},
        {"id": "SYN-C-3", "clinicalStatus": ACTIVE, "subject": other},
    )
    code = {"text": "XR chest"}
    _write(
        tmp_path,
        "DiagnosticReport",
        {
            "id": "SYN-DR-1",
            "status": "final",
            "code": code,
            "subject": subject,
            "effectiveDateTime": "2021-01-01",
        },
        {
            "id": "SYN-DR-2",
            "status": "final",
            "code": code,
            "subject": subject,
            "effectiveDateTime": "2024-01-01",
        },
        {"id": "SYN-DR-3", "status": "preliminary", "code": code, "subject": subject},
    )
    _write(
        tmp_path,
        "ImagingStudy",
        {"id": "SYN-IS-1", "status": "available", "subject": subject, "started": "2024-01-01"},
    )
    return tmp_path


def _statuses(bundle: Bundle) -> list[str]:
    return [str(e.response.status) if e.response else "" for e in bundle.entry or []]


def _draft(value: str) -> tuple[DiagnosticReport, Identifier]:
    identifier = Identifier(system=REPORT_SYSTEM, value=value)
    report = DiagnosticReport(
        identifier=[identifier],
        status="preliminary",
        code=CodeableConcept(text="XR chest"),
        subject=Reference(reference="Patient/SYN-0001"),
    )
    return report, identifier


def test_folder_ehr_satisfies_the_protocol_and_is_the_settings_default(folder: Path) -> None:
    ehr = build_ehr(EhrSettings(folder=folder, accession_system=ACCESSION_SYSTEM))
    assert isinstance(ehr, NdjsonEhr) and isinstance(ehr, Ehr)


def test_context_from_folder_has_active_conditions_and_signed_reports(folder: Path) -> None:
    context = NdjsonEhr(folder, accession_system=ACCESSION_SYSTEM).gather_context("SYN-ACC-0001")
    assert context.patient.id == "SYN-0001"
    assert context.service_request is not None and context.service_request.id == "SYN-SR-1"
    assert [c.id for c in context.conditions] == ["SYN-C-1"]
    # Signed reports only (the preliminary one is not); which may be shown is the pipeline's
    # decision (pipeline.context.eligible_priors), not the connector's.
    assert sorted(r.id for r in context.prior_reports) == ["SYN-DR-1", "SYN-DR-2"]
    assert [s.id for s in context.imaging_studies] == ["SYN-IS-1"]


def test_accession_system_setting_restricts_the_match(folder: Path) -> None:
    assert NdjsonEhr(folder).find_service_request("SYN-ACC-0001") is not None
    assert (
        NdjsonEhr(folder, accession_system="urn:other").find_service_request("SYN-ACC-0001") is None
    )


def test_unknown_patient_is_not_found(folder: Path) -> None:
    with pytest.raises(EhrNotFoundError, match="Patient/SYN-9999"):
        NdjsonEhr(folder).read_patient("SYN-9999")


def test_sink_round_trip_and_repeated_writes_are_idempotent(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    report, identifier = _draft("SYN-DRAFT-1")
    first = ehr.conditional_create(report, identifier)
    again = ehr.conditional_create(report, identifier)

    assert first.created and not again.created
    assert again.resource.id == first.resource.id and first.version_id == "1"
    lines = (folder / "DiagnosticReport.ndjson").read_text().splitlines()
    assert sum("SYN-DRAFT-1" in line for line in lines) == 1
    # what the sink wrote, the source reads back (preliminary: not among the final priors)
    stored = next(json.loads(line) for line in lines if "SYN-DRAFT-1" in line)
    assert parse_resource(stored, DiagnosticReport).status == "preliminary"
    assert not list(folder.glob(".*.tmp")), "no temporary files left behind"


def test_concurrent_writers_create_one_resource(folder: Path) -> None:
    report, identifier = _draft("SYN-DRAFT-RACE")
    results = []

    def write() -> None:
        results.append(NdjsonEhr(folder).conditional_create(report, identifier).created)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


def test_replayed_transaction_creates_nothing_new_and_resolves_urn_references(
    folder: Path,
) -> None:
    ehr = NdjsonEhr(folder)
    report, identifier = _draft("SYN-DRAFT-TX")
    mrn = Identifier(system=MRN_SYSTEM, value="SYN-MRN-0003")
    patient = Patient(identifier=[mrn])
    report.subject = Reference(reference="urn:uuid:patient-3")
    bundle = Bundle(
        type="transaction",
        entry=[
            conditional_entry(patient, mrn, "urn:uuid:patient-3"),
            conditional_entry(report, identifier, "urn:uuid:report-3"),
        ],
    )
    first = ehr.transaction(bundle)
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.ndjson")}
    replay = ehr.transaction(bundle)

    assert _statuses(first) == ["201 Created", "201 Created"]
    assert _statuses(replay) == ["200 OK", "200 OK"]
    assert {p.name: p.stat().st_size for p in folder.glob("*.ndjson")} == sizes
    assert first.entry is not None
    written_patient, written_report = (e.resource for e in first.entry)
    assert isinstance(written_patient, Patient) and isinstance(written_report, DiagnosticReport)
    assert written_report.subject is not None
    assert written_report.subject.reference == f"Patient/{written_patient.id}"


def test_update_needs_the_current_version(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    patient = ehr.read_patient("SYN-0002")
    updated = ehr.update(patient, "1")
    assert updated.meta is not None and updated.meta.versionId == "2"
    with pytest.raises(EhrConflictError) as raised:
        ehr.update(patient, "1")
    assert "Patient/SYN-0002" in str(raised.value)


def test_malformed_line_names_file_and_line_not_content(folder: Path) -> None:
    with (folder / "Patient.ndjson").open("a") as handle:
        handle.write('{"resourceType": "Patient", "id": "SYN-0003", "birthDate": "Synthetica"}\n')
        handle.write("{not json " + SYNTHETIC_NAME + "\n")
    ehr = NdjsonEhr(folder)
    with pytest.raises(EhrInvalidResourceError) as bad_value:
        ehr.read_patient("SYN-0003")
    with pytest.raises(EhrInvalidResourceError) as bad_json:
        ehr.read_patient("SYN-9999")
    assert "Patient/SYN-0003" in str(bad_value.value) and "birthDate" in str(bad_value.value)
    assert "Patient.ndjson line 4" in str(bad_json.value)
    for raised in (bad_value, bad_json):
        assert SYNTHETIC_NAME not in str(raised.value)
        assert "SYN-MRN-0001" not in str(raised.value)


def test_patient_found_by_mrn_for_a_study_without_an_order(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    patient = ehr.find_patient("SYN-MRN-0001", MRN_SYSTEM)
    assert patient is not None and patient.id == "SYN-0001"
    assert ehr.find_patient("SYN-MRN-0001") is not None  # any system
    assert ehr.find_patient("SYN-MRN-0001", "urn:other") is None
    assert ehr.find_patient("SYN-MRN-9999", MRN_SYSTEM) is None


def test_the_projects_draft_bundle_replays_on_the_folder_sink_without_duplicates(
    folder: Path,
) -> None:
    from datetime import UTC, datetime

    from pipeline.fhir_resources import ModelIdentity, StudyLinks, build_draft_bundle
    from pipeline.report import DraftReport

    report = DraftReport.model_validate(
        {
            "rationale": "r",
            "findings": [
                {
                    "name": "edema",
                    "presence": "absent",
                    "laterality": "bilateral",
                    "location": "lungs",
                    "severity": "not_applicable",
                    "detail": "No edema.",
                }
            ],
            "impression": "Normal.",
            "critical": False,
            "recommendation": "none",
        }
    )
    bundle = build_draft_bundle(
        report,
        StudyLinks(accession_number="SYN-ACC-0001", patient="Patient/SYN-0001"),
        ModelIdentity(name="m", version="v1"),
        issued=datetime(2026, 11, 2, tzinfo=UTC),
    )
    ehr = NdjsonEhr(folder)
    first = ehr.transaction(bundle)
    again = ehr.transaction(bundle)
    assert [e.response.location for e in first.entry] == [e.response.location for e in again.entry]
    for rtype in ("Device", "Observation", "Provenance"):
        assert len((folder / f"{rtype}.ndjson").read_text().splitlines()) == 1
    reports = [
        json.loads(line)
        for line in (folder / "DiagnosticReport.ndjson").read_text().splitlines()
        if "meta" in json.loads(line) and json.loads(line)["meta"].get("tag")
    ]
    assert len(reports) == 1


def _signed_reports(folder: Path) -> None:
    """Reports on order SYN-SR-1 (accession SYN-ACC-0001): the AI's draft, two signed ones,
    a voided one; one on another order; and ones identified by accession number only."""
    code = {"text": "XR chest"}
    subject = {"reference": "Patient/SYN-0001"}

    def report(rid: str, status: str, issued: str | None, **extra: Any) -> dict[str, Any]:
        data = {"id": rid, "status": status, "code": code, "subject": subject, **extra}
        return data if issued is None else {**data, "issued": issued}

    order = {"basedOn": [{"reference": "ServiceRequest/SYN-SR-1"}]}
    _write(
        folder,
        "DiagnosticReport",
        report("SYN-DR-DRAFT", "preliminary", "2026-01-01T00:00:00Z", **order),
        # by instant B (09:00Z) is later than A (08:30Z); as text A would sort last
        report("SYN-DR-A", "final", "2025-01-02T10:30:00+02:00", **order),
        report("SYN-DR-B", "final", "2025-01-02T09:00:00Z", **order),
        report("SYN-DR-VOID", "entered-in-error", "2025-12-01T00:00:00Z", **order),
        report(
            "SYN-DR-OTHER",
            "final",
            "2026-02-01T00:00:00Z",
            basedOn=[{"reference": "ServiceRequest/SYN-SR-2"}],
        ),
        report(
            "SYN-DR-ACC-DRAFT",
            "preliminary",
            "2026-01-01T00:00:00Z",
            identifier=[{"system": ACCESSION_SYSTEM, "value": "SYN-ACC-0003"}],
        ),
        report(
            "SYN-DR-ACC-FINAL",
            "final",
            "2025-01-01T08:00:00Z",
            identifier=[{"system": ACCESSION_SYSTEM, "value": "SYN-ACC-0003"}],
        ),
        report(
            "SYN-DR-ACC-AMENDED",
            "amended",
            "2025-01-03T08:00:00Z",
            identifier=[{"system": ACCESSION_SYSTEM, "value": "SYN-ACC-0003"}],
        ),
    )


def test_final_report_is_the_latest_signed_report_based_on_the_order(folder: Path) -> None:
    _signed_reports(folder)
    ehr = NdjsonEhr(folder, accession_system=ACCESSION_SYSTEM)
    for found in (
        ehr.find_final_report("SYN-ACC-0001", "ServiceRequest/SYN-SR-1"),
        ehr.find_final_report(None, "ServiceRequest/SYN-SR-1"),
        ehr.find_final_report(None, "https://ehr.invalid/fhir/ServiceRequest/SYN-SR-1"),
    ):
        assert found is not None and found.id == "SYN-DR-B" and found.status == "final"


def test_order_with_only_the_ai_draft_has_no_final_report(folder: Path) -> None:
    _write(
        folder,
        "DiagnosticReport",
        {
            "id": "SYN-DR-DRAFT-9",
            "status": "preliminary",
            "code": {"text": "XR chest"},
            "basedOn": [{"reference": "ServiceRequest/SYN-SR-9"}],
            "identifier": [{"system": ACCESSION_SYSTEM, "value": "SYN-ACC-0009"}],
            "issued": "2026-01-01T00:00:00Z",
        },
    )
    ehr = NdjsonEhr(folder, accession_system=ACCESSION_SYSTEM)
    assert ehr.find_final_report("SYN-ACC-0009", "ServiceRequest/SYN-SR-9") is None
    assert ehr.find_final_report(None, "ServiceRequest/SYN-SR-9") is None
    assert ehr.find_final_report("SYN-ACC-0009") is None


def test_final_report_is_found_by_accession_when_not_based_on_the_order(folder: Path) -> None:
    _signed_reports(folder)
    ehr = NdjsonEhr(folder, accession_system=ACCESSION_SYSTEM)
    found = ehr.find_final_report("SYN-ACC-0003")
    assert found is not None and found.id == "SYN-DR-ACC-AMENDED"
    found = ehr.find_final_report("SYN-ACC-0003", "ServiceRequest/SYN-SR-3")  # none basedOn it
    assert found is not None and found.id == "SYN-DR-ACC-AMENDED"
    assert ehr.find_final_report(None, "ServiceRequest/SYN-SR-3") is None
    assert NdjsonEhr(folder).find_final_report("SYN-ACC-0003") is not None  # any system
    assert NdjsonEhr(folder, accession_system="urn:other").find_final_report("SYN-ACC-0003") is None


def test_final_report_needs_an_accession_or_an_order(folder: Path) -> None:
    _signed_reports(folder)
    ehr = NdjsonEhr(folder, accession_system=ACCESSION_SYSTEM)
    assert ehr.find_final_report(None) is None
    assert ehr.find_final_report(None, None) is None
    assert ehr.find_final_report("", "") is None
    with pytest.raises(ValueError, match="ServiceRequest"):
        ehr.find_final_report("SYN-ACC-0001", "Patient/SYN-0001")
    assert NdjsonEhr(folder / "empty").find_final_report("SYN-ACC-0001", "ServiceRequest/1") is None


def test_final_report_from_a_malformed_line_names_the_report_not_its_content(
    folder: Path,
) -> None:
    _write(
        folder,
        "DiagnosticReport",
        {
            "id": "SYN-DR-BAD",
            "status": "final",
            "code": {"text": "XR chest"},
            "basedOn": [{"reference": "ServiceRequest/SYN-SR-1"}],
            "issued": f"{SYNTHETIC_NAME}-not-an-instant",
        },
    )
    with pytest.raises(EhrInvalidResourceError) as raised:
        NdjsonEhr(folder).find_final_report("SYN-ACC-0001", "ServiceRequest/SYN-SR-1")
    text = str(raised.value)
    assert "DiagnosticReport/SYN-DR-BAD" in text and "issued" in text
    assert SYNTHETIC_NAME not in text and "SYN-ACC-0001" not in text
