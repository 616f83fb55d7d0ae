from __future__ import annotations

import re

import pytest

from pipeline.finding_codes import (
    CRITICAL_INTERPRETATION,
    FINDING_CODES,
    LOCAL_FINDING_SYSTEM,
    LOCAL_PRESENCE_SYSTEM,
    PRESENCE_CODES,
    RADLEX,
    SNOMED_CT,
    UNCODED_FINDINGS,
    V3_OBSERVATION_INTERPRETATION,
    CodeEntry,
    critical_interpretation,
    finding_code,
    presence_value,
)
from pipeline.report import FindingName, Presence

pytestmark = pytest.mark.unit

# Verhoeff tables: the last digit of a SNOMED CT identifier is a Verhoeff check digit.
_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_valid(number: str) -> bool:
    check = 0
    for i, digit in enumerate(reversed(number)):
        check = _D[check][_P[i % 8][int(digit)]]
    return check == 0


def test_verhoeff_check_itself() -> None:
    assert verhoeff_valid("36118008")  # Pneumothorax
    assert not verhoeff_valid("36118007")
    assert not verhoeff_valid("36181008")  # transposed digits are caught too


def test_every_finding_but_the_uncoded_ones_has_a_published_code() -> None:
    assert set(FINDING_CODES) | UNCODED_FINDINGS == set(FindingName)
    assert not set(FINDING_CODES) & UNCODED_FINDINGS
    assert FindingName.OTHER in UNCODED_FINDINGS
    # Each uncoded finding is named, with its reason, in the module docstring.
    import pipeline.finding_codes as module

    assert all(f"``{name.value}``" in (module.__doc__ or "") for name in UNCODED_FINDINGS)


def _all_entries() -> list[CodeEntry]:
    return [*FINDING_CODES.values(), *PRESENCE_CODES.values(), CRITICAL_INTERPRETATION]


@pytest.mark.parametrize("entry", _all_entries(), ids=lambda e: f"{e.code}")
def test_codes_are_well_formed_with_a_display_and_an_https_source(entry: CodeEntry) -> None:
    assert entry.system in {SNOMED_CT, RADLEX, V3_OBSERVATION_INTERPRETATION}
    if entry.system == SNOMED_CT:
        assert re.fullmatch(r"[1-9]\d{5,17}", entry.code), entry
        assert verhoeff_valid(entry.code), entry
    elif entry.system == RADLEX:
        assert re.fullmatch(r"RID\d+", entry.code), entry
    assert entry.display and entry.display == entry.display.strip()
    assert "(" not in entry.display, "a preferred term, not the FSN with its semantic tag"
    assert re.fullmatch(r"https://\S+", entry.source), entry


def test_every_presence_has_a_snomed_qualifier_value() -> None:
    assert set(PRESENCE_CODES) == set(Presence)
    assert {p: e.code for p, e in PRESENCE_CODES.items()} == {
        Presence.PRESENT: "52101004",
        Presence.ABSENT: "2667000",
        Presence.UNCERTAIN: "42425007",
    }
    assert all(e.system == SNOMED_CT for e in PRESENCE_CODES.values())


@pytest.mark.parametrize("name", list(FindingName))
def test_finding_code_puts_the_published_coding_first_and_the_local_one_second(
    name: FindingName,
) -> None:
    concept = finding_code(name)
    codings = concept["coding"]
    assert codings[-1] == {"system": LOCAL_FINDING_SYSTEM, "code": name.value}
    if name in FINDING_CODES:
        entry = FINDING_CODES[name]
        assert len(codings) == 2
        assert codings[0] == {"system": entry.system, "code": entry.code, "display": entry.display}
    else:
        assert len(codings) == 1
    assert concept["text"] == name.value.replace("_", " ")


@pytest.mark.parametrize("presence", list(Presence))
def test_presence_value_is_published_then_local(presence: Presence) -> None:
    concept = presence_value(presence)
    entry = PRESENCE_CODES[presence]
    assert concept["coding"] == [
        {"system": SNOMED_CT, "code": entry.code, "display": entry.display},
        {"system": LOCAL_PRESENCE_SYSTEM, "code": presence.value},
    ]
    assert concept["text"] == presence.value


def test_critical_is_the_v3_critical_abnormal_interpretation() -> None:
    concept = critical_interpretation()
    assert concept["coding"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "AA",
            "display": "Critical abnormal",
        }
    ]
    assert concept["text"]


def test_the_returned_concepts_are_fresh_copies() -> None:
    first = finding_code(FindingName.PNEUMOTHORAX)
    first["coding"].clear()
    assert finding_code(FindingName.PNEUMOTHORAX)["coding"]
