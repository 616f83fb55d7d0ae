"""The FHIR client's read side on a scripted transport: which search parameters and headers go on
the wire, how OperationOutcome entries in a search answer are judged, how ``Retry-After`` is
honoured or refused, how write locations are read, and the default SMART scopes.

Against the real FHIR server the same behaviour is tested in
tests/integration/test_fhir_client.py; here the server's answers are scripted so that each rule
can be shown alone (a server that echoes an accession number, an HTTP-date ``Retry-After``).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle

from connectors.fhir import FhirEhr
from medvlm.errors import EhrError, EhrInvalidResourceError, EhrUnavailableError
from medvlm.settings import EhrSettings
from pipeline.ehr_rules import created_ids, location_target

pytestmark = pytest.mark.unit

BASE = "http://127.0.0.1:9/fhir"
ACCESSION_SYSTEM = "urn:oid:2.25.1234567890.7"
ACCESSION = "SYN-ACC-SCRIPTED"
PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Synthetica"}]}
ORDER = {
    "resourceType": "ServiceRequest",
    "id": "o1",
    "identifier": [{"system": ACCESSION_SYSTEM, "value": ACCESSION}],
    "status": "active",
    "intent": "order",
    "subject": {"reference": "Patient/p1"},
}

Answer = Callable[[httpx.Request], httpx.Response]


def _bundle(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": list(entries)}


def _match(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource, "search": {"mode": "match"}}


def _outcome(*issues: tuple[str, str, str], mode: str = "outcome") -> dict[str, Any]:
    return {
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": s, "code": c, "diagnostics": d} for s, c, d in issues],
        },
        "search": {"mode": mode},
    }


class Scripted:
    """A FHIR server on ``httpx.MockTransport``: ``answer`` per request, every request kept."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    def searches(self, rtype: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == f"/fhir/{rtype}"]


@pytest.fixture
def fhir() -> Iterator[Callable[..., tuple[FhirEhr, Scripted]]]:
    clients: list[httpx.Client] = []

    def make(
        answer: Answer, pseudonym_key: bytes | None = None, **overrides: Any
    ) -> tuple[FhirEhr, Scripted]:
        values: dict[str, Any] = {
            "kind": "fhir",
            "base_url": BASE,
            "accession_system": ACCESSION_SYSTEM,
            "retry_initial_backoff_s": 0.0,
            "retry_max_backoff_s": 0.0,
        }
        settings = EhrSettings.model_validate(values | overrides)
        server = Scripted(answer)
        client = httpx.Client(transport=httpx.MockTransport(server))
        clients.append(client)
        return FhirEhr(client, settings, pseudonym_key=pseudonym_key), server

    yield make
    for client in clients:
        client.close()


def _record(condition_entries: list[dict[str, Any]] | None = None) -> Answer:
    """An order with its patient, one active Condition (or ``condition_entries``), no reports
    and no studies."""
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "subject": {"reference": "Patient/p1"},
    }

    def answer(request: httpx.Request) -> httpx.Response:
        rtype = request.url.path.rsplit("/", 1)[-1]
        if rtype == "ServiceRequest":
            entries = [_match(ORDER), {"resource": PATIENT, "search": {"mode": "include"}}]
            return httpx.Response(200, json=_bundle(*entries))
        if rtype == "Condition":
            entries = condition_entries if condition_entries is not None else [_match(condition)]
            return httpx.Response(200, json=_bundle(*entries))
        return httpx.Response(200, json=_bundle())

    return answer


# -- the searches on the wire ----------------------------------------------------------------


