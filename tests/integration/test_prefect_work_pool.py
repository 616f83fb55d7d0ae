"""Prefect beyond ``serve()``: prefect.yaml deployed with ``prefect deploy`` to the ``medvlm``
process work pool, and two ``prefect worker`` processes running flow runs of the on-demand
deployment over the same window, sharing one PostgreSQL ledger and one EHR.

All real and on loopback: the Prefect server (``prefect_server``, its database in the
``postgres`` cluster), the CLI as an operator runs it from the checkout, the workers (OS
processes, started and stopped by PID), the model (the session's Ray Serve app over HTTP, as the
chart's worker calls KubeRay's Serve service). The workers start in a folder of their own: the
flow code is found through prefect.yaml's pull step (``MEDVLM_CODE_DIR``).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun

from connectors.ledger_store import LedgerStore, open_engine
from medvlm.settings import MedvlmSettings
from pipeline.ledger import JobState
from tests.integration.conftest_servers import PostgresServer, PrefectServer, stop_process_group
from tests.integration.folder_site import (
    build_folder_site,
    folder_site_env,
    orders,
    preliminary_drafts_per_order,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "medvlm"  # prefect.yaml's work pool
DEPLOYMENT = "scheduled-draft-reports/on-demand"
WORKERS = ("worker-a", "worker-b")
STUDIES = 12
VERSION = "tiny-over-http"  # the model's version label: a remote model does not hash weights


def _run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> str:
    done = subprocess.run(
        args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args[:3]}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@dataclass(frozen=True)
class Site:
    """The site's folders (PACS, EHR) and the worker environment that points at them."""

    root: Path
    ledger_url: str
    env: dict[str, str]


@pytest.fixture
def site(tmp_path: Path, postgres: PostgresServer, settings: MedvlmSettings) -> Site:
    """``STUDIES`` chest CR studies of today and their orders; the ledger a fresh PostgreSQL
    database migrated by ``medvlm db upgrade``; the model the session's Serve app over HTTP
    (its port is known before it runs: the test starts it while the workers start)."""
    root = tmp_path / "site"
    build_folder_site(root, STUDIES, dt.date.today(), prefix="POOL")
    ledger_url = postgres.create_database()
    assert settings.serving.api_key is not None
    env = {
        **folder_site_env(root),
        "MEDVLM_HOME": str(tmp_path / "home"),
        "MEDVLM_JOB__LEDGER_URL": ledger_url,
        "MEDVLM_JOB__MODEL_ENDPOINT": "http",
        "MEDVLM_JOB__MODEL_URL": f"http://127.0.0.1:{settings.serving.port}",
        "MEDVLM_MODEL__VERSION": VERSION,
        "MEDVLM_SERVING__API_KEY": settings.serving.api_key.get_secret_value(),
        # At most 5 studies in flight per run (fetch + model + write), claimed two at a time:
        # one run cannot hold the whole window, the other run's worker takes part of it.
        "MEDVLM_JOB__PAGE_SIZE": "2",
        "MEDVLM_JOB__CONCURRENCY": "3",
        "MEDVLM_JOB__FETCH_CONCURRENCY": "1",
        "MEDVLM_JOB__WRITE_CONCURRENCY": "1",
        "MEDVLM_JOB__IMAGE_PROCESSES": "0",  # two workers on 2 cores: decode in fetch threads
    }
    _run([str(BIN / "medvlm"), "db", "upgrade"], env)
    return Site(root, ledger_url, env)


@pytest.fixture
def deployed(prefect_server: PrefectServer) -> PrefectServer:
    """The ``medvlm`` process work pool, and prefect.yaml's deployments on it, made with the CLI
    from the checkout without prompts."""
    prefect = str(BIN / "prefect")
    env = prefect_server.env()
    _run([prefect, "work-pool", "create", POOL, "--type", "process"], env)
    _run([prefect, "deploy", "--all", "--no-prompt"], env)
    return prefect_server


