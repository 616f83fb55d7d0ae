"""Subgroup attributes captured at draft time: EHR demographics, DICOM header, unknowns."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fhir.resources.R4B.patient import Patient

from pipeline.fairness_types import ATTRIBUTES, UNKNOWN
from pipeline.subgroups import US_CORE_ETHNICITY, US_CORE_RACE, age_band, subgroup_attributes

pytestmark = pytest.mark.unit

OMB = "urn:oid:2.16.840.1.113883.6.238"


def _us_core(url: str, *codes: tuple[str, str], text: str | None = None) -> dict[str, Any]:
    subs: list[dict[str, Any]] = [
        {"url": "ombCategory", "valueCoding": {"system": OMB, "code": c, "display": d}}
        for c, d in codes
    ]
    if text is not None:
        subs.append({"url": "text", "valueString": text})
    return {"url": url, "extension": subs}


def _patient(**fields: Any) -> Patient:
    return Patient.model_validate({"resourceType": "Patient", "id": "p1", **fields})


HEADER = {
    "StudyDate": "20261102",
    "Modality": "cr",
    "InstitutionName": "General Hospital",
    "Manufacturer": "ACME",
    "ManufacturerModelName": "XR-9",
    "PatientSex": "M",
    "PatientBirthDate": "19400101",
}


@pytest.mark.parametrize(
    ("birth", "on", "band"),
    [
        (dt.date(2000, 5, 1), dt.date(2018, 4, 30), "0-17"),
        (dt.date(2000, 5, 1), dt.date(2018, 5, 1), "18-39"),
        (dt.date(1960, 1, 1), dt.date(2026, 11, 2), "60-79"),
        (dt.date(1930, 1, 1), dt.date(2026, 11, 2), "80+"),
        (None, dt.date(2026, 11, 2), UNKNOWN),
        (dt.date(1960, 1, 1), None, UNKNOWN),
        (dt.date(2027, 1, 1), dt.date(2026, 11, 2), UNKNOWN),  # birth after study: bad data
    ],
)
def test_age_band_at_the_study_date(birth: dt.date | None, on: dt.date | None, band: str) -> None:
    assert age_band(birth, on) == band


def test_ehr_demographics_and_dicom_operational_groups() -> None:
    patient = _patient(
        gender="female",
        birthDate="1971-06-15",
        extension=[
            _us_core(US_CORE_RACE, ("2054-5", "Black or African American"), text="Black"),
            _us_core(US_CORE_ETHNICITY, ("2135-2", "Hispanic or Latino")),
        ],
    )
    groups = subgroup_attributes(patient, HEADER)
    assert groups == {
        "sex": "female",  # the EHR wins over DICOM PatientSex
        "age_band": "40-59",
        "race": "Black or African American",
        "ethnicity": "Hispanic or Latino",
        "site": "General Hospital",
        "manufacturer": "ACME",
        "scanner_model": "XR-9",
        "modality": "CR",
    }
    assert "1971" not in str(groups)  # only the band is kept, never the birth date


def test_several_omb_races_are_multiple_and_text_is_the_fallback() -> None:
    multi = _patient(extension=[_us_core(US_CORE_RACE, ("2106-3", "White"), ("2028-9", "Asian"))])
    assert subgroup_attributes(multi, {})["race"] == "multiple"
    text_only = _patient(extension=[_us_core(US_CORE_RACE, text="Mixed")])
    assert subgroup_attributes(text_only, {})["race"] == "Mixed"
    asked = _patient(extension=[_us_core(US_CORE_RACE, ("ASKU", "Asked but no answer"))])
    assert subgroup_attributes(asked, {})["race"] == UNKNOWN


def test_without_an_ehr_patient_dicom_sex_and_age_are_used() -> None:
    groups = subgroup_attributes(None, HEADER)
    assert groups["sex"] == "male" and groups["age_band"] == "80+"
    assert groups["race"] == UNKNOWN and groups["ethnicity"] == UNKNOWN


def test_missing_values_are_unknown_never_dropped() -> None:
    groups = subgroup_attributes(_patient(), {"InstitutionName": "  ", "StudyDate": "garbage"})
    assert tuple(groups) == ATTRIBUTES
    assert set(groups.values()) == {UNKNOWN}
    assert set(subgroup_attributes(None, {}).values()) == {UNKNOWN}
