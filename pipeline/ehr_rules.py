"""Which EHR resources the pipeline relies on: the selection rules, once, for every EHR.

Pure functions over ``fhir.resources.R4B`` models. The FHIR REST connector and the NDJSON folder
connector search differently, but both decide with these rules, so they cannot drift apart (they
did: one sorted reports by datetime, the other by string). What the pipeline asks of an EHR:

- the clinical context of an order (``EhrContext``, filled by a connector);
- whether a radiologist has already signed the order (``signed_report_of``);
- the ids of what a write created (``created_ids``);
- whether a resource carries a modifier extension, which this project never understands
  (``modifier_extension_urls``).

Which prior reports a prompt may show is ``pipeline.context.eligible_priors``.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest

#: DiagnosticReport.status values of a signed report (FHIR R4 diagnostic-report-status): final,
#: or amended/corrected after it was final. ``preliminary`` (incl. our own drafts) is excluded.
SIGNED_REPORT_STATUSES: tuple[str, ...] = ("final", "amended", "corrected")


@dataclass(frozen=True)
class EhrContext:
    """Clinical context of one imaging order, as read from the EHR.

    ``conditions`` are the patient's active Conditions (``Condition.clinicalStatus`` = active);
    ``prior_reports`` the patient's signed DiagnosticReports (status final, amended or
    corrected), in no particular order: which of them a prompt may show, and in what order, is
    ``pipeline.context.eligible_priors``'s decision; ``imaging_studies`` the patient's
    ImagingStudies, latest first by ``started``.
    """

    patient: Patient
    service_request: ServiceRequest | None
    conditions: tuple[Condition, ...]
    prior_reports: tuple[DiagnosticReport, ...]
    imaging_studies: tuple[ImagingStudy, ...]


def reference_target(reference: str | None) -> tuple[str, str] | None:
    """``(type, id)`` of a relative or absolute literal ``Reference.reference`` (FHIR R4
    References), ignoring a ``/_history/{vid}`` suffix; None for other forms (``#contained``)."""
    if not reference:
        return None
    path = reference.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    parts = path.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2] or not parts[-1]:
        return None
    return parts[-2], parts[-1]


def local_id(reference: str | None, rtype: str) -> str | None:
    """``Patient/123``, ``https://…/Patient/123/_history/2`` → ``123`` (None for other types)."""
    target = reference_target(reference)
    return target[1] if target is not None and target[0] == rtype else None


def carries_identifier(
    identifiers: Iterable[Identifier],
    value: str,
    system: str | None,
    *,
    unknown_system_matches: bool = False,
) -> bool:
    """Whether one of ``identifiers`` has ``value`` in ``system`` (any system when None).

    ``unknown_system_matches``: an identifier without a system matches even when ``system``
    is given (its namespace is unknown); for safety checks, where a false match is the safe
    side.
    """
    for identifier in identifiers:
        if identifier.value is None or str(identifier.value).strip() != value:
            continue
        if system is None or str(identifier.system or "") == system:
            return True
        if identifier.system is None and unknown_system_matches:
            return True
    return False


def is_based_on(report: DiagnosticReport, order_id: str) -> bool:
    """Whether ``DiagnosticReport.basedOn`` names ``ServiceRequest/{order_id}`` (relative,
    absolute or versioned)."""
    return any(local_id(b.reference, "ServiceRequest") == order_id for b in report.basedOn or [])


def is_active(condition: Condition) -> bool:
    """``Condition.clinicalStatus`` is ``active``."""
    status = condition.clinicalStatus
    return status is not None and any(c.code == "active" for c in status.coding or [])


_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime:
    if value is None:
        return _EARLIEST
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def latest_signed_report(reports: Iterable[DiagnosticReport]) -> DiagnosticReport | None:
    """Of ``reports``, the latest by ``issued`` whose status is in ``SIGNED_REPORT_STATUSES``.

    Reports without ``issued`` rank below those with one; ties go to the later
    ``meta.lastUpdated``, then to the first seen. None if no report is signed.
    """
    best: DiagnosticReport | None = None
    best_key: tuple[dt.datetime, dt.datetime] | None = None
    for report in reports:
        if report.status not in SIGNED_REPORT_STATUSES:
            continue
        updated = report.meta.lastUpdated if report.meta is not None else None
        key = (_aware(report.issued), _aware(updated))
        if best_key is None or key > best_key:
            best, best_key = report, key
    return best


