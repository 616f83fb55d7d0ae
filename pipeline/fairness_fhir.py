"""A fairness monitoring run as a FHIR R4 ``MeasureReport`` (``fhir.resources.R4B`` models). No I/O.

What one ``FairnessReport`` becomes:

- one ``MeasureReport``, status ``complete``, type ``summary``, ``measure`` the fairness Measure
  canonical, ``date`` the generation time, ``period`` the monitored window, an ``identifier``
  stable per (window, scope) so a re-run for the same window writes nothing new
  (``flows.fairness.write_measure_report`` keys its ledger record and a ``_tag`` conditional
  create on it: not every server searches MeasureReport by identifier);
- one ``group`` per metric: ``code`` the metric (system ``<system>:fairness-metric``),
  populations ``denominator`` (and ``numerator`` for rates) from the standard
  measure-population code system, ``measureScore`` the overall value (UCUM unit) when known;
- one ``stratifier`` per subgroup attribute (system ``<system>:fairness-attribute``), one
  ``stratum`` per group, the ``unknown`` group included like any other;
- what FHIR has no element for goes in extensions (``EXT_*`` below): confidence intervals,
  ratio and difference to the overall with their intervals, run settings, alert messages.

A suppressed stratum (a cell smaller than the minimum group size) carries only its value and the
``fairness-suppressed`` extension: no score, no interval, no disparity and not even its count,
since a small-cell count can itself be identifying. Decimals are rounded to 6 places; a value
that is not finite is treated as unknown and left out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from typing import Any

from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.measurereport import MeasureReport

from pipeline.fairness_types import Estimate, FairnessReport, GroupResult, MetricResult

MEASURE_URL_DEFAULT = "urn:medvlm-pipeline:Measure:draft-fairness"
MEASURE_POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"
UCUM = "http://unitsofmeasure.org"

_SD = "urn:medvlm-pipeline:StructureDefinition:"
# On a stratum (group value) and on a group (overall value): the estimate's confidence interval.
EXT_CI_LOW = f"{_SD}fairness-ci-low"  # valueDecimal
EXT_CI_HIGH = f"{_SD}fairness-ci-high"  # valueDecimal
# On a stratum: disparity to the overall value, with confidence intervals.
EXT_RATIO = f"{_SD}fairness-ratio-to-overall"  # valueDecimal
EXT_RATIO_CI_LOW = f"{_SD}fairness-ratio-ci-low"  # valueDecimal
EXT_RATIO_CI_HIGH = f"{_SD}fairness-ratio-ci-high"  # valueDecimal
EXT_DIFFERENCE = f"{_SD}fairness-difference-to-overall"  # valueDecimal
EXT_DIFFERENCE_CI_LOW = f"{_SD}fairness-difference-ci-low"  # valueDecimal
EXT_DIFFERENCE_CI_HIGH = f"{_SD}fairness-difference-ci-high"  # valueDecimal
EXT_SUPPRESSED = f"{_SD}fairness-suppressed"  # valueBoolean true, on a suppressed stratum
EXT_ALERT_RULE = f"{_SD}fairness-alert-rule"  # valueString, on a stratum an alert fired for
# On a group: what kind of metric, and who its denominator counts (in words).
EXT_METRIC_KIND = f"{_SD}fairness-metric-kind"  # valueCode "rate" | "mean"
EXT_POPULATION_DESCRIPTION = f"{_SD}fairness-population-description"  # valueString
# On the MeasureReport: the run's settings and counts, and one extension per fired alert.
EXT_MIN_GROUP_SIZE = f"{_SD}fairness-min-group-size"  # valueInteger
EXT_BOOTSTRAP_SAMPLES = f"{_SD}fairness-bootstrap-samples"  # valueInteger
EXT_CONFIDENCE = f"{_SD}fairness-confidence"  # valueDecimal, e.g. 0.95
EXT_STUDIES = f"{_SD}fairness-studies"  # valueInteger, ledger jobs in the window
EXT_DRAFTED = f"{_SD}fairness-drafted"  # valueInteger
EXT_WITH_FINAL_REPORT = f"{_SD}fairness-with-final-report"  # valueInteger
EXT_MODEL_VERSION = f"{_SD}fairness-model-version"  # valueString, one per model version
EXT_ALERT = f"{_SD}fairness-alert"  # valueString, the alert's message

_DECIMALS = 6


def _aware(value: dt.datetime, name: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (FHIR dateTime with a time needs one)")
    return value


def measure_report_identifier(report: FairnessReport, *, system: str, scope: str) -> Identifier:
    """Stable per (window, scope): re-running the monitor for a window updates nothing twice.

    The window bounds are normalised to UTC first, so the same instants written in another
    time zone give the same identifier.
    """
    since = _aware(report.since, "since").astimezone(dt.UTC)
    until = _aware(report.until, "until").astimezone(dt.UTC)
    digest = hashlib.sha256(f"{since.isoformat()}|{until.isoformat()}|{scope}".encode())
    return Identifier.model_validate(
        {"system": system, "value": f"fairness-{digest.hexdigest()[:24]}"}
    )


def _number(value: float | None) -> float | None:
    """A FHIR-decimal-friendly float (6 places, no -0.0), or None when unknown or not finite."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, _DECIMALS) + 0.0


def _ext_decimal(url: str, value: float | None) -> list[dict[str, Any]]:
    number = _number(value)
    return [] if number is None else [{"url": url, "valueDecimal": number}]


def _ci_extensions(estimate: Estimate, low_url: str, high_url: str) -> list[dict[str, Any]]:
    return _ext_decimal(low_url, estimate.ci_low) + _ext_decimal(high_url, estimate.ci_high)


