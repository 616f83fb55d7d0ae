"""The FHIR R4 EHR connector against the real FHIR server (sekmet) of the test session.

Faults the real server cannot be made to show (503 with Retry-After, a bearer-token gate, a
SMART token endpoint, a malformed payload) come from small real HTTP servers on loopback that
stand in front of it and forward to it. All data is synthetic (ids like ``SYN-…``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.humanname import HumanName
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.patient import Patient
from pydantic import SecretStr

from connectors.ehr import EhrContext, conditional_entry, parse_resource
from connectors.factory import build_ehr
from connectors.fhir import FhirEhr, build_http_client, error_for_status
from connectors.fhir_auth import CLIENT_ASSERTION_TYPE, SmartBackendAuth
from medvlm.errors import (
    EhrConflictError,
    EhrError,
    EhrInvalidResourceError,
    EhrNotFoundError,
    EhrUnauthorizedError,
    EhrUnavailableError,
)
from medvlm.settings import EhrSettings
from pipeline.ehr_rules import created_ids
from tests.integration.loopback import FhirProxy, LoopbackServer

pytestmark = pytest.mark.integration

ACCESSION_SYSTEM = "urn:oid:2.25.1234567890.7"  # made-up accession number system
MRN_SYSTEM = "urn:oid:2.25.1234567890.1"  # made-up MRN system for test patients
TEST_SYSTEM = "urn:oid:2.25.1234567890.9"  # identifiers of other synthetic resources
SYNTHETIC_NAME = "Synthetica"  # family name of every test patient: must never reach an error


# -- synthetic data --------------------------------------------------------------------------


@dataclass
class SyntheticPatient:
    """One synthetic patient's record, as a transaction Bundle of conditional creates."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def mrn(self) -> str:
        return f"SYN-MRN-{self.run}"

    @property
    def accession(self) -> str:
        return f"SYN-ACC-{self.run}"

    def resources(self) -> list[tuple[str, dict[str, Any]]]:
        p = "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, self.run))
        subject = {"reference": p}

        def ident(kind: str) -> list[dict[str, str]]:
            return [{"system": TEST_SYSTEM, "value": f"SYN-{kind}-{self.run}"}]

        def condition(kind: str, status: str) -> dict[str, Any]:
            clinical = "http://terminology.hl7.org/CodeSystem/condition-clinical"
            return {
                "resourceType": "Condition",
                "identifier": ident(kind),
                "clinicalStatus": {"coding": [{"system": clinical, "code": status}]},
                "code": {"text": f"synthetic {kind}"},
                "subject": subject,
            }

        def report(kind: str, status: str, when: str) -> dict[str, Any]:
            return {
                "resourceType": "DiagnosticReport",
                "identifier": ident(kind),
                "status": status,
                "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
                "subject": subject,
                "effectiveDateTime": when,
            }

        return [
            (
                p,
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": MRN_SYSTEM, "value": self.mrn}],
                    "name": [{"family": SYNTHETIC_NAME, "given": ["Ada"]}],
                    "gender": "female",
                    "birthDate": "1970-01-01",
                },
            ),
            (
                f"urn:uuid:{uuid.uuid4()}",
                {
                    "resourceType": "ServiceRequest",
                    "identifier": [{"system": ACCESSION_SYSTEM, "value": self.accession}],
                    "status": "active",
                    "intent": "order",
                    "code": {"text": "XR chest 2 views"},
                    "subject": subject,
                },
            ),
            (f"urn:uuid:{uuid.uuid4()}", condition("COND-A", "active")),
            (f"urn:uuid:{uuid.uuid4()}", condition("COND-B", "active")),
            (f"urn:uuid:{uuid.uuid4()}", condition("COND-R", "resolved")),
            (f"urn:uuid:{uuid.uuid4()}", report("DR-OLD", "final", "2021-03-01T10:00:00Z")),
            (f"urn:uuid:{uuid.uuid4()}", report("DR-NEW", "final", "2024-06-01T10:00:00Z")),
            (f"urn:uuid:{uuid.uuid4()}", report("DR-PRE", "preliminary", "2025-01-01T10:00:00Z")),
            (
                f"urn:uuid:{uuid.uuid4()}",
                {
                    "resourceType": "ImagingStudy",
                    "identifier": ident("STUDY"),
                    "status": "available",
                    "subject": subject,
                    "started": "2024-06-01T09:00:00Z",
                },
            ),
        ]

    def bundle(self) -> Bundle:
        entries = []
        for full_url, data in self.resources():
            resource = parse_resource(data)
            identifier = Identifier.model_validate(data["identifier"][0])
            entries.append(conditional_entry(resource, identifier, full_url))
        return Bundle(type="transaction", entry=entries)


