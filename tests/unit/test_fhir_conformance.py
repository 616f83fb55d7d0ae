"""The FHIR profiles the pipeline's resources claim, checked as data with FHIRPath.

No official FHIR validator is reachable from these machines: there is no internet (so no
tx.fhir.org, no package registry of FHIR IGs) and no Java validator. The constraints of the
profiles the drafts are written against - US Core DiagnosticReport for Report and Note, US Core
DocumentReference, US Core Provenance (6.1 / 7.0), HL7 AI Transparency on FHIR (AI Device, AI
Provenance, AIAST labeling) - are therefore written down as data in
``tests/conformance/profiles.json``, each rule with the URL of the profile page it comes from, and
evaluated here with fhirpathpy:

- a cardinality rule counts ``path`` (``(path).count()``) against ``min``..``max``; with a
  ``context`` it counts per element of the context (``context.select((path).count())``);
- a ``fixed`` coding (system + code) must be among the codings at ``path``, a ``fixed`` value among
  the values;
- an invariant's FHIRPath ``expression`` must evaluate to true.

What this does not cover: value-set membership of bound codes, reference targets' profiles, and
slicing beyond the fixed codes above. The evaluator's self-tests below prove that each kind of
check catches a resource that breaks it, before it is trusted on the builders' output.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models

pytestmark = pytest.mark.unit

PROFILES_JSON = Path(__file__).resolve().parents[1] / "conformance" / "profiles.json"
R4_MODEL = models["r4"]


@dataclass(frozen=True)
class Rule:
    """A cardinality (and optional fixed code/value) constraint of one profile."""

    profile: str
    resource_type: str
    path: str
    min: int
    max: int | None  # None: unbounded (*)
    source: str
    fixed: dict[str, str] | None = None
    context: str | None = None
    must_support: bool = False

    @property
    def where(self) -> str:
        return f"{self.context}.{self.path}" if self.context else self.path


@dataclass(frozen=True)
class Invariant:
    """A FHIRPath expression of one profile that must be true of the resource."""

    profile: str
    resource_type: str
    key: str
    expression: str
    source: str
    severity: str = "error"


@dataclass(frozen=True)
class Profiles:
    profiles: dict[str, dict[str, Any]]
    rules: tuple[Rule, ...]
    invariants: tuple[Invariant, ...]

    def all(self) -> tuple[Rule | Invariant, ...]:
        return (*self.rules, *self.invariants)

    def count(self, profile: str) -> tuple[int, int]:
        return (
            sum(r.profile == profile for r in self.rules),
            sum(i.profile == profile for i in self.invariants),
        )


def load_profiles(path: Path = PROFILES_JSON) -> Profiles:
    """The rules and invariants of ``profiles.json``."""
    data = json.loads(path.read_text())
    rules = tuple(
        Rule(
            profile=r["profile"],
            resource_type=r["resourceType"],
            path=r["path"],
            min=int(r["min"]),
            max=None if r["max"] == "*" else int(r["max"]),
            source=r["source"],
            fixed=r.get("fixed"),
            context=r.get("context"),
            must_support=bool(r.get("mustSupport", False)),
        )
        for r in data["rules"]
    )
    invariants = tuple(
        Invariant(
            profile=i["profile"],
            resource_type=i["resourceType"],
            key=i["key"],
            expression=i["expression"],
            source=i["source"],
            severity=i.get("severity", "error"),
        )
        for i in data["invariants"]
    )
    return Profiles(profiles=data["profiles"], rules=rules, invariants=invariants)


def fhirpath(resource: dict[str, Any], expression: str) -> list[Any]:
    return list(evaluate(resource, expression, {}, R4_MODEL))


def _counts(resource: dict[str, Any], rule: Rule) -> list[int]:
    if rule.context is None:
        return [int(n) for n in fhirpath(resource, f"({rule.path}).count()")]
    return [int(n) for n in fhirpath(resource, f"{rule.context}.select(({rule.path}).count())")]


def _codings(item: Any) -> Iterable[dict[str, Any]]:
    """The codings of a CodeableConcept, or the Coding itself."""
    if isinstance(item, dict):
        if isinstance(item.get("coding"), list):
            yield from item["coding"]
        elif "code" in item:
            yield item


def _has_fixed(resource: dict[str, Any], rule: Rule) -> bool:
    assert rule.fixed is not None
    items = fhirpath(resource, rule.where)
    if "value" in rule.fixed:
        return any(str(item) == rule.fixed["value"] for item in items)
    return any(
        c.get("system") == rule.fixed["system"] and c.get("code") == rule.fixed["code"]
        for item in items
        for c in _codings(item)
    )


def _fixed_text(fixed: dict[str, str]) -> str:
    return fixed["value"] if "value" in fixed else f"{fixed['system']}|{fixed['code']}"


def violations(resource: dict[str, Any], rules: Sequence[Rule | Invariant]) -> list[str]:
    """What ``resource`` breaks of the rules and invariants for its resource type."""
    rtype = resource.get("resourceType")
    found: list[str] = []
    for rule in rules:
        if rule.resource_type != rtype:
            continue
        if isinstance(rule, Invariant):
            result = fhirpath(resource, rule.expression)
            if result != [True]:
                found.append(
                    f"{rule.profile}: {rtype} {rule.key} ({rule.severity}) not satisfied: "
                    f"{rule.expression} -> {result}"
                )
            continue
        bound = "*" if rule.max is None else str(rule.max)
        for n in _counts(resource, rule):
            if n < rule.min or (rule.max is not None and n > rule.max):
                found.append(
                    f"{rule.profile}: {rtype}.{rule.where} has {n}, expected {rule.min}..{bound}"
                )
        if rule.fixed is not None and not _has_fixed(resource, rule):
            found.append(f"{rule.profile}: {rtype}.{rule.where} lacks {_fixed_text(rule.fixed)}")
    return found


def missing_must_support(resource: dict[str, Any], rules: Sequence[Rule | Invariant]) -> set[str]:
    """Must Support elements (``profile:path``) of the resource's type that it leaves empty."""
    rtype = resource.get("resourceType")
    return {
        f"{rule.profile}:{rule.where}"
        for rule in rules
        if isinstance(rule, Rule)
        and rule.must_support
        and rule.resource_type == rtype
        and rule.context is None
        and fhirpath(resource, f"({rule.path}).count()") == [0]
    }


