"""A run killed with SIGKILL leaves Prefect's temporary API server behind; it is found and ended.

A real Prefect temporary server, started the way ``medvlm run`` starts it (Prefect's own
``SubprocessASGIServer``), by a process that is then killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medvlm.orphans import orphaned_prefect_servers, stop_orphaned_prefect_servers

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
