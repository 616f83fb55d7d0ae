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

Comparisons, each a ratio and a difference with intervals from the same resamples:

- with the overall value (which contains the group, so it dilutes a gap: a group that is half
  the population and 0.71 times the other half reads 0.83 times the overall);
- with the attribute's reference group (``reference_groups``, else its largest known group;
  ``unknown`` is never a reference), as Aequitas does;
- between groups: the highest vs the lowest known, unsuppressed group (fairlearn's
  ``between_groups`` ratio and difference).

Alert rules choose their comparisons. Each comparison's p-value (its difference over the
bootstrap standard error) enters one Benjamini-Hochberg family per report, so that hundreds of
comparisons do not turn into a handful of false alerts; a rule also needs a minimum practical
effect (``AlertRule.min_effect``). A rule that crosses its threshold by that effect but lacks
the evidence is a *watch* (it would fire with more studies), never an alert.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipeline.fairness_types import (
    INTERSECTION,
    UNKNOWN,
    Alert,
    AlertRule,
    AttributeCoverage,
    Between,
    Comparison,
    Estimate,
    FairnessReport,
    GroupCoverage,
    GroupResult,
    MetricKind,
    MetricResult,
    TrendPoint,
    intersection,
    intersection_group,
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
        if INTERSECTION in attribute:
            return intersection_group([self.group(a) for a in attribute.split(INTERSECTION)])
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
    improvement: Literal["increase", "decrease"] | None = None


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
            "decrease",
        ),
        MetricDef(
            "failure_rate",
            "Failed or dead-lettered",
            "rate",
            "1",
            every,
            lambda r: _flag(r.outcome in ("failed", "dead_lettered")),
            "decrease",
        ),
        MetricDef(
            "dead_letter_rate",
            "Dead-lettered",
            "rate",
            "1",
            every,
            lambda r: _flag(r.outcome == "dead_lettered"),
            "decrease",
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
            "decrease",
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
                "increase",
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
                "increase",
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


def _p_value(effect: float, samples: Vector) -> float | None:
    """Two-sided p-value of no effect: ``effect`` over its bootstrap standard error (Wald).

    Not the share of resamples beyond parity: that cannot go below 2 / (resamples + 1), too
    coarse for a Benjamini-Hochberg family of hundreds of comparisons.
    """
    finite = samples[np.isfinite(samples)]
    if finite.size < max(10, samples.size // 2):
        return None
    spread = float(np.std(finite, ddof=1))
    if spread == 0.0:
        return 1.0 if effect == 0.0 else 0.0
    return math.erfc(abs(effect) / spread / math.sqrt(2.0))


def _comparison(
    value: float,
    against: float | None,
    samples: Vector,
    against_samples: Vector,
    confidence: float,
    *,
    multiplier: float = 1.0,
) -> tuple[Estimate, Estimate]:
    """Ratio and difference of ``value`` to ``against`` with intervals from the same resamples."""
    if against is None:
        return Estimate(None), Estimate(None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = samples / against_samples
    differences = samples - against_samples
    p = _p_value(value - against, differences)
    p = None if p is None else min(1.0, p * multiplier)
    ratio = (
        Estimate(value / against, *_interval(ratios, confidence), p_value=p)
        if against
        else Estimate(None)
    )
    return ratio, Estimate(value - against, *_interval(differences, confidence), p_value=p)


@dataclass(frozen=True)
class _Cells:
    """One attribute's groups: per group its cell sizes, numerators, values and resamples."""

    names: list[str]
    sizes: list[int]  # records per group (for the default reference group)
    n: npt.NDArray[np.float64]  # group × metric
    num: npt.NDArray[np.float64]
    points: npt.NDArray[np.float64]
    samples: npt.NDArray[np.float64]  # group × boot × metric

    @classmethod
    def of(
        cls, records: Sequence[FairnessRecord], attribute: str, table: _Table, weights: Vector
    ) -> _Cells:
        groups = _groups(records, attribute)
        names = [g for g, _ in groups]
        metrics = table.num.shape[0]
        n = np.array([table.den[:, m].sum(axis=1) for _, m in groups]).reshape(-1, metrics)
        num = np.array([table.num[:, m].sum(axis=1) for _, m in groups]).reshape(-1, metrics)
        samples = np.array(
            [_ratio(weights[:, m] @ table.num[:, m].T, weights[:, m] @ table.den[:, m].T)
             for _, m in groups]
        ).reshape(-1, weights.shape[0], metrics)  # fmt: skip
        return cls(names, [int(m.sum()) for _, m in groups], n, num, _ratio(num, n), samples)

    def usable(self, index: int, metric: int, min_group_size: int) -> bool:
        return self.n[index, metric] >= min_group_size and math.isfinite(self.points[index, metric])


def reference_group(names: Sequence[str], sizes: Sequence[int], declared: str | None) -> str | None:
    """The declared reference group if the attribute has it, else its largest known group.

    ``unknown`` is never a reference: it is a mixture of every group. Ties go to the name that
    sorts first, so the choice is reproducible.
    """
    if declared is not None and declared in names:
        return declared
    known = [(size, name) for name, size in zip(names, sizes, strict=True) if name != UNKNOWN]
    if not known:
        return None
    return min(known, key=lambda item: (-item[0], item[1]))[1]


def _between(
    attribute: str, cells: _Cells, metric: int, min_group_size: int, confidence: float
) -> Between | None:
    """The highest and lowest known, unsuppressed groups and their ratio and difference."""
    eligible = [
        i
        for i, name in enumerate(cells.names)
        if name != UNKNOWN and cells.usable(i, metric, min_group_size)
    ]
    if len(eligible) < 2:
        return None
    high = max(eligible, key=lambda i: (cells.points[i, metric], cells.names[i]))
    low = min(eligible, key=lambda i: (cells.points[i, metric], cells.names[i]))
    pairs = len(eligible) * (len(eligible) - 1) / 2
    ratio, difference = _comparison(
        float(cells.points[high, metric]),
        float(cells.points[low, metric]),
        cells.samples[high][:, metric],
        cells.samples[low][:, metric],
        confidence,
        multiplier=pairs,
    )
    return Between(attribute, cells.names[high], cells.names[low], ratio, difference)


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
    reference_groups: Mapping[str, str] | None = None,
    false_discovery_rate: float = 0.05,
    previous_alerts: Sequence[Alert] | None = None,
    max_unknown_share: float = 0.5,
    intersections: Sequence[Sequence[str]] = (),
) -> FairnessReport:
    """Metrics per subgroup with bootstrap intervals, comparisons with the overall value, the
    reference group and between groups, and the alerts the rules raise on them.

    ``previous_alerts`` are the alerts of the previous window (None: not evaluated): each alert
    is then marked new or persisting. ``intersections`` (pairs of attributes) are added as
    attributes of their own, ``sex×race`` with groups such as ``female & Black``, suppressed,
    compared and alerted on like any other.
    """
    attributes = [*attributes, *(intersection(*pair) for pair in intersections)]
    attributes = list(dict.fromkeys(attributes))
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
    between: dict[str, list[Between]] = {d.name: [] for d in defs}
    references: dict[str, str] = {}
    overall_point: dict[str, float | None] = {
        d.name: _finite(float(_ratio(overall_num[i], overall_n[i]))) for i, d in enumerate(defs)
    }
    for attribute in attributes:
        cells = _Cells.of(records, attribute, table, weights)
        reference = reference_group(
            cells.names, cells.sizes, (reference_groups or {}).get(attribute)
        )
        if reference is not None:
            references[attribute] = reference
        ref = cells.names.index(reference) if reference is not None else None
        for i, metric in enumerate(defs):
            spread = _between(attribute, cells, i, min_group_size, confidence)
            if spread is not None:
                between[metric.name].append(spread)
            ref_usable = ref is not None and cells.usable(ref, i, min_group_size)
            for g, group in enumerate(cells.names):
                group_results[metric.name].append(
                    _group_result(
                        attribute, group, cells, g, i, overall_point[metric.name],
                        overall_samples[:, i], ref if ref_usable and g != ref else None,
                        min_group_size, confidence,
                    )
                )  # fmt: skip
    metrics = tuple(
        MetricResult(
            name=d.name,
            title=d.title,
            kind=d.kind,
            unit=d.unit,
            population=d.population,
            improvement=d.improvement,
            overall_n=int(overall_n[i]),
            overall_numerator=float(overall_num[i]),
            overall=(
                Estimate(overall_point[d.name], *_interval(overall_samples[:, i], confidence))
                if overall_point[d.name] is not None
                else Estimate(None)
            ),
            groups=tuple(group_results[d.name]),
            between=tuple(between[d.name]),
        )
        for i, d in enumerate(defs)
    )
    evaluation = evaluate_rules(metrics, rules, references, false_discovery_rate)
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
        alerts=_since_last(evaluation.alerts, previous_alerts),
        trend=tuple(trend),
        signed_unreadable=signed_unreadable,
        reference_groups=tuple(references.items()),
        watches=evaluation.watches,
        false_discovery_rate=false_discovery_rate,
        tests=evaluation.tests,
        coverage=tuple(
            attribute_coverage(records, a, min_group_size, max_unknown_share) for a in attributes
        ),
        rules=tuple(rules),
    )


def attribute_coverage(
    records: Sequence[FairnessRecord], attribute: str, min_group_size: int, max_unknown_share: float
) -> AttributeCoverage:
    """Unknown share, known groups and signed-report coverage per group of one attribute."""
    groups: list[GroupCoverage] = []
    for group, mask in _groups(records, attribute):
        members = [r for r, member in zip(records, mask, strict=True) if member]
        groups.append(
            GroupCoverage(
                group=group,
                studies=len(members),
                drafted=sum(r.draft is not None for r in members),
                with_final_report=sum(r.draft is not None and r.final is not None for r in members),
                suppressed=len(members) < min_group_size,
            )
        )
    unknown = sum(g.studies for g in groups if g.group == UNKNOWN)
    known = sum(g.group != UNKNOWN for g in groups)
    studies = len(records)
    reason = ""
    if studies and unknown / studies > max_unknown_share:
        reason = f"{unknown / studies:.0%} unknown"
    elif studies and known < 2:
        reason = "one known group" if known == 1 else "no known group"
    return AttributeCoverage(
        attribute=attribute,
        studies=studies,
        unknown=unknown,
        known_groups=known,
        groups=tuple(groups),
        assessable=not reason,
        reason=reason,
    )


def _since_last(alerts: Sequence[Alert], previous: Sequence[Alert] | None) -> tuple[Alert, ...]:
    if previous is None:
        return tuple(alerts)
    before = {a.key for a in previous}
    return tuple(replace(a, since_last="persisting" if a.key in before else "new") for a in alerts)


def _group_result(
    attribute: str,
    group: str,
    cells: _Cells,
    g: int,
    i: int,
    overall: float | None,
    overall_samples: Vector,
    ref: int | None,
    min_group_size: int,
    confidence: float,
) -> GroupResult:
    """One cell: its value and its comparisons with the overall value and the reference."""
    cell_n = int(cells.n[g, i])
    suppressed = cell_n < min_group_size
    value = _finite(float(cells.points[g, i]))
    numerator = float(cells.num[g, i])
    if suppressed or value is None:
        none = Estimate(None)
        return GroupResult(attribute, group, cell_n, numerator, suppressed, none, none, none)
    samples = cells.samples[g][:, i]
    ratio, difference = _comparison(value, overall, samples, overall_samples, confidence)
    ref_ratio, ref_difference = (
        _comparison(
            value, float(cells.points[ref, i]), samples, cells.samples[ref][:, i], confidence
        )
        if ref is not None
        else (Estimate(None), Estimate(None))
    )
    return GroupResult(
        attribute=attribute,
        group=group,
        n=cell_n,
        numerator=numerator,
        suppressed=False,
        estimate=Estimate(value, *_interval(samples, confidence)),
        ratio=ratio,
        difference=difference,
        reference_ratio=ref_ratio,
        reference_difference=ref_difference,
    )


# -- alerts ----------------------------------------------------------------------------------


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input's order.

    q_(i) = min over j >= i of p_(j) * m / j (sorted ascending, capped at 1): a comparison is a
    discovery at false discovery rate alpha when its q-value is at most alpha.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda k: p_values[k])
    adjusted = [1.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        k = order[rank - 1]
        running = min(running, p_values[k] * m / rank)
        adjusted[k] = min(1.0, running)
    return adjusted


@dataclass(frozen=True)
class _Candidate:
    """One comparison a rule looks at: a group against its comparator."""

    metric: MetricResult
    comparison: Comparison
    group: GroupResult
    against: str
    against_estimate: Estimate
    against_n: int | None
    against_numerator: float | None
    ratio: Estimate
    difference: Estimate

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.metric.name, self.comparison, self.group.attribute, self.group.group,
                self.against)  # fmt: skip


