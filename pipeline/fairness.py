"""Fairness of drafts across subgroups: metrics, bootstrap confidence intervals, disparity, alerts.

Input: one ``FairnessRecord`` per study in a window (its subgroups, captured at draft time; its
outcome; the draft; and, once a radiologist has signed, the labels of the final report). Output:
a ``FairnessReport`` (``pipeline.fairness_types``).

Every metric is a ratio of sums, value = sum(numerator) / sum(denominator) over the studies of a
group, where each study contributes a numerator value and a 0/1 denominator membership:

- ``failure_rate``, ``dead_letter_rate``, ``skip_rate`` (a safety rule withheld the draft:
  signed before drafting, patient mismatch, nothing reportable) — over all studies in the window;
- ``no_finding_rate`` (draft marks no finding present; support devices and ``other`` do not
  count, as in CheXpert's "No Finding"), ``critical_rate``, ``finding_rate:<finding>``,
  ``output_chars`` (mean length of the stored draft JSON), ``latency_s`` (mean model time) —
  over drafted studies;
- ``underdiagnosis_rate`` — over drafted studies whose final report has a finding: the draft
  says no finding (Seyyed-Kalantari et al., 2021: the "No Finding" false-positive rate);
- ``sensitivity:<finding>`` — over studies whose final report marks the finding present: the
  draft marks it present; ``specificity:<finding>`` — over studies whose final report does not
  mention it or negates it: the draft does not mark it present. Uncertain mentions in the final
  report leave the study out of that finding's agreement metrics; an uncertain draft counts as
  not present (a draft's "maybe" is not a diagnosis).

Groups are disaggregated with numpy: every group sum is a masked sum, and every bootstrap
resample is a row of multinomial counts ``W``, so a group's resampled sums are
``W[:, group] @ values[group]`` (vectorised; percentile intervals). The alert rules need, for
every group, intervals of its ratio and its difference to the overall value *from the same
resample*, which fairlearn's ``MetricFrame`` bootstrap does not expose; and MetricFrame is slow
for many small metrics (it stacks arrays row by row per call): ``bench/bench_fairness.py``
measured, for 4,512 studies × 46 metrics × 8 attributes, 0.07 s for
the numpy point estimates, 11.2 s for the same estimates from MetricFrame (identical values),
1.2 s for the whole report with 500 resamples. So fairlearn is the reference the tests and the
bench check these numbers against, not a run-time dependency.

A cell (group × metric) whose denominator is under ``min_group_size`` is suppressed: it is
reported with no numbers and takes no part in disparities or alerts.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipeline.fairness_types import (
    UNKNOWN,
    Alert,
    AlertRule,
    Estimate,
    FairnessReport,
    GroupResult,
    MetricKind,
    MetricResult,
    TrendPoint,
)
from pipeline.labeler import ReportLabels
from pipeline.ledger import DraftJob, JobState
from pipeline.report import DraftReport, FindingName, Presence

Outcome = Literal["drafted", "failed", "dead_lettered", "skipped", "pending"]
Vector = npt.NDArray[np.float64]

#: Findings scored per finding (``other`` has no fixed meaning to compare).
SCORED_FINDINGS: tuple[FindingName, ...] = tuple(
    f for f in FindingName if f is not FindingName.OTHER
)
#: Metrics plotted as trends over windows.
TREND_METRICS: tuple[str, ...] = ("underdiagnosis_rate", "no_finding_rate", "failure_rate")


@dataclass(frozen=True)
class FairnessRecord:
    """One study as the monitor sees it."""

    created_at: dt.datetime
    model_version: str
    subgroups: Mapping[str, str]
    outcome: Outcome
    draft: DraftReport | None = None
    output_chars: int | None = None
    latency_s: float | None = None
    final: ReportLabels | None = None  # labels of the signed report, when there is one

    def group(self, attribute: str) -> str:
        value = self.subgroups.get(attribute)
        return value if value else UNKNOWN

    @functools.cached_property
    def draft_labels(self) -> ReportLabels | None:
        return draft_labels(self.draft) if self.draft is not None else None


def draft_labels(report: DraftReport) -> ReportLabels:
    """The draft's findings in the labeler's terms (present beats uncertain beats absent)."""
    rank = {Presence.ABSENT: 0, Presence.UNCERTAIN: 1, Presence.PRESENT: 2}
    findings: dict[FindingName, Presence] = {}
    for finding in report.findings:
        known = findings.get(finding.name)
        if known is None or rank[finding.presence] > rank[known]:
            findings[finding.name] = finding.presence
    return ReportLabels(findings=findings)


def record_from_job(job: DraftJob, final: ReportLabels | None = None) -> FairnessRecord:
    """A ledger job as a record; ``final`` are the labels of its signed report, if any."""
    outcome: Outcome
    if job.state in (JobState.DRAFTED, JobState.WRITING, JobState.WRITTEN):
        outcome = "drafted"
    elif job.state is JobState.DEAD_LETTERED:
        outcome = "dead_lettered"
    elif job.state is JobState.FAILED:
        outcome = "failed"
    elif job.state is JobState.SKIPPED:
        outcome = "skipped"
    else:
        outcome = "pending"
    drafted = outcome == "drafted" and job.draft is not None
    created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=dt.UTC)
    return FairnessRecord(
        created_at=created,
        model_version=job.model_version,
        subgroups=dict(job.subgroups or {}),
        outcome=outcome,
        draft=DraftReport.model_validate(job.draft) if drafted else None,
        output_chars=(
            len(json.dumps(job.draft, ensure_ascii=False, separators=(",", ":")))
            if drafted
            else None
        ),
        latency_s=(job.timings or {}).get("draft_s"),
        final=final,
    )


# -- metric definitions ----------------------------------------------------------------------

# A metric maps a record to (numerator, in denominator); None means "not in the denominator".
Contribution = Callable[[FairnessRecord], float | None]


@dataclass(frozen=True)
class MetricDef:
    name: str
    title: str
    kind: MetricKind
    unit: str
    population: str
    contribution: Contribution


def _flag(value: bool) -> float:
    return 1.0 if value else 0.0


def _drafted(fn: Callable[[FairnessRecord, ReportLabels], float | None]) -> Contribution:
    def contribution(record: FairnessRecord) -> float | None:
        labels = record.draft_labels
        return None if labels is None else fn(record, labels)

    return contribution


def _agreement(fn: Callable[[ReportLabels, ReportLabels], float | None]) -> Contribution:
    def contribution(record: FairnessRecord) -> float | None:
        labels = record.draft_labels
        return None if labels is None or record.final is None else fn(labels, record.final)

    return contribution


def _sensitivity(name: FindingName) -> Contribution:
    def fn(draft: ReportLabels, final: ReportLabels) -> float | None:
        if final.presence(name) is not Presence.PRESENT:
            return None
        return _flag(draft.presence(name) is Presence.PRESENT)

    return _agreement(fn)


def _specificity(name: FindingName) -> Contribution:
    def fn(draft: ReportLabels, final: ReportLabels) -> float | None:
        if final.presence(name) not in (None, Presence.ABSENT):
            return None
        return _flag(draft.presence(name) is not Presence.PRESENT)

    return _agreement(fn)


def _finding_rate(name: FindingName) -> Contribution:
    return _drafted(lambda _r, labels: _flag(labels.presence(name) is Presence.PRESENT))


def metric_definitions() -> tuple[MetricDef, ...]:
    """Every metric the monitor computes, in report order."""
    every = "all studies in the window"
    drafted = "drafted studies"
    defs = [
        MetricDef(
            "underdiagnosis_rate",
            "Underdiagnosis (draft: no finding; signed report: finding)",
            "rate",
            "1",
            "drafted studies whose signed report has a finding",
            _agreement(lambda draft, final: _flag(draft.no_finding) if final.has_finding else None),
        ),
        MetricDef(
            "failure_rate",
            "Failed or dead-lettered",
            "rate",
            "1",
            every,
            lambda r: _flag(r.outcome in ("failed", "dead_lettered")),
        ),
        MetricDef(
            "dead_letter_rate",
            "Dead-lettered",
            "rate",
            "1",
            every,
            lambda r: _flag(r.outcome == "dead_lettered"),
        ),
        MetricDef(
            "skip_rate",
            "Skipped by a safety rule (signed first, patient mismatch, not reportable)",
            "rate",
            "1",
            every,
            lambda r: _flag(r.outcome == "skipped"),
        ),
        MetricDef(
            "no_finding_rate",
            "Draft says no finding",
            "rate",
            "1",
            drafted,
            _drafted(lambda _r, labels: _flag(labels.no_finding)),
        ),
        MetricDef(
            "critical_rate",
            "Draft flagged critical",
            "rate",
            "1",
            drafted,
            _drafted(lambda r, _l: _flag(r.draft is not None and r.draft.critical)),
        ),
        MetricDef(
            "output_chars",
            "Mean draft length",
            "mean",
            "{char}",
            drafted,
            _drafted(lambda r, _l: float(r.output_chars) if r.output_chars is not None else None),
        ),
        MetricDef(
            "latency_s",
            "Mean model latency",
            "mean",
            "s",
            drafted,
            _drafted(lambda r, _l: r.latency_s),
        ),
    ]
    for name in SCORED_FINDINGS:
        label = name.value.replace("_", " ")
        defs.append(
            MetricDef(
                f"finding_rate:{name.value}",
                f"Draft marks {label} present",
                "rate",
                "1",
                drafted,
                _finding_rate(name),
            )
        )
    for name in SCORED_FINDINGS:
        label = name.value.replace("_", " ")
        defs.append(
            MetricDef(
                f"sensitivity:{name.value}",
                f"Sensitivity: {label}",
                "rate",
                "1",
                f"studies whose signed report has {label}",
                _sensitivity(name),
            )
        )
        defs.append(
            MetricDef(
                f"specificity:{name.value}",
                f"Specificity: {label}",
                "rate",
                "1",
                f"studies whose signed report does not have {label}",
                _specificity(name),
            )
        )
    return tuple(defs)


# -- computation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """Numerators and denominator memberships, metrics × studies."""

    defs: tuple[MetricDef, ...]
    num: npt.NDArray[np.float64]
    den: npt.NDArray[np.float64]

    @classmethod
    def of(cls, records: Sequence[FairnessRecord], defs: tuple[MetricDef, ...]) -> _Table:
        num = np.zeros((len(defs), len(records)))
        den = np.zeros((len(defs), len(records)))
        for j, record in enumerate(records):
            for i, metric in enumerate(defs):
                value = metric.contribution(record)
                if value is not None:
                    num[i, j], den[i, j] = value, 1.0
        return cls(defs, num, den)


def _groups(
    records: Sequence[FairnessRecord], attribute: str
) -> list[tuple[str, npt.NDArray[np.bool_]]]:
    """Each group of ``attribute`` (``unknown`` last) with the mask of its records."""
    labels = np.asarray([record.group(attribute) for record in records], dtype=object)
    groups = sorted(set(labels.tolist()), key=lambda g: (g == UNKNOWN, g))
    return [(str(group), labels == group) for group in groups]


def _ratio(num: Any, den: Any) -> Any:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _interval(samples: Vector, confidence: float) -> tuple[float | None, float | None]:
    finite = samples[np.isfinite(samples)]
    if finite.size < max(10, samples.size // 2):  # mostly undefined: no honest interval
        return None, None
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def compute_report(
    records: Sequence[FairnessRecord],
    *,
    since: dt.datetime,
    until: dt.datetime,
    attributes: Sequence[str],
    min_group_size: int,
    n_boot: int,
    confidence: float,
    rules: Sequence[AlertRule],
    seed: int = 0,
    trend: Sequence[TrendPoint] = (),
    generated: dt.datetime | None = None,
    signed_unreadable: int = 0,
) -> FairnessReport:
    """Metrics per subgroup with bootstrap intervals, disparities to the overall, and alerts."""
    defs = metric_definitions()
    table = _Table.of(records, defs)
    n = len(records)
    rng = np.random.default_rng(seed)
    weights = (
        rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        if n
        else np.zeros((n_boot, 0))
    )
    overall_samples = _ratio(weights @ table.num.T, weights @ table.den.T)  # boot × metric
    overall_n = table.den.sum(axis=1)
    overall_num = table.num.sum(axis=1)

    group_results: dict[str, list[GroupResult]] = {d.name: [] for d in defs}
    overall_point: dict[str, float | None] = {
        d.name: _finite(float(_ratio(overall_num[i], overall_n[i]))) for i, d in enumerate(defs)
    }
    for attribute in attributes:
        for group, mask in _groups(records, attribute):
            g_num = table.num[:, mask]
            g_den = table.den[:, mask]
            points = _ratio(g_num.sum(axis=1), g_den.sum(axis=1))
            samples = _ratio(weights[:, mask] @ g_num.T, weights[:, mask] @ g_den.T)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio_samples = samples / overall_samples
            diff_samples = samples - overall_samples
            for i, metric in enumerate(defs):
                cell_n = int(g_den[i].sum())
                value = _finite(float(points[i]))
                overall = overall_point[metric.name]
                suppressed = cell_n < min_group_size
                if suppressed or value is None:
                    estimate = ratio = difference = Estimate(None)
                else:
                    estimate = Estimate(value, *_interval(samples[:, i], confidence))
                    ratio = (
                        Estimate(value / overall, *_interval(ratio_samples[:, i], confidence))
                        if overall
                        else Estimate(None)
                    )
                    difference = (
                        Estimate(value - overall, *_interval(diff_samples[:, i], confidence))
                        if overall is not None
                        else Estimate(None)
                    )
                group_results[metric.name].append(
                    GroupResult(
                        attribute=attribute,
                        group=group,
                        n=cell_n,
                        numerator=float(g_num[i].sum()),
                        suppressed=suppressed,
                        estimate=estimate,
                        ratio=ratio,
                        difference=difference,
                    )
                )
    metrics = tuple(
        MetricResult(
            name=d.name,
            title=d.title,
            kind=d.kind,
            unit=d.unit,
            population=d.population,
            overall_n=int(overall_n[i]),
            overall_numerator=float(overall_num[i]),
            overall=(
                Estimate(overall_point[d.name], *_interval(overall_samples[:, i], confidence))
                if overall_point[d.name] is not None
                else Estimate(None)
            ),
            groups=tuple(group_results[d.name]),
        )
        for i, d in enumerate(defs)
    )
    return FairnessReport(
        since=since,
        until=until,
        generated=generated or dt.datetime.now(dt.UTC),
        model_versions=tuple(sorted({r.model_version for r in records})),
        studies=n,
        drafted=sum(r.outcome == "drafted" for r in records),
        with_final_report=sum(r.draft is not None and r.final is not None for r in records),
        min_group_size=min_group_size,
        n_boot=n_boot,
        confidence=confidence,
        attributes=tuple(attributes),
        metrics=metrics,
        alerts=tuple(evaluate_rules(metrics, rules)),
        trend=tuple(trend),
        signed_unreadable=signed_unreadable,
    )


# -- alerts ----------------------------------------------------------------------------------


def _fires(rule: AlertRule, group: GroupResult) -> bool:
    """Whether ``group`` crosses one of the rule's thresholds (and, if asked, its CI does too)."""
    checks = (  # threshold, estimate, parity, direction (+1: above, -1: below)
        (rule.ratio_above, group.ratio, 1.0, 1.0),
        (rule.ratio_below, group.ratio, 1.0, -1.0),
        (rule.difference_above, group.difference, 0.0, 1.0),
        (rule.difference_below, group.difference, 0.0, -1.0),
    )
    for threshold, estimate, parity, direction in checks:
        if threshold is None or estimate.value is None:
            continue
        bound = estimate.ci_low if direction > 0 else estimate.ci_high
        beyond = (estimate.value - threshold) * direction > 0
        certain = not rule.require_ci or (bound is not None and (bound - parity) * direction > 0)
        if beyond and certain:
            return True
    return False


