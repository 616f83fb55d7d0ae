"""Fairness metrics, suppression, disparities and alert rules on synthetic cohorts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from medvlm.settings import FairnessSettings
from pipeline.fairness import (
    FairnessRecord,
    compute_report,
    draft_labels,
    record_from_job,
    trend_points,
    wilson_interval,
)
from pipeline.fairness_types import UNKNOWN, AlertRule, FairnessReport
from pipeline.labeler import RuleLabeler
from pipeline.ledger import DraftJob, JobState
from pipeline.report import FindingName, Presence
from tests.fairness_data import WINDOW_END, WINDOW_START, Case, cohort, created_at, draft_report

pytestmark = pytest.mark.unit

LABELER = RuleLabeler()
RULES = FairnessSettings().rules
ATTRIBUTES = ("sex", "age_band", "race", "ethnicity", "site", "manufacturer", "modality")


def records(cases: list[Case]) -> list[FairnessRecord]:
    return [
        FairnessRecord(
            created_at=created_at(case),
            model_version="model-1",
            subgroups=case.subgroups,
            outcome="drafted",
            draft=case.draft,
            output_chars=400 + case.index % 50,
            latency_s=1.0 + (case.index % 7) / 10,
            final=LABELER.label(case.signed_text),
        )
        for case in cases
    ]


def report_of(recs: list[FairnessRecord], **overrides: object) -> FairnessReport:
    options: dict[str, object] = {
        "attributes": ATTRIBUTES,
        "min_group_size": 30,
        "n_boot": 300,
        "confidence": 0.95,
        "rules": RULES,
        "seed": 1,
    }
    options.update(overrides)
    return compute_report(recs, since=WINDOW_START, until=WINDOW_END, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted() -> FairnessReport:
    return report_of(records(cohort(planted=True)))


@pytest.fixture(scope="module")
def fair() -> FairnessReport:
    return report_of(records(cohort(planted=False)))


def test_signed_report_texts_label_as_the_cohort_intends() -> None:
    positive = LABELER.label("Moderate cardiomegaly. Small left pleural effusion.")
    assert positive.presence(FindingName.CARDIOMEGALY) is Presence.PRESENT
    assert positive.has_finding
    negative = LABELER.label(
        "Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax."
    )
    assert negative.no_finding


def test_planted_underdiagnosis_fires_an_alert_naming_group_and_metric(
    planted: FairnessReport,
) -> None:
    fired = [a for a in planted.alerts if a.metric == "underdiagnosis_rate"]
    assert [(a.attribute, a.group, a.rule) for a in fired] == [("sex", "female", "underdiagnosis")]
    (alert,) = fired
    assert "underdiagnosis_rate" in alert.message and "sex=female" in alert.message
    assert alert.ratio.value is not None and alert.ratio.value > 1.25
    assert alert.ratio.ci_low is not None and alert.ratio.ci_low > 1.0


def test_no_disparity_no_alert_at_the_same_thresholds(fair: FairnessReport) -> None:
    assert fair.alerts == ()
    metric = fair.metric("underdiagnosis_rate")
    female = next(g for g in metric.by_attribute("sex") if g.group == "female")
    assert female.ratio.ci_low is not None and female.ratio.ci_high is not None
    assert female.ratio.ci_low < 1.0 < female.ratio.ci_high


def test_underdiagnosis_is_the_no_finding_rate_among_signed_positives(
    planted: FairnessReport,
) -> None:
    cases = cohort(planted=True)
    positives = [c for c in cases if c.signed_positive]
    missed = [c for c in positives if draft_labels(c.draft).no_finding]
    metric = planted.metric("underdiagnosis_rate")
    assert metric.overall_n == len(positives)
    assert metric.overall.value == pytest.approx(len(missed) / len(positives))
    ci_low, ci_high = metric.overall.ci_low, metric.overall.ci_high
    assert ci_low is not None and ci_high is not None
    assert ci_low < metric.overall.value < ci_high


def test_small_groups_are_suppressed_without_numbers(planted: FairnessReport) -> None:
    small = "Native Hawaiian or Other Pacific Islander"
    for metric in planted.metrics:
        (cell,) = [g for g in metric.by_attribute("race") if g.group == small]
        assert cell.suppressed and cell.n < 30
        assert cell.estimate.value is None and cell.ratio.value is None
        assert cell.difference.value is None
    assert all(a.group != small for a in planted.alerts)


def test_suppression_is_per_cell_not_per_group(planted: FairnessReport) -> None:
    # 50 studies of unknown sex: enough for draft rates, too few signed positives (~25).
    drafted = next(
        g for g in planted.metric("no_finding_rate").by_attribute("sex") if g.group == UNKNOWN
    )
    assert not drafted.suppressed and drafted.n == 50 and drafted.estimate.value is not None
    agreement = next(
        g for g in planted.metric("underdiagnosis_rate").by_attribute("sex") if g.group == UNKNOWN
    )
    assert agreement.n < 30 and agreement.suppressed


def test_unknown_demographics_are_a_reported_group(planted: FairnessReport) -> None:
    groups = {g.group for g in planted.metric("no_finding_rate").by_attribute("ethnicity")}
    assert groups == {UNKNOWN}
    (cell,) = planted.metric("no_finding_rate").by_attribute("ethnicity")
    assert cell.n == planted.drafted and cell.ratio.value == pytest.approx(1.0)


def test_largest_ratio_and_difference_are_the_furthest_unsuppressed_groups(
    planted: FairnessReport,
) -> None:
    import math

    metric = planted.metric("underdiagnosis_rate")
    cells = [g for g in metric.groups if not g.suppressed and g.ratio.value]
    assert len(cells) >= 4  # female, male, two races, age bands ...
    by_ratio = max(cells, key=lambda g: abs(math.log(g.ratio.value or 1.0)))
    by_difference = max(cells, key=lambda g: abs(g.difference.value or 0.0))
    assert metric.largest_ratio() == by_ratio
    assert metric.largest_difference() == by_difference
    # Within sex, the two sexes sit on either side of the overall value.
    sexes = {g.group: g for g in metric.by_attribute("sex") if not g.suppressed}
    assert sexes["female"].ratio.value and sexes["female"].ratio.value > 1.0
    assert sexes["male"].ratio.value and sexes["male"].ratio.value < 1.0
    assert metric.largest_ratio("sex") in (sexes["female"], sexes["male"])


def test_rules_can_watch_some_attributes_and_skip_the_ci_requirement() -> None:
    recs = records(cohort(planted=True))
    only_race = AlertRule(
        name="race-only", metric="underdiagnosis_rate", attributes=["race"], ratio_above=1.25
    )
    assert report_of(recs, rules=[only_race]).alerts == ()
    loose = AlertRule(name="loose", metric="no_finding_rate", ratio_above=1.01, require_ci=False)
    fired = report_of(recs, rules=[loose]).alerts
    assert any((a.attribute, a.group) == ("sex", "female") for a in fired)


def test_failure_rate_counts_failed_and_dead_lettered_studies() -> None:
    recs = records(cohort(planted=False))
    broken = [
        FairnessRecord(
            created_at=WINDOW_START,
            model_version="model-1",
            subgroups={"manufacturer": "Globex"},
            outcome="dead_lettered" if i % 2 else "failed",
        )
        for i in range(40)
    ]
    report = report_of(recs + broken)
    metric = report.metric("failure_rate")
    assert metric.overall_numerator == 40 and metric.overall_n == len(recs) + 40
    globex = next(g for g in metric.by_attribute("manufacturer") if g.group == "Globex")
    assert globex.numerator == 40
    # the broken studies carry no sex: they are counted under unknown, not dropped
    unknown = next(g for g in metric.by_attribute("sex") if g.group == UNKNOWN)
    assert unknown.numerator == 40
    assert any(
        a.rule == "failure-gap" and (a.attribute, a.group) == ("manufacturer", "Globex")
        for a in report.alerts
    )
    assert report.metric("dead_letter_rate").overall_numerator == 20


def test_the_report_is_reproducible_with_a_seed() -> None:
    recs = records(cohort(planted=True, per_group=60))
    first, second = report_of(recs), report_of(recs)
    assert first.metrics == second.metrics and first.alerts == second.alerts


def test_an_empty_window_reports_nothing_and_alerts_nothing() -> None:
    report = report_of([])
    assert report.studies == 0 and report.alerts == ()
    assert report.metric("underdiagnosis_rate").overall.value is None


def test_record_from_job_maps_states_and_missing_subgroups() -> None:
    draft = draft_report(True)
    written = DraftJob(
        study_uid="1.2.3",
        study_ref="study-1",
        model_version="m",
        state=JobState.WRITTEN,
        draft=draft.model_dump(mode="json"),
        timings={"draft_s": 2.5},
        subgroups={"sex": "female"},
    )
    record = record_from_job(written)
    assert record.outcome == "drafted" and record.latency_s == 2.5
    assert record.draft == draft and record.output_chars and record.output_chars > 50
    assert record.group("sex") == "female" and record.group("race") == UNKNOWN
    legacy = DraftJob(study_uid="1.2.4", study_ref="s", model_version="m", state=JobState.FAILED)
    legacy.subgroups = None  # type: ignore[assignment]  # a row from before the column existed
    old = record_from_job(legacy)
    assert old.outcome == "failed" and old.group("sex") == UNKNOWN and old.draft is None


def test_trend_points_follow_windows_and_suppress_small_cells() -> None:
    recs = records(cohort(planted=True, per_group=240))
    middle = WINDOW_START + (WINDOW_END - WINDOW_START) / 2
    windows = [
        (WINDOW_START, middle, [r for r in recs if r.created_at < middle]),
        (middle, WINDOW_END, [r for r in recs if r.created_at >= middle]),
    ]
    points = trend_points(windows, attributes=["sex"], min_group_size=40)
    overall = [p for p in points if p.metric == "no_finding_rate" and p.attribute == "overall"]
    assert [p.n for p in overall] == [len(windows[0][2]), len(windows[1][2])]
    unknown = [p for p in points if p.group == UNKNOWN and p.metric == "no_finding_rate"]
    assert unknown and all(p.n < 40 and p.value is None for p in unknown)
    female = [p for p in points if p.group == "female" and p.metric == "underdiagnosis_rate"]
    assert len(female) == 2 and all(p.value is not None for p in female)


def test_trend_points_carry_wilson_intervals() -> None:
    # Wilson's 95% interval of 5 events in 10: 0.2366 to 0.7634 (Newcombe 1998, method 3).
    low, high = wilson_interval(5, 10, 0.95) or (0.0, 0.0)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 20, 0.95) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(0, 0, 0.95) is None
    recs = records(cohort(planted=True, per_group=240))
    points = trend_points([(WINDOW_START, WINDOW_END, recs)], attributes=["sex"], min_group_size=40)
    shown = [p for p in points if p.value is not None]
    assert shown and all(
        p.low is not None and p.high is not None and p.low <= p.value <= p.high for p in shown
    )
    # A wider interval for a group than for everyone (fewer studies).
    overall = next(p for p in shown if p.metric == "underdiagnosis_rate" and p.group == "overall")
    female = next(p for p in shown if p.metric == "underdiagnosis_rate" and p.group == "female")
    assert (female.high - female.low) > (overall.high - overall.low)  # type: ignore[operator]
    assert all(p.low is None and p.high is None for p in points if p.value is None)


def test_window_bounds_are_kept(planted: FairnessReport) -> None:
    assert (planted.since, planted.until) == (WINDOW_START, WINDOW_END)
    assert planted.model_versions == ("model-1",)
    assert planted.generated.tzinfo is not None
    assert planted.generated > dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_group_estimates_agree_with_fairlearn_metricframe(planted: FairnessReport) -> None:
    """fairlearn's MetricFrame is the reference for the disaggregation (see pipeline.fairness)."""
    import numpy as np
    from fairlearn.metrics import MetricFrame, false_negative_rate, true_positive_rate

    cases = cohort(planted=True)
    recs = records(cases)
    positives = [r for r in recs if r.final is not None and r.final.has_finding]
    assert positives and all(r.draft_labels is not None for r in positives)
    cardiomegaly = FindingName.CARDIOMEGALY
    truth = np.ones(len(positives), dtype=int)
    # underdiagnosis = "draft: no finding" among signed positives = the draft's false-negative rate
    said_finding = np.array([int(not r.draft_labels.no_finding) for r in positives])  # type: ignore[union-attr]
    said_cardiomegaly = np.array(
        [int(r.draft_labels.presence(cardiomegaly) is Presence.PRESENT) for r in positives]  # type: ignore[union-attr]
    )
    frame = MetricFrame(
        metrics={"underdiagnosis": false_negative_rate},
        y_true=truth,
        y_pred=said_finding,
        sensitive_features=np.array([r.group("race") for r in positives]),
    )
    ours = {g.group: g for g in planted.metric("underdiagnosis_rate").by_attribute("race")}
    for group, expected in frame.by_group["underdiagnosis"].items():
        cell = ours[str(group)]
        if not cell.suppressed:
            assert cell.estimate.value == pytest.approx(expected)
    assert planted.metric("underdiagnosis_rate").overall.value == pytest.approx(
        frame.overall["underdiagnosis"]
    )
    sensitivity = MetricFrame(
        metrics=true_positive_rate,
        y_true=truth,
        y_pred=said_cardiomegaly,
        sensitive_features=np.array([r.group("sex") for r in positives]),
    )
    ours_sex = {g.group: g for g in planted.metric("sensitivity:cardiomegaly").by_attribute("sex")}
    for group, expected in sensitivity.by_group.items():
        if not ours_sex[str(group)].suppressed:
            assert ours_sex[str(group)].estimate.value == pytest.approx(expected)


