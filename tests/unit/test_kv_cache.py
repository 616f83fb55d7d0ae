"""The CPU KV cache is sized in bytes from the checkpoint, and bad sizes fail before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medvlm.errors import ConfigurationError
from medvlm.settings import ModelSettings
from serving.kv_cache import (
    ENGINE_RUNTIME_BYTES,
    MIN_DEFAULT_BYTES,
    MiB,
    NodeMemory,
    cpu_kv_cache,
    kv_shape_from_config,
    node_memory,
    plan_kv_cache,
)

pytestmark = pytest.mark.unit

# Published config.json values (text part) of the model families in view.
QWEN2_VL_7B: dict[str, Any] = {  # Qwen/Qwen2-VL-7B-Instruct (Med-R1's base): fields at the top
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_size": 3584,
    "torch_dtype": "bfloat16",
}
MEDGEMMA_4B: dict[str, Any] = {  # google/medgemma-4b-it (Gemma 3): explicit head_dim
    "text_config": {
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_size": 2560,
    },
    "torch_dtype": "bfloat16",
}


def test_bytes_per_token_follow_the_published_configs() -> None:
    # 2 (K, V) × layers × KV heads × head dim × 2 bytes (bfloat16)
    assert kv_shape_from_config(QWEN2_VL_7B).bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert kv_shape_from_config(MEDGEMMA_4B).bytes_per_token == 2 * 34 * 4 * 256 * 2
    assert kv_shape_from_config(QWEN2_VL_7B, "float32").bytes_per_token == 2 * 28 * 4 * 128 * 4


def test_the_tiny_checkpoint_gets_the_minimum_default(tiny_model_dir: Path) -> None:
    plan = cpu_kv_cache(ModelSettings(max_model_len=4096), str(tiny_model_dir), local_node=False)
    # 2 layers × 1 KV head × head dim 64 × bfloat16: 512 bytes a token.
    assert plan.bytes_per_token == 512
    assert plan.one_sequence == 512 * 4096
    assert plan.full_occupancy == 16 * 512 * 4096  # max_num_seqs 16: 32 MiB
    assert plan.bytes == MIN_DEFAULT_BYTES and not plan.explicit


def test_a_real_model_default_covers_every_sequence_at_full_length() -> None:
    model = ModelSettings(max_model_len=8192, max_num_seqs=8)
    plan = plan_kv_cache(model, QWEN2_VL_7B, memory=None)
    assert plan.bytes >= 8 * 8192 * 57344
    assert plan.bytes % (64 * MiB) == 0


def test_too_small_a_size_names_the_setting_and_the_minimum() -> None:
    model = ModelSettings(max_model_len=8192, kv_cache_bytes=64 * MiB)
    with pytest.raises(ConfigurationError) as caught:
        plan_kv_cache(model, QWEN2_VL_7B, memory=None)
    message = str(caught.value)
    assert "MEDVLM_MODEL__KV_CACHE_BYTES=67108864" in message
    assert f"at least {8192 * 57344}" in message


def test_too_large_a_size_names_the_figure_that_would_fit() -> None:
    memory = NodeMemory(node=0, total=16 * 1024 * MiB, available=4096 * MiB)
    model = ModelSettings(max_model_len=4096, kv_cache_bytes=8192 * MiB)
    with pytest.raises(ConfigurationError) as caught:
        plan_kv_cache(model, QWEN2_VL_7B, memory=memory, weights=1024 * MiB)
    fits = 4096 * MiB - 1024 * MiB - ENGINE_RUNTIME_BYTES
    assert f"at most {fits} bytes" in str(caught.value)
    assert "NUMA node 0" in str(caught.value)


def test_a_node_too_full_for_one_sequence_says_so() -> None:
    memory = NodeMemory(node=1, total=4096 * MiB, available=1600 * MiB)
    with pytest.raises(ConfigurationError, match="not even one sequence"):
        plan_kv_cache(ModelSettings(), QWEN2_VL_7B, memory=memory)


def test_an_explicit_size_that_fits_is_used_as_given() -> None:
    memory = NodeMemory(node=0, total=64 * 1024 * MiB, available=32 * 1024 * MiB)
    model = ModelSettings(max_model_len=4096, kv_cache_bytes="2GiB")
    plan = plan_kv_cache(model, QWEN2_VL_7B, memory=memory)
    assert plan.bytes == 2 * 1024 * MiB and plan.explicit


def test_a_hub_id_without_a_local_config_needs_the_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"no config\.json"):
        cpu_kv_cache(ModelSettings(), "some-org/not-downloaded-model", local_node=False)
    given = ModelSettings(kv_cache_bytes="1GiB")
    assert cpu_kv_cache(given, "some-org/not-downloaded-model", local_node=False).bytes == 1024**3


def test_an_unreadable_config_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(ConfigurationError, match="num_hidden_layers"):
        cpu_kv_cache(ModelSettings(), str(tmp_path), local_node=False)


def test_node_memory_agrees_with_what_vllm_checks() -> None:
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    ours = node_memory()
    theirs = get_memory_node_info(ours.node)
    # The readings are moments apart and memory moves while the machine works (on VMs with
    # hot-plugged memory even the node's total grows): the same formula gives close figures.
    assert abs(ours.total - theirs.total_memory) <= max(256 * MiB, theirs.total_memory // 10)
    assert abs(ours.available - theirs.available_memory) < 256 * MiB
