"""A real local Ray start whose dashboard agent never reports: the failure of issue 9, on demand.

The raylet waits a fixed 15 s for the dashboard agent's port files and aborts ("Timed out waiting
for file .../metrics_agent_port_..."), then the driver gives up after 30 s ("The current node
timed out during startup"). On a loaded 2-core machine a slow agent does this by itself; here the
agent of the first attempt is frozen with SIGSTOP so the failure is certain. Each scenario runs
in a child interpreter: ``init_ray`` does nothing in a process whose Ray is already up (the
session's Serve fixture), and the child's Ray processes are its own to inspect.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    import psutil
    from medvlm.errors import RayStartError
    from medvlm.settings import ServingSettings
    from medvlm.telemetry import disable_third_party_telemetry
    from serving.ray_runtime import init_ray, shutdown_ray

    disable_third_party_telemetry()
    attempts, freeze = int(sys.argv[1]), int(sys.argv[2])
    frozen = []

    def freeze_agents():
        # SIGSTOP the first `freeze` dashboard agents our raylets launch: agents that never
        # write their port files, like an agent starved of CPU.
        me = psutil.Process()
        while len(frozen) < freeze:
            for child in me.children(recursive=True):
                try:
                    command = " ".join(child.cmdline())
                    is_agent = "dashboard/agent.py" in command or command.startswith(
                        "ray::DashboardAgent"
                    )
                    if is_agent and "raylet" not in command and child.pid not in frozen:
                        child.send_signal(signal.SIGSTOP)
                        frozen.append(child.pid)
                except psutil.Error:
                    continue
            time.sleep(0.05)

    threading.Thread(target=freeze_agents, daemon=True).start()
    outcome = {"frozen": frozen}
    try:
        init_ray(ServingSettings(ray_start_attempts=attempts), num_cpus=1)
        outcome["started"] = True
    except RayStartError as exc:
        outcome["error"] = str(exc)
    outcome["ray_children"] = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:  # exited (or a zombie) since listed
            continue
        if "ray" in command:
            outcome["ray_children"].append(command)
    shutdown_ray()
    print("OUTCOME " + json.dumps(outcome), flush=True)
    """
)


def run_child(*, attempts: int, freeze: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(attempts), str(freeze)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("OUTCOME ")]
    assert lines, f"child failed (exit {done.returncode}): {done.stderr[-3000:]}"
    outcome: dict[str, Any] = json.loads(lines[-1].removeprefix("OUTCOME "))
    outcome["stderr"] = done.stderr
    return outcome


def session_of(message: str) -> Path:
    """The ``logs: <dir>`` a RayStartError (or the retry warning) names."""
    return Path(message.split("logs: ", 1)[1].split(" ", 1)[0].rstrip(";"))


def assert_gone(pids: list[int]) -> None:
    """The frozen agents were ended with their start (orphaned, one would linger for minutes)."""
    for pid in pids:
        try:
            process = psutil.Process(pid)
            status = process.status()
        except psutil.NoSuchProcess:
            continue
        if status != psutil.STATUS_ZOMBIE:
            process.kill()
            pytest.fail(f"agent {pid} outlived its failed start ({status})")


def test_start_whose_agent_never_reports_fails_once_with_its_logs_and_leaves_nothing() -> None:
    outcome = run_child(attempts=1, freeze=1)
    error = outcome.get("error", "")
    assert error.startswith("local Ray did not start (1 attempt within"), outcome
    assert "The current node timed out during startup" in error
    assert "\n" not in error
    logs = session_of(error)
    raylet_log = (logs / "raylet.out").read_text()
    assert "Timed out waiting for file" in raylet_log  # the raylet's fixed 15 s port wait
    assert outcome["ray_children"] == []  # GCS, dashboard head, monitors: all stopped
    assert_gone(outcome["frozen"])


def test_start_whose_first_agent_never_reports_succeeds_on_a_second_attempt() -> None:
    outcome = run_child(attempts=2, freeze=1)
    assert outcome.get("started") is True, outcome
    warning = next(
        line for line in outcome["stderr"].splitlines() if "local Ray start 1 failed" in line
    )
    first_session = str(session_of(warning).parent)
    # Only the second attempt's processes ran when Ray was up; none of the first one's.
    assert outcome["ray_children"]
    assert not [command for command in outcome["ray_children"] if first_session in command]
    assert_gone(outcome["frozen"])
