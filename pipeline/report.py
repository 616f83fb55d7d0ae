"""The structured draft report: a pydantic model and the JSON Schema used for guided decoding.

The schema is the contract between the model and the rest of the pipeline. vLLM's structured
outputs constrain generation to it, so even a model that knows nothing (the tiny random-weight
checkpoint of the tests) produces a parseable report; the same model then validates the text.

Bounds matter for guided decoding: a grammar without ``maxLength``/``maxItems`` lets a weak model
run until ``max_tokens`` and truncate the JSON; one without ``minLength``/``minItems`` lets it take
the empty path. Every string and list here is bounded on both sides.

The model's reasoning (Med-R1 style traces) is kept in ``rationale``: stored with the draft, never
shown as a finding. This module does no I/O.
"""

from __future__ import annotations

import copy
import hashlib
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medvlm.errors import InvalidModelOutputError


def _text(min_length: int, max_length: int, description: str) -> Any:
    """A string field bounded on both sides (see the module docstring on why)."""
    return Field(min_length=min_length, max_length=max_length, description=description)


class Presence(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


class Laterality(StrEnum):
    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"
    MIDLINE = "midline"
    NOT_APPLICABLE = "not_applicable"


class Severity(StrEnum):
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"
    NOT_APPLICABLE = "not_applicable"


class FindingName(StrEnum):
    """Controlled vocabulary of findings (CheXpert observation labels plus `other`).

    A closed list keeps drafts comparable across studies and lets the fairness monitor score
    each finding against the signed report. Findings outside it use `other` with a `detail`.
    """

    ENLARGED_CARDIOMEDIASTINUM = "enlarged_cardiomediastinum"
    CARDIOMEGALY = "cardiomegaly"
    LUNG_OPACITY = "lung_opacity"
    LUNG_LESION = "lung_lesion"
    EDEMA = "edema"
    CONSOLIDATION = "consolidation"
    PNEUMONIA = "pneumonia"
    ATELECTASIS = "atelectasis"
    PNEUMOTHORAX = "pneumothorax"
    PLEURAL_EFFUSION = "pleural_effusion"
    PLEURAL_OTHER = "pleural_other"
    FRACTURE = "fracture"
    SUPPORT_DEVICES = "support_devices"
    OTHER = "other"


class Finding(BaseModel):
    """One observation of the draft, later one FHIR Observation."""

    model_config = ConfigDict(extra="forbid")

    name: FindingName = Field(description="What was looked for.")
    presence: Presence = Field(description="Whether the model sees it.")
    laterality: Laterality = Field(description="Side, where a side applies.")
    location: str = _text(1, 60, "Anatomical location.")
    severity: Severity = Field(description="Degree, where it applies.")
    detail: str = _text(1, 160, "One-line description.")


class DraftReport(BaseModel):
    """A machine-drafted radiology report. Never final: a radiologist reviews and signs."""

    model_config = ConfigDict(extra="forbid")

    rationale: str = _text(
        1, 600, "The model's reasoning; stored for audit, not presented as findings."
    )
    findings: list[Finding] = Field(min_length=1, max_length=8)
    impression: str = _text(1, 400, "Summary for the reader.")
    critical: bool = Field(description="True when a critical result needs urgent communication.")
    recommendation: str = _text(1, 200, "Follow-up recommendation, or `none`.")


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = copy.deepcopy(defs[ref.removeprefix("#/$defs/")])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return _inline_refs({**target, **extra}, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


def report_json_schema() -> dict[str, Any]:
    """The JSON Schema of ``DraftReport`` with every ``$ref`` inlined.

    Self-contained so that any guided-decoding backend (xgrammar, guidance, outlines) and any
    OpenAI-compatible client (``response_format: json_schema``) accepts it unchanged.
    """
    schema = DraftReport.model_json_schema()
    return dict(_inline_refs(schema, schema.get("$defs", {})))


def normalize_json(text: str) -> str:
    """Model JSON as strict JSON: raw control characters inside strings become escapes.

    xgrammar 0.2.8 compiles a length-bounded JSON string to ``[^"\\\r\n]{m,n}``, which admits
    raw control characters such as a tab (seen from the random test model): valid for the
    grammar, invalid for strict JSON parsers. A ``pattern`` excluding them cannot be combined
    with length bounds in vLLM's xgrammar backend (xgrammar#966). So the text is parsed
    leniently and re-serialised; the content is unchanged. Raises ``ValueError`` if not JSON.
    """
    return json.dumps(json.loads(text, strict=False), ensure_ascii=False, separators=(",", ":"))


def parse_report(text: str, *, reference: str) -> DraftReport:
    """Parse and validate model output. ``reference`` names the study without identifying anyone."""
    snippet = text[:80] + ("…" if len(text) > 80 else "")
    try:
        return DraftReport.model_validate_json(normalize_json(text))
    except ValueError as exc:  # json.JSONDecodeError and pydantic.ValidationError
        detail = (
            f"{exc.error_count()} errors, first: {exc.errors()[0]['msg']}"
            if isinstance(exc, ValidationError)
            else f"not JSON: {exc}"
        )
        raise InvalidModelOutputError(
            f"model output for {reference} is not a valid report ({detail}); "
            f"text starts {snippet!r}"
        ) from exc


def schema_fingerprint() -> str:
    """A short stable hash of the schema, recorded with drafts so outputs stay comparable."""
    canonical = json.dumps(report_json_schema(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class DraftResult(BaseModel):
    """A validated draft with what is needed to audit it. Picklable; crosses Ray boundaries."""

    model_config = ConfigDict(frozen=True)

    reference: str = Field(description="Non-identifying study reference.")
    report: DraftReport
    raw_text: str = Field(description="The model's exact output, kept for audit and hashing.")
    model: str = Field(description="Served model name.")
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float

    @property
    def output_sha256(self) -> str:
        return hashlib.sha256(self.raw_text.encode()).hexdigest()


def result_from_completion(
    text: str,
    *,
    reference: str,
    finish_reason: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    latency_s: float,
    max_tokens: int | None = None,
) -> DraftResult:
    """A model's completion as a validated ``DraftResult``, the same way for every backend.

    Output cut at ``max_tokens`` (finish reason ``length``) is an ``InvalidModelOutputError``
    naming the study, never a partial report; text that is not a valid report is too.
    """
    if finish_reason == "length":
        limit = f" ({max_tokens})" if max_tokens is not None else ""
        raise InvalidModelOutputError(
            f"model output for {reference} was cut at max_tokens{limit}; raise model.max_tokens"
        )
    return DraftResult(
        reference=reference,
        report=parse_report(text, reference=reference),
        raw_text=text,
        model=model,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_s=latency_s,
    )
