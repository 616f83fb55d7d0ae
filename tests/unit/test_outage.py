"""A service that goes down: the breaker stops the calls, studies wait, no attempt is spent.

The flow runs on the folder PACS and the NDJSON EHR (tests/unit/test_flow_states.py's World).
The EHR's outage is made by ``FlakyEhr``: a wrapper whose calls fail while ``down`` is set, with
a real ``CircuitBreaker`` in front, as ``connectors.fhir.FhirEhr`` has; the same outage against
the real FHIR server, through a proxy, is in tests/integration/test_fhir_write_back.py.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from connectors.circuit import CircuitBreaker, public_url
from connectors.pacs import StudyQuery
from flows.draft_reports import run_draft_job
from medvlm.errors import EhrDownError, EhrUnavailableError, PacsDownError, PacsUnavailableError
from pipeline.ledger import JobState
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import STUDY_DATE, World

pytestmark = pytest.mark.unit


@pytest.fixture
def world(tmp_path: Any) -> World:
    return World(tmp_path)


_CALLS = frozenset(
    {
        "read_patient",
        "find_service_request",
        "find_patient",
        "gather_context",
        "find_final_report",
        "transaction",
        "create",
        "find_by_key",
        "capabilities",
    }
)


class FlakyEhr:
    """The folder EHR behind a breaker; while ``down`` every call fails as an unreachable
    server's would once its retry budget is spent (a fake: the folder cannot be unplugged)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.sent_while_down = 0  # calls that reached the (down) server, probes aside
        self.breaker = CircuitBreaker(
            "EHR", "http://user:secret@ehr.example/fhir?x=1", self._probe, error=EhrDownError
        )
        self.breaker._probe_interval_s = 0.02

    def _probe(self) -> None:
        if self.down:
            raise EhrUnavailableError("probe: ConnectError")

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in _CALLS:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.breaker.check()
            if self.down:
                self.sent_while_down += 1
                raise self.breaker.failed("ConnectError")
            result = attribute(*args, **kwargs)
            self.breaker.succeeded()
            return result

        return call


def _down_for(ehr: FlakyEhr, seconds: float) -> threading.Thread:
    """Bring the EHR back after ``seconds``."""

    def outage() -> None:
        ehr.down = True
        time.sleep(seconds)
        ehr.down = False

    return threading.Thread(target=outage, daemon=True)


def test_the_breaker_logs_once_and_strips_credentials_from_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = [False]

    def probe() -> None:
        if not up[0]:
            raise OSError("refused")

    breaker = CircuitBreaker("EHR", "https://u:p@ehr.example:8443/fhir?token=t", probe)
    assert breaker.url == "https://ehr.example:8443/fhir" == public_url(breaker.url)
    with caplog.at_level(logging.WARNING, logger="connectors.circuit"):
        for _ in range(5):
            assert isinstance(breaker.failed("ConnectError"), Exception)
        with pytest.raises(Exception, match=r"EHR https://ehr\.example:8443/fhir is down"):
            breaker.check()
        assert breaker.probe_once() is False
        up[0] = True
        assert breaker.probe_once() is True and not breaker.is_open
        breaker.check()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # down once, up once: not once per study
    assert "is down (ConnectError)" in messages[0] and "answers again" in messages[1]
    assert not any("u:p" in m or "token" in m for m in messages)


def test_an_outage_shorter_than_the_wait_costs_no_attempt_and_the_run_writes_all(
    world: World,
) -> None:
    for _ in range(10):
        world.add()
    flaky = FlakyEhr(world.ehr)
    world.ehr = flaky  # type: ignore[assignment]
    flaky.down = True  # down when the run starts fetching
    outage = _down_for(flaky, 0.5)
    outage.start()
    summary = world.run(ScriptedDrafter(), outage_wait_s=10, fetch_concurrency=4, page_size=10)
    outage.join()
    assert summary.counts["written"] == 10 and not summary.failures
    assert all(world.job(case).attempts == 0 for case in world.cases)
    assert len(world.drafts()) == 10
    # Only the calls under way when it went down reached it; then the breaker held the rest.
    assert 1 <= flaky.sent_while_down <= 4