def _flip(estimate: Estimate, *, ratio: bool) -> Estimate:
    """The comparison seen from the other side: a reciprocal ratio or a negated difference."""

    def one(v: float | None) -> float | None:
        if v is None:
            return None
        if ratio:
            return 1.0 / v if v else None
        return -v

    return Estimate(one(estimate.value), one(estimate.ci_high), one(estimate.ci_low),
                    estimate.p_value)  # fmt: skip


def _candidates(
    metric: MetricResult, comparison: Comparison, references: Mapping[str, str]
) -> Iterable[_Candidate]:
    if comparison == "overall":
        for g in metric.groups:
            if not g.suppressed:
                yield _Candidate(metric, comparison, g, "overall", metric.overall,
                                 metric.overall_n, metric.overall_numerator, g.ratio,
                                 g.difference)  # fmt: skip
    elif comparison == "reference":
        for g in metric.groups:
            ref = metric.group(g.attribute, references.get(g.attribute, ""))
            if g.suppressed or ref is None or g.reference_ratio.value is None:
                continue
            yield _Candidate(metric, comparison, g, ref.group, ref.estimate, ref.n,
                             ref.numerator, g.reference_ratio, g.reference_difference)  # fmt: skip
    else:
        for spread in metric.between:
            high = metric.group(spread.attribute, spread.high)
            low = metric.group(spread.attribute, spread.low)
            if high is None or low is None:
                continue
            # Both ends: an "above" threshold reads high vs low, a "below" one low vs high.
            yield _Candidate(metric, comparison, high, low.group, low.estimate, low.n,
                             low.numerator, spread.ratio, spread.difference)  # fmt: skip
            yield _Candidate(metric, comparison, low, high.group, high.estimate, high.n,
                             high.numerator, _flip(spread.ratio, ratio=True),
                             _flip(spread.difference, ratio=False))  # fmt: skip


