"""The Ray Serve application that drafts reports with a vLLM-backed Med-VLM.

One deployment, ``MedVLMServer``, owns a ``ChatEngine`` per replica and answers four ways:

- ``draft(ModelInput) -> DraftResult`` through a ``DeploymentHandle`` (what flows use in-cluster);
- ``POST /v1/reports`` with the same ``ModelInput`` as JSON (what flows use over HTTP);
- ``POST /v1/chat/completions``, a subset of the OpenAI API (image parts as data URLs,
  ``response_format`` ``json_schema``/``json_object``), so any OpenAI client can call the model;
- ``POST /v1/generate``, a rendered prompt with its images and sampling options, as Triton's vLLM
  backend hands them to vLLM (the Triton dev server's model forwards here: medvlm/dev/triton).

Replica resources come from settings: GPUs in production, CPUs here. The HTTP proxy binds to the
configured host (loopback by default).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.handle import DeploymentHandle

from medvlm.errors import EngineUnavailableError, InvalidModelOutputError, MedvlmError, one_line
from medvlm.settings import AUTOSCALING_TUNING, MedvlmSettings, ModelSettings, ServingSettings
from pipeline.prompts import ModelInput, build_messages
from pipeline.report import (
    DraftResult,
    normalize_json,
    report_json_schema,
    result_from_completion,
)
from serving.engine import ChatEngine, GenerationOptions, VllmChatEngine
from serving.kv_cache import with_kv_cache
from serving.ray_runtime import init_ray, shutdown_ray

log = logging.getLogger("medvlm.serving")

DEPLOYMENT_NAME = "MedVLMServer"

api = FastAPI(title="medvlm serving", description="Draft radiology reports (never final).")


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    """The part of OpenAI's chat-completions request this server honours."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: Literal[False] = False
    response_format: ResponseFormat | None = None


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: a prompt already rendered with the model's chat template and its
    images, as Triton's vLLM backend takes them (``text_input``, ``image``, sampling parameters
    with guided decoding); the Triton dev server's model forwards its requests here."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    images_b64: list[str] = Field(default_factory=list)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    seed: int | None = None
    json_schema: dict[str, Any] | None = None