@dataclass(frozen=True)
class Workers:
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def tails(self) -> str:
        return "\n".join(f"--- {n}:\n{log.read_text()[-2500:]}" for n, log in self.logs.items())


@pytest.fixture
def workers(deployed: PrefectServer, site: Site, tmp_path: Path) -> Iterator[Workers]:
    """``prefect worker start`` twice on the pool, each running at most one flow run at a time
    (``--limit 1``: two runs go to two workers), polling every second; both stopped by PID (their
    process groups, flow-run processes included) whatever the test's outcome."""
    env = {
        **os.environ,
        **deployed.env(),
        **site.env,
        "MEDVLM_CODE_DIR": str(ROOT),  # prefect.yaml's pull step: where the flow code is
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    start = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
    started = Workers({}, {name: tmp_path / f"{name}.log" for name in WORKERS})
    try:
        for name in WORKERS:
            workdir = tmp_path / name  # not the checkout
            workdir.mkdir()
            with started.logs[name].open("wb") as log:
                started.processes[name] = subprocess.Popen(
                    [*start, "--name", name, "--limit", "1"],
                    cwd=workdir,
                    env=env | {"MEDVLM_JOB__WORKER_ID": name},  # its name in the ledger's claims
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        yield started
    finally:
        for process in started.processes.values():
            stop_process_group(process, grace_s=10)


def _wait_until(what: str, done: Callable[[], bool], timeout_s: float, workers: Workers) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        dead = [n for n, p in workers.processes.items() if p.poll() is not None]
        assert not dead, f"workers {dead} ended while waiting for {what}\n{workers.tails()}"
        assert time.monotonic() < deadline, (
            f"{what}: not within {timeout_s:.0f} s\n{workers.tails()}"
        )
        time.sleep(1)


def test_two_process_workers_share_the_window_and_write_each_draft_once(
    workers: Workers, prefect_server: PrefectServer, site: Site, request: pytest.FixtureRequest
) -> None:
    # The model service starts while the workers start (they reach it only in a flow run).
    assert request.getfixturevalue("serve_url") == site.env["MEDVLM_JOB__MODEL_URL"]
    with SyncPrefectClient(prefect_server.api_url) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        # Kept as written and resolved by each worker when a run starts: not the deployer's
        # checkout, but wherever the worker has the code.
        assert deployment.pull_steps == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $MEDVLM_CODE_DIR }}"
                }
            }
        ]
        _wait_until(
            "both workers polling the pool",
            lambda: {w.name for w in client.read_workers_for_work_pool(POOL)} >= set(WORKERS),
            120,
            workers,
        )
        created = [
            client.create_flow_run_from_deployment(deployment.id, parameters={"days_back": 1})
            for _ in WORKERS
        ]
        runs: list[FlowRun] = []

        def finished() -> bool:
            runs[:] = [client.read_flow_run(run.id) for run in created]
            return all(run.state is not None and run.state.is_final() for run in runs)

        _wait_until("both flow runs final", finished, 420, workers)

    assert [run.state_name for run in runs] == ["Completed", "Completed"], workers.tails()
    # One run per worker, at the same time.
    assert {run.labels.get("prefect.worker.name") for run in runs} == set(WORKERS)
    first, second = runs
    assert first.start_time and first.end_time and second.start_time and second.end_time
    assert first.start_time < second.end_time and second.start_time < first.end_time

    engine = open_engine(site.ledger_url)
    try:
        jobs = LedgerStore(engine).jobs(VERSION)
    finally:
        engine.dispose()
    assert len(jobs) == len({job.study_uid for job in jobs}) == STUDIES
    assert {job.state for job in jobs} == {JobState.WRITTEN}
    assert all(job.claimed_by is None and job.lease_until is None for job in jobs)
    assert preliminary_drafts_per_order(site.root) == Counter(dict.fromkeys(orders(site.root), 1))
