from __future__ import annotations

import pytest
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.servicerequest import ServiceRequest

from pipeline.context import study_context
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
    context = study_context(
        modality="CR",
        body_part="CHEST",
        study_description="XR CHEST PA",
        service_request=ORDER,
        conditions=CONDITIONS,
        prior_reports=PRIORS,
    )
    assert context.indication == "Cough"
    assert context.conditions == ("Asthma", "J44.9")
    assert context.prior_impression == "No acute cardiopulmonary process."


def test_missing_ehr_context_still_gives_a_usable_prompt() -> None:
    context = study_context(
        modality="US",
        body_part=None,
        study_description=None,
        service_request=None,
        conditions=[],
        prior_reports=[],
    )
    text = build_messages(ModelInput(reference="s", images_png=(b"x",), context=context))[1][
        "content"
    ][-1]["text"]
    assert "Indication: not provided" in text


def test_patient_names_in_references_never_reach_the_prompt() -> None:
    context = study_context(
        modality="CR",
        body_part=None,
        study_description=None,
        service_request=ORDER,
        conditions=CONDITIONS,
        prior_reports=PRIORS,
    )
    messages = build_messages(ModelInput(reference="s", images_png=(b"x",), context=context))
    assert "Jane" not in str(messages) and "syn-1" not in str(messages)
