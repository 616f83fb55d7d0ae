"""Faults in front of the PACS's DICOMweb, caused for real by a loopback proxy the test owns.

The real draft flow runs against the session's real Orthanc through ``DicomWebProxy``
(tests/integration/loopback.py), with the real model and the real FHIR server. The proxy answers
some of the studies' requests with 503 or 429 and ``Retry-After``, resets connections without an
answer, answers later than the client's read timeout, or answers 503 to everything for a while
(an outage mid-run, or one longer than the run waits). Expected in each case: every study
drafted exactly once on the FHIR server (counted per order there), none failed, no attempt
spent; a ``Retry-After`` waited for (the proxy's own request times); the PACS's breaker says
"down" once, not per study; an outage longer than the wait ends the run with the studies still
pending, and the next run finishes them. The PACS down at discovery: ``medvlm run`` waits for it
as long, then ends with one line and exit code 4, no traceback.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medvlm.dev.servers import OrthancInfo
from pipeline.ledger import JobState
from serving.clients import HandleDrafter
from tests.conftest import free_port, processes_of_run
from tests.integration.loopback import DicomWebProxy, Fault, Passed
from tests.integration.test_fhir_write_back import _drafts_per_order, site_jobs
from tests.integration.test_preflight import _medvlm_run, _site_env
from tests.integration.test_write_safety import Site, WatchingDrafter, open_site
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

STUDIES = 4
# Short budgets, so that seconds of faults show what minutes would; the retry budget is long
# enough for every injected fault to be retried within one call (no breaker, no attempt spent).
QUICK = {"retry_budget_s": 20.0, "retry_initial_backoff_s": 0.2, "probe_interval_s": 0.5}
# For outages: a call gives up after 2 s and marks the PACS down.
DOWN_QUICK = QUICK | {"retry_budget_s": 2.0}


def _per_study(method: str, path: str) -> bool:
    """A study's own request (WADO-RS metadata or instance), not discovery's search or the
    breaker's probe (both ``/studies?…``)."""
    return path.startswith("/dicom-web/studies/")


@pytest.fixture
def proxy(orthanc: OrthancInfo) -> Iterator[DicomWebProxy]:
    with DicomWebProxy(orthanc.dicomweb_url) as opened:
        yield opened


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path) as opened:
        yield opened


@pytest.fixture
def drafter(serve_handle: Any) -> WatchingDrafter:
    return WatchingDrafter(HandleDrafter(serve_handle))


def _pacs(proxy: DicomWebProxy, **extra: Any) -> dict[str, Any]:
    return {"dicomweb_url": proxy.base_url} | QUICK | extra


def _next_same(proxy: DicomWebProxy, faulted: Passed) -> Passed:
    """The next request for the same resource after a faulted one: its retry."""
    later = proxy.log[proxy.log.index(faulted) + 1 :]
    return next(p for p in later if (p.method, p.path) == (faulted.method, faulted.path))


def _pacs_lines(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("PACS ") and what in r.getMessage()
    ]


def _figures(site: Site, scenario: str, faults: str, started: float, **extra: Any) -> None:
    """Counts from the FHIR server (drafts per order) and the ledger, for the README's table."""
    per_order = _drafts_per_order(site)
    jobs = site_jobs(site)
    with_reason = sum(
        job.state in (JobState.FAILED, JobState.DEAD_LETTERED, JobState.SKIPPED)
        and bool(job.reason)
        for job in jobs
    )
    drafted_once = sum(n == 1 for n in per_order.values())
    record(
        Figures(
            scenario=scenario,
            faults=faults,
            studies=len(jobs),
            drafted_once=drafted_once,
            recorded_with_reason=with_reason,
            lost=len(jobs) - drafted_once - with_reason - sum(n > 1 for n in per_order.values()),
            duplicated=sum(n > 1 for n in per_order.values()),
            seconds=round(time.monotonic() - started, 1),
            extra=extra,
        )
    )


