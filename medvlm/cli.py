"""The ``medvlm`` command line.

Settings are loaded once here (``MedvlmSettings()``: environment, ``MEDVLM_`` prefix) and passed
down. Commands print for people (rich); errors of the project's own tree end with a one-line
message and exit code 1, without a traceback and without patient data. Invalid settings (a
variable that names no setting, a malformed value), a bad option value and a service that does
not answer the pre-flight (``medvlm run``, ``medvlm check``) end with one line each and exit
code 2.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from connectors.pacs import StudyQuery
from medvlm.dev.cli import app as dev_app
from medvlm.errors import ConfigurationError, MedvlmError, ServiceDownError
from medvlm.settings import (
    MedvlmSettings,
    TinyArchitecture,
    describe_settings_error,
    with_variable_names,
)
from medvlm.telemetry import disable_third_party_telemetry

if TYPE_CHECKING:
    from flows.draft_reports import RunSummary
    from flows.tasks import TaskTally
    from pipeline.ledger import DraftJob
    from pipeline.report import DraftReport

disable_third_party_telemetry()
# A command's first flow run starts Prefect's temporary API server (unless PREFECT_API_URL
# names a server): ~25 s on 2 cores, over Prefect's 20 s default start-up timeout once
# measured, far more on a loaded machine. Prefect reads it when imported: set before that.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

app = typer.Typer(
    name="medvlm",
    help="Draft preliminary radiology reports with medical vision-language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Model checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console()


def _line(label: str, message: str) -> None:
    """``label: message`` as one line, however wide the terminal (no wrapping, no markup)."""
    console.print(f"[red]{label}:[/red] {escape(message)}", soft_wrap=True, highlight=False)


def _settings() -> MedvlmSettings:
    try:
        return MedvlmSettings()
    except ValueError as exc:  # ValidationError, SettingsVariableError: fail at start-up
        _line("invalid settings", describe_settings_error(exc))
        raise typer.Exit(2) from None


def _model_settings(settings: MedvlmSettings) -> MedvlmSettings:
    """With MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS and no source (development only), the tiny
    random-weight checkpoint as the source; otherwise ``settings`` as they are."""
    if settings.model.source is not None or not settings.model.allow_random_weights:
        return settings
    from medvlm.dev.tiny_model import with_tiny_checkpoint

    return with_tiny_checkpoint(settings)


def _ready_to_draft(settings: MedvlmSettings) -> MedvlmSettings:
    """What every drafting command does first: the model settings (``_model_settings``), their
    check, and the pre-flight of PACS, EHR and ledger when ``job.preflight`` is on."""
    settings = _model_settings(settings)
    try:
        _check_model_configuration(settings)
    except MedvlmError as exc:
        _fail(exc)
    if settings.job.preflight:
        _preflight(settings)
    return settings


def _fail(exc: MedvlmError) -> None:
    message = " ".join(str(exc).split())
    if isinstance(exc, ConfigurationError):  # "pacs.token_file …" → "MEDVLM_PACS__TOKEN_FILE …"
        message = with_variable_names(message)
    _line("error", message)
    raise typer.Exit(1) from exc


@model_app.command("build-tiny")
def build_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    architecture: Annotated[str, typer.Option(help="qwen2_vl or gemma3.")] = "qwen2_vl",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
) -> None:
    """Build a tiny random-weight VLM checkpoint offline (for tests and demos only)."""
    from medvlm.dev.tiny_model import build_tiny_checkpoint
    from serving.model_source import weights_sha256

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
    from serving.app import start_model_service
    from serving.model_source import resolve_model
    from serving.ray_runtime import shutdown_ray

    settings = _model_settings(_settings())
    try:
        resolved = resolve_model(settings)
        start_model_service(settings, resolved.source)
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


def _before_prefect() -> None:
    """Before a command's first flow run: the temporary Prefect server a SIGKILLed run could
    not stop is stopped now."""
    from medvlm.orphans import stop_orphaned_prefect_servers

    stop_orphaned_prefect_servers(os.environ.get("PREFECT_HOME"))


def _run_flow(settings: MedvlmSettings, query: StudyQuery | None, *, dry_run: bool) -> RunSummary:
    """Run ``draft_reports`` with a progress bar, then print the summary table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    from flows.draft_reports import RunTally, discover, discovery_outage, has_pending, summarize
    from flows.services import open_services

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("drafting (model start-up first)", total=None)

        def advance(job: DraftJob) -> None:
            progress.update(bar, advance=1, description=f"{job.study_ref} {job.state}")

        with open_services(settings, on_progress=advance) as services:
            # Discovery first, as plain code: a run with nothing left to do ends here, without
            # loading Prefect or starting a flow run (and its temporary API server).
            summary: RunSummary
            try:
                discovered = len(discover(services, query))
            except ServiceDownError as down:  # the PACS stayed down: exit code 4, no traceback
                summary = summarize(services, 0, discovery_outage(down))
            else:
                if has_pending(services):
                    _before_prefect()
                    from flows.deployments import draft_reports

                    summary = draft_reports(services, query, dry_run=dry_run, discovered=discovered)
                else:
                    summary = summarize(services, discovered, RunTally())
    table = Table(title=f"draft_reports — model {summary.model_version}")
    table.add_column("state")
    table.add_column("studies", justify="right")
    for state, count in summary.counts.items():
        if count:
            table.add_row(state, str(count))
    console.print(table)
    for reference, reason in summary.failures:
        console.print(f"[red]failed[/red] {reference}: {reason}", highlight=False)
    for reference, reason in summary.skipped:
        console.print(f"[yellow]skipped[/yellow] {reference}: {reason}", highlight=False)
    for flag, count in sorted(summary.flags.items()):
        console.print(f"flag {flag}: {count} studies", highlight=False)
    tally = summary.tally
    if tally is not None and tally.outage:
        _line("stopped early", f"{tally.outage}; the studies not done stay pending")
    if tally is not None and tally.attempted and tally.wall_s > 0:
        console.print(
            f"{tally.attempted} studies in {tally.wall_s:.1f} s "
            f"({tally.attempted / tally.wall_s:.2f}/s), {tally.completion_tokens} tokens, "
            f"mean requests at the model {tally.model_mean_in_flight:.1f}",
            highlight=False,
        )
    return summary


