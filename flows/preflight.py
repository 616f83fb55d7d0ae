"""Pre-flight: do the PACS, the EHR and the job ledger answer?

Checked before a run discovers studies, and long before the model service starts (``medvlm
run`` when ``job.preflight`` is on; ``require_services`` for other entry points), and on request
by ``medvlm check``. One cheap request per service, one attempt, within
``job.preflight_timeout_s`` (the connect timeout at most the service's own), all at once:

- PACS: DICOMweb a QIDO-RS study search for a UID no study has (``limit=1``); DIMSE a TCP
  connection and a C-ECHO; a folder exists and can be read;
- EHR: FHIR ``GET [base]/metadata`` with the configured auth (a SMART token is fetched); an
  NDJSON folder exists and can be read;
- ledger: ``SELECT 1``.

No request carries or returns patient data, and a result names a service by its kind and
where it is (URLs without credentials, query or fragment), its cause in words (connection
refused, DNS lookup failed, TLS, HTTP 401, timed out), never a library's message.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from connectors.circuit import public_url as redact_url
from medvlm.errors import ConfigurationError, MedvlmError
from medvlm.settings import (
    EhrSettings,
    HttpEdgeSettings,
    MedvlmSettings,
    PacsSettings,
    with_variable_names,
)

__all__ = [
    "CheckResult",
    "PreflightError",
    "check_ehr",
    "check_ledger",
    "check_pacs",
    "describe_failure",
    "ehr_where",
    "ledger_kind",
    "ledger_where",
    "pacs_where",
    "redact_url",
    "require_services",
    "run_checks",
]

E = TypeVar("E", bound=HttpEdgeSettings)


@dataclass(frozen=True)
class CheckResult:
    """One service's answer to the pre-flight."""

    service: str
    """``PACS``, ``EHR`` or ``ledger``."""
    kind: str
    """``dicomweb``, ``dimse``, ``folder``, ``fhir``, ``sqlite``, ``postgresql``, …"""
    where: str
    """URL, host or folder, without credentials."""
    ok: bool
    detail: str
    """``answered`` or the cause of the failure, in words."""
    seconds: float

    def line(self) -> str:
        """``EHR (fhir) http://127.0.0.1:8943/fhir: connection refused``: one line."""
        return f"{self.service} ({self.kind}) {self.where}: {self.detail}"


class PreflightError(ConfigurationError):
    """A service did not answer the pre-flight; ``results`` holds every check's result (the
    message is the failed ones' lines, joined by "; ")."""

    def __init__(self, message: str, results: tuple[CheckResult, ...] = ()) -> None:
        super().__init__(message, results)
        self.results = results

    def __str__(self) -> str:
        return str(self.args[0])


# -- causes ---------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's ``reason``, exceptions in args."""
    seen: set[int] = set()
    found: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(found) < 32:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        reason = getattr(current, "reason", None)
        wrapped = [current.__cause__, current.__context__, reason, *current.args]
        todo.extend(e for e in wrapped if isinstance(e, BaseException))
    return found


_STATUS_HINTS = {
    401: "credentials refused",
    403: "credentials refused or not allowed",
    404: "not found: check the URL",
    407: "proxy authentication required",
}

