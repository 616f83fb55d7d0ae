"""Prefect flows and deployments: the main job (nightly cron and on demand), the daily
fairness monitor and a watch pass every minute (``medvlm watch --once``, for sites that run no
``medvlm watch`` service).

``draft_reports`` is the main job as a Prefect flow: two tasks (discover; the run's one
pipeline over the pending jobs) around the plain code of ``flows.draft_reports``, which does not
import Prefect. ``scheduled_draft_reports`` is the deployable entry flow: its parameters are
plain values (a window in days, modalities, the model route, dry-run) so the Prefect UI and API
can set them; it loads ``MedvlmSettings`` from the worker's environment, builds the connectors
and runs ``draft_reports`` as a subflow. ``scheduled_fairness_monitor`` does the same for
``fairness_monitor`` over the last ``window_days``. ``medvlm deploy`` serves all deployments from
one process (``prefect.serve``); prefect.yaml declares the same for work pools.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from prefect import flow, serve, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from pydantic import BaseModel, ConfigDict, Field

from connectors.ehr import identifier_ref
from connectors.pacs import StudyQuery
from flows.draft_reports import (
    RunSummary,
    RunTally,
    Services,
    discover,
    draft_pending,
    run_draft_job,
)
from flows.fairness import FairnessOutcome, fairness_monitor
from flows.services import open_fairness_services, open_services
from medvlm.settings import MedvlmSettings
from pipeline.imaging import study_reference

NIGHTLY_CRON = "0 1 * * *"
FAIRNESS_CRON = "0 6 * * *"  # daily, after the night's drafts (and morning sign-offs) are in
WATCH_CRON = "* * * * *"  # one watch pass a minute, where no `medvlm watch` service runs


@task(name="discover-studies", cache_policy=NO_CACHE)
def discover_task(services: Services, query: StudyQuery | None) -> int:
    return len(discover(services, query))


@task(name="draft-pending", cache_policy=NO_CACHE)
def draft_pending_task(services: Services, dry_run: bool) -> RunTally:
    """One task for the run's pipeline: Prefect costs ~19 ms per task here, and the stages
    overlap inside it (per-study states are in the ledger)."""
    return draft_pending(services, dry_run)


class FlowArgument(BaseModel):
    """An argument of a Prefect flow that Prefect records only by its ``summary``.

    Prefect stores every flow run's parameters (``Flow.serialize_parameters``: FastAPI's
    ``jsonable_encoder``) in its database and shows them in the UI. A study query may carry an
    accession number or a patient id, and the services hold clients and settings: neither
    belongs there. The value stays in this process (it is excluded from serialisation); Prefect
    sees the summary: the window and modalities, hashes of identifiers.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    value: Any = Field(default=None, exclude=True)
    summary: dict[str, Any] = Field(default_factory=dict)


def query_argument(query: StudyQuery | None, *, key: bytes | None = None) -> FlowArgument:
    """The run's query for Prefect: dates, times and modalities as they are, identifiers hashed
    (keyed with ``key``, ``job.pseudonym_key``, when the site set one)."""
    if query is None:
        return FlowArgument(value=None, summary={"since": "watermark"})
    summary: dict[str, Any] = {
        "date_from": query.date_from.isoformat() if query.date_from else None,
        "date_to": query.date_to.isoformat() if query.date_to else None,
        "time_from": query.time_from,
        "time_to": query.time_to,
        "modalities": sorted(query.modalities),
        "limit": query.limit,
    }
    if query.accession_number:
        summary["accession"] = identifier_ref(query.accession_number, key=key)
    if query.patient_id:
        summary["patient"] = identifier_ref(query.patient_id, key=key)
    if query.study_uid:
        summary["study"] = study_reference(query.study_uid)
    return FlowArgument(value=query, summary={k: v for k, v in summary.items() if v is not None})


@flow(name="draft-reports", validate_parameters=False, log_prints=True)
def _draft_reports_flow(
    services: FlowArgument,
    query: FlowArgument,
    dry_run: bool = False,
    discovered: int | None = None,
) -> RunSummary:
    assert isinstance(services.value, Services)
    return run_draft_job(
        services.value,
        query.value,
        dry_run,
        discover_step=discover_task if discovered is None else (lambda _s, _q: discovered),
        drafting_step=draft_pending_task,
    )


def draft_reports(
    services: Services,
    query: StudyQuery | None,
    dry_run: bool = False,
    discovered: int | None = None,
) -> RunSummary:
    """Discover → draft the pending jobs → summary, as the Prefect flow ``draft-reports``.
    Studies already written are skipped.

    ``query`` None discovers the studies new since the source's saved watermark.
    ``discovered``: the caller has discovered already (``medvlm run`` does, to start no flow run
    when nothing is pending) and found this many; the flow does not discover again. Prefect
    records the flow run's parameters without patient identifiers (``FlowArgument``).
    """
    model = services.model
    return _draft_reports_flow(
        FlowArgument(
            value=services,
            summary={"model_version": model.version, "source": services.source_name},
        ),
        query_argument(query, key=services.pseudonym_key),
        dry_run=dry_run,
        discovered=discovered,
    )


