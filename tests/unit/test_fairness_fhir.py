from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B.measurereport import (
    MeasureReport,
    MeasureReportGroup,
    MeasureReportGroupStratifierStratum,
)

from pipeline.fairness_fhir import (
    CQFM_IMPROVEMENT,
    CQFM_SCORING,
    EXT_ALERT_RULE,
    EXT_BOOTSTRAP_SAMPLES,
    EXT_CI_HIGH,
    EXT_CI_LOW,
    EXT_COMPLEMENTARY,
    EXT_CONFIDENCE,
    EXT_DIFFERENCE,
    EXT_DIFFERENCE_CI_HIGH,
    EXT_DIFFERENCE_CI_LOW,
    EXT_METRIC_KIND,
    EXT_MIN_GROUP_SIZE,
    EXT_RATIO,
    EXT_RATIO_CI_HIGH,
    EXT_RATIO_CI_LOW,
    EXT_SUPPRESSED,
    MEASURE_POPULATION,
    MEASURE_URL_DEFAULT,
    build_measure,
    build_measure_report,
    measure_canonical,
    measure_report_identifier,
    parse_alerts,
    stratum_coding,
)
from pipeline.fairness_types import (
    UNKNOWN,
    Alert,
    Estimate,
    FairnessReport,
    GroupResult,
    MetricResult,
)

pytestmark = pytest.mark.unit

SYSTEM = "urn:medvlm-pipeline:draft"
SINCE = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
UNTIL = dt.datetime(2025, 4, 1, tzinfo=dt.UTC)
GENERATED = dt.datetime(2025, 4, 1, 6, 30, tzinfo=dt.UTC)
NONE = Estimate(None)


def _group(
    attribute: str,
    group: str,
    n: int,
    numerator: float,
    estimate: Estimate,
    ratio: Estimate = NONE,
    difference: Estimate = NONE,
    *,
    suppressed: bool = False,
) -> GroupResult:
    return GroupResult(attribute, group, n, numerator, suppressed, estimate, ratio, difference)


UNDERDIAGNOSIS = MetricResult(
    name="underdiagnosis_rate",
    title="Underdiagnosis rate",
    kind="rate",
    unit="1",
    population="studies whose final report has a finding",
    overall_n=200,
    overall_numerator=30.0,
    overall=Estimate(0.15, 0.1, 0.2),
    groups=(
        _group(
            "sex",
            "F",
            100,
            20.0,
            Estimate(0.2, 0.12, 0.28),
            Estimate(4 / 3, 1.1, 1.6),
            Estimate(0.05, -0.01, 0.11),
        ),
        _group("sex", "M", 88, 9.0, Estimate(0.102273, 0.05, 0.16), Estimate(0.68, None, 0.95)),
        _group("sex", UNKNOWN, 12, 1.0, Estimate(0.083333)),
        _group("site", "site-a", 196, 29.0, Estimate(0.147959)),
        # Deliberately carries numbers although suppressed: none of them may be published.
        _group(
            "site",
            "site-b",
            4,
            1.0,
            Estimate(0.987654, 0.876543, 0.999999),
            Estimate(6.584360),
            Estimate(0.837654),
            suppressed=True,
        ),
    ),
)
CHARS = MetricResult(
    name="draft_length",
    title="Draft length",
    kind="mean",
    unit="{char}",
    population="drafted studies",
    overall_n=0,
    overall_numerator=0.0,
    overall=NONE,
    groups=(),
)
ALERT = Alert(
    rule="ratio-above-1.25",
    metric="underdiagnosis_rate",
    attribute="sex",
    group="F",
    n=100,
    estimate=Estimate(0.2, 0.12, 0.28),
    overall=Estimate(0.15, 0.1, 0.2),
    ratio=Estimate(4 / 3, 1.1, 1.6),
    difference=Estimate(0.05, -0.01, 0.11),
    message="Underdiagnosis rate for sex=F is 1.33x the overall (95% CI 1.10-1.60)",
)
REPORT = FairnessReport(
    since=SINCE,
    until=UNTIL,
    generated=GENERATED,
    model_versions=("m-1.0",),
    studies=250,
    drafted=240,
    with_final_report=200,
    min_group_size=10,
    n_boot=1000,
    confidence=0.95,
    attributes=("sex", "site"),
    metrics=(UNDERDIAGNOSIS, CHARS),
    alerts=(ALERT,),
)


