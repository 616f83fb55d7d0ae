"""The values the fairness monitor computes: per-subgroup metric estimates, disparities, alerts.

Computed by ``pipeline.fairness`` from ``FairnessRecord``s (one per drafted study); rendered by
``pipeline.fairness_fhir`` (a FHIR MeasureReport) and ``pipeline.fairness_html`` (an HTML report).
Plain frozen dataclasses, no I/O. A suppressed cell (a group smaller than the minimum size for that
metric) has ``suppressed=True`` and no numbers: unstable figures are never shown.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator

#: Subgroup attributes captured per study at draft time (``DraftJob.subgroups``).
ATTRIBUTES: tuple[str, ...] = (
    "sex",
    "age_band",
    "race",
    "ethnicity",
    "site",
    "manufacturer",
    "scanner_model",
    "modality",
)
#: The group of a study whose attribute is missing: reported like any other group, never dropped.
UNKNOWN = "unknown"
#: Joins the attributes of an intersection ("sex×race") and, with " & ", its groups
#: ("female & Black"): the worst groups are often intersections (CheXclusion: Hispanic female).
INTERSECTION = "×"


def intersection(*attributes: str) -> str:
    """The pseudo-attribute whose groups are the combinations of ``attributes``' groups."""
    return INTERSECTION.join(attributes)


def intersection_group(parts: Sequence[str]) -> str:
    """A combination's group: ``unknown`` when any part is (it mixes every combination)."""
    return UNKNOWN if UNKNOWN in parts else " & ".join(parts)


