"""Orthanc, then the FHIR server, stopped and restarted in the middle of a batch — for real.

The test's own Orthanc and FHIR server (not the session's: these are stopped), the real model.
Each server is stopped as soon as the model is asked for the batch's first draft (the other
studies are still to be fetched, one at a time) and started again a few seconds later, on the
same ports and storage. Expected: the studies that needed the server
wait for it (its breaker probes it), every study is written exactly once, no attempt is spent,
and the outage is logged once per server, not per study.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medvlm.dev.servers import DevServers
from serving.clients import HandleDrafter
from tests.integration.conftest_servers import running_dev_servers
from tests.integration.test_fhir_write_back import _drafts_per_order, site_jobs
from tests.integration.test_write_safety import Site, WatchingDrafter, open_site
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

QUICK = {"retry_budget_s": 2.0, "retry_initial_backoff_s": 0.2, "probe_interval_s": 0.5}
STUDIES = 8
DOWN_S = 6.0


@pytest.fixture
def own_servers(
    tmp_path_factory: pytest.TempPathFactory, dev_settings_factory: Any
) -> Iterator[DevServers]:
    with running_dev_servers(dev_settings_factory(tmp_path_factory.mktemp("restarts"))) as up:
        yield up


@pytest.fixture
def site(own_servers: DevServers, tmp_path: Path) -> Iterator[Site]:
    with open_site(own_servers.orthanc, own_servers.fhir.base_url, tmp_path) as opened:
        yield opened


class Restarter(WatchingDrafter):
    """The real model; when it is asked for the batch's first draft (the other studies are
    still to be fetched: one fetch at a time), one server is stopped, and started again
    ``DOWN_S`` later."""

    def __init__(self, inner: HandleDrafter, servers: DevServers, name: str) -> None:
        super().__init__(inner)
        self.servers = servers
        self.name = name
        self.stopped_at: float | None = None
        self.thread: threading.Thread | None = None

    async def draft(self, model_input: Any) -> Any:
        if self.thread is None:
            self.thread = threading.Thread(target=self._outage, daemon=True)
            self.thread.start()
        return await super().draft(model_input)

    def _outage(self) -> None:
        assert self.servers.stop(self.name)  # type: ignore[arg-type]
        self.stopped_at = time.monotonic()
        time.sleep(DOWN_S)
        self.servers.up()

    def join(self) -> None:
        assert self.thread is not None, "nothing was drafted: the server was never stopped"
        self.thread.join(timeout=120)


@pytest.mark.parametrize("server", ["orthanc", "fhir"])
def test_a_server_restarted_mid_batch_is_waited_for_and_every_study_is_written_once(
    site: Site,
    own_servers: DevServers,
    serve_handle: Any,
    server: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(STUDIES):
        site.add()
    restarter = Restarter(HandleDrafter(serve_handle), own_servers, server)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="connectors.circuit"):
        summary = site.run(
            restarter,
            ehr_settings=QUICK,
            pacs_settings=QUICK,
            fetch_concurrency=1,
            page_size=2,
            outage_wait_s=120,
        )
    restarter.join()
    seconds = time.monotonic() - started
    assert summary.counts["written"] == STUDIES and not summary.failures, summary
    assert all(job.attempts == 0 for job in site_jobs(site))
    assert set(_drafts_per_order(site).values()) == {1} and len(_drafts_per_order(site)) == STUDIES
    service = {"orthanc": "PACS", "fhir": "EHR"}[server]
    down = [
        r for r in caplog.records if f"{service} " in r.getMessage() and "is down" in r.getMessage()
    ]
    back = [
        r
        for r in caplog.records
        if r.getMessage().startswith(f"{service} ") and "answers again" in r.getMessage()
    ]
    assert len(down) == 1 and len(back) == 1, [r.getMessage() for r in caplog.records]
    per_order = _drafts_per_order(site)
    drafted_once = sum(n == 1 for n in per_order.values())
    name = {"orthanc": "Orthanc", "fhir": "the FHIR server"}[server]
    record(
        Figures(
            scenario=f"{server}-restart",
            faults=f"{name} stopped at the batch's first draft, started again {DOWN_S:.0f} s later",
            studies=STUDIES,
            drafted_once=drafted_once,
            lost=STUDIES - drafted_once - sum(n > 1 for n in per_order.values()),
            duplicated=sum(n > 1 for n in per_order.values()),
            seconds=round(seconds, 1),
        )
    )