def test_signed_report_text_reads_conclusion_and_plain_text_forms() -> None:
    import base64

    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from flows.fairness import signed_report_text

    body = "FINDINGS: Small right pneumothorax.\nIMPRESSION: Pneumothorax."
    report = DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "XR chest"},
            "conclusion": "Right pneumothorax.",
            "presentedForm": [
                {"contentType": "text/plain", "data": base64.b64encode(body.encode()).decode()},
                {"contentType": "application/pdf", "data": base64.b64encode(b"%PDF").decode()},
            ],
        }
    )
    text = signed_report_text(report)
    assert text.startswith("Right pneumothorax.") and body in text and "%PDF" not in text
    labels = LABELER.label(text)
    assert labels.presence(FindingName.PNEUMOTHORAX) is Presence.PRESENT


def test_settings_reject_attributes_that_are_not_captured() -> None:
    with pytest.raises(ValueError, match="insurance"):
        FairnessSettings(attributes=["sex", "insurance"])
    with pytest.raises(ValueError, match="no threshold"):
        AlertRule(name="empty", metric="underdiagnosis_rate")


def test_signed_labels_are_cached_and_unreadable_reports_are_counted(tmp_path: Path) -> None:
    """The monitor's lookups against a file-backed EHR and a real SQLite ledger."""
    import json

    from connectors.ledger_store import LedgerStore, open_engine
    from connectors.ndjson import NdjsonEhr
    from flows.fairness import FairnessServices, signed_labels

    def report(order: str, **extra: object) -> dict[str, object]:
        return {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "XR chest"},
            "basedOn": [{"reference": f"ServiceRequest/{order}"}],
            **extra,
        }

    folder = tmp_path / "ehr"
    folder.mkdir()
    lines = [
        report("1", id="r1", conclusion="Moderate cardiomegaly."),
        report("2", id="r2", issued="not a date"),  # invalid FHIR: this lookup fails
        {**report("3", id="r3", conclusion="Large pneumothorax."), "status": "preliminary"},
    ]
    (folder / "DiagnosticReport.ndjson").write_text("\n".join(json.dumps(x) for x in lines))
    ledger = LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    jobs = [
        DraftJob(
            study_uid=f"1.2.{order}",
            study_ref=f"study-{order}",
            model_version="m",
            state=JobState.WRITTEN,
            draft=draft_report(False).model_dump(mode="json"),
            links={"service_request": f"ServiceRequest/{order}"},
        )
        for order in ("1", "2", "3")
    ]
    services = FairnessServices(
        ledger=ledger, ehr=NdjsonEhr(folder), settings=FairnessSettings(), identifier_system="s"
    )
    labels, unreadable = signed_labels(services, jobs)
    assert unreadable == 1  # study 2: counted, logged by reference, not dropped silently
    assert set(labels) == {"1.2.1"}  # study 3 has only a preliminary report: not signed yet
    assert labels["1.2.1"].presence(FindingName.CARDIOMEGALY) is Presence.PRESENT
    (folder / "DiagnosticReport.ndjson").write_text("")  # the EHR forgets: the cache answers
    cached, unreadable = signed_labels(services, jobs)
    assert cached == labels and unreadable == 0
    assert (
        ledger.signed_labels(["1.2.1"], LABELER.name)["1.2.1"].report_ref == "DiagnosticReport/r1"
    )


