from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.servicerequest import ServiceRequest

from pipeline.context import (
    MAX_CONDITIONS,
    PromptContext,
    build_prompt_context,
    eligible_priors,
    is_radiology_report,
)
from pipeline.dicom_time import study_instant
from pipeline.prompts import ModelInput, build_messages

pytestmark = pytest.mark.unit

ORDER = ServiceRequest.model_validate(
    {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/syn-1", "display": "Jane Synthetic"},
        "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "display": "Cough"}]}],
        "note": [{"text": "ignored when a reason exists"}],
    }
)
CONDITIONS = [
    Condition.model_validate(
        {"resourceType": "Condition", "subject": {"reference": "Patient/syn-1"}, "code": code}
    )
    for code in ({"text": "Asthma"}, {"coding": [{"code": "J44.9"}]}, {"text": "Asthma"})
]
PRIORS = [
    DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "XR chest"},
            "conclusion": conclusion,
        }
    )
    for conclusion in (None, "No acute cardiopulmonary process.", "Older")
]


def test_context_takes_reason_conditions_and_latest_prior_impression() -> None:
    context = build_prompt_context(
        modality="CR",
        body_part="CHEST",
        study_description="XR CHEST PA",
        service_request=ORDER,
        conditions=CONDITIONS,
        prior_reports=PRIORS,
    ).context
    assert context.indication == "Cough"
    assert context.conditions == ("Asthma", "J44.9")
    assert context.prior_impression == "No acute cardiopulmonary process."


def test_missing_ehr_context_still_gives_a_usable_prompt() -> None:
    context = build_prompt_context(
        modality="US",
        body_part=None,
        study_description=None,
        service_request=None,
        conditions=[],
        prior_reports=[],
    ).context
    text = build_messages(ModelInput(reference="s", images_png=(b"x",), context=context))[1][
        "content"
    ][-1]["text"]
    assert "Indication: not provided" in text


def test_patient_names_in_references_never_reach_the_prompt() -> None:
    context = build_prompt_context(
        modality="CR",
        body_part=None,
        study_description=None,
        service_request=ORDER,
        conditions=CONDITIONS,
        prior_reports=PRIORS,
    ).context
    messages = build_messages(ModelInput(reference="s", images_png=(b"x",), context=context))
    assert "Jane" not in str(messages) and "syn-1" not in str(messages)


# --- prior-report eligibility -----------------------------------------------------------------

LOINC = "http://loinc.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
ACCESSION_SYSTEM = "urn:oid:1.2.3.4.5.6"
STUDY_START = dt.datetime(2024, 3, 10, 9, 0, tzinfo=dt.UTC)


def _report(
    report_id: str,
    *,
    status: str = "final",
    category: tuple[str, str] | None = (LOINC, "LP29684-5"),
    code: tuple[str, str] | None = None,
    effective: str | None = "2024-01-05T10:00:00Z",
    period_start: str | None = None,
    issued: str | None = None,
    based_on: list[dict[str, Any]] | None = None,
    identifiers: list[dict[str, str]] | None = None,
    security: list[dict[str, str]] | None = None,
    conclusion: str | None = None,
) -> DiagnosticReport:
    data: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "status": status,
        "code": {"coding": [{"system": code[0], "code": code[1]}]} if code else {"text": "x"},
        "subject": {"reference": "Patient/syn-1"},
    }
    if category is not None:
        data["category"] = [{"coding": [{"system": category[0], "code": category[1]}]}]
    if effective is not None:
        data["effectiveDateTime"] = effective
    if period_start is not None:
        data["effectivePeriod"] = {"start": period_start}
    if issued is not None:
        data["issued"] = issued
    if based_on is not None:
        data["basedOn"] = based_on
    if identifiers is not None:
        data["identifier"] = identifiers
    if security is not None:
        data["meta"] = {"security": security}
    if conclusion is not None:
        data["conclusion"] = conclusion
    return DiagnosticReport.model_validate(data)


def _ids(reports: list[DiagnosticReport]) -> list[str]:
    return [str(report.id) for report in reports]


