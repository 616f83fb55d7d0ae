"""How settings become a Serve deployment, checked without starting Ray."""

from __future__ import annotations

import pytest

from medvlm.settings import MedvlmSettings
from serving.app import build_app
from serving.engine import kv_cache_fraction

pytestmark = pytest.mark.unit


def test_replica_resources_come_from_settings() -> None:
    settings = MedvlmSettings(
        serving={"num_gpus": 1, "num_cpus": 4, "num_replicas": 2, "max_ongoing_requests": 8}
    )
    deployment = build_app(settings, "/models/med-r1")._bound_deployment
    assert deployment.ray_actor_options == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert deployment.num_replicas == 2
    assert deployment.max_ongoing_requests == 8
    model_source, model_settings, on_gpu, api_key = deployment.init_args
    assert (model_source, on_gpu, api_key) == ("/models/med-r1", True, None)
    assert model_settings == settings.model


def test_cpu_settings_give_a_cpu_replica_with_a_cpu_sized_kv_cache() -> None:
    settings = MedvlmSettings()
    deployment = build_app(settings, "/tmp/tiny")._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert deployment.init_args[2] is False
    assert kv_cache_fraction(settings.model, on_gpu=False) == 0.3
    assert kv_cache_fraction(settings.model, on_gpu=True) == 0.9
    tuned = MedvlmSettings(model={"kv_cache_memory_fraction": 0.5})
    assert kv_cache_fraction(tuned.model, on_gpu=False) == 0.5


def test_api_key_reaches_the_replica_only_as_its_value() -> None:
    settings = MedvlmSettings(serving={"api_key": "token-for-test"})
    deployment = build_app(settings, "/tmp/tiny")._bound_deployment
    assert deployment.init_args[3] == "token-for-test"
