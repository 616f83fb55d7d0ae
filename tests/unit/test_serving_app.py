"""How settings become a Serve deployment and vLLM engine arguments, without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings, ServingSettings
from serving.app import deployment_options, replica_spec
from serving.engine import kv_cache_args
from serving.kv_cache import MIN_DEFAULT_BYTES, with_kv_cache

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


def test_max_replicas_turns_num_replicas_into_an_autoscaling_config() -> None:
    settings = MedvlmSettings(
        serving={
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 4,
            "upscale_delay_s": 5,
            "downscale_delay_s": 20,
            "look_back_period_s": 15,
            "max_ongoing_requests": 8,
        }
    )
    options = replica_spec(settings, "/models/med-r1").options
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 20.0,
        "look_back_period_s": 15.0,
    }
    assert options["max_ongoing_requests"] == 8


def test_autoscaling_leaves_unset_tuning_to_serve_and_starts_one_replica() -> None:
    options = deployment_options(ServingSettings(max_replicas=2))
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2}
    # Serve's own schema accepts what the settings produce, defaults filled in by Serve.
    config = AutoscalingConfig(**options["autoscaling_config"])
    assert (config.min_replicas, config.max_replicas) == (1, 2)


def test_without_max_replicas_the_deployment_has_a_fixed_replica_count() -> None:
    assert deployment_options(ServingSettings())["num_replicas"] == 1
    fixed = deployment_options(ServingSettings(num_replicas=3))
    assert fixed["num_replicas"] == 3
    assert "autoscaling_config" not in fixed and "max_replicas_per_node" not in fixed


def test_max_replicas_per_node_reaches_the_deployment_options() -> None:
    options = deployment_options(ServingSettings(num_replicas=2, max_replicas_per_node=1))
    assert options["max_replicas_per_node"] == 1
    scaled = deployment_options(ServingSettings(max_replicas=4, max_replicas_per_node=2))
    assert scaled["max_replicas_per_node"] == 2


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"num_replicas": 2, "max_replicas": 3}, "num_replicas and max_replicas exclude"),
        ({"min_replicas": 3, "max_replicas": 2}, r"min_replicas \(3\) exceeds max_replicas \(2\)"),
        ({"min_replicas": 1}, "min_replicas only apply with autoscaling: set max_replicas"),
        ({"upscale_delay_s": 1, "downscale_delay_s": 2}, "upscale_delay_s, downscale_delay_s"),
        ({"look_back_period_s": 15}, "look_back_period_s only apply with autoscaling"),
        ({"max_replicas": 2, "look_back_period_s": 5}, "greater than 10"),
        (
            {"max_replicas": 2, "target_ongoing_requests": 20, "max_ongoing_requests": 4},
            r"target_ongoing_requests \(20\) exceeds max_ongoing_requests \(4\)",
        ),
        ({"max_replicas_per_node": 0}, "greater than or equal to 1"),
    ],
)
def test_inconsistent_replica_settings_fail_at_load(
    serving: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        MedvlmSettings(serving=serving)


def test_replica_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDVLM_SERVING__MAX_REPLICAS", "4")
    monkeypatch.setenv("MEDVLM_SERVING__MIN_REPLICAS", "0")
    monkeypatch.setenv("MEDVLM_SERVING__MAX_REPLICAS_PER_NODE", "1")
    serving = MedvlmSettings().serving
    assert serving.autoscaling and serving.replicas_at_most == 4
    assert deployment_options(serving)["autoscaling_config"]["min_replicas"] == 0
