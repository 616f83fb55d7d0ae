"""How settings become a Serve deployment and vLLM engine arguments, without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings
from serving.app import replica_spec, with_kv_cache
from serving.engine import kv_cache_args
from serving.kv_cache import MIN_DEFAULT_BYTES

pytestmark = pytest.mark.unit


def test_replica_resources_come_from_settings() -> None:
    settings = MedvlmSettings(
        serving={"num_gpus": 1, "num_cpus": 4, "num_replicas": 2, "max_ongoing_requests": 8}
    )
    spec = replica_spec(settings, "/models/med-r1")
    assert spec.options == {
        "num_replicas": 2,
        "max_ongoing_requests": 8,
        "ray_actor_options": {"num_cpus": 4.0, "num_gpus": 1.0},
    }
    assert (spec.model_source, spec.on_gpu, spec.api_key) == ("/models/med-r1", True, None)
    assert spec.model_settings == settings.model


def test_gpu_replicas_keep_the_memory_fraction() -> None:
    settings = MedvlmSettings(serving={"num_gpus": 1})
    assert kv_cache_args(settings.model, "/models/med-r1", on_gpu=True) == {
        "gpu_memory_utilization": 0.9,
        "kv_cache_memory_bytes": None,
    }
    tuned = MedvlmSettings(model={"kv_cache_memory_fraction": 0.5})
    assert kv_cache_args(tuned.model, "/m", on_gpu=True)["gpu_memory_utilization"] == 0.5


def test_cpu_replicas_get_a_kv_cache_in_bytes_never_a_fraction(tmp_path: Path) -> None:
    settings = MedvlmSettings(model={"kv_cache_bytes": "300MiB"})
    assert kv_cache_args(settings.model, str(tmp_path), on_gpu=False) == {
        "kv_cache_memory_bytes": 300 * 1024**2
    }
    spec = replica_spec(MedvlmSettings(), "/tmp/tiny")
    assert spec.on_gpu is False and spec.options["ray_actor_options"]["num_gpus"] == 0


def test_local_cpu_service_decides_the_kv_cache_size_before_ray_starts(
    tiny_model_dir: Path,
) -> None:
    settings = with_kv_cache(MedvlmSettings(), str(tiny_model_dir))
    assert settings.model.kv_cache_bytes == MIN_DEFAULT_BYTES
    # A joined cluster's replicas size their own cache on their own node.
    remote = MedvlmSettings(serving={"ray_address": "ray://head:10001"})
    assert with_kv_cache(remote, "/not/here").model.kv_cache_bytes is None


def test_a_fraction_on_cpu_is_refused_with_the_setting_to_use(tiny_model_dir: Path) -> None:
    settings = MedvlmSettings(model={"kv_cache_memory_fraction": 0.3})
    with pytest.raises(ConfigurationError, match="MEDVLM_MODEL__KV_CACHE_BYTES"):
        with_kv_cache(settings, str(tiny_model_dir))


def test_api_key_reaches_the_replica_only_as_its_value() -> None:
    settings = MedvlmSettings(serving={"api_key": "token-for-test"})
    assert replica_spec(settings, "/tmp/tiny").api_key == "token-for-test"
