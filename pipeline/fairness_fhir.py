"""A fairness monitoring run as a FHIR R4 ``MeasureReport`` on a ``Measure``. No I/O.

Built as ``fhir.resources.R4B`` models.

The ``Measure`` (``build_measure``) defines what every report counts and is built from the
metric definitions and the attributes alone, never from a window's data: its ``url`` is the
``measure_url`` setting and its ``version`` a digest of its content, so the same code and
settings give the same Measure, written once (``flows.fairness.write_measure``), and a change of
metrics or attributes gives a new version. One ``group`` per metric with its populations
(proportions: ``denominator`` and ``numerator``; means: ``measure-population`` and
``measure-observation``) and one ``stratifier`` per attribute. R4 has ``scoring`` and
``improvementNotation`` only on the Measure as a whole, but this Measure mixes proportions and
means, and metrics where higher is better with ones where lower is: both are given per group,
with the CQF Measures IG's ``cqfm-scoring`` and ``cqfm-improvementNotation`` extensions (R5 moved
both elements onto ``Measure.group``).

What one ``FairnessReport`` becomes:

- one ``MeasureReport``, status ``complete``, type ``summary``, ``measure`` the Measure's
  canonical ``url|version``, ``date`` the generation time, ``period`` the monitored window, an
  ``identifier`` stable per (window, scope) so a re-run for the same window writes nothing new
  (``flows.fairness.write_measure_report`` keys its ledger record and a ``_tag`` conditional
  create on it: not every server searches MeasureReport by identifier);
- one ``group`` per metric: ``code`` the metric (system ``<system>:fairness-metric``),
  populations coded as in the Measure, ``measureScore`` the overall value (UCUM unit) when known;
- one ``stratifier`` per subgroup attribute (system ``<system>:fairness-attribute``), one
  ``stratum`` per group, the ``unknown`` group included like any other, its value coded
  (``stratum_coding``: administrative gender, OMB race and ethnicity, DICOM modality, else the
  project's own system; ``unknown`` is the v3 NullFlavor ``UNK``) with the group as text;
- what FHIR has no element for goes in extensions (``EXT_*`` below): confidence intervals,
  ratio and difference to the overall with their intervals, run settings, alert messages.

A suppressed stratum (a cell smaller than the minimum group size) carries only its value and the
``fairness-suppressed`` extension: no score, no interval, no disparity and not even its count,
since a small-cell count can itself be identifying. Since the group's overall count is
published, one suppressed stratum among published ones could be recovered by subtraction; so
``complementary_suppression`` withholds the counts of one more stratum (``unknown`` if
published, else the smallest), marked ``fairness-complementary-suppression``: its score and
intervals stay (they are not counts), and subtraction gives only the sum of two cells.
Decimals are rounded to 6 places; a value that is not finite is treated as unknown and left out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from typing import Any

from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.measure import Measure
from fhir.resources.R4B.measurereport import MeasureReport

from pipeline.fairness_types import (
    UNKNOWN,
    Estimate,
    FairnessReport,
    GroupResult,
    MetricResult,
    complementary_suppression,
)

MEASURE_URL_DEFAULT = "urn:medvlm-pipeline:Measure:draft-fairness"
MEASURE_POPULATION = "http://terminology.hl7.org/CodeSystem/measure-population"
MEASURE_SCORING = "http://terminology.hl7.org/CodeSystem/measure-scoring"
MEASURE_IMPROVEMENT = "http://terminology.hl7.org/CodeSystem/measure-improvement-notation"
CQFM_SCORING = "http://hl7.org/fhir/us/cqfmeasures/StructureDefinition/cqfm-scoring"
CQFM_IMPROVEMENT = "http://hl7.org/fhir/us/cqfmeasures/StructureDefinition/cqfm-improvementNotation"
UCUM = "http://unitsofmeasure.org"
ADMINISTRATIVE_GENDER = "http://hl7.org/fhir/administrative-gender"
OMB_RACE_ETHNICITY = "urn:oid:2.16.840.1.113883.6.238"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
_OMB = {
    "American Indian or Alaska Native": "1002-5",
    "Asian": "2028-9",
    "Black or African American": "2054-5",
    "Native Hawaiian or Other Pacific Islander": "2076-8",
    "White": "2106-3",
    "Hispanic or Latino": "2135-2",
    "Not Hispanic or Latino": "2186-5",
}
_GENDERS = {"female", "male", "other"}

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
# valueBoolean true, on a stratum whose counts are withheld so no suppressed count can be derived
EXT_COMPLEMENTARY = f"{_SD}fairness-complementary-suppression"
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


#: The populations of each kind of metric: a proportion counts a denominator and a numerator;
#: a mean (continuous variable) a measure population and one observation per member.
_POPULATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "rate": (("denominator", "Denominator"), ("numerator", "Numerator")),
    "mean": (
        ("measure-population", "Measure Population"),
        ("measure-observation", "Measure Observation"),
    ),
}


def _populations(metric: MetricResult, n: int, numerator: float) -> list[dict[str, Any]]:
    (first, first_display), (second, second_display) = _POPULATIONS[metric.kind]
    second_count = round(numerator) if metric.kind == "rate" else n
    return [_population(first, first_display, n), _population(second, second_display, second_count)]


def _score(metric: MetricResult, value: float | None) -> dict[str, Any] | None:
    number = _number(value)
    if number is None:
        return None
    return {"value": number, "unit": metric.unit, "system": UCUM, "code": metric.unit}


def stratum_coding(attribute: str, group: str, system: str) -> dict[str, str]:
    """The group as a Coding: standard codes where the attribute has them, else the project's."""
    if group == UNKNOWN:
        return {"system": NULL_FLAVOR, "code": "UNK", "display": "unknown"}
    if attribute == "sex" and group in _GENDERS:
        return {"system": ADMINISTRATIVE_GENDER, "code": group, "display": group}
    if attribute in ("race", "ethnicity") and group in _OMB:
        return {"system": OMB_RACE_ETHNICITY, "code": _OMB[group], "display": group}
    code = " ".join(group.split())  # FHIR code: no leading, trailing or repeated whitespace
    if attribute == "modality" and code.isalnum():
        return {"system": DICOM_DCM, "code": code}
    return {"system": f"{system}:fairness-group:{attribute}", "code": code, "display": group}


