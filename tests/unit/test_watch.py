"""``flows.watch`` over a DICOM folder, an NDJSON EHR and a SQLite ledger (the fast tier): the
first pass only records the position, a new study is drafted once with its stable→EHR latency
in the ledger, QIDO-style detection waits for a study to settle, STAT orders go first, the
modality filter, a stop before a study enters the pipeline, and the state across a restart."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flows.watch import LATENCY_TIMING, Watcher, WatchState, WatchSummary, state_source
from medvlm.settings import WatchSettings
from pipeline.ledger import JobState
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import STUDY_DATE, VERSION, World

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.combine(STUDY_DATE, dt.time(7), tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _watcher(
    world: World,
    clock: Clock | None = None,
    *,
    stable: bool = True,
    drafter: ScriptedDrafter | None = None,
    **settings: Any,
) -> Watcher:
    return Watcher(
        world.services(drafter or ScriptedDrafter()),
        WatchSettings.model_validate(settings),
        stable_on_detection=stable,
        clock=clock or Clock(),
    )


def test_the_first_pass_records_the_position_and_a_new_study_is_drafted_once(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    world.add()  # stable before the watcher first started: the batch job's
    watcher = _watcher(world)
    first = watcher.one_pass()
    assert first.stable == 0 and world.ledger.jobs(VERSION) == []
    new = world.add()
    result = watcher.one_pass()
    assert result.stable == 1 and [ref for ref, _ in result.written] == [new.ref]
    job = world.job(new)
    assert job.state is JobState.WRITTEN and job.claimed_by is None
    assert job.timings[LATENCY_TIMING] >= 0
    assert len(world.drafts()) == 1
    # Nothing new: nothing run; the saved state has nothing waiting.
    again = watcher.one_pass()
    assert again.stable == 0 and again.runs == []
    saved = world.ledger.watermark(state_source(watcher.services))
    assert saved is not None and saved["waiting"] == {}
    assert "1 studies drafted" in watcher.summary.line()


def test_qido_detection_drafts_a_study_only_once_it_has_settled(tmp_path: Path) -> None:
    world, clock = World(tmp_path), Clock()
    (tmp_path / "dicom").mkdir()
    watcher = _watcher(world, clock, stable=False, stable_age_s=60)
    watcher.one_pass()
    case = world.add()
    assert watcher.one_pass().stable == 0  # seen, settling
    clock.tick(30)
    assert watcher.one_pass().stable == 0
    assert world.ledger.jobs(VERSION) == []
    clock.tick(31)
    result = watcher.one_pass()
    assert [ref for ref, _ in result.written] == [case.ref]
    assert world.job(case).accession_number == case.accession


def test_a_stat_order_is_drafted_first_and_other_modalities_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path)
    (tmp_path / "dicom").mkdir()
    watcher = _watcher(world, modalities=["CR"])
    watcher.one_pass()
    routine, stat = world.add(), world.add()
    other = world.add(modality="CT")
    real = world.ehr.find_service_request

    def find(accession: str) -> Any:  # the ordering clinician made this one STAT
        order = real(accession)
        if accession == stat.accession and order is not None:
            return order.model_copy(update={"priority": "stat"})
        return order

    monkeypatch.setattr(world.ehr, "find_service_request", find)
    result = watcher.one_pass()
    assert result.order == [stat.ref, routine.ref]
    assert [ref for ref, _ in result.written] == [stat.ref, routine.ref]
    assert [j.study_uid for j in world.ledger.jobs(VERSION)].count(other.study_uid) == 0


def test_a_stop_leaves_the_studies_registered_unclaimed_and_waiting_for_the_next_start(
    tmp_path: Path,
) -> None:
    world, clock = World(tmp_path), Clock()
    (tmp_path / "dicom").mkdir()
    watcher = _watcher(world, clock)
    watcher.one_pass()
    case = world.add()
    stop = threading.Event()
    stop.set()
    result = watcher.one_pass(stop)
    assert result.written == [] and result.left_waiting == 1
    job = world.job(case)
    assert job.state is JobState.DISCOVERED and job.claimed_by is None
    # A new watcher (a restart) drafts it, its latency from when it was first seen stable.
    clock.tick(100)
    restarted = _watcher(world, clock)
    (written,) = restarted.one_pass().written
    assert written[0] == case.ref and written[1] >= 100
    assert world.job(case).timings[LATENCY_TIMING] >= 100


def test_the_state_survives_json() -> None:
    at = dt.datetime(2026, 12, 2, 7, 0, tzinfo=dt.UTC)
    state = WatchState.from_dict({"detection": {"change_seq": 7}})
    state.settling["1.2.3"] = (4, at)
    state.waiting["1.2.4"] = at
    again = WatchState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state


def test_the_summary_line_counts_median_and_max() -> None:
    summary = WatchSummary(passes=2, latencies=[("study-a", 1.0), ("study-b", 3.0), ("c", 8.0)])
    assert summary.line() == (
        "watch: 2 passes, 3 studies drafted; stable→EHR latency median 3.0 s, max 8.0 s"
    )
    assert "no study drafted" in WatchSummary().line()


def test_a_change_feed_watcher_starts_at_the_feed_s_last_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path)
    watcher = _watcher(world)
    source = watcher.services.source
    monkeypatch.setattr(source, "change_feed", SimpleNamespace(last_seq=lambda: 42), raising=False)

    def whole_pacs(_mark: Any) -> Any:
        raise AssertionError("the first pass read the feed from its start")

    monkeypatch.setattr(source, "new_studies_since", whole_pacs)
    result = watcher.one_pass()
    assert result.stable == 0
    saved = world.ledger.watermark(state_source(watcher.services))
    assert saved is not None and saved["detection"]["change_seq"] == 42


def test_a_failed_study_waits_retry_after_s_before_it_is_tried_again(tmp_path: Path) -> None:
    world = World(tmp_path)
    (tmp_path / "dicom").mkdir()
    drafter = ScriptedDrafter(default="crash")
    watcher = _watcher(world, drafter=drafter, retry_after_s=3600)
    watcher.one_pass()
    case = world.add()
    first = watcher.one_pass()
    assert first.written == [] and first.left_waiting == 1
    assert world.job(case).state is JobState.FAILED and drafter.calls == [case.ref]
    held = watcher.one_pass()  # within the hour: not tried again
    assert held.order == [] and held.left_waiting == 1 and drafter.calls == [case.ref]
    drafter.default = "valid"
    retried = _watcher(world, drafter=drafter, retry_after_s=0).one_pass()
    assert [ref for ref, _ in retried.written] == [case.ref]
    assert world.job(case).state is JobState.WRITTEN
