"""FHIR R4 resources for a draft report, built with ``fhir.resources.R4B`` models. No I/O.

What one draft becomes (profiles checked as data in tests/unit/test_fhir_conformance.py):

- ``DiagnosticReport`` (US Core DiagnosticReport Profile for Report and Note exchange) status
  ``preliminary`` — never final: a radiologist signs —, category LOINC LP29684-5 (Radiology) and
  v2-0074 RAD, code LOINC 18748-4 (Diagnostic imaging study), ``subject``, ``encounter`` (the
  order's), ``basedOn`` the ServiceRequest, ``imagingStudy``, ``effectiveDateTime`` (the study's
  time), ``issued``, ``performer`` (the radiology Organization from settings), ``conclusion`` (the
  impression), ``presentedForm`` and narrative ``text`` (the draft as text), ``result`` →
  Observations;
- one ``Observation`` per finding (status ``preliminary``), coded with published codes
  (``pipeline.finding_codes``: SNOMED CT or RadLex, the local code second), presence as a coded
  value, a critical result as a coded interpretation;
- or, for EHRs that take drafts only as notes (Epic), one ``DocumentReference`` (US Core
  DocumentReference: category clinical-note, ``docStatus`` preliminary, author the model's Device
  and the Organization, ``context.encounter``/``period``, ``content.format``);
- a ``Provenance`` (US Core Provenance and HL7 AI Transparency on FHIR AI-Provenance): target the
  draft and its observations, ``occurredDateTime``, ``reason`` AIAST, agent the model's Device
  with role Artificial-Intelligence, ``onBehalfOf`` the Organization, and one ``entity`` for every
  resource the prompt was given (Conditions, prior reports, the order, the study);
- the model as a ``Device`` (AI Transparency AI-Device: type Artificial-Intelligence), written
  once per model version by the caller (``build_device``) and referenced by every draft;
- every resource labelled ``meta.security`` AIAST (AI asserted) and tagged with the draft id.

Idempotency never depends on the server: every resource carries a key derived from (accession,
model version) — an identifier, or for Provenance, which has no identifier element, a tag — that
finds it again (``PendingResource.key``), and the caller's ledger stays the source of truth. How
the resources are sent (one transaction, conditional creates, or search-before-create) is the
writer's choice (``connectors.draft_writer``); ``as_transaction`` is the transaction form.
"""

from __future__ import annotations

import base64
import hashlib
import html
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal
from urllib.parse import urlencode

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.dicom_time import fhir_datetime
from pipeline.finding_codes import critical_interpretation, finding_code, presence_value
from pipeline.identity import DicomPatient
from pipeline.report import DraftReport, Finding, Presence

DEFAULT_IDENTIFIER_SYSTEM = "urn:medvlm-pipeline:draft"
LOINC = "http://loinc.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
US_CORE_DOCREF_CATEGORY = (
    "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"
)
IHE_FORMAT_CODE = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
DICOM_UID_SYSTEM = "urn:dicom:uid"

# HL7 AI Transparency on FHIR (hl7.fhir.uv.aitransparency): AIdeviceTypeCS and the AIKind
# extension (input/fsh/AIDevice.fsh of github.com/HL7/aitransparency-ig).
AI_IG = "http://hl7.org/fhir/uv/aitransparency"
AI_DEVICE_TYPE_SYSTEM = f"{AI_IG}/CodeSystem/AIdeviceTypeCS"
AI_KIND_EXTENSION = f"{AI_IG}/StructureDefinition/aitransparency.AIKind"

PROFILE = {
    "DiagnosticReport": (
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-note",
    ),
    "DocumentReference": (
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference",
    ),
    "Provenance": (
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance",
        f"{AI_IG}/StructureDefinition/AI-Provenance",
    ),
    "Device": (f"{AI_IG}/StructureDefinition/AI-Device",),
}