def _eligible(
    reports: list[DiagnosticReport],
    *,
    before: dt.datetime | dt.date | None = STUDY_START,
    order_id: str | None = "order-1",
    accession_number: str | None = "ACC-777",
    accession_system: str | None = ACCESSION_SYSTEM,
) -> list[str]:
    return _ids(
        eligible_priors(
            reports,
            before=before,
            order_id=order_id,
            accession_number=accession_number,
            accession_system=accession_system,
        )
    )


def test_prior_ct_report_dated_after_the_study_is_excluded() -> None:
    before = _report("old-ct", category=(V2_0074, "CT"), effective="2024-03-01T08:00:00Z")
    after = _report("later-ct", category=(V2_0074, "CT"), effective="2024-03-12T08:00:00Z")
    during = _report("same-instant", effective="2024-03-10T09:00:00Z")
    assert _eligible([after, before, during]) == ["old-ct"]


@pytest.mark.parametrize(
    "reference",
    [
        "ServiceRequest/order-1",
        "https://fhir.example.org/r4/ServiceRequest/order-1",
        "ServiceRequest/order-1/_history/3",
        "https://fhir.example.org/r4/ServiceRequest/order-1/_history/3",
    ],
)
def test_this_orders_signed_report_is_excluded_by_based_on(reference: str) -> None:
    own = _report("own", based_on=[{"reference": reference}], effective="2024-03-01T08:00:00Z")
    other = _report("other", based_on=[{"reference": "ServiceRequest/order-10"}])
    assert _eligible([own, other]) == ["other"]


def test_order_id_may_be_given_as_a_reference() -> None:
    own = _report("own", based_on=[{"reference": "ServiceRequest/order-1"}])
    assert _eligible([own], order_id="ServiceRequest/order-1") == []


def test_report_carrying_the_accession_number_is_excluded() -> None:
    own = _report("own", identifiers=[{"system": ACCESSION_SYSTEM, "value": "ACC-777"}])
    no_system = _report("no-system", identifiers=[{"value": "ACC-777"}])
    other_system = _report("other-system", identifiers=[{"system": "urn:lab", "value": "ACC-777"}])
    other_value = _report("other-value", identifiers=[{"system": ACCESSION_SYSTEM, "value": "A1"}])
    assert _eligible([own, no_system, other_system, other_value]) == [
        "other-system",
        "other-value",
    ]


def test_without_an_accession_system_the_accession_in_any_system_excludes() -> None:
    other_system = _report("other-system", identifiers=[{"system": "urn:lab", "value": "ACC-777"}])
    assert _eligible([other_system], accession_system=None) == []


def test_logical_based_on_reference_with_the_accession_is_excluded() -> None:
    own = _report(
        "own",
        based_on=[{"identifier": {"system": ACCESSION_SYSTEM, "value": "ACC-777"}}],
    )
    assert _eligible([own]) == []


def test_lab_report_is_excluded() -> None:
    lab = _report("lab", category=(V2_0074, "LAB"), conclusion="Potassium 4.1")
    rad = _report("rad", category=(V2_0074, "RAD"))
    assert _eligible([lab, rad]) == ["rad"]


@pytest.mark.parametrize("status", ["amended", "corrected", "final"])
def test_signed_reports_including_amended_and_corrected_are_priors(status: str) -> None:
    assert _eligible([_report("signed", status=status)]) == ["signed"]


@pytest.mark.parametrize(
    "status", ["preliminary", "registered", "partial", "cancelled", "entered-in-error", "unknown"]
)
def test_unsigned_reports_are_excluded(status: str) -> None:
    assert _eligible([_report("unsigned", status=status)]) == []


def test_ai_draft_is_never_a_prior_even_when_signed() -> None:
    label = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}
    signed_draft = _report("draft", security=[label], conclusion="AI impression")
    assert _eligible([signed_draft]) == []


def test_priors_are_ordered_latest_first_by_real_instant_across_offsets() -> None:
    # As strings "2024-01-11T03:00+01:00" sorts after "2024-01-10T23:30-05:00", but the latter
    # is the later instant (04:30 UTC on the 11th against 02:00 UTC).
    new_york = _report("new-york", effective="2024-01-10T23:30:00-05:00")
    berlin = _report("berlin", effective="2024-01-11T03:00:00+01:00")
    oldest = _report("oldest", effective="2023-06-01")
    assert _eligible([oldest, berlin, new_york]) == ["new-york", "berlin", "oldest"]