PROFILES = load_profiles()
RULES = PROFILES.all()

# ---------------------------------------------------------------------------------------------
# The rules file itself.


def test_every_rule_names_a_known_profile_and_an_https_source() -> None:
    for item in RULES:
        assert item.profile in PROFILES.profiles, item
        assert item.source.startswith("https://"), item
    for key, profile in PROFILES.profiles.items():
        assert profile["source"].startswith("https://"), key
        assert all(u.startswith("https://") for u in profile["verified_against"]), key
        assert PROFILES.count(key) != (0, 0), f"{key} has no rule"


def test_every_rule_is_well_formed_fhirpath() -> None:
    """Each expression parses and evaluates (on an empty resource of its type)."""
    for rule in PROFILES.rules:
        assert rule.max is None or rule.min <= rule.max, rule
        assert re.fullmatch(r"[A-Za-z][A-Za-z.]*", rule.path), rule
        assert _counts({"resourceType": rule.resource_type}, rule) in ([0], []), rule
    for inv in PROFILES.invariants:
        assert inv.severity in {"error", "warning"}, inv
        fhirpath({"resourceType": inv.resource_type}, inv.expression)


def test_profiles_the_builders_claim_are_all_covered() -> None:
    urls = {p["url"] for p in PROFILES.profiles.values() if p["url"]}
    assert {
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-diagnosticreport-note",
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-documentreference",
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-provenance",
        "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Device",
        "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AI-Provenance",
    } <= urls


# ---------------------------------------------------------------------------------------------
# The evaluator, on hand-made resources: conformant ones pass, each broken one is caught.

_AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_AI_ROLE = {
    "coding": [
        {
            "system": "http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS",
            "code": "Artificial-Intelligence",
        }
    ]
}
_US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
_AI_SD = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/"
_NARRATIVE = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}

