"""Retry behaviour of the HTTP drafter at the I/O edge.

The faults (a 503 from an overloaded model service, a 500 of a lost replica, a 400) are
injected with ``httpx.MockTransport``: a real Serve replica cannot be made to answer them on
cue here (the 500 is caused for real in tests/integration/test_ray_cluster.py).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from medvlm.errors import ServingError
from medvlm.settings import HttpEdgeSettings, MedvlmSettings
from pipeline.prompts import ModelInput, StudyContext
from pipeline.report import DraftReport, DraftResult
from serving.clients import HttpDrafter

pytestmark = pytest.mark.unit

INPUT = ModelInput(reference="study-r", images_png=(b"png",), context=StudyContext(modality="CR"))
RESULT = DraftResult(
    reference="study-r",
    report=DraftReport.model_validate(
        {
            "rationale": "r",
            "findings": [
                {
                    "name": "other",
                    "presence": "absent",
                    "laterality": "not_applicable",
                    "location": "chest",
                    "severity": "not_applicable",
                    "detail": "d",
                }
            ],
            "impression": "i",
            "critical": False,
            "recommendation": "none",
        }
    ),
    raw_text="{}",
    model="m",
    finish_reason="stop",
    prompt_tokens=1,
    completion_tokens=1,
    latency_s=0.1,
)


async def _draft(statuses: list[int], seen: list[httpx.Request]) -> DraftResult:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = statuses.pop(0)
        if status == 200:
            return httpx.Response(200, content=RESULT.model_dump_json())
        return httpx.Response(status, text="overloaded" if status == 503 else "bad input")

    # The client is the caller's (HttpDrafter does not close a client it was given).
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        edge = HttpEdgeSettings(retry_attempts=3, retry_initial_backoff_s=0.01)
        drafter = HttpDrafter(client, "http://model.test", api_key="k", edge=edge)
        return await drafter.draft(INPUT)


def test_a_503_is_retried_and_the_draft_arrives() -> None:
    seen: list[httpx.Request] = []
    result = asyncio.run(_draft([503, 200], seen))
    assert result == RESULT
    assert len(seen) == 2
    assert seen[0].headers["Authorization"] == "Bearer k"


def test_a_500_of_a_replica_lost_under_the_request_is_retried() -> None:
    # What Ray Serve's proxy answers when the replica's node dies mid-request.
    seen: list[httpx.Request] = []
    assert asyncio.run(_draft([500, 200], seen)) == RESULT
    assert len(seen) == 2


def test_a_400_is_not_retried_and_names_the_study() -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(ServingError, match="study-r: model service answered 400"):
        asyncio.run(_draft([400, 200], seen))
    assert len(seen) == 1


def test_the_model_clients_timeouts_and_retries_come_from_settings() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503, text="overloaded")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            settings = MedvlmSettings(
                job={
                    "model_client": {
                        "read_timeout_s": 7,
                        "retry_attempts": 2,
                        "retry_initial_backoff_s": 0.01,
                    }
                }
            )
            drafter = HttpDrafter(client, "http://model.test", edge=settings.job.model_client)
            await drafter.draft(INPUT)

    with pytest.raises(ServingError, match="model service 503"):
        asyncio.run(run())
    assert len(seen) == 2  # retry_attempts
    assert seen[0].extensions["timeout"]["read"] == 7


def test_pacs_ehr_and_model_service_share_one_shape_of_network_settings() -> None:
    settings = MedvlmSettings()
    for edge in (settings.pacs, settings.ehr, settings.job.model_client):
        assert isinstance(edge, HttpEdgeSettings)
    # Each keeps the defaults its peer needs (DICOMweb answers are large, drafts are slow).
    assert (settings.pacs.read_timeout_s, settings.ehr.read_timeout_s) == (120.0, 30.0)
    assert settings.job.model_client.read_timeout_s == 300.0


class _Handle:
    """A DeploymentHandle whose first calls fail as Ray fails a request whose replica died
    (a fake: tests/integration/test_ray_cluster.py loses a replica for real, over HTTP)."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0
        self.draft = self

    def remote(self, model_input: ModelInput) -> asyncio.Future[DraftResult]:
        self.calls += 1
        future: asyncio.Future[DraftResult] = asyncio.get_running_loop().create_future()
        if self.failures:
            future.set_exception(self.failures.pop(0))
        else:
            future.set_result(RESULT)
        return future


def test_a_request_whose_replica_died_is_sent_again_and_a_replica_error_is_not() -> None:
    from ray.exceptions import ActorDiedError, RayTaskError

    from medvlm.errors import InvalidModelOutputError
    from serving.clients import HandleDrafter

    edge = HttpEdgeSettings(retry_attempts=4, retry_initial_backoff_s=0.01)
    handle = _Handle([ActorDiedError(), ActorDiedError()])
    assert asyncio.run(HandleDrafter(handle, edge).draft(INPUT)) == RESULT
    assert handle.calls == 3
    # The replica's own error (its output did not validate) is the study's: raised at once.
    own = RayTaskError("draft", "traceback", InvalidModelOutputError("study-r: bad JSON"))
    handle = _Handle([own])
    with pytest.raises(InvalidModelOutputError, match="bad JSON"):
        asyncio.run(HandleDrafter(handle, edge).draft(INPUT))
    assert handle.calls == 1
