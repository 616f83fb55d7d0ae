"""Subgroup attributes of a study, captured at draft time for fairness monitoring.

What the monitor groups by (``pipeline.fairness_types.ATTRIBUTES``): administrative sex, age band
at the study date, US Core race and ethnicity, and the operational groups site, scanner
manufacturer, scanner model and modality. Captured once, when the study is drafted, from the
EHR's Patient and the study's DICOM header, and kept in the ledger: the monitor never re-reads
demographics later (they may change, and the draft was made with what was known then).

Only coarse groups are kept, never identifying values: an age band, not the birth date. A value
that is missing or unreadable becomes ``unknown``, which is reported as a group of its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.patient import Patient

from pipeline.fairness_types import ATTRIBUTES, UNKNOWN

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
#: Lower bounds (years) of the age bands; the last band is open-ended.
AGE_BANDS: tuple[int, ...] = (0, 18, 40, 60, 80)

# OMB race and ethnicity categories (urn:oid:2.16.840.1.113883.6.238), as US Core binds them.
_OMB_DISPLAY = {
    "1002-5": "American Indian or Alaska Native",
    "2028-9": "Asian",
    "2054-5": "Black or African American",
    "2076-8": "Native Hawaiian or Other Pacific Islander",
    "2106-3": "White",
    "2135-2": "Hispanic or Latino",
    "2186-5": "Not Hispanic or Latino",
    "UNK": UNKNOWN,
    "ASKU": UNKNOWN,
}
#: DICOM keywords ``subgroup_attributes`` reads from a study's first instance.
SUBGROUP_HEADER_KEYWORDS: tuple[str, ...] = (
    "StudyDate",
    "Modality",
    "InstitutionName",
    "Manufacturer",
    "ManufacturerModelName",
    "PatientSex",
    "PatientBirthDate",
)
_DICOM_SEX = {"M": "male", "F": "female", "O": "other"}


def age_band(birth_date: dt.date | None, on: dt.date | None) -> str:
    """The age band (e.g. ``40-59``, ``80+``) at ``on``; ``unknown`` without both dates."""
    if birth_date is None or on is None or on < birth_date:
        return UNKNOWN
    years = on.year - birth_date.year - ((on.month, on.day) < (birth_date.month, birth_date.day))
    lower = max(b for b in AGE_BANDS if b <= years)
    following = [b for b in AGE_BANDS if b > lower]
    return f"{lower}+" if not following else f"{lower}-{following[0] - 1}"


def _omb_category(extensions: list[Extension] | None, url: str) -> str:
    """US Core race/ethnicity: one OMB category, ``multiple``, the text, or ``unknown``."""
    for extension in extensions or []:
        if extension.url != url:
            continue
        categories = {
            _OMB_DISPLAY.get(str(c.code), c.display or str(c.code))
            for sub in extension.extension or []
            if sub.url == "ombCategory" and (c := sub.valueCoding) is not None and c.code
        }
        categories.discard(UNKNOWN)
        if len(categories) > 1:
            return "multiple"
        if categories:
            return categories.pop()
        for sub in extension.extension or []:
            if sub.url == "text" and sub.valueString:
                return str(sub.valueString)
    return UNKNOWN


def _dicom_date(value: str | None) -> dt.date | None:
    try:
        return dt.datetime.strptime((value or "")[:8], "%Y%m%d").date()
    except ValueError:
        return None


def subgroup_attributes(
    patient: Patient | None, header: Mapping[str, str | None]
) -> dict[str, str]:
    """Every attribute of ``ATTRIBUTES`` for one study, ``unknown`` where nothing is known.

    ``header`` holds DICOM keywords of the study's first instance (``StudyDate``, ``Modality``,
    ``InstitutionName``, ``Manufacturer``, ``ManufacturerModelName``, and ``PatientSex``/
    ``PatientBirthDate`` used only when the EHR has no Patient). The EHR's Patient wins where
    both exist: it is the administrative record.
    """

    def text(keyword: str) -> str:
        value = (header.get(keyword) or "").strip()
        return value or UNKNOWN

    study_date = _dicom_date(header.get("StudyDate"))
    if patient is not None:
        sex = str(patient.gender) if patient.gender else UNKNOWN
        birth = patient.birthDate if isinstance(patient.birthDate, dt.date) else None
        race = _omb_category(patient.extension, US_CORE_RACE)
        ethnicity = _omb_category(patient.extension, US_CORE_ETHNICITY)
    else:
        sex = _DICOM_SEX.get(text("PatientSex").upper(), UNKNOWN)
        birth = _dicom_date(header.get("PatientBirthDate"))
        race = ethnicity = UNKNOWN
    values = {
        "sex": sex,
        "age_band": age_band(birth, study_date),
        "race": race,
        "ethnicity": ethnicity,
        "site": text("InstitutionName"),
        "manufacturer": text("Manufacturer"),
        "scanner_model": text("ManufacturerModelName"),
        "modality": text("Modality").upper() if text("Modality") != UNKNOWN else UNKNOWN,
    }
    assert tuple(values) == ATTRIBUTES
    return values