@app.command()
def run(
    since: Annotated[str | None, typer.Option(help="First study date (YYYY-MM-DD).")] = None,
    until: Annotated[str | None, typer.Option(help="Last study date (YYYY-MM-DD).")] = None,
    modality: Annotated[
        list[str] | None, typer.Option(help="Modality to include (repeatable).")
    ] = None,
    accession: Annotated[str | None, typer.Option(help="One accession number.")] = None,
    new: Annotated[
        bool, typer.Option("--new", help="Studies new since the last run (watermark).")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Draft but do not write to the EHR.")] = False,
) -> None:
    """Draft preliminary reports for the studies of a window, against the configured PACS/EHR.

    First the pre-flight (job.preflight): PACS, EHR and ledger must answer, else exit code 2
    with one line per service that did not. Exit code 3 when some studies failed or were
    dead-lettered (listed, with reasons); 4 when the EHR or PACS stayed down longer than
    job.outage_wait_s and the run ended early (the studies not done stay pending).
    """
    settings = _settings()
    query = None
    if not new:
        start, end = _date(since, "--since"), _date(until, "--until")
        if start and end and start > end:
            _line("error", f"--since {start} is after --until {end}")
            raise typer.Exit(2)
        query = StudyQuery(
            date_from=start,
            date_to=end,
            modalities=frozenset(modality or ()),
            accession_number=accession,
        )
    settings = _ready_to_draft(settings)
    try:
        summary = _run_flow(settings, query, dry_run=dry_run)
    except MedvlmError as exc:
        _fail(exc)
        return
    if summary.failures:
        raise typer.Exit(3)
    if summary.tally is not None and summary.tally.outage:
        raise typer.Exit(4)


@app.command()
def tasks(
    since: Annotated[
        str | None,
        typer.Option(help="Tasks changed from this instant (ISO 8601); default: the watermark."),
    ] = None,
    listen: Annotated[
        bool,
        typer.Option(
            "--listen",
            help="Keep running: a pass on every EHR notification (rest-hook Subscription) and "
            "every MEDVLM_TASKS__INTERVAL_S, until SIGTERM/SIGINT.",
        ),
    ] = False,
) -> None:
    """Draft what the requested FHIR Tasks (code draft-imaging-report) ask for, once.

    Each Task is claimed with an If-Match update (another worker's claim wins a race: the Task
    is left to it), its study drafted through the main pipeline, and the Task ended completed
    with the preliminary report as output, or failed/rejected with a coded reason. Exit code 3
    when a Task failed (not with --listen, which runs until stopped and deletes its
    Subscription on the way out).
    """
    settings = _settings()
    start = _instant(since, "--since") if since is not None else None
    settings = _ready_to_draft(settings)
    from flows.services import open_services
    from flows.tasks import draft_requested_tasks

    if listen:
        _listen_for_tasks(settings, start)
        return
    try:
        with open_services(settings) as services:
            tally = draft_requested_tasks(services, since=start)
    except MedvlmError as exc:
        _fail(exc)
        return
    _print_task_tally(tally)
    if tally.failed:
        raise typer.Exit(3)


def _listen_for_tasks(settings: MedvlmSettings, start: dt.datetime | None) -> None:
    """``medvlm tasks --listen`` (flows.task_listener): until SIGTERM/SIGINT."""
    import signal
    import threading

    from connectors.ehr import TaskSubscriptions
    from flows.services import open_services
    from flows.task_listener import TaskListener
    from flows.tasks import draft_requested_tasks

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        _line("tasks", f"{signal.Signals(signum).name}: stopping after the pass in progress")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    def say(message: str) -> None:  # progress, not an error: no red label
        console.print(f"tasks: {escape(message)}", soft_wrap=True, highlight=False)

    def on_pass(tally: TaskTally) -> None:
        if tally.found or tally.taken_up:
            _print_task_tally(tally)

    try:
        with open_services(settings) as services:
            ehr = services.ehr
            listener = TaskListener(
                lambda: draft_requested_tasks(services, since=start),
                settings.tasks,
                ehr if isinstance(ehr, TaskSubscriptions) else None,
                on_pass=on_pass,
                say=say,
            )
            listener.run(stop)
    except MedvlmError as exc:
        _fail(exc)
    except OSError as exc:  # the listener's address taken or not ours
        _line("error", f"task listener: {exc}")
        raise typer.Exit(2) from None


def _print_task_tally(tally: TaskTally) -> None:
    table = Table(title=f"requested Tasks: {tally.found}, taken up again: {tally.taken_up}")
    table.add_column("Task")
    table.add_column("outcome")
    for ref, output in tally.completed:
        table.add_row(ref, f"completed: {output}")
    for ref, reason in tally.failed:
        table.add_row(ref, f"failed: {reason}")
    for ref, reason in tally.rejected:
        table.add_row(ref, f"rejected: {reason}")
    for ref in tally.lost:
        table.add_row(ref, "taken or changed by another first")
    for ref in tally.pending:
        table.add_row(ref, "in progress (its study is not done: `medvlm status`)")
    console.print(table)


@app.command()
def watch(
    once: Annotated[
        bool, typer.Option("--once", help="One pass, then exit (cron, tests).")
    ] = False,
) -> None:
    """Draft studies as they become stable in the PACS, until SIGTERM/SIGINT (blocks).

    Orthanc's change feed where configured (MEDVLM_PACS__NEW_STUDY_DETECTION=orthanc_changes),
    else QIDO-RS every MEDVLM_WATCH__INTERVAL_S. A STAT/ASAP order is drafted first. On a
    signal the studies in the pipeline are finished and the rest stay registered for the next
    start; a second signal stops at once (claims released). Each draft's latency from "seen
    stable" to "in the EHR" is printed and saved in the ledger (timings stable_to_ehr_s).
    """
    import signal
    import threading

    settings = _ready_to_draft(_settings())
    from flows.services import open_services
    from flows.watch import PassResult, Watcher

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now (claims released on the way)
        _line("watch", f"{signal.Signals(signum).name}: finishing the studies in progress")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    def say(label: str, message: str) -> None:  # progress, not an error: no red label
        console.print(f"{label}: {escape(message)}", soft_wrap=True, highlight=False)

    def on_pass(result: PassResult) -> None:
        for ref, seconds in result.written:
            say("drafted", f"{ref}: stable→EHR {seconds:.1f} s")
        for ref, state in result.ended_otherwise:
            say(state, ref)

    stable_on_detection = (
        settings.pacs.kind == "dicomweb" and settings.pacs.new_study_detection == "orthanc_changes"
    )
    try:
        with open_services(settings) as services:
            watcher = Watcher(services, settings.watch, stable_on_detection=stable_on_detection)
            summary = watcher.run(stop, once=once, on_pass=on_pass)
    except MedvlmError as exc:
        _fail(exc)
        return
    say("summary", summary.line())


def _date(value: str | None, option: str) -> dt.date | None:
    """A YYYY-MM-DD option's date; a malformed one ends the command with one line naming it."""
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _line("error", f"{option} {value!r} is not a date (YYYY-MM-DD)")
        raise typer.Exit(2) from None


def _check_model_configuration(settings: MedvlmSettings) -> None:
    """The local model's configuration (a source is set, random weights only when allowed),
    before the pre-flight: a run that could not start its model fails on that first. The
    weights are hashed later, once, by the run itself (a version is pinned here)."""
    if settings.job.model_endpoint != "local":
        return
    from serving.model_source import resolve_model

    model = settings.model.model_copy(update={"version": settings.model.version or "unhashed"})
    resolve_model(settings.model_copy(update={"model": model}))


def _preflight(settings: MedvlmSettings) -> None:
    """The pre-flight of a run: one line per service that did not answer, then exit code 2
    (nothing discovered, no flow run, no model started)."""
    from flows.preflight import run_checks

    failed = [result for result in run_checks(settings) if not result.ok]
    for result in failed:
        _line("pre-flight", result.line())
    if failed:
        raise typer.Exit(2)


@app.command()
def check() -> None:
    """Check that the PACS, the EHR and the job ledger answer, as `medvlm run` does before it
    starts (one cheap request each, no patient data). Exit code 2 when one does not."""
    from flows.preflight import run_checks

    settings = _settings()
    results = run_checks(settings)
    table = Table(title=f"pre-flight (timeout {settings.job.preflight_timeout_s:g} s)")
    for column in ("service", "kind", "where", "status", "detail"):
        table.add_column(column, overflow="fold")
    for result in results:
        status = "[green]OK[/green]" if result.ok else "[red]FAILED[/red]"
        table.add_row(
            result.service, result.kind, escape(result.where), status, escape(result.detail)
        )
    console.print(table)
    if not all(result.ok for result in results):
        raise typer.Exit(2)


def _print_draft(report: DraftReport, title: str) -> None:
    console.print(
        Panel(Syntax(json.dumps(report.model_dump(mode="json"), indent=2), "json"), title=title)
    )


def _print_sample_draft(settings: MedvlmSettings, model_version: str, study_uid: str) -> None:
    """Show the validated draft of one study, as the ledger recorded it."""
    from connectors.ledger_store import LedgerStore, open_engine
    from pipeline.report import DraftReport

    assert settings.job.ledger_url is not None
    (job,) = LedgerStore(open_engine(settings.job.ledger_url)).jobs(model_version, [study_uid])
    if job.draft is None:
        console.print(f"[red]{job.study_ref}: no draft[/red] {job.reason or ''}")
        return
    report = DraftReport.model_validate(job.draft)  # schema-valid, or this raises
    _print_draft(
        report, f"DRAFT of the chest radiograph — preliminary, AI-generated ({job.study_ref})"
    )


@app.command()
def demo(
    folders: Annotated[
        bool, typer.Option("--folders", help="Use folder sources instead of the dev servers.")
    ] = False,
) -> None:
    """Run the main job on the sample cohort: dev Orthanc + FHIR server, tiny model, Ray Serve."""
    from medvlm.dev.demo import demo_settings, load_sample_cohort
    from medvlm.dev.sample_cohort import DEMO_STUDY_DATE

    settings = _settings()
    try:
        demo = demo_settings(settings, use_servers=not folders)
        cases = load_sample_cohort(demo)
        console.print(f"loaded {len(cases)} sample studies and their EHR records")
        summary = _run_flow(
            demo, StudyQuery(date_from=DEMO_STUDY_DATE, date_to=DEMO_STUDY_DATE), dry_run=False
        )
    except MedvlmError as exc:
        _fail(exc)
        return
    _print_sample_draft(demo, summary.model_version, cases[0].study_uid)
    if demo.ehr.kind == "fhir":
        console.print(
            "drafts (status preliminary) are in the FHIR server:\n"
            f"  curl '{demo.ehr.base_url}/DiagnosticReport?status=preliminary'\n"
            f"  curl '{demo.ehr.base_url}/Provenance?target=DiagnosticReport/<id>'"
            "   (AI provenance)\n"
            "presentedForm[0].data is the draft text (base64). Stop the servers with "
            "`medvlm dev down`."
        )
    else:
        console.print(f"drafts are in {demo.ehr.folder}/DiagnosticReport.ndjson")
    console.print(
        "[yellow]note:[/yellow] the tiny random-weight model proves the machinery, not "
        "medicine: its findings are meaningless. Set MEDVLM_MODEL__SOURCE to a real checkpoint."
    )
    if summary.counts.get("written", 0) != len(cases):
        raise typer.Exit(3)


@app.command("draft-one")
def draft_one() -> None:
    """Draft one report for the sample chest radiograph through Ray Serve (a quick check)."""
    from medvlm.dev.demo import run_demo

    settings = _settings()
    console.print("starting the model service (Ray Serve + vLLM); the first start takes a minute…")
    try:
        resolved, result = run_demo(settings)
    except MedvlmError as exc:
        _fail(exc)
        return
    tokens_per_s = result.completion_tokens / result.latency_s if result.latency_s else 0.0
    _print_draft(
        result.report,
        f"DRAFT — preliminary, AI-generated, for radiologist review ({result.reference})",
    )
    console.print(
        f"model {result.model} ({resolved.version}); schema-valid draft; "
        f"{result.completion_tokens} tokens in {result.latency_s:.2f}s "
        f"({tokens_per_s:.0f} tokens/s)"
    )


def _instant(value: str, name: str) -> dt.datetime:
    """A date (midnight UTC) or an ISO datetime (naive = UTC) from an option."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is not an ISO date or datetime", param_hint=name
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@app.command()
def fairness(
    since: Annotated[
        str | None,
        typer.Option(
            help="Window start, ISO date/datetime (UTC). Default: until - fairness.window_days."
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Window end (exclusive). Default: the current hour.")
    ] = None,
    model_version: Annotated[
        str | None, typer.Option(help="Only drafts of this model version (default: all).")
    ] = None,
    write: Annotated[
        bool, typer.Option(help="Write the MeasureReport into the EHR (fairness settings).")
    ] = True,
    refresh_signed: Annotated[
        bool, typer.Option(help="Re-read signed reports even when their labels are cached.")
    ] = False,
) -> None:
    """Fairness of the drafts of a window across subgroups: HTML report, MeasureReport, alerts.

    Exit code 3 when an alert rule fires (each alert is printed, naming metric and group).
    """
    from flows.deployments import fairness_window
    from flows.fairness import fairness_monitor, headline_rows
    from flows.services import open_fairness_services

    settings = _settings()
    end = _instant(until, "--until") if until else fairness_window(1, dt.datetime.now(dt.UTC))[1]
    start = (
        _instant(since, "--since")
        if since
        else end - dt.timedelta(days=settings.fairness.window_days)
    )
    if start >= end:
        raise typer.BadParameter("--since must be before --until", param_hint="--since")
    try:
        with open_fairness_services(
            settings,
            model_version=model_version,
            write_measure_report=write and settings.fairness.write_measure_report,
            refresh_signed=refresh_signed,
        ) as services:
            _before_prefect()
            outcome = fairness_monitor(services, start, end)
    except MedvlmError as exc:
        _fail(exc)
        return
    report = outcome.report
    table = Table(
        "metric (overall)",
        "n",
        "value",
        title=f"fairness {start:%Y-%m-%d %H:%M} – "
        f"{end:%Y-%m-%d %H:%M} UTC, {report.studies} studies",
    )
    for row in headline_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(f"HTML report: {outcome.html_path}")
    if outcome.measure_report_id:
        console.print(f"MeasureReport/{outcome.measure_report_id} written to the EHR")
    for message in outcome.alerts:
        console.print(f"[red]ALERT[/red] {message}")
    if outcome.alerted:
        raise typer.Exit(3)


@app.command()
def deploy(
    timezone: Annotated[str, typer.Option(help="Time zone of the nightly schedule.")] = "UTC",
) -> None:
    """Serve the Prefect deployments: main job nightly and on demand, fairness daily, a watch
    pass a minute (blocks)."""
    from flows.deployments import serve_deployments

    _settings()  # invalid settings fail now, not at 1 a.m.
    serve_deployments(timezone)


@app.command("ref")
def ref(
    system: Annotated[
        str | None,
        typer.Option(help="The identifier's system (default: ehr.accession_system)."),
    ] = None,
) -> None:
    """Print the `identifier-…` reference that messages and Prefect parameters use for an
    accession number or MRN (keyed with job.pseudonym_key when set), to find a study's
    messages. The value is read from the terminal (not echoed, not kept in shell history)."""
    from connectors.ehr import identifier_ref

    settings = _settings()
    value = typer.prompt("identifier value", hide_input=True).strip()
    chosen = system if system is not None else settings.ehr.accession_system
    key = settings.job.pseudonym_key_bytes()
    console.print(identifier_ref(value, chosen, key=key), highlight=False)


@app.command()
def status(
    study: Annotated[
        str | None,
        typer.Option(help="One study: its `study-…` reference or Study Instance UID."),
    ] = None,
    state: Annotated[
        str | None, typer.Option(help="Only jobs in this state (failed, skipped, written, …).")
    ] = None,
    days: Annotated[int, typer.Option(help="Jobs registered in the last N days.", min=1)] = 7,
    limit: Annotated[int, typer.Option(help="At most N rows, latest change first.", min=1)] = 50,
) -> None:
    """The ledger's view of recent studies: reference, model version, state, attempts, the
    reason of a failure or skip, and seconds per stage. No patient data: studies are named by
    their `study-…` reference, never by accession number or patient."""
    from connectors.ledger_store import LedgerStore, open_engine
    from pipeline.ledger import JobState

    settings = _settings()
    wanted = None
    if state is not None:
        try:
            wanted = JobState(state)
        except ValueError:
            known = ", ".join(s.value for s in JobState)
            _line("error", f"--state {state!r} is not a job state ({known})")
            raise typer.Exit(2) from None
    assert settings.job.ledger_url is not None
    now = dt.datetime.now(dt.UTC)
    try:
        engine = open_engine(settings.job.ledger_url)
        try:
            jobs = LedgerStore(engine).jobs_between(now - dt.timedelta(days=days), now)
        finally:
            engine.dispose()
    except MedvlmError as exc:
        _fail(exc)
        return
    jobs = [
        job
        for job in jobs
        if (study is None or study in (job.study_ref, job.study_uid))
        and (wanted is None or job.state is wanted)
    ]
    jobs.sort(key=lambda job: job.updated_at, reverse=True)
    table = Table(title=f"ledger: {len(jobs)} jobs in the last {days} days")
    for column in ("study", "model version", "state", "attempts", "updated (UTC)", "seconds"):
        table.add_column(column)
    table.add_column("reason", overflow="fold")
    for job in jobs[:limit]:
        seconds = ", ".join(
            f"{name.removesuffix('_s')} {value:.2f}" for name, value in (job.timings or {}).items()
        )
        table.add_row(
            job.study_ref,
            job.model_version,
            job.state.value,
            str(job.attempts),
            f"{job.updated_at:%Y-%m-%d %H:%M:%S}",
            seconds,
            escape(job.reason or ""),
        )
    console.print(table)
    if len(jobs) > limit:
        console.print(f"… and {len(jobs) - limit} more (--limit)", highlight=False)


@app.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets masked)."""
    console.print_json(_settings().model_dump_json())


app.add_typer(dev_app, name="dev", help="Local development servers (Orthanc, FHIR).")

db_app = typer.Typer(help="The job ledger's schema (job.ledger_url).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate the ledger to this release's schema (before starting workers on PostgreSQL;
    safe to run from several places at once)."""
    from connectors.ledger_schema import upgrade
    from connectors.ledger_store import ledger_engine

    settings = _settings()
    assert settings.job.ledger_url is not None
    engine = ledger_engine(settings.job.ledger_url)
    try:
        before, now = upgrade(engine)
    except MedvlmError as exc:
        _fail(exc)
    finally:
        engine.dispose()
    if before == now:
        console.print(f"ledger already at revision {now}")
    else:
        console.print(f"ledger upgraded from revision {before or 'none'} to {now}")


@db_app.command("current")
def db_current() -> None:
    """Print the ledger's schema revision and the one this release needs."""
    from connectors.ledger_schema import current_revision, head_revision
    from connectors.ledger_store import ledger_engine

    settings = _settings()
    assert settings.job.ledger_url is not None
    engine = ledger_engine(settings.job.ledger_url)
    try:
        current = current_revision(engine)
    except MedvlmError as exc:
        _fail(exc)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else "behind: run `medvlm db upgrade`"
    console.print(f"ledger revision {current or 'none'}, this release needs {head} ({state})")


def main() -> None:  # pragma: no cover
    sys.exit(app())