def _crossed(rule: AlertRule, candidate: _Candidate) -> tuple[str, bool] | None:
    """The first threshold the comparison crosses by a practical margin, and whether its
    interval lies beyond parity; None when no threshold is crossed."""
    checks = (  # threshold, estimate, parity, direction (+1: above, -1: below), words
        (rule.ratio_above, candidate.ratio, 1.0, 1.0, "ratio >"),
        (rule.ratio_below, candidate.ratio, 1.0, -1.0, "ratio <"),
        (rule.difference_above, candidate.difference, 0.0, 1.0, "difference >"),
        (rule.difference_below, candidate.difference, 0.0, -1.0, "difference <"),
    )
    effect = candidate.difference.value
    if effect is None or abs(effect) < rule.min_effect:
        return None
    for threshold, estimate, parity, direction, words in checks:
        if threshold is None or estimate.value is None:
            continue
        if (estimate.value - threshold) * direction <= 0:
            continue
        bound = estimate.ci_low if direction > 0 else estimate.ci_high
        beyond_parity = bound is not None and (bound - parity) * direction > 0
        return f"{words} {threshold:g}", beyond_parity
    return None


def _fmt(value: float | None, kind: MetricKind) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if kind == "rate" else f"{value:.2f}"


def _message(rule: AlertRule, candidate: _Candidate, threshold: str) -> str:
    metric, group, ratio = candidate.metric, candidate.group, candidate.ratio
    ci = (
        f" (CI {ratio.ci_low:.2f}-{ratio.ci_high:.2f})"
        if ratio.ci_low is not None and ratio.ci_high is not None
        else ""
    )
    ratio_text = f"{ratio.value:.2f}" if ratio.value is not None else "n/a"
    against = (
        "overall"
        if candidate.against == "overall"
        else f"for {group.attribute}={candidate.against}"
        + (" (reference)" if candidate.comparison == "reference" else " (between groups)")
    )
    return (
        f"[{rule.name}] {metric.title} ({metric.name}) for {group.attribute}={group.group}: "
        f"{_fmt(group.estimate.value, metric.kind)} vs "
        f"{_fmt(candidate.against_estimate.value, metric.kind)} {against}, "
        f"ratio {ratio_text}{ci}, threshold {threshold}, n={group.n}"
    )