def _build(report: FairnessReport = REPORT, **kwargs: Any) -> MeasureReport:
    return build_measure_report(report, system=SYSTEM, scope="all", **kwargs)


def _metric(mr: MeasureReport, name: str) -> MeasureReportGroup:
    [group] = [g for g in mr.group or [] if g.code.coding[0].code == name]
    return group


def _stratum(
    mr: MeasureReport, metric: str, attribute: str, group: str
) -> MeasureReportGroupStratifierStratum:
    [stratifier] = [s for s in _metric(mr, metric).stratifier or [] if s.code[0].text == attribute]
    [stratum] = [s for s in stratifier.stratum or [] if s.value.text == group]
    return stratum


def _ext(element: Any, url: str) -> list[Any]:
    return [e for e in element.extension or [] if e.url == url]


def _decimal(element: Any, url: str) -> Decimal | None:
    found = _ext(element, url)
    assert len(found) <= 1
    return found[0].valueDecimal if found else None


def _counts(element: Any) -> dict[str, int | None]:
    counts: dict[str, int | None] = {}
    for population in element.population or []:
        [coding] = population.code.coding
        assert coding.system == MEASURE_POPULATION
        counts[coding.code] = population.count
    return counts


def test_builds_a_valid_summary_measure_report_that_round_trips() -> None:
    mr = _build(reporter="Device/fairness-monitor")
    again = MeasureReport.model_validate_json(mr.model_dump_json())
    assert again.model_dump(mode="json") == mr.model_dump(mode="json")
    assert again.status == "complete"
    assert again.type == "summary"
    assert again.measure == measure_canonical(build_measure(REPORT, system=SYSTEM))
    assert again.measure.startswith(MEASURE_URL_DEFAULT + "|")
    assert again.date == GENERATED
    assert (again.period.start, again.period.end) == (SINCE, UNTIL)
    assert again.reporter is not None and again.reporter.reference == "Device/fairness-monitor"
    assert [g.code.coding[0].code for g in again.group or []] == [
        "underdiagnosis_rate",
        "draft_length",
    ]
    assert _metric(again, "underdiagnosis_rate").code.text == "Underdiagnosis rate"
    assert _metric(again, "underdiagnosis_rate").code.coding[0].system == (
        f"{SYSTEM}:fairness-metric"
    )
    assert _build().reporter is None


def test_report_level_extensions() -> None:
    mr = _build()
    [min_size] = _ext(mr, EXT_MIN_GROUP_SIZE)
    [boot] = _ext(mr, EXT_BOOTSTRAP_SAMPLES)
    assert (min_size.valueInteger, boot.valueInteger) == (10, 1000)
    assert _decimal(mr, EXT_CONFIDENCE) == Decimal("0.95")


def test_identifier_is_stable_per_window_and_scope() -> None:
    first = _build().identifier
    second = _build().identifier
    assert first is not None and second is not None
    assert first[0].system == SYSTEM
    assert first[0].value == second[0].value
    assert first[0].value.startswith("fairness-")
    assert first[0] == measure_report_identifier(REPORT, system=SYSTEM, scope="all")

    def value(report: FairnessReport, scope: str = "all") -> str:
        return str(measure_report_identifier(report, system=SYSTEM, scope=scope).value)

    assert value(REPORT) == first[0].value
    # Re-generated later, same window: still the same resource.
    later = dataclasses.replace(REPORT, generated=GENERATED + dt.timedelta(days=1))
    assert value(later) == value(REPORT)
    # The same instants in another time zone: the same identifier.
    cet = dt.timezone(dt.timedelta(hours=1))
    shifted = dataclasses.replace(REPORT, since=SINCE.astimezone(cet), until=UNTIL.astimezone(cet))
    assert value(shifted) == value(REPORT)
    # A different window or scope: a different identifier.
    assert value(dataclasses.replace(REPORT, until=UNTIL + dt.timedelta(days=1))) != value(REPORT)
    assert value(dataclasses.replace(REPORT, since=SINCE - dt.timedelta(days=1))) != value(REPORT)
    assert value(REPORT, scope="site-a") != value(REPORT)


def test_naive_datetimes_are_rejected() -> None:
    naive = dataclasses.replace(REPORT, since=SINCE.replace(tzinfo=None))
    with pytest.raises(ValueError, match="timezone-aware"):
        measure_report_identifier(naive, system=SYSTEM, scope="all")
    with pytest.raises(ValueError, match="timezone-aware"):
        _build(dataclasses.replace(REPORT, generated=GENERATED.replace(tzinfo=None)))


