"""Starting Ray: a failed start becomes one clear error, is stopped, and is retried in budget.

No Ray is started here: ``start_ray`` gets a stand-in for ``ray.init`` and for the snapshot of
what an attempt spawned (tests/integration/test_ray_runtime.py covers a real failed start).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from medvlm.errors import EngineUnavailableError, RayStartError
from medvlm.settings import ServingSettings
from serving.ray_runtime import StartAttempt, _prepare_local_ray, start_ray

pytestmark = pytest.mark.unit

RAY_NODE_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)
SESSION_LOGS = Path("/tmp/ray/session_2026-12-01_00-00-00_000000_1/logs")


class Attempts:
    """Stands in for the watch on Ray's processes: counts attempts begun, stopped and closed."""

    def __init__(self, logs: Path | None = SESSION_LOGS) -> None:
        self.logs = logs
        self.begun = 0
        self.stopped = 0
        self.closed = 0

    def __call__(self) -> StartAttempt:
        self.begun += 1
        return self

    def log_dir(self) -> Path | None:
        return self.logs

    def stop(self) -> None:
        self.stopped += 1

    def close(self) -> None:
        self.closed += 1


def failing(*errors: BaseException) -> Callable[[], object]:
    """A ``ray.init`` stand-in raising the given errors in turn, then succeeding."""
    pending = list(errors)

    def init() -> object:
        if pending:
            raise pending.pop(0)
        return None

    return init


class Clock:
    """A monotonic clock that advances ``step_s`` on every reading."""

    def __init__(self, step_s: float) -> None:
        self.now = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_timed_out_local_start_becomes_one_line_error_naming_logs_and_remedy() -> None:
    attempts = Attempts()
    serving = ServingSettings(ray_start_attempts=1)
    with pytest.raises(RayStartError) as caught:
        start_ray(failing(Exception(RAY_NODE_TIMEOUT)), serving, begin_attempt=attempts)
    message = str(caught.value)
    assert isinstance(caught.value, EngineUnavailableError)
    assert "\n" not in message
    assert message.startswith("local Ray did not start (1 attempt")
    assert "The current node timed out during startup" in message
    assert str(SESSION_LOGS) in message
    assert "MEDVLM_SERVING__RAY_START_TIMEOUT_S" in message
    assert str(caught.value.__cause__) == RAY_NODE_TIMEOUT
    assert attempts.stopped == 1


def test_failed_local_start_is_stopped_and_tried_again_within_budget() -> None:
    attempts = Attempts()
    start_ray(
        failing(Exception(RAY_NODE_TIMEOUT)),
        ServingSettings(ray_start_timeout_s=180, ray_start_attempts=3),
        begin_attempt=attempts,
        clock=Clock(step_s=1.0),
    )
    assert (attempts.begun, attempts.stopped, attempts.closed) == (2, 1, 2)


def test_every_attempt_failing_reports_how_many_were_made() -> None:
    attempts = Attempts()
    errors = [Exception(RAY_NODE_TIMEOUT) for _ in range(3)]
    with pytest.raises(RayStartError, match=r"\(3 attempts within"):
        start_ray(
            failing(*errors),
            ServingSettings(ray_start_timeout_s=180, ray_start_attempts=3),
            begin_attempt=attempts,
            clock=Clock(step_s=1.0),
        )
    assert (attempts.begun, attempts.stopped, attempts.closed) == (3, 3, 3)


def test_no_attempt_begins_with_less_budget_left_than_rays_registration_window() -> None:
    attempts = Attempts()
    # Each clock reading moves 160 s: the deadline is 160 + 180 = 340, the failure is seen at
    # 320, and 20 s is less than the 30 s Ray itself waits for its raylet.
    with pytest.raises(RayStartError, match=r"\(1 attempt within"):
        start_ray(
            failing(Exception(RAY_NODE_TIMEOUT), Exception(RAY_NODE_TIMEOUT)),
            ServingSettings(ray_start_timeout_s=180, ray_start_attempts=3),
            begin_attempt=attempts,
            clock=Clock(step_s=160.0),
        )
    assert attempts.begun == 1


def test_invalid_arguments_to_ray_are_not_retried() -> None:
    attempts = Attempts(logs=None)
    with pytest.raises(RayStartError, match="no Ray session was created") as caught:
        start_ray(
            failing(ValueError("num_cpus must be positive")),
            ServingSettings(ray_start_attempts=3),
            begin_attempt=attempts,
        )
    assert isinstance(caught.value.__cause__, ValueError)
    assert attempts.begun == 1


def test_joining_a_cluster_fails_once_with_an_address_hint() -> None:
    attempts = Attempts(logs=None)
    serving = ServingSettings(ray_address="ray://127.0.0.1:10001", ray_start_attempts=3)
    with pytest.raises(RayStartError) as caught:
        start_ray(
            failing(ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:10001")),
            serving,
            begin_attempt=attempts,
        )
    message = str(caught.value)
    assert message.startswith("could not join the Ray cluster at ray://127.0.0.1:10001")
    assert "reachable" in message and "MEDVLM_SERVING__RAY_ADDRESS" in message
    assert "\n" not in message
    assert (attempts.begun, attempts.stopped) == (1, 1)


def test_interrupted_start_is_stopped_and_not_translated() -> None:
    attempts = Attempts()
    with pytest.raises(KeyboardInterrupt):
        start_ray(failing(KeyboardInterrupt()), ServingSettings(), begin_attempt=attempts)
    assert (attempts.stopped, attempts.closed) == (1, 1)


def test_multi_line_ray_error_is_cut_to_its_first_line() -> None:
    error = Exception("\nFailed to start the dashboard\n  File dashboard.py, line 1\n")
    with pytest.raises(RayStartError) as caught:
        start_ray(failing(error), ServingSettings(ray_start_attempts=1), begin_attempt=Attempts())
    assert "\n" not in str(caught.value)
    assert ": Failed to start the dashboard;" in str(caught.value)


def test_ray_start_error_survives_pickling() -> None:
    error = RayStartError("local Ray did not start")
    assert str(pickle.loads(pickle.dumps(error))) == "local Ray did not start"


def test_start_budget_shorter_than_rays_own_window_is_rejected() -> None:
    with pytest.raises(ValidationError, match="ray_start_timeout_s"):
        ServingSettings(ray_start_timeout_s=10)


def test_start_settings_reach_the_local_ray_processes_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray._private import ray_constants

    names = (
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "RAY_gcs_server_port_wait_time_s",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S",
        "RAY_worker_niceness",
    )
    for name in names:  # restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setattr(
        ray_constants,
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S",
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S,
    )
    _prepare_local_ray(ServingSettings(ray_start_timeout_s=240, ray_worker_niceness=0), None)
    environment = {name: os.environ[name] for name in names}
    assert environment == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_gcs_server_port_wait_time_s": "240",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240",
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "80.0",  # Serve restarts after 3 misses
        "RAY_worker_niceness": "0",
    }
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 240
    assert ray_constants.ENABLE_RAY_CLUSTER is False