AI_SECURITY_LABEL = {
    "system": V3_OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

WriteTarget = Literal["diagnostic_report", "document_reference"]


def written_types(target: WriteTarget) -> frozenset[str]:
    """The resource types a draft for ``target`` writes (with the model's Device)."""
    main = {
        "diagnostic_report": ("DiagnosticReport", "Observation"),
        "document_reference": ("DocumentReference",),
    }
    return frozenset({*main[target], "Provenance", "Device"})


@dataclass(frozen=True)
class ModelIdentity:
    """The model that drafted: recorded as a FHIR Device."""

    name: str
    version: str
    weights_sha256: str | None = None
    manufacturer: str = "medvlm-pipeline"
    # The project's tiny random-weight test model: every draft and the Device say so.
    random_weights: bool = False


@dataclass(frozen=True)
class WriteOptions:
    """Where and as whom drafts are written (from ``JobSettings``)."""

    target: WriteTarget = "diagnostic_report"
    identifier_system: str = DEFAULT_IDENTIFIER_SYSTEM
    # The radiology department the drafts are made for: DiagnosticReport.performer,
    # DocumentReference.author and Provenance.agent.onBehalfOf (US Core provenance-1).
    organization: str | None = None
    organization_display: str = "Radiology"


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
    encounter: str | None = Field(
        default=None, description="Encounter/{id} of the order (ServiceRequest.encounter)."
    )
    imaging_study: str | None = Field(default=None, description="ImagingStudy/{id}.")
    study_uid: str | None = Field(
        default=None, description="Study Instance UID (the images given to the model)."
    )
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


# -- search keys ----------------------------------------------------------------------------


def escape_token(value: str) -> str:
    """FHIR R4 search 3.1.1.4.4 (escaping): ``\\ , $ |`` are escaped with a backslash."""
    for ch in ("\\", ",", "$", "|"):
        value = value.replace(ch, "\\" + ch)
    return value


def search_token(value: str, system: str | None = None) -> str:
    """The token search value ``system|value`` (or ``value`` in any system), not URL-encoded."""
    return escape_token(value) if system is None else f"{system}|{escape_token(value)}"


@dataclass(frozen=True)
class SearchKey:
    """The search that finds one written resource again: ``param=system|value``."""

    param: Literal["identifier", "_tag"]
    system: str
    value: str

    @property
    def token(self) -> str:
        return search_token(self.value, self.system)

    @property
    def query(self) -> str:
        """URL-encoded, for ``If-None-Exist`` and ``Bundle.entry.request.ifNoneExist``."""
        return urlencode([(str(self.param), self.token)])


@dataclass(frozen=True)
class PendingResource:
    """One resource of a draft, not yet written. Others refer to it by ``full_url`` (a
    urn:uuid); the writer replaces those references with the server's ``Type/id``."""

    full_url: str
    resource: dict[str, Any]
    key: SearchKey

    @property
    def resource_type(self) -> str:
        return str(self.resource["resourceType"])


@dataclass(frozen=True)
class DraftResources:
    """A draft's resources in write order: Observations, the report, its Provenance."""

    draft_id: str
    entries: tuple[PendingResource, ...]
    main_type: str = field(default="DiagnosticReport")

    @property
    def resources(self) -> tuple[dict[str, Any], ...]:
        return tuple(e.resource for e in self.entries)

    @property
    def main(self) -> PendingResource:
        return next(e for e in self.entries if e.resource_type == self.main_type)


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


def _meta(tag: str, system: str, rtype: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "security": [AI_SECURITY_LABEL],
        "tag": [{"system": system, "code": tag}],
    }
    if rtype in PROFILE:
        meta["profile"] = list(PROFILE[rtype])
    return meta


def _organization(options: WriteOptions) -> dict[str, Any]:
    ref: dict[str, Any] = {"display": options.organization_display}
    if options.organization:
        ref["reference"] = options.organization
    return ref


def _urn(tag: str, name: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{tag}/{name}')}"


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


def _narrative(text: str) -> dict[str, Any]:
    """Resource.text: the draft, escaped, as generated XHTML (dom-6)."""
    body = html.escape(text, quote=False)
    return {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><pre>{body}</pre></div>',
    }


def device_key(model: ModelIdentity, system: str = DEFAULT_IDENTIFIER_SYSTEM) -> SearchKey:
    """The identifier that finds the model's Device: one per (model name, version)."""
    return SearchKey("identifier", f"{system}:device", f"{model.name}|{model.version}")


def build_device(
    model: ModelIdentity,
    *,
    system: str = DEFAULT_IDENTIFIER_SYSTEM,
    options: WriteOptions | None = None,
) -> dict[str, Any]:
    """The model as a Device (HL7 AI Transparency AI-Device), identified by name and version."""
    key = device_key(model, system)
    identifier = [{"system": key.system, "value": key.value}]
    if model.weights_sha256:
        identifier.append({"system": f"{system}:weights-sha256", "value": model.weights_sha256})
    device = Device.model_validate(
        {
            "resourceType": "Device",
            "meta": {"security": [AI_SECURITY_LABEL], "profile": list(PROFILE["Device"])},
            "extension": [
                {
                    "url": AI_KIND_EXTENSION,
                    "valueCodeableConcept": {
                        "coding": [
                            _coding(
                                AI_DEVICE_TYPE_SYSTEM,
                                "Vision-Language-Models",
                                "Vision-Language Models",
                            )
                        ]
                    },
                }
            ],
            "identifier": identifier,
            "status": "active",
            "manufacturer": model.manufacturer,
            "deviceName": [{"name": model.name, "type": "model-name"}],
            "version": [{"value": model.version}],
            "type": {
                "coding": [
                    _coding(
                        AI_DEVICE_TYPE_SYSTEM,
                        "Artificial-Intelligence",
                        "All kinds of Artificial Intelligence",
                    )
                ],
                "text": "AI model: medical vision-language model (report drafting)"
                + (f" - {RANDOM_WEIGHTS_NOTICE}" if model.random_weights else ""),
            },
            "owner": (
                {"reference": options.organization}
                if options is not None and options.organization
                else None
            ),
            "note": [{"text": RANDOM_WEIGHTS_NOTICE}] if model.random_weights else None,
        }
    )
    return device.model_dump(mode="json", exclude_none=True)


def _observation(
    finding: Finding,
    index: int,
    links: StudyLinks,
    *,
    device: str,
    tag: str,
    system: str,
    critical: bool,
    issued: datetime,
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
            "category": [{"coding": [_coding(OBSERVATION_CATEGORY, "imaging", "Imaging")]}],
            "code": finding_code(finding.name),
            "subject": {"reference": _subject(links)},
            "encounter": {"reference": links.encounter} if links.encounter else None,
            "basedOn": [{"reference": links.service_request}] if links.service_request else None,
            "derivedFrom": [{"reference": links.imaging_study}] if links.imaging_study else None,
            "effectiveDateTime": _effective(links),
            "issued": issued.isoformat(),
            "device": {"reference": device},
            "valueCodeableConcept": presence_value(finding.presence),
            # The report's critical flag marks what the model says is there, not what it rules out.
            "interpretation": (
                [critical_interpretation()]
                if critical and finding.presence is Presence.PRESENT
                else None
            ),
            "note": [{"text": finding.detail}],
            "component": components,
        }
    )
    return obs.model_dump(mode="json", exclude_none=True)


def _entities(links: StudyLinks, sources: Iterable[str]) -> list[dict[str, Any]]:
    """One Provenance.entity per input of the model: the prompt's sources, the order, the study."""
    refs = list(dict.fromkeys([*sources, links.service_request, links.imaging_study]))
    entities: list[dict[str, Any]] = [
        {"role": "source", "what": {"reference": ref}} for ref in refs if ref
    ]
    if links.imaging_study is None and links.study_uid:
        # The images themselves, when the EHR has no ImagingStudy for them.
        entities.append(
            {
                "role": "source",
                "what": {
                    "identifier": {
                        "system": DICOM_UID_SYSTEM,
                        "value": f"urn:oid:{links.study_uid}",
                    },
                    "display": "DICOM study (images given to the model)",
                },
            }
        )
    return entities


def _provenance(
    tag: str,
    system: str,
    targets: Sequence[str],
    *,
    device: str,
    issued: datetime,
    links: StudyLinks,
    sources: Iterable[str],
    options: WriteOptions,
) -> dict[str, Any]:
    return Provenance.model_validate(
        {
            "resourceType": "Provenance",
            "meta": _meta(tag, system, "Provenance"),
            "target": [{"reference": ref} for ref in targets],
            "occurredDateTime": issued.isoformat(),
            "recorded": issued.isoformat(),
            "reason": [{"coding": [AI_SECURITY_LABEL]}],
            "activity": {
                "coding": [_coding(V3_DATA_OPERATION, "CREATE", "create")],
                "text": "AI draft of a radiology report (preliminary)",
            },
            "agent": [
                {
                    "type": {"coding": [_coding(PROVENANCE_PARTICIPANT, "author", "Author")]},
                    "role": [
                        {
                            "coding": [
                                _coding(
                                    AI_DEVICE_TYPE_SYSTEM,
                                    "Artificial-Intelligence",
                                    "All kinds of Artificial Intelligence",
                                )
                            ]
                        }
                    ],
                    "who": {"reference": device},
                    "onBehalfOf": _organization(options),
                }
            ],
            "entity": _entities(links, sources) or None,
        }
    ).model_dump(mode="json", exclude_none=True)


def build_draft_resources(
    report: DraftReport,
    links: StudyLinks,
    model: ModelIdentity,
    *,
    device: str,
    issued: datetime,
    options: WriteOptions | None = None,
    sources: Iterable[str] = (),
) -> DraftResources:
    """Everything one draft writes, in write order, keyed for idempotent writes.

    ``device`` is the model's Device as the EHR knows it (``Device/{id}``: written once per
    model version, see ``build_device``); ``sources`` the references whose content went into
    the prompt (the Provenance lists each, with the order and the study).
    """
    options = options or WriteOptions()
    system = options.identifier_system
    tag = draft_id(links.accession_number, model.version)
    text = render_text(report, random_weights=model.random_weights)
    encoded = base64.b64encode(text.encode()).decode("ascii")
    main_urn = _urn(tag, "report")
    entries: list[PendingResource] = []
    if options.target == "diagnostic_report":
        for i, finding in enumerate(report.findings):
            entries.append(
                PendingResource(
                    _urn(tag, f"f{i}"),
                    _observation(
                        finding,
                        i,
                        links,
                        device=device,
                        tag=tag,
                        system=system,
                        critical=report.critical,
                        issued=issued,
                    ),
                    SearchKey("identifier", system, f"{tag}-f{i}"),
                )
            )
        main = _diagnostic_report(
            report,
            links,
            tag,
            system,
            text,
            encoded,
            [e.full_url for e in entries],
            issued,
            options,
        )
        main_type = "DiagnosticReport"
    else:
        main = _document_reference(
            model, links, tag, system, text, encoded, device, issued, options
        )
        main_type = "DocumentReference"
    entries.append(PendingResource(main_urn, main, SearchKey("identifier", system, tag)))
    targets = [main_urn, *(e.full_url for e in entries[:-1])]
    provenance = _provenance(
        tag,
        system,
        targets,
        device=device,
        issued=issued,
        links=links,
        sources=sources,
        options=options,
    )
    entries.append(
        PendingResource(_urn(tag, "provenance"), provenance, SearchKey("_tag", system, tag))
    )
    return DraftResources(tag, tuple(entries), main_type)


def _diagnostic_report(
    report: DraftReport,
    links: StudyLinks,
    tag: str,
    system: str,
    text: str,
    encoded: str,
    results: Sequence[str],
    issued: datetime,
    options: WriteOptions,
) -> dict[str, Any]:
    return DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "meta": _meta(tag, system, "DiagnosticReport"),
            "text": _narrative(text),
            "identifier": [{"system": system, "value": tag}],
            "status": "preliminary",
            "category": [
                {"coding": [_coding(LOINC, "LP29684-5", "Radiology")]},
                {"coding": [_coding(V2_0074, "RAD", "Radiology")]},
            ],
            "code": {"coding": [_coding(LOINC, "18748-4", "Diagnostic imaging study")]},
            "subject": {"reference": _subject(links)},
            "encounter": {"reference": links.encounter} if links.encounter else None,
            "basedOn": [{"reference": links.service_request}] if links.service_request else None,
            "imagingStudy": [{"reference": links.imaging_study}] if links.imaging_study else None,
            # The clinically relevant time is the study's; without one there is no effective
            # time at all (issued is when the draft was made, not when the patient was imaged).
            "effectiveDateTime": _effective(links),
            "issued": issued.isoformat(),
            "performer": [_organization(options)],
            "conclusion": report.impression,
            "presentedForm": [
                {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "en",
                    "data": encoded,
                    "title": "Preliminary AI draft",
                }
            ],
            "result": [{"reference": ref} for ref in results] or None,
        }
    ).model_dump(mode="json", exclude_none=True)