@dataclass
class ReportedOrder:
    """One synthetic order (accession number, fresh per test) and the reports about it.

    ``report`` adds a DiagnosticReport identified by ``SYN-DR-{kind}-{run}`` (first identifier),
    ``basedOn`` the order and/or carrying the accession number as a second identifier; ``post``
    writes all of it in one transaction and learns the order's logical id.
    """

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    reports: list[dict[str, Any]] = field(default_factory=list)
    order: str = ""  # "ServiceRequest/{id}" once posted

    @property
    def accession(self) -> str:
        return f"SYN-ACC-{self.run}"

    def ident(self, kind: str) -> str:
        return f"SYN-DR-{kind}-{self.run}"

    @property
    def _patient_url(self) -> str:
        return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"patient-{self.run}"))

    @property
    def _order_url(self) -> str:
        return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"order-{self.run}"))

    def report(
        self,
        kind: str,
        status: str,
        issued: str | None = None,
        *,
        based_on: bool = True,
        accession: bool = False,
    ) -> ReportedOrder:
        identifiers = [{"system": TEST_SYSTEM, "value": self.ident(kind)}]
        if accession:
            identifiers.append({"system": ACCESSION_SYSTEM, "value": self.accession})
        data: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "identifier": identifiers,
            "status": status,
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
            "subject": {"reference": self._patient_url},
        }
        if based_on:
            data["basedOn"] = [{"reference": self._order_url}]
        if issued is not None:
            data["issued"] = issued
        self.reports.append(data)
        return self

    def post(self, ehr: FhirEhr) -> ReportedOrder:
        resources: list[tuple[str, dict[str, Any]]] = [
            (
                self._patient_url,
                {
                    "resourceType": "Patient",
                    "identifier": [{"system": MRN_SYSTEM, "value": f"SYN-MRN-{self.run}"}],
                    "name": [{"family": SYNTHETIC_NAME}],
                },
            ),
            (
                self._order_url,
                {
                    "resourceType": "ServiceRequest",
                    "identifier": [{"system": ACCESSION_SYSTEM, "value": self.accession}],
                    "status": "active",
                    "intent": "order",
                    "code": {"text": "XR chest 2 views"},
                    "subject": {"reference": self._patient_url},
                },
            ),
            *((f"urn:uuid:{uuid.uuid4()}", data) for data in self.reports),
        ]
        entries = [
            conditional_entry(
                parse_resource(data), Identifier.model_validate(data["identifier"][0]), url
            )
            for url, data in resources
        ]
        answer = ehr.transaction(Bundle(type="transaction", entry=entries))
        order_id = _ids(answer)[1]
        assert order_id is not None
        self.order = f"ServiceRequest/{order_id}"
        return self


# -- fixtures --------------------------------------------------------------------------------


def _settings(base_url: str, **overrides: Any) -> EhrSettings:
    values: dict[str, Any] = {
        "kind": "fhir",
        "base_url": base_url,
        "accession_system": ACCESSION_SYSTEM,
        "retry_initial_backoff_s": 0.01,
        "retry_max_backoff_s": 2.0,
        "read_timeout_s": 10.0,
    }
    return EhrSettings.model_validate(values | overrides)


@pytest.fixture
def ehr_for() -> Iterator[Callable[..., FhirEhr]]:
    """Builds ``FhirEhr``s on one pooled client each, all closed at the end of the test."""
    clients: list[httpx.Client] = []

    def make(base_url: str, **overrides: Any) -> FhirEhr:
        settings = _settings(base_url, **overrides)
        client = build_http_client(settings)
        clients.append(client)
        return FhirEhr(client, settings)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def ehr(ehr_for: Callable[..., FhirEhr], fhir_base_url: str) -> FhirEhr:
    return ehr_for(fhir_base_url)


@pytest.fixture
def seeded(ehr: FhirEhr) -> SyntheticPatient:
    patient = SyntheticPatient()
    ehr.transaction(patient.bundle())
    return patient


def _first_identifier(resource: Any) -> str:
    """``identifier[0].value`` of a resource (typed models make every element optional)."""
    assert resource.identifier, f"{resource.get_resource_type()}/{resource.id} has no identifier"
    return str(resource.identifier[0].value)


def _statuses(bundle: Bundle) -> list[str]:
    return [str(e.response.status) if e.response else "" for e in bundle.entry or []]


def _ids(bundle: Bundle) -> list[str | None]:
    return [e.resource.id if e.resource else None for e in bundle.entry or []]


def _count(base_url: str, rtype: str) -> int:
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        answer = http.get(f"{base_url}/{rtype}", params={"_summary": "count"})
        answer.raise_for_status()
        return int(answer.json()["total"])


# -- a loopback HTTP server in a thread (proxy to the real server, token endpoint) ------------


@pytest.fixture
def proxy(fhir_base_url: str) -> Iterator[FhirProxy]:
    with FhirProxy(fhir_base_url) as running:
        yield running


# -- reading context -------------------------------------------------------------------------


def test_gather_context_returns_order_patient_active_conditions_and_signed_reports(
    ehr_for: Callable[..., FhirEhr], fhir_base_url: str, seeded: SyntheticPatient
) -> None:
    # page_size=1: every list is paged, so Bundle.link[next] must be followed to the end.
    ehr = ehr_for(fhir_base_url, page_size=1)
    context = ehr.gather_context(seeded.accession)

    assert isinstance(context, EhrContext)
    assert context.service_request is not None
    assert _first_identifier(context.service_request) == seeded.accession
    assert _first_identifier(context.patient) == seeded.mrn
    assert sorted(_first_identifier(c) for c in context.conditions) == [
        f"SYN-COND-A-{seeded.run}",
        f"SYN-COND-B-{seeded.run}",
    ]
    assert sorted(_first_identifier(r) for r in context.prior_reports) == [
        f"SYN-DR-NEW-{seeded.run}",
        f"SYN-DR-OLD-{seeded.run}",
    ]
    assert [_first_identifier(s) for s in context.imaging_studies] == [f"SYN-STUDY-{seeded.run}"]


