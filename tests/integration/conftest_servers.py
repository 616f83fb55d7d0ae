"""Pytest plugin: the real dev servers (Orthanc, FHIR R4), a PostgreSQL for the job ledger and
a Prefect server on that PostgreSQL, started once per test session.

Registered from ``tests/conftest.py`` with ``pytest_plugins``. The servers run from a workdir under
pytest's temporary directory on free loopback ports, through the product's own
``medvlm.dev.servers.DevServers``, and are stopped by PID at the end of the session. Works inside a
private network namespace (``unshare -n`` with ``lo`` up) and outside it (then Orthanc is kept on
loopback by the bind shim that ``scripts/install-servers.sh`` builds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from sqlalchemy.engine import make_url

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


@contextmanager
def running_dev_servers(settings: Any) -> Iterator[DevServers]:
    """Orthanc and the FHIR server of ``settings``, up until the block ends."""
    servers = DevServers(settings)
    try:
        servers.up()
        yield servers
    finally:
        try:
            servers.down()
        finally:
            servers.close()


@pytest.fixture(scope="session")
def dev_servers(
    tmp_path_factory: pytest.TempPathFactory, dev_settings_factory: DevSettingsFactory
) -> Iterator[DevServers]:
    """Orthanc and the FHIR server, up for the whole session."""
    with running_dev_servers(dev_settings_factory(tmp_path_factory.mktemp("devservers"))) as up:
        yield up


@dataclass(frozen=True)
class PostgresServer:
    """A throwaway PostgreSQL cluster, loopback only: superuser ``medvlm`` with trust auth;
    role ``password_role``, once a test creates it, only with its password (SCRAM)."""

    host: str
    port: int
    password_role: ClassVar[str] = "medvlm_pw"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://medvlm@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "ledger") -> str:
        """A new empty database named ``prefix_<random>``; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=self.host, port=self.port, user="medvlm", dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _postgres_bin() -> Path:
    """Debian's PostgreSQL 15 programs (not on PATH); ``MEDVLM_TEST_PG_BIN`` overrides."""
    return Path(os.environ.get("MEDVLM_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres_user(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the ``postgres``
    system user (Debian's package creates it); as anyone else, as oneself."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """PostgreSQL 15, initialised in a temporary folder and started on a free loopback port
    (its Unix socket in that folder too) for the session; stopped by PID at the end."""
    bindir = _postgres_bin()
    if not (bindir / "initdb").is_file():
        pytest.fail(
            f"PostgreSQL not found at {bindir}: run scripts/install-servers.sh (postgresql-15)",
            pytrace=False,
        )
    # Not under pytest's temporary folder: that one is private to root, and the server runs
    # as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="medvlm-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_loopback_ports(1)[0]
    pid: int | None = None
    try:
        subprocess.run(
            _as_postgres_user(
                [
                    *(str(bindir / "initdb"), "-D", str(data), "-U", "medvlm", "--auth=trust"),
                    *("--encoding=UTF8", "--locale=C", "--no-sync"),
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        # One role must give its password (SCRAM over TCP, as a hospital's database asks);
        # every other role is trusted. First matching line wins.
        hba = data / "pg_hba.conf"
        hba.write_text(
            f"host all {PostgresServer.password_role} 127.0.0.1/32 scram-sha-256\n"
            + hba.read_text()
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        started = subprocess.run(
            _as_postgres_user(
                [
                    *(str(bindir / "pg_ctl"), "start", "-D", str(data), "-l", str(log)),
                    *("-w", "-t", "60", "-o", options),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=90,
        )
        if started.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"PostgreSQL did not start: {started.stderr}\n{tail}", pytrace=False)
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield PostgresServer("127.0.0.1", port)
    finally:
        if pid is not None:
            stopped = subprocess.run(
                _as_postgres_user(
                    [str(bindir / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]
                ),
                capture_output=True,
                timeout=60,
            )
            if stopped.returncode != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def stop_process_group(process: subprocess.Popen[Any], grace_s: float) -> None:
    """Stop what ``process`` leads (started with ``start_new_session``: its PID is its process
    group's id): SIGTERM to the group, then SIGKILL to the group after ``grace_s`` — also for
    children that outlived the leader (a worker's flow-run processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@dataclass(frozen=True)
class PrefectServer:
    """A Prefect API server on loopback; ``env`` points a Prefect client process at it."""

    api_url: str
    home: Path
    log: Path

    def env(self) -> dict[str, str]:
        """``PREFECT_*`` variables for a client process (CLI, worker): this server, and a Prefect
        home of the test's own, so that no profile of the machine applies."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home)}


@pytest.fixture(scope="session")
def prefect_server(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port for the session, its database a fresh
    one in the ``postgres`` cluster (Prefect migrates it at start); stopped by PID at the end.

    Off: the UI, analytics, the scheduler (the cron schedules of prefect.yaml's deployments must
    not create runs behind a test's back), and the services that only ingest events and
    task-run records (they cost more CPU than the flows under test: see ``prefect_api``).
    """
    root = tmp_path_factory.mktemp("prefect-server")
    port = _free_loopback_ports(1)[0]
    database = make_url(postgres.create_database("prefect")).set(drivername="postgresql+asyncpg")
    server = PrefectServer(f"http://127.0.0.1:{port}/api", root / "home", root / "server.log")
    env = {
        **os.environ,
        **server.env(),
        "PREFECT_API_DATABASE_CONNECTION_URL": database.render_as_string(hide_password=False),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    }
    prefect = str(Path(sys.executable).parent / "prefect")
    with server.log.open("wb") as out:
        process = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{server.api_url}/health").status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"Prefect server did not start:\n{server.log.read_text()[-3000:]}",
                        pytrace=False,
                    )
                time.sleep(0.5)
        yield server
    finally:
        stop_process_group(process, grace_s=20)


@pytest.fixture(scope="session")
def orthanc(dev_servers: DevServers) -> OrthancInfo:
    """URLs, DIMSE endpoint and credentials of the session's Orthanc."""
    return dev_servers.orthanc


@pytest.fixture(scope="session")
def fhir_base_url(dev_servers: DevServers) -> str:
    """Base URL of the session's FHIR R4 server (e.g. ``http://127.0.0.1:PORT/fhir``)."""
    return dev_servers.fhir.base_url
