"""``flows.tasks.draft_requested_tasks`` in the fast tier: a folder PACS, an NDJSON EHR, the
SQLite ledger and ``ScriptedDrafter`` (the model is not under test), with the Tasks in an
in-memory queue that keeps FHIR's versioned-update rule (a stale If-Match answers "lost").

What the real servers cannot be made to do on demand is shown here: the ``_lastUpdated``
watermark and its overlap, a claim that meets an EHR failure (the Task stays requested and the
watermark does not pass it), a draft that fails (the Task waits in progress while the ledger
retries, then fails with its reason), and a Task left accepted by a worker that died.
The same flow against the real FHIR server and Orthanc: tests/integration/test_fhir_tasks.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.task import Task

from flows.draft_reports import model_device
from flows.tasks import WATERMARK_OVERLAP, draft_requested_tasks, watermark_source
from medvlm.errors import EhrNotFoundError, EhrUnavailableError
from pipeline.imaging import study_reference
from pipeline.ledger import JobState
from pipeline.tasks import DRAFT_IMAGING_REPORT, TASK_CODE_SYSTEM
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import VERSION, World

pytestmark = pytest.mark.unit

START = dt.datetime(2026, 12, 2, 6, 0, tzinfo=dt.UTC)


class MemoryTasks:
    """Tasks held in memory with a versionId and lastUpdated each; ImagingStudy and
    ServiceRequest read from the NDJSON EHR's files."""

    def __init__(self, ehr_folder: Path) -> None:
        self.folder = ehr_folder
        self.tasks: dict[str, dict[str, Any]] = {}
        self.clock = START
        self.searched_since: list[dt.datetime | None] = []  # of requested Tasks
        self.fail_updates = 0  # the next N updates answer as an EHR that is down

    def tick(self) -> str:
        self.clock += dt.timedelta(seconds=1)
        return self.clock.isoformat()

    def request(self, focus: str, status: str = "requested", **fields: Any) -> str:
        tid = f"t{len(self.tasks) + 1}"
        self.tasks[tid] = {
            **fields,
            "resourceType": "Task",
            "id": tid,
            "meta": {"versionId": "1", "lastUpdated": self.tick()},
            "status": status,
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": DRAFT_IMAGING_REPORT}]},
            "focus": {"reference": focus},
        }
        return tid

    def search_tasks(
        self, system: str, code: str, *, status: str = "requested", since: dt.datetime | None = None
    ) -> list[Task]:
        if status == "requested":
            self.searched_since.append(since)
        return [
            Task.model_validate(t)
            for t in self.tasks.values()
            if t["status"] == status
            and (since is None or dt.datetime.fromisoformat(t["meta"]["lastUpdated"]) >= since)
        ]

    def read(self, model: Any, rid: str) -> Any:
        path = self.folder / f"{model.get_resource_type()}.ndjson"
        for line in path.read_text().splitlines():
            data = json.loads(line)
            if data.get("id") == rid:
                return model.model_validate(data)
        raise EhrNotFoundError(f"{model.get_resource_type()}/{rid}: HTTP 404 (not found)")

    def update_task(self, task: Task) -> Task | None:
        if self.fail_updates:
            self.fail_updates -= 1
            raise EhrUnavailableError(f"Task/{task.id}: HTTP 503 (unavailable)")
        held = self.tasks[str(task.id)]
        assert task.meta is not None
        if task.meta.versionId != held["meta"]["versionId"]:
            return None
        data = task.model_dump(mode="json", by_alias=True, exclude_none=True)
        version = str(int(held["meta"]["versionId"]) + 1)
        data["meta"] = {"versionId": version, "lastUpdated": self.tick()}
        self.tasks[str(task.id)] = data
        return Task.model_validate(data)


