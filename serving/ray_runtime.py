"""Starting or joining Ray for the model service, on loopback when local.

Local Ray on these machines listens on every interface unless told otherwise: its core servers
follow ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (measured: GCS, raylet and workers then bind to
127.0.0.1). Serve replicas still open one gRPC port on all interfaces (hard-coded in Ray), which
is why the test suite runs in a loopback-only network namespace. A cluster (KubeRay) is joined
by address and keeps its own network policy.
"""

from __future__ import annotations

import os

import ray

from medvlm.settings import ServingSettings


def init_ray(serving: ServingSettings, *, num_cpus: int | None = None) -> None:
    """Join ``serving.ray_address`` or start a private local Ray bound to loopback."""
    if ray.is_initialized():
        return
    if serving.ray_address is not None:
        ray.init(address=serving.ray_address, log_to_driver=False)
        return
    # Read by the Ray processes this call spawns; must be set before they start.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )


def shutdown_ray() -> None:
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