def signed_report_of(
    reports: Iterable[DiagnosticReport],
    *,
    order_id: str | None,
    accession_number: str | None,
    accession_system: str | None,
) -> DiagnosticReport | None:
    """The radiologist's signed report of an order among ``reports``, or None.

    Signed (``SIGNED_REPORT_STATUSES``) and based on ``ServiceRequest/{order_id}``; when none
    is, signed and carrying the accession number as an identifier (in ``accession_system``
    when given). The latest by ``issued`` wins (``latest_signed_report``). Everything a server
    sends is checked here again: servers differ on multi-value ``status`` and ``based-on``,
    and some ignore a parameter with only a warning.
    """
    candidates = list(reports)
    if order_id is not None:
        found = latest_signed_report(r for r in candidates if is_based_on(r, order_id))
        if found is not None:
            return found
    if not accession_number:
        return None
    return latest_signed_report(
        r
        for r in candidates
        if carries_identifier(r.identifier or [], accession_number, accession_system)
    )


_LOGICAL_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id datatype


@functools.cache
def is_resource_type(name: str) -> bool:
    """Whether ``name`` is an R4B resource type (``Observation``; not ``fhir``, ``R4``, or a
    datatype such as ``Identifier``)."""
    if not name[:1].isupper() or not name.isalpha():
        return False
    try:
        model = get_fhir_model_class(name)
    except (KeyError, ValueError):
        return False
    return issubclass(model, Resource)


def location_target(location: str | None) -> tuple[str, str] | None:
    """``(type, id)`` named by a write's ``Location`` / ``Bundle.entry.response.location``.

    Servers answer ``[type]/[id]/_history/[vid]`` relative to the base, or absolute
    (``https://host/fhir/R4/[type]/[id]/_history/[vid]``), some without the version (FHIR R4
    http.html#create, Bundle.entry.response.location). The base (scheme, host, port and path
    prefix), the query and the ``/_history/[vid]`` part are ignored; what is left must end in a
    resource type and a FHIR id, or the location names nothing (None): a bare base URL, a
    ``urn:uuid:``, a type without an id.
    """
    if not location:
        return None
    path = urlsplit(location.strip()).path
    segments = [part for part in path.split("/") if part]
    if len(segments) >= 2 and segments[-2] == "_history":
        segments = segments[:-2]
    elif segments and segments[-1] == "_history":
        segments = segments[:-1]
    if len(segments) < 2:
        return None
    rtype, rid = segments[-2], segments[-1]
    if not is_resource_type(rtype) or not _LOGICAL_ID.match(rid):
        return None
    return rtype, rid


def created_ids(locations: Iterable[str | None]) -> dict[str, list[str]]:
    """Resource type → logical ids, from the ``Location`` (or ``Bundle.entry.response.location``)
    of each write, relative or absolute, with or without ``/_history/{vid}``
    (``location_target``); locations that name no resource are left out."""
    ids: dict[str, list[str]] = {}
    for location in locations:
        target = location_target(location)
        if target is not None:
            ids.setdefault(target[0], []).append(target[1])
    return ids


def _modifier_urls(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "modifierExtension" and isinstance(value, list):
                yield from (str(e.get("url")) for e in value if isinstance(e, dict))
            yield from _modifier_urls(value)
    elif isinstance(data, list):
        for item in data:
            yield from _modifier_urls(item)


def modifier_extension_urls(resource: Resource) -> tuple[str, ...]:
    """The ``url`` of every ``modifierExtension`` on the resource or any of its elements.

    This project understands no modifier extension. FHIR R4 (extensibility.html#modifierExtension)
    says one changes the meaning of the element that carries it (an order "not to be done", a
    condition "refuted"), and that an application which does not understand it SHALL refuse to
    process the resource or process it safely. ``fhir.resources`` parses it without a word, so it
    is looked for here. Plain ``extension``s may be ignored, and are.
    """
    return tuple(_modifier_urls(resource.model_dump(by_alias=True, exclude_none=True)))
