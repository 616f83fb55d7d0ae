"""A draft as a DICOM Structured Report (Comprehensive SR, built with highdicom). No I/O.

The same draft the EHR receives as a preliminary DiagnosticReport (``pipeline.fhir_resources``)
can also go to the PACS the images came from, where a viewer shows it beside the study. What
one draft becomes:

- a Comprehensive SR instance (SOP Class 1.2.840.10008.5.1.4.1.1.88.33) in the source study:
  the Patient and Study modules copied from the source images (it goes into the same PACS), the
  study's reportable images as evidence (Current Requested Procedure Evidence Sequence);
- marked as an unsigned AI draft in the header and in the content: ``CompletionFlag`` PARTIAL,
  ``VerificationFlag`` UNVERIFIED, ``PreliminaryFlag`` PRELIMINARY, and a first text item
  ``AI_NOTICE``; the model as the Device observer of the content (observer context, TID 1004:
  name, manufacturer, model name) and as the equipment (Manufacturer, ManufacturerModelName,
  SoftwareVersions); the series description says so too;
- a content tree shaped like TID 2000 (Basic Diagnostic Imaging Report; no template is
  claimed): root "Diagnostic imaging report" (LOINC 18748-4) → "Findings" (one CODE item
  per finding: the finding's code —
  ``pipeline.finding_codes``, SNOMED CT where published, else the local scheme ``99MEDVLM`` —
  valued with its presence, with laterality, finding site, severity and the detail as
  properties) → "Impressions" (the impression) → "Recommendations".

Its Series and SOP Instance UIDs are derived from the draft id (``draft_id``: accession and
model version), so storing it again replaces the same instance instead of adding a second one.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ObserverContext,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from pipeline.fhir_resources import RANDOM_WEIGHTS_NOTICE, ModelIdentity
from pipeline.finding_codes import FINDING_CODES, PRESENCE_CODES, SNOMED_CT
from pipeline.report import DraftReport, Finding, Laterality, Severity

AI_NOTICE = "AI-generated preliminary draft — not a signed report"
CRITICAL_NOTICE = "Critical result flagged by the model - communicate per policy."
SERIES_DESCRIPTION = "AI preliminary draft (unverified)"
SERIES_NUMBER = 9901
LOCAL_SCHEME = "99MEDVLM"
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

_UID_NAMESPACE = uuid.UUID("6f1d6a43-57f0-4c55-9b6f-2a51b0e4d2a1")

DIAGNOSTIC_IMAGING_REPORT = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
_CONTAINS = RelationshipTypeValues.CONTAINS
_PROPERTIES = RelationshipTypeValues.HAS_PROPERTIES

# CID 244 (Laterality); midline has no code there, so it is written in the local scheme.
_LATERALITY: dict[Laterality, CodedConcept] = {
    Laterality.LEFT: CodedConcept("7771000", "SCT", "Left"),
    Laterality.RIGHT: CodedConcept("24028007", "SCT", "Right"),
    Laterality.BILATERAL: CodedConcept("51440002", "SCT", "Right and left"),
    Laterality.MIDLINE: CodedConcept("midline", LOCAL_SCHEME, "Midline"),
}
# CID 3716 (Severity).
_SEVERITY: dict[Severity, CodedConcept] = {
    Severity.MILD: CodedConcept("255604002", "SCT", "Mild"),
    Severity.MODERATE: CodedConcept("6736007", "SCT", "Moderate"),
    Severity.SEVERE: CodedConcept("24484000", "SCT", "Severe"),
}


def dicom_uid(name: str) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a UUID derived from ``name``: stable across runs."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class SrUids:
    series: str
    instance: str


def sr_uids(draft_id: str) -> SrUids:
    """The SR's Series and SOP Instance UIDs for a draft (``pipeline.fhir_resources.draft_id``)."""
    return SrUids(series=dicom_uid(f"{draft_id}/series"), instance=dicom_uid(f"{draft_id}/sr"))


def is_sr(ds: Dataset) -> bool:
    """Whether an instance is a Structured Report (never evidence of another draft)."""
    return str(ds.get("SOPClassUID", "")).startswith(SR_SOP_CLASS_PREFIX)


