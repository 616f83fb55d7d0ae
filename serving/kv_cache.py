"""Sizing vLLM's KV cache in bytes on CPU, checked before Ray starts.

On the CPU backend vLLM 0.32 reads ``gpu_memory_utilization`` as a share of the *total RAM of
one NUMA node* and subtracts its own worker's RSS (vllm/v1/worker/cpu_worker.py,
``determine_available_memory``). Machines of one kind report very different node totals (16 GiB
on one, 23 GiB on another; on VMs whose memory is hot-plugged, node 0 grows while it is used),
so a fraction that fits one machine is negative on the next. vLLM's ``kv_cache_memory_bytes``
is a plain size, which vLLM only checks against the node's available memory: that is what
this project uses on CPU. GPUs keep the fraction (``model.kv_cache_memory_fraction``).

The default is computed from the checkpoint's ``config.json``::

    bytes per token = 2 (K and V) × layers × KV heads × head dim × bytes per element
    full occupancy  = max_num_seqs × max_model_len × bytes per token

and is at least ``MIN_DEFAULT_BYTES`` so that prefix caching has room. Every attention layer
is counted (sliding-window layers too), which over-estimates models such as Gemma 3 slightly.
An explicit ``model.kv_cache_bytes`` smaller than one sequence of ``max_model_len``, or larger
than what the node can hold beside the engine, is a ``ConfigurationError`` naming the setting
and the figure that would fit — raised before Ray or vLLM start, not minutes later inside a
replica.

Reads files only (``config.json``, ``/sys`` and ``/proc`` meminfo); no network.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings, ModelSettings

log = logging.getLogger("medvlm.serving")

MiB = 1024**2
GiB = 1024**3
# Never default below this: the tiny test model needs 32 MiB at full occupancy, and a little
# more keeps vLLM's prefix cache useful. Real Med-VLMs need GiBs and are above it anyway.
MIN_DEFAULT_BYTES = 256 * MiB
# What a vLLM CPU worker holds besides weights and KV cache: torch, vLLM and its compiled
# kernels. Measured ≈ 1.1 GiB RSS after loading the tiny model (../shared notes, 2026-11-30).
ENGINE_RUNTIME_BYTES = 1536 * MiB
KV_SETTING = "MEDVLM_MODEL__KV_CACHE_BYTES"

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "fp8": 1,
    "float8_e4m3fn": 1,
}


@dataclass(frozen=True)
class KvCacheShape:
    """What one token costs in the KV cache of a decoder."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def kv_shape_from_config(config: dict[str, Any], dtype: str = "auto") -> KvCacheShape:
    """The KV shape of a Hugging Face ``config.json`` (VLMs keep it under ``text_config``).

    ``dtype`` is the engine's (``model.dtype``); ``auto`` takes the checkpoint's ``dtype``
    (``torch_dtype`` in older files), as vLLM does.
    """
    text = config.get("text_config") or config
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"config.json has no usable num_hidden_layers/num_attention_heads ({exc}); "
            f"set {KV_SETTING}"
        ) from exc
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    if dtype == "auto":
        dtype = str(text.get("dtype") or config.get("dtype") or config.get("torch_dtype") or "")
    dtype_bytes = _DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)
    return KvCacheShape(layers, kv_heads, head_dim, dtype_bytes)


def checkpoint_dir(source: str) -> Path | None:
    """The local directory of a checkpoint: ``source`` itself, or its Hugging Face cache
    snapshot for a hub id that was downloaded before. None when neither exists here."""
    local = Path(source)
    if local.is_dir():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - vLLM depends on it
        return None
    found = try_to_load_from_cache(source, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def weights_bytes(directory: Path) -> int:
    """Bytes of the weight files in a checkpoint directory (safetensors, or PyTorch bins)."""
    files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


@dataclass(frozen=True)
class NodeMemory:
    """Memory of the NUMA node vLLM's CPU worker allocates from, as vLLM computes it."""

    node: int
    total: int
    available: int


def _meminfo(path: Path, prefix: str = "") -> dict[str, int]:
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.removeprefix(prefix).split()
        if len(parts) >= 2 and parts[0].endswith(":"):
            values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return values


def _cgroup_bytes(name: str) -> int | None:
    try:
        text = Path("/sys/fs/cgroup", name).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def node_memory() -> NodeMemory:
    """Total and available memory of the NUMA node of the first CPU this process may run on.

    The same figure vLLM checks (vllm/utils/cpu_resource_utils.py, ``get_memory_node_info``):
    MemFree + Active(file) + Inactive(file) + SReclaimable of that node, clamped by a cgroup
    memory limit (containers, Kubernetes pods). Without per-node files, the whole machine.
    """
    cpu = min(os.sched_getaffinity(0))
    nodes = sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
    node = int(nodes[0].name.removeprefix("node")) if nodes else 0
    path = Path(f"/sys/devices/system/node/node{node}/meminfo")
    if path.is_file():
        info = _meminfo(path, prefix=f"Node {node} ")
        free = info["MemFree"]
    else:
        info = _meminfo(Path("/proc/meminfo"))
        free = info["MemFree"]
    total = info["MemTotal"]
    available = (
        free
        + info.get("Active(file)", 0)
        + info.get("Inactive(file)", 0)
        + info.get("SReclaimable", 0)
    )
    limit, usage = _cgroup_bytes("memory.max"), _cgroup_bytes("memory.current")
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (usage or 0)))
    return NodeMemory(node, total, available)


