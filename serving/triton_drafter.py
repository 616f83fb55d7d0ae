"""Drafting through a Triton Inference Server: ``job.model_endpoint=triton`` (issue 19).

Hospitals that already serve models with Triton (NVIDIA Clara/MONAI deployments, PACS AI
gateways), often with its vLLM backend, draft through it as through Ray Serve: ``TritonDrafter``
is one more ``Drafter`` (serving/clients.py), over HTTP or gRPC.

The wire contract is the one of Triton's vLLM backend (triton-inference-server/vllm_backend,
``src/model.py`` auto-completed config and ``src/utils/request.py``), so a site's own
``backend: "vllm"`` model answers unchanged (serving/triton/ is an example repository):

inputs (no batch dimension; the vLLM backend batches in vLLM itself)
  ``text_input`` BYTES [1]: the conversation rendered with the model's chat template (system
      turn, then the user turn with one image placeholder per image, then the generation prompt):
      the vLLM backend hands its prompt to vLLM as it is and applies no template;
  ``image`` BYTES [n]: each image as base64 of its PNG, in the order of the placeholders (left
      out when a study has no image); the backend decodes them into ``multi_modal_data``;
  ``stream`` BOOL [1]: false; ``exclude_input_in_output`` BOOL [1]: true;
  ``sampling_parameters`` BYTES [1]: JSON of vLLM ``SamplingParams`` fields: ``max_tokens``,
      ``temperature`` (0), ``seed`` and ``structured_outputs``, itself a JSON string of
      ``{"json": <report JSON Schema>}`` (vLLM's ``StructuredOutputsParams``; the backend
      decodes it with ``json.loads``), i.e. guided decoding to the report schema;
  ``return_finish_reason``, ``return_num_input_tokens``, ``return_num_output_tokens`` BOOL [1]:
      true (optional outputs, used for the draft's metadata).
outputs
  ``text_output`` BYTES [1]: the generated JSON; ``finish_reason`` BYTES [1];
  ``num_input_tokens`` UINT32 [1]; ``num_output_tokens`` UINT32 [1] (the last three optional).

The vLLM backend is a decoupled model, which KServe v2's unary infer refuses on both protocols:
gRPC sends the request as a one-request stream (``ModelStreamInfer``, tritonclient's asyncio
``stream_infer``), HTTP to Triton's generate extension (``POST /v2/models/<name>/generate``,
each tensor a JSON field, with httpx: tritonclient's HTTP client has no generate call).

The answer is validated like every backend's (``result_from_completion``). UNAVAILABLE (gRPC),
429/502/503/504 (HTTP), timeouts and connection failures are retried with backoff within
``job.triton``'s retry budget, then fail the study with ``EngineUnavailableError``; every error
names the study by its reference (a pseudonym), never by a patient's identifiers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
from tenacity import AsyncRetrying

from medvlm.errors import (
    ConfigurationError,
    EngineUnavailableError,
    InvalidModelOutputError,
    ServingError,
    one_line,
)
from medvlm.http_edge import httpx_timeout, retry_policy, tls_verify
from medvlm.settings import TritonSettings
from pipeline.prompts import ModelInput, build_messages
from pipeline.report import DraftResult, report_json_schema, result_from_completion

# The tensor names of Triton's vLLM backend.
TEXT_INPUT = "text_input"
IMAGE_INPUT = "image"
STREAM_INPUT = "stream"
SAMPLING_INPUT = "sampling_parameters"
EXCLUDE_INPUT = "exclude_input_in_output"
RETURN_FLAGS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")
TEXT_OUTPUT = "text_output"
FINISH_REASON_OUTPUT = "finish_reason"
INPUT_TOKENS_OUTPUT = "num_input_tokens"
OUTPUT_TOKENS_OUTPUT = "num_output_tokens"
_TOKEN_OUTPUTS = (INPUT_TOKENS_OUTPUT, OUTPUT_TOKENS_OUTPUT)

# HTTP answers and gRPC codes worth another attempt: the server (or the model) is not there yet,
# is overloaded, or a proxy in front of it lost it. A draft changes nothing, so asking again is
# safe; attempts and time are bounded by job.triton.
_RETRY_HTTP = frozenset({"429", "502", "503", "504"})
_RETRY_GRPC = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.DEADLINE_EXCEEDED"}
)


# --------------------------------------------------------------------------------------------
# The chat template: Triton's vLLM backend takes a rendered prompt.


def _read_template(where: Path) -> tuple[str, dict[str, str]]:
    """The template text and its special tokens from a .jinja file or a checkpoint folder."""
    tokens: dict[str, str] = {}
    if where.is_dir():
        config_path = where / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for name in ("bos_token", "eos_token"):
                token = config.get(name)
                if isinstance(token, dict):
                    token = token.get("content")
                if isinstance(token, str):
                    tokens[name] = token
        jinja = where / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), tokens
        template = config.get("chat_template")
        if isinstance(template, str):
            return template, tokens
        raise ConfigurationError(
            f"no chat template in {where} (chat_template.jinja or tokenizer_config.json)"
        )
    if where.is_file():
        return where.read_text(encoding="utf-8"), tokens
    raise ConfigurationError(f"job.triton.chat_template {where} does not exist")


class ChatTemplate:
    """A Hugging Face chat template, rendered as transformers and vLLM render it (a sandboxed
    Jinja environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and
    ``tojson``)."""

    def __init__(self, source: str, *, special_tokens: dict[str, str] | None = None) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(value: Any, indent: int | None = None) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigurationError(f"the chat template does not parse: {exc}") from exc
        self._tokens = dict(special_tokens or {})

    @classmethod
    def load(cls, where: Path) -> ChatTemplate:
        text, tokens = _read_template(where)
        return cls(text, special_tokens=tokens)

    def render(self, messages: list[dict[str, Any]], *, add_vision_id: bool = False) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                add_vision_id=add_vision_id,
                **self._tokens,
            )
        except TemplateError as exc:
            raise ServingError(f"the chat template failed: {one_line(str(exc))}") from exc


@dataclass(frozen=True)
class TritonRequest:
    """One draft request as Triton's vLLM backend takes it (see the module's docstring)."""

    prompt: str
    images_b64: tuple[bytes, ...]
    sampling_parameters: dict[str, Any]

    def tensors(self) -> list[tuple[str, str, np.ndarray[Any, Any]]]:
        """``(name, Triton datatype, value)`` of every input tensor."""
        tensors: list[tuple[str, str, np.ndarray[Any, Any]]] = [
            (TEXT_INPUT, "BYTES", np.array([self.prompt.encode("utf-8")], dtype=np.object_)),
            (STREAM_INPUT, "BOOL", np.array([False], dtype=bool)),
            (EXCLUDE_INPUT, "BOOL", np.array([True], dtype=bool)),
            (
                SAMPLING_INPUT,
                "BYTES",
                np.array(
                    [json.dumps(self.sampling_parameters, separators=(",", ":")).encode()],
                    dtype=np.object_,
                ),
            ),
        ]
        if self.images_b64:
            tensors.append((IMAGE_INPUT, "BYTES", np.array(self.images_b64, dtype=np.object_)))
        tensors += [(flag, "BOOL", np.array([True], dtype=bool)) for flag in RETURN_FLAGS]
        return tensors


def build_request(
    model_input: ModelInput,
    template: ChatTemplate,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = 0,
    schema: dict[str, Any] | None = None,
    add_vision_id: bool = False,
) -> TritonRequest:
    """The project's prompt (``build_messages``, the same as every backend's) as the vLLM
    backend's tensors: image parts become the template's placeholders and the ``image`` tensor,
    the report schema becomes guided decoding."""
    images: list[bytes] = []
    conversation: list[dict[str, Any]] = []
    for message in build_messages(model_input):
        content = message["content"]
        if isinstance(content, str):
            conversation.append({"role": message["role"], "content": content})
            continue
        assert isinstance(content, list)
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] == "image_url":
                url = str(part["image_url"]["url"])
                _, _, data = url.partition("base64,")
                images.append(data.encode("ascii"))
                parts.append({"type": "image"})
            else:
                parts.append(dict(part))
        conversation.append({"role": message["role"], "content": parts})
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        sampling["seed"] = seed
    schema = report_json_schema() if schema is None else schema
    sampling["structured_outputs"] = json.dumps({"json": schema}, separators=(",", ":"))
    return TritonRequest(
        prompt=template.render(conversation, add_vision_id=add_vision_id),
        images_b64=tuple(images),
        sampling_parameters=sampling,
    )


# --------------------------------------------------------------------------------------------
# The client.


def triton_address(settings: TritonSettings) -> tuple[str, bool]:
    """``host:port`` as tritonclient takes it, and whether TLS is on."""
    if not settings.url:
        raise ConfigurationError("job.triton.url is required for job.model_endpoint=triton")
    url = settings.url.strip().rstrip("/")
    secure = url.startswith("https://") or url.startswith("grpcs://")
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    if "/" in url or not url:
        raise ConfigurationError(f"job.triton.url {settings.url!r} is not host:port")
    return url, secure


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    value = status() if callable(status) else status
    return "" if value is None else str(value)


class TritonAnswerError(Exception):
    """An answer of Triton's generate endpoint that is not a draft (HTTP status and message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = str(status)
        self.message = message


