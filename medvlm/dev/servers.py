"""Local development servers for tests and demos: Orthanc (the PACS) and sekmet (a FHIR R4 server).

``DevServers(settings).up()`` starts each server as a background process of its own session, bound
to loopback only, with its data, log and configuration under ``settings.workdir/<server>/`` and its
PID in ``settings.workdir/<server>.pid``; ``down()`` stops them by that PID. ``up()`` is idempotent:
a running, healthy server is reused.

- Orthanc 1.10 (Debian) has no bind-address option, so it is started with ``LD_PRELOAD`` of the
  shim built from ``scripts/bind_loopback.c``; after start its listening sockets are checked and a
  server that listens anywhere but loopback is stopped again.
- Orthanc requires HTTP basic auth. Its password is generated at the first ``up()`` and kept in
  ``workdir/credentials.json`` (mode 0600), never in code.
- sekmet runs from its own venv (``scripts/install-servers.sh``), configured with ``host:
  127.0.0.1`` and its order simulator off.

What this module must not do: install anything (that is ``scripts/install-servers.sh``), talk to
any address but loopback, or signal a process whose command line is not the server it started.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import httpx
from pydantic import SecretStr

from medvlm.errors import ConfigurationError, DevServerError
from medvlm.settings import DevServerSettings, MedvlmSettings, PacsSettings

ServerName = Literal["orthanc", "fhir"]
SERVER_NAMES: Final[tuple[ServerName, ...]] = ("orthanc", "fhir")

LOOPBACK_HOST: Final = "127.0.0.1"
DICOMWEB_PLUGIN: Final = "libOrthancDicomWeb.so"
GDCM_PLUGIN: Final = "libOrthancGdcm.so"
SEKMET_VERSION: Final = "0.1.1"
_HEALTH_TIMEOUT = httpx.Timeout(2.0)
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class OrthancInfo:
    """How to reach the dev Orthanc: HTTP root, DICOMweb root, DIMSE endpoint and credentials."""

    http_url: str
    dicomweb_url: str
    dicom_host: str
    dicom_port: int
    aet: str
    username: str
    password: SecretStr

    @property
    def auth(self) -> tuple[str, str]:
        """Basic-auth pair for HTTP clients (httpx ``auth=``, requests ``auth=``)."""
        return (self.username, self.password.get_secret_value())

    def pacs_settings(self, **extra: Any) -> PacsSettings:
        """DICOMweb source settings for this Orthanc (``extra`` overrides fields)."""
        return PacsSettings.model_validate(
            {
                "kind": "dicomweb",
                "dicomweb_url": self.dicomweb_url,
                "auth": "basic",
                "username": self.username,
                "password": self.password,
                "qido_filter_modalities_client_side": True,  # Orthanc quirk: paged modality QIDO
            }
            | extra
        )


@dataclass(frozen=True)
class FhirServerInfo:
    """How to reach the dev FHIR R4 server (no authentication: loopback only)."""

    base_url: str


@dataclass(frozen=True)
class ServerStatus:
    """One server as seen by ``up()`` or ``status()``."""

    name: ServerName
    pid: int | None
    url: str
    healthy: bool
    log_path: Path
    started: bool = False
    """True when this call started the process, False when it was already running."""
    startup_s: float | None = None
    """Seconds from spawn to the first healthy answer (only when ``started``)."""


@dataclass(frozen=True)
class _Launch:
    name: ServerName
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    program: str
    """An argv element that identifies the server's program in /proc/PID/cmdline."""
    config: Path
    ports: tuple[int, ...]


