from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from pipeline.fhir_resources import (
    ModelIdentity,
    StudyLinks,
    WriteOptions,
    as_transaction,
    build_device,
    build_draft_resources,
    device_key,
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
    encounter="Encounter/enc-1",
    study_started=datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
)
MODEL = ModelIdentity(name="med-r1", version="2025.1", weights_sha256="ab" * 32)
ISSUED = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _draft(target: str = "diagnostic_report") -> dict[str, list[dict]]:
    """The draft's resources by type (the Device is written apart: Device/dev-1)."""
    resources = build_draft_resources(
        REPORT,
        LINKS,
        MODEL,
        device="Device/dev-1",
        issued=ISSUED,
        options=WriteOptions(target=target, organization="Organization/rad"),  # type: ignore[arg-type]
        sources=("Condition/c-1", "DiagnosticReport/prior-1"),
    )
    out: dict[str, list[dict]] = {}
    for resource in resources.resources:
        out.setdefault(resource["resourceType"], []).append(resource)
    return out


def test_report_is_preliminary_radiology_with_links_and_ai_label() -> None:
    (report,) = _draft()["DiagnosticReport"]
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert {c["coding"][0]["code"] for c in report["category"]} == {"LP29684-5", "RAD"}
    assert report["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/is-1"}]
    assert report["encounter"] == {"reference": "Encounter/enc-1"}
    assert report["performer"] == [{"reference": "Organization/rad", "display": "Radiology"}]
    assert report["meta"]["security"][0]["code"] == "AIAST"
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert text.startswith("PRELIMINARY DRAFT") and "Right lower zone consolidation." in text
    assert "Right lower zone consolidation." in report["text"]["div"]
    assert len(report["result"]) == 2


def test_one_preliminary_observation_per_finding_referenced_by_the_report() -> None:
    resources = build_draft_resources(REPORT, LINKS, MODEL, device="Device/dev-1", issued=ISSUED)
    observations = [e for e in resources.entries if e.resource_type == "Observation"]
    assert [o.resource["code"]["coding"][-1]["code"] for o in observations] == [
        "consolidation",
        "pneumothorax",
    ]
    assert all(o.resource["status"] == "preliminary" for o in observations)
    assert all(o.resource["device"] == {"reference": "Device/dev-1"} for o in observations)
    report = resources.main.resource
    assert [r["reference"] for r in report["result"]] == [o.full_url for o in observations]


def test_provenance_lists_every_input_of_the_model_with_the_device_as_author() -> None:
    resources = build_draft_resources(
        REPORT,
        LINKS,
        MODEL,
        device="Device/dev-1",
        issued=ISSUED,
        sources=("Condition/c-1", "DiagnosticReport/prior-1", "ServiceRequest/sr-1"),
    )
    provenance = resources.entries[-1].resource
    assert provenance["target"][0]["reference"] == resources.main.full_url
    assert len(provenance["target"]) == 3  # the report and its two observations
    (agent,) = provenance["agent"]
    assert agent["who"] == {"reference": "Device/dev-1"}
    assert agent["onBehalfOf"] == {"display": "Radiology"}
    assert provenance["reason"][0]["coding"][0]["code"] == "AIAST"
    assert provenance["occurredDateTime"] == "2026-11-02T09:00:00Z"
    # Once each: the prompt's sources, the order (also a source here) and the study.
    assert [e["what"]["reference"] for e in provenance["entity"]] == [
        "Condition/c-1",
        "DiagnosticReport/prior-1",
        "ServiceRequest/sr-1",
        "ImagingStudy/is-1",
    ]


def test_without_an_imaging_study_the_provenance_names_the_dicom_study() -> None:
    links = LINKS.model_copy(update={"imaging_study": None, "study_uid": "1.2.3.4"})
    resources = build_draft_resources(REPORT, links, MODEL, device="Device/d", issued=ISSUED)
    entity = resources.entries[-1].resource["entity"][-1]["what"]
    assert entity["identifier"] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}


def test_the_device_is_an_ai_device_identified_by_name_and_version() -> None:
    device = build_device(MODEL)
    assert device["version"][0]["value"] == "2025.1"
    assert any(i["value"] == "ab" * 32 for i in device["identifier"])
    assert device["type"]["coding"][0]["code"] == "Artificial-Intelligence"
    key = device_key(MODEL)
    assert {"system": key.system, "value": key.value} in device["identifier"]


def test_search_keys_escape_and_encode_a_model_version_with_search_syntax() -> None:
    key = device_key(ModelIdentity("m", "a&b|c,d"))
    assert key.token == "urn:medvlm-pipeline:draft:device|m\\|a&b\\|c\\,d"
    assert key.query == (
        "identifier=urn%3Amedvlm-pipeline%3Adraft%3Adevice%7Cm%5C%7Ca%26b%5C%7Cc%5C%2Cd"
    )


def test_every_resource_has_a_stable_key_and_the_transaction_is_conditional() -> None:
    first = build_draft_resources(REPORT, LINKS, MODEL, device="Device/d", issued=ISSUED)
    again = build_draft_resources(REPORT, LINKS, MODEL, device="Device/d", issued=ISSUED)
    assert first == again
    tag = draft_id("ACC-0001", "2025.1")
    assert first.main.key.value == tag
    assert [e.key.param for e in first.entries] == ["identifier"] * 3 + ["_tag"]
    bundle = as_transaction(first).model_dump(mode="json")
    assert [e["request"]["ifNoneExist"] for e in bundle["entry"]] == [
        e.key.query for e in first.entries
    ]
    assert "Device" not in {e["resource"]["resourceType"] for e in bundle["entry"]}


def test_draft_id_changes_with_model_version_and_hides_the_accession() -> None:
    assert draft_id("ACC-0001", "v1") != draft_id("ACC-0001", "v2")
    assert "ACC-0001" not in draft_id("ACC-0001", "v1")


def test_document_reference_alternative_is_a_preliminary_clinical_note() -> None:
    by_type = _draft("document_reference")
    assert set(by_type) == {"DocumentReference", "Provenance"}
    (doc,) = by_type["DocumentReference"]
    assert doc["docStatus"] == "preliminary"
    assert doc["identifier"][0]["value"] == draft_id("ACC-0001", "2025.1")
    assert doc["context"]["encounter"] == [{"reference": "Encounter/enc-1"}]
    assert doc["context"]["period"] == {"start": "2026-11-01T08:30:00Z"}
    assert "clinical-note" in {c["coding"][0]["code"] for c in doc["category"]}
    assert doc["author"][0] == {"reference": "Device/dev-1"}
    assert doc["content"][0]["format"]["code"] == "urn:ihe:iti:xds:2017:mimeTypeSufficient"
    (provenance,) = by_type["Provenance"]
    assert len(provenance["target"]) == 1
