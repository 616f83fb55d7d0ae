"""Starting or joining Ray for the model service, on loopback when local.

Local Ray on these machines listens on every interface unless told otherwise: its core servers
follow ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (measured: GCS, raylet and workers then bind to
127.0.0.1). Serve replicas still open one gRPC port on all interfaces (hard-coded in Ray), which
is why the test suite runs in a loopback-only network namespace. A cluster (KubeRay) is joined
by address and keeps its own network policy.

What a local start runs (Ray 2.60): the GCS, a dashboard head (reduced to its usage-stats module
unless ``include_dashboard``), the autoscaler monitor, the log monitor and the raylet; the raylet
launches the dashboard agent and the runtime-env agent, aborts when the dashboard agent has not
written its port files within a fixed 15 s ("Timed out waiting for file .../metrics_agent_port_",
compiled in; ``RAY_agent_register_timeout_ms`` does not change it, measured), and registers with
the GCS only after both agents reported. ``ray.init`` can leave out none of these but the
dashboard UI. The driver waits a fixed 30 s for that registration (ray/_private/node.py, "The
current node timed out during startup"); the agents' imports miss these windows on a loaded
2-core machine. So a local start gets one budget, ``ray_start_timeout_s``: every start-up wait
Ray lets us raise gets it, a start that failed is shut down completely and tried again while the
budget lasts, and a start that cannot succeed ends in one ``RayStartError`` naming the session
logs and a remedy. Nothing here retries once Ray is up: failures of the running service are not
hidden.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import psutil
import ray

from medvlm.errors import RayStartError, one_line
from medvlm.settings import ServingSettings

_log = logging.getLogger(__name__)

# Ray 2.60 waits this long, fixed, for a new raylet to register (ray/_private/node.py:428); an
# attempt begun with less budget left cannot finish in time.
RAYLET_REGISTRATION_WINDOW_S = 30.0

# Serve's controller restarts a proxy after this many missed ready checks in a row
# (ray/serve/_private/constants.py:317, PROXY_HEALTH_CHECK_UNHEALTHY_THRESHOLD, not settable).
_SERVE_PROXY_READY_CHECKS = 3

_RAY_PACKAGE_DIR = f"{Path(ray.__file__).parent}{os.sep}"

# How often a start attempt records the processes Ray spawned (see _RayChildren).
_WATCH_INTERVAL_S = 0.2


class StartAttempt(Protocol):
    """One ``ray.init`` attempt as seen from outside: where its logs are, a way to stop what it
    spawned, and ``close`` when the attempt is over (started or stopped)."""

    def log_dir(self) -> Path | None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def init_ray(
    serving: ServingSettings, *, num_cpus: int | None = None, bind_shim: Path | None = None
) -> None:
    """Join ``serving.ray_address`` or start a private local Ray bound to loopback.

    ``bind_shim`` (scripts/bind_loopback.c, built by the install scripts) is preloaded into the
    local Ray processes so that the replicas' hard-coded ``[::]:0`` gRPC port binds to ``::1``.
    Raises ``RayStartError`` when Ray cannot be started or joined; nothing of a failed local
    start is left running.
    """
    if ray.is_initialized():
        return
    if serving.ray_address is not None:
        address = serving.ray_address
        start_ray(lambda: ray.init(address=address, log_to_driver=False), serving)
        return
    _prepare_local_ray(serving, bind_shim)
    start_ray(
        lambda: _on_lasting_thread(
            lambda: ray.init(
                num_cpus=num_cpus,
                include_dashboard=serving.include_dashboard,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
            )
        ),
        serving,
    )


# The thread local Ray is started from when the caller's thread may end first (see below).
_RAY_OWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-owner")


def _on_lasting_thread(start: Callable[[], object]) -> object:
    """Run ``start`` on a thread that lives as long as this process.

    Ray spawns its GCS, raylet and monitors with ``PR_SET_PDEATHSIG`` (fate sharing), which
    Linux fires when the *thread* that spawned them ends, not the process. A run starts the
    model service on its first draft from a worker thread of its event loop; when that loop
    closed, the thread ended and the kernel killed the GCS and raylet under the live replicas
    (measured: Serve's controller then "failed to shut down within 30.0s" and the replica's
    vLLM EngineCore and worker were left orphaned, spinning on a CPU each). The main thread
    lasts as long as the process; any other caller hands the start to the owner thread.
    """
    if threading.current_thread() is threading.main_thread():
        return start()
    return _RAY_OWNER.submit(start).result()


def start_ray(
    init: Callable[[], object],
    serving: ServingSettings,
    *,
    begin_attempt: Callable[[], StartAttempt] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``init`` (a ``ray.init`` call) within the settings' start budget.

    A local start that fails is stopped (``StartAttempt.stop``) and, while attempts and budget
    remain, tried again; joining a cluster is tried once. The last failure becomes one
    ``RayStartError`` chained to Ray's exception. ``begin_attempt`` snapshots what is running
    before an attempt (default: this process's Ray child processes).
    """
    local = serving.ray_address is None
    begin = begin_attempt or _RayChildren
    deadline = clock() + serving.ray_start_timeout_s
    attempt = 0
    while True:
        attempt += 1
        started = begin()
        try:
            init()
            started.close()
            return
        except Exception as exc:  # Ray raises bare Exception for its start-up timeouts
            logs = started.log_dir()
            started.stop()
            started.close()
            left_s = deadline - clock()
            if (
                local
                and attempt < serving.ray_start_attempts
                and left_s >= RAYLET_REGISTRATION_WINDOW_S
                and not isinstance(exc, (TypeError, ValueError))  # arguments: no retry helps
            ):
                _log.warning(
                    "local Ray start %d failed (%s); logs: %s; trying again (%.0f s of "
                    "ray_start_timeout_s left)",
                    attempt,
                    _first_line(exc),
                    logs,
                    left_s,
                )
                continue
            raise RayStartError(_failure_message(serving, exc, logs, attempt)) from exc
        except BaseException:  # Ctrl-C during a start: leave nothing half-started behind
            started.stop()
            started.close()
            raise


