"""Loopback HTTP servers for tests: a scripted server, and fault proxies in front of the real
servers (the FHIR server, Orthanc's DICOMweb).

A proxy forwards to the session's real server and counts what passes; faults are injected only
where a real server cannot be made to produce them on demand (a 503 with ``Retry-After``, a
reset connection, an answer later than the client waits, a refused token), and say so.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

Handler = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]
Where = Callable[[str, str], bool]  # (method, path) → whether a fault or trigger applies


class ResetConnection(Exception):
    """Raised by a handler: the connection is reset (TCP RST), no answer is sent."""


class LoopbackServer:
    """A real HTTP/1.1 server on 127.0.0.1 that answers with ``handle``, counting requests."""

    def __init__(self, handle: Handler) -> None:
        self.requests: list[tuple[str, str]] = []
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path))
                try:
                    status, headers, payload = handle(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                except ResetConnection:
                    # SO_LINGER 0: close() sends RST, as a crashed or overloaded peer does.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up waiting (a slow answer): nobody to tell
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: no request lines in test output

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class Fault:
    """What a proxy does with one request instead of forwarding it at once."""

    name: str
    status: int | None = None  # answered by the proxy (with ``headers``), not forwarded
    headers: Mapping[str, str] = field(default_factory=dict)
    reset: bool = False  # the connection is reset without an answer
    delay_s: float = 0.0  # forwarded, and answered this late

    @classmethod
    def busy(cls, status: int, retry_after_s: int) -> Fault:
        """429 or 503 with ``Retry-After`` (delta-seconds)."""
        return cls(f"{status}+Retry-After", status, {"Retry-After": str(retry_after_s)})

    @classmethod
    def connection_reset(cls) -> Fault:
        return cls("reset", reset=True)

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        return cls(f"slow {delay_s:g} s", delay_s=delay_s)


@dataclass(frozen=True)
class Passed:
    """One request the proxy saw: when (``time.monotonic``), what, and the fault it got."""

    at: float
    method: str
    path: str
    fault: str | None  # None: forwarded as it came


class FaultProxy:
    """Forwards ``{prefix}/...`` to ``upstream`` and counts what passes; faults come first.

    - ``fail_next``: answers to give instead of forwarding, one per request, first in first out;
    - ``inject(fault, every=, times=, where=)``: every ``every``-th request that ``where``
      accepts gets ``fault`` (a status with headers, a reset, a late answer), ``times`` in all;
    - ``outage(seconds, on_first=where)``: every request answers 503 for that long, from the
      first request ``where`` accepts on (or at once), as a server behind a load balancer does
      while it restarts.

    ``log`` holds every request with its time and fault; ``forwarded`` counts what reached the
    real server. Subclasses shape the refusals' bodies and what is forwarded.
    """

    FORWARDED: tuple[str, ...] = ("content-type", "accept")
    KEPT: tuple[str, ...] = ("content-type",)

    def __init__(self, upstream: str, prefix: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix
        self.fail_next: list[tuple[int, dict[str, str]]] = []
        self.log: list[Passed] = []
        self.forwarded = 0
        self.refused_in_outage = 0
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._every = 1
        self._left = 0
        self._where: Where = lambda method, path: True
        self._matched = 0
        self._outage_s = 0.0
        self._outage_until = 0.0
        self._outage_on: Where | None = None
        self._http = httpx.Client(timeout=60.0, trust_env=False)
        self.server = LoopbackServer(self._handle)

    @property
    def base_url(self) -> str:
        return f"{self.server.url}{self.prefix}"

    @property
    def seen(self) -> int:
        return len(self.server.requests)

    def faulted(self, name: str | None = None) -> list[Passed]:
        """The requests that got a fault (of that name)."""
        return [p for p in self.log if p.fault is not None and name in (None, p.fault)]

    def inject(
        self, fault: Fault, *, every: int = 1, times: int = 1, where: Where | None = None
    ) -> None:
        """From now on every ``every``-th request ``where`` accepts gets ``fault``, ``times``
        times in all."""
        with self._lock:
            self._fault, self._every, self._left = fault, every, times
            self._where = where or (lambda method, path: True)
            self._matched = 0

    def outage(self, seconds: float, *, on_first: Where | None = None) -> None:
        """503 for everything for ``seconds``, from the first request ``on_first`` accepts
        (or from now)."""
        with self._lock:
            self._outage_s = seconds
            self._outage_on = on_first
            if on_first is None:
                self._outage_until = time.monotonic() + seconds

    def _refusal(self, status: int, why: str) -> tuple[dict[str, str], bytes]:
        """Headers and body of an answer the proxy gives itself."""
        return {"Content-Type": "text/plain"}, why.encode()

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            now = time.monotonic()
            if self._outage_on is not None and self._outage_on(method, path):
                self._outage_on = None
                self._outage_until = now + self._outage_s
            fault: Fault | None = None
            if now < self._outage_until:
                self.refused_in_outage += 1
                fault = Fault("outage", 503)
            elif self.fail_next:
                status, extra = self.fail_next.pop(0)
                fault = Fault(f"injected {status}", status, extra)
            elif self._fault is not None and self._left > 0 and self._where(method, path):
                self._matched += 1
                if self._matched % self._every == 0:
                    self._left -= 1
                    fault = self._fault
            self.log.append(Passed(now, method, path, fault.name if fault else None))
        if fault is not None and fault.status is not None:
            extra, payload = self._refusal(fault.status, fault.name)
            return fault.status, extra | dict(fault.headers), payload
        if fault is not None and fault.reset:
            raise ResetConnection
        if fault is not None:
            time.sleep(fault.delay_s)  # then answered: to a client that may have given up
        return self._forward(method, path, headers, body)

    def _send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> httpx.Response:
        self.forwarded += 1
        return self._http.request(
            method,
            self.upstream + path.removeprefix(self.prefix),
            content=body or None,
            headers={k: v for k, v in headers.items() if k in self.FORWARDED},
        )

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        answer = self._send(method, path, headers, body)
        kept = {k: v for k, v in answer.headers.items() if k.lower() in self.KEPT}
        return answer.status_code, kept, answer.content

    def __enter__(self) -> FaultProxy:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)
        self._http.close()


class DicomWebProxy(FaultProxy):
    """Forwards ``/dicom-web/...`` to the real Orthanc's DICOMweb root (its basic auth passes
    through); refusals are plain text, as a gateway's are."""

    FORWARDED = ("content-type", "accept", "authorization")
    KEPT = ("content-type",)

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "/dicom-web")

    def __enter__(self) -> DicomWebProxy:
        super().__enter__()
        return self


