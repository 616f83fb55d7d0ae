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

    from pipeline.fhir_resources import (
        ModelIdentity,
        StudyLinks,
        as_transaction,
        build_draft_resources,
    )
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
    bundle = as_transaction(
        build_draft_resources(
            report,
            StudyLinks(accession_number="SYN-ACC-0001", patient="Patient/SYN-0001"),
            ModelIdentity(name="m", version="v1"),
            device="Device/d-1",
            issued=datetime(2026, 11, 2, tzinfo=UTC),
        )
    )
    ehr = NdjsonEhr(folder)
    first = ehr.transaction(bundle)
    again = ehr.transaction(bundle)
    assert [e.response.location for e in first.entry] == [e.response.location for e in again.entry]
    for rtype in ("Observation", "Provenance"):
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


# -- appends, incremental parsing, crash and concurrency safety ---------------------------------


def _report_lines(folder: Path) -> list[dict[str, Any]]:
    text = (folder / "DiagnosticReport.ndjson").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _draft_values(folder: Path) -> list[str]:
    return [
        ident["value"]
        for data in _report_lines(folder)
        for ident in data.get("identifier") or []
        if ident.get("system") == REPORT_SYSTEM
    ]


def test_a_create_appends_and_an_update_rewrites(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    path = folder / "DiagnosticReport.ndjson"
    before, inode = path.read_bytes(), path.stat().st_ino

    ehr.conditional_create(*_draft("SYN-DRAFT-A"))
    after = path.read_bytes()
    assert path.stat().st_ino == inode, "a create appends to the same file"
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1

    patient_path = folder / "Patient.ndjson"
    with patient_path.open("rb") as held:  # holds the old inode: a new file gets another
        old_inode = patient_path.stat().st_ino
        ehr.update(ehr.read_patient("SYN-0002"), "1")
        assert patient_path.stat().st_ino != old_inode, "an update writes the file anew"
        assert held.read() != patient_path.read_bytes()
    assert ehr.read_patient("SYN-0002").meta.versionId == "2"  # type: ignore[union-attr]
    assert not list(folder.glob(".*.tmp"))


def test_transaction_put_appends_a_new_id_and_rewrites_an_existing_one(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    path = folder / "Patient.ndjson"

    def put(patient_id: str) -> Bundle:
        entry = {
            "resource": {"resourceType": "Patient", "id": patient_id, "gender": "other"},
            "request": {"method": "PUT", "url": f"Patient/{patient_id}"},
        }
        return ehr.transaction(Bundle.model_validate({"type": "transaction", "entry": [entry]}))

    before, inode = path.read_bytes(), path.stat().st_ino
    put("SYN-0005")
    assert path.stat().st_ino == inode and path.read_bytes().startswith(before)
    response = put("SYN-0005")
    assert response.entry is not None and response.entry[0].response is not None
    assert response.entry[0].response.location == "Patient/SYN-0005/_history/2"
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [
        "SYN-0001",
        "SYN-0002",
        "SYN-0005",
    ]
    assert NdjsonEhr(folder).read_patient("SYN-0005").meta.versionId == "2"  # type: ignore[union-attr]


def test_a_torn_append_is_skipped_by_readers_and_cut_off_by_the_next_writer(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    ehr.conditional_create(*_draft("SYN-DRAFT-1"))
    path = folder / "DiagnosticReport.ndjson"
    complete = path.read_bytes()
    torn = _dump({"resourceType": "DiagnosticReport", "id": "SYN-TORN", "status": "final"})
    with path.open("ab") as handle:  # a crash cut this append short
        handle.write(torn[: len(torn) // 2])

    for reader in (ehr, NdjsonEhr(folder)):  # a warm cache and a cold one
        assert reader.find_final_report(None, "ServiceRequest/SYN-SR-1") is None
        assert reader.gather_context("SYN-ACC-0001").prior_reports  # the file still reads
    ehr.conditional_create(*_draft("SYN-DRAFT-2"))
    after = path.read_bytes()
    assert after.startswith(complete) and b"SYN-TORN" not in after
    assert _draft_values(folder) == ["SYN-DRAFT-1", "SYN-DRAFT-2"]
    assert NdjsonEhr(folder).conditional_create(*_draft("SYN-DRAFT-1")).created is False


def test_a_complete_last_line_without_newline_is_kept(folder: Path) -> None:
    path = folder / "Patient.ndjson"
    with path.open("ab") as handle:
        handle.write(_dump({"resourceType": "Patient", "id": "SYN-0004"}).rstrip(b"\n"))
    ehr = NdjsonEhr(folder)
    assert ehr.read_patient("SYN-0004").id == "SYN-0004"
    created = ehr.conditional_create(
        Patient(identifier=[Identifier(value="M5")]), Identifier(value="M5")
    )
    assert created.created
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == ["SYN-0001", "SYN-0002", "SYN-0004", created.resource.id]


def test_a_bad_last_line_still_names_file_and_line(folder: Path) -> None:
    ehr = NdjsonEhr(folder)
    ehr.read_patient("SYN-0001")  # cached
    path = folder / "Patient.ndjson"
    with path.open("ab") as handle:  # JSON, complete, but not a Patient: not a torn append
        handle.write(b'{"resourceType": "Condition", "note": "' + SYNTHETIC_NAME.encode() + b'"}')
    for reader in (ehr, NdjsonEhr(folder)):
        with pytest.raises(EhrInvalidResourceError, match=r"Patient\.ndjson line 3") as raised:
            reader.find_patient("SYN-MRN-0001")
        assert SYNTHETIC_NAME not in str(raised.value)
        with pytest.raises(EhrInvalidResourceError, match=r"Patient\.ndjson line 3"):
            reader.conditional_create(Patient(), Identifier(value="M6"))
    with path.open("ab") as handle:  # now a complete bad line in the middle
        handle.write(b"\n" + _dump({"resourceType": "Patient", "id": "SYN-0006"}))
    with pytest.raises(EhrInvalidResourceError, match=r"Patient\.ndjson line 3"):
        ehr.read_patient("SYN-0006")
    assert ehr.read_patient("SYN-0002").id == "SYN-0002"  # before the bad line: found


def test_another_instance_sees_appends_and_rewrites(folder: Path) -> None:
    writer, reader = NdjsonEhr(folder), NdjsonEhr(folder)
    assert reader.find_patient("M7") is None  # the reader's cache is warm
    created = writer.conditional_create(
        Patient(identifier=[Identifier(value="M7")]), Identifier(value="M7")
    )
    found = reader.find_patient("M7")
    assert found is not None and found.id == created.resource.id

    writer.update(found, "1")  # a rewrite: another inode
    again = reader.find_patient("M7")
    assert again is not None and again.meta is not None and again.meta.versionId == "2"

    # rewritten in place and shorter (same inode): parsed again from the start
    path = folder / "Patient.ndjson"
    path.write_text(json.dumps({"resourceType": "Patient", "id": "SYN-0009"}) + "\n")
    assert reader.find_patient("M7") is None
    assert reader.read_patient("SYN-0009").id == "SYN-0009"
    path.unlink()
    with pytest.raises(EhrNotFoundError):
        reader.read_patient("SYN-0009")


def test_a_read_parses_only_the_lines_appended_since_the_last(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import connectors.ndjson as ndjson

    parsed: list[bytes] = []
    real = ndjson._load_line

    def counting(raw: bytes) -> Any:
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(ndjson, "_load_line", counting)
    ehr = NdjsonEhr(folder)
    for batch in range(10):
        entries = []
        for i in range(100):
            report, identifier = _draft(f"SYN-DRAFT-{batch}-{i}")
            entries.append(conditional_entry(report, identifier, f"urn:uuid:r-{batch}-{i}"))
        ehr.transaction(Bundle(type="transaction", entry=entries))
    assert len(_draft_values(folder)) == 1000
    ehr.find_final_report(None, "ServiceRequest/SYN-SR-1")  # reads the last batch's lines

    parsed.clear()
    assert ehr.find_final_report(None, "ServiceRequest/SYN-SR-1") is None
    assert parsed == [], "nothing new: nothing parsed"
    assert ehr.conditional_create(*_draft("SYN-DRAFT-NEW")).created
    assert ehr.find_final_report(None, "ServiceRequest/SYN-SR-1") is None
    assert len(parsed) == 1 and b"SYN-DRAFT-NEW" in parsed[0]

    parsed.clear()  # another instance (process) starts cold: the whole file once
    other = NdjsonEhr(folder)
    other.find_final_report(None, "ServiceRequest/SYN-SR-1")
    assert len(parsed) == 3 + 1001
    other.find_final_report(None, "ServiceRequest/SYN-SR-1")
    assert len(parsed) == 3 + 1001


def test_reads_and_replays_leave_stored_resources_untouched(folder: Path) -> None:
    """What exists is returned as stored: a replayed entry is not rewritten (nor the cache)."""
    _write(
        folder,
        "DiagnosticReport",
        {
            "id": "SYN-DR-URN",
            "status": "preliminary",
            "code": {"text": "XR chest"},
            "identifier": [{"system": REPORT_SYSTEM, "value": "SYN-DRAFT-OLD"}],
            "subject": {"reference": "urn:uuid:patient-9"},
        },
    )
    ehr = NdjsonEhr(folder)
    ehr.gather_context("SYN-ACC-0001")
    mrn = Identifier(system=MRN_SYSTEM, value="SYN-MRN-0009")
    old, old_id = _draft("SYN-DRAFT-OLD")
    new, new_id = _draft("SYN-DRAFT-NEW")
    new.subject = Reference(reference="urn:uuid:patient-9")
    bundle = Bundle(
        type="transaction",
        entry=[
            conditional_entry(Patient(identifier=[mrn]), mrn, "urn:uuid:patient-9"),
            conditional_entry(old, old_id, "urn:uuid:old"),
            conditional_entry(new, new_id, "urn:uuid:new"),
        ],
    )
    response = ehr.transaction(bundle)
    assert _statuses(response) == ["201 Created", "200 OK", "201 Created"]
    assert response.entry is not None
    patient_id = response.entry[0].resource.id  # type: ignore[union-attr]
    stored = {d["id"]: d for d in _report_lines(folder)}
    assert stored["SYN-DR-URN"]["subject"] == {"reference": "urn:uuid:patient-9"}
    written_new = next(d for d in stored.values() if _has(d, "SYN-DRAFT-NEW"))
    assert written_new["subject"] == {"reference": f"Patient/{patient_id}"}
    for rtype in ("Patient", "DiagnosticReport", "Condition", "ServiceRequest"):
        lines = (folder / f"{rtype}.ndjson").read_text().splitlines()
        assert ehr._view(rtype).all() == [json.loads(line) for line in lines]


def _has(data: dict[str, Any], value: str) -> bool:
    return any(i.get("value") == value for i in data.get("identifier") or [])


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data) + "\n").encode()


_WORKER = """
import json, sys, time
from pathlib import Path
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from connectors.ndjson import NdjsonEhr

folder, name, system = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(folder / f"ready-{name}").touch()
deadline = time.monotonic() + 60
while not (folder / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.005)
ehr, created = NdjsonEhr(folder), {}
for value in [f"SHARED-{j}" for j in reversed(range(20))] + [f"{name}-{j}" for j in range(5)]:
    time.sleep(0.002)  # lets the lock change hands between writers
    identifier = Identifier(system=system, value=value)
    report = DiagnosticReport(
        identifier=[identifier], status="preliminary", code=CodeableConcept(text="XR chest")
    )
    created[value] = ehr.conditional_create(report, identifier).created
print(json.dumps(created))
"""


def test_threads_and_processes_create_each_identifier_exactly_once(folder: Path) -> None:
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(folder), f"P{k}", REPORT_SYSTEM],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((folder / f"ready-P{k}").exists() for k in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.01)

    shared = NdjsonEhr(folder)  # one instance used by every thread: its cache is shared
    results: dict[str, dict[str, bool]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(9)

    def work(name: str) -> None:
        try:
            start.wait()
            created = {}
            for value in [f"SHARED-{j}" for j in range(20)] + [f"{name}-{j}" for j in range(5)]:
                time.sleep(0.002)  # lets the lock change hands between writers
                report, identifier = _draft(value)
                created[value] = shared.conditional_create(report, identifier).created
                shared.find_final_report(value)  # reads interleaved with the writes
            results[name] = created
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"T{k}",)) for k in range(8)]
    for thread in threads:
        thread.start()
    (folder / "go").touch()
    start.wait()
    for thread in threads:
        thread.join()
    for k, process in enumerate(processes):
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results[f"P{k}"] = json.loads(out)
    assert not errors

    for j in range(20):
        assert sum(r[f"SHARED-{j}"] for r in results.values()) == 1
    for name, created in results.items():
        assert all(created[f"{name}-{j}"] for j in range(5))
    values = _draft_values(folder)
    assert sorted(values) == sorted(
        [f"SHARED-{j}" for j in range(20)] + [f"{n}-{j}" for n in results for j in range(5)]
    )
    assert all(NdjsonEhr(folder).conditional_create(*_draft(v)).created is False for v in values)