MetricKind = Literal["rate", "mean"]
#: What a group is compared with: the overall value (which contains the group), the reference
#: group of its attribute, or (between groups) the attribute's best and worst groups.
Comparison = Literal["overall", "reference", "between"]
COMPARISONS: tuple[Comparison, ...] = ("overall", "reference", "between")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval; all None when not computable.

    For a comparison (ratio, difference), ``p_value`` is the two-sided bootstrap p-value of
    parity (the share of resamples on the far side of parity, doubled), the input of the
    report's multiple-comparison control.
    """

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None

    @property
    def known(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class GroupResult:
    """One metric in one subgroup (stratum), compared with the overall value and the reference.

    The reference comparisons are unknown (None) for the reference group itself, and when the
    reference cell is suppressed for this metric.
    """

    attribute: str
    group: str
    n: int  # studies in the metric's denominator within this group (the cell size)
    numerator: float  # sum of the metric's numerator within this group
    suppressed: bool  # n < minimum group size: no numbers reported
    estimate: Estimate  # group value (None if suppressed)
    ratio: Estimate  # group value / overall value
    difference: Estimate  # group value - overall value
    reference_ratio: Estimate = Estimate(None)  # group value / reference group's value
    reference_difference: Estimate = Estimate(None)  # group value - reference group's value


@dataclass(frozen=True)
class Between:
    """The spread between an attribute's known, unsuppressed groups for one metric.

    ``high`` and ``low`` are the groups with the highest and lowest values; ``ratio`` is
    high / low and ``difference`` high - low (fairlearn's ``ratio``/``difference`` with
    ``method="between_groups"``, here with the bootstrap interval of that pair's ratio and
    difference, and a p-value Bonferroni-multiplied by the attribute's number of pairs, since
    the extreme pair was chosen after looking).
    """

    attribute: str
    high: str
    low: str
    ratio: Estimate
    difference: Estimate


@dataclass(frozen=True)
class MetricResult:
    """One metric overall and per subgroup of every attribute."""

    name: str  # e.g. "underdiagnosis_rate", "sensitivity:edema", "finding_rate:cardiomegaly"
    title: str  # human-readable, e.g. "Sensitivity: edema"
    kind: MetricKind  # "rate" (a proportion in [0, 1]) or "mean" (of a quantity with `unit`)
    unit: str  # UCUM-style unit: "1" for rates, "s" for seconds, "{char}" for characters
    population: str  # who is counted in the denominator, in words
    overall_n: int
    overall_numerator: float
    overall: Estimate
    groups: tuple[GroupResult, ...]
    between: tuple[Between, ...] = ()
    #: Which way is better, when one is ("decrease" for underdiagnosis, "increase" for
    #: sensitivity); None for descriptive rates such as "draft says no finding".
    improvement: Literal["increase", "decrease"] | None = None

    def group(self, attribute: str, group: str) -> GroupResult | None:
        return next((g for g in self.groups if (g.attribute, g.group) == (attribute, group)), None)

    def between_of(self, attribute: str) -> Between | None:
        return next((b for b in self.between if b.attribute == attribute), None)

    def by_attribute(self, attribute: str) -> tuple[GroupResult, ...]:
        return tuple(g for g in self.groups if g.attribute == attribute)

    def largest_ratio(self, attribute: str | None = None) -> GroupResult | None:
        """The unsuppressed group whose ratio to the overall is furthest from 1 (either way)."""
        return _furthest(self, attribute, lambda g: g.ratio.value, parity=1.0, log=True)

    def largest_difference(self, attribute: str | None = None) -> GroupResult | None:
        """The unsuppressed group whose difference to the overall is largest in size."""
        return _furthest(self, attribute, lambda g: g.difference.value, parity=0.0, log=False)


def _furthest(
    metric: MetricResult,
    attribute: str | None,
    value: Callable[[GroupResult], float | None],
    *,
    parity: float,
    log: bool,
) -> GroupResult | None:
    best: tuple[float, GroupResult] | None = None
    for group in metric.groups:
        if group.suppressed or (attribute is not None and group.attribute != attribute):
            continue
        v = value(group)
        if v is None or (log and v <= 0):
            continue
        distance = abs(math.log(v)) if log else abs(v - parity)
        if best is None or distance > best[0]:
            best = (distance, group)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Alert:
    """A fired alert rule: which metric, which attribute and group, and the evidence.

    ``ratio`` and ``difference`` are those of the comparison that fired (group vs ``against``:
    ``overall``, the reference group, or the other end of the between-groups spread).
    """

    rule: str  # the rule's name from settings
    metric: str
    attribute: str
    group: str
    n: int
    estimate: Estimate
    overall: Estimate
    ratio: Estimate
    difference: Estimate
    message: str  # one line naming group and metric, no patient data
    comparison: Comparison = "overall"
    against: str = "overall"  # the comparator: "overall" or a group of the same attribute
    against_estimate: Estimate = Estimate(None)
    against_n: int | None = None
    numerator: float | None = None  # events in the group (for rates)
    against_numerator: float | None = None
    threshold: str = ""  # the crossed threshold in words, e.g. "ratio < 0.8"
    q_value: float | None = None  # Benjamini-Hochberg adjusted p-value of the comparison
    min_effect: float = 0.0  # the rule's minimum practical effect (absolute difference)
    action: str = ""  # what to do, from the rule
    owner: str = ""  # who does it, from the rule
    #: Whether the same rule fired for the same metric and group in the previous window:
    #: "new", "persisting", or None when no previous window was evaluated.
    since_last: Literal["new", "persisting"] | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.rule, self.metric, self.attribute, self.group)


@dataclass(frozen=True)
class TrendPoint:
    """A headline metric's point estimate for one group in one window, with its interval
    (all None when suppressed)."""

    window_start: dt.datetime
    window_end: dt.datetime
    metric: str
    attribute: str  # "overall" for the whole population
    group: str
    n: int
    value: float | None
    low: float | None = None  # the value's Wilson score interval (trend metrics are rates)
    high: float | None = None


@dataclass(frozen=True)
class GroupCoverage:
    """How many of a group's studies were drafted and have a signed report to score against."""

    group: str
    studies: int
    drafted: int
    with_final_report: int
    suppressed: bool  # fewer studies than the minimum group size: no counts shown


@dataclass(frozen=True)
class AttributeCoverage:
    """How well an attribute is recorded, and whether fairness across it can be judged at all.

    Not assessable: every study in one known group (nothing to compare), or more than the
    allowed share unknown (the known groups are a selected minority; ``unknown`` hides the rest).
    """

    attribute: str
    studies: int
    unknown: int
    known_groups: int
    groups: tuple[GroupCoverage, ...]
    assessable: bool
    reason: str  # why not assessable, in words; "" when assessable

    @property
    def unknown_share(self) -> float:
        return self.unknown / self.studies if self.studies else 0.0


