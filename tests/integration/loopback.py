"""Loopback HTTP servers for tests: a scripted server, and a proxy in front of the real FHIR server.

The proxy forwards to the session's real FHIR server and counts what passes; faults are injected
only where a real server cannot be made to produce them (a 503, a refused token), and say so.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

Handler = Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]


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
                status, headers, payload = handle(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

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


class FhirProxy:
    """Forwards ``/fhir/...`` to the real FHIR server; faults are injected before forwarding.

    - ``fail_next``: answers to give instead of forwarding, one per request, first in first out;
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
      the next POST on, or at once), as a server behind a load balancer does while it restarts.
    A real server cannot be made to do any of these on demand; the proxy does them and says so.
    """

    FORWARDED = ("content-type", "accept", "if-match", "if-none-exist", "prefer")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_next: list[tuple[int, dict[str, str]]] = []
        self.valid_tokens: set[str] | None = None
        self.rewrite: Callable[[bytes], bytes] | None = None
        self.smart_configuration: dict[str, Any] | None = None
        self.ignore_if_none_exist = False
        self.reject_transactions = False
        self.lose_answers = 0
        self.lose_where: Callable[[str], bool] = lambda path: True
        self._outage_s = 0.0
        self._outage_until = 0.0
        self._outage_on_post = False
        self.refused_in_outage = 0
        self.lost: list[str] = []  # paths whose answer was lost after the write
        self.forwarded = 0
        self._http = httpx.Client(timeout=10.0, trust_env=False)
        self.server = LoopbackServer(self._handle)

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/fhir"

    @property
    def seen(self) -> int:
        return len(self.server.requests)

    @property
    def writes(self) -> list[tuple[str, str]]:
        """(method, path) of every request that could change the server."""
        return [(m, p) for m, p in self.server.requests if m in ("POST", "PUT", "PATCH", "DELETE")]

    def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        fhir_json = {"Content-Type": "application/fhir+json"}
        if path.endswith("/.well-known/smart-configuration") and self.smart_configuration:
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps(self.smart_configuration).encode(),
            )
        if self._outage_on_post and method == "POST":
            self._outage_on_post = False
            self._outage_until = time.monotonic() + self._outage_s
        if time.monotonic() < self._outage_until:
            self.refused_in_outage += 1
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "transient", "diagnostics": "outage"}],
            }
            return 503, fhir_json, json.dumps(outcome).encode()
        if self.fail_next:
            status, extra = self.fail_next.pop(0)
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "transient", "diagnostics": "injected"}],
            }
            return status, fhir_json | extra, json.dumps(outcome).encode()
        if self.valid_tokens is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token not in self.valid_tokens:
                outcome = {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "error", "code": "login", "diagnostics": "token required"}
                    ],
                }
                return 401, fhir_json | {"WWW-Authenticate": "Bearer"}, json.dumps(outcome).encode()
        is_transaction = method == "POST" and path.split("?")[0].rstrip("/") == "/fhir"
        if is_transaction and self.reject_transactions:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "not-supported", "diagnostics": "no transactions"}
                ],
            }
            return 405, fhir_json, json.dumps(outcome).encode()
        forwarded = {k: v for k, v in headers.items() if k in self.FORWARDED}
        if self.ignore_if_none_exist and method == "POST":
            forwarded.pop("if-none-exist", None)
            if is_transaction:
                bundle = json.loads(body)
                for entry in bundle.get("entry") or []:
                    (entry.get("request") or {}).pop("ifNoneExist", None)
                body = json.dumps(bundle).encode()
        self.forwarded += 1
        answer = self._http.request(
            method,
            self.upstream + path.removeprefix("/fhir"),
            content=body or None,
            headers=forwarded,
        )
        if (
            method == "POST"
            and answer.status_code < 300
            and self.lose_answers > 0
            and self.lose_where(path)
        ):
            self.lose_answers -= 1
            self.lost.append(path)
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "timeout", "diagnostics": "injected"}],
            }
            return 504, fhir_json, json.dumps(outcome).encode()
        payload = answer.content
        if path.split("?")[0].endswith("/metadata"):
            payload = self._capabilities(payload)
        if self.rewrite is not None:
            payload = self.rewrite(payload)
        keep = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() in ("content-type", "etag", "location")
        }
        return answer.status_code, keep, payload

    def outage(self, seconds: float, *, on_first_post: bool = True) -> None:
        """503 for everything for ``seconds``, from the next POST on (or from now)."""
        self._outage_s = seconds
        if on_first_post:
            self._outage_on_post = True
        else:
            self._outage_until = time.monotonic() + seconds

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
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)
        self._http.close()