def test_overall_score_populations_and_interval() -> None:
    group = _metric(_build(), "underdiagnosis_rate")
    assert group.measureScore is not None
    assert group.measureScore.value == Decimal("0.15")
    assert group.measureScore.unit == "1"
    assert group.measureScore.code == "1"
    assert group.measureScore.system == "http://unitsofmeasure.org"
    assert _counts(group) == {"denominator": 200, "numerator": 30}
    assert _decimal(group, EXT_CI_LOW) == Decimal("0.1")
    assert _decimal(group, EXT_CI_HIGH) == Decimal("0.2")
    [kind] = _ext(group, EXT_METRIC_KIND)
    assert kind.valueCode == "rate"


def test_stratum_scores_intervals_and_disparities() -> None:
    mr = _build()
    female = _stratum(mr, "underdiagnosis_rate", "sex", "F")
    assert female.measureScore is not None
    assert female.measureScore.value == Decimal("0.2")
    assert female.measureScore.unit == "1"
    assert _counts(female) == {"denominator": 100, "numerator": 20}
    assert _decimal(female, EXT_CI_LOW) == Decimal("0.12")
    assert _decimal(female, EXT_CI_HIGH) == Decimal("0.28")
    assert _decimal(female, EXT_RATIO) == Decimal("1.333333")  # rounded to 6 places
    assert _decimal(female, EXT_RATIO_CI_LOW) == Decimal("1.1")
    assert _decimal(female, EXT_RATIO_CI_HIGH) == Decimal("1.6")
    assert _decimal(female, EXT_DIFFERENCE) == Decimal("0.05")
    assert _decimal(female, EXT_DIFFERENCE_CI_LOW) == Decimal("-0.01")
    assert _decimal(female, EXT_DIFFERENCE_CI_HIGH) == Decimal("0.11")
    assert _ext(female, EXT_SUPPRESSED) == []

    male = _stratum(mr, "underdiagnosis_rate", "sex", "M")
    assert male.measureScore is not None and male.measureScore.value == Decimal("0.102273")
    assert _decimal(male, EXT_RATIO) == Decimal("0.68")
    assert _decimal(male, EXT_RATIO_CI_LOW) is None  # an unknown bound is left out
    assert _decimal(male, EXT_RATIO_CI_HIGH) == Decimal("0.95")  # the known one is not
    assert _decimal(male, EXT_DIFFERENCE) is None


def test_stratifier_per_attribute_with_codes() -> None:
    group = _metric(_build(), "underdiagnosis_rate")
    stratifiers = group.stratifier or []
    assert [s.code[0].text for s in stratifiers] == ["sex", "site"]
    assert [s.code[0].coding[0].code for s in stratifiers] == ["sex", "site"]
    assert stratifiers[0].code[0].coding[0].system == f"{SYSTEM}:fairness-attribute"
    assert [st.value.text for st in stratifiers[0].stratum or []] == ["F", "M", UNKNOWN]
    assert [st.value.text for st in stratifiers[1].stratum or []] == ["site-a", "site-b"]


def test_unknown_group_is_a_stratum_like_any_other() -> None:
    unknown = _stratum(_build(), "underdiagnosis_rate", "sex", UNKNOWN)
    assert _counts(unknown) == {"denominator": 12, "numerator": 1}
    assert unknown.measureScore is not None
    assert unknown.measureScore.value == Decimal("0.083333")
    assert _ext(unknown, EXT_SUPPRESSED) == []


def test_suppressed_stratum_publishes_no_numbers_not_even_its_count() -> None:
    mr = _build()
    suppressed = _stratum(mr, "underdiagnosis_rate", "site", "site-b")
    assert suppressed.measureScore is None
    assert suppressed.population is None
    [flag] = _ext(suppressed, EXT_SUPPRESSED)
    assert flag.valueBoolean is True
    assert [e.url for e in suppressed.extension or []] == [EXT_SUPPRESSED]
    # None of the suppressed cell's figures appears anywhere in the resource.
    published = mr.model_dump_json()
    for figure in ("0.987654", "0.876543", "0.999999", "6.58436", "0.837654"):
        assert figure not in published
    # Its only published sibling keeps its score but withholds its counts: the overall count
    # minus site-a's would be site-b's.
    sibling = _stratum(mr, "underdiagnosis_rate", "site", "site-a")
    assert sibling.population is None and _ext(sibling, EXT_COMPLEMENTARY)[0].valueBoolean
    assert sibling.measureScore is not None and sibling.measureScore.value == Decimal("0.147959")
    assert _ext(sibling, EXT_SUPPRESSED) == []
    # Among sex (no suppressed cell) every count is published.
    assert _counts(_stratum(mr, "underdiagnosis_rate", "sex", "F")) == {
        "denominator": 100, "numerator": 20,
    }  # fmt: skip