def shutdown_ray() -> None:
    """Stop Serve and Ray, then end whatever of a local Ray this process started still runs.

    ``ray.shutdown`` ends Ray's own processes but not their children: a replica's vLLM
    EngineCore process (~1 GiB) was left orphaned when Serve's controller did not stop within
    its 30 s (measured, on a loaded machine). So the local Ray's process family is recorded
    first and its survivors are terminated, then killed. A joined cluster's processes are not
    this process's children and are left alone.
    """
    from ray import serve

    if not ray.is_initialized():
        return
    family = _ray_family(set())
    try:
        serve.shutdown()  # type: ignore[no-untyped-call]
    finally:
        try:
            ray.shutdown()
        finally:
            _end(family)


def _prepare_local_ray(serving: ServingSettings, bind_shim: Path | None) -> None:
    """Environment of the local Ray processes: loopback, start-up waits, the bind shim."""
    budget_s = math.ceil(serving.ray_start_timeout_s)
    # Ray reads this at import: the processes this call spawns see the variable, and this
    # (already imported) driver gets the same value through the module constant, which
    # get_node_ip_address() consults at call time (Ray 2.60). Without both, the head publishes
    # the host's address while the shim keeps its servers on loopback, and nothing connects.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # The driver's wait for the GCS port file, and its number of ~1 s GCS connect tries
    # (ray/_private/node.py:1405 and :985, read at call time; Ray spells the name in lower case).
    os.environ["RAY_gcs_server_port_wait_time_s"] = str(budget_s)  # noqa: SIM112
    # The driver's wait for the dashboard head to publish its URL: fatal with the dashboard on,
    # logged only without it (ray/_private/ray_constants.py:181, read at import: set both).
    os.environ["RAY_DASHBOARD_STARTUP_TIMEOUT_S"] = str(budget_s)
    ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = budget_s
    # Serve's controller (a worker of this Ray, inheriting this environment) restarts a proxy
    # that misses 3 ready checks of 5 s each; loaded, the proxy needs longer, the restart kills
    # it, and serve.start() fails with ActorDiedError (measured). Give the proxy the budget.
    os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = str(
        serving.ray_start_timeout_s / _SERVE_PROXY_READY_CHECKS
    )
    # Every Ray process reads its RayConfig from RAY_<name> (workers via the raylet's
    # environment); the core worker applies it with nice() (ray_config_def.h, worker_niceness).
    os.environ["RAY_worker_niceness"] = str(serving.ray_worker_niceness)  # noqa: SIM112
    if bind_shim is not None:
        preload = os.environ.get("LD_PRELOAD", "")
        if str(bind_shim) not in preload.split():
            os.environ["LD_PRELOAD"] = f"{bind_shim} {preload}".strip()


