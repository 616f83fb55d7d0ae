"""The fairness monitor: how drafts differ across patient and operational subgroups.

    ledger jobs of the window (subgroups captured at draft time)
      → signed reports from the EHR (once per study; labels cached in the ledger)
      → metrics per subgroup with bootstrap intervals, disparities, alert rules
      → HTML report on disk, FHIR MeasureReport in the EHR, Prefect artifact,
        and for each fired rule an error log line and a Prefect event

Read-only towards the drafts: the monitor never changes a job. A signed report that cannot be
read is logged (by study reference) and the study counted without agreement metrics; nothing
stops the run. ``FairnessServices`` is injected like the main job's ``Services``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.meta import Meta
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from connectors.draft_writer import DraftWriter, choose_strategy
from connectors.ehr import Ehr
from connectors.ledger_store import LedgerStore
from medvlm.errors import EhrError, EhrInvalidResourceError
from medvlm.settings import FairnessSettings
from pipeline.fairness import (
    FairnessRecord,
    compute_report,
    record_from_job,
    trend_points,
)
from pipeline.fairness_fhir import build_measure, build_measure_report, measure_report_identifier
from pipeline.fairness_html import render_html
from pipeline.fairness_types import FairnessReport
from pipeline.fhir_resources import DraftResources, PendingResource, SearchKey
from pipeline.labeler import Labeler, ReportLabels, RuleLabeler
from pipeline.ledger import DraftJob, FairnessRun, JobState, SignedReportLabels
from pipeline.report import FindingName, Presence

log = logging.getLogger("medvlm.fairness")

ALERT_EVENT = "medvlm.fairness.alert"
HEADLINE_METRICS = ("underdiagnosis_rate", "no_finding_rate", "failure_rate", "critical_rate")


@dataclass
class FairnessServices:
    """What the monitor talks to, built by the caller and injected."""

    ledger: LedgerStore
    ehr: Ehr
    settings: FairnessSettings
    identifier_system: str
    labeler: Labeler = field(default_factory=RuleLabeler)
    model_version: str | None = None  # None: drafts of every model version in the window
    write_measure_report: bool = True
    refresh_signed: bool = False  # re-read signed reports even when labels are cached
    write_strategy: str = "auto"  # job.write_strategy: how the MeasureReport is sent


@dataclass(frozen=True)
class FairnessOutcome:
    """What one monitoring run produced."""

    report: FairnessReport
    html_path: Path
    measure_report_id: str | None
    alerts: list[str]
    alert_events: list[str] = field(default_factory=list)  # ids of emitted Prefect events

    @property
    def alerted(self) -> bool:
        return bool(self.alerts)


def signed_report_text(report: DiagnosticReport) -> str:
    """The text a labeler reads from a signed report: conclusion and plain-text forms."""
    parts = [report.conclusion or ""]
    for form in report.presentedForm or []:
        if form.data and (form.contentType or "").startswith("text/plain"):
            # fhir.resources decodes base64Binary on validation; a plain string is still base64.
            raw = form.data if isinstance(form.data, bytes) else base64.b64decode(form.data)
            parts.append(raw.decode("utf-8", errors="replace"))
    return "\n".join(p for p in parts if p.strip())


def _labels_from_row(row: SignedReportLabels) -> ReportLabels:
    return ReportLabels(findings={FindingName(k): Presence(v) for k, v in row.labels.items()})


def signed_labels(
    services: FairnessServices, jobs: list[DraftJob]
) -> tuple[dict[str, ReportLabels], int]:
    """Labels of the signed report of each drafted job that has one (by study UID), and how
    many lookups the EHR failed (those studies are counted without agreement metrics).

    Cached labels are used unless ``refresh_signed``; studies without a signed report are asked
    again on the next run (the radiologist may not have signed yet).
    """
    drafted = [j for j in jobs if j.state in (JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN)]
    name = services.labeler.name
    cached = (
        {}
        if services.refresh_signed
        else services.ledger.signed_labels({j.study_uid for j in drafted}, name)
    )
    labels = {uid: _labels_from_row(row) for uid, row in cached.items()}
    fresh: list[SignedReportLabels] = []
    unreadable = 0
    for job in drafted:
        if job.study_uid in labels:
            continue
        try:
            report = services.ehr.find_final_report(
                job.accession_number, (job.links or {}).get("service_request")
            )
        except EhrError as exc:
            log.warning(
                "%s: signed report not readable, no agreement metrics: %s", job.study_ref, exc
            )
            unreadable += 1
            continue
        if report is None:
            continue
        found = services.labeler.label(signed_report_text(report))
        labels[job.study_uid] = found
        fresh.append(
            SignedReportLabels(
                study_uid=job.study_uid,
                labeler=name,
                report_ref=f"DiagnosticReport/{report.id}",
                status=str(report.status),
                labels={k.value: v.value for k, v in found.findings.items()},
            )
        )
    if fresh:
        services.ledger.save_signed_labels(fresh)
    return labels, unreadable


def collect_records(
    services: FairnessServices, since: dt.datetime, until: dt.datetime
) -> tuple[list[FairnessRecord], int]:
    """The window's jobs as records, with signed-report labels where a report is signed, and
    the number of signed-report lookups that failed."""
    jobs = services.ledger.jobs_between(since, until, services.model_version)
    labels, unreadable = signed_labels(services, jobs)
    return [record_from_job(job, labels.get(job.study_uid)) for job in jobs], unreadable


def build_report(
    services: FairnessServices, since: dt.datetime, until: dt.datetime
) -> FairnessReport:
    """Metrics of ``[since, until)`` and trends over the preceding windows of the same length."""
    cfg = services.settings
    length = until - since
    windows = []
    for k in reversed(range(1, cfg.trend_windows)):  # earlier windows, oldest first
        start, end = since - k * length, until - k * length
        windows.append((start, end, collect_records(services, start, end)[0]))
    current, unreadable = collect_records(services, since, until)
    options: dict[str, Any] = {
        "attributes": cfg.attributes,
        "min_group_size": cfg.min_group_size,
        "n_boot": cfg.n_boot,
        "confidence": cfg.confidence,
        "rules": cfg.rules,
        "seed": cfg.seed,
        "reference_groups": cfg.reference_groups,
        "false_discovery_rate": cfg.false_discovery_rate,
        "max_unknown_share": cfg.max_unknown_share,
        "intersections": cfg.intersections,
    }
    # The previous window's alerts, to say whether each alert is new or persisting.
    previous = (
        compute_report(windows[-1][2], since=windows[-1][0], until=windows[-1][1], **options)
        if windows
        else None
    )
    windows.append((since, until, current))
    return compute_report(
        current,
        since=since,
        until=until,
        trend=trend_points(
            windows,
            attributes=cfg.attributes,
            min_group_size=cfg.min_group_size,
            confidence=cfg.confidence,
        ),
        signed_unreadable=unreadable,
        previous_alerts=None if previous is None else previous.alerts,
        **options,
    )


def write_html(report: FairnessReport, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fairness-{report.since:%Y%m%dT%H%M}-{report.until:%Y%m%dT%H%M}.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path


def _write_once(services: FairnessServices, resource: Any, tag_system: str, key: str) -> str:
    """``resource`` in the EHR unless one tagged ``tag_system|key`` is there; its id.

    Through the drafts' writer (``connectors.draft_writer``): it first looks for a resource
    carrying the tag (``_tag`` is a search parameter of every resource), and sends only when
    there is none; with conditional create or transactions the server checks again.
    """
    rtype = resource.get_resource_type()
    resource.meta = Meta(tag=[Coding(system=tag_system, code=key)])
    pending = PendingResource(
        f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{tag_system}/{key}')}",
        json.loads(resource.model_dump_json(by_alias=True, exclude_none=True)),
        SearchKey("_tag", tag_system, key),
    )
    strategy = choose_strategy(services.write_strategy, services.ehr.capabilities(), {rtype})
    created = DraftWriter(services.ehr, strategy).write(
        DraftResources(key, (pending,), main_type=rtype), resume=True
    )
    rid = created.get(rtype, [""])[0]
    if not rid:
        raise EhrInvalidResourceError(f"{rtype}: transaction answer names no resource")
    return str(rid)


def write_measure(services: FairnessServices, report: FairnessReport) -> str:
    """The Measure the MeasureReports' ``measure`` canonical (``url|version``) points to, in
    the EHR once per version; its id.

    Its version is a digest of its definition, so it is written the first time the monitor runs
    with these metrics and attributes, and again (a new version) only when they change. The
    write is a create conditional on the Measure's tag (``system:fairness-measure|version``),
    the way the MeasureReport is written: the EHR connectors key writes by ``identifier`` or
    ``_tag``, which every server searches, rather than by ``url``.
    """
    measure = build_measure(
        report, system=services.identifier_system, url=services.settings.measure_url
    )
    assert measure.version is not None
    return _write_once(
        services, measure, f"{services.identifier_system}:fairness-measure", measure.version
    )


def write_measure_report(services: FairnessServices, report: FairnessReport) -> str:
    """The report as a MeasureReport in the EHR, once per window and scope.

    Idempotent without relying on the server: the ledger remembers what it wrote, and the
    write goes through the drafts' writer (``connectors.draft_writer``), which first looks for a
    MeasureReport carrying the run's tag (``_tag`` is a search parameter of every resource;
    ``identifier`` is not supported on MeasureReport by every server) and sends only when there
    is none: a crash between the EHR's commit and the ledger's, or a lost answer, writes nothing
    twice, also on servers without conditional create or transactions.
    """
    scope = services.model_version or "all-model-versions"
    system = services.identifier_system
    identifier = measure_report_identifier(report, system=system, scope=scope)
    assert identifier.value is not None
    done = services.ledger.fairness_run(identifier.value)
    if done is not None:
        return done.measure_report_id
    write_measure(services, report)
    resource = build_measure_report(
        report, system=system, scope=scope, measure=services.settings.measure_url
    )
    rid = _write_once(services, resource, f"{system}:fairness-run", identifier.value)
    services.ledger.save_fairness_run(
        FairnessRun(
            key=identifier.value,
            since=report.since,
            until=report.until,
            scope=scope,
            measure_report_id=rid,
            alerts=[a.message for a in report.alerts],
        )
    )
    return rid


def headline_rows(report: FairnessReport) -> list[tuple[str, str, str]]:
    """(title, n, value) of each headline metric overall, for summaries (artifact, CLI)."""
    rows = []
    for name in HEADLINE_METRICS:
        metric = report.metric(name)
        value = metric.overall.value
        rows.append(
            (metric.title, str(metric.overall_n), "n/a" if value is None else f"{value:.1%}")
        )
    return rows


def summary_markdown(report: FairnessReport, html_path: Path) -> str:
    """A short summary for the Prefect artifact: counts, alerts, headline metrics overall."""
    lines = [
        f"# Draft fairness {report.since:%Y-%m-%d %H:%M} – {report.until:%Y-%m-%d %H:%M} UTC",
        "",
        f"Studies {report.studies}, drafted {report.drafted}, with signed report "
        f"{report.with_final_report} (signed report unreadable: {report.signed_unreadable}); "
        f"groups under {report.min_group_size} suppressed. "
        f"HTML: `{html_path}`",
        "",
        "## Alerts",
        "",
    ]
    lines += [f"- {a.message}" for a in report.alerts] or ["No alert rule fired."]
    lines += ["", "## Headline metrics (overall)", "", "| metric | n | value |", "|---|---|---|"]
    lines += [f"| {title} | {n} | {value} |" for title, n, value in headline_rows(report)]
    return "\n".join(lines)


@task(name="fairness-report", cache_policy=NO_CACHE)
def fairness_report_task(
    services: FairnessServices, since: dt.datetime, until: dt.datetime
) -> FairnessReport:
    return build_report(services, since, until)


@flow(name="fairness-monitor", validate_parameters=False, log_prints=True)
def fairness_monitor(services: Any, since: dt.datetime, until: dt.datetime) -> FairnessOutcome:
    """Fairness of the drafts of ``[since, until)``: report, MeasureReport, artifact, alerts.

    ``services`` is a ``FairnessServices`` (typed ``Any`` for Prefect's parameter schema).
    """
    assert isinstance(services, FairnessServices)
    logger = get_run_logger()
    report = fairness_report_task(services, since, until)
    assert services.settings.report_dir is not None
    html_path = write_html(report, services.settings.report_dir)
    measure_id = write_measure_report(services, report) if services.write_measure_report else None
    create_markdown_artifact(
        summary_markdown(report, html_path),
        key="draft-fairness",
        description="Fairness of AI draft reports across subgroups",
    )
    events: list[str] = []
    for alert in report.alerts:
        logger.error("fairness alert: %s", alert.message)
        event = emit_event(
            event=ALERT_EVENT,
            resource={
                "prefect.resource.id": f"medvlm.fairness.{alert.metric}",
                "medvlm.attribute": alert.attribute,
                "medvlm.group": alert.group,
            },
            payload={
                "rule": alert.rule,
                "metric": alert.metric,
                "attribute": alert.attribute,
                "group": alert.group,
                "comparison": alert.comparison,
                "against": alert.against,
                "ratio": alert.ratio.value,
                "threshold": alert.threshold,
                "since_last": alert.since_last,
                "message": alert.message,
                "window": [since.isoformat(), until.isoformat()],
            },
        )
        if event is not None:
            events.append(str(event.id))
    logger.info(
        "fairness %s..%s: %d studies, %d alerts, report %s",
        since.isoformat(),
        until.isoformat(),
        report.studies,
        len(report.alerts),
        html_path,
    )
    return FairnessOutcome(
        report, html_path, measure_id, [a.message for a in report.alerts], events
    )
