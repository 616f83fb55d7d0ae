"""The pre-flight without servers: causes in words, URLs without credentials, folder sources,
the FHIR ping on a mock transport, closed loopback ports, the deadline, and the CLI's exits.

tests/integration/test_preflight.py runs it against the real Orthanc and FHIR server.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from typer.testing import CliRunner

from connectors.fhir import FhirEhr
from connectors.ledger_store import LedgerStore, ledger_engine
from flows import preflight
from flows.preflight import (
    CheckResult,
    PreflightError,
    check_ehr,
    check_ledger,
    check_pacs,
    describe_failure,
    redact_url,
    require_services,
    run_checks,
)
from medvlm.cli import app
from medvlm.errors import (
    EhrInvalidResourceError,
    EhrUnauthorizedError,
    LedgerUnavailableError,
    PacsUnavailableError,
)
from medvlm.settings import EhrSettings, MedvlmSettings, PacsSettings

pytestmark = pytest.mark.unit


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home with a PACS folder and an EHR folder, and no other MEDVLM_ variable."""
    for name in list(os.environ):
        if name.upper().startswith("MEDVLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    (tmp_path / "dicom").mkdir()
    (tmp_path / "ehr").mkdir()
    return tmp_path


# -- URLs and causes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:s3cret@pacs.example.org:8443/dicom-web",
            "https://pacs.example.org:8443/dicom-web",
        ),
        (
            "https://ehr.example.org/fhir/R4?access_token=s3cret#x",
            "https://ehr.example.org/fhir/R4",
        ),
        (
            "postgresql+psycopg://medvlm:s3cret@db:5432/ledger",
            "postgresql+psycopg://db:5432/ledger",
        ),
        ("sqlite:////var/lib/medvlm/ledger.db", "sqlite:////var/lib/medvlm/ledger.db"),
        ("http://[::1]:8042/dicom-web", "http://[::1]:8042/dicom-web"),
        ("http://host:notaport/x", "(unparsable URL)"),
    ],
)
def test_urls_are_shown_without_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def _requests_error(exc: BaseException) -> requests.ConnectionError:
    try:
        raise requests.ConnectionError("wrapped") from exc
    except requests.ConnectionError as error:
        return error


