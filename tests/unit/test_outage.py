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
from typing import Any

import pytest

from connectors.circuit import CircuitBreaker, public_url
from medvlm.errors import EhrDownError, EhrUnavailableError
from pipeline.ledger import JobState
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import World

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
