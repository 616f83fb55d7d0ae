"""Shared test configuration.

Tiers: ``unit`` (pure logic, real sample DICOM; no server, engine or type checker), ``lint``
(ruff and mypy --strict), ``integration`` (real Orthanc, FHIR server, Ray Serve, vLLM, Prefect;
servers started once per session by fixtures). Run the fast tier alone with ``-m unit``;
``pytest_runtest_setup`` below fails a ``unit`` test that asks for a server fixture. The whole
suite is meant to run inside a loopback-only network namespace (scripts/test.sh); nothing here
talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing may reach a model hub; vLLM must pick its CPU backend beside a CUDA-built torch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

pytest_plugins = ["tests.integration.conftest_servers", "pytester"]

from medvlm.settings import MedvlmSettings  # noqa: E402
from medvlm.telemetry import disable_third_party_telemetry  # noqa: E402

disable_third_party_telemetry()

# Fixtures that start a server or an engine (tests/integration/conftest*.py): no unit test may
# use one, directly or through another fixture.
SERVER_FIXTURES = frozenset(
    {
        "serve_handle",
        "serve_url",
        "dev_servers",
        "orthanc",
        "fhir_base_url",
        "prefect_api",
        "prefect_server",
        "postgres",
    }
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--load-model",
        choices=("stand-in", "tiny"),
        default="stand-in",
        help=(
            "the model of tests/integration/test_load.py: a loopback stand-in (CI: 2,000 tiny-"
            "model drafts take ~50 min on 2 cores) or the session's tiny model on Ray Serve"
        ),
    )
    parser.addoption(
        "--load-sizes",
        default="500,2000",
        metavar="SMALL,LARGE",
        help="the two batch sizes of tests/integration/test_load.py (default 500,2000)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a ``unit`` test that needs a server before any of its fixtures start one."""
    if item.get_closest_marker("unit") is None:
        return
    servers = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if servers:
        pytest.fail(
            f"a unit test starts no server, but this one uses {', '.join(sorted(servers))}: "
            "mark it integration",
            pytrace=False,
        )
    if item.get_closest_marker("lint") is not None:
        pytest.fail("a test is unit or lint, not both: -m unit runs no type checker", pytrace=False)


# Warnings are errors (pyproject), so a ResourceWarning from a finalizer (an unclosed socket,
# file, event loop, ZMQ context) is an error in whichever test runs when the cyclic collector
# happens to fire. Collecting after every test pins it on the test whose garbage it was. A full
# collection walks ~1M objects once torch and vLLM are imported (~0.5 s); gc.freeze() moves the
# survivors out of the collector's sight, so the next collection walks only what one test made.


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_the_garbage_of_each_test() -> Iterator[None]:
    """Torn down after the test's other fixtures; pytest then reports what finalizers raised."""
    yield
    gc.collect()
    gc.freeze()


def pytest_fixture_post_finalizer(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> None:
    """What a module- or session-scoped fixture held was frozen: unfreeze and collect it now."""
    if fixturedef.scope != "function":
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def pytest_sessionfinish(session: pytest.Session) -> None:
    gc.unfreeze()  # pytest's last collection sees everything


@pytest.fixture(scope="session")
def medvlm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project home for the session; the tiny model is built once per machine and shared."""
    return tmp_path_factory.mktemp("medvlm-home")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Qwen2-VL checkpoint, built once into a cache shared across sessions."""
    from medvlm.dev.tiny_model import build_tiny_checkpoint

    cache = Path(os.environ.get("MEDVLM_TEST_MODEL_CACHE", Path.home() / ".cache" / "medvlm-test"))
    return build_tiny_checkpoint(cache / "tiny-qwen2_vl", architecture="qwen2_vl", seed=0)


def processes_of_run(run_id: str) -> list[str]:
    """Processes still alive that inherited ``MEDVLM_TEST_RUN_ID=run_id`` (a run's family: its
    Ray, the Serve replica, the replica's vLLM engine core), as ``pid command line`` lines (the
    titles Ray and vLLM give their processes, e.g. ``VLLM::EngineCore``; cut at 100)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("MEDVLM_TEST_RUN_ID") == run_id:
                found.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
        except psutil.Error:  # exited meanwhile, or not ours to inspect
            continue
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dimse_pacs_settings(orthanc: Any, dev_servers: Any, **extra: Any) -> Any:
    """PacsSettings for the dev Orthanc over DIMSE (our storage SCP for C-MOVE), short timeouts."""
    from medvlm.settings import PacsSettings

    dev = dev_servers.settings
    return PacsSettings.model_validate(
        {
            "kind": "dimse",
            "dimse_host": orthanc.dicom_host,
            "dimse_port": orthanc.dicom_port,
            "called_aet": orthanc.aet,
            "calling_aet": dev.scp_aet,
            "scp_aet": dev.scp_aet,
            "scp_host": "127.0.0.1",
            "scp_port": dev.scp_port,
            "dimse_timeout_s": 20,
            "retry_attempts": 2,
        }
        | extra
    )


@pytest.fixture(scope="session")
def settings(medvlm_home: Path, tiny_model_dir: Path) -> Iterator[MedvlmSettings]:
    yield MedvlmSettings(
        home=medvlm_home,
        # The KV cache is sized in bytes from the checkpoint (serving/kv_cache.py), as in the
        # demo: the same on every machine, whatever its NUMA layout or free memory.
        model={"source": str(tiny_model_dir), "max_model_len": 4096, "allow_random_weights": True},
        serving={"port": free_port(), "api_key": "test-token-not-a-secret"},
    )
