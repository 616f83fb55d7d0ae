from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.bundle import Bundle

from pipeline.fhir_resources import (
    ModelIdentity,
    StudyLinks,
    build_document_reference,
    build_draft_bundle,
    draft_id,
)
from pipeline.report import DraftReport

pytestmark = pytest.mark.unit

REPORT = DraftReport.model_validate(
    {
        "rationale": "Right lower zone opacity.",
        "findings": [
            {
                "name": "consolidation",
                "presence": "present",
                "laterality": "right",
                "location": "lower zone",
                "severity": "moderate",
                "detail": "Airspace opacity.",
            },
            {
                "name": "pneumothorax",
                "presence": "absent",
                "laterality": "not_applicable",
                "location": "pleura",
                "severity": "not_applicable",
                "detail": "No pneumothorax.",
            },
        ],
        "impression": "Right lower zone consolidation.",
        "critical": False,
        "recommendation": "Follow-up radiograph in 6 weeks.",
    }
)
LINKS = StudyLinks(
    accession_number="ACC-0001",
    patient="Patient/syn-1",
    service_request="ServiceRequest/sr-1",
    imaging_study="ImagingStudy/is-1",
    study_started=datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
)
MODEL = ModelIdentity(name="med-r1", version="2025.1", weights_sha256="ab" * 32)
ISSUED = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _by_type(bundle: Bundle) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for entry in bundle.model_dump(mode="json")["entry"]:
        out.setdefault(entry["resource"]["resourceType"], []).append(entry)
    return out


def test_report_is_preliminary_radiology_with_links_and_ai_label() -> None:
    entries = _by_type(build_draft_bundle(REPORT, LINKS, MODEL, issued=ISSUED))
    (report_entry,) = entries["DiagnosticReport"]
    report = report_entry["resource"]
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert {c["coding"][0]["code"] for c in report["category"]} == {"LP29684-5", "RAD"}
    assert report["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/is-1"}]
    assert report["meta"]["security"][0]["code"] == "AIAST"
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert text.startswith("PRELIMINARY DRAFT") and "Right lower zone consolidation." in text
    assert len(report["result"]) == 2


def test_one_preliminary_observation_per_finding_referenced_by_the_report() -> None:
    entries = _by_type(build_draft_bundle(REPORT, LINKS, MODEL, issued=ISSUED))
    observations = entries["Observation"]
    assert [o["resource"]["code"]["coding"][0]["code"] for o in observations] == [
        "consolidation",
        "pneumothorax",
    ]
    assert all(o["resource"]["status"] == "preliminary" for o in observations)
    report = entries["DiagnosticReport"][0]["resource"]
    assert [r["reference"] for r in report["result"]] == [o["fullUrl"] for o in observations]


def test_provenance_targets_the_report_with_the_model_device_as_author() -> None:
    entries = _by_type(build_draft_bundle(REPORT, LINKS, MODEL, issued=ISSUED))
    provenance = entries["Provenance"][0]["resource"]
    device_entry = entries["Device"][0]
    assert provenance["target"][0]["reference"] == entries["DiagnosticReport"][0]["fullUrl"]
    assert provenance["agent"][0]["who"]["reference"] == device_entry["fullUrl"]
    assert {e["what"]["reference"] for e in provenance["entity"]} == {
        "ImagingStudy/is-1",
        "ServiceRequest/sr-1",
    }
    device = device_entry["resource"]
    assert device["version"][0]["value"] == "2025.1"
    assert any(i["value"] == "ab" * 32 for i in device["identifier"])


def test_every_write_is_conditional_and_stable_across_builds() -> None:
    first = build_draft_bundle(REPORT, LINKS, MODEL, issued=ISSUED).model_dump(mode="json")
    again = build_draft_bundle(REPORT, LINKS, MODEL, issued=ISSUED).model_dump(mode="json")
    assert first == again
    assert all(e["request"]["ifNoneExist"] for e in first["entry"])
    tag = draft_id("ACC-0001", "2025.1")
    report = next(e for e in first["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["request"]["ifNoneExist"].endswith(f"|{tag}")


def test_draft_id_changes_with_model_version_and_hides_the_accession() -> None:
    assert draft_id("ACC-0001", "v1") != draft_id("ACC-0001", "v2")
    assert "ACC-0001" not in draft_id("ACC-0001", "v1")


def test_document_reference_alternative_is_a_preliminary_note() -> None:
    doc = build_document_reference(REPORT, LINKS, MODEL, issued=ISSUED, encounter="Encounter/e-1")
    assert doc.docStatus == "preliminary"
    assert doc.identifier[0].value == draft_id("ACC-0001", "2025.1")
    assert doc.context.encounter[0].reference == "Encounter/e-1"