def _failure_message(
    serving: ServingSettings, exc: Exception, logs: Path | None, attempts: int
) -> str:
    cause = _first_line(exc).rstrip(".")
    if serving.ray_address is not None:
        return (
            f"could not join the Ray cluster at {serving.ray_address}: {cause}; hint: check that "
            "the address is reachable from here and runs the same Ray and Python versions "
            "(MEDVLM_SERVING__RAY_ADDRESS)"
        )
    where = (
        f"logs: {logs} (raylet.out, dashboard_agent.log, gcs_server.out)"
        if logs is not None
        else "no Ray session was created"
    )
    tried = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    return (
        f"local Ray did not start ({tried} within MEDVLM_SERVING__RAY_START_TIMEOUT_S="
        f"{serving.ray_start_timeout_s:g} s): {cause}; {where}; hint: an overloaded machine "
        "starts Ray slowly — free CPU or raise MEDVLM_SERVING__RAY_START_TIMEOUT_S / "
        "MEDVLM_SERVING__RAY_START_ATTEMPTS"
    )


def _first_line(exc: BaseException) -> str:
    return one_line(str(exc), limit=200) or type(exc).__name__


def _is_ray(process: psutil.Process) -> bool:
    try:
        return any(_RAY_PACKAGE_DIR in part for part in process.cmdline())
    except psutil.Error:  # exited, a zombie, or not ours to inspect
        return False


def _ray_children(before: set[int]) -> list[psutil.Process]:
    """This process's children that run Ray, except those in ``before`` (pids)."""
    return [
        child for child in psutil.Process().children() if child.pid not in before and _is_ray(child)
    ]


def _ray_family(before: set[int]) -> list[psutil.Process]:
    """``_ray_children`` and all their descendants (agents, workers, a replica's engine)."""
    found = _ray_children(before)
    for process in list(found):
        try:
            found.extend(process.children(recursive=True))
        except psutil.Error:
            continue
    return found


def _end(processes: list[psutil.Process]) -> None:
    """Terminate those still running, wait up to 10 s, kill the rest."""
    for process in processes:
        try:
            process.terminate()  # psutil refuses a pid that now names another process
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()  # also ends a stopped process, which SIGTERM leaves pending
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)


class _RayChildren:
    """The Ray processes one start attempt spawned: those not running before it began.

    When ``ray.init`` fails inside Ray's node start-up, Ray keeps no handle on what it had
    spawned (``ray.shutdown`` then stops nothing), so the processes are found from here: this
    process's new children that run Ray (GCS, raylet, dashboard head, monitors) and their
    descendants. A raylet that aborted has orphaned its agents by the time the attempt fails,
    and an orphaned agent keeps importing, then waits minutes on the stopped GCS (measured), so
    descendants are recorded while the attempt runs, every ``_WATCH_INTERVAL_S``.
    """

    def __init__(self) -> None:
        self._before = {child.pid for child in psutil.Process().children()}
        self._seen: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="ray-start-watch", daemon=True)
        self._watcher.start()

    def _spawned(self) -> list[psutil.Process]:
        return _ray_children(self._before)

    def _record(self) -> None:
        found = _ray_family(self._before)
        with self._lock:
            self._seen.update((process.pid, process) for process in found)

    def _watch(self) -> None:
        while not self._closed.wait(_WATCH_INTERVAL_S):
            self._record()

    def log_dir(self) -> Path | None:
        for process in self._spawned():
            try:
                arguments = process.cmdline()
            except psutil.Error:
                continue
            for argument in arguments:
                name, _, value = argument.partition("=")
                if name in ("--session-dir", "--session_dir") and value:
                    return Path(value) / "logs"
        return None

    def stop(self) -> None:
        self._record()
        try:
            ray.shutdown()  # a node that did start, and a half-connected driver
        except Exception:  # the start's own error is the one to report; the kill below follows
            _log.warning("ray.shutdown() after a failed start failed", exc_info=True)
        with self._lock:
            family = list(self._seen.values())
        _end(family)

    def close(self) -> None:
        self._closed.set()
        self._watcher.join()