def test_context_searches_by_the_us_core_patient_parameter(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    ehr, server = fhir(_record())
    context = ehr.gather_context(ACCESSION)
    assert [c.id for c in context.conditions] == ["c1"]
    for rtype in ("Condition", "DiagnosticReport", "ImagingStudy"):
        (search,) = server.searches(rtype)
        assert search.url.params.get_list("patient") == ["Patient/p1"], rtype
        assert "subject" not in search.url.params, rtype


def test_searches_ask_for_strict_handling_unless_turned_off(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    ehr, server = fhir(_record())
    ehr.gather_context(ACCESSION)
    searches = [r for r in server.requests if r.url.path != "/fhir/Patient/p1"]
    assert len(searches) == 4
    assert all(r.headers.get("Prefer") == "handling=strict" for r in searches)

    ehr, server = fhir(_record(), strict_search=False)
    ehr.gather_context(ACCESSION)
    assert all("Prefer" not in r.headers for r in server.requests)


def test_reads_do_not_send_the_search_preference(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    ehr, server = fhir(lambda request: httpx.Response(200, json=PATIENT))
    assert ehr.read_patient("p1").id == "p1"
    assert "Prefer" not in server.requests[0].headers


# -- OperationOutcome entries in a search answer ---------------------------------------------


@pytest.mark.parametrize("severity", ["warning", "error", "fatal"])
def test_outcome_entry_that_is_not_information_fails_the_search(
    fhir: Callable[..., tuple[FhirEhr, Scripted]], severity: str
) -> None:
    ignored = (severity, "not-supported", "Unknown search parameter 'clinical-status'; ignored")
    ehr, _ = fhir(_record([_outcome(ignored)]), strict_search=False)
    with pytest.raises(EhrInvalidResourceError) as raised:
        ehr.gather_context(ACCESSION)
    assert raised.value.issues == (f"{severity}/not-supported: {ignored[2]}",)
    text = str(raised.value)
    assert text.startswith("Condition of Patient/p1: the server reported issues with the search")
    assert "Synthetica" not in text


def test_information_outcome_is_passed_over(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    condition = {
        "resourceType": "Condition",
        "id": "c2",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "subject": {"reference": "Patient/p1"},
    }
    note = ("information", "informational", "search took 3 ms")
    ehr, _ = fhir(_record([_match(condition), _outcome(note), _outcome(note, mode="match")]))
    assert [c.id for c in ehr.gather_context(ACCESSION).conditions] == ["c2"]


def test_a_warning_after_many_information_issues_still_fails_the_search(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    notes = [("information", "informational", f"note {i}") for i in range(12)]
    outcome = _outcome(*notes, ("warning", "not-supported", "parameter ignored"))
    ehr, _ = fhir(_record([outcome]))
    with pytest.raises(EhrInvalidResourceError) as raised:
        ehr.gather_context(ACCESSION)
    assert raised.value.issues == ("warning/not-supported: parameter ignored",)


def test_outcome_without_search_mode_outcome_is_judged_all_the_same(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    ehr, _ = fhir(_record([_outcome(("error", "processing", "index offline"), mode="match")]))
    with pytest.raises(EhrInvalidResourceError, match="index offline"):
        ehr.gather_context(ACCESSION)


def test_outcome_echoing_the_accession_number_is_redacted(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    echo = ("warning", "not-supported", f"identifier {ACCESSION_SYSTEM}|{ACCESSION} not indexed")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_bundle(_match(ORDER), _outcome(echo)))

    ehr, _ = fhir(answer)
    with pytest.raises(EhrInvalidResourceError) as raised:
        ehr.find_service_request(ACCESSION)
    text = str(raised.value)
    assert ACCESSION not in text and "[redacted]" in text
    assert text.startswith("ServiceRequest identifier-")


def test_identifier_references_in_messages_are_keyed_with_the_site_pseudonym_key(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    """Without the key, nobody can tell which accession number a message's reference stands
    for by hashing candidate numbers; with it (``medvlm ref``), an operator can."""
    from connectors.ehr import identifier_ref

    key = b"site-secret-0123456789"
    twice = _bundle(_match(ORDER), _match(ORDER))
    refs = []
    for pseudonym_key in (None, key):
        ehr, _ = fhir(lambda request: httpx.Response(200, json=twice), pseudonym_key=pseudonym_key)
        with pytest.raises(
            EhrError, match="2 ServiceRequests carry this accession number"
        ) as raised:
            ehr.find_service_request(ACCESSION)
        assert ACCESSION not in str(raised.value)
        refs.append(str(raised.value).split()[1].rstrip(":"))
    assert refs[0] == identifier_ref(ACCESSION, ACCESSION_SYSTEM)
    assert refs[1] == identifier_ref(ACCESSION, ACCESSION_SYSTEM, key=key) != refs[0]


# -- Retry-After -----------------------------------------------------------------------------


def _busy_then_ok(status: int, retry_after: str) -> Answer:
    answers = iter([httpx.Response(status, headers={"Retry-After": retry_after})])

    def answer(request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(200, json=PATIENT))

    return answer


def test_retry_after_within_the_cap_is_waited_for(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    ehr, server = fhir(_busy_then_ok(503, "0"), retry_after_max_s=0)
    assert ehr.read_patient("p1").id == "p1"
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_over_the_cap_fails_at_once(
    fhir: Callable[..., tuple[FhirEhr, Scripted]], status: int
) -> None:
    ehr, server = fhir(_busy_then_ok(status, "3600"))
    started = time.monotonic()
    with pytest.raises(EhrUnavailableError) as raised:
        ehr.read_patient("p1")
    assert time.monotonic() - started < 1.0
    assert len(server.requests) == 1
    assert str(raised.value) == (
        f"Patient/p1: HTTP {status}, the server asked to retry after 3600 s, over the 120 s cap "
        "(ehr.retry_after_max_s); not retried"
    )


def test_retry_after_as_a_date_over_the_cap_fails_at_once(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    ehr, server = fhir(_busy_then_ok(503, later), retry_after_max_s=60)
    with pytest.raises(EhrUnavailableError, match=r"retry after 7\d\d\d s, over the 60 s cap"):
        ehr.find_service_request(ACCESSION)
    assert len(server.requests) == 1


def test_retry_after_over_the_cap_names_a_search_by_identifier_hash_and_a_write_by_ref(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    ehr, _ = fhir(_busy_then_ok(429, "3600"))
    with pytest.raises(EhrUnavailableError) as raised:
        ehr.find_service_request(ACCESSION)
    assert str(raised.value).startswith("ServiceRequest identifier-")
    assert ACCESSION not in str(raised.value)

    ehr, _ = fhir(_busy_then_ok(503, "3600"))
    with pytest.raises(EhrUnavailableError, match=r"^transaction Bundle \(0 entries\): HTTP 503"):
        ehr.transaction(Bundle(type="transaction"))
    ehr, _ = fhir(_busy_then_ok(503, "3600"))
    with pytest.raises(
        EhrUnavailableError, match=r"^DiagnosticReport draft-1f \(transaction of 0 entries\): "
    ):
        ehr.transaction(Bundle(type="transaction"), about="DiagnosticReport draft-1f")


def test_without_retry_after_the_backoff_applies(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    answers = iter([httpx.Response(502)])
    ehr, server = fhir(
        lambda request: next(answers, httpx.Response(200, json=PATIENT)), retry_after_max_s=0
    )
    assert ehr.read_patient("p1").id == "p1"
    assert len(server.requests) == 2


# -- write locations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "target"),
    [
        ("DiagnosticReport/123/_history/1", ("DiagnosticReport", "123")),
        ("http://host/fhir/DiagnosticReport/123/_history/1", ("DiagnosticReport", "123")),
        ("https://ehr.example/fhir/R4/Observation/a-5.b", ("Observation", "a-5.b")),
        ("https://ehr.example:8443/base/Device/9/_history/3?_format=json", ("Device", "9")),
        ("/fhir/Provenance/7", ("Provenance", "7")),
        ("MeasureReport/m1/", ("MeasureReport", "m1")),
        ("DocumentReference/d1/_history", ("DocumentReference", "d1")),
        (" Observation/6 ", ("Observation", "6")),
        ("http://host:8080/fhir", None),  # a base names no resource
        ("http://host/fhir/Observation", None),  # a type without an id
        ("http://host/fhir/_history/3", None),
        ("observation/5", None),  # not a resource type
        ("Identifier/5", None),  # a datatype, not a resource
        ("Observation/a_b", None),  # not a FHIR id
        ("urn:uuid:2b1f0a4e-6a0b-4c2c-9a5e-0f1d2c3b4a59", None),
        ("", None),
        (None, None),
    ],
)
def test_location_names_type_and_id_whatever_the_base(
    location: str | None, target: tuple[str, str] | None
) -> None:
    assert location_target(location) == target


def test_created_ids_group_relative_and_absolute_locations_by_type() -> None:
    assert created_ids(
        [
            "http://host/fhir/DiagnosticReport/123/_history/1",
            "Observation/5/_history/1",
            "https://host/fhir/Observation/6/_history/2",
            "Device/d1",
            "http://host/fhir",
            None,
        ]
    ) == {"DiagnosticReport": ["123"], "Observation": ["5", "6"], "Device": ["d1"]}


# -- SMART scopes ----------------------------------------------------------------------------

_V2_SCOPE = re.compile(r"^system/(?P<type>[A-Z][A-Za-z]+)\.(?P<perm>c?r?u?d?s?)$")


def _default_scopes() -> dict[str, str]:
    scopes: dict[str, str] = {}
    for scope in EhrSettings().smart_scopes.split():
        found = _V2_SCOPE.match(scope)
        assert found is not None and found["perm"], f"{scope} is not a SMART 2 system scope"
        assert found["type"] not in scopes, f"{found['type']} asked for twice"
        scopes[found["type"]] = found["perm"]
    return scopes


def test_default_smart_scopes_are_smart_2_and_cover_what_the_pipeline_does() -> None:
    scopes = _default_scopes()
    for read in ("Patient", "ServiceRequest", "Condition", "ImagingStudy"):
        assert scopes.pop(read) == "rs", read
    # Conditional creates (ifNoneExist / If-None-Exist) search, and may answer the match.
    written = ("DiagnosticReport", "Observation", "Device", "Provenance")
    for write in (*written, "DocumentReference", "MeasureReport"):
        assert scopes.pop(write) == "crs", write
    assert scopes == {}, "nothing else (no Task, no update or delete)"


def test_ehr_read_side_settings_defaults() -> None:
    settings = EhrSettings()
    assert settings.strict_search is True
    assert settings.retry_after_max_s == 120.0
    fields = EhrSettings.model_fields
    assert "reject unknown Prefer" in str(fields["strict_search"].description)
    assert "Retry-After" in str(fields["retry_after_max_s"].description)


def test_no_entry_of_a_page_is_handed_out_before_its_outcomes_are_judged(
    fhir: Callable[..., tuple[FhirEhr, Scripted]],
) -> None:
    warning = _outcome(("warning", "not-supported", "parameter ignored"))

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_bundle(_match(ORDER), warning))

    ehr, _ = fhir(answer)
    search = ehr._search("ServiceRequest", [("identifier", "x")], ref="ServiceRequest SYN-REF")
    with pytest.raises(EhrInvalidResourceError, match=r"^ServiceRequest SYN-REF: the server"):
        next(iter(search))