def _finding_concept(finding: Finding) -> CodedConcept:
    published = FINDING_CODES.get(finding.name)
    label = finding.name.value.replace("_", " ")
    if published is not None and published.system == SNOMED_CT:
        return CodedConcept(published.code, "SCT", published.display)
    return CodedConcept(finding.name.value, LOCAL_SCHEME, label)


def _finding_item(finding: Finding) -> CodeContentItem:
    presence = PRESENCE_CODES[finding.presence]
    item = CodeContentItem(
        name=_finding_concept(finding),
        value=CodedConcept(presence.code, "SCT", presence.display),
        relationship_type=_CONTAINS,
    )
    properties: list[CodeContentItem | TextContentItem] = []
    if finding.laterality in _LATERALITY:
        properties.append(
            CodeContentItem(
                codes.SCT.Laterality, _LATERALITY[finding.laterality], relationship_type=_PROPERTIES
            )
        )
    properties.append(
        TextContentItem(codes.SCT.FindingSite, finding.location, relationship_type=_PROPERTIES)
    )
    if finding.severity in _SEVERITY:
        properties.append(
            CodeContentItem(
                codes.SCT.Severity, _SEVERITY[finding.severity], relationship_type=_PROPERTIES
            )
        )
    properties.append(
        TextContentItem(codes.DCM.Comment, finding.detail, relationship_type=_PROPERTIES)
    )
    item.ContentSequence = Sequence(properties)
    return item


def _section(name: object, items: Seq[Dataset]) -> ContainerContentItem:
    section = ContainerContentItem(name=name, relationship_type=_CONTAINS)  # type: ignore[arg-type]
    section.ContentSequence = Sequence(list(items))
    return section


def model_device_uid(model: ModelIdentity) -> str:
    """The model's Device Observer UID: one per (model name, version)."""
    return dicom_uid(f"device/{model.name}/{model.version}")


def content_tree(report: DraftReport, model: ModelIdentity) -> ContainerContentItem:
    """The SR content: observer context, the AI notice, findings, impression, recommendation."""
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model_device_uid(model),
            name=model.name[:64],
            manufacturer_name=model.manufacturer[:64],
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    notices = [AI_NOTICE]
    if model.random_weights:
        notices.insert(0, RANDOM_WEIGHTS_NOTICE)
    if report.critical:
        notices.append(CRITICAL_NOTICE)
    root = ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT)
    notice_items = [
        TextContentItem(codes.DCM.Comment, text, relationship_type=_CONTAINS) for text in notices
    ]
    root.ContentSequence = Sequence(
        [
            *observer,
            *notice_items,
            _section(codes.DCM.Findings, [_finding_item(f) for f in report.findings]),
            _section(
                codes.DCM.Impressions,
                [
                    TextContentItem(
                        codes.DCM.Impression, report.impression, relationship_type=_CONTAINS
                    )
                ],
            ),
            _section(
                codes.DCM.Recommendations,
                [
                    TextContentItem(
                        codes.DCM.Recommendation, report.recommendation, relationship_type=_CONTAINS
                    )
                ],
            ),
        ]
    )
    return root


# Type 2 attributes highdicom copies from the first evidence instance (empty when absent).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)


def build_sr(
    report: DraftReport,
    model: ModelIdentity,
    *,
    draft_id: str,
    evidence: Seq[Dataset],
    institution_name: str | None = None,
) -> ComprehensiveSR:
    """The draft as a Comprehensive SR in the study of ``evidence`` (the source instances'
    headers: the study's reportable images; SR instances among them are left out)."""
    images = [ds for ds in evidence if not is_sr(ds)]
    if not images:
        raise ValueError("a draft SR needs at least one source image as evidence")
    first = copy.copy(images[0])
    for keyword in _TYPE2_COPIED:
        if keyword not in first:
            setattr(first, keyword, None)
    # UTF-8: the AI notice's dash, and any name pydicom decoded from the source's character set.
    first.SpecificCharacterSet = "ISO_IR 192"
    uids = sr_uids(draft_id)
    sr = ComprehensiveSR(
        evidence=[first, *images[1:]],
        content=content_tree(report, model),
        series_instance_uid=uids.series,
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.instance,
        instance_number=1,
        manufacturer=model.manufacturer[:64],
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
    )
    return sr


__all__ = [
    "AI_NOTICE",
    "SERIES_DESCRIPTION",
    "build_sr",
    "content_tree",
    "dicom_uid",
    "is_sr",
    "model_device_uid",
    "sr_uids",
]
