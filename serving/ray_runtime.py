"""Starting or joining Ray for the model service, on loopback when local.

Local Ray on these machines listens on every interface unless told otherwise: its core servers
follow ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (measured: GCS, raylet and workers then bind to
127.0.0.1). Serve replicas still open one gRPC port on all interfaces (hard-coded in Ray), which
is why the test suite runs in a loopback-only network namespace. A cluster (KubeRay) is joined
by address and keeps its own network policy.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from medvlm.settings import ServingSettings


def init_ray(
    serving: ServingSettings, *, num_cpus: int | None = None, bind_shim: Path | None = None
) -> None:
    """Join ``serving.ray_address`` or start a private local Ray bound to loopback.

    ``bind_shim`` (scripts/bind_loopback.c, built by the install scripts) is preloaded into the
    local Ray processes so that the replicas' hard-coded ``[::]:0`` gRPC port binds to ``::1``.
    """
    if ray.is_initialized():
        return
    if serving.ray_address is not None:
        ray.init(address=serving.ray_address, log_to_driver=False)
        return
    # Ray reads this at import: the processes this call spawns see the variable, and this
    # (already imported) driver gets the same value through the module constant, which
    # get_node_ip_address() consults at call time (Ray 2.60). Without both, the head publishes
    # the host's address while the shim keeps its servers on loopback, and nothing connects.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    if bind_shim is not None:
        preload = os.environ.get("LD_PRELOAD", "")
        if str(bind_shim) not in preload.split():
            os.environ["LD_PRELOAD"] = f"{bind_shim} {preload}".strip()
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
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