def _document_reference(
    model: ModelIdentity,
    links: StudyLinks,
    tag: str,
    system: str,
    text: str,
    encoded: str,
    device: str,
    issued: datetime,
    options: WriteOptions,
) -> dict[str, Any]:
    period = {"start": _effective(links)} if links.study_started is not None else None
    return DocumentReference.model_validate(
        {
            "resourceType": "DocumentReference",
            "meta": _meta(tag, system, "DocumentReference"),
            "text": _narrative(text),
            "identifier": [{"system": system, "value": tag}],
            "status": "current",
            "docStatus": "preliminary",
            "type": {"coding": [_coding(LOINC, "18748-4", "Diagnostic imaging study")]},
            "category": [
                {"coding": [_coding(US_CORE_DOCREF_CATEGORY, "clinical-note", "Clinical Note")]},
                {"coding": [_coding(LOINC, "LP29684-5", "Radiology")]},
            ],
            "subject": {"reference": _subject(links)},
            "date": issued.isoformat(),
            "author": [{"reference": device}, _organization(options)],
            "description": f"Preliminary AI draft ({model.name} {model.version})",
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "language": "en",
                        "data": encoded,
                        "title": "Preliminary AI draft",
                        "creation": issued.isoformat(),
                    },
                    "format": _coding(
                        IHE_FORMAT_CODE,
                        "urn:ihe:iti:xds:2017:mimeTypeSufficient",
                        "mimeType Sufficient",
                    ),
                }
            ],
            "context": {
                "encounter": [{"reference": links.encounter}] if links.encounter else None,
                "period": period,
                "related": [
                    {"reference": ref}
                    for ref in (links.service_request, links.imaging_study)
                    if ref
                ]
                or None,
            },
        }
    ).model_dump(mode="json", exclude_none=True)


def as_transaction(resources: DraftResources) -> Bundle:
    """The draft as one transaction Bundle of conditional creates (``ifNoneExist`` on each key):
    a replay on a server that honours them creates nothing new."""
    entries = [
        {
            "fullUrl": pending.full_url,
            "resource": pending.resource,
            "request": {
                "method": "POST",
                "url": pending.resource_type,
                "ifNoneExist": pending.key.query,
            },
        }
        for pending in resources.entries
    ]
    return Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )
