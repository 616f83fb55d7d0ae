"""The Triton dev server: a real Triton Inference Server (the ``tritonserver`` binary of PyPI's
nvidia-pytriton) on loopback, whose model drafts with the project's vLLM engine behind the Serve
app (issue 19).

``start`` lays out a work directory: ``backends/`` (the wheel's Python backend with the stub
built for the venv's Python), ``models/<name>/`` (``config.pbtxt`` with the vLLM backend's
tensors, decoupled like it, and ``1/model.py``: medvlm/dev/triton_model.py, a plain
Python-backend model that forwards to the Serve app's ``/v1/generate``), then runs
``tritonserver`` on it in a session of its own, so that it and the Python backend's stubs are
one process group: ``stop`` ends that group by the PID it started (SIGTERM, then SIGKILL after
``stop_timeout_s``), nothing found by name. HTTP, gRPC and metrics bind to 127.0.0.1;
``start`` checks that no process of the group listens anywhere else.

The venv (``dev.triton_venv``, scripts/install-triton.sh) is built on Debian's Python 3.11: the
wheel's 3.11 stub links Debian's libpython3.11, and the model's numpy comes from the venv.
PyTriton's own Python API is not used: its model proxy crashed ``tritonserver`` 2.51 after a few
drafts (medvlm/dev/triton_model.py says what was measured). ``stop`` removes the backend's
shared-memory regions a killed server leaves in /dev/shm (they carry this server's prefix).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from medvlm.dev import triton_model
from medvlm.dev.servers import listening_sockets
from medvlm.errors import DevServerError

LOOPBACK_HOST = "127.0.0.1"
MODEL_PROGRAM = Path(__file__).with_name("triton_model.py")
STUB = "triton_python_backend_stub"
SHM_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int


class TritonDevServer:
    """One Triton dev server; ``start``/``stop`` by PID, or use it as a context manager."""

    def __init__(
        self,
        venv: Path,
        workdir: Path,
        *,
        serve_url: str,
        ports: TritonPorts,
        serve_api_key: str | None = None,
        model_name: str = "medvlm",
        instances: int = 1,
        request_timeout_s: float = 600.0,
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.venv = venv
        self.workdir = workdir
        self.serve_url = serve_url
        self.ports = ports
        self.model_name = model_name
        self._api_key = serve_api_key
        self._instances = instances
        self._request_timeout_s = request_timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient takes no scheme)."""
        return f"{LOOPBACK_HOST}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK_HOST}:{self.ports.grpc}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "triton.log"

    @property
    def pid_path(self) -> Path:
        return self.workdir / "triton.pid"

    def dist(self) -> Path:
        """The Triton distribution inside the venv's nvidia-pytriton (``bin/tritonserver``,
        the Python backend and its stubs per Python version)."""
        found = sorted(self.venv.glob("lib/python3*/site-packages/pytriton/tritonserver"))
        if not found or not (found[0] / "bin" / "tritonserver").is_file():
            raise DevServerError(
                f"triton: no tritonserver in {self.venv}; run scripts/install-triton.sh "
                f"(installs nvidia-pytriton there)"
            )
        return found[0]

    def start(self, *, attempts: int = 2) -> None:
        """Start the server and wait until its model is ready (on loopback only)."""
        dist = self.dist()
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        backends = self._prepare_backends(dist)
        models = self._write_model_repository()
        last = ""
        for _ in range(attempts):
            self._spawn(dist, backends, models)
            try:
                self._wait_ready()
                self._check_loopback()
                return
            except DevServerError as exc:
                last = str(exc)
                self.stop()
        raise DevServerError(f"triton: did not start in {attempts} attempts: {last}")

    def _prepare_backends(self, dist: Path) -> Path:
        """The backend directory: the distribution's Python backend with the stub built for the
        venv's Python (the wheel ships one stub per Python version beside it, as PyTriton
        arranges at its start)."""
        backends = self.workdir / "backends"
        python_backend = backends / "python"
        if not (python_backend / STUB).is_file():
            shutil.rmtree(backends, ignore_errors=True)
            shutil.copytree(dist / "backends", backends)
            stubs = sorted((dist / "python_backend_stubs").glob(f"*/{STUB}"))
            version = _venv_python_version(self.venv)
            chosen = [s for s in stubs if s.parent.name == version]
            if not chosen:
                raise DevServerError(f"triton: no Python backend stub for Python {version}")
            shutil.copy2(chosen[0], python_backend / STUB)
        return backends

    def _write_model_repository(self) -> Path:
        models = self.workdir / "models"
        version_dir = models / self.model_name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODEL_PROGRAM, version_dir / "model.py")
        (models / self.model_name / "config.pbtxt").write_text(
            triton_model.model_config(
                self.serve_url, instances=self._instances, timeout_s=self._request_timeout_s
            )
        )
        return models

    def _shm_prefix(self) -> str:
        digest = hashlib.sha256(str(self.workdir.resolve()).encode()).hexdigest()[:12]
        return f"medvlm_triton_{digest}_"

    def _spawn(self, dist: Path, backends: Path, models: Path) -> None:
        site_packages = dist.parent.parent
        env = {
            "PATH": f"{self.venv / 'bin'}:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", str(self.workdir)),
            "LANG": "C.UTF-8",
            # tritonserver's own libraries (the wheel's), and numpy for the model's stub.
            "LD_LIBRARY_PATH": str(site_packages / "nvidia_pytriton.libs"),
            "PYTHONPATH": str(site_packages),
            "PYTHONUNBUFFERED": "1",
        }
        # Kept: some processors here need them for the venv's older OpenBLAS (numpy 1.26),
        # which otherwise computes wrong results or crashes.
        for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            if name in os.environ:
                env[name] = os.environ[name]
        if self._api_key:
            env[triton_model.API_KEY_ENV] = self._api_key
        command = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={models}",
            f"--backend-directory={backends}",
            f"--http-address={LOOPBACK_HOST}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={LOOPBACK_HOST}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={LOOPBACK_HOST}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--exit-on-error=true",
            # Shared-memory regions of this server's Python backend named after its work
            # directory, so that two dev servers on one machine never open each other's.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix()}",
            f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # its own process group: tritonserver and the stubs
            )
        self.pid_path.write_text(f"{self._process.pid}\n")

    def _wait_ready(self) -> None:
        assert self._process is not None
        url = f"http://{self.http_url}/v2/models/{self.model_name}/ready"
        deadline = time.monotonic() + self._startup_timeout_s
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise DevServerError(
                        f"triton: exited with {self._process.returncode}; log: {self.log_path}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        raise DevServerError(
            f"triton: model not ready within {self._startup_timeout_s:.0f} s; log: {self.log_path}"
        )

    def group_pids(self) -> list[int]:
        """The PIDs of the server's process group (it, tritonserver, the model stubs)."""
        if self._process is None:
            return []
        pgid = self._process.pid
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                found.append(int(entry.name))
        return found

    def _check_loopback(self) -> None:
        for pid in self.group_pids():
            try:
                sockets = listening_sockets(pid)
            except OSError:
                continue
            outside = [f"{a}:{p}" for a, p in sockets if not _loopback(a)]
            if outside:
                raise DevServerError(f"triton: listens beyond loopback: {', '.join(outside)}")

    def stop(self) -> bool:
        """Stop the server's process group; True if it was running."""
        process = self._process
        if process is None:
            return False
        running = process.poll() is None or bool(self.group_pids())
        for sig, wait_s in ((signal.SIGTERM, self._stop_timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                process.poll()
                if not self.group_pids():
                    break
                time.sleep(0.2)
            if not self.group_pids():
                break
        process.wait(timeout=10)
        self._process = None
        self.pid_path.unlink(missing_ok=True)
        # A server killed after its exit timeout leaves its Python backend's regions behind.
        for region in Path("/dev/shm").glob(f"{self._shm_prefix()}*"):
            region.unlink(missing_ok=True)
        return running

    def __enter__(self) -> TritonDevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _loopback(address: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def _venv_python_version(venv: Path) -> str:
    """``3.11`` for a venv made by Python 3.11 (its pyvenv.cfg)."""
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            return ".".join(value.strip().split(".")[:2])
    raise DevServerError(f"triton: {venv}/pyvenv.cfg names no Python version")