@dataclass(frozen=True)
class FairnessReport:
    """Everything one monitoring run found, for one window."""

    since: dt.datetime
    until: dt.datetime
    generated: dt.datetime
    model_versions: tuple[str, ...]
    studies: int  # ledger jobs in the window (all outcomes)
    drafted: int  # of which a draft exists
    with_final_report: int  # of which a signed final report was found and labelled
    min_group_size: int
    n_boot: int
    confidence: float  # e.g. 0.95
    attributes: tuple[str, ...]
    metrics: tuple[MetricResult, ...]
    alerts: tuple[Alert, ...]
    trend: tuple[TrendPoint, ...] = ()
    signed_unreadable: int = 0  # drafted studies whose signed report the EHR failed to return
    #: (attribute, reference group) for each attribute that has one.
    reference_groups: tuple[tuple[str, str], ...] = ()
    #: Rules that crossed a threshold by a practical margin but whose evidence is too thin
    #: (interval or multiple-comparison control): would fire with more studies. Not alerts.
    watches: tuple[Alert, ...] = ()
    false_discovery_rate: float = 0.05
    tests: int = 0  # comparisons in the multiple-comparison family (Benjamini-Hochberg's m)
    coverage: tuple[AttributeCoverage, ...] = ()
    rules: tuple[AlertRule, ...] = ()  # the rules evaluated (their thresholds are drawn)

    def not_assessable(self) -> tuple[AttributeCoverage, ...]:
        return tuple(c for c in self.coverage if not c.assessable)

    def assessable(self, attribute: str) -> bool:
        return all(c.assessable for c in self.coverage if c.attribute == attribute)

    def reference(self, attribute: str) -> str | None:
        return dict(self.reference_groups).get(attribute)

    def metric(self, name: str) -> MetricResult:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)


def complementary_suppression(cells: Sequence[tuple[str, int, bool]]) -> set[str]:
    """Groups whose counts must be withheld besides the suppressed ones, so that the overall
    count minus the published counts never gives one suppressed count.

    ``cells`` are one partition of the population (one attribute's groups for one metric):
    (group, count, suppressed). When exactly one cell is suppressed, one more is withheld: the
    ``unknown`` group if it is published, else the smallest published group (then the name, so
    metrics with the same denominators withhold the same group and cannot be played against
    each other). Subtraction then yields only the sum of two cells.
    """
    suppressed = [group for group, _n, hidden in cells if hidden]
    published = [(n, group) for group, n, hidden in cells if not hidden]
    if len(suppressed) != 1 or not published:
        return set()
    if any(group == UNKNOWN for _n, group in published):
        return {UNKNOWN}
    return {min(published)[1]}


def _default_comparisons() -> list[Comparison]:
    return ["reference", "between"]


class AlertRule(BaseModel):
    """A disparity that should alert: a metric, the groups it watches, and its thresholds.

    It fires for an unsuppressed group when one of its ``comparisons`` crosses a threshold
    (ratio = group / comparator, difference = group - comparator; the comparator is the overall
    value, the attribute's reference group, or for ``between`` the other end of the attribute's
    highest-lowest spread), the difference is at least ``min_effect`` in size, and, with
    ``require_ci``, the bootstrap confidence interval lies entirely on the far side of parity
    (1 for ratios, 0 for differences) and the comparison survives the report's
    Benjamini-Hochberg control. The thresholds give the harmful direction: an "above" rule never
    fires for a group doing better.
    """

    name: str = Field(description="Name of the rule, quoted in alerts.")
    metric: str = Field(
        description="Metric name, or a shell-style pattern such as `sensitivity:*`."
    )
    attributes: list[str] | None = Field(
        default=None, description="Attributes whose groups are checked. Unset: all of them."
    )
    ratio_above: float | None = Field(default=None, gt=0, description="Fire when ratio > this.")
    ratio_below: float | None = Field(default=None, gt=0, description="Fire when ratio < this.")
    difference_above: float | None = Field(
        default=None, description="Fire when difference > this (in the metric's unit)."
    )
    difference_below: float | None = Field(
        default=None, description="Fire when difference < this (in the metric's unit)."
    )
    require_ci: bool = Field(
        default=True,
        description="Also require the confidence interval to exclude parity and the "
        "comparison to pass the false-discovery-rate control.",
    )
    comparisons: list[Comparison] = Field(
        default_factory=_default_comparisons,
        min_length=1,
        description="What a group is compared with: `overall`, `reference` (the attribute's "
        "reference group), `between` (highest vs lowest group).",
    )
    min_effect: float = Field(
        default=0.0,
        ge=0,
        description="Smallest absolute difference (in the metric's unit) worth alerting on.",
    )
    action: str = Field(
        default="Review a sample of the group's drafts against the signed reports and decide "
        "whether drafts for this group need a warning or should be paused.",
        description="What to do when the rule fires, shown on the alert card.",
    )
    owner: str = Field(
        default="AI quality officer",
        description="Who acts on the alert, shown on the alert card.",
    )

    @model_validator(mode="after")
    def _check_rule(self) -> AlertRule:
        bounds = (self.ratio_above, self.ratio_below, self.difference_above, self.difference_below)
        if all(bound is None for bound in bounds):
            raise ValueError(f"alert rule {self.name!r} has no threshold")
        return self
