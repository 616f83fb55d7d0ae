"""``pipeline.ehr_rules.modifier_extension_urls``: modifier extensions found wherever they sit,
plain extensions ignored (FHIR R4 extensibility.html#modifierExtension)."""

from __future__ import annotations

import pytest
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

from pipeline.ehr_rules import modifier_extension_urls

pytestmark = pytest.mark.unit

UNKNOWN = "http://example.org/fhir/StructureDefinition/"


def test_plain_extensions_anywhere_are_not_modifiers() -> None:
    patient = Patient.model_validate(
        {
            "resourceType": "Patient",
            "id": "p1",
            "extension": [{"url": f"{UNKNOWN}a", "valueString": "x"}],
            "name": [{"family": "F", "extension": [{"url": f"{UNKNOWN}b", "valueCode": "c"}]}],
            "_birthDate": {"extension": [{"url": f"{UNKNOWN}c", "valueCode": "day"}]},
            "birthDate": "1930-01-01",
        }
    )
    assert modifier_extension_urls(patient) == ()


def test_a_modifier_on_the_resource_is_found() -> None:
    order = ServiceRequest.model_validate(
        {
            "resourceType": "ServiceRequest",
            "id": "o1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "modifierExtension": [{"url": f"{UNKNOWN}not-to-be-done", "valueBoolean": True}],
        }
    )
    assert modifier_extension_urls(order) == (f"{UNKNOWN}not-to-be-done",)


def test_a_modifier_on_a_backbone_element_is_found() -> None:
    condition = Condition.model_validate(
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": "Patient/p1"},
            "evidence": [
                {
                    "modifierExtension": [{"url": f"{UNKNOWN}refuted", "valueBoolean": True}],
                    "code": [{"text": "cough"}],
                }
            ],
        }
    )
    assert modifier_extension_urls(condition) == (f"{UNKNOWN}refuted",)
