"""Published codes for what a draft says: each finding, its presence, and the critical flag.

A draft's findings (``pipeline.report.FindingName``, CheXpert labels) are written as FHIR
Observations. A local code (``urn:medvlm-pipeline:finding``) alone is opaque to every other
system, so each finding also carries a published code: SNOMED CT where a clear concept exists,
else RadLex. The table is checked in, never looked up at run time (the EHR side has no
terminology server to ask, and a draft must not depend on one), and every entry names the URL
where its code and display were confirmed.

Not every label has a confirmed code. ``UNCODED_FINDINGS`` lists those written with the local
code only, each with its reason below; a missing published code is safe (the local coding and the
text remain), a wrong one is not:

- ``other``: free text by design (``Finding.detail``); there is nothing to code.
- ``enlarged_cardiomediastinum``: no SNOMED CT or RadLex concept for the CheXpert meaning (heart
  and mediastinum together) could be confirmed from a public source.
- ``lung_opacity``: CheXpert's catch-all for any increased lung density; no SNOMED CT or RadLex
  concept could be confirmed from a public source.
- ``cardiomegaly`` and ``atelectasis``: the SNOMED CT concepts commonly used (8186001
  |Cardiomegaly|, 46621007 |Atelectasis|) were seen only in third-party code, not in a
  terminology release, an HL7/IHE guide or SNOMED International's own material; add them here
  once confirmed (for example against tx.fhir.org).

Every coding list puts the published coding first and the local one second, so a consumer that
reads ``coding[0]`` gets the standard code and one that matches the local system still finds it.
This module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pipeline.report import FindingName, Presence

SNOMED_CT = "http://snomed.info/sct"
RADLEX = "http://radlex.org"
V3_OBSERVATION_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
LOCAL_FINDING_SYSTEM = "urn:medvlm-pipeline:finding"
LOCAL_PRESENCE_SYSTEM = "urn:medvlm-pipeline:presence"


@dataclass(frozen=True)
class CodeEntry:
    """One published code: its system, code and display, and where it was confirmed."""

    system: str
    code: str
    display: str
    source: str


# Where each code was confirmed (commit-pinned where the source is a repository file).
_LT_LUNG_IG = (
    "https://github.com/HL7LT/ig-lt-lung/blob/22343a72006f422d18f07119de80cc6cf31f1d90/"
    "input/fsh/terminology/incidental-finding-lt-lung.fsh"
)
_MII_ONCOLOGY_CONCEPTMAP = (
    "https://github.com/medizininformatik-initiative/kerndatensatzmodul-onkologie/blob/"
    "2ed2c86571ac1293addfd917ece56c2289d56f49/input/fsh/oBDS/13_OP/"
    "mii-cm-onko-operation-komplikation-sct.fsh"
)
_SNOMED_TEMPLATES = (
    "https://github.com/IHTSDO/snomed-templates/blob/a732c2b6da85a8acdcd916c28c5ec67f84ab32fe/"
)
_FHIR_R5_LUNG_MASS_EXAMPLE = "https://hl7.org/fhir/genomicstudy-example-lungMass.json.html"
_MCODE_PRESENT_ABSENT = "https://hl7.org/fhir/us/mcode/STU2.1/ValueSet-mcode-present-absent.html"
_MCODE_POSITIVE_NEGATIVE = (
    "https://www.hl7.org/fhir/us/mcode/2019Sep/ValueSet-obf-datatype-PositiveNegativeVS.html"
)
_THO_OBSERVATION_INTERPRETATION = (
    "https://github.com/HL7/UTG/blob/1349f81aa4a9aab0391d7cd3c2b949f5dd2218f7/"
    "input/sourceOfTruth/v3/codeSystems/v3-ObservationInterpretation.xml"
)

FINDING_CODES: Mapping[FindingName, CodeEntry] = MappingProxyType(
    {
        FindingName.LUNG_LESION: CodeEntry(
            # SNOMED CT places Pulmonary nodule under Lung mass, so nodules are covered too.
            SNOMED_CT,
            "309529002",
            "Lung mass",
            _FHIR_R5_LUNG_MASS_EXAMPLE,
        ),
        FindingName.EDEMA: CodeEntry(
            SNOMED_CT, "19242006", "Pulmonary edema", _MII_ONCOLOGY_CONCEPTMAP
        ),
        FindingName.CONSOLIDATION: CodeEntry(
            SNOMED_CT, "95436008", "Lung consolidation", _LT_LUNG_IG
        ),
        FindingName.PNEUMONIA: CodeEntry(
            SNOMED_CT, "233604007", "Pneumonia", _MII_ONCOLOGY_CONCEPTMAP
        ),
        FindingName.PNEUMOTHORAX: CodeEntry(SNOMED_CT, "36118008", "Pneumothorax", _LT_LUNG_IG),
        FindingName.PLEURAL_EFFUSION: CodeEntry(
            SNOMED_CT, "60046008", "Pleural effusion", _MII_ONCOLOGY_CONCEPTMAP
        ),
        FindingName.PLEURAL_OTHER: CodeEntry(
            # The general pleural finding: CheXpert's "pleural other" (thickening, plaques...).
            SNOMED_CT,
            "301256004",
            "Pleura finding",
            _LT_LUNG_IG,
        ),
        FindingName.FRACTURE: CodeEntry(
            SNOMED_CT,
            "125605004",
            "Fracture of bone",
            _SNOMED_TEMPLATES + "Fracture%20of%20%5Bbone%20structure%5D%20(disorder)%20-%20v2.json",
        ),
        FindingName.SUPPORT_DEVICES: CodeEntry(
            # A physical-object concept: the Observation states a device is present (or absent).
            SNOMED_CT,
            "49062001",
            "Device",
            _SNOMED_TEMPLATES + "Imaging%20guided%20biopsy%20(procedure)%20v1.json",
        ),
    }
)

UNCODED_FINDINGS: frozenset[FindingName] = frozenset(FindingName) - frozenset(FINDING_CODES)

PRESENCE_CODES: Mapping[Presence, CodeEntry] = MappingProxyType(
    {
        Presence.PRESENT: CodeEntry(SNOMED_CT, "52101004", "Present", _MCODE_PRESENT_ABSENT),
        Presence.ABSENT: CodeEntry(SNOMED_CT, "2667000", "Absent", _MCODE_PRESENT_ABSENT),
        # "Equivocal": borderline, may or may not be there - what the model's "uncertain" says.
        # (The ACR/RSNA finding models use 82334004 |Indeterminate| for "cannot be determined",
        # which is about an unreadable study rather than an uncertain reader.)
        Presence.UNCERTAIN: CodeEntry(SNOMED_CT, "42425007", "Equivocal", _MCODE_POSITIVE_NEGATIVE),
    }
)

CRITICAL_INTERPRETATION = CodeEntry(
    V3_OBSERVATION_INTERPRETATION, "AA", "Critical abnormal", _THO_OBSERVATION_INTERPRETATION
)


def _coding(entry: CodeEntry) -> dict[str, Any]:
    return {"system": entry.system, "code": entry.code, "display": entry.display}


def finding_code(name: FindingName) -> dict[str, Any]:
    """The finding as a FHIR CodeableConcept: published coding first (when there is one), the
    local coding second, and the label as text."""
    published = FINDING_CODES.get(name)
    coding = [_coding(published)] if published is not None else []
    coding.append({"system": LOCAL_FINDING_SYSTEM, "code": name.value})
    return {"coding": coding, "text": name.value.replace("_", " ")}


def presence_value(presence: Presence) -> dict[str, Any]:
    """The presence as a FHIR CodeableConcept (``Observation.valueCodeableConcept``): the SNOMED
    CT qualifier value first, the local coding second."""
    return {
        "coding": [
            _coding(PRESENCE_CODES[presence]),
            {"system": LOCAL_PRESENCE_SYSTEM, "code": presence.value},
        ],
        "text": presence.value,
    }


def critical_interpretation() -> dict[str, Any]:
    """The model's critical flag as a FHIR CodeableConcept (``Observation.interpretation`` /
    ``DiagnosticReport`` use): v3 ObservationInterpretation AA, Critical abnormal."""
    return {
        "coding": [_coding(CRITICAL_INTERPRETATION)],
        "text": "Critical result flagged by the model",
    }
