"""Ways for a flow to reach the model: one ``Drafter`` interface, three backends.

- ``HandleDrafter``: a Ray Serve ``DeploymentHandle`` (flows running inside the Ray cluster);
- ``HttpDrafter``: the Serve application's ``POST /v1/reports`` (flows in their own environment
  or image, the production layout: the Prefect worker does not need vLLM installed);
- ``OpenAIChatDrafter``: any OpenAI-compatible chat-completions server (vLLM's own server, this
  project's ``/v1/chat/completions``, a hospital's model gateway), with the report JSON Schema
  as ``response_format``.

All return a validated ``DraftResult`` or raise a ``ServingError`` naming the study reference.
Retries on overload (429/503), a lost replica (500) and connection errors live here, at the
I/O edge.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import httpx
from tenacity import AsyncRetrying

from medvlm.errors import (
    EngineUnavailableError,
    InvalidModelOutputError,
    MedvlmError,
    ModelServiceStartError,
    ServingError,
    one_line,
)
from medvlm.http_edge import httpx_timeout, retry_policy, tls_verify
from medvlm.settings import HttpEdgeSettings
from pipeline.prompts import ModelInput, build_messages
from pipeline.report import DraftResult, report_json_schema, result_from_completion

# 500 too: Ray Serve answers 500 for a request whose replica died under it (a node lost:
# "The actor ... is unavailable"; measured on a three-node cluster) and starts another replica.
# A draft changes nothing, so asking again is safe; the attempts are bounded by the settings.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class Drafter(Protocol):
    """Drafts one report for one study."""

    async def draft(self, model_input: ModelInput) -> DraftResult: ...

    async def aclose(self) -> None:
        """Release what this drafter holds in the running event loop (pooled connections)."""
        ...


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in _RETRY_STATUS


class LazyDrafter:
    """A drafter started on first use: a run with nothing to draft starts no model service.

    ``start`` runs once, in a worker thread (it blocks: a local Ray and vLLM take tens of
    seconds). If it fails, every caller gets one ``ModelServiceStartError``, which stops the
    run instead of failing each study in turn; it is not tried again.
    """

    def __init__(self, start: Callable[[], Drafter]) -> None:
        self._start = start
        self._drafter: Drafter | None = None
        self._failure: ModelServiceStartError | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._drafter is not None

    def _started(self) -> Drafter:
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._drafter is None:
                try:
                    self._drafter = self._start()
                except Exception as exc:
                    why = one_line(str(exc)) or type(exc).__name__
                    self._failure = ModelServiceStartError(
                        f"the model service did not start: {why}"
                    )
                    raise self._failure from exc
            return self._drafter

    async def draft(self, model_input: ModelInput) -> DraftResult:
        drafter = self._drafter
        if drafter is None:
            drafter = await asyncio.to_thread(self._started)
        return await drafter.draft(model_input)

    async def aclose(self) -> None:
        if self._drafter is not None:
            await self._drafter.aclose()


class HandleDrafter:
    """Through a Ray Serve DeploymentHandle (in-cluster).

    A replica that dies under a request (its actor killed, its node lost) fails that request
    with a ``RayError``; drafting has no side effect, so it is sent again (``edge``: attempts,
    backoff and time budget, by default long enough for Serve to start a replica elsewhere)
    and the handle routes it to a live replica. The replica's own errors are not retried."""

    def __init__(self, handle: Any, edge: HttpEdgeSettings | None = None) -> None:
        self._handle = handle
        self._edge = edge or HttpEdgeSettings(
            retry_attempts=8, retry_initial_backoff_s=1.0, retry_budget_s=300.0
        )

    async def draft(self, model_input: ModelInput) -> DraftResult:
        """The replica's answer; Ray's wrappers are taken off at this edge: the replica's own
        error (e.g. ``InvalidModelOutputError``) is raised as it was, with its one-line message,
        not Ray's multi-line, colour-coded traceback."""
        from ray.exceptions import RayError, RayTaskError

        def lost_replica(exc: BaseException) -> bool:
            return isinstance(exc, RayError) and not isinstance(exc, RayTaskError)

        async def send() -> DraftResult:
            answer: DraftResult = await self._handle.draft.remote(model_input)
            return answer

        try:
            result: DraftResult = await AsyncRetrying(
                **retry_policy(self._edge, retry_on=lost_replica)
            )(send)
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, MedvlmError):
                raise cause from exc
            raise ServingError(
                f"{model_input.reference}: the model replica raised {type(cause).__name__}"
            ) from exc
        except RayError as exc:  # a replica or actor died, the handle could not route
            raise EngineUnavailableError(
                f"{model_input.reference}: model service unavailable ({type(exc).__name__})"
            ) from exc
        return result

    async def aclose(self) -> None:
        return None