def test_paging_behind_a_reverse_proxy_stays_on_the_configured_origin(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    # The real server links next pages on its own origin; the client must not leave the proxy's.
    ehr = ehr_for(proxy.base_url, page_size=1)
    context = ehr.gather_context(seeded.accession)
    assert len(context.conditions) == 2 and len(context.prior_reports) == 2
    assert proxy.forwarded == proxy.seen >= 6  # 1 order + 3 Condition pages + 3 report pages …


def _queries(proxy: FhirProxy, rtype: str) -> list[dict[str, list[str]]]:
    """Query parameters of the searches of ``rtype`` the proxy saw."""
    return [
        parse_qs(path.partition("?")[2])
        for method, path in proxy.server.requests
        if method == "GET" and path.startswith(f"/fhir/{rtype}?")
    ]


def test_context_lists_are_searched_by_the_us_core_patient_parameter(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    context = ehr_for(proxy.base_url).gather_context(seeded.accession)
    subject = f"Patient/{context.patient.id}"
    assert len(context.conditions) == 2 and len(context.prior_reports) == 2
    assert len(context.imaging_studies) == 1
    for rtype in ("Condition", "DiagnosticReport", "ImagingStudy"):
        (query,) = _queries(proxy, rtype)
        assert query["patient"] == [subject] and "subject" not in query, rtype


def test_search_parameter_the_server_does_not_know_is_rejected_in_strict_mode(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    """The real server ignores an unknown parameter unless asked for strict handling; then it
    answers 400, which is not retried. No public method sends an unknown parameter, so the
    search is called directly: the case is a server lacking one the connector uses."""
    ehr = ehr_for(proxy.base_url)
    params = [("identifier", seeded.accession), ("no-such-parameter", "x")]
    with pytest.raises(EhrInvalidResourceError) as raised:
        list(ehr._search("ServiceRequest", params, ref="ServiceRequest SYN-REF"))
    text = str(raised.value)
    assert text.startswith("ServiceRequest SYN-REF: HTTP 400 (rejected)")
    assert "not-supported" in text and "no-such-parameter" in text
    assert proxy.seen == 1


def test_lenient_server_ignoring_a_parameter_fails_the_search(
    ehr_for: Callable[..., FhirEhr], fhir_base_url: str, seeded: SyntheticPatient
) -> None:
    """Without strict handling the real server ignores the parameter, answers every
    ServiceRequest and says so in an OperationOutcome entry: that answer is not used."""
    ehr = ehr_for(fhir_base_url, strict_search=False)
    params = [("no-such-parameter", seeded.accession)]
    with pytest.raises(EhrInvalidResourceError) as raised:
        list(
            ehr._search(
                "ServiceRequest", params, ref="ServiceRequest SYN-REF", sensitive=[seeded.accession]
            )
        )
    text = str(raised.value)
    assert text.startswith("ServiceRequest SYN-REF: the server reported issues with the search")
    assert raised.value.issues and raised.value.issues[0].startswith("warning/not-supported")
    assert "no-such-parameter" in text and seeded.accession not in text
    # the strict default gets the same parameter rejected outright
    with pytest.raises(EhrInvalidResourceError, match="HTTP 400"):
        list(ehr_for(fhir_base_url)._search("ServiceRequest", params, ref="ServiceRequest"))


def test_outcome_entries_in_context_searches_fail_unless_information(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    severity = "information"

    def with_outcome(payload: bytes) -> bytes:
        data = json.loads(payload)
        if data.get("resourceType") == "Bundle" and data.get("type") == "searchset":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": severity, "code": "not-supported", "diagnostics": "ignored"}
                ],
            }
            data.setdefault("entry", []).append(
                {"resource": outcome, "search": {"mode": "outcome"}}
            )
        return json.dumps(data).encode()

    proxy.rewrite = with_outcome
    ehr = ehr_for(proxy.base_url)
    context = ehr.gather_context(seeded.accession)
    assert len(context.conditions) == 2 and len(context.prior_reports) == 2

    severity = "warning"
    with pytest.raises(EhrInvalidResourceError) as raised:
        ehr.gather_context(seeded.accession)
    text = str(raised.value)
    assert text.startswith("ServiceRequest identifier-")
    assert "warning/not-supported: ignored" in text
    assert seeded.accession not in text and seeded.mrn not in text and SYNTHETIC_NAME not in text


def test_find_service_request_by_accession_and_unknown_accession_is_none(
    ehr: FhirEhr, seeded: SyntheticPatient
) -> None:
    order = ehr.find_service_request(seeded.accession)
    assert order is not None and _first_identifier(order) == seeded.accession
    assert ehr.find_service_request(f"SYN-ACC-NONE-{uuid.uuid4().hex[:8]}") is None


def test_context_without_order_uses_the_given_patient(
    ehr: FhirEhr, seeded: SyntheticPatient
) -> None:
    patient_id = ehr.gather_context(seeded.accession).patient.id
    assert patient_id is not None
    context = ehr.gather_context("SYN-ACC-UNSCHEDULED", patient_id=patient_id)
    assert context.service_request is None
    assert context.patient.id == patient_id
    assert len(context.prior_reports) == 2
    with pytest.raises(EhrNotFoundError):
        ehr.gather_context("SYN-ACC-UNSCHEDULED")


def test_patient_is_found_by_mrn_when_the_study_has_no_order(
    ehr: FhirEhr, seeded: SyntheticPatient
) -> None:
    patient = ehr.find_patient(seeded.mrn)
    assert patient is not None
    assert patient.id == ehr.gather_context(seeded.accession).patient.id
    assert ehr.find_patient("SYN-MRN-nobody") is None


def test_build_ehr_from_settings_alone_reads_the_server(
    fhir_base_url: str, seeded: SyntheticPatient
) -> None:
    ehr = build_ehr(_settings(fhir_base_url))
    try:
        assert ehr.find_service_request(seeded.accession) is not None
    finally:
        assert isinstance(ehr, FhirEhr)
        ehr.close()


# -- the signed report -----------------------------------------------------------------------


def _report_queries(proxy: FhirProxy) -> list[dict[str, list[str]]]:
    """Query parameters of the DiagnosticReport searches the proxy saw."""
    return [
        parse_qs(path.partition("?")[2])
        for method, path in proxy.server.requests
        if method == "GET" and path.startswith("/fhir/DiagnosticReport?")
    ]


def test_final_report_is_the_latest_signed_report_based_on_the_order(
    ehr_for: Callable[..., FhirEhr], fhir_base_url: str, proxy: FhirProxy
) -> None:
    # page_size=1: the matches span pages, so the latest must be picked across all of them.
    ehr = ehr_for(fhir_base_url, page_size=1)
    order = (
        ReportedOrder()
        .report("DRAFT", "preliminary", "2026-01-01T00:00:00Z", accession=True)
        # by instant B (09:00Z) is later than A (08:30Z); as text A would sort last
        .report("FINAL-A", "final", "2025-01-02T10:30:00+02:00")
        .report("FINAL-B", "final", "2025-01-02T09:00:00Z")
        .report("VOID", "entered-in-error", "2025-12-01T00:00:00Z")
        .post(ehr)
    )
    found = ehr.find_final_report(order.accession, order.order)
    assert found is not None and _first_identifier(found) == order.ident("FINAL-B")
    assert found.status == "final"
    found = ehr.find_final_report(None, order.order)
    assert found is not None and _first_identifier(found) == order.ident("FINAL-B")

    # The queries on the wire: based-on first; no identifier search once that found a report.
    via_proxy = ehr_for(proxy.base_url)
    assert via_proxy.find_final_report(order.accession, order.order) is not None
    assert _report_queries(proxy) == [
        {
            "based-on": [order.order],
            "status": ["final,amended,corrected"],
            "_count": [str(_settings(fhir_base_url).page_size)],
        }
    ]


def test_order_with_only_the_ai_draft_has_no_final_report(ehr: FhirEhr) -> None:
    order = ReportedOrder().report("DRAFT", "preliminary", accession=True).post(ehr)
    assert ehr.find_final_report(order.accession, order.order) is None
    assert ehr.find_final_report(None, order.order) is None
    assert ehr.find_final_report(order.accession) is None


def test_final_report_is_found_by_accession_when_not_based_on_the_order(
    ehr: FhirEhr, ehr_for: Callable[..., FhirEhr], fhir_base_url: str, proxy: FhirProxy
) -> None:
    order = (
        ReportedOrder()
        .report("DRAFT", "preliminary", "2026-01-01T00:00:00Z", accession=True)
        .report("SIGNED", "final", "2025-01-01T08:00:00Z", based_on=False, accession=True)
        .report("ADDENDUM", "amended", "2025-01-03T08:00:00Z", based_on=False, accession=True)
        .post(ehr)
    )
    found = ehr.find_final_report(order.accession)
    assert found is not None and _first_identifier(found) == order.ident("ADDENDUM")
    found = ehr.find_final_report(order.accession, order.order)  # nothing basedOn: fall back
    assert found is not None and _first_identifier(found) == order.ident("ADDENDUM")
    assert ehr.find_final_report(None, order.order) is None
    # the accession number is searched in the configured system only
    assert (
        ehr_for(fhir_base_url, accession_system="urn:other").find_final_report(order.accession)
        is None
    )

    via_proxy = ehr_for(proxy.base_url)
    assert via_proxy.find_final_report(order.accession, order.order) is not None
    statuses = ["final,amended,corrected"]
    assert [{k: v for k, v in q.items() if k != "_count"} for q in _report_queries(proxy)] == [
        {"based-on": [order.order], "status": statuses},
        {"identifier": [f"{ACCESSION_SYSTEM}|{order.accession}"], "status": statuses},
    ]


def test_final_report_needs_an_accession_or_an_order(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy
) -> None:
    ehr = ehr_for(proxy.base_url)
    assert ehr.find_final_report(None) is None
    assert ehr.find_final_report(None, None) is None
    assert ehr.find_final_report("", "") is None
    with pytest.raises(ValueError, match="ServiceRequest"):
        ehr.find_final_report(None, "Patient/SYN-0001")
    assert proxy.seen == 0, "nothing to ask the server"


def test_final_report_ignores_drafts_and_included_resources_a_server_sends_back(
    ehr: FhirEhr, ehr_for: Callable[..., FhirEhr], fhir_base_url: str, proxy: FhirProxy
) -> None:
    """Servers differ: one that ignores ``status`` or ``based-on`` (with only a warning) answers
    with the AI's draft or other orders' reports; ``_include``d entries are not matches."""
    order = (
        ReportedOrder()
        .report("DRAFT", "preliminary", "2026-01-01T00:00:00Z")
        .report("FINAL", "final", "2025-01-02T08:00:00Z")
        .post(ehr)
    )
    other = ReportedOrder().report("OTHER", "final", "2026-02-01T00:00:00Z").post(ehr)
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        answer = http.get(f"{fhir_base_url}/DiagnosticReport", params={"based-on": order.order})
        answer.raise_for_status()
        draft = next(
            e["resource"] for e in answer.json()["entry"] if e["resource"]["status"] != "final"
        )
        answer = http.get(f"{fhir_base_url}/DiagnosticReport", params={"based-on": other.order})
        answer.raise_for_status()
        (other_final,) = (e["resource"] for e in answer.json()["entry"])

    # a later signed report on this order, but only _include'd: not an answer to the search
    included = {**other_final, "basedOn": [{"reference": order.order}]}

    def lenient(payload: bytes) -> bytes:
        data = json.loads(payload)
        if data.get("resourceType") == "Bundle" and data.get("type") == "searchset":
            data.setdefault("entry", []).extend(
                [
                    {"resource": draft, "search": {"mode": "match"}},
                    {"resource": other_final, "search": {"mode": "match"}},
                    {"resource": included, "search": {"mode": "include"}},
                ]
            )
        return json.dumps(data).encode()

    proxy.rewrite = lenient
    via_proxy = ehr_for(proxy.base_url)
    found = via_proxy.find_final_report(order.accession, order.order)
    assert found is not None and _first_identifier(found) == order.ident("FINAL")
    assert via_proxy.find_final_report(order.accession) is None  # the order's reports lack it


def test_final_report_errors_name_the_accession_by_hash_only(
    ehr: FhirEhr, ehr_for: Callable[..., FhirEhr], proxy: FhirProxy
) -> None:
    order = ReportedOrder().report("DRAFT", "preliminary").post(ehr)
    via_proxy = ehr_for(proxy.base_url, retry_attempts=1)
    proxy.fail_next.append((200, {}))  # the based-on search answers an OperationOutcome
    with pytest.raises(EhrInvalidResourceError) as raised:
        via_proxy.find_final_report(order.accession, order.order)
    assert order.order in str(raised.value)
    proxy.fail_next.append((503, {}))
    with pytest.raises(EhrUnavailableError) as unavailable:
        via_proxy.find_final_report(order.accession)
    text = str(unavailable.value)
    assert "identifier-" in text and "503" in text
    assert order.accession not in text and SYNTHETIC_NAME not in text


# -- writing ---------------------------------------------------------------------------------


def test_replayed_transaction_creates_nothing_new(ehr: FhirEhr, fhir_base_url: str) -> None:
    patient = SyntheticPatient()
    types = ["Patient", "ServiceRequest", "Condition", "DiagnosticReport", "ImagingStudy"]
    first = ehr.transaction(patient.bundle())
    assert all(status.startswith("201") for status in _statuses(first))
    before = {t: _count(fhir_base_url, t) for t in types}

    replay = ehr.transaction(patient.bundle())

    assert {t: _count(fhir_base_url, t) for t in types} == before
    assert all(status.startswith("200") for status in _statuses(replay))
    assert _ids(replay) == _ids(first)


def _ids_by_type(answer: Bundle) -> dict[str, list[str]]:
    """Type → ids of the resources a transaction answer carries, in entry order."""
    ids: dict[str, list[str]] = {}
    for entry in answer.entry or []:
        assert entry.resource is not None and entry.resource.id is not None
        ids.setdefault(entry.resource.get_resource_type(), []).append(entry.resource.id)
    return ids


def test_created_ids_read_the_servers_transaction_locations_absolute_or_relative(
    ehr: FhirEhr, ehr_for: Callable[..., FhirEhr], proxy: FhirProxy
) -> None:
    answer = ehr.transaction(SyntheticPatient().bundle())
    locations = [e.response.location for e in answer.entry or [] if e.response]
    assert len(locations) == 9
    assert all(str(loc).startswith(ehr.base_url + "/") for loc in locations), "absolute here"
    assert all("/_history/" in str(loc) for loc in locations)
    assert created_ids(locations) == _ids_by_type(answer)

    def relative(payload: bytes) -> bytes:  # what other servers answer
        data = json.loads(payload)
        for entry in data.get("entry") or []:
            response = entry.get("response") or {}
            if "location" in response:
                response["location"] = response["location"].split("/fhir/", 1)[1]
        return json.dumps(data).encode()

    proxy.rewrite = relative
    answer = ehr_for(proxy.base_url).transaction(SyntheticPatient().bundle())
    locations = [e.response.location for e in answer.entry or [] if e.response]
    assert all(
        str(loc).startswith(
            ("Patient/", "ServiceRequest/", "Condition/", "DiagnosticReport/", "ImagingStudy/")
        )
        for loc in locations
    )
    assert created_ids(locations) == _ids_by_type(answer)


def test_conditional_create_returns_the_existing_resource_on_replay(ehr: FhirEhr) -> None:
    mrn = Identifier(system=MRN_SYSTEM, value=f"SYN-MRN-{uuid.uuid4().hex[:8]}")
    patient = Patient(identifier=[mrn], gender="other")
    first = ehr.conditional_create(patient, mrn)
    again = ehr.conditional_create(patient, mrn)
    assert first.created and not again.created
    assert again.resource.id == first.resource.id
    assert first.version_id is not None


def test_update_with_stale_version_raises_conflict(ehr: FhirEhr, seeded: SyntheticPatient) -> None:
    patient = ehr.gather_context(seeded.accession).patient
    assert patient.meta is not None and patient.meta.versionId is not None
    stale = str(patient.meta.versionId)
    patient.gender = "unknown"
    updated = ehr.update(patient, stale)
    assert updated.meta is not None and str(updated.meta.versionId) != stale

    with pytest.raises(EhrConflictError) as raised:
        ehr.update(patient, stale)
    assert "412" in str(raised.value)
    assert SYNTHETIC_NAME not in str(raised.value) and seeded.mrn not in str(raised.value)


def test_deleted_or_unknown_patient_is_not_found(ehr: FhirEhr, fhir_base_url: str) -> None:
    mrn = Identifier(system=MRN_SYSTEM, value=f"SYN-MRN-{uuid.uuid4().hex[:8]}")
    created = ehr.conditional_create(Patient(identifier=[mrn]), mrn).resource
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        http.delete(f"{fhir_base_url}/Patient/{created.id}").raise_for_status()
    with pytest.raises(EhrNotFoundError):  # sekmet says 410 here, others 404
        ehr.read_patient(str(created.id))
    with pytest.raises(EhrNotFoundError, match="Patient/SYN-0001"):
        ehr.read_patient("SYN-0001")


def test_rejected_write_is_invalid_resource_with_server_issues(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy
) -> None:
    ehr = ehr_for(proxy.base_url)
    broken = Bundle(type="transaction", entry=[BundleEntry(resource=Patient(gender="male"))])
    with pytest.raises(EhrInvalidResourceError) as raised:
        ehr.transaction(broken)
    assert raised.value.issues, "the server's OperationOutcome is surfaced"
    assert proxy.seen == 1, "400 is not retried"


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["0", "1"])
def test_503_is_retried_honouring_retry_after(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient, retry_after: str
) -> None:
    # Retry-After has its own cap (retry_after_max_s); the backoff's cap does not shorten it.
    ehr = ehr_for(proxy.base_url, retry_max_backoff_s=0.1)
    proxy.fail_next.append((503, {"Retry-After": retry_after}))
    started = time.monotonic()
    order = ehr.find_service_request(seeded.accession)
    elapsed = time.monotonic() - started
    assert order is not None
    assert proxy.seen == 2
    assert elapsed >= float(retry_after)


def test_retry_after_over_the_cap_fails_the_call_at_once(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    ehr = ehr_for(proxy.base_url)
    proxy.fail_next.extend([(429, {"Retry-After": "3600"})] * 2)
    started = time.monotonic()
    with pytest.raises(EhrUnavailableError) as raised:
        ehr.find_service_request(seeded.accession)
    assert time.monotonic() - started < 2.0, "nothing is waited for"
    assert proxy.seen == 1, "not retried"
    text = str(raised.value)
    assert "HTTP 429, the server asked to retry after 3600 s, over the 120 s cap" in text
    assert "ServiceRequest identifier-" in text and seeded.accession not in text

    # within a raised cap the same answer is waited for (the wait is the server's, not ours)
    ehr = ehr_for(proxy.base_url, retry_after_max_s=3)
    proxy.fail_next.clear()
    proxy.fail_next.append((429, {"Retry-After": "3"}))
    started = time.monotonic()
    assert ehr.find_service_request(seeded.accession) is not None
    assert time.monotonic() - started >= 3.0


def test_persistent_503_becomes_unavailable_after_the_configured_attempts(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    ehr = ehr_for(proxy.base_url, retry_attempts=3)
    proxy.fail_next.extend([(503, {"Retry-After": "0"})] * 3)
    with pytest.raises(EhrUnavailableError, match="503"):
        ehr.find_service_request(seeded.accession)
    assert proxy.seen == 3


def test_unreachable_server_is_unavailable(ehr_for: Callable[..., FhirEhr]) -> None:
    with LoopbackServer(lambda *a: (200, {}, b"")) as server:
        dead = server.url  # closed when the block ends: nothing listens there any more
    ehr = ehr_for(f"{dead}/fhir", retry_attempts=2)
    # Its retries spent on a server that does not answer: the EHR is down (breaker open),
    # named with its URL; the next call is refused at once, without a request.
    with pytest.raises(EhrUnavailableError, match=r"EHR http://.* is down \(ConnectError\)"):
        ehr.read_patient("SYN-0001")
    assert ehr.breaker.is_open
    started = time.monotonic()
    with pytest.raises(EhrUnavailableError, match="is down"):
        ehr.read_patient("SYN-0002")
    assert time.monotonic() - started < 0.5


# -- auth ------------------------------------------------------------------------------------


def test_missing_bearer_token_is_unauthorized_and_a_token_file_is_used(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient, tmp_path: Path
) -> None:
    proxy.valid_tokens = {"synthetic-test-token"}
    with pytest.raises(EhrUnauthorizedError, match="401"):
        ehr_for(proxy.base_url).find_service_request(seeded.accession)
    assert proxy.seen == 1, "401 is not retried"

    token_file = tmp_path / "token"
    token_file.write_text("synthetic-test-token\n")
    ehr = ehr_for(proxy.base_url, auth="bearer", token_file=token_file)
    assert ehr.find_service_request(seeded.accession) is not None


class TokenEndpoint:
    """A SMART Backend Services token endpoint on loopback: verifies the JWT client assertion
    (signature with the client's public key, kid, iss = sub, aud, jti unique, exp <= 5 min) and
    issues bearer tokens it registers with the FHIR proxy."""

    def __init__(self, public_key: Any, algorithm: str, proxy: FhirProxy) -> None:
        self.public_key = public_key
        self.algorithm = algorithm
        self.proxy = proxy
        self.issued: list[str] = []
        self.jtis: set[str] = set()
        self.register = True  # whether issued tokens are accepted by the proxy
        self.unavailable = 0  # answer this many token requests with 503 first
        self.server = LoopbackServer(self._handle)

    @property
    def token_url(self) -> str:
        return f"{self.server.url}/auth/token"

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        def refuse(error: str, code: str = "invalid_client") -> tuple[int, dict[str, str], bytes]:
            payload = json.dumps({"error": code, "error_description": error})
            return 400, {"Content-Type": "application/json"}, payload.encode()

        if self.unavailable:
            self.unavailable -= 1
            return 503, {"Retry-After": "0"}, b""
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if method != "POST" or form.get("grant_type") != "client_credentials":
            return refuse("grant_type")
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            return refuse("client_assertion_type")
        assertion = form.get("client_assertion", "")
        if jwt.get_unverified_header(assertion).get("kid") != "synthetic-kid-1":
            return refuse("kid")
        try:
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=[self.algorithm],
                audience=self.token_url,
                issuer="synthetic-client",
                options={"require": ["exp", "iat", "jti", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            return refuse(type(exc).__name__)
        if claims["sub"] != "synthetic-client" or claims["exp"] - time.time() > 300:
            return refuse("sub/exp")
        if claims["jti"] in self.jtis:
            return refuse("jti replay")
        self.jtis.add(claims["jti"])
        if "system/ServiceRequest.rs" not in form.get("scope", "").split():
            return refuse("scope", "invalid_scope")  # a SMART 2 server
        token = f"synthetic-access-{len(self.issued)}"
        self.issued.append(token)
        if self.register and self.proxy.valid_tokens is not None:
            self.proxy.valid_tokens.add(token)
        answer = {"access_token": token, "token_type": "bearer", "expires_in": 300}
        return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def _write_key(tmp_path: Path, algorithm: str) -> tuple[Path, Any]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS384":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "client-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path, key.public_key()


@pytest.mark.parametrize("algorithm", ["RS384", "ES384"])
def test_smart_backend_services_token_is_discovered_cached_and_refreshed_once_on_401(
    ehr_for: Callable[..., FhirEhr],
    proxy: FhirProxy,
    seeded: SyntheticPatient,
    tmp_path: Path,
    algorithm: str,
) -> None:
    key_file, public_key = _write_key(tmp_path, algorithm)
    proxy.valid_tokens = set()
    token_endpoint = TokenEndpoint(public_key, algorithm, proxy)
    with token_endpoint.server:
        proxy.smart_configuration = {
            "token_endpoint": token_endpoint.token_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        }
        ehr = ehr_for(
            proxy.base_url,
            auth="smart",
            smart_client_id="synthetic-client",
            smart_private_key_file=key_file,
            smart_key_id="synthetic-kid-1",
            smart_algorithm=algorithm,
        )
        assert ehr.find_service_request(seeded.accession) is not None
        assert ehr.find_service_request(seeded.accession) is not None
        assert len(token_endpoint.issued) == 1, "the token is cached between requests"
        discovery = [p for _, p in proxy.server.requests if "smart-configuration" in p]
        assert len(discovery) == 1

        proxy.valid_tokens.clear()  # the EHR revokes the token: one 401, one refresh
        assert ehr.find_service_request(seeded.accession) is not None
        assert len(token_endpoint.issued) == 2

        # The token endpoint now issues tokens the EHR does not accept: refresh only once.
        token_endpoint.register = False
        proxy.valid_tokens.clear()
        with pytest.raises(EhrUnauthorizedError):
            ehr.find_service_request(seeded.accession)
        assert len(token_endpoint.issued) == 3


def test_smart_token_endpoint_503_is_retried(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient, tmp_path: Path
) -> None:
    key_file, public_key = _write_key(tmp_path, "RS384")
    proxy.valid_tokens = set()
    token_endpoint = TokenEndpoint(public_key, "RS384", proxy)
    token_endpoint.unavailable = 1
    with token_endpoint.server:
        ehr = ehr_for(
            proxy.base_url,
            auth="smart",
            smart_client_id="synthetic-client",
            smart_private_key_file=key_file,
            smart_key_id="synthetic-kid-1",
            smart_token_url=token_endpoint.token_url,
        )
        assert ehr.find_service_request(seeded.accession) is not None
    assert len(token_endpoint.server.requests) == 2 and len(token_endpoint.issued) == 1


def test_smart_1_scopes_refused_by_the_token_endpoint_say_what_to_check(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient, tmp_path: Path
) -> None:
    key_file, public_key = _write_key(tmp_path, "RS384")
    proxy.valid_tokens = set()
    token_endpoint = TokenEndpoint(public_key, "RS384", proxy)
    with token_endpoint.server:
        ehr = ehr_for(
            proxy.base_url,
            auth="smart",
            smart_client_id="synthetic-client",
            smart_private_key_file=key_file,
            smart_key_id="synthetic-kid-1",
            smart_token_url=token_endpoint.token_url,
            smart_scopes="system/Patient.read system/ServiceRequest.read",
        )
        with pytest.raises(EhrUnauthorizedError) as raised:
            ehr.find_service_request(seeded.accession)
    text = str(raised.value)
    assert "invalid_scope" in text and "ehr.smart_scopes" in text
    assert token_endpoint.issued == []


def test_smart_token_endpoint_refusal_is_unauthorized(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient, tmp_path: Path
) -> None:
    key_file, _ = _write_key(tmp_path, "RS384")
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_public_key = _write_key(other, "RS384")  # not the client's key
    proxy.valid_tokens = set()
    token_endpoint = TokenEndpoint(wrong_public_key, "RS384", proxy)
    with token_endpoint.server:
        ehr = ehr_for(
            proxy.base_url,
            auth="smart",
            smart_client_id="synthetic-client",
            smart_private_key_file=key_file,
            smart_key_id="synthetic-kid-1",
            smart_token_url=token_endpoint.token_url,
        )
        with pytest.raises(EhrUnauthorizedError, match="invalid_client"):
            ehr.find_service_request(seeded.accession)
    assert token_endpoint.issued == []


# -- malformed payloads and PHI --------------------------------------------------------------


def test_malformed_resource_from_the_server_is_invalid_resource_without_phi(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    patient_id = ehr_for(proxy.base_url).gather_context(seeded.accession).patient.id

    def corrupt(payload: bytes) -> bytes:
        data = json.loads(payload)
        if data.get("resourceType") == "Patient":
            data["birthDate"] = f"{SYNTHETIC_NAME}-not-a-date"
        return json.dumps(data).encode()

    proxy.rewrite = corrupt
    with pytest.raises(EhrInvalidResourceError) as raised:
        ehr_for(proxy.base_url).read_patient(str(patient_id))
    text = str(raised.value)
    assert f"Patient/{patient_id}" in text and "birthDate" in text
    assert SYNTHETIC_NAME not in text and seeded.mrn not in text and "1970" not in text


def test_errors_name_orders_by_identifier_hash_never_by_accession_or_mrn(
    ehr_for: Callable[..., FhirEhr], proxy: FhirProxy, seeded: SyntheticPatient
) -> None:
    ehr = ehr_for(proxy.base_url, retry_attempts=1)
    proxy.fail_next.append((503, {}))
    with pytest.raises(EhrUnavailableError) as raised:
        ehr.gather_context(seeded.accession)
    text = str(raised.value)
    assert "identifier-" in text
    assert seeded.accession not in text and seeded.mrn not in text and SYNTHETIC_NAME not in text


# -- pure parts ------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, EhrNotFoundError),
        (410, EhrNotFoundError),
        (401, EhrUnauthorizedError),
        (403, EhrUnauthorizedError),
        (409, EhrConflictError),
        (412, EhrConflictError),
        (400, EhrInvalidResourceError),
        (422, EhrInvalidResourceError),
        (503, EhrUnavailableError),
        (500, EhrUnavailableError),
        (418, EhrError),
    ],
)
def test_http_status_maps_to_one_error_class(status: int, error: type[EhrError]) -> None:
    assert type(error_for_status(status, "Patient/SYN-0001")) is error


@pytest.mark.unit
def test_errors_survive_pickling_for_ray() -> None:
    import pickle

    original = EhrInvalidResourceError("Patient/SYN-0001: rejected", ("error/invalid: x",))
    copy = pickle.loads(pickle.dumps(original))
    assert str(copy) == str(original) and copy.issues == original.issues


@pytest.mark.unit
def test_server_diagnostics_echoing_sent_values_are_redacted() -> None:
    """A fake transport: no server here echoes a rejected value back in diagnostics on demand."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        echoed = f"family '{sent['name'][0]['family']}' id {sent['identifier'][0]['value']}"
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "invalid", "diagnostics": echoed}],
        }
        return httpx.Response(422, json=outcome)

    settings = _settings("http://127.0.0.1:9/fhir")
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        ehr = FhirEhr(client, settings)
        mrn = Identifier(system=MRN_SYSTEM, value="SYN-MRN-ECHO")
        patient = Patient(identifier=[mrn], name=[HumanName(family=SYNTHETIC_NAME)])
        with pytest.raises(EhrInvalidResourceError) as raised:
            ehr.conditional_create(patient, mrn)
    text = str(raised.value)
    assert "[redacted]" in text
    assert SYNTHETIC_NAME not in text and "SYN-MRN-ECHO" not in text


@pytest.mark.unit
def test_smart_client_assertion_has_the_required_claims(tmp_path: Path) -> None:
    key_file, public_key = _write_key(tmp_path, "RS384")
    auth = SmartBackendAuth(
        fhir_base_url="https://ehr.invalid/fhir",
        client_id="synthetic-client",
        private_key_file=key_file,
        key_id="synthetic-kid-1",
    )
    first = auth.client_assertion("https://ehr.invalid/token")
    second = auth.client_assertion("https://ehr.invalid/token")
    header = jwt.get_unverified_header(first)
    claims = jwt.decode(
        first, public_key, algorithms=["RS384"], audience="https://ehr.invalid/token"
    )
    assert header["alg"] == "RS384" and header["kid"] == "synthetic-kid-1"
    assert claims["iss"] == claims["sub"] == "synthetic-client"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert jwt.decode(second, options={"verify_signature": False})["jti"] != claims["jti"]
    assert "BEGIN" not in repr(auth)


@pytest.mark.unit
def test_fhir_settings_fail_at_load_when_incomplete() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="base_url"):
        EhrSettings(kind="fhir")
    with pytest.raises(ValidationError, match="token"):
        EhrSettings(kind="fhir", base_url="https://ehr.invalid/fhir", auth="bearer")
    with pytest.raises(ValidationError, match="smart_client_id"):
        EhrSettings(kind="fhir", base_url="https://ehr.invalid/fhir", auth="smart")
    secret = EhrSettings(
        kind="fhir", base_url="https://ehr.invalid/fhir", token=SecretStr("s3cr3t-token")
    )
    assert "s3cr3t-token" not in repr(secret)