def _fmt(value: float | None, kind: MetricKind) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if kind == "rate" else f"{value:.2f}"


def evaluate_rules(metrics: Iterable[MetricResult], rules: Sequence[AlertRule]) -> list[Alert]:
    """Every (rule, metric, group) where an unsuppressed group crosses the rule's thresholds."""
    alerts: list[Alert] = []
    for metric in metrics:
        for rule in rules:
            if not fnmatch.fnmatchcase(metric.name, rule.metric):
                continue
            for group in metric.groups:
                if group.suppressed or (
                    rule.attributes is not None and group.attribute not in rule.attributes
                ):
                    continue
                if not _fires(rule, group):
                    continue
                ratio = group.ratio
                ci = (
                    f" (CI {ratio.ci_low:.2f}-{ratio.ci_high:.2f})"
                    if ratio.ci_low is not None and ratio.ci_high is not None
                    else ""
                )
                ratio_text = f"{ratio.value:.2f}" if ratio.value is not None else "n/a"
                message = (
                    f"[{rule.name}] {metric.title} ({metric.name}) for "
                    f"{group.attribute}={group.group}: "
                    f"{_fmt(group.estimate.value, metric.kind)} vs "
                    f"{_fmt(metric.overall.value, metric.kind)} overall, ratio {ratio_text}{ci}, "
                    f"n={group.n}"
                )
                alerts.append(
                    Alert(
                        rule=rule.name,
                        metric=metric.name,
                        attribute=group.attribute,
                        group=group.group,
                        n=group.n,
                        estimate=group.estimate,
                        overall=metric.overall,
                        ratio=group.ratio,
                        difference=group.difference,
                        message=message,
                    )
                )
    return alerts


