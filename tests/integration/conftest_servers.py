"""Pytest plugin: the real dev servers (Orthanc, FHIR R4), started once per test session.

Registered from ``tests/conftest.py`` with ``pytest_plugins``. The servers run from a workdir under
pytest's temporary directory on free loopback ports, through the product's own
``medvlm.dev.servers.DevServers``, and are stopped by PID at the end of the session. Works inside a
private network namespace (``unshare -n`` with ``lo`` up) and outside it (then Orthanc is kept on
loopback by the bind shim that ``scripts/install-servers.sh`` builds).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from medvlm.dev.servers import DevServers, OrthancInfo, dev_settings_from
from medvlm.settings import DevServerSettings, MedvlmSettings

DevSettingsFactory = Callable[[Path], DevServerSettings]


def _free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (held open together while chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@pytest.fixture(scope="session")
def dev_settings_factory() -> DevSettingsFactory:
    """Builds dev-server settings for a given workdir with freshly chosen free ports.

    Everything else (FHIR venv, bind shim, timeouts) comes from the settings tree as loaded from
    the environment (``MEDVLM_HOME``, ``MEDVLM_DEV__*``).
    """
    base = dev_settings_from(MedvlmSettings())

    def make(workdir: Path) -> DevServerSettings:
        http, dicom, fhir, scp = _free_loopback_ports(4)
        return DevServerSettings.model_validate(
            base.model_dump()
            | {
                "workdir": workdir,
                "orthanc_http_port": http,
                "orthanc_dicom_port": dicom,
                "fhir_port": fhir,
                "scp_port": scp,
            }
        )

    return make


@pytest.fixture(scope="session")
def dev_servers(
    tmp_path_factory: pytest.TempPathFactory, dev_settings_factory: DevSettingsFactory
) -> Iterator[DevServers]:
    """Orthanc and the FHIR server, up for the whole session."""
    servers = DevServers(dev_settings_factory(tmp_path_factory.mktemp("devservers")))
    try:
        servers.up()
        yield servers
    finally:
        try:
            servers.down()
        finally:
            servers.close()


@pytest.fixture(scope="session")
def orthanc(dev_servers: DevServers) -> OrthancInfo:
    """URLs, DIMSE endpoint and credentials of the session's Orthanc."""
    return dev_servers.orthanc


@pytest.fixture(scope="session")
def fhir_base_url(dev_servers: DevServers) -> str:
    """Base URL of the session's FHIR R4 server (e.g. ``http://127.0.0.1:PORT/fhir``)."""
    return dev_servers.fhir.base_url