def test_the_html_report_says_how_many_signed_reports_were_unreadable(
    planted: FairnessReport,
) -> None:
    from dataclasses import replace

    from pipeline.fairness_html import render_html

    assert "failed to return" not in render_html(planted)
    assert "7 whose signed report the EHR failed to return" in render_html(
        replace(planted, signed_unreadable=7)
    )


def test_planted_sensitivity_gap_alerts_for_female_against_the_male_reference(
    planted: FairnessReport,
) -> None:
    """The overall value contains the group and dilutes the gap; the reference group does not."""
    assert planted.reference("sex") == "male"  # the largest known group (210 vs 202)
    fired = [a for a in planted.alerts if a.metric.startswith("sensitivity:")]
    assert {(a.metric, a.attribute, a.group, a.against) for a in fired} == {
        ("sensitivity:cardiomegaly", "sex", "female", "male"),
        ("sensitivity:pleural_effusion", "sex", "female", "male"),
    }
    metric = planted.metric("sensitivity:cardiomegaly")
    female, male = metric.group("sex", "female"), metric.group("sex", "male")
    assert female is not None and male is not None
    assert female.estimate.value is not None and male.estimate.value is not None
    alert = next(a for a in fired if a.metric == "sensitivity:cardiomegaly")
    assert alert.comparison == "reference" and alert.threshold == "ratio < 0.8"
    assert alert.ratio.value == pytest.approx(female.estimate.value / male.estimate.value)
    assert 0.55 < alert.ratio.value < 0.8
    assert alert.ratio.ci_high is not None and alert.ratio.ci_high < 1.0
    assert alert.q_value is not None and alert.q_value <= planted.false_discovery_rate
    assert "sex=female" in alert.message and "sex=male (reference)" in alert.message
    # Against the overall value (which contains the female group) the gap is diluted.
    assert female.ratio.value is not None and female.ratio.value > alert.ratio.value
    # The reference group has no comparison with itself.
    assert male.reference_ratio.value is None