@dataclass(frozen=True)
class KvCachePlan:
    """The KV cache a CPU engine gets, and the figures it was judged by."""

    bytes: int
    bytes_per_token: int
    one_sequence: int
    full_occupancy: int
    explicit: bool

    def describe(self) -> str:
        how = "set" if self.explicit else "computed"
        return (
            f"KV cache {_mib(self.bytes)} ({how}; {self.bytes_per_token} bytes/token, "
            f"{_mib(self.one_sequence)} per max_model_len sequence, "
            f"{_mib(self.full_occupancy)} for max_num_seqs of them)"
        )


def _mib(value: int) -> str:
    return f"{value / MiB:.0f} MiB"


def _round_up(value: int, unit: int = 64 * MiB) -> int:
    return -(-value // unit) * unit


def plan_kv_cache(
    model: ModelSettings,
    config: dict[str, Any],
    *,
    memory: NodeMemory | None,
    weights: int = 0,
) -> KvCachePlan:
    """The CPU KV cache size for ``model`` with this checkpoint ``config``.

    ``memory`` is the node the engine will run on (None: not known here, e.g. the replicas run
    on another node of a cluster; then only the lower bound is checked). ``weights`` are the
    checkpoint's weight bytes, which the engine holds beside the cache.
    """
    shape = kv_shape_from_config(config, model.dtype)
    per_token = shape.bytes_per_token
    one = per_token * model.max_model_len
    full = one * model.max_num_seqs
    explicit = model.kv_cache_bytes is not None
    size = (
        int(model.kv_cache_bytes)
        if model.kv_cache_bytes is not None
        else max(_round_up(full), MIN_DEFAULT_BYTES)
    )
    if size < one:
        raise ConfigurationError(
            f"{KV_SETTING}={size} ({_mib(size)}) cannot hold one sequence of "
            f"max_model_len={model.max_model_len} ({per_token} bytes/token = {_mib(one)}); "
            f"set it to at least {one}, or {_round_up(full)} for max_num_seqs="
            f"{model.max_num_seqs} ({_mib(full)})"
        )
    if memory is not None:
        fits = memory.available - weights - ENGINE_RUNTIME_BYTES
        if size > fits:
            what = f"{KV_SETTING}={size}" if explicit else f"the computed KV cache ({size} bytes)"
            advice = (
                f"at most {max(fits, 0)} bytes ({_mib(max(fits, 0))}) would fit"
                if fits >= one
                else f"not even one sequence ({_mib(one)}) fits: free memory or lower "
                "MEDVLM_MODEL__MAX_MODEL_LEN"
            )
            raise ConfigurationError(
                f"{what} ({_mib(size)}) does not fit: NUMA node {memory.node} has "
                f"{_mib(memory.available)} available of {_mib(memory.total)}, and the engine "
                f"needs about {_mib(weights + ENGINE_RUNTIME_BYTES)} beside it (weights "
                f"{_mib(weights)} + runtime {_mib(ENGINE_RUNTIME_BYTES)}); {advice}"
            )
    return KvCachePlan(size, per_token, one, full, explicit)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}; set {KV_SETTING}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path} is not a JSON object; set {KV_SETTING}")
    return data


def cpu_kv_cache(model: ModelSettings, source: str, *, local_node: bool) -> KvCachePlan:
    """Plan the CPU KV cache for the checkpoint at ``source``.

    ``local_node``: the engine will run on this machine (local Ray), so its memory is checked.
    """
    if model.kv_cache_memory_fraction is not None and model.kv_cache_bytes is None:
        raise ConfigurationError(
            "MEDVLM_MODEL__KV_CACHE_MEMORY_FRACTION applies to GPUs only: on CPU vLLM reads it "
            f"as a share of one NUMA node's RAM, which differs between machines; set {KV_SETTING}"
        )
    directory = checkpoint_dir(source)
    if directory is None:
        if model.kv_cache_bytes is None:
            raise ConfigurationError(
                f"cannot size the KV cache: no config.json for {source!r} on this machine; "
                f"set {KV_SETTING}"
            )
        return KvCachePlan(int(model.kv_cache_bytes), 0, 0, 0, explicit=True)
    return plan_kv_cache(
        model,
        read_config(directory),
        memory=node_memory() if local_node else None,
        weights=weights_bytes(directory),
    )


def with_kv_cache(settings: MedvlmSettings, model_source: str) -> MedvlmSettings:
    """``settings`` with the CPU KV cache size decided now, on this machine (local Ray only).

    Raises ``ConfigurationError`` (naming the setting and the size that would fit) before any
    process starts. GPUs and joined clusters are left alone: their replicas size the cache.
    """
    serving = settings.serving
    if serving.num_gpus > 0 or serving.ray_address is not None:
        return settings
    plan = cpu_kv_cache(settings.model, model_source, local_node=True)
    log.info("%s", plan.describe())
    model = settings.model.model_copy(update={"kv_cache_bytes": plan.bytes})
    return settings.model_copy(update={"model": model})