def test_an_outage_longer_than_the_wait_ends_the_run_with_the_studies_pending(
    world: World,
) -> None:
    for _ in range(4):
        world.add()
    world.run(ScriptedDrafter(), dry_run=True)  # all drafted: the outage hits the writes
    flaky = FlakyEhr(world.ehr)
    world.ehr = flaky  # type: ignore[assignment]
    flaky.down = True
    summary = world.run(ScriptedDrafter(), outage_wait_s=0.2)
    assert summary.tally is not None and summary.tally.outage is not None
    assert "EHR http://ehr.example/fhir is down" in summary.tally.outage
    assert not summary.failures and summary.counts["written"] == 0
    states = {world.job(case).state for case in world.cases}
    assert states <= {JobState.DRAFTED, JobState.WRITING}
    assert all(world.job(case).attempts == 0 for case in world.cases)
    flaky.down = False
    again = world.run(ScriptedDrafter())
    assert again.counts["written"] == 4 and not again.failures
    assert len(world.drafts()) == 4 and len(world.drafts("Provenance")) == 4


class FlakyPacs:
    """The folder PACS behind a breaker, down while ``down`` is set (as ``FlakyEhr``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.searches_while_down = 0
        self.breaker = CircuitBreaker(
            "PACS", "http://pacs.example/dicom-web", self._probe, error=PacsDownError
        )
        self.breaker._probe_interval_s = 0.02

    def _probe(self) -> None:
        if self.down:
            raise PacsUnavailableError("probe: ConnectionError")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def find_studies(self, query: Any) -> Any:
        self.breaker.check("pacs: QIDO-RS")
        if self.down:
            self.searches_while_down += 1
            raise self.breaker.failed("ConnectionError", "pacs: QIDO-RS")
        self.breaker.succeeded()
        return self.inner.find_studies(query)


def _run_on(world: World, pacs: FlakyPacs, **job: Any) -> Any:
    services = world.services(ScriptedDrafter(), **job)
    return run_draft_job(
        replace(services, source=pacs), StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE)
    )


def test_discovery_waits_for_a_pacs_that_comes_back(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        world.add()
    pacs = FlakyPacs(world.services(ScriptedDrafter()).source)
    outage = threading.Thread(target=lambda: (time.sleep(0.3), setattr(pacs, "down", False)))
    pacs.down = True
    outage.start()
    with caplog.at_level(logging.WARNING, logger="connectors.circuit"):
        summary = _run_on(world, pacs, outage_wait_s=10)
    outage.join()
    assert summary.discovered == 3 and summary.counts["written"] == 3 and not summary.failures
    assert summary.tally is not None and summary.tally.outage is None
    assert pacs.searches_while_down == 1  # then the breaker held discovery, probing
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "PACS http://pacs.example/dicom-web is down",
        "PACS http://pacs.example/dicom-web answers again",
    ]


def test_a_pacs_down_longer_than_the_wait_ends_the_run_at_discovery_with_nothing_failed(
    world: World,
) -> None:
    for _ in range(2):
        world.add()
    pacs = FlakyPacs(world.services(ScriptedDrafter()).source)
    pacs.down = True
    started = time.monotonic()
    summary = _run_on(world, pacs, outage_wait_s=0.2, outage_retries=2)
    assert time.monotonic() - started < 5
    assert summary.tally is not None and summary.tally.outage == (
        "pacs: QIDO-RS: PACS http://pacs.example/dicom-web is down (ConnectionError)"
    )
    assert summary.discovered == 0 and not summary.failures and not any(summary.counts.values())
    pacs.down = False
    again = _run_on(world, pacs)
    assert again.counts["written"] == 2 and not again.failures and again.tally is not None
    assert again.tally.outage is None
