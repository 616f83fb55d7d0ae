from __future__ import annotations

import json

import jsonschema
import pytest

from medvlm.errors import InvalidModelOutputError
from pipeline.report import (
    DraftReport,
    normalize_json,
    parse_report,
    report_json_schema,
    schema_fingerprint,
)

pytestmark = pytest.mark.unit

VALID = {
    "rationale": "Cardiac silhouette enlarged.",
    "findings": [
        {
            "name": "cardiomegaly",
            "presence": "present",
            "laterality": "not_applicable",
            "location": "heart",
            "severity": "mild",
            "detail": "Cardiothoracic ratio above 0.5.",
        }
    ],
    "impression": "Mild cardiomegaly.",
    "critical": False,
    "recommendation": "none",
}


def test_schema_is_self_contained_for_guided_decoding() -> None:
    text = json.dumps(report_json_schema())
    assert "$ref" not in text and "$defs" not in text
    jsonschema.Draft202012Validator.check_schema(report_json_schema())


def test_every_string_and_list_in_the_schema_is_bounded_on_both_sides() -> None:
    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "enum" not in node:
                assert node.get("minLength", 0) >= 1 and "maxLength" in node, node
            if node.get("type") == "array":
                assert node.get("minItems", 0) >= 1 and "maxItems" in node, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(report_json_schema())


def test_a_valid_report_passes_schema_and_model_alike() -> None:
    jsonschema.validate(VALID, report_json_schema())
    assert parse_report(json.dumps(VALID), reference="study-abc").findings[0].name == "cardiomegaly"


@pytest.mark.parametrize(
    "broken",
    [
        {**VALID, "findings": []},
        {**VALID, "impression": ""},
        {**VALID, "extra": 1},
        {**VALID, "findings": [{**VALID["findings"][0], "presence": "maybe"}]},  # type: ignore[dict-item]
    ],
)
def test_schema_and_model_reject_the_same_invalid_reports(broken: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report_json_schema())
    with pytest.raises(InvalidModelOutputError):
        parse_report(json.dumps(broken), reference="study-abc")


def test_invalid_output_error_names_the_study_reference() -> None:
    with pytest.raises(InvalidModelOutputError, match="study-0123456789ab"):
        parse_report('{"rationale": "trunc', reference="study-0123456789ab")


def test_schema_fingerprint_is_stable_and_tracks_the_model() -> None:
    assert schema_fingerprint() == schema_fingerprint()
    assert len(schema_fingerprint()) == 16
    assert DraftReport.model_json_schema()["title"] == "DraftReport"


def _grammar_accepts(text: str) -> bool:
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_json_schema(
        json.dumps(report_json_schema()), any_whitespace=False, separators=(",", ":")
    )
    return bool(_is_grammar_accept_string(grammar, text))


def test_guided_decoding_grammar_accepts_a_valid_report() -> None:
    assert _grammar_accepts(json.dumps(VALID, separators=(",", ":")))


def test_raw_control_characters_that_the_grammar_admits_are_normalised_to_strict_json() -> None:
    # xgrammar's bounded-string rule admits a raw tab; the report must still parse, and the
    # normalised text must be strict JSON with the same content.
    raw = json.dumps(VALID, separators=(",", ":")).replace(
        "Mild cardiomegaly.", "Mild\tcardiomegaly."
    )
    assert "\t" in raw and _grammar_accepts(raw)
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    report = parse_report(raw, reference="study-abc")
    assert report.impression == "Mild\tcardiomegaly."
    assert json.loads(normalize_json(raw))["impression"] == "Mild\tcardiomegaly."


def test_vllm_accepts_the_schema_for_xgrammar() -> None:
    from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

    assert not has_xgrammar_unsupported_json_features(report_json_schema())