def window_query(days_back: int, modalities: list[str], today: dt.date) -> StudyQuery:
    """Studies dated from ``days_back`` days before ``today`` through ``today``."""
    return StudyQuery(
        date_from=today - dt.timedelta(days=days_back),
        date_to=today,
        modalities=frozenset(modalities),
    )


@flow(name="scheduled-draft-reports", log_prints=True)
def scheduled_draft_reports(
    days_back: int = 1,
    modalities: list[str] | None = None,
    model_endpoint: Literal["local", "http", "openai", "triton"] | None = None,
    dry_run: bool = False,
    since_watermark: bool = False,
) -> RunSummary:
    """Draft reports for the last ``days_back`` days of studies (or, with ``since_watermark``,
    the studies new since the last run); settings from the environment."""
    settings = MedvlmSettings()
    if model_endpoint is not None:
        settings = settings.model_copy(
            update={"job": settings.job.model_copy(update={"model_endpoint": model_endpoint})}
        )
    query = None if since_watermark else window_query(days_back, modalities or [], dt.date.today())
    if settings.job.preflight:  # a wrong URL or credential: one line within seconds
        from flows.preflight import require_services

        require_services(settings)
    with open_services(settings) as services:
        return draft_reports(services, query, dry_run=dry_run)


def fairness_window(window_days: int, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The ``window_days`` days up to the start of ``now``'s hour (UTC), as ``[since, until)``."""
    until = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    return until - dt.timedelta(days=window_days), until


class FairnessAlertError(RuntimeError):
    """Raised by the scheduled monitor after writing its outputs when an alert rule fired."""


@flow(name="scheduled-fairness-monitor", log_prints=True)
def scheduled_fairness_monitor(
    window_days: int | None = None, model_version: str | None = None
) -> FairnessOutcome:
    """Fairness of the last ``window_days`` days of drafts (default: settings); settings from
    the environment. The run fails when an alert rule fires, so Prefect automations and the
    UI show it; the report, MeasureReport and artifact are written first."""
    settings = MedvlmSettings()
    since, until = fairness_window(
        window_days or settings.fairness.window_days, dt.datetime.now(dt.UTC)
    )
    with open_fairness_services(settings, model_version=model_version) as services:
        outcome = fairness_monitor(services, since, until)
    if outcome.alerted:
        raise FairnessAlertError("; ".join(outcome.alerts))
    return outcome


@flow(name="watch-pass", log_prints=True)
def scheduled_watch_pass() -> int:
    """One pass of ``medvlm watch`` (flows.watch): the studies that became stable since the
    last pass, drafted (STAT first); returns how many were written. Settings from the
    environment; the watcher's position is in the ledger, so passes may run anywhere."""
    from flows.watch import Watcher

    settings = MedvlmSettings()
    pacs = settings.pacs
    feed = pacs.kind == "dicomweb" and pacs.new_study_detection == "orthanc_changes"
    with open_services(settings) as services:
        watcher = Watcher(services, settings.watch, stable_on_detection=feed)
        result = watcher.one_pass()
    print(watcher.summary.line())
    return len(result.written)


def deployments(timezone: str = "UTC") -> list[RunnerDeployment]:
    """The nightly (cron) and on-demand deployments of the main job, and the daily monitor."""
    nightly = scheduled_draft_reports.to_deployment(
        name="nightly",
        schedules=[Cron(NIGHTLY_CRON, timezone=timezone)],
        parameters={"days_back": 1},
        description="Every night: draft preliminary reports for yesterday's and today's studies.",
        tags=["medvlm", "nightly"],
    )
    on_demand = scheduled_draft_reports.to_deployment(
        name="on-demand",
        description="Run by hand or by API with any window, modalities, model route, dry-run.",
        tags=["medvlm", "on-demand"],
    )
    fairness = scheduled_fairness_monitor.to_deployment(
        name="fairness-daily",
        schedules=[Cron(FAIRNESS_CRON, timezone=timezone)],
        description="Every day: fairness of the drafts of the last window across subgroups.",
        tags=["medvlm", "fairness"],
    )
    watch = scheduled_watch_pass.to_deployment(
        name="watch-pass",
        schedules=[Cron(WATCH_CRON, timezone=timezone)],
        description="Every minute: draft the studies that became stable since (STAT first).",
        tags=["medvlm", "watch"],
    )
    # to_deployment is sync outside an event loop; its declared type also admits a coroutine.
    built = [nightly, on_demand, fairness, watch]
    assert all(isinstance(d, RunnerDeployment) for d in built)
    return [d for d in built if isinstance(d, RunnerDeployment)]


def serve_deployments(timezone: str = "UTC") -> None:  # pragma: no cover - blocks forever
    serve(*deployments(timezone))
