"""Side-by-side cost of the serving layer: raw vLLM engine vs Ray Serve handle vs Serve HTTP
vs Triton Inference Server (HTTP and gRPC).

Identical requests (the sample chest radiograph, the report schema, greedy decoding) go first to
``VllmChatEngine`` in this process, then through the Ray Serve deployment by handle and by HTTP,
then through the Triton dev server (medvlm/dev/triton.py: a real ``tritonserver`` whose model
takes the vLLM backend's tensors and runs them on the same Serve deployment) with
``TritonDrafter`` over HTTP and gRPC. Prints per-path latency and generated tokens/s, and the
ratios to raw vLLM, from one run. The Triton rows need its venv (scripts/install-triton.sh);
without it they are left out with a note (or ``--no-triton``).

    .venv/bin/python bench/bench_serving.py [--requests 8] [--concurrency 4] [--no-triton]

Use a loopback-only namespace as the tests do: ``unshare -n sh -c 'ip link set lo up && ...'``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@dataclass
class Run:
    name: str
    wall_s: float
    latencies: list[float]
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def _measure(
    name: str, call: Callable[[], Awaitable[int]], requests: int, concurrency: int
) -> Run:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one() -> int:
        async with semaphore:
            started = time.perf_counter()
            tokens = await call()
            latencies.append(time.perf_counter() - started)
            return tokens

    await call()  # warm-up, not counted
    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one() for _ in range(requests))))
    return Run(name, time.perf_counter() - started, latencies, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--triton", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    import httpx

    from medvlm.dev.demo import sample_model_input
    from medvlm.dev.tiny_model import with_tiny_checkpoint
    from medvlm.settings import MedvlmSettings
    from pipeline.prompts import build_messages
    from pipeline.report import report_json_schema
    from serving.app import start_model_service
    from serving.engine import GenerationOptions, VllmChatEngine
    from serving.kv_cache import with_kv_cache
    from serving.model_source import resolve_model
    from serving.ray_runtime import shutdown_ray

    settings = MedvlmSettings()
    settings.model.allow_random_weights = True  # the tiny model unless MEDVLM_MODEL__SOURCE is set
    settings = with_tiny_checkpoint(settings)
    resolved = resolve_model(settings)
    settings = with_kv_cache(settings, resolved.source)
    model_input = sample_model_input()
    messages = build_messages(model_input)
    options = GenerationOptions(
        max_tokens=settings.model.max_tokens,
        temperature=0.0,
        seed=0,
        json_schema=report_json_schema(),
    )

    runs: list[Run] = []
    engine = VllmChatEngine(resolved.source, settings.model, on_gpu=False)

    async def raw() -> int:
        return (await engine.chat(messages, options, request_id=None)).completion_tokens

    runs.append(asyncio.run(_measure("raw vLLM", raw, args.requests, args.concurrency)))
    engine.shutdown()

    handle = start_model_service(settings, resolved.source)
    try:

        async def by_handle() -> int:
            return int((await handle.draft.remote(model_input)).completion_tokens)

        url = f"http://127.0.0.1:{settings.serving.port}/v1/reports"
        body = model_input.model_dump_json()

        async def by_http() -> int:
            async with httpx.AsyncClient(timeout=600) as client:
                response = await client.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
                response.raise_for_status()
                return int(response.json()["completion_tokens"])

        runs.append(
            asyncio.run(_measure("Serve handle", by_handle, args.requests, args.concurrency))
        )
        runs.append(asyncio.run(_measure("Serve HTTP", by_http, args.requests, args.concurrency)))
        if args.triton:
            runs += _triton_runs(settings, resolved.source, model_input, args)
    finally:
        shutdown_ray()

    base = runs[0]
    print(f"\nmodel {resolved.version}; {args.requests} requests, concurrency {args.concurrency}")
    print(f"{'path':<14}{'wall s':>8}{'p50 s':>8}{'tok/s':>9}{'wall / raw':>12}")
    for run in runs:
        print(
            f"{run.name:<14}{run.wall_s:>8.2f}{statistics.median(run.latencies):>8.2f}"
            f"{run.tokens_per_s:>9.0f}{run.wall_s / base.wall_s:>12.2f}"
        )


def _triton_runs(settings: Any, source: str, model_input: Any, args: Any) -> list[Run]:
    """The Triton dev server in front of the running Serve app, drafted through by HTTP and
    gRPC with ``TritonDrafter`` (what ``MEDVLM_JOB__MODEL_ENDPOINT=triton`` builds)."""
    import socket
    import tempfile
    from pathlib import Path

    from medvlm.dev.triton import TritonDevServer, TritonPorts
    from medvlm.settings import TritonSettings
    from serving.triton_drafter import build_triton_drafter

    venv = settings.dev.triton_venv
    if venv is None or not (venv / "bin" / "python").is_file():
        print(f"note: no Triton venv at {venv} (bash scripts/install-triton.sh): no Triton rows")
        return []

    def port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    api_key = settings.serving.api_key
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="medvlm-bench-triton-") as workdir,
        TritonDevServer(
            venv,
            Path(workdir),
            serve_url=f"http://127.0.0.1:{settings.serving.port}",
            serve_api_key=api_key.get_secret_value() if api_key is not None else None,
            ports=TritonPorts(http=port(), grpc=port(), metrics=port()),
        ) as triton,
    ):
        for protocol, url in (("http", triton.http_url), ("grpc", triton.grpc_url)):
            drafter = build_triton_drafter(
                TritonSettings.model_validate(
                    {"url": url, "protocol": protocol, "max_connections": args.concurrency}
                ),
                model_source=source,
                max_tokens=settings.model.max_tokens,
                seed=settings.model.seed,
            )

            async def measure(name: str = f"Triton {protocol}", d: Any = drafter) -> Run:
                async def call() -> int:
                    return int((await d.draft(model_input)).completion_tokens)

                try:
                    return await _measure(name, call, args.requests, args.concurrency)
                finally:
                    await d.aclose()

            runs.append(asyncio.run(measure()))
    return runs


if __name__ == "__main__":
    main()