def dev_settings_from(root: MedvlmSettings) -> DevServerSettings:
    """The dev-server settings of a loaded settings tree, with ``bind_shim`` resolved from HOME."""
    return root.dev.model_copy(update={"bind_shim": root.bind_shim})


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by process ``pid``.

    Read from /proc (the process's own network namespace), so it needs no external tool.
    """
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found: list[tuple[str, int]] = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A = TCP_LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word of the address in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.IPv6Address(words) if v6 else ipaddress.IPv4Address(words)
            found.append((str(addr), int(hex_port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _only_loopback_interface() -> bool:
    """True inside a private network namespace whose only interface is ``lo``."""
    # /proc/self/net follows this process's namespace; /sys/class/net follows the sysfs mount,
    # which `unshare -n` alone does not remount (it still lists the host's interfaces there).
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return False
    return {line.split(":", 1)[0].strip() for line in lines} <= {"lo"}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name; Z (zombie) and X (dead) have exited.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0") if a]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: only a listening socket blocks the bind, not TIME_WAIT leftovers.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK_HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (it may hold a password)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class DevServers:
    """Start, check and stop the local Orthanc and FHIR servers described by ``settings``."""

    def __init__(self, settings: DevServerSettings) -> None:
        if settings.workdir is None or settings.fhir_venv is None:
            raise ConfigurationError(
                "DevServerSettings.workdir and .fhir_venv must be set "
                "(load them through MedvlmSettings, which resolves them from HOME)"
            )
        self.settings = settings
        self.workdir: Path = settings.workdir
        self.fhir_venv: Path = settings.fhir_venv
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._http = httpx.Client(timeout=_HEALTH_TIMEOUT, trust_env=False)

    # -- public surface -------------------------------------------------------------------------

    @property
    def orthanc(self) -> OrthancInfo:
        s = self.settings
        http_url = self._orthanc_http_url()
        return OrthancInfo(
            http_url=http_url,
            dicomweb_url=f"{http_url}/dicom-web",
            dicom_host=LOOPBACK_HOST,
            dicom_port=s.orthanc_dicom_port,
            aet=s.orthanc_aet,
            username=s.orthanc_user,
            password=SecretStr(self._orthanc_password(create=False)),
        )

    @property
    def fhir(self) -> FhirServerInfo:
        return FhirServerInfo(base_url=f"http://{LOOPBACK_HOST}:{self.settings.fhir_port}/fhir")

    def up(self) -> list[ServerStatus]:
        """Start whichever server is not running and healthy; reuse the others."""
        with self._locked():
            reused: dict[ServerName, int] = {}
            launches: list[_Launch] = []
            for name in SERVER_NAMES:
                pid = self._verified_pid(name)
                if pid is not None and self._healthy(name):
                    reused[name] = pid
                    continue
                if pid is not None:  # running but not answering: replace it
                    self._stop(name, pid)
                launches.append(self._prepare(name))
            for launch in launches:  # before spawning any: fail without leaving half a set
                self._check_ports_free(launch)
            spawned = {launch.name: (self._spawn(launch), time.monotonic()) for launch in launches}
            results: dict[ServerName, ServerStatus] = {}
            for name, pid in reused.items():
                results[name] = ServerStatus(name, pid, self._url(name), True, self._log_path(name))
            for name, (pid, t0) in spawned.items():
                self._wait_healthy(name, pid)
                elapsed = time.monotonic() - t0
                self._check_loopback(name, pid)
                results[name] = ServerStatus(
                    name, pid, self._url(name), True, self._log_path(name), True, elapsed
                )
            return [results[n] for n in SERVER_NAMES]

    def down(self) -> list[ServerName]:
        """Stop the servers recorded in the PID files; returns the names that were stopped."""
        with self._locked():
            running: dict[ServerName, int] = {}
            for name in SERVER_NAMES:
                pid = self._verified_pid(name)
                if pid is not None:
                    running[name] = pid
            self._stop_all(running)
            return list(running)

    def stop(self, name: ServerName) -> bool:
        """Stop one server (its data stays: ``up`` starts it again on the same ports and
        storage); whether it was running."""
        with self._locked():
            pid = self._verified_pid(name)
            if pid is None:
                return False
            self._stop(name, pid)
            return True

    def status(self) -> list[ServerStatus]:
        """PID and health of each server; stale PID files are removed on the way."""
        out: list[ServerStatus] = []
        for name in SERVER_NAMES:
            pid = self._verified_pid(name)
            healthy = pid is not None and self._healthy(name)
            out.append(ServerStatus(name, pid, self._url(name), healthy, self._log_path(name)))
        return out

    def close(self) -> None:
        """Release the HTTP client and reap servers that have exited (stopped, perhaps, by
        another ``DevServers`` of this workdir). Running servers keep running."""
        for pid in list(self._children):
            self._reap(pid)
        self._http.close()

    def __enter__(self) -> DevServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- paths ----------------------------------------------------------------------------------

    def _server_dir(self, name: ServerName) -> Path:
        return self.workdir / name

    def _pid_path(self, name: ServerName) -> Path:
        return self.workdir / f"{name}.pid"

    def _log_path(self, name: ServerName) -> Path:
        return self._server_dir(name) / f"{name}.log"

    def _config_path(self, name: ServerName) -> Path:
        return self._server_dir(name) / ("orthanc.json" if name == "orthanc" else "sekmet.json")

    def _program(self, name: ServerName) -> str:
        if name == "orthanc":
            return str(self.settings.orthanc_executable)
        return str(self.fhir_venv / "bin" / "sekmet")

    def _orthanc_http_url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self.settings.orthanc_http_port}"

    def _url(self, name: ServerName) -> str:
        return self._orthanc_http_url() if name == "orthanc" else self.fhir.base_url

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up()/down() of several processes (e.g. pytest workers) on one workdir."""
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.workdir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- credentials ----------------------------------------------------------------------------

    def _orthanc_password(self, *, create: bool) -> str:
        path = self.workdir / "credentials.json"
        user = self.settings.orthanc_user
        stored: dict[str, dict[str, str]] = {}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except ValueError as exc:
                raise DevServerError(f"orthanc: {path} is not valid JSON; delete it") from exc
        entry = stored.get("orthanc", {})
        if entry.get("username") == user and entry.get("password"):
            return entry["password"]
        if not create:
            raise DevServerError(
                f"orthanc: no credentials for user {user!r} in {path}; run `medvlm dev up` first"
            )
        stored["orthanc"] = {"username": user, "password": secrets.token_urlsafe(24)}
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, json.dumps(stored, indent=2) + "\n")
        return stored["orthanc"]["password"]

    # -- configuration --------------------------------------------------------------------------

    def _prepare(self, name: ServerName) -> _Launch:
        server_dir = self._server_dir(name)
        server_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return (
            self._prepare_orthanc(server_dir)
            if name == "orthanc"
            else self._prepare_fhir(server_dir)
        )

    def _prepare_orthanc(self, server_dir: Path) -> _Launch:
        s = self.settings
        if not s.orthanc_executable.is_file():
            raise DevServerError(
                f"orthanc: {s.orthanc_executable} not found; run scripts/install-servers.sh"
            )
        plugins = [s.orthanc_plugins_dir / DICOMWEB_PLUGIN, s.orthanc_plugins_dir / GDCM_PLUGIN]
        missing = [str(p) for p in plugins if not p.is_file()]
        if missing:
            raise DevServerError(
                f"orthanc: plugin(s) {', '.join(missing)} not found; run scripts/install-servers.sh"
            )
        shim = s.bind_shim if s.bind_shim is not None and s.bind_shim.is_file() else None
        if shim is None and not _only_loopback_interface() and not s.allow_wildcard_bind:
            raise DevServerError(
                "orthanc: the loopback bind shim is missing (MEDVLM_HOME/lib/bind_loopback.so; "
                "scripts/install-servers.sh builds it with gcc) and this host has interfaces "
                "other than lo, so Orthanc would listen on all of them. Build the shim, run "
                "inside `unshare -n`, or set MEDVLM_DEV__ALLOW_WILDCARD_BIND=true."
            )
        storage = server_dir / "storage"
        storage.mkdir(exist_ok=True, mode=0o700)
        config = {
            "Name": "medvlm-dev",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": s.orthanc_http_port,
            "DicomPort": s.orthanc_dicom_port,
            "DicomAet": s.orthanc_aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {s.orthanc_user: self._orthanc_password(create=True)},
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "HttpDescribeErrors": True,
            "DeidentifyLogs": True,
            "SaveJobs": False,
            "StableAge": s.orthanc_stable_age_s,
            "Plugins": [str(p) for p in plugins],
            # No "Host": the plugin then builds RetrieveURLs from the request's Host header,
            # which carries the non-default port (Debian's sample sets "localhost", portless).
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "Gdcm": {"Enable": True},
            "DicomModalities": {
                "medvlm-scp": {"AET": s.scp_aet, "Host": LOOPBACK_HOST, "Port": s.scp_port},
            },
        }
        config_path = self._config_path("orthanc")
        _write_private(config_path, json.dumps(config, indent=2) + "\n")
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(server_dir),
            "LANG": "C.UTF-8",
            # DCMTK reads it: DIMSE C-STORE goes from ~11/s to ~140/s without Nagle's delay.
            "TCP_NODELAY": "1",
        }
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        program = str(s.orthanc_executable)
        return _Launch(
            "orthanc",
            [program, str(config_path)],
            env,
            server_dir,
            program,
            config_path,
            (s.orthanc_http_port, s.orthanc_dicom_port),
        )

    def _prepare_fhir(self, server_dir: Path) -> _Launch:
        s = self.settings
        program = self._program("fhir")
        if not Path(program).is_file():
            raise DevServerError(
                f"fhir: {program} not found; run scripts/install-servers.sh (installs "
                f"sekmet-fhir=={SEKMET_VERSION} into {self.fhir_venv})"
            )
        data_dir = server_dir / "data"
        data_dir.mkdir(exist_ok=True, mode=0o700)
        # sekmet reads YAML; JSON is YAML, so no YAML writer is needed on this side.
        config = {
            "base_url": self.fhir.base_url,
            "host": LOOPBACK_HOST,  # sekmet's default is all interfaces
            "port": s.fhir_port,
            "data_dir": str(data_dir),
            "db_path": str(data_dir / "sekmet.db"),
            "own_private_key_path": str(server_dir / "keys" / "sekmet_private.pem"),
            # Off: otherwise sekmet fulfils ServiceRequests, Tasks, ... by itself.
            "simulator": {"enabled": False},
            "subscriptions": {"notify_method": "post-endpoint"},
            "server_auth": {"types": ["none"]},
            "peers": {},
        }
        config_path = self._config_path("fhir")
        _write_private(config_path, json.dumps(config, indent=2) + "\n")
        env = {
            "PATH": f"{self.fhir_venv / 'bin'}:/usr/bin:/bin",
            "HOME": str(server_dir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        return _Launch(
            "fhir",
            [program, "serve", "--config", str(config_path)],
            env,
            server_dir,
            program,
            config_path,
            (s.fhir_port,),
        )

    # -- processes ------------------------------------------------------------------------------

    def _verified_pid(self, name: ServerName) -> int | None:
        """PID from the PID file if that process is alive and is this server; else clean up."""
        path = self._pid_path(name)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            return None
        if self._owns(name, pid):
            return pid
        path.unlink(missing_ok=True)
        return None

    def _owns(self, name: ServerName, pid: int) -> bool:
        self._reap(pid)
        if not _process_alive(pid):
            return False
        argv = _cmdline(pid)
        # This server: its program (by name: a venv or binary path may be spelt differently by
        # other settings, and the PID file must not be dropped for a server still running) with
        # this workdir's own config file.
        program = Path(self._program(name)).name
        return str(self._config_path(name)) in argv and any(
            Path(arg).name == program for arg in argv
        )

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]

    def _check_ports_free(self, launch: _Launch) -> None:
        for port in launch.ports:
            if not _port_free(port):
                raise DevServerError(
                    f"{launch.name}: port {port} on {LOOPBACK_HOST} is already in use by another "
                    f"process (log: {self._log_path(launch.name)})"
                )

    def _spawn(self, launch: _Launch) -> int:
        log_path = self._log_path(launch.name)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            log.write(f"\n=== medvlm dev: starting {launch.name} at {time.ctime()} ===\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    launch.argv,
                    cwd=launch.cwd,
                    env=launch.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise DevServerError(
                    f"{launch.name}: cannot start {launch.argv[0]}: {exc} (log: {log_path})"
                ) from exc
        self._children[proc.pid] = proc
        _write_private(self._pid_path(launch.name), f"{proc.pid}\n")
        return proc.pid

    def _wait_healthy(self, name: ServerName, pid: int) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            self._reap(pid)
            if not _process_alive(pid):
                self._pid_path(name).unlink(missing_ok=True)
                raise self._error(name, f"exited during start-up (pid {pid})")
            if self._healthy(name):
                return
            if time.monotonic() > deadline:
                self._stop(name, pid)
                raise self._error(
                    name, f"not healthy after {self.settings.startup_timeout_s:.0f} s (pid {pid})"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _check_loopback(self, name: ServerName, pid: int) -> None:
        if self.settings.allow_wildcard_bind or _only_loopback_interface():
            return  # allowed, or nothing but lo to be reached in this network namespace
        exposed = [(a, p) for a, p in listening_sockets(pid) if not _is_loopback(a)]
        if exposed:
            self._stop(name, pid)
            where = ", ".join(f"{a}:{p}" for a, p in exposed)
            raise self._error(name, f"listened on non-loopback {where}; stopped it")

    def _stop(self, name: ServerName, pid: int) -> None:
        self._stop_all({name: pid})

    def _stop_all(self, targets: dict[ServerName, int]) -> None:
        """SIGTERM, wait ``stop_timeout_s``, then SIGKILL, to all ``targets`` at once.

        A PID is signalled only while its command line is still the server's (PIDs are reused).
        """
        pending = dict(targets)
        for sig, wait_s in ((signal.SIGTERM, self.settings.stop_timeout_s), (signal.SIGKILL, 5.0)):
            for name, pid in list(pending.items()):
                if not self._owns(name, pid):
                    del pending[name]
                    continue
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    del pending[name]
            deadline = time.monotonic() + wait_s
            for name, pid in list(pending.items()):
                if self._wait_gone(pid, max(0.0, deadline - time.monotonic())):
                    del pending[name]
            if not pending:
                break
        for name, pid in targets.items():
            self._reap(pid)
            if name not in pending:
                self._pid_path(name).unlink(missing_ok=True)
        if pending:
            name, pid = next(iter(pending.items()))
            raise self._error(name, f"pid {pid} survived SIGKILL")

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            child = self._children.get(pid)
            if child is not None:
                try:
                    child.wait(timeout=_POLL_INTERVAL_S)
                except subprocess.TimeoutExpired:
                    continue
                del self._children[pid]
                return True
            if not _process_alive(pid):
                return True
            time.sleep(_POLL_INTERVAL_S)
        return not _process_alive(pid)

    # -- health ---------------------------------------------------------------------------------

    def _healthy(self, name: ServerName) -> bool:
        checks: dict[ServerName, Callable[[], bool]] = {
            "orthanc": self._orthanc_healthy,
            "fhir": self._fhir_healthy,
        }
        try:
            return checks[name]()
        except (httpx.HTTPError, ValueError, DevServerError):
            return False

    def _orthanc_healthy(self) -> bool:
        info = self.orthanc
        r = self._http.get(f"{info.http_url}/system", auth=info.auth)
        return r.status_code == 200 and "Version" in r.json()

    def _fhir_healthy(self) -> bool:
        r = self._http.get(
            f"{self.fhir.base_url}/metadata", headers={"Accept": "application/fhir+json"}
        )
        return r.status_code == 200 and r.json().get("resourceType") == "CapabilityStatement"

    def _error(self, name: ServerName, what: str) -> DevServerError:
        log = self._log_path(name)
        return DevServerError(
            f"{name}: {what} (log: {log})\n--- last lines of {log} ---\n{_log_tail(log)}"
        )