GOOD: dict[str, dict[str, Any]] = {
    "DiagnosticReport": {
        "resourceType": "DiagnosticReport",
        "meta": {"profile": [_US_CORE + "us-core-diagnosticreport-note"], "security": [_AIAST]},
        "text": _NARRATIVE,
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://loinc.org", "code": "LP29684-5"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "subject": {"reference": "Patient/p"},
        "effectiveDateTime": "2026-11-01T08:30:00Z",
        "issued": "2026-11-02T09:00:00Z",
        "presentedForm": [{"contentType": "text/plain", "data": "eA=="}],
    },
    "DocumentReference": {
        "resourceType": "DocumentReference",
        "meta": {"profile": [_US_CORE + "us-core-documentreference"], "security": [_AIAST]},
        "text": _NARRATIVE,
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "category": [
            {
                "coding": [
                    {
                        "system": "http://hl7.org/fhir/us/core/CodeSystem/"
                        "us-core-documentreference-category",
                        "code": "clinical-note",
                    }
                ]
            }
        ],
        "subject": {"reference": "Patient/p"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "eA=="}}],
        "context": {"encounter": [{"reference": "Encounter/e"}]},
    },
    "Provenance": {
        "resourceType": "Provenance",
        "meta": {"profile": [_US_CORE + "us-core-provenance", _AI_SD + "AI-Provenance"]},
        "target": [{"reference": "DiagnosticReport/r"}],
        "recorded": "2026-11-02T09:00:00Z",
        "reason": [{"coding": [_AIAST]}],
        "agent": [
            {
                "type": {"coding": [{"code": "author"}]},
                "role": [_AI_ROLE],
                "who": {"reference": "Device/d"},
                "onBehalfOf": {"reference": "Organization/o"},
            }
        ],
    },
    "Device": {
        "resourceType": "Device",
        "meta": {"profile": [_AI_SD + "AI-Device"]},
        "type": _AI_ROLE,
    },
    "Observation": {"resourceType": "Observation", "meta": {"security": [_AIAST]}},
}


@pytest.mark.parametrize("rtype", sorted(GOOD))
def test_a_conformant_hand_made_resource_has_no_violation(rtype: str) -> None:
    assert violations(GOOD[rtype], RULES) == []


def _without(rtype: str, *keys: str) -> dict[str, Any]:
    resource = copy.deepcopy(GOOD[rtype])
    for key in keys:
        del resource[key]
    return resource


