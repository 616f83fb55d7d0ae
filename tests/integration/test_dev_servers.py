"""The dev servers are real, reachable, protected and loopback-only, and start/stop as promised."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medvlm.dev.servers import DevServers, OrthancInfo, listening_sockets
from medvlm.settings import DevServerSettings

pytestmark = pytest.mark.integration

SYNTHETIC_ID_SYSTEM = "urn:oid:2.25.1234567890.1"  # a made-up MRN system for test patients
SettingsFactory = Callable[[Path], DevServerSettings]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


@pytest.fixture
def dicomweb(orthanc: OrthancInfo) -> DICOMwebClient:
    session = create_session_from_user_pass(*orthanc.auth)
    session.trust_env = False  # loopback only: no proxy from the environment
    return DICOMwebClient(url=orthanc.dicomweb_url, session=session)


def _synthetic_cr_study(n_instances: int = 2) -> list[Dataset]:
    """A de-identified CR study built in memory (synthetic ids, gradient pixels)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for number in range(1, n_instances + 1):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\0" * 128  # without it Orthanc later fails to parse the file (servers.md)
        ds.SOPClassUID = ComputedRadiographyImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientID = "TEST-0001"
        ds.PatientName = "TEST^SYNTHETIC"
        ds.AccessionNumber = "TESTACC0001"
        ds.StudyDate = "20240101"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.Modality = "CR"
        ds.BodyPartExamined = "CHEST"
        rows, cols = 64, 48
        ramp = np.arange(rows * cols, dtype=np.uint16) * (7 + number)
        pixels = (ramp % 4096).reshape(rows, cols)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def test_study_stored_by_stow_is_found_by_qido_and_retrieved_identical_by_wado(
    dicomweb: DICOMwebClient,
) -> None:
    sent = _synthetic_cr_study()
    study_uid = sent[0].StudyInstanceUID

    response = dicomweb.store_instances(sent)
    assert not response.get("FailedSOPSequence")
    assert len(response.ReferencedSOPSequence) == len(sent)

    found = dicomweb.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert [s["0020000D"]["Value"][0] for s in found] == [study_uid]

    received = {ds.SOPInstanceUID: ds for ds in dicomweb.retrieve_study(study_uid)}
    assert set(received) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        got = received[ds.SOPInstanceUID]
        assert got.StudyInstanceUID == study_uid
        assert got.SeriesInstanceUID == ds.SeriesInstanceUID
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.PixelData == ds.PixelData
        np.testing.assert_array_equal(got.pixel_array, ds.pixel_array)


@pytest.mark.parametrize("path", ["/system", "/dicom-web/studies", "/studies"])
def test_orthanc_rejects_requests_without_valid_credentials(
    orthanc: OrthancInfo, http: httpx.Client, path: str
) -> None:
    assert http.get(orthanc.http_url + path).status_code == 401
    wrong = (orthanc.username, "not-the-password")
    assert http.get(orthanc.http_url + path, auth=wrong).status_code == 401
    assert http.get(orthanc.http_url + path, auth=orthanc.auth).status_code == 200


def test_orthanc_password_is_generated_and_kept_private(dev_servers: DevServers) -> None:
    creds = dev_servers.workdir / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    password = dev_servers.orthanc.password.get_secret_value()
    assert len(password) >= 24
    assert password not in repr(dev_servers.orthanc)


def _listening(pid: int) -> set[tuple[str, int]]:
    """Listening TCP sockets of ``pid`` as `ss -ltnp` shows them (/proc without iproute2)."""
    if shutil.which("ss") is None:
        return set(listening_sockets(pid))
    text = subprocess.run(["ss", "-ltnpH"], check=True, capture_output=True, text=True).stdout
    found = set()
    for line in text.splitlines():
        if f"pid={pid}," not in line:
            continue
        host, port = line.split()[3].rsplit(":", 1)
        found.add((host.strip("[]").split("%")[0], int(port)))
    return found


