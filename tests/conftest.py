"""Shared test configuration.

Tiers: ``unit`` (pure logic, real sample DICOM), ``integration`` (real Orthanc, FHIR server,
Ray Serve, vLLM; servers started once per session by fixtures). Run the fast tier alone with
``-m unit``. The whole suite is meant to run inside a loopback-only network namespace
(scripts/test.sh); nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing may reach a model hub; vLLM must pick its CPU backend beside a CUDA-built torch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

pytest_plugins = ["tests.integration.conftest_servers"]

from medvlm.settings import MedvlmSettings  # noqa: E402
from medvlm.telemetry import disable_third_party_telemetry  # noqa: E402

disable_third_party_telemetry()


@pytest.fixture(scope="session")
def medvlm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project home for the session; the tiny model is built once per machine and shared."""
    return tmp_path_factory.mktemp("medvlm-home")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Qwen2-VL checkpoint, built once into a cache shared across sessions."""
    from serving.tiny_model import build_tiny_checkpoint

    cache = Path(os.environ.get("MEDVLM_TEST_MODEL_CACHE", Path.home() / ".cache" / "medvlm-test"))
    return build_tiny_checkpoint(cache / "tiny-qwen2_vl", architecture="qwen2_vl", seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def settings(medvlm_home: Path, tiny_model_dir: Path) -> Iterator[MedvlmSettings]:
    yield MedvlmSettings(
        home=medvlm_home,
        # The KV cache is sized in bytes from the checkpoint (serving/kv_cache.py), as in the
        # demo: the same on every machine, whatever its NUMA layout or free memory.
        model={"source": str(tiny_model_dir), "max_model_len": 4096, "allow_random_weights": True},
        serving={"port": free_port(), "api_key": "test-token-not-a-secret"},
    )