def _changed(rtype: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    resource = copy.deepcopy(GOOD[rtype])
    change(resource)
    return resource


BROKEN: list[tuple[str, dict[str, Any], str]] = [
    ("missing subject", _without("DiagnosticReport", "subject"), "DiagnosticReport.subject has 0"),
    ("missing status", _without("DiagnosticReport", "status"), "DiagnosticReport.status has 0"),
    (
        "no radiology category",
        _changed("DiagnosticReport", lambda r: r.update(category=[{"text": "x"}])),
        "lacks http://loinc.org|LP29684-5",
    ),
    (
        "preliminary without effective time",
        _without("DiagnosticReport", "effectiveDateTime"),
        "us-core-10",
    ),
    ("no narrative", _without("DiagnosticReport", "text"), "dom-6"),
    (
        "no profile claim",
        _changed("DiagnosticReport", lambda r: r["meta"].pop("profile")),
        "DiagnosticReport.meta.profile has 0",
    ),
    (
        "no AI label",
        _changed("Observation", lambda r: r.pop("meta")),
        "ai-labeling: Observation.meta.security has 0",
    ),
    (
        "attachment without data or url",
        _changed("DocumentReference", lambda r: r["content"][0]["attachment"].pop("data")),
        "us-core-6",
    ),
    (
        "attachment without contentType",
        _changed("DocumentReference", lambda r: r["content"][0]["attachment"].pop("contentType")),
        "DocumentReference.content.attachment.contentType has 0",
    ),
    (
        "two encounters in context (max 1)",
        _changed(
            "DocumentReference",
            lambda r: r["context"]["encounter"].append({"reference": "Encounter/f"}),
        ),
        "DocumentReference.context.encounter has 2, expected 0..1",
    ),
    (
        "not a clinical note",
        _changed("DocumentReference", lambda r: r.update(category=[{"text": "x"}])),
        "lacks http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
    ),
    (
        "device agent acting for nobody",
        _changed("Provenance", lambda r: r["agent"][0].pop("onBehalfOf")),
        "provenance-1",
    ),
    (
        "agent without who",
        _changed("Provenance", lambda r: r["agent"][0].pop("who")),
        "Provenance.agent.who has 0, expected 1..1",
    ),
    (
        "no AIAST reason",
        _without("Provenance", "reason"),
        "ai-provenance: Provenance.reason has 0",
    ),
    (
        "AI agent without type",
        _changed("Provenance", lambda r: r["agent"][0].pop("type")),
        "ai-agent-type",
    ),
    (
        "Device that is not typed as AI",
        _changed("Device", lambda r: r.update(type={"text": "AI model"})),
        "lacks http://hl7.org/fhir/uv/aitransparency/CodeSystem/AIdeviceTypeCS|Artificial-Intelligence",
    ),
]


@pytest.mark.parametrize(
    ("resource", "expected"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_the_evaluator_catches_a_broken_resource(resource: dict[str, Any], expected: str) -> None:
    found = violations(resource, RULES)
    assert any(expected in v for v in found), found


def test_must_support_gaps_are_reported_apart_from_violations() -> None:
    gaps = missing_must_support(GOOD["DiagnosticReport"], RULES)
    assert "us-core-diagnosticreport-note:encounter" in gaps
    assert "us-core-diagnosticreport-note:subject" not in gaps


# ---------------------------------------------------------------------------------------------
# The project's builders (pipeline.fhir_resources).

# Must Support elements the pipeline has no data for: it draws no key images (Media) to link.
NO_DATA_IN_PIPELINE = {
    "us-core-diagnosticreport-note:media",
}


def _emitted(target: str) -> list[dict[str, Any]]:
    from pipeline.fhir_resources import (
        ModelIdentity,
        StudyLinks,
        WriteOptions,
        build_device,
        build_draft_resources,
    )
    from pipeline.report import DraftReport

    report = DraftReport.model_validate(
        {
            "rationale": "Right lower zone opacity; no pleural air.",
            "findings": [
                {
                    "name": "consolidation",
                    "presence": "present",
                    "laterality": "right",
                    "location": "lower zone",
                    "severity": "moderate",
                    "detail": "Airspace opacity.",
                },
                {
                    "name": "pneumothorax",
                    "presence": "absent",
                    "laterality": "not_applicable",
                    "location": "pleura",
                    "severity": "not_applicable",
                    "detail": "No pneumothorax.",
                },
                {
                    "name": "other",
                    "presence": "uncertain",
                    "laterality": "left",
                    "location": "apex",
                    "severity": "mild",
                    "detail": "Possible apical pleural cap.",
                },
            ],
            "impression": "Right lower zone consolidation.",
            "critical": True,
            "recommendation": "Follow-up radiograph in 6 weeks.",
        }
    )
    links = StudyLinks(
        accession_number="ACC-0001",
        patient="Patient/syn-1",
        service_request="ServiceRequest/sr-1",
        imaging_study="ImagingStudy/is-1",
        encounter="Encounter/enc-1",
        study_started=datetime(2026, 11, 1, 8, 30, tzinfo=UTC),
    )
    model = ModelIdentity(name="med-r1", version="2025.1", weights_sha256="ab" * 32)
    draft = build_draft_resources(
        report,
        links,
        model,
        device="Device/abc",
        issued=datetime(2026, 11, 2, 9, 0, tzinfo=UTC),
        options=WriteOptions(
            target=target,  # type: ignore[arg-type]
            identifier_system="urn:medvlm-pipeline:draft",
            organization="Organization/radiology",
            organization_display="Radiology",
        ),
        sources=("Condition/1", "DiagnosticReport/9"),
    )
    return [*draft.resources, build_device(model)]


@pytest.mark.parametrize("target", ["diagnostic_report", "document_reference"])
def test_every_emitted_resource_meets_its_profiles(target: str) -> None:
    emitted = _emitted(target)
    assert {r["resourceType"] for r in emitted} >= {"Provenance", "Device"}
    found = [f"{r['resourceType']}: {v}" for r in emitted for v in violations(r, RULES)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("target", ["diagnostic_report", "document_reference"])
def test_must_support_elements_are_populated_where_the_pipeline_has_the_data(target: str) -> None:
    gaps = set().union(*(missing_must_support(r, RULES) for r in _emitted(target)))
    assert gaps - NO_DATA_IN_PIPELINE == set()
