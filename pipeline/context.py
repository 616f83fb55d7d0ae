"""Clinical context for the prompt, from FHIR resources and DICOM header fields. No I/O.

Takes the parts of an EHR context (FHIR R4B resources) and returns a ``StudyContext``: the
indication from the ServiceRequest (``reasonCode`` / ``reasonReference`` display, else its
``note``), the relevant active Conditions, the latest prior report's impression
(``DiagnosticReport.conclusion``), plus modality, body part and study description from DICOM.
Nothing that identifies the patient is copied: names, identifiers and birth dates are never read.

The answer must not leak into the prompt: ``eligible_priors`` keeps only signed radiology
reports a reader had before the study started, never this order's own report and never an AI
draft; ``build_prompt_context`` records which resources were actually used (``sources``) so the
draft's Provenance can cite exactly those.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest

from pipeline.ehr_rules import SIGNED_REPORT_STATUSES, carries_identifier, reference_target
from pipeline.fhir_resources import LOINC, V2_0074
from pipeline.prompts import StudyContext

MAX_CONDITIONS = 8
MAX_FIELD_CHARS = 300


#: HL7 v2 table 0074 (Diagnostic Service Section ID) codes of radiology sections: Radiology,
#: Radiograph, CAT Scan, Nuclear Magnetic Resonance, Nuclear Medicine Scan, Radiology /
#: OB / Vascular Ultrasound, Cineradiograph. Left out on purpose: CUS (Cardiac Ultrasound) and
#: CTH (Cardiac Catheterization), which are cardiology reports, and RT (Radiation Therapy).
V2_0074_IMAGING_SECTIONS: tuple[str, ...] = (
    "RAD",
    "RX",
    "CT",
    "NMR",
    "NMS",
    "RUS",
    "OUS",
    "VUS",
    "XRC",
)

#: ``DiagnosticReport.category`` codings that mark a radiology report: LOINC LP29684-5
#: (Radiology, the US Core category), LOINC 18726-0 (Radiology studies (set), used as the
#: category by several national profiles) and the v2-0074 imaging sections above.
RADIOLOGY_CATEGORIES: frozenset[tuple[str, str]] = frozenset(
    {(LOINC, "LP29684-5"), (LOINC, "18726-0")}
    | {(V2_0074, code) for code in V2_0074_IMAGING_SECTIONS}
)

#: ``DiagnosticReport.code`` LOINC codes of a generic imaging report, for servers that send no
#: usable category: 18748-4 Diagnostic imaging study (US Core's generic imaging narrative),
#: 18782-3 Radiology Study observation (narrative), 18726-0 Radiology studies (set) and
#: 68604-8 Radiology Diagnostic study note (LOINC Document Ontology). Modality-specific codes
#: (e.g. "XR Chest 2 Views") are thousands; a report carrying only one of them needs a category.
IMAGING_REPORT_CODES: frozenset[tuple[str, str]] = frozenset(
    (LOINC, code) for code in ("18748-4", "18782-3", "18726-0", "68604-8")
)

#: ``meta.security`` code of AI-asserted content (v3 ObservationValue AIAST), which our drafts
#: carry (``pipeline.fhir_resources.AI_SECURITY_LABEL``) and other AI products should too.
AI_ASSERTED = "AIAST"

_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_ONE_MICROSECOND = dt.timedelta(microseconds=1)


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
    """Whitespace collapsed and cut to ``MAX_FIELD_CHARS``; None for empty or blank text."""
    if not text:
        return None
    text = " ".join(text.split())
    if not text:
        return None
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"


def indication(service_request: ServiceRequest | None) -> str | None:
    """The reason for the examination: ``ServiceRequest.reasonCode`` texts and
    ``ServiceRequest.reasonReference.display``, else ``ServiceRequest.note.text``."""
    if service_request is None:
        return None
    reasons = [concept_text(c) for c in service_request.reasonCode or []]
    reasons += [str(ref.display) for ref in service_request.reasonReference or [] if ref.display]
    found = [r for r in reasons if r and r.strip()]
    if found:
        return _clip("; ".join(found))
    notes = [str(n.text) for n in service_request.note or [] if n.text]
    return _clip(" ".join(notes)) if notes else None


def _kept_conditions(conditions: Sequence[Condition]) -> list[tuple[str, Condition]]:
    """The conditions whose ``Condition.code`` text goes into the prompt, with that text: the
    first condition of each distinct name, at most ``MAX_CONDITIONS``."""
    kept: list[tuple[str, Condition]] = []
    names: set[str] = set()
    for condition in conditions:
        name = _clip(concept_text(condition.code))
        if name and name not in names:
            names.add(name)
            kept.append((name, condition))
    return kept[:MAX_CONDITIONS]


def condition_names(conditions: Sequence[Condition]) -> tuple[str, ...]:
    """Distinct ``Condition.code`` texts, in the given order, at most ``MAX_CONDITIONS``."""
    return tuple(name for name, _ in _kept_conditions(conditions))


def _impression_source(
    prior_reports: Sequence[DiagnosticReport],
) -> tuple[str, DiagnosticReport] | None:
    """The first report with a ``DiagnosticReport.conclusion``, and that conclusion."""
    for report in prior_reports:
        conclusion = _clip(str(report.conclusion)) if report.conclusion else None
        if conclusion:
            return conclusion, report
    return None


def prior_impression(prior_reports: Sequence[DiagnosticReport]) -> str | None:
    """The conclusion (``DiagnosticReport.conclusion``) of the first (latest) prior report that
    has one. Pass ``eligible_priors(...)``, which orders latest first and drops ineligible ones."""
    found = _impression_source(prior_reports)
    return found[0] if found else None


# --- prior reports ----------------------------------------------------------------------------


def is_radiology_report(report: DiagnosticReport) -> bool:
    """Whether a report is a radiology report.

    True when a ``DiagnosticReport.category`` coding is in ``RADIOLOGY_CATEGORIES`` (LOINC
    LP29684-5 Radiology, LOINC 18726-0, or a v2-0074 imaging section such as RAD, CT, RUS), or
    a ``DiagnosticReport.code`` coding is in ``IMAGING_REPORT_CODES``. System and code must
    both match: ``CT`` in an unknown system is not v2-0074 CT.
    """
    for concept in report.category or []:
        for coding in concept.coding or []:
            if (str(coding.system), str(coding.code)) in RADIOLOGY_CATEGORIES:
                return True
    codings = (report.code.coding if report.code is not None else None) or []
    return any((str(c.system), str(c.code)) in IMAGING_REPORT_CODES for c in codings)


def _span(value: object) -> tuple[dt.datetime, dt.datetime] | None:
    """The UTC interval ``[start, end)`` a FHIR date/dateTime/instant value covers.

    An instant covers one microsecond; a date its whole day; ``YYYY-MM`` and ``YYYY`` (FHIR
    partial dates, which fhir.resources keeps as strings) the whole month or year. A naive
    datetime and a date carry no zone and are read as UTC. Anything else is None.
    """
    try:
        if isinstance(value, dt.datetime):
            aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
            start = aware.astimezone(dt.UTC)
            return start, start + _ONE_MICROSECOND
        if isinstance(value, dt.date):
            start = dt.datetime.combine(value, dt.time(), dt.UTC)
            return start, start + dt.timedelta(days=1)
        if isinstance(value, str):
            text = value.strip()
            partial = _PARTIAL_DATE.fullmatch(text)
            if partial is None:
                return _span(dt.datetime.fromisoformat(text))
            year = int(partial[1])
            month = int(partial[2]) if partial[2] else None
            if month is not None and partial[3]:
                return _span(dt.date(year, month, int(partial[3])))
            if month is not None:
                start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
                # First day of the next month.
                return start, dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.UTC)
            return (
                dt.datetime(year, 1, 1, tzinfo=dt.UTC),
                dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC),
            )
    except (ValueError, OverflowError):
        return None
    return None


def report_time(report: DiagnosticReport) -> dt.datetime | dt.date | str | None:
    """The clinically relevant time of a report: ``DiagnosticReport.effectiveDateTime``, else
    ``DiagnosticReport.effectivePeriod.start``, else ``DiagnosticReport.issued``.

    As fhir.resources gives it: a datetime, a date, or a partial date string (``YYYY``,
    ``YYYY-MM``); None when the report has none of the three.
    """
    if report.effectiveDateTime is not None:
        return report.effectiveDateTime
    if report.effectivePeriod is not None and report.effectivePeriod.start is not None:
        return report.effectivePeriod.start
    return report.issued


def _is_ai_asserted(report: DiagnosticReport) -> bool:
    """``DiagnosticReport.meta.security`` carries AIAST (in any code system, to be safe)."""
    security = report.meta.security if report.meta is not None else None
    return any(str(coding.code) == AI_ASSERTED for coding in security or [])


def eligible_priors(
    reports: Iterable[DiagnosticReport],
    *,
    before: dt.datetime | dt.date | None,
    order_id: str | None,
    accession_number: str | None,
    accession_system: str | None,
) -> list[DiagnosticReport]:
    """The reports a reader had before the study: signed radiology reports, latest first.

    A report is kept only if all hold:

    - ``is_radiology_report`` (so a lab report is never a "prior");
    - ``DiagnosticReport.status`` in ``SIGNED_REPORT_STATUSES`` (final, amended, corrected);
    - its clinically relevant time (``report_time``) lies entirely before ``before`` (the
      study's start, e.g. ``pipeline.dicom_time.study_instant``). Each side is an interval:
      an instant, a whole (UTC) day for a date, a month or year for a partial date; a report
      whose interval could reach the study's start is not "before" it, so a same-day report is
      excluded when either side is only a date. Naive datetimes and dates are read as UTC.
      ``before`` None means "before the study" cannot be decided: no priors at all;
    - not ``DiagnosticReport.basedOn`` this order: a reference ``ServiceRequest/{order_id}``
      (relative, absolute or versioned), or a logical reference whose identifier is the
      accession number;
    - no ``DiagnosticReport.identifier`` with ``accession_number`` (in ``accession_system``
      when given, see ``pipeline.ehr_rules.carries_identifier``; in any system otherwise);
    - not an AI draft (``DiagnosticReport.meta.security`` AIAST), even one a radiologist signed.

    Ordered latest first by that time, comparing real instants (on equal starts the wider
    interval, e.g. a whole day, ranks later); reports without a readable time are dropped.
    ``order_id`` is the order's logical id (``ServiceRequest/{id}`` is accepted too).
    """
    if before is None:
        return []
    study = _span(before)
    if study is None:
        return []
    study_start = study[0]
    wanted_order = order_id.strip() if order_id else None
    if wanted_order and "/" in wanted_order:  # given as "ServiceRequest/{id}" or a full URL
        target = reference_target(wanted_order)
        wanted_order = target[1] if target is not None else wanted_order
    accession = accession_number.strip() if accession_number else None
    kept: list[tuple[tuple[dt.datetime, dt.datetime], DiagnosticReport]] = []
    for report in reports:
        if report.status not in SIGNED_REPORT_STATUSES or not is_radiology_report(report):
            continue
        if _is_ai_asserted(report):
            continue
        span = _span(report_time(report))
        if span is None or span[1] > study_start:
            continue
        based_on = report.basedOn or []
        if wanted_order and any(
            (target := reference_target(str(ref.reference))) is not None
            and target == ("ServiceRequest", wanted_order)
            for ref in based_on
            if ref.reference
        ):
            continue
        if accession:
            identifiers = list(report.identifier or [])
            identifiers += [ref.identifier for ref in based_on if ref.identifier is not None]
            if carries_identifier(
                identifiers, accession, accession_system, unknown_system_matches=True
            ):
                continue
        kept.append((span, report))
    kept.sort(key=lambda item: item[0], reverse=True)
    return [report for _, report in kept]


# --- the prompt context -----------------------------------------------------------------------


@dataclass(frozen=True)
class PromptContext:
    """The prompt's clinical context and the FHIR resources it was built from.

    ``sources`` are references (``ServiceRequest/1``, ``Condition/7``, ``DiagnosticReport/9``)
    of exactly the resources whose content is in ``context``, for the draft's
    ``Provenance.entity`` (role ``source``). A resource without ``id`` cannot be referenced
    and is used without being listed.
    """

    context: StudyContext
    sources: tuple[str, ...]


def _reference(resource: Resource) -> str | None:
    """``{resourceType}/{id}`` (FHIR R4 Reference.reference, relative form), or None."""
    return f"{resource.get_resource_type()}/{resource.id}" if resource.id else None


def build_prompt_context(
    *,
    modality: str,
    body_part: str | None,
    study_description: str | None,
    service_request: ServiceRequest | None,
    conditions: Sequence[Condition],
    prior_reports: Sequence[DiagnosticReport],
) -> PromptContext:
    """The ``StudyContext`` for a study, and the references of the resources that went into it.

    ``modality``, ``body_part`` and ``study_description`` are Modality (0008,0060), Body Part
    Examined (0018,0015) and Study Description (0008,1030). The order is a source only if it
    gave an indication (``ServiceRequest.reasonCode``/``reasonReference``/``note``); the
    conditions only those kept (``Condition.code``, deduplicated, at most ``MAX_CONDITIONS``);
    the prior reports only the one whose ``DiagnosticReport.conclusion`` became the prior
    impression. ``prior_reports`` must already be filtered and ordered (``eligible_priors``).
    """
    reason = indication(service_request)
    kept = _kept_conditions(conditions)
    impression = _impression_source(prior_reports)
    used: list[Resource] = []
    if reason and service_request is not None:
        used.append(service_request)
    used += [condition for _, condition in kept]
    if impression is not None:
        used.append(impression[1])
    sources = tuple(ref for ref in (_reference(resource) for resource in used) if ref)
    context = StudyContext(
        modality=modality,
        body_part=_clip(body_part),
        study_description=_clip(study_description),
        indication=reason,
        conditions=tuple(name for name, _ in kept),
        prior_impression=impression[0] if impression else None,
    )
    return PromptContext(context=context, sources=tuple(dict.fromkeys(sources)))