def _population(code: str, display: str, count: int | None = None) -> dict[str, Any]:
    population: dict[str, Any] = {
        "code": {"coding": [{"system": MEASURE_POPULATION, "code": code, "display": display}]}
    }
    if count is not None:
        population["count"] = count
    return population


def _populations(metric: MetricResult, n: int, numerator: float) -> list[dict[str, Any]]:
    populations = [_population("denominator", "Denominator", n)]
    if metric.kind == "rate":
        populations.append(_population("numerator", "Numerator", round(numerator)))
    return populations


def _score(metric: MetricResult, value: float | None) -> dict[str, Any] | None:
    number = _number(value)
    if number is None:
        return None
    return {"value": number, "unit": metric.unit, "system": UCUM, "code": metric.unit}


def _stratum(metric: MetricResult, group: GroupResult, alert_rules: list[str]) -> dict[str, Any]:
    value = {"text": group.group}
    if group.suppressed:
        # Nothing but the fact of suppression: no score, interval, disparity, nor the count.
        return {"value": value, "extension": [{"url": EXT_SUPPRESSED, "valueBoolean": True}]}
    extensions = (
        _ci_extensions(group.estimate, EXT_CI_LOW, EXT_CI_HIGH)
        + _ext_decimal(EXT_RATIO, group.ratio.value)
        + _ci_extensions(group.ratio, EXT_RATIO_CI_LOW, EXT_RATIO_CI_HIGH)
        + _ext_decimal(EXT_DIFFERENCE, group.difference.value)
        + _ci_extensions(group.difference, EXT_DIFFERENCE_CI_LOW, EXT_DIFFERENCE_CI_HIGH)
        + [{"url": EXT_ALERT_RULE, "valueString": rule} for rule in alert_rules]
    )
    return {
        "extension": extensions or None,
        "value": value,
        "population": _populations(metric, group.n, group.numerator),
        "measureScore": _score(metric, group.estimate.value),
    }


def _group(report: FairnessReport, metric: MetricResult, system: str) -> dict[str, Any]:
    known = set(report.attributes)
    stray = sorted({g.attribute for g in metric.groups} - known)
    if stray:
        raise ValueError(
            f"metric {metric.name!r} has groups for attributes not in the report: {stray}"
        )
    populations = _populations(metric, metric.overall_n, metric.overall_numerator)
    populations[0]["extension"] = [  # the denominator: who it counts, in words
        {"url": EXT_POPULATION_DESCRIPTION, "valueString": metric.population}
    ]
    stratifiers = []
    for attribute in report.attributes:
        strata = [
            _stratum(
                metric,
                group,
                [
                    alert.rule
                    for alert in report.alerts
                    if (alert.metric, alert.attribute, alert.group)
                    == (metric.name, attribute, group.group)
                ],
            )
            for group in metric.by_attribute(attribute)
        ]
        stratifiers.append(
            {
                "code": [
                    {
                        "coding": [{"system": f"{system}:fairness-attribute", "code": attribute}],
                        "text": attribute,
                    }
                ],
                "stratum": strata or None,
            }
        )
    return {
        "extension": [
            {"url": EXT_METRIC_KIND, "valueCode": metric.kind},
            *_ci_extensions(metric.overall, EXT_CI_LOW, EXT_CI_HIGH),
        ],
        "code": {
            "coding": [
                {
                    "system": f"{system}:fairness-metric",
                    "code": metric.name,
                    "display": metric.title,
                }
            ],
            "text": metric.title,
        },
        "population": populations,
        "measureScore": _score(metric, metric.overall.value),
        "stratifier": stratifiers or None,
    }


def build_measure_report(
    report: FairnessReport,
    *,
    system: str,
    scope: str,
    measure: str = MEASURE_URL_DEFAULT,
    reporter: str | None = None,
) -> MeasureReport:
    """The run as a summary MeasureReport; ``reporter`` is a reference such as ``Device/xyz``."""
    identifier = measure_report_identifier(report, system=system, scope=scope)
    generated = _aware(report.generated, "generated")
    extensions: list[dict[str, Any]] = [
        {"url": EXT_MIN_GROUP_SIZE, "valueInteger": report.min_group_size},
        {"url": EXT_BOOTSTRAP_SAMPLES, "valueInteger": report.n_boot},
        *_ext_decimal(EXT_CONFIDENCE, report.confidence),
        {"url": EXT_STUDIES, "valueInteger": report.studies},
        {"url": EXT_DRAFTED, "valueInteger": report.drafted},
        {"url": EXT_WITH_FINAL_REPORT, "valueInteger": report.with_final_report},
        *({"url": EXT_MODEL_VERSION, "valueString": v} for v in report.model_versions),
        *({"url": EXT_ALERT, "valueString": alert.message} for alert in report.alerts),
    ]
    return MeasureReport.model_validate(
        {
            "resourceType": "MeasureReport",
            "extension": extensions,
            "identifier": [identifier.model_dump(mode="json", exclude_none=True)],
            "status": "complete",
            "type": "summary",
            "measure": measure,
            "date": generated.isoformat(),
            "reporter": {"reference": reporter} if reporter else None,
            "period": {
                "start": _aware(report.since, "since").isoformat(),
                "end": _aware(report.until, "until").isoformat(),
            },
            "group": [_group(report, metric, system) for metric in report.metrics] or None,
        }
    )


def parse_alerts(measure_report: MeasureReport) -> list[str]:
    """The alert messages a MeasureReport built here carries, in order."""
    return [
        ext.valueString
        for ext in measure_report.extension or []
        if ext.url == EXT_ALERT and ext.valueString is not None
    ]
