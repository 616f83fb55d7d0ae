"""Session-wide real services shared by integration tests: Ray Serve + vLLM, Prefect.

Started once per session (the model service costs a minute or two on CPU) and stopped at the
end. The tiny model and ports come from the ``settings`` fixture in tests/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from ray.serve.handle import DeploymentHandle

from medvlm.settings import MedvlmSettings
from serving.app import start_model_service
from serving.ray_runtime import shutdown_ray


@pytest.fixture(scope="session")
def serve_handle(settings: MedvlmSettings) -> Iterator[DeploymentHandle[Any]]:
    assert settings.model.source is not None
    handle = start_model_service(settings, settings.model.source, num_cpus=2)
    try:
        yield handle
    finally:
        shutdown_ray()


@pytest.fixture(scope="session")
def serve_url(settings: MedvlmSettings, serve_handle: DeploymentHandle[Any]) -> str:
    return f"http://127.0.0.1:{settings.serving.port}"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect API server (SQLite) for the session.

    Three server services are off: they only ingest events and task-run records, which here
    cost more CPU than the flows under test (measured), and nothing asserted depends on them.
    """
    from prefect.testing.utilities import prefect_test_harness

    for name in (
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED",
    ):
        os.environ.setdefault(name, "false")
    with prefect_test_harness(server_startup_timeout=180):
        yield