def test_between_groups_names_the_worst_group_whatever_the_reference() -> None:
    """On the integration test's smaller cohort female is the larger sex, so the reference
    comparison cannot name it: the between-groups comparison (lowest vs highest) does."""
    report = report_of(records(cohort(planted=True, per_group=100)))
    assert report.reference("sex") == "female"
    fired = {(a.metric, a.group, a.comparison, a.against) for a in report.alerts}
    assert ("sensitivity:cardiomegaly", "female", "between", "male") in fired
    alert = next(a for a in report.alerts if a.metric == "sensitivity:cardiomegaly")
    assert alert.ratio.value is not None and 0.55 < alert.ratio.value < 0.8
    spread = report.metric("sensitivity:cardiomegaly").between_of("sex")
    assert spread is not None and (spread.high, spread.low) == ("male", "female")
    assert spread.ratio.value == pytest.approx(1.0 / alert.ratio.value)
    # A declared reference group is used instead of the largest.
    declared = report_of(
        records(cohort(planted=True, per_group=100)), reference_groups={"sex": "male"}
    )
    assert declared.reference("sex") == "male"
    assert any(
        (a.metric, a.group, a.comparison) == ("sensitivity:cardiomegaly", "female", "reference")
        for a in declared.alerts
    )


def test_rules_choose_their_comparisons() -> None:
    recs = records(cohort(planted=True))
    overall = AlertRule(
        name="overall-only", metric="sensitivity:cardiomegaly", ratio_below=0.8,
        comparisons=["overall"],
    )  # fmt: skip
    (diluted,) = report_of(recs, rules=[overall]).alerts
    assert (diluted.group, diluted.comparison, diluted.against) == ("female", "overall", "overall")
    reference = overall.model_copy(update={"name": "reference", "comparisons": ["reference"]})
    (direct,) = report_of(recs, rules=[reference]).alerts
    assert (direct.group, direct.against) == ("female", "male")
    # The overall value contains the female group: its ratio is diluted towards 1.
    assert direct.ratio.value is not None and diluted.ratio.value is not None
    assert direct.ratio.value < diluted.ratio.value < 1.0
    # Only the harmful direction: male (doing better) never fires a "below" rule.
    between = overall.model_copy(update={"name": "between", "comparisons": ["between"]})
    assert [a.group for a in report_of(recs, rules=[between]).alerts] == ["female"]