class _HttpBase:
    """``client`` is used when given; otherwise one pooled client per event loop is made on
    first use (each run drives its studies in its own loop, and an httpx.AsyncClient belongs
    to the loop it was first used in), with ``max_connections`` keep-alive connections at
    least (the run's model concurrency)."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        api_key: str | None = None,
        edge: HttpEdgeSettings | None = None,
        max_connections: int | None = None,
    ) -> None:
        self._given = client
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]
        self._per_loop = weakref.WeakKeyDictionary()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # TLS, timeouts and retries of the model service (job.model_client).
        self._edge = edge or HttpEdgeSettings(read_timeout_s=300.0)
        # Every request the run keeps at the model needs its own connection.
        connections = max(self._edge.max_connections, max_connections or 0)
        self._limits = httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections
        )

    def _client(self) -> httpx.AsyncClient:
        if self._given is not None:
            return self._given
        loop = asyncio.get_running_loop()
        client = self._per_loop.get(loop)
        if client is None:
            client = self._per_loop[loop] = httpx.AsyncClient(
                verify=tls_verify(self._edge), trust_env=False, limits=self._limits
            )
        return client

    async def aclose(self) -> None:
        """Close the client made for the running loop (a client passed in is the caller's)."""
        client = self._per_loop.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def _post(
        self, url: str, *, reference: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {**self._headers, **(headers or {})}
        try:
            async for attempt in AsyncRetrying(**retry_policy(self._edge, retry_on=_retryable)):
                with attempt:
                    response = await self._client().post(
                        url, headers=headers, timeout=httpx_timeout(self._edge), **kwargs
                    )
                    response.raise_for_status()
                    return response
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            detail = exc.response.text[:300]
            if status == 502:
                raise InvalidModelOutputError(f"{reference}: {detail}") from exc
            if status in _RETRY_STATUS:
                raise EngineUnavailableError(f"{reference}: model service {status}") from exc
            raise ServingError(f"{reference}: model service answered {status}: {detail}") from exc
        except httpx.TransportError as exc:
            raise EngineUnavailableError(
                f"{reference}: model service unreachable ({type(exc).__name__})"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


class HttpDrafter(_HttpBase):
    """Through the Serve application's report route (``POST {base}/v1/reports``)."""

    def __init__(self, client: httpx.AsyncClient | None, base_url: str, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._url = base_url.rstrip("/") + "/v1/reports"

    async def draft(self, model_input: ModelInput) -> DraftResult:
        response = await self._post(
            self._url,
            reference=model_input.reference,
            content=model_input.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        return DraftResult.model_validate_json(response.content)


class OpenAIChatDrafter(_HttpBase):
    """Through any OpenAI-compatible ``/v1/chat/completions`` with a JSON-Schema response."""

    def __init__(
        self,
        client: httpx.AsyncClient | None,
        base_url: str,
        model: str,
        *,
        max_tokens: int,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(client, **kwargs)
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._max_tokens = max_tokens
        self._seed = seed
        self._schema = report_json_schema()

    async def draft(self, model_input: ModelInput) -> DraftResult:
        started = time.perf_counter()
        body = {
            "model": self._model,
            "messages": build_messages(model_input),
            "max_tokens": self._max_tokens,
            "temperature": 0,
            "seed": self._seed,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "draft_report", "schema": self._schema, "strict": True},
            },
        }
        response = await self._post(self._url, reference=model_input.reference, json=body)
        payload = response.json()
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
            usage = payload.get("usage") or {}
            finish_reason = str(choice.get("finish_reason"))
            prompt_tokens = int(usage.get("prompt_tokens", 0))
            completion_tokens = int(usage.get("completion_tokens", 0))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ServingError(
                f"{model_input.reference}: chat completion without the expected fields "
                f"({type(exc).__name__})"
            ) from exc
        return result_from_completion(
            text,
            reference=model_input.reference,
            finish_reason=finish_reason,
            model=str(payload.get("model", self._model)),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=time.perf_counter() - started,
            max_tokens=self._max_tokens,
        )