def _all_written_once(site: Site) -> None:
    per_order = _drafts_per_order(site)
    assert len(per_order) == STUDIES and set(per_order.values()) == {1}, per_order
    assert all(job.state is JobState.WRITTEN and job.attempts == 0 for job in site_jobs(site)), [
        (job.state, job.attempts, job.reason) for job in site_jobs(site)
    ]


@dataclass(frozen=True)
class Case:
    fault: Fault
    every: int
    times: int
    pacs: dict[str, Any]
    min_gap_s: float  # the retry of a faulted request comes at least this much later


CASES = {
    "503-retry-after": Case(Fault.busy(503, 1), every=2, times=3, pacs={}, min_gap_s=0.95),
    "429-retry-after": Case(Fault.busy(429, 1), every=2, times=3, pacs={}, min_gap_s=0.95),
    "reset": Case(Fault.connection_reset(), every=2, times=3, pacs={}, min_gap_s=0.0),
    # Answered 6 s late to a client that waits 3 s for a byte: it gives up and asks again.
    "slow": Case(Fault.slow(6.0), every=3, times=2, pacs={"read_timeout_s": 3.0}, min_gap_s=2.9),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_transient_pacs_faults_are_retried_and_every_study_is_drafted_once(
    site: Site,
    proxy: DicomWebProxy,
    drafter: WatchingDrafter,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    case = CASES[name]
    for _ in range(STUDIES):
        site.add()
    proxy.inject(case.fault, every=case.every, times=case.times, where=_per_study)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="connectors.circuit"):
        summary = site.run(drafter, pacs_settings=_pacs(proxy, **case.pacs), page_size=STUDIES)
    assert summary.counts["written"] == STUDIES and not summary.failures, summary
    _all_written_once(site)
    faulted = proxy.faulted(case.fault.name)
    assert len(faulted) == case.times, proxy.log
    for fault in faulted:  # each retried, after the server's Retry-After / the read timeout
        assert _next_same(proxy, fault).at - fault.at >= case.min_gap_s, (fault, proxy.log)
    assert _pacs_lines(caplog, "is down") == []  # retried within one call: never "down"
    _figures(
        site,
        f"pacs-{name}",
        f"DICOMweb: {case.fault.name} on {case.times} study requests",
        started,
        injected=len(faulted),
        forwarded=proxy.forwarded,
    )


@pytest.mark.slow
def test_a_pacs_outage_mid_run_is_waited_out_said_once_and_costs_no_attempt(
    site: Site,
    proxy: DicomWebProxy,
    drafter: WatchingDrafter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(STUDIES):
        site.add()
    metadata = 0

    def second_metadata(method: str, path: str) -> bool:
        nonlocal metadata
        metadata += path.endswith("/metadata")
        return metadata == 2  # the first study fetched, the others still to be

    proxy.outage(6.0, on_first=second_metadata)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="connectors.circuit"):
        summary = site.run(
            drafter,
            pacs_settings=_pacs(proxy, **DOWN_QUICK),
            fetch_concurrency=1,
            page_size=STUDIES,
            outage_wait_s=60,
        )
    assert summary.counts["written"] == STUDIES and not summary.failures, summary
    assert summary.tally is not None and summary.tally.outage is None
    _all_written_once(site)
    assert proxy.refused_in_outage > 0
    # The breaker held the calls: a few probes per second of outage, not a storm of retries.
    assert proxy.refused_in_outage < 60, proxy.refused_in_outage
    assert len(_pacs_lines(caplog, "is down")) == 1, caplog.messages
    assert len(_pacs_lines(caplog, "answers again")) == 1, caplog.messages
    _figures(
        site,
        "pacs-outage-6s",
        "DICOMweb: 503 to everything for 6 s mid-run",
        started,
        refused=proxy.refused_in_outage,
    )


@pytest.mark.slow
def test_a_pacs_outage_longer_than_the_wait_leaves_the_studies_pending_for_the_next_run(
    site: Site,
    proxy: DicomWebProxy,
    drafter: WatchingDrafter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(STUDIES):
        site.add()
    proxy.outage(3600.0, on_first=lambda method, path: path.endswith("/metadata"))
    started = time.monotonic()
    pacs = _pacs(proxy, **DOWN_QUICK)
    with caplog.at_level(logging.WARNING, logger="connectors.circuit"):
        first = site.run(drafter, pacs_settings=pacs, page_size=STUDIES, outage_wait_s=2)
    assert first.tally is not None and first.tally.outage is not None
    assert f"PACS {proxy.base_url} is down (HTTP 503)" in first.tally.outage, first.tally.outage
    assert not first.failures and first.counts["written"] == 0, first
    jobs = site_jobs(site)
    assert len(jobs) == STUDIES
    assert all(job.state is not JobState.FAILED and job.attempts == 0 for job in jobs)
    assert len(_pacs_lines(caplog, "is down")) == 1, caplog.messages
    proxy.outage(0.0)  # the PACS is back
    second = site.run(drafter, pacs_settings=pacs, page_size=STUDIES)
    assert second.counts["written"] == STUDIES and not second.failures, second
    _all_written_once(site)
    _figures(
        site,
        "pacs-outage-longer-than-wait",
        "DICOMweb: 503 to everything past job.outage_wait_s, then a re-run",
        started,
        refused=proxy.refused_in_outage,
        runs=2,
    )


def test_a_pacs_down_at_discovery_ends_medvlm_run_with_one_line_and_exit_code_4(
    tmp_path: Path,
    orthanc: OrthancInfo,
    fhir_base_url: str,
    proxy: DicomWebProxy,
    tiny_model_dir: Path,
) -> None:
    run_id = uuid.uuid4().hex
    env = _site_env(tmp_path, orthanc, fhir_base_url) | {
        "MEDVLM_PACS__DICOMWEB_URL": proxy.base_url,
        "MEDVLM_PACS__RETRY_BUDGET_S": "1",
        "MEDVLM_PACS__RETRY_INITIAL_BACKOFF_S": "0.2",
        "MEDVLM_PACS__PROBE_INTERVAL_S": "0.5",
        "MEDVLM_JOB__PREFLIGHT": "false",  # the outage begins after the pre-flight
        "MEDVLM_JOB__OUTAGE_WAIT_S": "2",
        "MEDVLM_JOB__OUTAGE_RETRIES": "1",
        "MEDVLM_MODEL__SOURCE": str(tiny_model_dir),
        "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",
        "MEDVLM_SERVING__PORT": str(free_port()),
        "MEDVLM_TEST_RUN_ID": run_id,
    }
    proxy.outage(3600.0)
    started = time.monotonic()
    elapsed, done = _medvlm_run(env, "--since", "2026-11-01", "--until", "2026-11-03")
    output = done.stdout + done.stderr
    assert done.returncode == 4, output[-4000:]
    assert "Traceback" not in output and "Error:" not in output, output[-4000:]
    down = f"PACS {proxy.base_url} is down (HTTP 503)"
    stopped = [line for line in output.splitlines() if line.startswith("stopped early:")]
    assert stopped == [
        f"stopped early: pacs: QIDO-RS: {down}; the studies not done stay pending"
    ], output[-4000:]
    # It waited for the PACS (two waits of 2 s), probing, then gave up: no storm of searches.
    assert elapsed >= 4 and proxy.refused_in_outage < 40, (elapsed, proxy.refused_in_outage)
    assert processes_of_run(run_id) == []  # no model started for a run that found nothing
    assert not (tmp_path / "home" / "models").exists()
    record(
        Figures(
            scenario="pacs-down-at-discovery",
            faults="DICOMweb: 503 to everything from the start of `medvlm run`",
            studies=0,
            drafted_once=0,
            seconds=round(time.monotonic() - started, 1),
            extra={"exit_code": done.returncode, "refused": proxy.refused_in_outage},
        )
    )