def test_reference_group_is_declared_or_the_largest_known_group() -> None:
    from pipeline.fairness import reference_group

    assert reference_group(["a", "b", UNKNOWN], [10, 20, 99], None) == "b"
    assert reference_group(["a", "b", UNKNOWN], [10, 20, 99], "a") == "a"
    assert reference_group(["a", "b"], [10, 20], "absent") == "b"
    assert reference_group(["a", "b"], [20, 20], None) == "a"  # ties: reproducible
    assert reference_group([UNKNOWN], [5], None) is None
    with pytest.raises(ValueError, match="insurance"):
        FairnessSettings(reference_groups={"insurance": "x"})


def test_benjamini_hochberg_matches_the_step_up_procedure() -> None:
    from pipeline.fairness import benjamini_hochberg

    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # Sorted: 0.005, 0.01, 0.03, 0.04, 0.5 -> x 5/rank: 0.025, 0.025, 0.05, 0.05, 0.5
    assert benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])
    assert benjamini_hochberg([]) == []
    assert benjamini_hochberg([0.9, 0.95]) == pytest.approx([0.95, 0.95])


def test_the_no_disparity_cohort_raises_no_alert_under_the_fdr_control(
    fair: FairnessReport,
) -> None:
    assert fair.alerts == ()
    assert fair.tests > 20  # every comparison the default rules look at is in the family
    assert all(w.q_value is None or w.q_value > fair.false_discovery_rate for w in fair.watches)


def test_min_effect_keeps_tiny_but_certain_gaps_quiet() -> None:
    recs = records(cohort(planted=True))
    rule = AlertRule(name="tiny", metric="no_finding_rate", ratio_above=1.01)
    assert any(a.group == "female" for a in report_of(recs, rules=[rule]).alerts)
    strict = rule.model_copy(update={"min_effect": 0.5})
    report = report_of(recs, rules=[strict])
    assert report.alerts == () and report.watches == ()


def _svgs(html: str) -> list[str]:
    import re

    return re.findall(r"<svg.*?</svg>", html, flags=re.DOTALL)