def test_no_study_time_means_no_priors_at_all() -> None:
    assert _eligible([_report("any", effective="2001-01-01")], before=None) == []


def test_same_day_report_is_excluded_when_the_study_has_only_a_date() -> None:
    same_day_morning = _report("same-day", effective="2024-03-10T01:00:00Z")
    previous_evening = _report("previous-day", effective="2024-03-09T23:59:00Z")
    previous_date = _report("previous-date", effective="2024-03-09")
    assert _eligible(
        [same_day_morning, previous_evening, previous_date], before=dt.date(2024, 3, 10)
    ) == ["previous-day", "previous-date"]


def test_date_only_report_is_before_a_timed_study_only_if_its_whole_day_is() -> None:
    study_day = _report("study-day", effective="2024-03-10")
    day_before = _report("day-before", effective="2024-03-09")
    assert _eligible([study_day, day_before]) == ["day-before"]


def test_partial_dates_count_only_when_the_whole_period_is_before_the_study() -> None:
    last_year = _report("last-year", effective="2023")
    this_month = _report("this-month", effective="2024-03")
    last_month = _report("last-month", effective="2024-02")
    assert _eligible([last_year, this_month, last_month]) == ["last-month", "last-year"]


def test_time_falls_back_to_period_start_then_issued() -> None:
    by_period = _report("period", effective=None, period_start="2024-02-01T08:00:00Z")
    by_issued = _report("issued", effective=None, issued="2024-02-02T08:00:00Z")
    issued_after = _report("issued-after", effective=None, issued="2024-03-11T08:00:00Z")
    effective_wins = _report(
        "effective", effective="2024-01-01T08:00:00Z", issued="2024-03-11T08:00:00Z"
    )
    assert _eligible([by_period, by_issued, issued_after, effective_wins]) == [
        "issued",
        "period",
        "effective",
    ]


def test_report_without_any_time_is_dropped() -> None:
    assert _eligible([_report("timeless", effective=None)]) == []


def test_naive_study_start_is_read_as_utc() -> None:
    report = _report("r", effective="2024-03-10T08:30:00+00:00")
    assert _eligible([report], before=dt.datetime(2024, 3, 10, 9, 0)) == ["r"]
    assert _eligible([report], before=dt.datetime(2024, 3, 10, 8, 30)) == []


def test_study_instant_from_the_dicom_header_bounds_the_priors() -> None:
    # 10:15 Berlin winter time is 09:15 UTC: a report at 09:30 UTC is after the study.
    started = study_instant("20240310", "101500", None, ZoneInfo("Europe/Berlin"))
    before = _report("before", effective="2024-03-10T09:00:00Z")
    after = _report("after", effective="2024-03-10T09:30:00Z")
    assert started is not None
    assert _eligible([after, before], before=started) == ["before"]


@pytest.mark.parametrize(
    ("category", "code", "expected"),
    [
        ((LOINC, "LP29684-5"), None, True),
        ((LOINC, "18726-0"), None, True),
        ((V2_0074, "RAD"), None, True),
        ((V2_0074, "CT"), None, True),
        ((V2_0074, "RUS"), None, True),
        ((V2_0074, "NMS"), None, True),
        ((V2_0074, "RX"), None, True),
        ((V2_0074, "CUS"), None, False),  # echocardiography: a cardiology report
        ((V2_0074, "LAB"), None, False),
        (("urn:local", "RAD"), None, False),  # the code alone is not enough
        (None, (LOINC, "18748-4"), True),
        (None, (LOINC, "18782-3"), True),
        (None, (LOINC, "2160-0"), False),  # creatinine
        (None, None, False),
    ],
)
def test_radiology_reports_are_recognised_by_category_or_imaging_code(
    category: tuple[str, str] | None, code: tuple[str, str] | None, expected: bool
) -> None:
    assert is_radiology_report(_report("r", category=category, code=code)) is expected


