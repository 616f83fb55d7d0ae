"""FHIR R4 resources for a draft report, built with ``fhir.resources.R4B`` models. No I/O.

What one draft becomes (US Core DiagnosticReport for Report and Note; HL7 AI Transparency on FHIR):

- ``DiagnosticReport`` status ``preliminary`` — never final: a radiologist signs —, category
  LOINC LP29684-5 (Radiology) and v2-0074 RAD, code LOINC 18748-4 (Diagnostic imaging study),
  ``subject``, ``basedOn`` the ServiceRequest, ``imagingStudy``, ``effectiveDateTime``, ``issued``,
  ``conclusion`` (the impression), ``presentedForm`` (the draft as text), ``result`` → Observations;
- one ``Observation`` per finding (status ``preliminary``);
- a ``Device`` for the model (name, version, weights hash);
- a ``Provenance`` whose target is the report and its observations, agent the model Device,
  entities the source ImagingStudy / ServiceRequest;
- every resource labelled ``meta.security`` AIAST (AI asserted) and tagged with the draft id.

Idempotency never depends on the server: every resource carries an identifier (or, for
Provenance, which has no identifier element, a tag) derived from (accession, model version), so a
replayed transaction uses ``ifNoneExist`` and the caller's ledger stays the source of truth.
The alternative write target for EHRs that take drafts only as notes (Epic) is a
``DocumentReference`` with ``docStatus`` ``preliminary`` (``build_document_reference``).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.dicom_time import fhir_datetime
from pipeline.identity import DicomPatient
from pipeline.report import DraftReport, Finding, Presence

DEFAULT_IDENTIFIER_SYSTEM = "urn:medvlm-pipeline:draft"
LOINC = "http://loinc.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
FINDING_SYSTEM = "urn:medvlm-pipeline:finding"
PRESENCE_SYSTEM = "urn:medvlm-pipeline:presence"

AI_SECURITY_LABEL = {
    "system": V3_OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}


@dataclass(frozen=True)
class ModelIdentity:
    """The model that drafted: recorded as a FHIR Device."""

    name: str
    version: str
    weights_sha256: str | None = None
    manufacturer: str = "medvlm-pipeline"
    # The project's tiny random-weight test model: every draft and the Device say so.
    random_weights: bool = False


RANDOM_WEIGHTS_NOTICE = (
    "TEST MODEL WITH RANDOM WEIGHTS - this draft carries no medical meaning; not for clinical use."
)


class StudyLinks(BaseModel):
    """What a study's draft refers to in the EHR (FHIR references ``Type/id``) and the facts
    the write gate checks again before writing."""

    model_config = ConfigDict(frozen=True)

    accession_number: str = Field(description="Accession number (or the study UID without one).")
    patient: str | None = Field(default=None, description="Patient/{id}; None: not in the EHR.")
    service_request: str | None = Field(default=None, description="ServiceRequest/{id}.")
    imaging_study: str | None = Field(default=None, description="ImagingStudy/{id}.")
    study_started: datetime | date | None = Field(
        default=None,
        description=(
            "When the study started (pipeline.dicom_time.study_instant): an aware datetime, or "
            "a date when only that is known."
        ),
    )
    dicom_patient: DicomPatient | None = Field(
        default=None, description="Who the images say they belong to (a digest, no MRN)."
    )

    @field_validator("study_started", mode="before")
    @classmethod
    def _date_or_datetime(cls, value: Any) -> Any:
        # A date-only string is a date (day precision), never midnight of some zone.
        if isinstance(value, str):
            return date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
        return value


def draft_id(accession_number: str, model_version: str) -> str:
    """Stable per (accession, model version); a hash, so the accession is not spread."""
    digest = hashlib.sha256(f"{accession_number}\x1f{model_version}".encode()).hexdigest()
    return f"draft-{digest[:32]}"


def _subject(links: StudyLinks) -> str:
    if links.patient is None:
        raise ValueError("a draft needs the Patient it is about (StudyLinks.patient)")
    return links.patient


def _effective(links: StudyLinks) -> str | None:
    return fhir_datetime(links.study_started) if links.study_started is not None else None


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _meta(tag: str, system: str) -> dict[str, Any]:
    return {"security": [AI_SECURITY_LABEL], "tag": [{"system": system, "code": tag}]}


def render_text(report: DraftReport, *, random_weights: bool = False) -> str:
    """The draft as plain text for ``presentedForm``, headed as a preliminary AI draft (and, from
    the random-weight test model, as meaningless)."""
    lines = ["PRELIMINARY DRAFT - AI-generated, not reviewed by a radiologist.", "", "FINDINGS:"]
    if random_weights:
        lines.insert(0, RANDOM_WEIGHTS_NOTICE)
    for finding in report.findings:
        side = "" if finding.laterality.value == "not_applicable" else f" ({finding.laterality})"
        lines.append(
            f"- {finding.name.value.replace('_', ' ')}: {finding.presence}{side}, "
            f"{finding.location}; {finding.detail}"
        )
    lines += ["", f"IMPRESSION: {report.impression}", f"RECOMMENDATION: {report.recommendation}"]
    if report.critical:
        lines.insert(0, "CRITICAL RESULT FLAGGED BY THE MODEL - communicate per policy.")
    return "\n".join(lines)


def build_device(
    model: ModelIdentity, *, system: str = DEFAULT_IDENTIFIER_SYSTEM
) -> dict[str, Any]:
    """The model as a Device (HL7 AI Transparency on FHIR), identified by name and version."""
    identifier = [{"system": f"{system}:device", "value": f"{model.name}|{model.version}"}]
    if model.weights_sha256:
        identifier.append({"system": f"{system}:weights-sha256", "value": model.weights_sha256})
    device = Device.model_validate(
        {
            "resourceType": "Device",
            "meta": {"security": [AI_SECURITY_LABEL]},
            "identifier": identifier,
            "status": "active",
            "manufacturer": model.manufacturer,
            "deviceName": [{"name": model.name, "type": "model-name"}],
            "version": [{"value": model.version}],
            "type": {
                "text": "AI model: medical vision-language model (report drafting)"
                + (f" - {RANDOM_WEIGHTS_NOTICE}" if model.random_weights else "")
            },
            "note": [{"text": RANDOM_WEIGHTS_NOTICE}] if model.random_weights else None,
        }
    )
    return device.model_dump(mode="json", exclude_none=True)


def _observation(
    finding: Finding, index: int, links: StudyLinks, device_ref: str, tag: str, system: str
) -> dict[str, Any]:
    components = [
        {"code": {"text": "laterality"}, "valueString": finding.laterality.value},
        {"code": {"text": "location"}, "valueString": finding.location},
        {"code": {"text": "severity"}, "valueString": finding.severity.value},
    ]
    obs = Observation.model_validate(
        {
            "resourceType": "Observation",
            "meta": _meta(tag, system),
            "identifier": [{"system": system, "value": f"{tag}-f{index}"}],
            "status": "preliminary",
            "category": [
                {
                    "coding": [
                        _coding(
                            "http://terminology.hl7.org/CodeSystem/observation-category",
                            "imaging",
                            "Imaging",
                        )
                    ]
                }
            ],
            "code": {
                "coding": [_coding(FINDING_SYSTEM, finding.name.value)],
                "text": finding.name.value.replace("_", " "),
            },
            "subject": {"reference": _subject(links)},
            "basedOn": [{"reference": links.service_request}] if links.service_request else None,
            "derivedFrom": [{"reference": links.imaging_study}] if links.imaging_study else None,
            "effectiveDateTime": _effective(links),
            "device": {"reference": device_ref},
            "valueCodeableConcept": {
                "coding": [_coding(PRESENCE_SYSTEM, finding.presence.value)],
                "text": finding.presence.value,
            },
            "interpretation": (
                [{"text": "uncertain"}] if finding.presence is Presence.UNCERTAIN else None
            ),
            "note": [{"text": finding.detail}],
            "component": components,
        }
    )
    return obs.model_dump(mode="json", exclude_none=True)


def _entry(resource: dict[str, Any], full_url: str, if_none_exist: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": if_none_exist,
        },
    }


def build_draft_bundle(
    report: DraftReport,
    links: StudyLinks,
    model: ModelIdentity,
    *,
    issued: datetime,
    system: str = DEFAULT_IDENTIFIER_SYSTEM,
) -> Bundle:
    """A transaction Bundle writing the draft idempotently (conditional creates throughout)."""
    tag = draft_id(links.accession_number, model.version)
    urn = {
        name: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{tag}/{name}')}"
        for name in ("device", "report", "provenance")
    }
    device = build_device(model, system=system)
    device_identifier = device["identifier"][0]
    observations = [
        _observation(finding, i, links, urn["device"], tag, system)
        for i, finding in enumerate(report.findings)
    ]
    obs_urns = [
        f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{tag}/f{i}')}"
        for i in range(len(observations))
    ]
    text = render_text(report, random_weights=model.random_weights)
    diagnostic_report = DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "meta": _meta(tag, system),
            "identifier": [{"system": system, "value": tag}],
            "status": "preliminary",
            "category": [
                {"coding": [_coding(LOINC, "LP29684-5", "Radiology")]},
                {"coding": [_coding(V2_0074, "RAD", "Radiology")]},
            ],
            "code": {"coding": [_coding(LOINC, "18748-4", "Diagnostic imaging study")]},
            "subject": {"reference": _subject(links)},
            "basedOn": [{"reference": links.service_request}] if links.service_request else None,
            "imagingStudy": [{"reference": links.imaging_study}] if links.imaging_study else None,
            # The clinically relevant time is the study's; without one there is no effective
            # time at all (issued is when the draft was made, not when the patient was imaged).
            "effectiveDateTime": _effective(links),
            "issued": issued.isoformat(),
            "conclusion": report.impression,
            "presentedForm": [
                {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "en",
                    "data": base64.b64encode(text.encode()).decode("ascii"),
                    "title": "Preliminary AI draft",
                }
            ],
            "result": [{"reference": ref} for ref in obs_urns],
        }
    ).model_dump(mode="json", exclude_none=True)
    entities = [
        {"role": "source", "what": {"reference": ref}}
        for ref in (links.imaging_study, links.service_request)
        if ref
    ]
    provenance = Provenance.model_validate(
        {
            "resourceType": "Provenance",
            "meta": _meta(tag, system),
            "target": [{"reference": urn["report"]}] + [{"reference": r} for r in obs_urns],
            "recorded": issued.isoformat(),
            "activity": {"text": "AI draft of a radiology report (preliminary)"},
            "agent": [
                {
                    "type": {"coding": [_coding(PROVENANCE_PARTICIPANT, "author", "Author")]},
                    "who": {"reference": urn["device"]},
                }
            ],
            "entity": entities or None,
        }
    ).model_dump(mode="json", exclude_none=True)

    entries = [
        _entry(
            device,
            urn["device"],
            f"identifier={device_identifier['system']}|{device_identifier['value']}",
        ),
        *(
            _entry(obs, obs_urn, f"identifier={system}|{tag}-f{i}")
            for i, (obs, obs_urn) in enumerate(zip(observations, obs_urns, strict=True))
        ),
        _entry(diagnostic_report, urn["report"], f"identifier={system}|{tag}"),
        _entry(provenance, urn["provenance"], f"_tag={system}|{tag}"),
    ]
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )


def build_document_reference(
    report: DraftReport,
    links: StudyLinks,
    model: ModelIdentity,
    *,
    issued: datetime,
    encounter: str | None = None,
    system: str = DEFAULT_IDENTIFIER_SYSTEM,
) -> DocumentReference:
    """The draft as a preliminary note, for EHRs that accept drafts only as DocumentReference."""
    tag = draft_id(links.accession_number, model.version)
    text = render_text(report, random_weights=model.random_weights)
    return DocumentReference.model_validate(
        {
            "resourceType": "DocumentReference",
            "meta": _meta(tag, system),
            "identifier": [{"system": system, "value": tag}],
            "status": "current",
            "docStatus": "preliminary",
            "type": {"coding": [_coding(LOINC, "18748-4", "Diagnostic imaging study")]},
            "category": [{"coding": [_coding(LOINC, "LP29684-5", "Radiology")]}],
            "subject": {"reference": _subject(links)},
            "date": issued.isoformat(),
            "description": f"Preliminary AI draft ({model.name} {model.version})",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "data": base64.b64encode(text.encode()).decode("ascii"),
                        "title": "Preliminary AI draft",
                    }
                }
            ],
            "context": {
                "encounter": [{"reference": encounter}] if encounter else None,
                "related": [
                    {"reference": ref}
                    for ref in (links.service_request, links.imaging_study)
                    if ref
                ]
                or None,
            },
        }
    )