def test_the_no_disparity_report_has_no_alert_colour_anywhere(fair: FairnessReport) -> None:
    from pipeline.fairness_html import _ALERT_MARK, _BAR_FLAGGED, render_html

    html = render_html(fair)
    body = html[html.index("<body>") :]  # the stylesheet defines the colours; nothing uses them
    assert "No alert rule fired" in body
    assert 'class="alerts"' not in body and 'class="flag"' not in body
    svgs = _svgs(html)
    assert svgs and not any(_BAR_FLAGGED.lower() in svg.lower() for svg in svgs)
    assert not any(_ALERT_MARK in svg for svg in svgs)
    tables = body[body.index('<section id="tables">') :]
    assert f"<td>{_ALERT_MARK}" not in tables and f">{_ALERT_MARK} alert" not in tables


def test_the_planted_report_flags_only_the_cells_where_a_rule_fired(
    planted: FairnessReport,
) -> None:
    from pipeline.fairness_html import _BAR_FLAGGED, render_html

    html = render_html(planted)
    body = html[html.index("<body>") :]
    assert body.count('class="flag"') == len(planted.alerts)
    flagged_sections = {
        section.split('"', 1)[0]
        for section in body.split('<section class="metric" id="metric-')[1:]
        if 'class="flag"' in section
    }
    assert {name.split("-", 1)[1] for name in flagged_sections} == {
        "underdiagnosis_rate", "sensitivity-cardiomegaly", "sensitivity-pleural_effusion",
    }  # fmt: skip
    # Underdiagnosis: female is red (an alert fired); male, the group doing better, is not.
    underdiagnosis = _svgs(html)[0]
    assert underdiagnosis.lower().count(_BAR_FLAGGED.lower()) >= 1
    assert ">female \u25b2<" in underdiagnosis and ">male (ref)<" in underdiagnosis


def test_alerts_are_new_or_persisting_against_the_previous_window(
    planted: FairnessReport,
) -> None:
    assert all(a.since_last is None for a in planted.alerts)  # no previous window given
    recs = records(cohort(planted=True))
    first = planted.alerts[0]
    again = report_of(recs, previous_alerts=[first])
    assert {a.key: a.since_last for a in again.alerts}[first.key] == "persisting"
    assert all(a.since_last == "new" for a in again.alerts if a.key != first.key)


def test_the_planted_alert_card_names_female_against_male(planted: FairnessReport) -> None:
    import re

    from pipeline.fairness_html import render_html

    html = render_html(planted)
    cards = [
        re.sub(r"<[^>]+>", "", card)
        for card in re.findall(r'<article class="alert-card".*?</article>', html, re.DOTALL)
    ]
    assert len(cards) == len(planted.alerts)
    (card,) = [c for c in cards if "Sensitivity: cardiomegaly" in c]
    assert "lower for sex = female than for sex = male (the reference group)" in card
    assert "the rule alerts when the ratio is below 0.8" in card
    # Unknown sex (28 signed positives) is suppressed, so one more count is withheld: female's
    # (the smaller published group); male's count and events are shown.
    assert "sex = female: 57.7% (count withheld" in card
    assert "sex = male: 95 of 108 studies (88.0%)" in card
    assert "Action: " in card and "Owner: AI quality officer" in card
    link = re.search(r'<a href="#([^"]+)">See the chart</a>', html)
    assert link is not None and f'id="{link.group(1)}"' in html


