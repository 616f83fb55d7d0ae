"""Ray Serve + real vLLM with the tiny Qwen2-VL checkpoint: handle, report route, OpenAI route."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from ray.serve.handle import DeploymentHandle

from medvlm.dev.demo import sample_model_input
from medvlm.settings import MedvlmSettings
from pipeline.prompts import ModelInput, png_data_url
from pipeline.report import DraftReport, DraftResult, report_json_schema

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def handle(serve_handle: DeploymentHandle) -> DeploymentHandle:
    return serve_handle


@pytest.fixture(scope="module")
def base_url(serve_url: str) -> str:
    return serve_url


@pytest.fixture(scope="module")
def chest() -> ModelInput:
    return sample_model_input()


def _auth(settings: MedvlmSettings) -> dict[str, str]:
    assert settings.serving.api_key is not None
    return {"Authorization": f"Bearer {settings.serving.api_key.get_secret_value()}"}


def test_handle_drafts_a_schema_valid_report_for_the_chest_radiograph(
    handle: DeploymentHandle, chest: ModelInput
) -> None:
    result: DraftResult = handle.draft.remote(chest).result(timeout_s=300)
    assert result.reference == chest.reference
    jsonschema.validate(json.loads(result.raw_text), report_json_schema())
    assert result.report == DraftReport.model_validate_json(result.raw_text)
    assert result.finish_reason == "stop"
    assert result.prompt_tokens > 0 and result.completion_tokens > 0


def test_same_seed_gives_the_same_draft_text(handle: DeploymentHandle, chest: ModelInput) -> None:
    first = handle.draft.remote(chest).result(timeout_s=300)
    second = handle.draft.remote(chest).result(timeout_s=300)
    assert first.raw_text == second.raw_text


def test_report_route_answers_model_input_json_with_a_valid_draft(
    settings: MedvlmSettings, base_url: str, chest: ModelInput
) -> None:
    response = httpx.post(
        f"{base_url}/v1/reports",
        content=chest.model_dump_json(),
        headers={"Content-Type": "application/json", **_auth(settings)},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    result = DraftResult.model_validate(response.json())
    assert result.reference == chest.reference
    jsonschema.validate(json.loads(result.raw_text), report_json_schema())


def test_openai_client_gets_schema_valid_json_for_an_image(
    settings: MedvlmSettings, base_url: str, chest: ModelInput
) -> None:
    assert settings.serving.api_key is not None
    client = openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=settings.serving.api_key.get_secret_value(),
        timeout=300,
        max_retries=0,
    )
    completion = client.chat.completions.create(
        model=settings.model.served_name,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(chest.images_png[0])}},
                    {"type": "text", "text": "Draft a report for this chest radiograph."},
                ],
            }
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "draft_report", "schema": report_json_schema(), "strict": True},
        },
        max_tokens=settings.model.max_tokens,
        temperature=0,
        seed=0,
    )
    content = completion.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), report_json_schema())
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_openai_route_rejects_a_request_without_the_bearer_token(base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "medvlm-draft", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 401


def test_openai_route_refuses_an_unknown_model(settings: MedvlmSettings, base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "not-served", "messages": [{"role": "user", "content": "hi"}]},
        headers=_auth(settings),
        timeout=30,
    )
    assert response.status_code == 404
    assert "not-served" in response.text


@pytest.mark.parametrize("backend", ["handle", "http", "openai"])
def test_every_drafter_backend_returns_a_validated_draft(
    backend: str,
    settings: MedvlmSettings,
    handle: DeploymentHandle,
    base_url: str,
    chest: ModelInput,
) -> None:
    import asyncio

    from serving.clients import Drafter, HandleDrafter, HttpDrafter, OpenAIChatDrafter

    assert settings.serving.api_key is not None
    key = settings.serving.api_key.get_secret_value()

    async def run() -> DraftResult:
        async with httpx.AsyncClient() as client:
            drafter: Drafter
            if backend == "handle":
                drafter = HandleDrafter(handle)
            elif backend == "http":
                drafter = HttpDrafter(client, base_url, api_key=key)
            else:
                drafter = OpenAIChatDrafter(
                    client,
                    f"{base_url}/v1",
                    settings.model.served_name,
                    max_tokens=settings.model.max_tokens,
                    api_key=key,
                )
            return await drafter.draft(chest)

    result = asyncio.run(run())
    assert result.reference == chest.reference
    jsonschema.validate(result.report.model_dump(mode="json"), report_json_schema())
    assert result.completion_tokens > 0