def trend_points(
    windows: Iterable[tuple[dt.datetime, dt.datetime, Sequence[FairnessRecord]]],
    *,
    attributes: Sequence[str],
    min_group_size: int,
    metrics: Sequence[str] = TREND_METRICS,
) -> list[TrendPoint]:
    """Point estimates of ``metrics`` per window, overall and per group (suppressed → None)."""
    defs = tuple(d for d in metric_definitions() if d.name in metrics)
    points: list[TrendPoint] = []
    for start, end, records in windows:
        table = _Table.of(records, defs)
        groups = {attribute: _groups(records, attribute) for attribute in attributes}
        for i, d in enumerate(defs):
            total_n = int(table.den[i].sum())
            value = _finite(float(_ratio(table.num[i].sum(), total_n)))
            points.append(TrendPoint(start, end, d.name, "overall", "overall", total_n, value))
            for attribute, cells in groups.items():
                for group, mask in cells:
                    cell_n = int(table.den[i, mask].sum())
                    cell = _finite(float(_ratio(table.num[i, mask].sum(), cell_n)))
                    points.append(
                        TrendPoint(
                            start,
                            end,
                            d.name,
                            attribute,
                            group,
                            cell_n,
                            None if cell_n < min_group_size else cell,
                        )
                    )
    return points