def test_build_report_marks_alerts_against_the_previous_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flow evaluates the previous window with the same settings: planted in both windows,
    the alerts persist; planted only now, they are new."""
    from dataclasses import replace

    import flows.fairness as flow

    planted_recs, fair_recs = records(cohort(planted=True)), records(cohort(planted=False))

    def run(previous: list[FairnessRecord]) -> FairnessReport:
        def collect(
            _services: object, since: dt.datetime, _until: dt.datetime
        ) -> tuple[list[FairnessRecord], int]:
            chosen = planted_recs if since == WINDOW_START else previous
            return [replace(r, created_at=since) for r in chosen], 0

        monkeypatch.setattr(flow, "collect_records", collect)
        settings = FairnessSettings(n_boot=200, trend_windows=2, attributes=list(ATTRIBUTES))
        services = flow.FairnessServices(
            ledger=None,  # type: ignore[arg-type]  # collect_records is replaced
            ehr=None,  # type: ignore[arg-type]
            settings=settings,
            identifier_system="s",
        )
        return flow.build_report(services, WINDOW_START, WINDOW_END)

    persisting = run(planted_recs)
    assert persisting.alerts and all(a.since_last == "persisting" for a in persisting.alerts)
    new = run(fair_recs)
    assert new.alerts and all(a.since_last == "new" for a in new.alerts)


def test_coverage_marks_single_valued_and_mostly_unknown_attributes(
    planted: FairnessReport,
) -> None:
    by_name = {c.attribute: c for c in planted.coverage}
    assert [c.attribute for c in planted.not_assessable()] == ["ethnicity", "site", "modality"]
    assert by_name["ethnicity"].reason == "100% unknown" and by_name["ethnicity"].unknown_share == 1
    assert by_name["site"].reason == "one known group"
    sex = by_name["sex"]
    assert sex.assessable and sex.unknown == 50 and sex.known_groups == 2
    female = next(g for g in sex.groups if g.group == "female")
    assert female.studies == female.drafted == 202 and female.with_final_report == 202
    small = next(g for g in by_name["race"].groups if g.group.startswith("Native"))
    assert small.suppressed


def test_coverage_counts_signed_reports_per_group_and_the_banner_says_what_is_not_assessed(
    fair: FairnessReport,
) -> None:
    import re
    from dataclasses import replace

    from pipeline.fairness_html import render_html

    recs = records(cohort(planted=False))
    unsigned = [replace(r, final=None) if i % 10 == 0 else r for i, r in enumerate(recs)]
    report = report_of(unsigned)
    sex = next(c for c in report.coverage if c.attribute == "sex")
    assert sum(g.with_final_report for g in sex.groups) == report.with_final_report
    assert report.with_final_report == len(recs) - len(range(0, len(recs), 10))
    html = render_html(fair)
    banner = html[html.index('<p class="no-alerts"') : html.index("</p>", html.index("no-alerts"))]
    assert (
        "Not assessed: ethnicity (100% unknown), site (one known group), modality (one "
        "known group)" in banner
    )
    coverage = html[html.index('<section id="coverage">') : html.index('<section id="headline">')]
    assert "not assessable: 100% unknown" in coverage
    text = re.sub(r"<[^>]+>", "|", coverage)
    assert "Native Hawaiian or Other Pacific Islander||suppressed||n &lt; 30" in text
    # Not-assessable attributes are left out of the charts.
    charts = " ".join(re.findall(r"<svg.*?</svg>", html, re.DOTALL))
    assert ">SYNTHETIC HOSPITAL" not in charts and ">ethnicity<" not in charts


def test_the_measure_is_written_once_and_the_measure_reports_resolve_to_it(
    tmp_path: Path, planted: FairnessReport
) -> None:
    """Against a file-backed EHR and a real SQLite ledger: two windows, one Measure."""
    import json
    from dataclasses import replace

    from connectors.ledger_store import LedgerStore, open_engine
    from connectors.ndjson import NdjsonEhr
    from flows.fairness import FairnessServices, write_measure_report

    folder = tmp_path / "ehr"
    folder.mkdir()
    services = FairnessServices(
        ledger=LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")),
        ehr=NdjsonEhr(folder),
        settings=FairnessSettings(),
        identifier_system="urn:test",
    )
    later = replace(planted, since=WINDOW_END, until=WINDOW_END + (WINDOW_END - WINDOW_START))
    ids = [write_measure_report(services, r) for r in (planted, later, planted)]
    assert ids[0] != ids[1] and ids[2] == ids[0]
    measures = [json.loads(x) for x in (folder / "Measure.ndjson").read_text().splitlines()]
    assert len(measures) == 1
    (measure,) = measures
    reports = [json.loads(x) for x in (folder / "MeasureReport.ndjson").read_text().splitlines()]
    assert len(reports) == 2
    canonical = f"{measure['url']}|{measure['version']}"
    assert {r["measure"] for r in reports} == {canonical}
    assert measure["url"] == FairnessSettings().measure_url


def test_the_planted_report_is_compact_and_explains_its_methods(planted: FairnessReport) -> None:
    import re

    from pipeline.fairness_html import render_html

    html = render_html(planted)
    tables = html[html.index('<section id="tables">') : html.index('<section id="methods">')]
    # Not-assessable attributes only in the coverage panel, not as rows of every metric.
    assert re.findall(r'<th class="attribute" colspan="7">(\w+)', tables)[:4] == [
        "sex", "age_band", "race", "manufacturer",
    ]  # fmt: skip
    assert "ethnicity" not in re.findall(r'<th class="attribute" colspan="7">(\w+)', tables)
    # Metrics with no study in their population are one line, not a table of dashes.
    section = tables[tables.index('id="metric-') :]
    assert "No studies in its population in this window." in section
    assert "0.0% in every group shown: no variation between groups." in section
    assert tables.count("<table>") < 15
    methods = html[html.index('<section id="methods">') :]
    assert "Benjamini–Hochberg" in methods and f"{planted.tests:,} comparisons" in methods
    assert "sex: male" in methods and "complementary suppression" in methods
    assert "@media print" in html and "break-inside: avoid" in html


def test_the_forest_plot_shows_ratios_to_the_reference_against_parity_and_thresholds(
    planted: FairnessReport,
) -> None:
    import re

    from pipeline.fairness_html import _BAR_FLAGGED, render_html

    html = render_html(planted)
    forests = dict(re.findall(r'<figure id="forest-\d+-([^"]+)">(.*?)</figure>', html, re.DOTALL))
    assert set(forests) >= {"underdiagnosis_rate", "sensitivity-cardiomegaly"}
    sensitivity = forests["sensitivity-cardiomegaly"]
    assert "rule thresholds at 0.8" in sensitivity and "parity at 1" in sensitivity
    assert ">sex (reference: male)<" in sensitivity
    assert ">female \u25b2<" in sensitivity and ">reference<" in sensitivity
    assert _BAR_FLAGGED in sensitivity
    # A metric without an alert: no red (the no-disparity report is tested page-wide above).
    assert _BAR_FLAGGED not in forests["no_finding_rate"]


def test_intersections_are_attributes_of_their_own_with_the_same_suppression() -> None:
    recs = records(cohort(planted=True))
    report = report_of(recs, intersections=[("sex", "race"), ("sex", "age_band")])
    assert report.attributes[-2:] == ("sex×race", "sex×age_band")
    metric = report.metric("sensitivity:cardiomegaly")
    groups = {g.group: g for g in metric.by_attribute("sex×race")}
    assert {"female & Black", "female & White", "male & Black", "male & White", UNKNOWN} <= set(
        groups
    )
    # Any unknown part makes the combination unknown; small combinations are suppressed.
    assert groups[UNKNOWN].n == sum(
        1 for r in recs if r.group("sex") == UNKNOWN and r.final and r.final.has_finding
    )
    small = [g for name, g in groups.items() if "Pacific Islander" in name]
    assert small and all(g.suppressed and g.estimate.value is None for g in small)
    fired = {(a.attribute, a.group) for a in report.alerts if a.metric == metric.name}
    assert ("sex×race", "female & Black") in fired or ("sex×race", "female & White") in fired
    assert all("female" in group for attribute, group in fired if "×" in attribute)
    # The no-disparity cohort stays quiet with the intersections added.
    fair = report_of(records(cohort(planted=False)), intersections=[("sex", "race")])
    assert fair.alerts == ()
    with pytest.raises(ValueError, match="insurance"):
        FairnessSettings(intersections=[("sex", "insurance")])
    assert FairnessSettings().intersections == [("sex", "age_band"), ("sex", "race")]


def test_the_issue_numbers_the_integration_cohort_alerts_female_sensitivity_at_0_71() -> None:
    """The integration test's cohort (100 per sex, every 10th study unsigned) with the default
    settings: sensitivity 62.0% for female, 87.5% for male. Against the overall value (which
    contains the female group) the ratio is above 0.8 and nothing fired; female is the larger
    sex there, so the reference comparison cannot name it: the between-groups one does."""
    from dataclasses import replace

    settings = FairnessSettings(n_boot=200)
    recs = [
        replace(r, final=None) if i % 10 == 0 else r
        for i, r in enumerate(records(cohort(planted=True, per_group=100)))
    ]
    report = report_of(
        recs,
        attributes=settings.attributes,
        n_boot=settings.n_boot,
        rules=settings.rules,
        seed=settings.seed,
        intersections=settings.intersections,
    )
    metric = report.metric("sensitivity:cardiomegaly")
    female, male = metric.group("sex", "female"), metric.group("sex", "male")
    assert female is not None and male is not None
    assert female.estimate.value == pytest.approx(0.620) and male.estimate.value == pytest.approx(
        0.875
    )
    assert female.ratio.value is not None and female.ratio.value > 0.8  # diluted: no alert
    (alert,) = [
        a
        for a in report.alerts
        if a.metric == metric.name and (a.attribute, a.group) == ("sex", "female")
    ]
    assert (alert.comparison, alert.against) == ("between", "male")
    assert alert.ratio.value == pytest.approx(0.62 / 0.875) and alert.ratio.value < 0.8
    assert "sex=female" in alert.message


def test_bar_charts_draw_the_rule_thresholds_against_the_reference(
    planted: FairnessReport,
) -> None:
    import re
    from dataclasses import replace

    from pipeline.fairness_html import render_html

    def bar(report: FairnessReport) -> str:
        html = render_html(report)
        found = re.search(
            r'<figure id="plot-\d+-sensitivity-cardiomegaly">(.*?)</figure>', html, re.DOTALL
        )
        assert found is not None
        return found.group(1)

    with_rules = bar(planted)
    without = bar(replace(planted, rules=()))
    # One dotted segment per assessable attribute with a published reference (0.8 x its value).
    assert with_rules.count("stroke-dasharray") > without.count("stroke-dasharray")
