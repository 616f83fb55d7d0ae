"""The EHR interface: what the pipeline may ask of a hospital's EHR, and the context it gets back.

``Ehr`` is a small ``typing.Protocol`` with two implementations: ``connectors.fhir.FhirEhr`` (FHIR
R4 REST) and ``connectors.ndjson.NdjsonEhr`` (a FHIR Bulk Data style NDJSON folder, the embedded
default). ``build_ehr`` picks one from ``EhrSettings``. Resources are ``fhir.resources.R4B`` models
(R4B is wire-compatible with R4 for the resources used here).

This module must not do I/O itself, and nothing here may put a patient name, MRN, accession number
or birth date into a message: references are logical ids or ``identifier_ref`` hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload, runtime_checkable
from urllib.parse import urlencode

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.subscription import Subscription
from fhir.resources.R4B.task import Task
from pydantic import ValidationError

from medvlm.errors import EhrInvalidResourceError
from pipeline.ehr_rules import SIGNED_REPORT_STATUSES, EhrContext
from pipeline.fhir_resources import search_token

if TYPE_CHECKING:
    pass

R = TypeVar("R", bound=Resource)

__all__ = [
    "FINAL_REPORT_STATUSES",
    "WRITTEN_TYPES",
    "Ehr",
    "EhrContext",
    "TaskQueue",
    "WriteCapabilities",
    "WriteResult",
    "conditional_entry",
    "identifier_query",
    "identifier_ref",
    "identifier_token",
    "parse_resource",
]

# DiagnosticReport.status values of a signed report (FHIR R4 diagnostic-report-status): the
# radiologist's report is final, or was amended/corrected after it was final.
FINAL_REPORT_STATUSES = SIGNED_REPORT_STATUSES


@dataclass(frozen=True)
class WriteResult:
    """The server's copy of a written resource and whether this write created it."""

    resource: Resource
    created: bool

    @property
    def version_id(self) -> str | None:
        meta = self.resource.meta
        return None if meta is None or meta.versionId is None else str(meta.versionId)


#: The resource types the pipeline writes (drafts, the model's Device, fairness reports and
#: the Measure they report on).
WRITTEN_TYPES = frozenset(
    {
        "Observation",
        "DiagnosticReport",
        "DocumentReference",
        "Provenance",
        "Device",
        "MeasureReport",
        "Measure",
    }
)


@dataclass(frozen=True)
class WriteCapabilities:
    """What the server says it offers for writes (its CapabilityStatement, FHIR R4
    capabilitystatement.html): the ``transaction`` interaction, and the resource types with
    ``conditionalCreate``. Taken as a hint only: no write relies on either being honoured."""

    transaction: bool
    conditional_create: frozenset[str]


@runtime_checkable
class Ehr(Protocol):
    """What the pipeline needs from an EHR. Implementations raise ``medvlm.errors.EhrError``s."""

    def read_patient(self, patient_id: str) -> Patient:
        """``GET Patient/{id}``; ``EhrNotFoundError`` if absent."""
        ...

    def find_service_request(self, accession_number: str) -> ServiceRequest | None:
        """The order with this accession number (``ServiceRequest.identifier``), or None."""
        ...

    def find_patient(self, identifier_value: str, system: str | None = None) -> Patient | None:
        """The Patient with this identifier (e.g. the MRN in DICOM PatientID), or None.

        Used when a study has no order in the EHR; more than one match is an ``EhrError``.
        """
        ...

    def gather_context(self, accession_number: str, patient_id: str | None = None) -> EhrContext:
        """Patient, order, active Conditions, prior final reports and ImagingStudies.

        ``patient_id`` is used when no order carries the accession number (e.g. an unscheduled
        study); with neither, ``EhrNotFoundError``.
        """
        ...

    def find_final_report(
        self, accession_number: str | None, service_request: str | None = None
    ) -> DiagnosticReport | None:
        """The radiologist's signed report for this order, or None if not (yet) signed.

        A DiagnosticReport with status final, amended or corrected that is ``basedOn`` the order
        (``service_request``, a reference like "ServiceRequest/123"), else one whose identifier
        carries the accession number. When several match, the latest by ``issued`` wins.
        """
        ...

    def transaction(
        self, bundle: Bundle, *, retry: bool = True, about: str | None = None
    ) -> Bundle:
        """Apply a ``transaction`` Bundle atomically; return the ``transaction-response``.

        ``retry=False``: sent once; a lost answer raises ``EhrUnavailableError`` (the caller
        finds out what was applied before sending again). ``about``: what the Bundle carries
        (e.g. ``DiagnosticReport draft-…``), named by its errors.
        """
        ...

    def capabilities(self) -> WriteCapabilities:
        """What the server offers for writes (read once, then remembered)."""
        ...

    def find_by_key(self, rtype: str, param: str, system: str, value: str) -> list[Resource]:
        """The resources of ``rtype`` whose ``param`` (``identifier`` or ``_tag``) token is
        ``system|value`` (search mode match only)."""
        ...

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> str:
        """``POST`` one resource (JSON), sent once, never retried here; returns ``Type/id``.

        ``if_none_exist``: an URL-encoded query for ``If-None-Exist`` (conditional create).
        A lost answer raises ``EhrUnavailableError``.
        """
        ...

    def conditional_create(self, resource: Resource, identifier: Identifier) -> WriteResult:
        """Create ``resource`` unless one with ``identifier`` exists (then return that one)."""
        ...

    def update(self, resource: Resource, if_match: str) -> Resource:
        """``PUT`` with ``If-Match: W/"{if_match}"``; ``EhrConflictError`` if the version moved."""
        ...


