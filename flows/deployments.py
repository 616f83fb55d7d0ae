"""Prefect deployments of the main job: a nightly cron run and an on-demand run.

``scheduled_draft_reports`` is the deployable entry flow: its parameters are plain values (a
window in days, modalities, the model route, dry-run) so the Prefect UI and API can set them;
it loads ``MedvlmSettings`` from the worker's environment, builds the connectors and runs
``draft_reports`` as a subflow. ``medvlm deploy`` serves both deployments from one process
(``prefect.serve``); prefect.yaml declares the same for work pools.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from prefect import flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from connectors.pacs import StudyQuery
from flows.draft_reports import RunSummary, draft_reports
from flows.services import open_services
from medvlm.settings import MedvlmSettings

NIGHTLY_CRON = "0 1 * * *"


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
    model_endpoint: Literal["local", "http", "openai"] | None = None,
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
    with open_services(settings) as services:
        return draft_reports(services, query, dry_run=dry_run)


def deployments(timezone: str = "UTC") -> list[RunnerDeployment]:
    """The nightly (cron) and on-demand deployments of the main job."""
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
    # to_deployment is sync outside an event loop; its declared type also admits a coroutine.
    assert isinstance(nightly, RunnerDeployment) and isinstance(on_demand, RunnerDeployment)
    return [nightly, on_demand]


def serve_deployments(timezone: str = "UTC") -> None:  # pragma: no cover - blocks forever
    serve(*deployments(timezone))