# Drivers that put the cause in their message only (libpq, SQLite): matched, never shown.
_MESSAGE_CAUSES = (
    ("connection refused", "connection refused"),
    ("could not translate host name", "DNS lookup failed (unknown host)"),
    ("name or service not known", "DNS lookup failed (unknown host)"),
    ("temporary failure in name resolution", "DNS lookup failed"),
    ("timeout expired", "timed out after {timeout_s:g} s"),
    ("password authentication failed", "credentials refused"),
    ("no password supplied", "credentials refused (no password)"),
    ("does not exist", "database or role does not exist"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network unreachable"),
    ("unable to open database file", "cannot open the database file"),
    ("certificate verify failed", "TLS certificate not trusted"),
)


def _status(chain: list[BaseException]) -> int | None:
    for exc in chain:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def describe_failure(exc: BaseException, timeout_s: float) -> str:
    """The cause of a failed check in words, from the types in ``exc``'s chain (and, for
    database drivers, keywords of their messages): an HTTP status, TLS, DNS, connection
    refused, a timeout, an OS error; else the project error's own message (no patient data by
    the project's rules), else the exception's type."""
    chain = _chain(exc)
    status = _status(chain)
    if status is not None:
        hint = _STATUS_HINTS.get(status)
        return f"HTTP {status}" + (f" ({hint})" if hint else "")
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({e.verify_message or 'verify failed'})"
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed ({getattr(e, 'reason', None) or type(e).__name__})"
        if "SSL" in type(e).__name__:
            return "TLS handshake failed"
    for e in chain:
        if isinstance(e, socket.gaierror) or "NameResolution" in type(e).__name__:
            return "DNS lookup failed (unknown host)"
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
    for e in chain:
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return f"timed out after {timeout_s:g} s"
    for e in chain:
        if isinstance(e, OSError) and e.errno is not None and e.strerror:
            return e.strerror.lower()  # "network is unreachable", "no such file or directory"
    for e in chain:
        if isinstance(e, MedvlmError):
            continue  # the project's own messages are shown below, as they are
        lowered = str(e).lower()
        for keyword, cause in _MESSAGE_CAUSES:
            if keyword in lowered:
                return cause.format(timeout_s=timeout_s)
    if isinstance(exc, MedvlmError):
        text = " ".join(str(exc).split())
        for prefix in ("pacs: ", "ehr: "):
            text = text.removeprefix(prefix)
        return with_variable_names(text)
    return type(chain[-1]).__name__


# -- the checks -----------------------------------------------------------------------------------


def _quick(edge: E, timeout_s: float) -> E:
    """``edge`` with one attempt and timeouts of at most ``timeout_s``."""
    return edge.model_copy(
        update={
            "connect_timeout_s": min(edge.connect_timeout_s, timeout_s),
            "read_timeout_s": timeout_s,
            "write_timeout_s": timeout_s,
            "pool_timeout_s": timeout_s,
            "retry_attempts": 1,
        }
    )


def _readable(variable: str, path: Path) -> str | None:
    """Why ``path`` (named by ``variable``) cannot be read, or None."""
    try:
        with path.open("rb"):
            return None
    except OSError as exc:
        cause = (exc.strerror or type(exc).__name__).lower()
        return f"{variable} {path}: {cause}"


def _timed(
    service: str, kind: str, where: str, timeout_s: float, check: Callable[[], None]
) -> CheckResult:
    started = time.monotonic()
    try:
        check()
    except Exception as exc:  # every failure is a result, named by its cause
        seconds = time.monotonic() - started
        return CheckResult(service, kind, where, False, describe_failure(exc, timeout_s), seconds)
    seconds = time.monotonic() - started
    return CheckResult(service, kind, where, True, f"answered in {seconds:.2f} s", seconds)


def _failed(service: str, kind: str, where: str, detail: str) -> CheckResult:
    return CheckResult(service, kind, where, False, detail, 0.0)


def pacs_where(settings: PacsSettings) -> str:
    """Where the image source is: folder, DICOMweb URL (redacted) or ``AET@host:port``."""
    if settings.kind == "dimse":
        return f"{settings.called_aet}@{settings.dimse_host}:{settings.dimse_port}"
    if settings.kind == "dicomweb":
        return redact_url(settings.dicomweb_url or "")
    return str(settings.folder)


def ehr_where(settings: EhrSettings) -> str:
    """Where the EHR is: FHIR base URL (redacted) or folder."""
    return redact_url(settings.base_url or "") if settings.kind == "fhir" else str(settings.folder)


def check_pacs(settings: PacsSettings, timeout_s: float) -> CheckResult:
    """The image source answers: DICOMweb QIDO-RS, DIMSE C-ECHO, or the folder is readable."""
    pacs = _quick(settings, timeout_s)
    if pacs.kind == "folder":
        from connectors.dicom_folder import DicomFolderSource

        folder = pacs.folder or Path()
        return _timed("PACS", "folder", pacs_where(pacs), timeout_s, DicomFolderSource(folder).ping)
    if pacs.kind == "dimse":
        from connectors.dimse import DimseSource

        quick = {"dimse_timeout_s": min(pacs.dimse_timeout_s, timeout_s), "dimse_retrieve": "get"}
        source = DimseSource.from_settings(pacs.model_copy(update=quick))
        return _timed("PACS", "dimse", pacs_where(pacs), timeout_s, source.ping)
    from connectors.dicomweb import DicomWebSource

    where = pacs_where(pacs)
    if pacs.auth == "bearer" and pacs.token is None and pacs.token_file is not None:
        unreadable = _readable("MEDVLM_PACS__TOKEN_FILE", pacs.token_file)
        if unreadable:
            return _failed("PACS", "dicomweb", where, unreadable)

    def ping() -> None:
        source = DicomWebSource.from_settings(pacs)
        try:
            source.ping()
        finally:
            source.close()

    return _timed("PACS", "dicomweb", where, timeout_s, ping)


def check_ehr(settings: EhrSettings, timeout_s: float) -> CheckResult:
    """The EHR answers: FHIR ``GET [base]/metadata`` with auth, or the folder is readable."""
    ehr = _quick(settings, timeout_s)
    if ehr.kind == "folder":
        from connectors.ndjson import NdjsonEhr

        folder = ehr.folder or Path()
        return _timed("EHR", "folder", ehr_where(ehr), timeout_s, NdjsonEhr(folder).ping)
    from connectors.fhir import FhirEhr, build_http_client

    where = ehr_where(ehr)
    files = {
        "MEDVLM_EHR__TOKEN_FILE": ehr.token_file
        if ehr.auth == "bearer" and ehr.token is None
        else None,
        "MEDVLM_EHR__SMART_PRIVATE_KEY_FILE": ehr.smart_private_key_file
        if ehr.auth == "smart"
        else None,
    }
    for variable, path in files.items():
        unreadable = _readable(variable, path) if path is not None else None
        if unreadable:
            return _failed("EHR", "fhir", where, unreadable)

    def ping() -> None:
        with build_http_client(ehr) as client:
            FhirEhr(client, ehr).ping()

    return _timed("EHR", "fhir", where, timeout_s, ping)


def ledger_kind(ledger_url: str) -> str:
    """The ledger database's dialect (``sqlite``, ``postgresql``), ``unknown`` for no URL."""
    from sqlalchemy.engine import make_url

    try:
        return str(make_url(ledger_url).get_backend_name())
    except Exception:  # SQLAlchemy's ArgumentError: not a database URL at all
        return "unknown"


def ledger_where(ledger_url: str) -> str:
    """The ledger's URL without credentials, or the variable's name when it is no URL."""
    return (
        redact_url(ledger_url) if ledger_kind(ledger_url) != "unknown" else "MEDVLM_JOB__LEDGER_URL"
    )


def check_ledger(ledger_url: str, timeout_s: float) -> CheckResult:
    """The job ledger's database answers ``SELECT 1``."""
    from connectors.ledger_store import LedgerStore, ledger_engine

    kind, where = ledger_kind(ledger_url), ledger_where(ledger_url)
    if kind == "unknown":
        return _failed(
            "ledger", kind, where, "not a database URL (e.g. postgresql+psycopg://host/db)"
        )

    def ping() -> None:
        engine = ledger_engine(ledger_url)
        try:
            LedgerStore(engine).ping(timeout_s)
        finally:
            engine.dispose()

    return _timed("ledger", kind, where, timeout_s, ping)


def run_checks(settings: MedvlmSettings) -> list[CheckResult]:
    """PACS, EHR and ledger checked at once, each in a daemon thread: a check that has not
    ended by the deadline (twice the timeout and a second) is reported as timed out and left
    behind, never waited for."""
    timeout = settings.job.preflight_timeout_s
    assert settings.job.ledger_url is not None  # MedvlmSettings resolves it
    ledger_url = settings.job.ledger_url
    checks: list[tuple[tuple[str, str, str], Callable[[], CheckResult]]] = [
        (
            ("PACS", settings.pacs.kind, pacs_where(settings.pacs)),
            lambda: check_pacs(settings.pacs, timeout),
        ),
        (
            ("EHR", settings.ehr.kind, ehr_where(settings.ehr)),
            lambda: check_ehr(settings.ehr, timeout),
        ),
        (
            ("ledger", ledger_kind(ledger_url), ledger_where(ledger_url)),
            lambda: check_ledger(ledger_url, timeout),
        ),
    ]
    results: list[CheckResult | None] = [None] * len(checks)

    def work(index: int, check: Callable[[], CheckResult]) -> None:
        try:
            results[index] = check()
        except Exception as exc:  # a connector that could not even be built
            results[index] = _failed(*checks[index][0], describe_failure(exc, timeout))

    threads = [
        threading.Thread(target=work, args=(i, check), name=f"preflight-{name[0]}", daemon=True)
        for i, (name, check) in enumerate(checks)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 2 * timeout + 1.0
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        result
        if result is not None
        else _failed(*name, f"no answer within {2 * timeout + 1.0:g} s (timed out)")
        for result, (name, _) in zip(results, checks, strict=True)
    ]


def require_services(settings: MedvlmSettings) -> list[CheckResult]:
    """``run_checks``, raising ``PreflightError`` (a ``ConfigurationError``: the run stops, no
    study is blamed) when a service did not answer; the results when all did."""
    results = run_checks(settings)
    failed = [result.line() for result in results if not result.ok]
    if failed:
        raise PreflightError("pre-flight: " + "; ".join(failed), tuple(results))
    return results
