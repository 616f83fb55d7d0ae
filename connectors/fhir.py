"""The EHR over FHIR R4 REST (HL7 FHIR R4 http.html), on one long-lived pooled ``httpx.Client``.

Reads: ``GET [base]/Patient/[id]``; searches with ``_include`` and ``Bundle.link[next]`` paging,
by the US Core ``patient`` parameter, sent with ``Prefer: handling=strict`` (``ehr.strict_search``)
so that a server rejects a parameter it does not support rather than ignoring it and answering a
wider search; an OperationOutcome warning in a search answer fails the search all the same.
Writes: transaction Bundles, creates (plain or conditional: ``If-None-Exist``) and versioned
update (``If-Match: W/"v"``); the server's answer is read back and OperationOutcome issues surface
in errors. A draft's writes are sent once, never retried here (``retry=False``): whether a lost
answer was applied is found out by ``connectors.draft_writer`` before it sends again, as not
every server honours ``If-None-Exist``. ``capabilities`` reads the CapabilityStatement.

Retries (tenacity, exponential backoff with jitter, ``Retry-After`` honoured up to
``ehr.retry_after_max_s``, a longer one fails the call at once) happen here, at the I/O edge, on
429/502/503/504 and connection errors only. HTTP statuses become ``EhrError``s in
exactly one function, ``error_for_status``. This module must not log or raise response bodies,
names, MRNs, accession numbers or birth dates: messages carry a resource type with a logical id or
an identifier hash (``connectors.ehr.identifier_ref``), and values we sent are redacted from server
diagnostics.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.subscription import Subscription
from fhir.resources.R4B.task import Task
from tenacity import (
    RetryCallState,
    Retrying,
    stop_after_attempt,
)

from connectors.circuit import CircuitBreaker
from connectors.ehr import (
    FINAL_REPORT_STATUSES,
    EhrContext,
    WriteCapabilities,
    WriteResult,
    identifier_query,
    identifier_ref,
    identifier_token,
    parse_resource,
)
from connectors.fhir_auth import build_auth
from medvlm.errors import (
    ConfigurationError,
    EhrConflictError,
    EhrDownError,
    EhrError,
    EhrInvalidResourceError,
    EhrNotFoundError,
    EhrUnauthorizedError,
    EhrUnavailableError,
)
from medvlm.http_edge import httpx_timeout, retry_after_wait, retry_policy, tls_verify
from medvlm.settings import EhrSettings
from pipeline.ehr_rules import is_active, local_id, signed_report_of

log = logging.getLogger(__name__)
# httpx logs every request's URL at INFO, and FHIR search URLs carry identifiers (an accession
# number, an MRN): shown whenever a site raises logging to INFO. Only its warnings are kept.
logging.getLogger("httpx").setLevel(logging.WARNING)

R = TypeVar("R", bound=Resource)

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id datatype

__all__ = ["FHIR_JSON", "FhirEhr", "build_http_client", "error_for_status"]


def build_http_client(settings: EhrSettings) -> httpx.Client:
    """The one pooled client for the EHR: finite timeouts, TLS verified, auth from settings."""
    return httpx.Client(
        timeout=httpx_timeout(settings),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        ),
        verify=tls_verify(settings),
        auth=build_auth(settings),
        headers={"Accept": FHIR_JSON, "User-Agent": "medvlm-pipeline"},
        follow_redirects=False,
        # Proxies and CA paths come from settings only, not from HTTP(S)_PROXY / SSL_CERT_FILE.
        trust_env=False,
    )


def error_for_status(status: int, ref: str, issues: tuple[str, ...] = ()) -> EhrError:
    """The one place an HTTP status becomes an ``EhrError`` (servers differ: 404 or 410)."""
    what = f"{ref}: HTTP {status}"
    if status in (404, 410):
        return EhrNotFoundError(f"{what} (not found)")
    if status in (401, 403):
        return EhrUnauthorizedError(f"{what} (not authorised)")
    if status in (409, 412):
        return EhrConflictError(f"{what} (version conflict)" + _joined(issues))
    if status in (400, 422):
        return EhrInvalidResourceError(f"{what} (rejected)", issues)
    if status in RETRY_STATUSES or status >= 500:
        return EhrUnavailableError(f"{what} (unavailable)" + _joined(issues))
    return EhrError(f"{what} (unexpected)" + _joined(issues))


def _joined(issues: tuple[str, ...]) -> str:
    return f" [{'; '.join(issues)}]" if issues else ""


class _RetryableStatus(Exception):
    """A 429/502/503/504 answer, raised inside the retry loop only."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _redact(text: str, sensitive: Iterable[str]) -> str:
    for value in sorted({v for v in sensitive if len(v) >= 3}, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    return text


# Coded and structural elements: not identifying, and redacting them would garble diagnostics.
_STRUCTURAL_KEYS = frozenset(
    {"resourceType", "system", "url", "method", "fullUrl", "code", "status", "gender", "intent"}
    | {"language", "use", "mode", "priority", "versionId", "lastUpdated"}
)


def _string_leaves(data: Any) -> Iterator[str]:
    """String values of a JSON document we sent, except structural ones (types, systems, URLs)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in _STRUCTURAL_KEYS:
                continue
            yield from _string_leaves(value)
    elif isinstance(data, list):
        for item in data:
            yield from _string_leaves(item)
    elif isinstance(data, str):
        yield data


def _outcome_issues(response: httpx.Response, sensitive: Iterable[str]) -> tuple[str, ...]:
    """OperationOutcome issues of an error answer, values we sent redacted, bounded in size."""
    try:
        body = response.json()
    except ValueError:
        return ()
    return _issues(body, sensitive)


#: OperationOutcome.issue.severity of issues that do not put a search answer in doubt.
_HARMLESS_SEVERITIES = frozenset({"information"})


def _issues(
    outcome: Any, sensitive: Iterable[str], ignore: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """``severity/code at expression: diagnostics`` of an OperationOutcome's issues, except
    those whose severity is in ``ignore``; values we sent redacted, bounded in size."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ()
    secrets = list(sensitive)
    items = [
        item
        for item in outcome.get("issue") or []
        if isinstance(item, dict) and item.get("severity") not in ignore
    ]
    out: list[str] = []
    for item in items[:10]:
        diagnostics = str(item.get("diagnostics") or "")[:300]
        expression = ",".join(str(e) for e in item.get("expression") or [])
        text = f"{item.get('severity', '?')}/{item.get('code', '?')}"
        if expression:
            text += f" at {expression}"
        if diagnostics:
            text += f": {_redact(diagnostics, secrets)}"
        out.append(text)
    return tuple(out)


class _RetryLog:
    """tenacity's ``before_sleep`` of one request: logs the retry; ``ref`` also names the
    request in ``FhirEhr._wait``'s error."""

    def __init__(self, ref: str, method: str) -> None:
        self.ref = ref
        self.method = method

    def __call__(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        cause = f"HTTP {exc.args[0]}" if isinstance(exc, _RetryableStatus) else type(exc).__name__
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "FHIR %s %s: %s, retry %d in %.2f s",
            self.method,
            self.ref,
            cause,
            state.attempt_number,
            sleep,
        )


def _when(resource: Resource, *fields: str) -> str:
    for name in fields:
        value = getattr(resource, name, None)
        if value is not None:
            start = getattr(value, "start", None)
            return str(start if start is not None else value)
    return ""


class FhirEhr:
    """``connectors.ehr.Ehr`` over FHIR R4 REST on one long-lived ``httpx.Client``."""

    def __init__(
        self,
        client: httpx.Client,
        settings: EhrSettings,
        *,
        owns_client: bool = False,
        pseudonym_key: bytes | None = None,
    ) -> None:
        if not settings.base_url:
            raise ConfigurationError("ehr.base_url is not set (MEDVLM_EHR__BASE_URL)")
        self._client = client
        self._settings = settings
        self._owns_client = owns_client
        self._ref = partial(identifier_ref, key=pseudonym_key)
        self.base_url = settings.base_url.rstrip("/")
        self._origin = urlsplit(self.base_url)[:2]
        self._capabilities: WriteCapabilities | None = None
        self.breaker = CircuitBreaker(
            "EHR",
            self.base_url,
            self._probe,
            probe_interval_s=settings.probe_interval_s,
            error=EhrDownError,
        )

    def __repr__(self) -> str:
        return f"FhirEhr(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the client if this object built it (a passed-in client belongs to the caller)."""
        if self._owns_client:
            self._client.close()

    # -- the I/O edge -----------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt: the server's ``Retry-After`` when it sent one, else
        exponential backoff with jitter. A ``Retry-After`` beyond ``retry_after_max_s`` is not
        waited for: the call fails at once with ``EhrUnavailableError`` (the study fails, and a
        later run tries it again), rather than holding a worker for as long as the server asks.
        """

        def refuse(state: RetryCallState, why: str) -> EhrUnavailableError:
            exc = state.outcome.exception() if state.outcome is not None else None
            assert isinstance(exc, _RetryableStatus)
            hook = getattr(state.retry_object, "before_sleep", None)
            ref = hook.ref if isinstance(hook, _RetryLog) else self._path_ref(exc.response)
            return EhrUnavailableError(f"{ref}: HTTP {exc.response.status_code}, {why}")

        return retry_after_wait(
            self._settings,
            retry_after=lambda exc: (
                exc.response.headers.get("Retry-After")
                if isinstance(exc, _RetryableStatus)
                else None
            ),
            refuse=refuse,
            setting="ehr.retry_after_max_s",
        )(state)

    def _probe(self) -> None:
        """One ``GET [base]/metadata``, no retry: raises unless the server answers below 500."""
        response = self._client.get(f"{self.base_url}/metadata", headers={"Accept": FHIR_JSON})
        if response.status_code >= 500 or response.status_code == 429:
            raise EhrUnavailableError(f"CapabilityStatement: HTTP {response.status_code}")

    def _path_ref(self, response: httpx.Response) -> str:
        """``GET ServiceRequest``: the method and the path below the base, never the query."""
        path = response.request.url.path
        base_path = urlsplit(self.base_url).path
        below = path[len(base_path) :].strip("/") if path.startswith(base_path) else ""
        return f"{response.request.method} {below or '[base]'}"

    def _log_retry(self, ref: str, method: str) -> _RetryLog:
        return _RetryLog(ref, method)

    def _request(
        self,
        method: str,
        url: str,
        *,
        ref: str,
        params: list[tuple[str, str | int | float | bool | None]] | None = None,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        sensitive: Iterable[str] = (),
        retry: bool = True,
    ) -> httpx.Response:
        """Send with retries; return a 2xx response or raise the mapped ``EhrError``.

        ``retry=False``: one attempt, for writes that are not idempotent on every server (the
        caller looks for what was applied before sending again: connectors.draft_writer).
        """
        if urlsplit(url)[:2] != self._origin:
            # A next-link or Location on another host would receive our bearer token.
            raise EhrInvalidResourceError(f"{ref}: server pointed to another origin")
        self.breaker.check(ref)  # known down: no request, the caller waits (connectors.circuit)
        attempts = self._settings.retry_attempts if retry else 1
        send_headers = {"Accept": FHIR_JSON, **(headers or {})}
        content = None
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            send_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
        policy = retry_policy(
            self._settings,
            # EhrUnavailableError: a SMART token endpoint answering 429/5xx in the auth flow.
            retry_on=lambda exc: isinstance(
                exc, _RetryableStatus | httpx.TransportError | EhrUnavailableError
            ),
            wait=self._wait,
            before_sleep=self._log_retry(ref, method),
        )
        if not retry:
            policy["stop"] = stop_after_attempt(1)
        retrying = Retrying(**policy)
        try:
            for attempt in retrying:
                with attempt:
                    response = self._client.request(
                        method, url, params=params, content=content, headers=send_headers
                    )
                    if response.status_code in RETRY_STATUSES:
                        raise _RetryableStatus(response)
        except _RetryableStatus as exc:
            response = exc.response
            if retry:  # the whole retry budget spent on a server answering 5xx/429: down
                raise self.breaker.failed(f"HTTP {response.status_code}", ref) from None
        except httpx.TransportError as exc:
            if retry:  # ... or on one that does not answer at all
                raise self.breaker.failed(type(exc).__name__, ref) from None
            raise EhrUnavailableError(
                f"{ref}: {type(exc).__name__} after {attempts} attempt(s)"
            ) from exc
        self.breaker.succeeded()
        if response.status_code >= 400:
            leaves = list(_string_leaves(body)) if body is not None else []
            raise error_for_status(
                response.status_code, ref, _outcome_issues(response, [*sensitive, *leaves])
            )
        return response

    def _json(self, response: httpx.Response, ref: str) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            raise EhrInvalidResourceError(f"{ref}: answer is not JSON") from None
        if not isinstance(data, dict):
            raise EhrInvalidResourceError(f"{ref}: answer is not a JSON object")
        return data

    def _search(
        self, rtype: str, params: list[tuple[str, str]], *, ref: str, sensitive: Iterable[str] = ()
    ) -> Iterator[tuple[str, Resource]]:
        """(search mode, resource) of every entry, following ``Bundle.link[next]`` page by page.

        With ``strict_search`` the server is asked (``Prefer: handling=strict``, FHIR R4
        search.html#errors) to reject parameters it does not support (HTTP 400, an
        ``EhrInvalidResourceError`` with its issues). A lenient server ignores them and says so in
        an OperationOutcome entry (``search.mode`` = outcome): its answer may be wider than asked
        (another patient's reports), so an issue of severity warning, error or fatal fails the
        search too; information is passed over.
        """
        secrets = list(sensitive)
        headers = {"Prefer": "handling=strict"} if self._settings.strict_search else None
        url: str | None = f"{self.base_url}/{rtype}"
        query: list[tuple[str, str | int | float | bool | None]] | None = [
            *params,
            ("_count", str(self._settings.page_size)),
        ]
        for page in range(1, self._settings.max_pages + 1):
            assert url is not None
            response = self._request(
                "GET", url, ref=ref, params=query, headers=headers, sensitive=secrets
            )
            bundle = self._json(response, ref)
            if bundle.get("resourceType") != "Bundle":
                raise EhrInvalidResourceError(f"{ref}: search answer is not a Bundle")
            entries: list[tuple[str, Any]] = []
            issues: list[str] = []
            for entry in bundle.get("entry") or []:
                if not isinstance(entry, dict):
                    raise EhrInvalidResourceError(f"{ref}: malformed Bundle.entry on page {page}")
                mode = str((entry.get("search") or {}).get("mode", "match"))
                resource = entry.get("resource")
                if mode == "outcome" or (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == "OperationOutcome"
                ):
                    issues.extend(_issues(resource, secrets, ignore=_HARMLESS_SEVERITIES))
                else:
                    entries.append((mode, resource))
            if issues:  # judged before any entry of the page is handed out
                raise EhrInvalidResourceError(
                    f"{ref}: the server reported issues with the search (page {page}); "
                    "its answer may be wider or narrower than asked",
                    tuple(issues[:10]),
                )
            for mode, resource in entries:
                yield mode, parse_resource(resource, where=f" in {ref} page {page}")
            url = self._rebased(
                next(
                    (
                        link.get("url")
                        for link in bundle.get("link") or []
                        if isinstance(link, dict) and link.get("relation") == "next"
                    ),
                    None,
                ),
                ref,
            )
            query = None  # the next link carries the whole query
            if not url:
                return
        raise EhrError(f"{ref}: search has more than {self._settings.max_pages} pages")

    def _rebased(self, url: Any, ref: str) -> str | None:
        """A next link on our origin. Servers behind a reverse proxy often link their internal
        host; the path and query are kept and sent to our base's origin, never elsewhere."""
        if not isinstance(url, str) or not url:
            return None
        parts = urlsplit(url)
        if not parts.scheme:  # relative link
            return f"{self._origin[0]}://{self._origin[1]}/{url.lstrip('/')}"
        if parts[:2] != self._origin:
            log.warning("FHIR %s: next link on another origin, sent to ours instead", ref)
            query = f"?{parts.query}" if parts.query else ""
            return f"{self._origin[0]}://{self._origin[1]}{parts.path}{query}"
        return url

    # -- reads ------------------------------------------------------------------------------

    def read_patient(self, patient_id: str) -> Patient:
        return self._read(Patient, patient_id)

    def _read(self, model: type[R], rid: str) -> R:
        rtype = model.get_resource_type()
        if not _ID.match(rid):
            raise EhrInvalidResourceError(f"{rtype}: logical id is not a FHIR id")
        ref = f"{rtype}/{rid}"
        response = self._request("GET", f"{self.base_url}/{ref}", ref=ref)
        return parse_resource(self._json(response, ref), model)

    def _accession_search(
        self, accession_number: str, include_subject: bool
    ) -> tuple[list[ServiceRequest], list[Patient]]:
        system = self._settings.accession_system
        ref = f"ServiceRequest {self._ref(accession_number, system)}"
        params = [("identifier", identifier_token(accession_number, system))]
        if include_subject:
            params.append(("_include", "ServiceRequest:subject"))
        orders: list[ServiceRequest] = []
        patients: list[Patient] = []
        for mode, resource in self._search(
            "ServiceRequest", params, ref=ref, sensitive=[accession_number]
        ):
            if isinstance(resource, ServiceRequest) and mode == "match":
                orders.append(resource)
            elif isinstance(resource, Patient):
                patients.append(resource)
        if len(orders) > 1:
            raise EhrError(f"{ref}: {len(orders)} ServiceRequests carry this accession number")
        return orders, patients

    def find_service_request(self, accession_number: str) -> ServiceRequest | None:
        orders, _ = self._accession_search(accession_number, include_subject=False)
        return orders[0] if orders else None

    def find_patient(self, identifier_value: str, system: str | None = None) -> Patient | None:
        ref = f"Patient {self._ref(identifier_value, system)}"
        found = [
            resource
            for mode, resource in self._search(
                "Patient",
                [("identifier", identifier_token(identifier_value, system))],
                ref=ref,
                sensitive=[identifier_value],
            )
            if isinstance(resource, Patient) and mode == "match"
        ]
        if len(found) > 1:
            raise EhrError(f"{ref}: {len(found)} patients carry this identifier")
        return found[0] if found else None

    def gather_context(self, accession_number: str, patient_id: str | None = None) -> EhrContext:
        """One search for the order with its patient (``_include=ServiceRequest:subject``), then
        one filtered, paged search per list. Which of the signed reports may be shown to the
        model is decided in ``pipeline.context.eligible_priors``, for every EHR alike.

        The lists use filtered searches rather than ``_revinclude`` on Patient: a revinclude
        brings every Condition/report of a long record regardless of status, unpaged on many
        servers; the filters (``clinical-status=active``, ``status=final``) keep it bounded. They
        search by ``patient``, which US Core servers SHALL support for these types (``subject``
        only SHOULD, and a server that ignores it answers with every patient's resources).
        """
        orders, patients = self._accession_search(accession_number, include_subject=True)
        order = orders[0] if orders else None
        if order is not None:
            subject = order.subject.reference if order.subject is not None else None
            order_patient = local_id(subject, "Patient")
            if order_patient is None:
                raise EhrInvalidResourceError(
                    f"ServiceRequest/{order.id}: subject is not a Patient reference"
                )
            patient_id = order_patient
        if patient_id is None:
            ref = self._ref(accession_number, self._settings.accession_system)
            raise EhrNotFoundError(f"ServiceRequest {ref}: no order and no patient id given")
        patient = next((p for p in patients if p.id == patient_id), None)
        if patient is None:
            try:
                patient = self.read_patient(patient_id)
            except EhrNotFoundError as exc:
                if order is None:
                    raise
                # An order whose subject is gone (deleted, never there) is not "no order": the
                # caller's fallback to the DICOM PatientID must not draft without the order.
                raise EhrInvalidResourceError(
                    f"ServiceRequest/{order.id}: its subject {exc}"
                ) from None
        subject = f"Patient/{patient_id}"
        conditions = [
            c
            for _, c in self._search(
                "Condition",
                [("patient", subject), ("clinical-status", "active")],
                ref=f"Condition of {subject}",
            )
            if isinstance(c, Condition) and is_active(c)
        ]
        reports = [
            r
            for _, r in self._search(
                "DiagnosticReport",
                [("patient", subject), ("status", ",".join(FINAL_REPORT_STATUSES))],
                ref=f"DiagnosticReport of {subject}",
            )
            if isinstance(r, DiagnosticReport) and r.status in FINAL_REPORT_STATUSES
        ]
        studies = [
            s
            for _, s in self._search(
                "ImagingStudy",
                [("patient", subject), ("_sort", "-started")],
                ref=f"ImagingStudy of {subject}",
            )
            if isinstance(s, ImagingStudy)
        ]
        studies.sort(key=lambda s: _when(s, "started"), reverse=True)
        return EhrContext(patient, order, tuple(conditions), tuple(reports), tuple(studies))

    def find_final_report(
        self, accession_number: str | None, service_request: str | None = None
    ) -> DiagnosticReport | None:
        """``DiagnosticReport?based-on=ServiceRequest/{id}&status=final,amended,corrected``; when
        no order is given or that finds nothing, ``DiagnosticReport?identifier=system|accession``
        with the same status filter. The latest by ``issued`` wins.

        Everything is checked again here (status, ``basedOn`` or identifier, search mode
        ``match``): servers differ on multi-value ``status`` and ``based-on``, and some ignore a
        parameter they do not support with only a warning, which would otherwise hand back the
        AI's preliminary draft or another order's report.
        """
        statuses = ("status", ",".join(FINAL_REPORT_STATUSES))
        order_id = None
        based_on: list[DiagnosticReport] = []
        if service_request:
            order_id = local_id(service_request, "ServiceRequest")
            if order_id is None or not _ID.match(order_id):
                raise ValueError("find_final_report: service_request is not a ServiceRequest/id")
            order = f"ServiceRequest/{order_id}"
            based_on = [
                r
                for mode, r in self._search(
                    "DiagnosticReport",
                    [("based-on", order), statuses],
                    ref=f"DiagnosticReport based on {order}",
                )
                if mode == "match" and isinstance(r, DiagnosticReport)
            ]
            found = signed_report_of(
                based_on, order_id=order_id, accession_number=None, accession_system=None
            )
            if found is not None:
                return found
        if not accession_number:
            return None
        system = self._settings.accession_system
        return signed_report_of(
            (
                r
                for mode, r in self._search(
                    "DiagnosticReport",
                    [("identifier", identifier_token(accession_number, system)), statuses],
                    ref=f"DiagnosticReport {self._ref(accession_number, system)}",
                    sensitive=[accession_number],
                )
                if mode == "match" and isinstance(r, DiagnosticReport)
            ),
            order_id=None,
            accession_number=accession_number,
            accession_system=system,
        )

    # -- writes -----------------------------------------------------------------------------

    def transaction(
        self, bundle: Bundle, *, retry: bool = True, about: str | None = None
    ) -> Bundle:
        if bundle.type != "transaction":
            raise ValueError("transaction() needs Bundle.type = transaction")
        n = len(bundle.entry or [])
        ref = (
            f"{about} (transaction of {n} entries)"
            if about
            else f"transaction Bundle ({n} entries)"
        )
        body = json.loads(bundle.model_dump_json(by_alias=True, exclude_none=True))
        response = self._request("POST", self.base_url, ref=ref, body=body, retry=retry)
        answer = parse_resource(self._json(response, ref), Bundle, where=" (transaction-response)")
        if answer.type != "transaction-response":
            raise EhrInvalidResourceError(f"{ref}: answer is a {answer.type} Bundle")
        return answer

    def conditional_create(self, resource: Resource, identifier: Identifier) -> WriteResult:
        """``POST [base]/[type]`` with ``If-None-Exist: identifier=system|value`` (FHIR R4
        http.html#ccreate): 201 created, 200 an existing match was returned."""
        if identifier.value is None:
            raise ValueError("conditional_create needs Identifier.value")
        rtype = resource.get_resource_type()
        ref = f"{rtype} {self._ref(identifier.value, identifier.system)}"
        body = json.loads(resource.model_dump_json(by_alias=True, exclude_none=True))
        body.pop("id", None)
        response = self._request(
            "POST",
            f"{self.base_url}/{rtype}",
            ref=ref,
            body=body,
            headers={
                "If-None-Exist": identifier_query(identifier.value, identifier.system),
                "Prefer": "return=representation",
            },
            sensitive=[identifier.value],
        )
        created = response.status_code == 201
        if response.content.strip():
            stored = parse_resource(self._json(response, ref), type(resource))
        else:  # a server that ignores Prefer: read back what Location names
            location = response.headers.get("Location", "")
            rid = local_id(location, rtype)
            if rid is None:
                raise EhrInvalidResourceError(f"{ref}: answer has neither body nor Location")
            stored = self._read(type(resource), rid)
        return WriteResult(stored, created)

    def update(self, resource: Resource, if_match: str, *, retry: bool = True) -> Resource:
        """``PUT [base]/[type]/[id]`` with ``If-Match: W/"version"``.

        FHIR R4 http.html#concurrency: a stale version gives 412 → ``EhrConflictError``.
        ``retry=False``: sent once (a retried PUT whose first answer was lost would meet its own
        new version and answer 412).
        """
        rtype = resource.get_resource_type()
        if resource.id is None or not _ID.match(resource.id):
            raise ValueError(f"update() needs a {rtype} with a logical id")
        ref = f"{rtype}/{resource.id}"
        body = json.loads(resource.model_dump_json(by_alias=True, exclude_none=True))
        response = self._request(
            "PUT",
            f"{self.base_url}/{ref}",
            ref=ref,
            body=body,
            headers={"If-Match": f'W/"{if_match}"', "Prefer": "return=representation"},
            retry=retry,
        )
        if not response.content.strip():
            return self._read(type(resource), resource.id)
        return parse_resource(self._json(response, ref), type(resource))

    # -- Tasks (on-demand drafting: pipeline.tasks, flows.tasks) -------------------------------

    def search_tasks(
        self,
        system: str,
        code: str,
        *,
        status: str = "requested",
        since: dt.datetime | None = None,
    ) -> list[Task]:
        """``GET [base]/Task?code=system|code&status=…&_lastUpdated=ge…``, every page, oldest
        change first; ``since`` None: every such Task. Each is checked again here (status,
        code): a server that ignored a parameter answers wider."""
        params = [("code", f"{system}|{code}"), ("status", status), ("_sort", "_lastUpdated")]
        if since is not None:
            when = since if since.tzinfo is not None else since.replace(tzinfo=dt.UTC)
            params.append(("_lastUpdated", f"ge{when.isoformat(timespec='seconds')}"))
        return [
            task
            for mode, task in self._search("Task", params, ref=f"Task {code} {status}")
            if mode == "match"
            and isinstance(task, Task)
            and task.status == status
            and task.code is not None
            and any(c.system == system and c.code == code for c in task.code.coding or [])
        ]

    def read(self, model: type[R], rid: str) -> R:
        """``GET [base]/[type]/[id]``; ``EhrNotFoundError`` if absent (404 or 410)."""
        return self._read(model, rid)

    def update_task(self, task: Task) -> Task | None:
        """``PUT [base]/Task/[id]`` with ``If-Match: W/"<meta.versionId>"``, sent once.

        None when the server holds another version (412, or 409 on some servers): another
        worker, or the Task's requester (a cancellation), changed it first. That is the claim
        lost, not an error. A Task without ``meta.versionId`` is refused (``ValueError``): an
        update without If-Match could overwrite a cancellation.
        """
        version = task.meta.versionId if task.meta is not None else None
        if not version:
            raise ValueError(f"Task/{task.id}: no meta.versionId to send as If-Match")
        try:
            updated = self.update(task, str(version), retry=False)
        except EhrConflictError:
            return None
        assert isinstance(updated, Task)
        return updated

    # -- Subscriptions (medvlm tasks --listen: flows.task_listener) ----------------------------

    def create_subscription(self, subscription: Subscription) -> Subscription:
        """``POST [base]/Subscription`` once, then the Subscription read back: a server may
        activate (or refuse, ``status`` ``error``) it as it stores it, in a version after the
        one its answer shows. Its channel header (a secret) never appears in an error."""
        ref = "Subscription (create)"
        body = json.loads(subscription.model_dump_json(by_alias=True, exclude_none=True))
        body.pop("id", None)
        response = self._request(
            "POST",
            f"{self.base_url}/Subscription",
            ref=ref,
            body=body,
            headers={"Prefer": "return=representation"},
            retry=False,
        )
        rid = local_id(
            response.headers.get("Location") or response.headers.get("Content-Location"),
            "Subscription",
        )
        if rid is None and response.content.strip():
            rid = self._json(response, ref).get("id")
        if not isinstance(rid, str) or not _ID.match(rid):
            raise EhrInvalidResourceError(f"{ref}: answer names no Subscription id")
        return self._read(Subscription, rid)

    def subscription_status(self, subscription_id: str) -> str | None:
        """``GET [base]/Subscription/[id]``'s ``status``; None when it is gone (404, 410)."""
        try:
            return self._read(Subscription, subscription_id).status
        except EhrNotFoundError:
            return None

    def delete_subscription(self, subscription_id: str) -> None:
        """``DELETE [base]/Subscription/[id]``; one already gone (404, 410) is not an error."""
        if not _ID.match(subscription_id):
            raise ValueError("delete_subscription() needs a logical id")
        ref = f"Subscription/{subscription_id}"
        with contextlib.suppress(EhrNotFoundError):
            self._request("DELETE", f"{self.base_url}/{ref}", ref=ref)

    def capabilities(self) -> WriteCapabilities:
        """``GET [base]/metadata`` once: the ``transaction`` interaction and the types with
        ``conditionalCreate`` (FHIR R4 CapabilityStatement.rest)."""
        if self._capabilities is None:
            ref = "CapabilityStatement"
            statement = self._json(self._request("GET", f"{self.base_url}/metadata", ref=ref), ref)
            transaction = False
            conditional: set[str] = set()
            for rest in statement.get("rest") or []:
                if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
                    continue
                codes = {
                    i.get("code") for i in rest.get("interaction") or [] if isinstance(i, dict)
                }
                transaction = transaction or "transaction" in codes
                for resource in rest.get("resource") or []:
                    if isinstance(resource, dict) and resource.get("conditionalCreate") is True:
                        conditional.add(str(resource.get("type")))
            self._capabilities = WriteCapabilities(transaction, frozenset(conditional))
        return self._capabilities

    def find_by_key(self, rtype: str, param: str, system: str, value: str) -> list[Resource]:
        ref = f"{rtype} {self._ref(value, system)}"
        return [
            resource
            for mode, resource in self._search(
                rtype, [(param, identifier_token(value, system))], ref=ref, sensitive=[value]
            )
            if mode == "match" and resource.get_resource_type() == rtype
        ]

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> str:
        """``POST [base]/[type]`` once (``If-None-Exist`` when given); the new or matching
        resource's ``Type/id`` from ``Location``, else from the body."""
        rtype = str(resource["resourceType"])
        ref = f"{rtype} (create)"
        headers = {"Prefer": "return=minimal"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = if_none_exist
        body = {k: v for k, v in resource.items() if k != "id"}
        response = self._request(
            "POST", f"{self.base_url}/{rtype}", ref=ref, body=body, headers=headers, retry=False
        )
        rid = local_id(
            response.headers.get("Location") or response.headers.get("Content-Location"), rtype
        )
        if rid is None and response.content.strip():
            rid = self._json(response, ref).get("id")
        if not isinstance(rid, str) or not _ID.match(rid):
            raise EhrInvalidResourceError(f"{ref}: answer names no {rtype} id")
        return f"{rtype}/{rid}"

    # -- pre-flight ---------------------------------------------------------------------------

    def ping(self) -> None:
        """``GET [base]/metadata`` once (no retry), within the client's timeouts and with its
        auth (a SMART token is fetched): that the server answers, is a FHIR server and, where
        it guards its CapabilityStatement, accepts our credentials (flows/preflight.py). No
        patient data.

        Raises the ``EhrError`` of the status (``error_for_status``), ``EhrUnavailableError``
        (no connection, timeout) or ``EhrInvalidResourceError`` (no CapabilityStatement),
        chained to the library's exception for its cause.
        """
        ref = "CapabilityStatement (pre-flight)"
        try:
            response = self._client.get(f"{self.base_url}/metadata")
            response.raise_for_status()
        except httpx.HTTPStatusError as exc:
            raise error_for_status(exc.response.status_code, ref) from exc
        except httpx.TransportError as exc:
            raise EhrUnavailableError(f"{ref}: {type(exc).__name__}") from exc
        try:
            kind = response.json().get("resourceType")
        except (ValueError, AttributeError):
            kind = None
        if kind != "CapabilityStatement":
            raise EhrInvalidResourceError(f"{ref}: the answer is not a CapabilityStatement")