def retryable(exc: BaseException) -> bool:
    """Another attempt may succeed: the server is restarting, overloaded or not reachable."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        return _status(exc) in _RETRY_GRPC
    if isinstance(exc, TritonAnswerError):
        return exc.status in _RETRY_HTTP
    return isinstance(exc, (httpx.TransportError, asyncio.TimeoutError, OSError))


class _Answer:
    """One response's output tensors by name, from either protocol."""

    def __init__(self, outputs: dict[str, np.ndarray[Any, Any]]) -> None:
        self._outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray[Any, Any] | None:
        return self._outputs.get(name)


class TritonDrafter:
    """Through a Triton Inference Server model with the vLLM backend's tensors.

    Triton's vLLM backend is a *decoupled* model (its responses are sent apart from the request),
    which KServe v2's unary infer refuses on both protocols. So the request goes, as Triton's own
    vLLM clients send it: over gRPC as a one-request stream (``ModelStreamInfer``, tritonclient's
    asyncio ``stream_infer``), over HTTP to Triton's generate extension
    (``POST /v2/models/<name>[/versions/<v>]/generate``, the tensors as JSON fields, httpx);
    with ``stream`` false the model sends one response with the whole text.
    One client per event loop (each run drives its studies in its own loop; a gRPC aio channel
    and an httpx client belong to the loop they were made in)."""

    def __init__(
        self,
        settings: TritonSettings,
        template: ChatTemplate,
        *,
        max_tokens: int,
        seed: int | None = 0,
        max_connections: int | None = None,
    ) -> None:
        self._settings = settings
        self._template = template
        self._max_tokens = max_tokens
        self._seed = seed
        self._address, self._secure = triton_address(settings)
        self._protocol: Literal["http", "grpc"] = settings.protocol
        self._connections = max(settings.max_connections, max_connections or 0)
        self._schema = report_json_schema()
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]
        self._per_loop = weakref.WeakKeyDictionary()

    @property
    def where(self) -> str:
        return f"Triton {self._protocol} {self._address} model {self._settings.model_name!r}"

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._per_loop.get(loop)
        if client is not None:
            return client
        edge = self._settings
        if self._protocol == "grpc":
            import tritonclient.grpc.aio as grpcclient

            root = edge.ca_bundle.read_bytes() if (self._secure and edge.ca_bundle) else None
            client = grpcclient.InferenceServerClient(
                self._address, ssl=self._secure, root_certificates=root
            )
        else:
            scheme = "https" if self._secure else "http"
            client = httpx.AsyncClient(
                base_url=f"{scheme}://{self._address}",
                timeout=httpx_timeout(edge),
                verify=tls_verify(edge),
                limits=httpx.Limits(max_connections=self._connections),
                trust_env=False,
            )
        self._per_loop[loop] = client
        return client

    def _path(self) -> str:
        edge = self._settings
        version = f"/versions/{edge.model_version}" if edge.model_version else ""
        return f"/v2/models/{edge.model_name}{version}/generate"

    async def _infer(self, request: TritonRequest, request_id: str) -> _Answer:
        if self._protocol == "grpc":
            return await self._stream_infer(request, request_id)
        return await self._generate(request, request_id)

    async def _generate(self, request: TritonRequest, request_id: str) -> _Answer:
        body: dict[str, Any] = {"id": request_id}
        for name, _, value in request.tensors():
            items = [_text(v) if isinstance(v, bytes) else v.item() for v in value.reshape(-1)]
            body[name] = items if name == IMAGE_INPUT else items[0]
        response = await self._client().post(self._path(), json=body)
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if response.status_code != 200 or "error" in answer:
            why = str(answer.get("error") or response.text or response.reason_phrase)
            raise TritonAnswerError(response.status_code, one_line(why))
        outputs: dict[str, np.ndarray[Any, Any]] = {}
        for name in (TEXT_OUTPUT, FINISH_REASON_OUTPUT):
            if name in answer:
                outputs[name] = np.array([str(answer[name]).encode("utf-8")], dtype=np.object_)
        for name in (INPUT_TOKENS_OUTPUT, OUTPUT_TOKENS_OUTPUT):
            if name in answer:
                outputs[name] = np.asarray(answer[name], dtype=np.int64).reshape(-1)
        return _Answer(outputs)

    async def _stream_infer(self, request: TritonRequest, request_id: str) -> _Answer:
        import tritonclient.grpc as grpcclient

        edge = self._settings
        inputs = []
        for name, datatype, value in request.tensors():
            tensor = grpcclient.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)

        async def one_request() -> Any:
            yield {
                "model_name": edge.model_name,
                "inputs": inputs,
                "model_version": edge.model_version,
                "request_id": request_id,
            }

        import grpc
        from tritonclient.utils import InferenceServerException

        stream = self._client().stream_infer(one_request(), stream_timeout=edge.read_timeout_s)
        try:
            async for result, error in stream:
                if error is not None:  # the model's or the server's message (no status)
                    raise error
                if result.as_numpy(TEXT_OUTPUT) is None:  # an empty final response
                    continue
                return _Answer(
                    {
                        name: value
                        for name in (TEXT_OUTPUT, FINISH_REASON_OUTPUT, *_TOKEN_OUTPUTS)
                        if (value := result.as_numpy(name)) is not None
                    }
                )
        except grpc.RpcError as exc:  # the stream itself: unreachable, deadline, cancelled
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            raise InferenceServerException(msg=str(details), status=str(code)) from exc
        finally:
            stream.cancel()
        raise InvalidModelOutputError(f"{self.where} ended the stream without a response")

    async def draft(self, model_input: ModelInput) -> DraftResult:
        from tritonclient.utils import InferenceServerException

        reference = model_input.reference
        started = time.perf_counter()
        request = build_request(
            model_input,
            self._template,
            max_tokens=self._max_tokens,
            seed=self._seed,
            schema=self._schema,
            add_vision_id=self._settings.add_vision_id,
        )
        request_id = f"{reference}-{uuid.uuid4().hex[:8]}"[:128]
        try:
            result: _Answer = await AsyncRetrying(
                **retry_policy(self._settings, retry_on=retryable)
            )(self._infer, request, request_id)
        except (InferenceServerException, TritonAnswerError) as exc:
            message = exc.message() if callable(exc.message) else exc.message
            why = one_line(message or "") or "no message"
            status = _status(exc)
            if retryable(exc):
                raise EngineUnavailableError(
                    f"{reference}: {self.where} unavailable ({status}): {why}"[:500]
                ) from exc
            raise ServingError(
                f"{reference}: {self.where} refused the request ({status or 'error'}): {why}"[:500]
            ) from exc
        except (TimeoutError, OSError, httpx.TransportError) as exc:
            raise EngineUnavailableError(
                f"{reference}: {self.where} unreachable ({type(exc).__name__})"
            ) from exc
        except InvalidModelOutputError as exc:
            raise InvalidModelOutputError(f"{reference}: {exc}") from exc
        return self._result(result, reference, started)

    def _result(self, result: _Answer, reference: str, started: float) -> DraftResult:
        text_output = result.as_numpy(TEXT_OUTPUT)
        if text_output is None or text_output.size == 0:
            raise InvalidModelOutputError(f"{reference}: {self.where} returned no {TEXT_OUTPUT}")
        text = _text(text_output.reshape(-1)[0])
        reasons = result.as_numpy(FINISH_REASON_OUTPUT)
        finish_reason = _text(reasons.reshape(-1)[0]) if reasons is not None else "stop"
        return result_from_completion(
            text,
            reference=reference,
            finish_reason=finish_reason,
            model=self._settings.model_name,
            prompt_tokens=_count(result.as_numpy(INPUT_TOKENS_OUTPUT)),
            completion_tokens=_count(result.as_numpy(OUTPUT_TOKENS_OUTPUT)),
            latency_s=time.perf_counter() - started,
            max_tokens=self._max_tokens,
        )

    async def aclose(self) -> None:
        """Close the client made for the running loop."""
        client = self._per_loop.pop(asyncio.get_running_loop(), None)
        if client is None:
            return
        if isinstance(client, httpx.AsyncClient):
            await client.aclose()
        else:
            await client.close()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _count(value: np.ndarray[Any, Any] | None) -> int:
    if value is None or value.size == 0:
        return 0
    return int(value.reshape(-1).sum())


def build_triton_drafter(
    settings: TritonSettings,
    *,
    model_source: str | None,
    max_tokens: int,
    seed: int | None,
    max_connections: int | None = None,
) -> TritonDrafter:
    """The drafter of ``job.model_endpoint=triton``: the chat template from
    ``job.triton.chat_template``, else from ``model.source`` when it is a local folder."""
    where = settings.chat_template
    if where is None and model_source is not None and Path(model_source).is_dir():
        where = Path(model_source)
    if where is None:
        raise ConfigurationError(
            "job.triton.chat_template is required for job.model_endpoint=triton (the served "
            "model's chat template, or its checkpoint folder): Triton's vLLM backend takes a "
            "rendered prompt"
        )
    return TritonDrafter(
        settings,
        ChatTemplate.load(where),
        max_tokens=max_tokens,
        seed=seed,
        max_connections=max_connections,
    )
