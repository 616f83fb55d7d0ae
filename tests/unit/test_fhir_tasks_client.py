"""The FHIR client's Task calls on a scripted transport: the search on the wire (code, status,
``_lastUpdated`` watermark), its answer checked again, and the If-Match update whose 412 is a
lost claim, not an error. Against the real FHIR server: tests/integration/test_fhir_tasks.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.task import Task

from connectors.ehr import TaskQueue
from connectors.fhir import FhirEhr
from medvlm.settings import EhrSettings
from pipeline.tasks import DRAFT_IMAGING_REPORT, TASK_CODE_SYSTEM
from tests.unit.test_fhir_read_side import BASE, Answer, Scripted, _bundle, _match

pytestmark = pytest.mark.unit


@pytest.fixture
def fhir() -> Iterator[Callable[[Answer], tuple[FhirEhr, Scripted]]]:
    clients: list[httpx.Client] = []

    def make(answer: Answer) -> tuple[FhirEhr, Scripted]:
        settings = EhrSettings.model_validate(
            {"kind": "fhir", "base_url": BASE, "retry_initial_backoff_s": 0.0}
        )
        server = Scripted(answer)
        clients.append(httpx.Client(transport=httpx.MockTransport(server)))
        return FhirEhr(clients[-1], settings), server

    yield make
    for client in clients:
        client.close()


CODE = {"coding": [{"system": TASK_CODE_SYSTEM, "code": DRAFT_IMAGING_REPORT}]}


def _task(
    tid: str, status: str = "requested", code: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "id": tid,
        "meta": {"versionId": "3"},
        "status": status,
        "intent": "order",
        "code": code or CODE,
    }


def test_requested_tasks_are_searched_by_code_status_and_watermark(fhir: Any) -> None:
    answer = _bundle(
        _match(_task("a")),
        _match(_task("b", status="cancelled")),  # a server that ignored status
        _match(_task("c", code={"coding": [{"system": "urn:other", "code": "x"}]})),
    )
    ehr, server = fhir(lambda request: httpx.Response(200, json=answer))
    assert isinstance(ehr, TaskQueue)
    since = datetime(2026, 12, 2, 6, 0, tzinfo=UTC)
    found = ehr.search_tasks(TASK_CODE_SYSTEM, DRAFT_IMAGING_REPORT, since=since)
    assert [t.id for t in found] == ["a"]
    (request,) = server.searches("Task")
    params = request.url.params
    assert params["code"] == f"{TASK_CODE_SYSTEM}|{DRAFT_IMAGING_REPORT}"
    assert params["status"] == "requested"
    assert params["_lastUpdated"] == "ge2026-12-02T06:00:00+00:00"


def test_an_update_sends_if_match_of_the_version_read(fhir: Any) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) | {"meta": {"versionId": "4"}}
        return httpx.Response(200, json=body)

    ehr, server = fhir(answer)
    task = Task.model_validate(_task("a")).model_copy(update={"status": "accepted"})
    updated = ehr.update_task(task)
    assert updated is not None and updated.status == "accepted"
    assert updated.meta is not None and updated.meta.versionId == "4"
    (request,) = server.requests
    assert request.method == "PUT" and request.url.path == "/fhir/Task/a"
    assert request.headers["If-Match"] == 'W/"3"'


@pytest.mark.parametrize("status", [412, 409])
def test_a_version_conflict_is_a_lost_claim_and_sent_once(fhir: Any, status: int) -> None:
    ehr, server = fhir(lambda request: httpx.Response(status))
    assert ehr.update_task(Task.model_validate(_task("a"))) is None
    assert len(server.requests) == 1


def test_an_update_without_a_version_is_refused_before_sending(fhir: Any) -> None:
    ehr, server = fhir(lambda request: httpx.Response(200))
    task = Task.model_validate(_task("a") | {"meta": {}})
    with pytest.raises(ValueError, match="versionId"):
        ehr.update_task(task)
    assert server.requests == []