def _stratum(
    metric: MetricResult,
    group: GroupResult,
    alert_rules: list[str],
    system: str,
    *,
    withhold_counts: bool,
) -> dict[str, Any]:
    value = {"coding": [stratum_coding(group.attribute, group.group, system)], "text": group.group}
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
        + ([{"url": EXT_COMPLEMENTARY, "valueBoolean": True}] if withhold_counts else [])
    )
    return {
        "extension": extensions or None,
        "value": value,
        "population": None if withhold_counts else _populations(metric, group.n, group.numerator),
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
        groups = metric.by_attribute(attribute)
        withheld = complementary_suppression([(g.group, g.n, g.suppressed) for g in groups])
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
                system,
                withhold_counts=group.group in withheld,
            )
            for group in groups
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


_PLAIN = "text/plain"  # the criteria are described in words; the monitor's code computes them
_POPULATION_WORDS = {
    "denominator": "{population}",
    "numerator": "of the denominator, those the metric counts: {title}",
    "measure-population": "{population}",
    "measure-observation": "per member of the measure population, the value averaged: {title}",
}


def _metric_code(metric: MetricResult, system: str) -> dict[str, Any]:
    return {
        "coding": [
            {"system": f"{system}:fairness-metric", "code": metric.name, "display": metric.title}
        ],
        "text": metric.title,
    }


def _attribute_code(attribute: str, system: str) -> list[dict[str, Any]]:
    return [
        {
            "coding": [{"system": f"{system}:fairness-attribute", "code": attribute}],
            "text": attribute,
        }
    ]


def _concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _measure_group(
    metric: MetricResult, attributes: tuple[str, ...], system: str
) -> dict[str, Any]:
    scoring = "proportion" if metric.kind == "rate" else "continuous-variable"
    extensions: list[dict[str, Any]] = [
        {"url": CQFM_SCORING, "valueCodeableConcept": _concept(MEASURE_SCORING, scoring)},
        {"url": EXT_METRIC_KIND, "valueCode": metric.kind},
    ]
    if metric.improvement is not None:
        extensions.append(
            {
                "url": CQFM_IMPROVEMENT,
                "valueCodeableConcept": _concept(MEASURE_IMPROVEMENT, metric.improvement),
            }
        )
    words = {"population": metric.population, "title": metric.title}
    return {
        "extension": extensions,
        "code": _metric_code(metric, system),
        "description": f"{metric.title}, over {metric.population} (unit {metric.unit})",
        "population": [
            {
                **_population(code, display),
                "criteria": {
                    "language": _PLAIN,
                    "expression": _POPULATION_WORDS[code].format(**words),
                },
            }
            for code, display in _POPULATIONS[metric.kind]
        ],
        "stratifier": [
            {
                "code": _attribute_code(attribute, system)[0],
                "criteria": {
                    "language": _PLAIN,
                    "expression": f"the study's {attribute}, captured when it was drafted",
                },
            }
            for attribute in attributes
        ]
        or None,
    }


def build_measure(
    report: FairnessReport, *, system: str, url: str = MEASURE_URL_DEFAULT
) -> Measure:
    """The Measure every report of these metrics and attributes reports on.

    Built from the metric definitions and attributes only (not the window's numbers), so every
    run of the same code and settings builds the same resource; its ``version`` is a digest of
    its content.
    """
    body: dict[str, Any] = {
        "resourceType": "Measure",
        "url": url,
        "name": "DraftFairness",
        "title": "Fairness of AI draft radiology reports across patient and operational subgroups",
        "status": "active",
        "experimental": False,
        "description": (
            "Per metric, the overall value and one stratum per group of each attribute, with "
            "bootstrap confidence intervals and disparities as extensions; small cells suppressed."
        ),
        "group": [_measure_group(m, report.attributes, system) for m in report.metrics] or None,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return Measure.model_validate({**body, "version": digest})


def measure_canonical(measure: Measure) -> str:
    """``url|version``: the MeasureReport's ``measure``, resolved by ``Measure?url=&version=``."""
    return f"{measure.url}|{measure.version}"


def build_measure_report(
    report: FairnessReport,
    *,
    system: str,
    scope: str,
    measure: str = MEASURE_URL_DEFAULT,
    reporter: str | None = None,
) -> MeasureReport:
    """The run as a summary MeasureReport on ``build_measure``'s Measure (``measure`` is its
    url); ``reporter`` is a reference such as ``Device/xyz``."""
    canonical = measure_canonical(build_measure(report, system=system, url=measure))
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
            "measure": canonical,
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
