"""Clinical context for the prompt, from FHIR resources and DICOM header fields. No I/O.

Takes the parts of an EHR context (FHIR R4B resources) and returns a ``StudyContext``: the
indication from the ServiceRequest (``reasonCode`` / ``reasonReference`` display, else its
``note``), the relevant active Conditions, the latest prior report's impression
(``DiagnosticReport.conclusion``), plus modality, body part and study description from DICOM.
Nothing that identifies the patient is copied: names, identifiers and birth dates are never read.
"""

from __future__ import annotations

from collections.abc import Sequence

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.servicerequest import ServiceRequest

from pipeline.prompts import StudyContext

MAX_CONDITIONS = 8
MAX_FIELD_CHARS = 300


def concept_text(concept: CodeableConcept | None) -> str | None:
    """Human text of a CodeableConcept: ``text``, else the first coding's display or code."""
    if concept is None:
        return None
    if concept.text:
        return str(concept.text)
    for coding in concept.coding or []:
        if coding.display:
            return str(coding.display)
    for coding in concept.coding or []:
        if coding.code:
            return str(coding.code)
    return None


def _clip(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"


def indication(service_request: ServiceRequest | None) -> str | None:
    if service_request is None:
        return None
    reasons = [concept_text(c) for c in service_request.reasonCode or []]
    reasons += [str(ref.display) for ref in service_request.reasonReference or [] if ref.display]
    found = [r for r in reasons if r]
    if found:
        return _clip("; ".join(found))
    notes = [str(n.text) for n in service_request.note or [] if n.text]
    return _clip(" ".join(notes)) if notes else None


def condition_names(conditions: Sequence[Condition]) -> tuple[str, ...]:
    names: list[str] = []
    for condition in conditions:
        name = _clip(concept_text(condition.code))
        if name and name not in names:
            names.append(name)
    return tuple(names[:MAX_CONDITIONS])


def prior_impression(prior_reports: Sequence[DiagnosticReport]) -> str | None:
    """The conclusion of the first (latest) prior report that has one."""
    for report in prior_reports:
        if report.conclusion:
            return _clip(str(report.conclusion))
    return None


def study_context(
    *,
    modality: str,
    body_part: str | None,
    study_description: str | None,
    service_request: ServiceRequest | None,
    conditions: Sequence[Condition],
    prior_reports: Sequence[DiagnosticReport],
) -> StudyContext:
    return StudyContext(
        modality=modality,
        body_part=_clip(body_part),
        study_description=_clip(study_description),
        indication=indication(service_request),
        conditions=condition_names(conditions),
        prior_impression=prior_impression(prior_reports),
    )