def test_causes_are_named_from_the_exception_chain() -> None:
    refused = _requests_error(ConnectionRefusedError(111, "Connection refused"))
    assert describe_failure(refused, 5) == "connection refused"
    dns = _requests_error(socket.gaierror(-2, "Name or service not known"))
    assert describe_failure(dns, 5) == "DNS lookup failed (unknown host)"
    tls = _requests_error(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"))
    assert describe_failure(tls, 5).startswith("TLS handshake failed")
    assert describe_failure(requests.ReadTimeout("read timed out"), 2.5) == "timed out after 2.5 s"
    assert describe_failure(httpx.ConnectTimeout("slow"), 5) == "timed out after 5 s"
    unreachable = _requests_error(OSError(101, "Network is unreachable"))
    assert describe_failure(unreachable, 5) == "network is unreachable"


@pytest.mark.parametrize(
    ("status", "cause"),
    [
        (401, "HTTP 401 (credentials refused)"),
        (403, "HTTP 403 (credentials refused or not allowed)"),
        (404, "HTTP 404 (not found: check the URL)"),
        (503, "HTTP 503"),
    ],
)
def test_an_http_status_is_named_with_what_it_means(status: int, cause: str) -> None:
    response = requests.Response()
    response.status_code = status
    try:
        raise PacsUnavailableError("pacs: QIDO-RS") from requests.HTTPError(response=response)
    except PacsUnavailableError as exc:
        assert describe_failure(exc, 5) == cause


def test_a_database_driver_cause_is_matched_in_its_message_never_shown() -> None:
    class OperationalError(Exception):
        pass

    driver = OperationalError(
        'connection to server at "db" (10.0.0.5), port 5432 failed: FATAL:  password '
        'authentication failed for user "medvlm"'
    )
    try:
        raise LedgerUnavailableError("job ledger (postgresql): OperationalError") from driver
    except LedgerUnavailableError as exc:
        assert describe_failure(exc, 5) == "credentials refused"


def test_a_project_error_without_a_library_cause_shows_its_own_message() -> None:
    error = EhrInvalidResourceError("CapabilityStatement (pre-flight): not a CapabilityStatement")
    assert (
        describe_failure(error, 5) == "CapabilityStatement (pre-flight): not a CapabilityStatement"
    )


# -- the checks, without servers ------------------------------------------------------------------


def test_folder_sources_answer_when_their_folders_can_be_read(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "ehr").mkdir()
    pacs = check_pacs(PacsSettings(folder=tmp_path / "dicom"), 5)
    ehr = check_ehr(EhrSettings(folder=tmp_path / "ehr"), 5)
    assert (pacs.ok, pacs.service, pacs.kind, pacs.where) == (
        True,
        "PACS",
        "folder",
        str(tmp_path / "dicom"),
    )
    assert ehr.ok and ehr.line().startswith(f"EHR (folder) {tmp_path / 'ehr'}: answered in ")


def test_a_missing_folder_fails_with_its_cause(tmp_path: Path) -> None:
    pacs = check_pacs(PacsSettings(folder=tmp_path / "nope"), 5)
    assert pacs.line() == f"PACS (folder) {tmp_path / 'nope'}: no such file or directory"
    ehr = check_ehr(EhrSettings(folder=tmp_path / "nope"), 5)
    assert ehr.line() == f"EHR (folder) {tmp_path / 'nope'}: no such file or directory"


def test_closed_ports_fail_at_once_as_connection_refused() -> None:
    port = _closed_port()
    started = time.monotonic()
    pacs = check_pacs(
        PacsSettings(
            kind="dicomweb",
            dicomweb_url=f"http://medvlm:s3cret@127.0.0.1:{port}/dicom-web",
            auth="basic",
            username="medvlm",
            password="s3cret",  # type: ignore[arg-type]
        ),
        5,
    )
    dimse = check_pacs(PacsSettings(kind="dimse", dimse_host="127.0.0.1", dimse_port=port), 5)
    ehr = check_ehr(EhrSettings(kind="fhir", base_url=f"http://127.0.0.1:{port}/fhir"), 5)
    ledger = check_ledger(f"postgresql+psycopg://medvlm:s3cret@127.0.0.1:{port}/ledger", 5)
    assert time.monotonic() - started < 5
    assert [result.line() for result in (pacs, dimse, ehr, ledger)] == [
        f"PACS (dicomweb) http://127.0.0.1:{port}/dicom-web: connection refused",
        f"PACS (dimse) ANY-SCP@127.0.0.1:{port}: connection refused",
        f"EHR (fhir) http://127.0.0.1:{port}/fhir: connection refused",
        f"ledger (postgresql) postgresql+psycopg://127.0.0.1:{port}/ledger: connection refused",
    ]


def test_a_key_or_token_file_that_cannot_be_read_names_its_variable(tmp_path: Path) -> None:
    ehr = EhrSettings(
        kind="fhir",
        base_url="https://ehr.example.org/fhir",
        auth="smart",
        smart_client_id="medvlm",
        smart_key_id="k1",
        smart_private_key_file=tmp_path / "missing.pem",
    )
    assert check_ehr(ehr, 5).line() == (
        "EHR (fhir) https://ehr.example.org/fhir: MEDVLM_EHR__SMART_PRIVATE_KEY_FILE "
        f"{tmp_path / 'missing.pem'}: no such file or directory"
    )
    pacs = PacsSettings(
        kind="dicomweb",
        dicomweb_url="https://pacs.example.org/dicom-web",
        auth="bearer",
        token_file=tmp_path / "missing.token",
    )
    assert check_pacs(pacs, 5).detail == (
        f"MEDVLM_PACS__TOKEN_FILE {tmp_path / 'missing.token'}: no such file or directory"
    )


def test_the_ledger_answers_select_1_and_a_non_url_is_named(tmp_path: Path) -> None:
    result = check_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", 5)
    assert (result.ok, result.kind) == (True, "sqlite")
    assert check_ledger("not a url", 5).line() == (
        "ledger (unknown) MEDVLM_JOB__LEDGER_URL: not a database URL "
        "(e.g. postgresql+psycopg://host/db)"
    )
    engine = ledger_engine(f"sqlite:///{tmp_path / 'gone' / 'ledger.db'}")
    (tmp_path / "gone").rmdir()  # the folder ledger_engine made is gone again
    with pytest.raises(LedgerUnavailableError):
        LedgerStore(engine).ping(1)
    engine.dispose()


def _fhir(answer: httpx.Response) -> tuple[FhirEhr, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    settings = EhrSettings(kind="fhir", base_url="https://ehr.example.org/fhir")
    return FhirEhr(httpx.Client(transport=httpx.MockTransport(server)), settings), seen


def test_the_fhir_ping_reads_the_capability_statement_once() -> None:
    ehr, seen = _fhir(httpx.Response(200, json={"resourceType": "CapabilityStatement"}))
    ehr.ping()
    assert [str(request.url) for request in seen] == ["https://ehr.example.org/fhir/metadata"]


def test_the_fhir_ping_fails_on_refused_credentials_without_retrying() -> None:
    ehr, seen = _fhir(httpx.Response(401))
    with pytest.raises(EhrUnauthorizedError) as raised:
        ehr.ping()
    assert describe_failure(raised.value, 5) == "HTTP 401 (credentials refused)"
    assert len(seen) == 1


def test_the_fhir_ping_fails_on_a_server_that_is_not_fhir() -> None:
    ehr, _ = _fhir(httpx.Response(200, text="<html>Orthanc Explorer</html>"))
    with pytest.raises(EhrInvalidResourceError, match="not a CapabilityStatement"):
        ehr.ping()


# -- all at once ----------------------------------------------------------------------------------


def test_all_services_are_checked_at_once(site: Path) -> None:
    results = run_checks(MedvlmSettings())
    assert [(r.service, r.kind, r.ok) for r in results] == [
        ("PACS", "folder", True),
        ("EHR", "folder", True),
        ("ledger", "sqlite", True),
    ]
    assert all(result.ok for result in require_services(MedvlmSettings()))


def test_a_check_that_hangs_is_reported_at_the_deadline_and_left_behind(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hangs(*_: Any) -> CheckResult:
        time.sleep(30)
        raise AssertionError("not reached")

    monkeypatch.setattr(preflight, "check_ehr", hangs)
    monkeypatch.setenv("MEDVLM_JOB__PREFLIGHT_TIMEOUT_S", "0.2")
    started = time.monotonic()
    with pytest.raises(PreflightError) as raised:
        require_services(MedvlmSettings())
    assert time.monotonic() - started < 5
    assert str(raised.value) == (
        f"pre-flight: EHR (folder) {site / 'ehr'}: no answer within 1.4 s (timed out)"
    )
    assert [r.ok for r in raised.value.results] == [True, False, True]


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``medvlm run`` up to the flow: the calls of ``_run_flow`` are recorded, nothing runs."""
    from medvlm import cli

    calls: list[str] = []

    def fake_run_flow(*_: Any, **__: Any) -> Any:
        calls.append("run")
        raise cli.typer.Exit(0)

    monkeypatch.setattr(cli, "_run_flow", fake_run_flow)
    return calls


def test_medvlm_run_stops_before_discovery_with_one_line_per_service(
    site: Path, monkeypatch: pytest.MonkeyPatch, no_run: list[str]
) -> None:
    port = _closed_port()
    monkeypatch.setenv("MEDVLM_MODEL__SOURCE", "hub-org/some-model")  # a hub id: not resolved
    monkeypatch.setenv("MEDVLM_EHR__KIND", "fhir")
    monkeypatch.setenv("MEDVLM_EHR__BASE_URL", f"http://127.0.0.1:{port}/fhir")
    monkeypatch.setenv("MEDVLM_PACS__FOLDER", str(site / "no-such-folder"))
    monkeypatch.setenv("COLUMNS", "40")
    result = CliRunner().invoke(app, ["run", "--since", "2026-11-01"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"pre-flight: PACS (folder) {site / 'no-such-folder'}: no such file or directory",
        f"pre-flight: EHR (fhir) http://127.0.0.1:{port}/fhir: connection refused",
    ]
    assert no_run == []


def test_the_pre_flight_can_be_turned_off(
    site: Path, monkeypatch: pytest.MonkeyPatch, no_run: list[str]
) -> None:
    monkeypatch.setenv("MEDVLM_MODEL__SOURCE", "hub-org/some-model")
    monkeypatch.setenv("MEDVLM_PACS__FOLDER", str(site / "no-such-folder"))
    monkeypatch.setenv("MEDVLM_JOB__PREFLIGHT", "false")
    result = CliRunner().invoke(app, ["run", "--since", "2026-11-01"])
    assert result.exit_code == 0, result.output
    assert no_run == ["run"]


def test_a_model_configuration_error_comes_before_the_pre_flight(
    site: Path, monkeypatch: pytest.MonkeyPatch, no_run: list[str]
) -> None:
    monkeypatch.setenv("MEDVLM_PACS__FOLDER", str(site / "no-such-folder"))
    result = CliRunner().invoke(app, ["run", "--since", "2026-11-01"])
    assert result.exit_code == 1
    assert result.output.startswith("error: MEDVLM_MODEL__SOURCE is not set")
    assert "pre-flight" not in result.output


def test_medvlm_check_prints_a_table_and_exits_2_when_a_service_fails(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    assert result.output.count(" OK ") == 3
    monkeypatch.setenv(
        "MEDVLM_JOB__LEDGER_URL", f"postgresql+psycopg://u:s3cret@127.0.0.1:{_closed_port()}/x"
    )
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 2
    assert result.output.count(" OK ") == 2
    assert "FAILED" in result.output and "connection refused" in result.output
    assert "s3cret" not in result.output