@runtime_checkable
class TaskQueue(Protocol):
    """FHIR Tasks that ask for drafts (``flows.tasks``): what an EHR needs to offer for
    on-demand drafting. ``connectors.fhir.FhirEhr`` implements it; the NDJSON EHR does not."""

    def search_tasks(
        self, system: str, code: str, *, status: str = "requested", since: dt.datetime | None = None
    ) -> list[Task]:
        """Tasks with this ``code`` and ``status``, changed at or after ``since``, oldest first."""
        ...

    def read(self, model: type[R], rid: str) -> R:
        """``GET [type]/[id]``; ``EhrNotFoundError`` if absent."""
        ...

    def update_task(self, task: Task) -> Task | None:
        """``PUT`` with ``If-Match`` of ``task.meta.versionId``, once; None when the version
        moved (another worker or the requester changed the Task first)."""
        ...


@runtime_checkable
class TaskSubscriptions(Protocol):
    """An R4 rest-hook Subscription that tells a listener when a Task may need a pass
    (``medvlm tasks --listen``, flows.task_listener). ``connectors.fhir.FhirEhr`` implements it."""

    def create_subscription(self, subscription: Subscription) -> Subscription:
        """``POST [base]/Subscription`` once; the Subscription as the server holds it (its
        ``status`` tells whether the server activated it: ``active``, ``requested``, ``error``)."""
        ...

    def subscription_status(self, subscription_id: str) -> str | None:
        """The ``status`` the server holds for it (``active``, ``error``, ``off``, …); None
        when it is gone."""
        ...

    def delete_subscription(self, subscription_id: str) -> None:
        """``DELETE [base]/Subscription/[id]``; one already gone is not an error."""
        ...


def identifier_ref(
    identifier_value: str, system: str | None = None, *, key: bytes | None = None
) -> str:
    """A non-identifying reference to an identifier (accession number, MRN) for messages/logs.

    With ``key`` (``job.pseudonym_key``, a site secret) it is HMAC-SHA-256, so nobody without
    the key can find which identifier it stands for by trying every MRN or accession number;
    ``medvlm ref`` computes one for an operator looking for a study's messages."""
    data = f"{system or ''}|{identifier_value}".encode()
    if key is not None:
        digest = hmac.new(key, data, hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(data).hexdigest()
    return f"identifier-{digest[:12]}"


def identifier_token(value: str, system: str | None = None) -> str:
    """The token search value ``system|value`` (or ``value`` in any system), not URL-encoded."""
    return search_token(value, system)


def identifier_query(value: str, system: str | None = None) -> str:
    """``identifier=system|value`` (URL-encoded) for ``If-None-Exist`` and ``ifNoneExist``."""
    return urlencode({"identifier": identifier_token(value, system)})


def conditional_entry(resource: Resource, identifier: Identifier, full_url: str) -> BundleEntry:
    """A transaction entry that creates ``resource`` only if ``identifier`` matches nothing.

    FHIR R4 ``Bundle.entry.request.ifNoneExist``: replaying the same Bundle creates nothing new.
    """
    if identifier.value is None:
        raise ValueError("conditional create needs Identifier.value")
    return BundleEntry(
        fullUrl=full_url,
        resource=resource,
        request=BundleEntryRequest(
            method="POST",
            url=resource.get_resource_type(),
            ifNoneExist=identifier_query(identifier.value, identifier.system),
        ),
    )


@overload
def parse_resource(data: Any, expected: type[R], *, where: str = "") -> R: ...
@overload
def parse_resource(data: Any, expected: None = None, *, where: str = "") -> Resource: ...
def parse_resource(
    data: Any, expected: type[Resource] | None = None, *, where: str = ""
) -> Resource:
    """Validate a JSON object as an R4B model; errors name only type, id and element paths.

    Pydantic's own message echoes input values (names, birth dates), so it is never passed on.
    """
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise EhrInvalidResourceError(
            f"{where or 'payload'}: not a FHIR resource (no resourceType)"
        )
    rtype = data["resourceType"]
    rid = data.get("id") if isinstance(data.get("id"), str) else None
    ref = f"{rtype}/{rid}" if rid else rtype
    if expected is not None and rtype != expected.get_resource_type():
        raise EhrInvalidResourceError(
            f"{ref}{where}: expected {expected.get_resource_type()}, got {rtype}"
        )
    try:
        model = expected if expected is not None else get_fhir_model_class(rtype)
    except (KeyError, ValueError) as exc:
        raise EhrInvalidResourceError(f"{ref}{where}: unknown resource type") from exc
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        problems = tuple(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['type']}"
            for err in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        raise EhrInvalidResourceError(f"{ref}{where}: not valid FHIR R4", problems[:10]) from None
    if not isinstance(parsed, Resource):
        raise EhrInvalidResourceError(f"{ref}{where}: not a resource type")
    return parsed
