"""What a run killed with SIGKILL leaves running.

- Prefect's temporary API server is left behind; it is found and ended (a real Prefect
  temporary server, started the way ``medvlm run`` starts it, Prefect's own
  ``SubprocessASGIServer``, by a process that is then killed with SIGKILL).
- The Ray the run started for its local model (GCS, raylet, the Serve controller and proxy, the
  replica and its vLLM engine core) does not outlive it: a real ``medvlm run`` with the tiny
  model, killed while the model is up, as ``kill -9`` or the kernel's OOM killer would.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from medvlm.orphans import orphaned_prefect_servers, stop_orphaned_prefect_servers
from tests.conftest import free_port, processes_of_run
from tests.integration.folder_site import build_folder_site, folder_site_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STARTER = """
import sys
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
server.start(timeout=180)
print(server.server_process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_the_server_of_a_killed_run_is_found_and_stopped_and_a_live_ones_is_not(
    tmp_path: Path,
) -> None:
    home = str(tmp_path / "prefect-home")
    env = {
        **os.environ,
        "PREFECT_HOME": home,
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    with subprocess.Popen(
        [sys.executable, "-c", STARTER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as run:
        try:
            assert run.stdout is not None
            server = int(run.stdout.readline())
            # Its run is alive: not an orphan.
            assert server not in set(orphaned_prefect_servers(home))
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=30)
            deadline = time.monotonic() + 10
            while server not in set(orphaned_prefect_servers(home)):
                assert time.monotonic() < deadline, "the orphaned server was not found"
                time.sleep(0.2)
            assert server not in set(orphaned_prefect_servers(str(tmp_path / "another-home")))
            assert stop_orphaned_prefect_servers(home) == 1
            assert not Path(f"/proc/{server}").exists()
            assert list(orphaned_prefect_servers(home)) == []
        finally:
            if run.poll() is None:
                run.kill()


# The replica's vLLM engine core (its process title "VLLM::EngineCore"): the run is killed once
# it is up, with the whole family then running.
ENGINE_CORE = "EngineCore"


def _kill_all(lines: list[str]) -> None:
    for line in lines:
        with contextlib.suppress(psutil.Error):
            psutil.Process(int(line.split()[0])).kill()


@pytest.mark.timeout(900)
def test_the_ray_and_vllm_of_a_run_killed_with_sigkill_are_gone(
    tmp_path: Path, tiny_model_dir: Path, prefect_api: None
) -> None:
    from prefect.settings import PREFECT_API_URL

    day = dt.date(1964, 5, 2)
    build_folder_site(tmp_path / "site", 12, day, prefix="ORPH")
    run_id = uuid.uuid4().hex
    run_tmp = Path(tempfile.mkdtemp(prefix="orph-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDVLM_"))}
    env.update(
        {
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),  # the session's: no server of its own
            "MEDVLM_HOME": str(tmp_path / "home"),
            **folder_site_env(tmp_path / "site"),
            "MEDVLM_MODEL__SOURCE": str(tiny_model_dir),
            "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",  # the project's test model
            "MEDVLM_SERVING__PORT": str(free_port()),
            "TMPDIR": str(run_tmp),
            "RAY_TMPDIR": str(run_tmp),
            "MEDVLM_TEST_RUN_ID": run_id,  # inherited by every process of the run's family
        }
    )
    medvlm = str(Path(sys.executable).parent / "medvlm")
    args = [medvlm, "run", "--since", day.isoformat(), "--until", day.isoformat()]
    log = tmp_path / "run.log"
    try:
        with log.open("w") as out, subprocess.Popen(args, env=env, stdout=out, stderr=out) as run:
            deadline = time.monotonic() + 600
            seen: set[str] = set()
            while True:
                family = processes_of_run(run_id)
                if any(ENGINE_CORE in line for line in family):
                    break
                seen.update(family)
                assert run.poll() is None, "the run ended first; its family was:\n" + "\n".join(
                    sorted(seen)
                )
                assert time.monotonic() < deadline, "the model did not start in 600 s"
                time.sleep(0.5)
            run.send_signal(signal.SIGKILL)  # the run's own process only, as kill -9 does
            run.wait(timeout=30)
        print("the run's family when it was killed:", *family, sep="\n  ")
        killed = time.monotonic()
        while left := processes_of_run(run_id):
            assert time.monotonic() < killed + 60, (
                "60 s after the run was killed, still running:\n  " + "\n  ".join(left)
            )
            time.sleep(0.5)
        print(f"all {len(family)} gone {time.monotonic() - killed:.1f} s after the kill")
    finally:
        _kill_all(processes_of_run(run_id))
        shutil.rmtree(run_tmp, ignore_errors=True)