def test_alerts_are_published_and_read_back() -> None:
    mr = _build()
    assert parse_alerts(mr) == [ALERT.message]
    assert parse_alerts(MeasureReport.model_validate_json(mr.model_dump_json())) == [ALERT.message]
    [rule] = _ext(_stratum(mr, "underdiagnosis_rate", "sex", "F"), EXT_ALERT_RULE)
    assert rule.valueString == ALERT.rule
    assert _ext(_stratum(mr, "underdiagnosis_rate", "sex", "M"), EXT_ALERT_RULE) == []
    assert parse_alerts(_build(dataclasses.replace(REPORT, alerts=()))) == []


def test_metric_with_unknown_overall_has_no_score() -> None:
    mr = _build()
    group = _metric(mr, "draft_length")
    assert group.measureScore is None
    assert _decimal(group, EXT_CI_LOW) is None
    assert _decimal(group, EXT_CI_HIGH) is None
    # A mean is a continuous variable: a measure population and its observations.
    assert _counts(group) == {"measure-population": 0, "measure-observation": 0}
    # Every attribute still gets its stratifier, with no strata when there are no groups.
    assert [(s.code[0].text, s.stratum) for s in group.stratifier or []] == [
        ("sex", None),
        ("site", None),
    ]
    # The metric with a known overall does have one: the absence above is not universal.
    assert _metric(mr, "underdiagnosis_rate").measureScore is not None


def test_mean_metric_score_uses_its_unit() -> None:
    chars = dataclasses.replace(
        CHARS,
        overall_n=240,
        overall_numerator=240 * 512.25,
        overall=Estimate(512.25, 500.0, 525.5),
        groups=(_group("sex", "F", 120, 120 * 530.0, Estimate(530.0)),),
    )
    mr = _build(dataclasses.replace(REPORT, metrics=(chars,)))
    group = _metric(mr, "draft_length")
    assert group.measureScore is not None
    assert (group.measureScore.value, group.measureScore.unit) == (Decimal("512.25"), "{char}")
    assert group.measureScore.code == "{char}"
    assert _counts(group) == {"measure-population": 240, "measure-observation": 240}
    female = _stratum(mr, "draft_length", "sex", "F")
    assert _counts(female) == {"measure-population": 120, "measure-observation": 120}
    assert female.measureScore is not None and female.measureScore.value == Decimal("530")


def test_non_finite_values_are_left_out() -> None:
    metric = dataclasses.replace(
        UNDERDIAGNOSIS,
        overall=Estimate(0.0, 0.0, 0.0),
        groups=(
            _group("sex", "F", 100, 20.0, Estimate(0.2), Estimate(float("inf")), Estimate(0.2)),
        ),
    )
    mr = _build(dataclasses.replace(REPORT, metrics=(metric,)))
    female = _stratum(mr, "underdiagnosis_rate", "sex", "F")
    assert _decimal(female, EXT_RATIO) is None
    assert _decimal(female, EXT_DIFFERENCE) == Decimal("0.2")
    overall = _metric(mr, "underdiagnosis_rate").measureScore
    assert overall is not None and overall.value == Decimal("0")


def test_groups_of_an_undeclared_attribute_are_an_error() -> None:
    with pytest.raises(ValueError, match="'site'"):
        _build(dataclasses.replace(REPORT, attributes=("sex",)))


