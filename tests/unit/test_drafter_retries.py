"""Retry behaviour of the HTTP drafter at the I/O edge.

The faults (a 503 from an overloaded model service, a 400) are injected with
``httpx.MockTransport``: a real Serve replica cannot be made to answer 503 on cue here.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from medvlm.errors import ServingError
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
        drafter = HttpDrafter(client, "http://model.test", api_key="k", attempts=3)
        return await drafter.draft(INPUT)


def test_a_503_is_retried_and_the_draft_arrives() -> None:
    seen: list[httpx.Request] = []
    result = asyncio.run(_draft([503, 200], seen))
    assert result == RESULT
    assert len(seen) == 2
    assert seen[0].headers["Authorization"] == "Bearer k"


def test_a_400_is_not_retried_and_names_the_study() -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(ServingError, match="study-r: model service answered 400"):
        asyncio.run(_draft([400, 200], seen))
    assert len(seen) == 1