@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class MedVLMServer:
    def __init__(self, spec: ReplicaSpec) -> None:
        self._settings = spec.model_settings
        self._api_key = spec.api_key
        self._schema = report_json_schema()
        self._engine: ChatEngine = VllmChatEngine(
            spec.model_source, spec.model_settings, on_gpu=spec.on_gpu
        )

    async def draft(self, model_input: ModelInput) -> DraftResult:
        """Draft one report; raises ``InvalidModelOutputError`` naming the study if invalid."""
        started = time.perf_counter()
        options = GenerationOptions(
            max_tokens=self._settings.max_tokens,
            temperature=self._settings.temperature,
            seed=self._settings.seed,
            json_schema=self._schema,
        )
        result = await self._engine.chat(
            build_messages(model_input),
            options,
            request_id=f"{model_input.reference}-{uuid.uuid4().hex[:8]}",
        )
        return result_from_completion(
            result.text,
            reference=model_input.reference,
            finish_reason=result.finish_reason,
            model=result.model,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_s=time.perf_counter() - started,
            max_tokens=self._settings.max_tokens,
        )

    def _authorize(self, authorization: str | None) -> None:
        if self._api_key is None:
            return
        expected = f"Bearer {self._api_key}"
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise HTTPException(status_code=401, detail="missing or invalid bearer token")

    @api.post("/v1/reports")
    async def http_draft(
        self, model_input: ModelInput, authorization: str | None = Header(default=None)
    ) -> DraftResult:
        self._authorize(authorization)
        try:
            return await self.draft(model_input)
        except InvalidModelOutputError as exc:
            raise HTTPException(status_code=502, detail=str(exc)) from exc

    @api.get("/v1/models")
    async def models(self, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._authorize(authorization)
        return {
            "object": "list",
            "data": [{"id": self._settings.served_name, "object": "model", "owned_by": "medvlm"}],
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(
        self, request: ChatCompletionRequest, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        self._authorize(authorization)
        if request.model != self._settings.served_name:
            raise HTTPException(status_code=404, detail=f"model {request.model!r} is not served")
        schema: dict[str, Any] | None = None
        if request.response_format is not None:
            if request.response_format.type == "json_schema":
                if request.response_format.json_schema is None:
                    raise HTTPException(status_code=400, detail="json_schema format needs a schema")
                schema = request.response_format.json_schema.schema_
            elif request.response_format.type == "json_object":
                schema = {"type": "object"}
        max_tokens = (
            request.max_completion_tokens or request.max_tokens or self._settings.max_tokens
        )
        options = GenerationOptions(
            max_tokens=min(max_tokens, self._settings.max_tokens),
            temperature=self._settings.temperature
            if request.temperature is None
            else request.temperature,
            seed=self._settings.seed if request.seed is None else request.seed,
            json_schema=schema,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            result = await self._engine.chat(request.messages, options, request_id=request_id)
        except ValueError as exc:  # vLLM rejects malformed messages / images with ValueError
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        content = result.text
        if schema is not None:
            # Truncated or broken output is returned as generated; finish_reason says why.
            with contextlib.suppress(ValueError):
                content = normalize_json(result.text)
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": result.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }

    @api.post("/v1/generate")
    async def generate(
        self, request: GenerateRequest, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        self._authorize(authorization)
        try:
            images = [base64.b64decode(image, validate=True) for image in request.images_b64]
        except ValueError as exc:
            raise HTTPException(status_code=400, detail="images_b64: not base64") from exc
        max_tokens = min(request.max_tokens or self._settings.max_tokens, self._settings.max_tokens)
        options = GenerationOptions(
            max_tokens=max_tokens,
            temperature=self._settings.temperature
            if request.temperature is None
            else request.temperature,
            seed=self._settings.seed if request.seed is None else request.seed,
            json_schema=request.json_schema,
        )
        request_id = f"generate-{uuid.uuid4().hex}"
        try:
            result = await self._engine.generate(
                request.prompt, images, options, request_id=request_id
            )
        except ValueError as exc:  # vLLM rejects a prompt whose placeholders and images differ
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "model": result.model,
        }

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything one replica is built from: what ``build_app`` binds. Picklable."""

    model_source: str
    model_settings: ModelSettings
    on_gpu: bool
    api_key: str | None
    options: dict[str, Any]  # Ray Serve deployment options (replicas, resources, backpressure)


def replica_spec(settings: MedvlmSettings, model_source: str) -> ReplicaSpec:
    """Replica resources and engine settings from ``settings``."""
    serving = settings.serving
    return ReplicaSpec(
        model_source=model_source,
        model_settings=settings.model,
        on_gpu=serving.num_gpus > 0,
        api_key=serving.api_key.get_secret_value() if serving.api_key is not None else None,
        options=deployment_options(serving),
    )


def deployment_options(serving: ServingSettings) -> dict[str, Any]:
    """Ray Serve deployment options: a fixed ``num_replicas`` or an ``autoscaling_config``
    (never both), backpressure, replica resources and placement.

    The autoscaling config is checked against Ray Serve's own ``AutoscalingConfig`` here, so a
    value Serve would refuse fails when the application is built, not when it is deployed.
    """
    options: dict[str, Any] = {}
    if serving.max_replicas is None:
        options["num_replicas"] = serving.num_replicas or 1
    else:
        autoscaling: dict[str, Any] = {
            "min_replicas": 1 if serving.min_replicas is None else serving.min_replicas,
            "max_replicas": serving.max_replicas,
        }
        for name in AUTOSCALING_TUNING:
            value = getattr(serving, name)
            if value is not None:
                autoscaling[name] = value
        AutoscalingConfig(**autoscaling)
        options["autoscaling_config"] = autoscaling
    options["max_ongoing_requests"] = serving.max_ongoing_requests
    options["ray_actor_options"] = {"num_cpus": serving.num_cpus, "num_gpus": serving.num_gpus}
    if serving.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = serving.max_replicas_per_node
    return options


def build_app(settings: MedvlmSettings, model_source: str) -> serve.Application:
    """Bind the deployment with replica resources and engine settings from ``settings``."""
    spec = replica_spec(settings, model_source)
    deployment: serve.Deployment = MedVLMServer  # type: ignore[assignment]
    return deployment.options(**spec.options).bind(spec)


# serve.start() waits a fixed 60 s for its HTTP proxies (Ray 2.60, not settable); a loaded machine
# can need more (measured: ~70-88 s on 2 busy cores). Asking again waits again on the same proxies.
_SERVE_START_ATTEMPTS = 3


def run_app(settings: MedvlmSettings, model_source: str) -> DeploymentHandle[Any]:
    """Start Serve's HTTP proxy on the configured host/port and run the application.

    A Serve that does not come up is one ``EngineUnavailableError`` with a hint, not Ray's
    traceback.
    """
    serving = settings.serving
    for attempt in range(1, _SERVE_START_ATTEMPTS + 1):
        try:
            serve.start(
                proxy_location=serving.proxy_location,
                http_options={"host": serving.host, "port": serving.port},
            )
            break
        except Exception as exc:  # Ray Serve raises TimeoutError, RayServeException, RayError
            if attempt == _SERVE_START_ATTEMPTS:
                raise EngineUnavailableError(
                    f"Ray Serve did not start its HTTP proxy on {serving.host}:{serving.port} "
                    f"({attempt} attempts): {type(exc).__name__}: {one_line(str(exc))}; hint: is "
                    "the port free, and the machine not overloaded? (MEDVLM_SERVING__PORT)"
                ) from exc
            log.warning("Serve's HTTP proxy not ready yet (%s); waiting again", type(exc).__name__)
    try:
        return serve.run(
            build_app(settings, model_source),
            name=serving.app_name,
            route_prefix=serving.route_prefix,
            blocking=False,
        )
    except MedvlmError:
        raise
    except Exception as exc:  # a replica failing in its constructor surfaces here
        raise EngineUnavailableError(
            f"the model service did not start: {type(exc).__name__}: {one_line(str(exc))}; "
            "hint: the replica's log under the Ray session's logs/serve says why"
        ) from exc


def start_model_service(
    settings: MedvlmSettings, model_source: str, *, num_cpus: int | None = None
) -> DeploymentHandle[Any]:
    """Size the KV cache, start (or join) Ray and run the application; the one way in.

    On failure after Ray started, Ray is shut down again; on success the caller stops it with
    ``serving.ray_runtime.shutdown_ray``.
    """
    settings = with_kv_cache(settings, model_source)
    init_ray(settings.serving, num_cpus=num_cpus, bind_shim=settings.bind_shim)
    try:
        return run_app(settings, model_source)
    except BaseException:
        shutdown_ray()
        raise
