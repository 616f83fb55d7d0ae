"""The Serve app on a real three-node Ray cluster: replicas spread over nodes, a node lost
mid-batch, autoscaling from one replica to two under queued drafts and back when idle.

The cluster (tests/integration/ray_cluster.py) is a head and two workers from `ray start`, one
logical CPU each, each in a network namespace of its own on a private subnet (on 127.0.0.1
where namespaces cannot be made); a replica asks for half a CPU and `max_replicas_per_node` 1
spreads them. The app is deployed the production way: a child process on the head joins the
cluster by address (``MEDVLM_SERVING__RAY_ADDRESS``) and runs it; studies are then drafted over
HTTP through the head's Serve proxy, by `medvlm run` in a process of its own (a folder PACS and
EHR, ``MEDVLM_JOB__MODEL_ENDPOINT=http``, as a Prefect worker runs it) or by the project's
``HttpDrafter``. Serve runs its proxy on the head only (``proxy_location`` HeadOnly).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from medvlm.dev.demo import sample_model_input
from medvlm.settings import HttpEdgeSettings, MedvlmSettings
from pipeline.prompts import ModelInput
from pipeline.report import DraftResult, report_json_schema
from serving.app import DEPLOYMENT_NAME
from serving.clients import HttpDrafter
from tests.integration.folder_site import (
    build_folder_site,
    folder_site_env,
    orders,
    preliminary_drafts_per_order,
)
from tests.integration.ray_cluster import RayCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = "medvlm"
API_KEY = "cluster-test-token-not-a-secret"
WORKERS = ["w1", "w2"]
# A replica (a Serve actor and its vLLM engine core) took 80 s to start here, and over 4 minutes
# while another vLLM shared the 2 cores.
REPLICA_START_S = 360.0
# Studies in the batch that loses a node, and their date.
BATCH = 10
STUDY_DAY = dt.date(2026, 11, 3)
# Idle seconds before autoscaling removes a replica: longer than a replica takes to start on
# an idle machine here (42-80 s measured), shorter than the test wants to wait.
DOWNSCALE_DELAY_S = 150

DEPLOY = textwrap.dedent(
    """
    import ray
    from medvlm.settings import MedvlmSettings
    from medvlm.telemetry import disable_third_party_telemetry
    from serving.app import run_app
    from serving.ray_runtime import init_ray

    disable_third_party_telemetry()
    settings = MedvlmSettings()
    init_ray(settings.serving)  # joins MEDVLM_SERVING__RAY_ADDRESS
    try:
        run_app(settings, settings.model.source)  # returns once the replicas are running
    finally:
        ray.shutdown()  # only this driver leaves: Serve's controller keeps the app running
    print("DEPLOYED", flush=True)
    """
)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, settings: MedvlmSettings
) -> Iterator[RayCluster]:
    started = time.monotonic()
    ray_cluster = RayCluster(tmp_path_factory.mktemp("rc"), bind_shim=settings.bind_shim)
    try:
        ray_cluster.start(WORKERS)
        print(f"three-node cluster up in {time.monotonic() - started:.1f} s")
        yield ray_cluster
    finally:
        ray_cluster.stop()
        left = ray_cluster.leftovers()
        assert left == [], f"processes of the test cluster outlived it: {left}"


@pytest.fixture()
def all_nodes(cluster: RayCluster) -> RayCluster:
    """Every worker alive (a test before may have killed one)."""
    alive = cluster.alive_nodes()
    for name in WORKERS:
        if name not in alive:
            cluster.start_worker(name)
    cluster.wait_for_nodes({"head", *WORKERS}, timeout_s=120)
    return cluster


def deploy(cluster: RayCluster, settings: MedvlmSettings, **serving: str) -> str:
    """Run the app on the cluster from a child joining by address; returns Serve's HTTP URL.

    Serve's proxy keeps the port of its first start (a later ``serve.start`` with other HTTP
    options is ignored), so every deployment on one cluster uses the cluster's port.
    """
    port = cluster.serve_port
    env = {
        **os.environ,
        **cluster.auth_env,
        "MEDVLM_HOME": str(settings.home),
        "MEDVLM_MODEL__SOURCE": str(settings.model.source),
        "MEDVLM_MODEL__MAX_MODEL_LEN": "4096",
        "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",
        "MEDVLM_MODEL__MAX_NUM_SEQS": "2",
        "MEDVLM_MODEL__KV_CACHE_BYTES": "64MiB",  # the tiny model needs 32 MiB when full
        "MEDVLM_SERVING__RAY_ADDRESS": cluster.address,
        "MEDVLM_SERVING__HOST": cluster.ip("head"),
        "MEDVLM_SERVING__PORT": str(port),
        "MEDVLM_SERVING__API_KEY": API_KEY,
        "MEDVLM_SERVING__PROXY_LOCATION": "HeadOnly",
        "MEDVLM_SERVING__NUM_CPUS": "0.5",
        "MEDVLM_SERVING__MAX_ONGOING_REQUESTS": "2",
        "MEDVLM_SERVING__MAX_REPLICAS_PER_NODE": "1",
    }
    env.update({f"MEDVLM_SERVING__{name.upper()}": value for name, value in serving.items()})
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # see RayCluster: it joins many nodes
    env = cluster.node_env(env)
    started = time.monotonic()
    done = subprocess.run(
        cluster.command_on("head", [sys.executable, "-c", DEPLOY]),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2 * REPLICA_START_S,
        check=False,
    )
    assert "DEPLOYED" in done.stdout, f"deploy failed ({done.returncode}): {done.stderr[-4000:]}"
    print(f"deployed {serving} in {time.monotonic() - started:.1f} s")
    return cluster.serve_url


@functools.cache
def chest() -> ModelInput:
    return sample_model_input()


def studies(count: int, prefix: str) -> list[ModelInput]:
    return [chest().model_copy(update={"reference": f"{prefix}-{i}"}) for i in range(count)]


def drafter(url: str, client: httpx.AsyncClient) -> HttpDrafter:
    # Retries at the I/O edge ride out a lost replica: Serve answers 500/503 for a request
    # whose replica died, and routes the retry to a live one.
    edge = HttpEdgeSettings(
        retry_attempts=8, retry_initial_backoff_s=1.0, retry_max_backoff_s=10.0, read_timeout_s=120
    )
    return HttpDrafter(client, url, api_key=API_KEY, edge=edge)


def wait_for(
    condition: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 1.0
) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.monotonic() - started


def assert_valid(results: list[DraftResult], inputs: list[ModelInput]) -> None:
    assert sorted(r.reference for r in results) == sorted(i.reference for i in inputs)
    for result in results:
        jsonschema.validate(result.report.model_dump(mode="json"), report_json_schema())


def _drafts_written(site: Path) -> int:
    path = site / "ehr" / "DiagnosticReport.ndjson"
    return sum(preliminary_drafts_per_order(site).values()) if path.exists() else 0


def test_replicas_spread_over_nodes_and_a_lost_node_loses_no_draft(
    all_nodes: RayCluster, settings: MedvlmSettings, tmp_path: Path, prefect_api: None
) -> None:
    """`medvlm run` in a process of its own drafts a batch through the cluster's Serve proxy
    (``MEDVLM_JOB__MODEL_ENDPOINT=http``) into a folder EHR; a node with a replica is killed
    once the first drafts are written. Every order gets exactly one draft, in the same run."""
    from prefect.settings import PREFECT_API_URL

    cluster = all_nodes
    url = deploy(cluster, settings, num_replicas="2")
    placed = cluster.running_replica_nodes(APP, DEPLOYMENT_NAME)
    assert len(placed) == 2 and len(set(placed)) == 2, placed  # max_replicas_per_node 1
    victim = next(name for name in placed if name != "head")
    site = tmp_path / "site"
    build_folder_site(site, BATCH, STUDY_DAY, prefix="NODE")
    env = {
        **os.environ,
        **folder_site_env(site),
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MEDVLM_HOME": str(tmp_path / "home"),
        "MEDVLM_JOB__LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "MEDVLM_JOB__MODEL_ENDPOINT": "http",
        "MEDVLM_JOB__MODEL_URL": url,
        "MEDVLM_MODEL__VERSION": "cluster-test-1",
        "MEDVLM_SERVING__API_KEY": API_KEY,
        # As deployed: 2 replicas of 2 requests, so the run keeps 4 studies at the model.
        "MEDVLM_SERVING__NUM_REPLICAS": "2",
        "MEDVLM_SERVING__MAX_ONGOING_REQUESTS": "2",
        # Retries at the I/O edge ride out the lost replica: Serve answers 500/503 for a
        # request whose replica died, and routes the retry to a live one.
        "MEDVLM_JOB__MODEL_CLIENT__RETRY_ATTEMPTS": "8",
        "MEDVLM_JOB__MODEL_CLIENT__RETRY_INITIAL_BACKOFF_S": "1",
        "MEDVLM_JOB__MODEL_CLIENT__RETRY_MAX_BACKOFF_S": "10",
        "MEDVLM_JOB__MODEL_CLIENT__READ_TIMEOUT_S": "120",
        "COLUMNS": "200",
    }
    day = STUDY_DAY.isoformat()
    started = time.monotonic()
    run = subprocess.Popen(
        [str(Path(sys.executable).parent / "medvlm"), "run", "--since", day, "--until", day],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(
            lambda: _drafts_written(site) >= 2 or run.poll() is not None,
            timeout_s=REPLICA_START_S,
            what="the first drafts written",
            poll_s=0.2,
        )
        assert run.poll() is None, "the run ended before the node was lost"
        cluster.nodes[victim].kill()  # mid-batch: others in flight at the victim
        output, _ = run.communicate(timeout=2 * REPLICA_START_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    print(f"batch of {BATCH} with {victim} killed: {time.monotonic() - started:.1f} s")
    assert run.returncode == 0, output[-4000:]
    per_order = preliminary_drafts_per_order(site)
    assert set(per_order) == orders(site), output[-4000:]  # every order drafted
    assert set(per_order.values()) == {1}  # once

    def replaced() -> bool:
        nodes = cluster.running_replica_nodes(APP, DEPLOYMENT_NAME)
        return len(nodes) == 2 and len(set(nodes)) == 2 and victim not in nodes

    took = wait_for(replaced, timeout_s=REPLICA_START_S + 60, what="the lost replica restarted")
    print(f"replica of {victim} running again elsewhere after {took:.1f} s")
    assert victim not in cluster.alive_nodes()

    async def after() -> list[DraftResult]:
        async with httpx.AsyncClient(trust_env=False) as client:
            model = drafter(url, client)
            return list(await asyncio.gather(*(model.draft(s) for s in studies(4, "after"))))

    assert_valid(asyncio.run(after()), studies(4, "after"))


def test_replicas_scale_up_to_the_maximum_under_queued_drafts_and_back_down_when_idle(
    all_nodes: RayCluster, settings: MedvlmSettings
) -> None:
    """Autoscaling from the settings: one replica at rest; drafts queued past the target make
    Serve add a replica up to ``max_replicas`` (on another node); idle, it goes back to one.

    The load stops once Serve has asked for the second replica: on 2 shared cores a replica
    does not finish starting within 6 minutes while the first one drafts (measured), so it
    starts on an idle machine, and the downscale delay is longer than a start takes here."""
    cluster = all_nodes
    cluster.delete_serve_apps()  # a fixed-size app from the test before
    url = deploy(
        cluster,
        settings,
        min_replicas="1",
        max_replicas="2",
        target_ongoing_requests="1",
        upscale_delay_s="0",
        downscale_delay_s=str(DOWNSCALE_DELAY_S),
        look_back_period_s="11",
    )
    assert len(cluster.running_replica_nodes(APP, DEPLOYMENT_NAME)) == 1
    stop = threading.Event()
    drafted: list[DraftResult] = []
    sent: list[ModelInput] = []

    async def queued_drafts() -> None:
        """Four drafts at a time (twice the maximum replicas x target) until told to stop."""
        async with httpx.AsyncClient(trust_env=False) as client:
            model = drafter(url, client)
            round_ = 0
            while not stop.is_set():
                batch = studies(4, f"load-{round_}")
                sent.extend(batch)
                drafted.extend(await asyncio.gather(*(model.draft(s) for s in batch)))
                round_ += 1

    load = threading.Thread(target=lambda: asyncio.run(queued_drafts()), name="queued-drafts")
    load.start()
    try:
        took = wait_for(
            lambda: len(cluster.serve_replicas(APP, DEPLOYMENT_NAME)) == 2,
            timeout_s=240,
            what="Serve adding a replica under queued drafts",
        )
        print(f"second replica asked for after {took:.1f} s of load")
    finally:
        stop.set()
        load.join(timeout=600)
    assert drafted and not load.is_alive()
    assert_valid(drafted, sent)
    took = wait_for(
        lambda: len(cluster.running_replica_nodes(APP, DEPLOYMENT_NAME)) == 2,
        timeout_s=DOWNSCALE_DELAY_S,
        what="the second replica running (before Serve would take it back)",
    )
    print(f"second replica running {took:.1f} s after the load stopped")
    placed = cluster.running_replica_nodes(APP, DEPLOYMENT_NAME)
    assert len(placed) == 2 and len(set(placed)) == 2, placed  # max_replicas_per_node 1

    took = wait_for(
        lambda: len(cluster.serve_replicas(APP, DEPLOYMENT_NAME)) == 1,
        timeout_s=DOWNSCALE_DELAY_S + 120,
        what="back to one replica when idle",
    )
    print(f"back to one replica {took:.1f} s later")
    assert len(cluster.running_replica_nodes(APP, DEPLOYMENT_NAME)) == 1