def test_the_measure_defines_populations_scoring_improvement_and_stratifiers() -> None:
    measure = build_measure(REPORT, system=SYSTEM)
    assert measure.url == MEASURE_URL_DEFAULT and measure.status == "active"
    again = type(measure).model_validate_json(measure.model_dump_json())
    assert again.model_dump(mode="json") == measure.model_dump(mode="json")
    groups = {g.code.coding[0].code: g for g in measure.group or []}
    assert list(groups) == ["underdiagnosis_rate", "draft_length"]

    def codes(group: Any) -> list[str]:
        return [p.code.coding[0].code for p in group.population]

    def extension(group: Any, url: str) -> str | None:
        found = [e.valueCodeableConcept.coding[0].code for e in group.extension if e.url == url]
        return found[0] if found else None

    assert codes(groups["underdiagnosis_rate"]) == ["denominator", "numerator"]
    assert codes(groups["draft_length"]) == ["measure-population", "measure-observation"]
    assert extension(groups["underdiagnosis_rate"], CQFM_SCORING) == "proportion"
    assert extension(groups["draft_length"], CQFM_SCORING) == "continuous-variable"
    improvement = dataclasses.replace(UNDERDIAGNOSIS, improvement="decrease")
    with_direction = build_measure(
        dataclasses.replace(REPORT, metrics=(improvement,)), system=SYSTEM
    )
    assert extension((with_direction.group or [])[0], CQFM_IMPROVEMENT) == "decrease"
    assert extension(groups["draft_length"], CQFM_IMPROVEMENT) is None
    assert [s.code.coding[0].code for s in groups["draft_length"].stratifier] == ["sex", "site"]
    # The same definitions give the same version whatever the window's numbers; other
    # attributes give another version.
    other_window = dataclasses.replace(
        REPORT, studies=1, alerts=(), metrics=(UNDERDIAGNOSIS, CHARS)
    )
    assert build_measure(other_window, system=SYSTEM).version == measure.version
    fewer = dataclasses.replace(REPORT, attributes=("sex",), metrics=(CHARS,))
    assert build_measure(fewer, system=SYSTEM).version != measure.version


def test_strata_are_coded() -> None:
    assert (
        stratum_coding("sex", "female", SYSTEM)["system"]
        == "http://hl7.org/fhir/administrative-gender"
    )
    assert stratum_coding("race", "White", SYSTEM)["code"] == "2106-3"
    assert stratum_coding("ethnicity", "Hispanic or Latino", SYSTEM)["code"] == "2135-2"
    assert stratum_coding("race", UNKNOWN, SYSTEM)["code"] == "UNK"
    assert stratum_coding("modality", "CR", SYSTEM)["code"] == "CR"
    site = stratum_coding("site", "  St  Mary's ", SYSTEM)
    assert site == {
        "system": f"{SYSTEM}:fairness-group:site", "code": "St Mary's", "display": "  St  Mary's ",
    }  # fmt: skip
    mr = _build()
    female = _stratum(mr, "underdiagnosis_rate", "sex", "F")
    assert female.value.coding is not None and female.value.coding[0].code == "F"


def test_no_suppressed_count_can_be_recovered_by_subtraction_on_the_planted_cohort() -> None:
    """For every metric and attribute: the overall count minus the published strata counts is
    either zero (nothing withheld) or the sum of at least two withheld strata (or of the only
    stratum, which is the overall), never one suppressed cell's count."""
    from tests.fairness_data import cohort
    from tests.unit.test_fairness import records, report_of

    report = report_of(records(cohort(planted=True)))
    mr = build_measure_report(report, system=SYSTEM, scope="all")
    checked = 0
    for metric, group in zip(report.metrics, mr.group or [], strict=True):
        overall = _counts(group)
        for stratifier in group.stratifier or []:
            attribute = stratifier.code[0].text
            cells = {g.group: g for g in metric.by_attribute(attribute)}
            withheld = [s.value.text for s in stratifier.stratum or [] if s.population is None]
            hidden = [name for name, cell in cells.items() if cell.suppressed]
            assert set(hidden) <= set(withheld)
            for code, total in overall.items():
                published = sum(
                    _counts(s)[code] or 0 for s in stratifier.stratum or [] if s.population
                )
                remainder = (total or 0) - published
                if not hidden:
                    assert remainder == 0 and withheld == []
                    continue
                # One withheld stratum only when it is the whole population (the overall itself).
                assert len(withheld) >= 2 or len(cells) == 1, (metric.name, attribute, withheld)
                for name in hidden:
                    cell = cells[name]
                    value = cell.n if code in ("denominator", "measure-population") else None
                    if value is not None and any(cells[w].n for w in withheld if w != name):
                        assert remainder != value, (metric.name, attribute, name)
                        checked += 1
    assert checked > 10  # e.g. race "Native Hawaiian or Other Pacific Islander" (12 studies)