def _imaging_study(world: World, study_uid: str) -> str:
    for line in (world.root / "ehr" / "ImagingStudy.ndjson").read_text().splitlines():
        data = json.loads(line)
        if any(i["value"] == f"urn:oid:{study_uid}" for i in data.get("identifier", [])):
            return f"ImagingStudy/{data['id']}"
    raise AssertionError("no ImagingStudy for the study")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_tasks_are_drafted_once_and_the_watermark_follows_them(world: World) -> None:
    cases = [world.add(), world.add()]
    queue = MemoryTasks(world.root / "ehr")
    ids = [queue.request(_imaging_study(world, c.study_uid)) for c in cases]
    drafter = ScriptedDrafter()
    services = world.services(drafter)
    tally = draft_requested_tasks(services, queue=queue)
    assert queue.searched_since == [None]  # the first pass: every requested Task
    assert sorted(t for t, _ in tally.completed) == [f"Task/{i}" for i in ids]
    assert sorted(drafter.calls) == sorted(study_reference(c.study_uid) for c in cases)
    for tid in ids:
        task = queue.tasks[tid]
        assert task["status"] == "completed" and task["owner"]["reference"].startswith("Device/")
    saved = world.ledger.watermark(watermark_source(services))
    assert saved == {"last_updated": (START + dt.timedelta(seconds=2)).isoformat()}
    # The next pass searches from the watermark less the overlap and drafts nothing again.
    again = draft_requested_tasks(world.services(drafter), queue=queue)
    assert queue.searched_since[-1] == START + dt.timedelta(seconds=2) - WATERMARK_OVERLAP
    assert again.found == 0 and len(drafter.calls) == 2
    assert [world.job(c).state for c in cases] == [JobState.WRITTEN] * 2


def test_a_claim_that_meets_an_ehr_failure_is_left_requested_for_the_next_pass(
    world: World,
) -> None:
    first, second = world.add(), world.add()
    queue = MemoryTasks(world.root / "ehr")
    failing = queue.request(_imaging_study(world, first.study_uid))
    queue.request(_imaging_study(world, second.study_uid))
    queue.fail_updates = 1  # the first Task's claim
    services = world.services(ScriptedDrafter())
    tally = draft_requested_tasks(services, queue=queue)
    assert len(tally.completed) == 1 and queue.tasks[failing]["status"] == "requested"
    # The watermark stays at the Task left requested, so the next pass finds it again.
    saved = world.ledger.watermark(watermark_source(services))
    assert saved == {"last_updated": (START + dt.timedelta(seconds=1)).isoformat()}
    again = draft_requested_tasks(world.services(ScriptedDrafter()), queue=queue)
    assert [t for t, _ in again.completed] == [f"Task/{failing}"]
    assert world.job(first).state is JobState.WRITTEN


def test_a_failed_draft_keeps_the_task_in_progress_until_the_ledger_gives_up(
    world: World,
) -> None:
    case = world.add()
    queue = MemoryTasks(world.root / "ehr")
    tid = queue.request(_imaging_study(world, case.study_uid))
    drafter = ScriptedDrafter({case.ref: "invalid-json"})
    first = draft_requested_tasks(world.services(drafter), queue=queue)
    # Attempt 1 of job.max_attempts (2): retried, so the Task waits, in progress at its stage.
    assert first.pending == [f"Task/{tid}"] and not first.failed
    assert queue.tasks[tid]["status"] == "in-progress"
    assert queue.tasks[tid]["businessStatus"]["coding"][0]["code"] == "discovered"
    assert world.job(case).state is JobState.FAILED
    # The next pass takes it up (no longer requested) and the second failure ends it.
    second = draft_requested_tasks(world.services(drafter), queue=queue)
    assert second.found == 0 and second.taken_up == 1
    ((ref, reason),) = second.failed
    assert ref == f"Task/{tid}" and reason.startswith("draft-failed: ")
    task = queue.tasks[tid]
    assert task["status"] == "failed"
    assert task["statusReason"]["coding"][0]["code"] == "draft-failed"
    assert task["statusReason"]["text"] == world.job(case).reason
    assert world.job(case).state is JobState.DEAD_LETTERED
    assert drafter.calls == [case.ref, case.ref]


def test_a_task_left_accepted_by_a_worker_that_died_is_taken_up_and_completed(
    world: World,
) -> None:
    case, other = world.add(), world.add()
    services = world.services(ScriptedDrafter())
    device = model_device(services)
    queue = MemoryTasks(world.root / "ehr")
    ours = queue.request(
        _imaging_study(world, case.study_uid), "accepted", owner={"reference": device}
    )
    theirs = queue.request(  # another model's Task: not this worker's to take up
        _imaging_study(world, other.study_uid), "accepted", owner={"reference": "Device/else"}
    )
    tally = draft_requested_tasks(services, queue=queue)
    assert tally.found == 0 and tally.taken_up == 1
    assert [t for t, _ in tally.completed] == [f"Task/{ours}"]
    assert queue.tasks[ours]["status"] == "completed"
    assert queue.tasks[theirs]["status"] == "accepted"
    assert world.ledger.jobs(VERSION, [other.study_uid]) == []


def test_an_ehr_without_tasks_is_refused_with_one_line(world: World) -> None:
    from medvlm.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="MEDVLM_EHR__KIND=fhir"):
        draft_requested_tasks(world.services(ScriptedDrafter()))