@dataclass(frozen=True)
class RuleEvaluation:
    alerts: tuple[Alert, ...]
    watches: tuple[Alert, ...]  # crossed a threshold, evidence too thin: would fire with more n
    tests: int  # comparisons in the Benjamini-Hochberg family


def evaluate_rules(
    metrics: Iterable[MetricResult],
    rules: Sequence[AlertRule],
    references: Mapping[str, str] | None = None,
    false_discovery_rate: float = 0.05,
) -> RuleEvaluation:
    """Every (rule, metric, group) where an unsuppressed group crosses the rule's thresholds.

    The multiple-comparison family is every distinct comparison some rule with ``require_ci``
    looks at (whether or not it crosses a threshold): their bootstrap p-values are adjusted by
    Benjamini-Hochberg together, and such a rule fires only when the crossing comparison's
    q-value is at most ``false_discovery_rate``. One alert per rule, metric and group: the first
    of the rule's comparisons that fires.
    """
    refs = references or {}
    looked: list[tuple[AlertRule, list[_Candidate]]] = []
    family: dict[tuple[str, str, str, str, str], float] = {}
    for metric in metrics:
        for rule in rules:
            if not fnmatch.fnmatchcase(metric.name, rule.metric):
                continue
            candidates = [
                c
                for comparison in rule.comparisons
                for c in _candidates(metric, comparison, refs)
                if rule.attributes is None or c.group.attribute in rule.attributes
            ]
            looked.append((rule, candidates))
            if rule.require_ci:
                for c in candidates:
                    if c.difference.p_value is not None:
                        family[c.key] = c.difference.p_value
    keys = list(family)
    q_values = dict(zip(keys, benjamini_hochberg([family[k] for k in keys]), strict=True))
    alerts: dict[tuple[str, str, str, str], Alert] = {}
    watches: dict[tuple[str, str, str, str], Alert] = {}
    for rule, candidates in looked:
        for c in candidates:
            crossed = _crossed(rule, c)
            if crossed is None:
                continue
            threshold, beyond_parity = crossed
            q = q_values.get(c.key)
            certain = not rule.require_ci or (
                beyond_parity and q is not None and q <= false_discovery_rate
            )
            key = (rule.name, c.metric.name, c.group.attribute, c.group.group)
            target = alerts if certain else watches
            if key in alerts or key in target:
                continue
            target[key] = Alert(
                rule=rule.name,
                metric=c.metric.name,
                attribute=c.group.attribute,
                group=c.group.group,
                n=c.group.n,
                estimate=c.group.estimate,
                overall=c.metric.overall,
                ratio=c.ratio,
                difference=c.difference,
                message=_message(rule, c, threshold),
                comparison=c.comparison,
                against=c.against,
                against_estimate=c.against_estimate,
                against_n=c.against_n,
                numerator=c.group.numerator,
                against_numerator=c.against_numerator,
                threshold=threshold,
                q_value=q,
                min_effect=rule.min_effect,
                action=rule.action,
                owner=rule.owner,
            )
    return RuleEvaluation(
        alerts=tuple(alerts.values()),
        watches=tuple(w for k, w in watches.items() if k not in alerts),
        tests=len(family),
    )


