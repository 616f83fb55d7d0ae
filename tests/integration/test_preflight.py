"""The pre-flight against the session's real servers, run as an operator runs it: `medvlm check`
and `medvlm run` in their own processes, settings from the environment.

All services answering: `medvlm check` shows each OK (DICOMweb with Orthanc's basic auth, or
DIMSE C-ECHO; FHIR metadata; the SQLite ledger). A wrong FHIR port, a wrong PACS URL or a
wrong Orthanc password: `medvlm run` ends within seconds with exit code 2 and one line naming
the service, where it is and why, and nothing else happens: no Ray, no model, no flow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from medvlm.dev.servers import DevServers, OrthancInfo
from tests.conftest import free_port, processes_of_run

pytestmark = pytest.mark.integration

MEDVLM = str(Path(sys.executable).parent / "medvlm")
WRONG_PASSWORD = "not-the-orthanc-password"


def _site_env(tmp_path: Path, orthanc: OrthancInfo, fhir_base_url: str) -> dict[str, str]:
    """A site on the session's Orthanc (DICOMweb, basic auth) and FHIR server, its own ledger."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MEDVLM_")}
    return env | {
        "MEDVLM_HOME": str(tmp_path / "home"),
        "MEDVLM_PACS__KIND": "dicomweb",
        "MEDVLM_PACS__DICOMWEB_URL": orthanc.dicomweb_url,
        "MEDVLM_PACS__AUTH": "basic",
        "MEDVLM_PACS__USERNAME": orthanc.username,
        "MEDVLM_PACS__PASSWORD": orthanc.password.get_secret_value(),
        "MEDVLM_EHR__KIND": "fhir",
        "MEDVLM_EHR__BASE_URL": fhir_base_url,
        "MEDVLM_JOB__LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "COLUMNS": "200",
    }


def _rows(output: str) -> dict[str, str]:
    """The table of `medvlm check`: service → its row."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if len(cells) == 5 and cells[0] in ("PACS", "EHR", "ledger"):
            rows[cells[0]] = " | ".join(cells)
    return rows


@pytest.mark.parametrize("pacs", ["dicomweb", "dimse"])
def test_medvlm_check_finds_every_dev_server_answering(
    tmp_path: Path,
    orthanc: OrthancInfo,
    fhir_base_url: str,
    dev_servers: DevServers,
    pacs: str,
) -> None:
    env = _site_env(tmp_path, orthanc, fhir_base_url)
    if pacs == "dimse":
        env |= {
            "MEDVLM_PACS__KIND": "dimse",
            "MEDVLM_PACS__DIMSE_HOST": orthanc.dicom_host,
            "MEDVLM_PACS__DIMSE_PORT": str(orthanc.dicom_port),
            "MEDVLM_PACS__CALLED_AET": orthanc.aet,
            "MEDVLM_PACS__CALLING_AET": dev_servers.settings.scp_aet,
        }
    done = subprocess.run([MEDVLM, "check"], env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = _rows(done.stdout)
    assert set(rows) == {"PACS", "EHR", "ledger"}, output
    assert all(" | OK | answered in " in row for row in rows.values()), output
    where = (
        f"{orthanc.aet}@{orthanc.dicom_host}:{orthanc.dicom_port}"
        if pacs == "dimse"
        else orthanc.dicomweb_url
    )
    assert rows["PACS"].startswith(f"PACS | {pacs} | {where} |"), output
    assert rows["EHR"].startswith(f"EHR | fhir | {fhir_base_url} |"), output
    assert orthanc.password.get_secret_value() not in output


Case = Callable[[OrthancInfo, str], tuple[dict[str, str], str]]


def _medvlm_run(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """`medvlm run ARGS` in its own process: seconds taken, and how it ended."""
    started = time.monotonic()
    done = subprocess.run(
        [MEDVLM, "run", *args], env=env, capture_output=True, text=True, timeout=300
    )
    return time.monotonic() - started, done


def _wrong_fhir_port(orthanc: OrthancInfo, fhir_base_url: str) -> tuple[dict[str, str], str]:
    url = f"http://127.0.0.1:{free_port()}/fhir"
    return {"MEDVLM_EHR__BASE_URL": url}, f"pre-flight: EHR (fhir) {url}: connection refused"


def _wrong_pacs_port(orthanc: OrthancInfo, fhir_base_url: str) -> tuple[dict[str, str], str]:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    return (
        {"MEDVLM_PACS__DICOMWEB_URL": url},
        f"pre-flight: PACS (dicomweb) {url}: connection refused",
    )


def _wrong_pacs_path(orthanc: OrthancInfo, fhir_base_url: str) -> tuple[dict[str, str], str]:
    url = orthanc.http_url.rstrip("/") + "/no-dicom-web-here"
    return (
        {"MEDVLM_PACS__DICOMWEB_URL": url},
        f"pre-flight: PACS (dicomweb) {url}: HTTP 404 (not found: check the URL)",
    )


def _wrong_password(orthanc: OrthancInfo, fhir_base_url: str) -> tuple[dict[str, str], str]:
    return (
        {"MEDVLM_PACS__PASSWORD": WRONG_PASSWORD},
        f"pre-flight: PACS (dicomweb) {orthanc.dicomweb_url}: HTTP 401 (credentials refused)",
    )


@pytest.mark.parametrize(
    "case",
    [_wrong_fhir_port, _wrong_pacs_port, _wrong_pacs_path, _wrong_password],
    ids=["wrong-fhir-port", "wrong-pacs-port", "wrong-pacs-url", "bad-orthanc-password"],
)
def test_medvlm_run_stops_within_seconds_naming_the_service_and_starts_nothing(
    tmp_path: Path,
    orthanc: OrthancInfo,
    fhir_base_url: str,
    tiny_model_dir: Path,
    case: Case,
) -> None:
    changes, line = case(orthanc, fhir_base_url)
    run_id = uuid.uuid4().hex
    env = _site_env(tmp_path, orthanc, fhir_base_url) | changes
    env |= {
        # A model this run would start (Ray Serve + vLLM) if the pre-flight let it go on.
        "MEDVLM_MODEL__SOURCE": str(tiny_model_dir),
        "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",
        "MEDVLM_SERVING__PORT": str(free_port()),
        "MEDVLM_TEST_RUN_ID": run_id,
    }
    # A service that hung would show as "timed out" / "no answer within 7 s", not as `line`.
    env["MEDVLM_JOB__PREFLIGHT_TIMEOUT_S"] = "3"
    startup_s, _ = _medvlm_run(env, "--since", "2026-13-01")  # stops before the pre-flight
    elapsed, done = _medvlm_run(env, "--since", "2026-11-01", "--until", "2026-11-03")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    assert [text for text in output.splitlines() if text.strip()] == [line]
    # Within seconds of the process start, which a loaded 2-core machine makes slow itself
    # (~1.5 s idle, 20 s once beside other suites): the checks answer at once (refused, 401,
    # 404), and all of them together.
    assert elapsed - startup_s < 8, f"{elapsed:.1f} s, {startup_s:.1f} s of it start-up"
    assert processes_of_run(run_id) == []  # no Ray, no Serve replica, no engine
    assert "Ray" not in output and "flow" not in output
    assert WRONG_PASSWORD not in output
    assert orthanc.password.get_secret_value() not in output
    assert not (tmp_path / "home" / "models").exists()