def _only_loopback_in_namespace() -> bool:
    """Inside `unshare -n` with only lo, a wildcard listener is reachable from loopback only."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines} == {"lo"}


def _reachable_beyond_loopback(host: str) -> bool:
    if host == "*" or ipaddress.ip_address(host).is_unspecified:
        return not _only_loopback_in_namespace()
    return not ipaddress.ip_address(host).is_loopback


def test_orthanc_and_fhir_server_listen_only_on_loopback(dev_servers: DevServers) -> None:
    pids = {s.name: s.pid for s in dev_servers.status()}
    s = dev_servers.settings
    expected_ports = {
        "orthanc": {s.orthanc_http_port, s.orthanc_dicom_port},
        "fhir": {s.fhir_port},
    }
    for name, pid in pids.items():
        assert pid is not None, f"{name} is not running"
        sockets = _listening(pid)
        assert {port for _, port in sockets} == expected_ports[name], (name, sockets)
        exposed = {(h, p) for h, p in sockets if _reachable_beyond_loopback(h)}
        assert not exposed, f"{name} listens beyond loopback: {exposed}"


def test_conditional_create_of_a_patient_twice_creates_it_once(
    fhir_base_url: str, http: httpx.Client
) -> None:
    value = f"TEST-{secrets.token_hex(4)}"
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": SYNTHETIC_ID_SYSTEM, "value": value}],
        "gender": "unknown",
    }
    headers = {
        "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json",
        "If-None-Exist": f"identifier={SYNTHETIC_ID_SYSTEM}|{value}",
    }
    first = http.post(f"{fhir_base_url}/Patient", json=patient, headers=headers)
    second = http.post(f"{fhir_base_url}/Patient", json=patient, headers=headers)

    assert first.status_code == 201, first.text
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    bundle = http.get(
        f"{fhir_base_url}/Patient",
        params={"identifier": f"{SYNTHETIC_ID_SYSTEM}|{value}"},
        headers={"Accept": "application/fhir+json"},
    ).json()
    assert bundle["total"] == 1
    assert [e["resource"]["id"] for e in bundle["entry"]] == [first.json()["id"]]


def _gone(pid: int) -> bool:
    proc = Path(f"/proc/{pid}/stat")
    if not proc.exists():
        return True
    return proc.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_up_twice_reuses_running_servers_and_down_stops_them(
    tmp_path: Path, dev_settings_factory: SettingsFactory
) -> None:
    with DevServers(dev_settings_factory(tmp_path)) as servers:
        try:
            first = {s.name: s for s in servers.up()}
            second = {s.name: s for s in servers.up()}
        finally:
            stopped = servers.down()

        assert all(s.started and s.healthy for s in first.values())
        assert {n: s.pid for n, s in second.items()} == {n: s.pid for n, s in first.items()}
        assert not any(s.started for s in second.values())
        assert sorted(stopped) == ["fhir", "orthanc"]
        for s in first.values():
            assert s.pid is not None and _gone(s.pid), f"{s.name} pid {s.pid} still running"
        assert not list(tmp_path.glob("*.pid"))
        assert all(s.pid is None and not s.healthy for s in servers.status())


def test_down_never_signals_a_pid_that_is_not_the_server(
    tmp_path: Path, dev_settings_factory: SettingsFactory
) -> None:
    tmp_path.joinpath("orthanc.pid").write_text(f"{os.getpid()}\n")  # a live, unrelated process
    tmp_path.joinpath("fhir.pid").write_text("not a pid\n")
    with DevServers(dev_settings_factory(tmp_path)) as servers:
        assert servers.down() == []
    assert not tmp_path.joinpath("orthanc.pid").exists()
    assert not tmp_path.joinpath("fhir.pid").exists()


def test_down_stops_servers_started_with_the_program_path_spelt_differently(
    tmp_path: Path, dev_settings_factory: SettingsFactory
) -> None:
    """`medvlm dev down` under other settings (a symlinked FHIR venv) must still stop the
    servers of its workdir, never orphan them by dropping their PID files."""
    settings = dev_settings_factory(tmp_path / "work")
    assert settings.fhir_venv is not None
    link = tmp_path / "venv-link"
    link.symlink_to(settings.fhir_venv)
    # The starting instance stays open until the end: it is the servers' parent and reaps them.
    with DevServers(settings) as starter:
        started = {s.name: s.pid for s in starter.up()}
        other = settings.model_copy(update={"fhir_venv": link})
        try:
            with DevServers(other) as servers:
                stopped = servers.down()
        finally:
            starter.down()  # a no-op when the other stopped them; else leave nothing behind
        assert sorted(stopped) == ["fhir", "orthanc"]
        assert all(pid is not None and _gone(pid) for pid in started.values())
