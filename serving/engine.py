"""The model engine interface and its vLLM implementation.

``ChatEngine`` is what the Ray Serve application (and anything else) talks to: OpenAI-style chat
messages in (text and ``image_url`` parts, images as data URLs), text out, optionally constrained
by a JSON Schema. ``VllmChatEngine`` runs vLLM's ``AsyncLLM`` in-process; the same code loads the
tiny test checkpoint and a production checkpoint (path or hub id) — only settings differ.

Building an engine spawns processes and loads weights: it happens in a Serve replica's
constructor or a test fixture, never at import.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

from medvlm.errors import EngineUnavailableError, ServingError
from medvlm.settings import ModelSettings
from serving.kv_cache import cpu_kv_cache

ChatMessage = dict[str, Any]


@dataclass(frozen=True)
class ChatResult:
    """One completed generation. Picklable; crosses Ray process boundaries."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request sampling options."""

    max_tokens: int
    temperature: float = 0.0
    seed: int | None = 0
    json_schema: dict[str, Any] | None = None


class ChatEngine(Protocol):
    """A chat model that can be constrained to a JSON Schema."""

    model_name: str

    async def chat(
        self, messages: list[ChatMessage], options: GenerationOptions, *, request_id: str | None
    ) -> ChatResult: ...

    async def generate(
        self,
        prompt: str,
        images: Sequence[bytes],
        options: GenerationOptions,
        *,
        request_id: str | None,
    ) -> ChatResult: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


def kv_cache_args(settings: ModelSettings, model_path: str, *, on_gpu: bool) -> dict[str, Any]:
    """vLLM's KV cache arguments: a GPU memory fraction on GPUs, a size in bytes on CPU.

    On CPU an unset ``kv_cache_bytes`` is computed from the checkpoint (serving/kv_cache.py);
    entry points that start Ray locally do that before Ray starts and pass the result down, so
    here it is computed only in replicas of a cluster that was joined by address.
    """
    explicit = None if settings.kv_cache_bytes is None else int(settings.kv_cache_bytes)
    if on_gpu:
        fraction = settings.kv_cache_memory_fraction or 0.9
        return {"gpu_memory_utilization": fraction, "kv_cache_memory_bytes": explicit}
    if explicit is None:
        explicit = cpu_kv_cache(settings, model_path, local_node=True).bytes
    return {"kv_cache_memory_bytes": explicit}


class VllmChatEngine:
    """``ChatEngine`` on vLLM's ``AsyncLLM`` with xgrammar structured outputs."""

    def __init__(self, model_path: str, settings: ModelSettings, *, on_gpu: bool) -> None:
        # vLLM reads its device choice from the environment at import; the CPU wheel needs it
        # when a CUDA-built torch is installed beside it (see README, CPU install).
        if not on_gpu:
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_name = settings.served_name
        self._settings = settings
        args = AsyncEngineArgs(
            model=model_path,
            served_model_name=[settings.served_name],
            dtype=settings.dtype,  # type: ignore[arg-type]
            max_model_len=settings.max_model_len,
            seed=settings.seed,
            max_num_seqs=settings.max_num_seqs,
            **kv_cache_args(settings, model_path, on_gpu=on_gpu),
            tensor_parallel_size=settings.tensor_parallel_size,
            limit_mm_per_prompt={"image": settings.max_images_per_prompt},
            enforce_eager=settings.enforce_eager,
            trust_remote_code=settings.trust_remote_code,
            # Without this a weak model may fill the JSON with whitespace until max_tokens
            # (measured: invalid, truncated JSON); the per-request flag did not help.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
        )
        try:
            self._engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:  # vLLM raises many types while loading; one place translates
            raise EngineUnavailableError(
                f"vLLM could not load model {settings.served_name!r}: {type(exc).__name__}: {exc}"
            ) from exc

    async def chat(
        self, messages: list[ChatMessage], options: GenerationOptions, *, request_id: str | None
    ) -> ChatResult:
        from vllm.renderers.params import ChatParams

        renderer = self._engine.renderer
        # The chat template emits BOS/EOS itself; same parameters as vLLM's own LLM.chat().
        chat_params = ChatParams(
            chat_template_kwargs={
                "add_generation_prompt": True,
                "continue_final_message": False,
                "tools": None,
                "tokenize": False,
            }
        )
        tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        conversation: list[Any] = list(messages)
        _, (engine_input,) = await renderer.render_chat_async(
            [conversation], chat_params, tok_params
        )
        return await self._run(engine_input, options, request_id)

    async def generate(
        self,
        prompt: str,
        images: Sequence[bytes],
        options: GenerationOptions,
        *,
        request_id: str | None,
    ) -> ChatResult:
        """A prompt already rendered with the chat template and its images (encoded PNG or
        JPEG, one per placeholder), handed to vLLM as Triton's vLLM backend hands them:
        ``{"prompt", "multi_modal_data": {"image": [...]}}`` (serving/triton_drafter.py)."""
        from PIL import Image

        engine_input: dict[str, Any] = {"prompt": prompt}
        if images:
            try:
                decoded = [Image.open(BytesIO(image)).convert("RGB") for image in images]
            except OSError as exc:
                raise ValueError(f"an image does not decode: {exc}") from exc
            engine_input["multi_modal_data"] = {"image": decoded}
        return await self._run(engine_input, options, request_id)

    async def _run(
        self, engine_input: Any, options: GenerationOptions, request_id: str | None
    ) -> ChatResult:
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams

        sampling = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            seed=options.seed,
            structured_outputs=(
                StructuredOutputsParams(json=options.json_schema)
                if options.json_schema is not None
                else None
            ),
        )
        final = None
        async for output in self._engine.generate(
            engine_input, sampling, request_id or uuid.uuid4().hex
        ):
            final = output
        if final is None or not final.outputs:
            raise ServingError(f"vLLM returned no output for request {request_id}")
        completion = final.outputs[0]
        return ChatResult(
            text=completion.text,
            finish_reason=str(completion.finish_reason),
            prompt_tokens=len(final.prompt_token_ids or []),
            completion_tokens=len(completion.token_ids),
            model=self.model_name,
        )

    async def check_health(self) -> None:
        try:
            await self._engine.check_health()
        except Exception as exc:
            raise EngineUnavailableError(f"vLLM engine unhealthy: {exc}") from exc

    def shutdown(self) -> None:
        self._engine.shutdown()
        # vLLM 0.32's shutdown closes the client's ZMQ sockets but not its ZMQ context; pyzmq
        # then warns (ResourceWarning) whenever the context is garbage-collected, which in a
        # long-lived process can be anywhere. Destroy it here (a no-op if vLLM starts doing so).
        # Only when no event loop is still to close the sockets (vLLM hands that to the loop
        # that ran the engine if it is alive): destroying a context under a thread that still
        # uses its sockets aborts the process in libzmq.
        resources = getattr(getattr(self._engine, "engine_core", None), "resources", None)
        context = getattr(resources, "ctx", None)
        task = getattr(resources, "output_queue_task", None)
        loop = getattr(task, "_loop", None)
        if context is not None and not context.closed and (loop is None or loop.is_closed()):
            context.destroy(linger=0)