class FhirProxy(FaultProxy):
    """Forwards ``/fhir/...`` to the real FHIR server; faults are injected before forwarding.

    Besides ``FaultProxy``'s faults (refusals are OperationOutcomes):

    - ``valid_tokens``: when not None, requests without ``Authorization: Bearer <one of them>``
      get 401 (the real server runs without auth in the session);
    - ``rewrite``: changes a forwarded answer body (to serve a malformed resource);
    - ``smart_configuration``: served at ``/fhir/.well-known/smart-configuration``;
    - ``ignore_if_none_exist``: a server without conditional create — ``If-None-Exist`` and
      ``Bundle.entry.request.ifNoneExist`` are dropped (the write becomes a plain create) and
      the CapabilityStatement says ``conditionalCreate: false``;
    - ``reject_transactions``: a server without transactions — a POST to the base answers 405
      and the CapabilityStatement lists no ``transaction`` interaction;
    - ``lose_answers``: that many POSTs (those ``lose_where(path)`` accepts) are forwarded and
      committed by the real server, then answered 504 as a gateway that timed out waiting
      would: the answer is lost, not the write.
    - ``outage(seconds, on_first_post=True)``: every request answers 503 for that long (from
      the next POST on, or at once).
    A real server cannot be made to do any of these on demand; the proxy does them and says so.
    """

    FORWARDED = ("content-type", "accept", "if-match", "if-none-exist", "prefer")
    KEPT = ("content-type", "etag", "location")

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "/fhir")
        self.valid_tokens: set[str] | None = None
        self.rewrite: Callable[[bytes], bytes] | None = None
        self.smart_configuration: dict[str, Any] | None = None
        self.ignore_if_none_exist = False
        self.reject_transactions = False
        self.lose_answers = 0
        self.lose_where: Callable[[str], bool] = lambda path: True
        self.lost: list[str] = []  # paths whose answer was lost after the write

    @property
    def writes(self) -> list[tuple[str, str]]:
        """(method, path) of every request that could change the server."""
        return [(m, p) for m, p in self.server.requests if m in ("POST", "PUT", "PATCH", "DELETE")]

    def outage(  # type: ignore[override]
        self, seconds: float, *, on_first_post: bool = True
    ) -> None:
        """503 for everything for ``seconds``, from the next POST on (or from now)."""
        super().outage(seconds, on_first=(lambda m, _p: m == "POST") if on_first_post else None)

    @staticmethod
    def _outcome(code: str, diagnostics: str) -> bytes:
        issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
        return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()

    def _refusal(self, status: int, why: str) -> tuple[dict[str, str], bytes]:
        diagnostics = "outage" if why == "outage" else "injected"
        return {"Content-Type": "application/fhir+json"}, self._outcome("transient", diagnostics)

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if path.endswith("/.well-known/smart-configuration") and self.smart_configuration:
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps(self.smart_configuration).encode(),
            )
        return super()._handle(method, path, headers, body)

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        fhir_json = {"Content-Type": "application/fhir+json"}
        if self.valid_tokens is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token not in self.valid_tokens:
                return (
                    401,
                    fhir_json | {"WWW-Authenticate": "Bearer"},
                    self._outcome("login", "token required"),
                )
        is_transaction = method == "POST" and path.split("?")[0].rstrip("/") == "/fhir"
        if is_transaction and self.reject_transactions:
            return 405, fhir_json, self._outcome("not-supported", "no transactions")
        if self.ignore_if_none_exist and method == "POST":
            headers = {k: v for k, v in headers.items() if k != "if-none-exist"}
            if is_transaction:
                bundle = json.loads(body)
                for entry in bundle.get("entry") or []:
                    (entry.get("request") or {}).pop("ifNoneExist", None)
                body = json.dumps(bundle).encode()
        answer = self._send(method, path, headers, body)
        if (
            method == "POST"
            and answer.status_code < 300
            and self.lose_answers > 0
            and self.lose_where(path)
        ):
            self.lose_answers -= 1
            self.lost.append(path)
            return 504, fhir_json, self._outcome("timeout", "injected")
        payload = answer.content
        if path.split("?")[0].endswith("/metadata"):
            payload = self._capabilities(payload)
        if self.rewrite is not None:
            payload = self.rewrite(payload)
        kept = {k: v for k, v in answer.headers.items() if k.lower() in self.KEPT}
        return answer.status_code, kept, payload

    def _capabilities(self, payload: bytes) -> bytes:
        """The real CapabilityStatement, less what this proxy takes away."""
        statement = json.loads(payload)
        for rest in statement.get("rest") or []:
            if self.reject_transactions:
                rest["interaction"] = [
                    i for i in rest.get("interaction") or [] if i.get("code") != "transaction"
                ]
            if self.ignore_if_none_exist:
                for resource in rest.get("resource") or []:
                    resource["conditionalCreate"] = False
        return json.dumps(statement).encode()

    def __enter__(self) -> FhirProxy:
        super().__enter__()
        return self