def wilson_interval(events: float, n: int, confidence: float) -> tuple[float, float] | None:
    """Wilson's score interval of a proportion (events of n): stays inside [0, 1] and is sound
    for small n and rates near 0, where a normal interval is not. None for n = 0."""
    if n <= 0:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = events / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def trend_points(
    windows: Iterable[tuple[dt.datetime, dt.datetime, Sequence[FairnessRecord]]],
    *,
    attributes: Sequence[str],
    min_group_size: int,
    metrics: Sequence[str] = TREND_METRICS,
    confidence: float = 0.95,
) -> list[TrendPoint]:
    """Point estimates of ``metrics`` per window, overall and per group, with Wilson intervals
    (the trend metrics are rates; a bootstrap per window and group would cost the report's
    whole budget again). A suppressed cell has neither value nor interval."""
    defs = tuple(d for d in metric_definitions() if d.name in metrics)
    points: list[TrendPoint] = []

    def point(
        start: dt.datetime,
        end: dt.datetime,
        metric: str,
        attribute: str,
        group: str,
        events: float,
        n: int,
        shown: bool,
    ) -> TrendPoint:
        value = _finite(float(_ratio(events, n))) if shown else None
        interval = wilson_interval(events, n, confidence) if value is not None else None
        low, high = interval if interval is not None else (None, None)
        return TrendPoint(start, end, metric, attribute, group, n, value, low, high)

    for start, end, records in windows:
        table = _Table.of(records, defs)
        groups = {attribute: _groups(records, attribute) for attribute in attributes}
        for i, d in enumerate(defs):
            total_n = int(table.den[i].sum())
            points.append(
                point(start, end, d.name, "overall", "overall", table.num[i].sum(), total_n, True)
            )
            for attribute, cells in groups.items():
                for group, mask in cells:
                    cell_n = int(table.den[i, mask].sum())
                    events = table.num[i, mask].sum()
                    shown = cell_n >= min_group_size
                    points.append(
                        point(start, end, d.name, attribute, group, events, cell_n, shown)
                    )
    return points