def test_report_after_the_study_never_reaches_the_prompt() -> None:
    answer = _report("answer", effective="2024-03-10T12:00:00Z", conclusion="Later-study finding.")
    own = _report(
        "own",
        based_on=[{"reference": "ServiceRequest/order-1"}],
        effective="2024-03-10T08:00:00Z",
        conclusion="This order's own signed finding.",
    )
    prior = _report("prior", effective="2023-11-02T10:00:00Z", conclusion="Clear lungs.")
    priors = eligible_priors(
        [answer, own, prior],
        before=STUDY_START,
        order_id="order-1",
        accession_number="ACC-777",
        accession_system=ACCESSION_SYSTEM,
    )
    built = build_prompt_context(
        modality="CR",
        body_part="CHEST",
        study_description=None,
        service_request=None,
        conditions=[],
        prior_reports=priors,
    )
    text = str(build_messages(ModelInput(reference="s", images_png=(b"x",), context=built.context)))
    assert "Clear lungs." in text
    assert "Later-study finding" not in text
    assert "own signed finding" not in text
    assert built.sources == ("DiagnosticReport/prior",)


# --- prompt-context sources -------------------------------------------------------------------


def _order(order_id: str | None, **fields: Any) -> ServiceRequest:
    data: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/syn-1"},
        **fields,
    }
    if order_id is not None:
        data["id"] = order_id
    return ServiceRequest.model_validate(data)


def _condition(condition_id: str | None, code: dict[str, Any]) -> Condition:
    data: dict[str, Any] = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/syn-1"},
        "code": code,
    }
    if condition_id is not None:
        data["id"] = condition_id
    return Condition.model_validate(data)


def _build(
    service_request: ServiceRequest | None = None,
    conditions: list[Condition] | None = None,
    prior_reports: list[DiagnosticReport] | None = None,
) -> PromptContext:
    return build_prompt_context(
        modality="CT",
        body_part="HEAD",
        study_description="CT HEAD WO",
        service_request=service_request,
        conditions=conditions or [],
        prior_reports=prior_reports or [],
    )


def test_order_is_a_source_only_when_it_gives_an_indication() -> None:
    with_reason = _order("1", reasonCode=[{"text": "Headache"}])
    with_note = _order("2", note=[{"text": "Fell at home"}])
    without = _order("3")
    assert _build(with_reason).sources == ("ServiceRequest/1",)
    assert _build(with_note).sources == ("ServiceRequest/2",)
    assert _build(with_note).context.indication == "Fell at home"
    assert _build(without).sources == ()
    assert _build(without).context.indication is None


def test_blank_reason_is_no_indication_and_no_source() -> None:
    blank = _order("4", reasonCode=[{"text": "   "}])
    built = _build(blank)
    assert built.context.indication is None
    assert built.sources == ()


def test_only_the_kept_conditions_are_sources() -> None:
    conditions = [
        _condition("7", {"text": "Asthma"}),
        _condition("8", {"text": "Asthma"}),  # duplicate name: not used
        _condition("9", {}),  # no text: not used
        _condition("10", {"coding": [{"code": "J44.9"}]}),
    ]
    built = _build(conditions=conditions)
    assert built.context.conditions == ("Asthma", "J44.9")
    assert built.sources == ("Condition/7", "Condition/10")


def test_conditions_beyond_the_limit_are_not_sources() -> None:
    conditions = [_condition(str(i), {"text": f"Condition {i}"}) for i in range(MAX_CONDITIONS + 3)]
    built = _build(conditions=conditions)
    assert len(built.context.conditions) == MAX_CONDITIONS
    assert built.sources == tuple(f"Condition/{i}" for i in range(MAX_CONDITIONS))


def test_only_the_prior_whose_impression_was_used_is_a_source() -> None:
    no_conclusion = _report("11")
    used = _report("12", conclusion="Old lacunar infarct.")
    older = _report("13", conclusion="Normal.")
    built = _build(prior_reports=[no_conclusion, used, older])
    assert built.context.prior_impression == "Old lacunar infarct."
    assert built.sources == ("DiagnosticReport/12",)


def test_sources_follow_order_conditions_prior_and_skip_resources_without_id() -> None:
    built = _build(
        _order("1", reasonCode=[{"text": "Headache"}]),
        [_condition(None, {"text": "Migraine"}), _condition("7", {"text": "Hypertension"})],
        [_report("9", conclusion="Normal.")],
    )
    assert built.context.conditions == ("Migraine", "Hypertension")
    assert built.sources == ("ServiceRequest/1", "Condition/7", "DiagnosticReport/9")
    assert not any(source.startswith("Patient/") for source in built.sources)
