"""The ``medvlm`` command line.

Settings are loaded once here (``MedvlmSettings()``: environment, ``MEDVLM_`` prefix) and passed
down. Commands print for people (rich); errors of the project's own tree end with a one-line
message and exit code 1, without a traceback and without patient data.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax

from medvlm.cli_dev import app as dev_app
from medvlm.errors import MedvlmError
from medvlm.settings import MedvlmSettings, TinyArchitecture

app = typer.Typer(
    name="medvlm",
    help="Draft preliminary radiology reports with medical vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Model checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console()


def _settings() -> MedvlmSettings:
    try:
        return MedvlmSettings()
    except ValueError as exc:  # pydantic ValidationError: invalid settings fail at start-up
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


def _fail(exc: MedvlmError) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1) from exc


@model_app.command("build-tiny")
def build_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    architecture: Annotated[str, typer.Option(help="qwen2_vl or gemma3.")] = "qwen2_vl",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
) -> None:
    """Build a tiny random-weight VLM checkpoint offline (for tests and demos only)."""
    from serving.tiny_model import build_tiny_checkpoint, weights_sha256

    if architecture not in ("qwen2_vl", "gemma3"):
        console.print(f"[red]unknown architecture {architecture!r}[/red]")
        raise typer.Exit(2)
    arch: TinyArchitecture = "qwen2_vl" if architecture == "qwen2_vl" else "gemma3"
    started = time.perf_counter()
    path = build_tiny_checkpoint(out_dir, architecture=arch, seed=seed)
    console.print(
        f"built {arch} checkpoint at {path} in {time.perf_counter() - started:.1f}s, "
        f"weights sha256 {weights_sha256(path)[:16]}"
    )


@app.command()
def serve() -> None:
    """Run the model service (Ray Serve + vLLM) in the foreground until interrupted."""
    from serving.app import run_app
    from serving.model_source import resolve_model
    from serving.ray_runtime import init_ray, shutdown_ray

    settings = _settings()
    try:
        resolved = resolve_model(settings)
        init_ray(settings.serving, bind_shim=settings.bind_shim)
        run_app(settings, resolved.source)
    except MedvlmError as exc:
        _fail(exc)
    console.print(
        f"serving {settings.model.served_name} ({resolved.version}) on "
        f"http://{settings.serving.host}:{settings.serving.port}{settings.serving.route_prefix} "
        "— Ctrl-C to stop"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_ray()


@app.command()
def demo() -> None:
    """Draft a report for a real chest radiograph: real vLLM in Ray Serve, embedded defaults."""
    from flows.demo import run_demo

    settings = _settings()
    console.print("starting the model service (Ray Serve + vLLM); the first start takes a minute…")
    try:
        resolved, result = run_demo(settings)
    except MedvlmError as exc:
        _fail(exc)
        return
    tokens_per_s = result.completion_tokens / result.latency_s if result.latency_s else 0.0
    console.print(
        Panel(
            Syntax(json.dumps(result.report.model_dump(mode="json"), indent=2), "json"),
            title=f"DRAFT — preliminary, AI-generated, for radiologist review ({result.reference})",
        )
    )
    console.print(
        f"model {result.model} ({resolved.version}); schema-valid draft; "
        f"{result.completion_tokens} tokens in {result.latency_s:.2f}s "
        f"({tokens_per_s:.0f} tokens/s)"
    )
    if resolved.is_tiny:
        console.print(
            "[yellow]note:[/yellow] the tiny random-weight model proves the machinery, not "
            "medicine: its findings are meaningless. Set MEDVLM_MODEL__SOURCE to a real checkpoint."
        )


@app.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets masked)."""
    console.print_json(_settings().model_dump_json())


app.add_typer(dev_app, name="dev", help="Local development servers (Orthanc, FHIR).")


def main() -> None:  # pragma: no cover
    sys.exit(app())
