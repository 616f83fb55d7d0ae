"""Model input and prompt building: study images plus clinical context to chat messages.

Pure logic. The prompt carries clinical context (indication, relevant conditions, the prior
impression, modality, body part) and never a direct identifier: ``StudyContext`` has no field
for a name, MRN or birth date, so one cannot be put there by accident. Context is bounded so a
long history cannot crowd out the images.
"""

from __future__ import annotations

import base64
import json

from pydantic import BaseModel, ConfigDict, Field

from pipeline.report import report_json_schema

SYSTEM_PROMPT = (
    "You are a radiology assistant drafting a preliminary report for a radiologist to review. "
    "Describe only what the images show. Answer with one JSON object that follows the given "
    "schema: reasoning in `rationale`, one entry per assessed finding, a short impression, "
    "`critical` true only for findings needing urgent communication."
)

MAX_CONTEXT_CHARS = 2000


class StudyContext(BaseModel):
    """Clinical context of one study, free of direct identifiers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: str = Field(description="DICOM modality code, e.g. CR, CT, MR, US.")
    body_part: str | None = Field(default=None, description="DICOM Body Part Examined.")
    study_description: str | None = None
    indication: str | None = Field(default=None, description="Reason for the examination.")
    conditions: tuple[str, ...] = Field(default=(), description="Relevant active conditions.")
    prior_impression: str | None = Field(default=None, description="Latest prior impression.")


class ModelInput(BaseModel):
    """Everything the model sees for one study. Picklable; crosses Ray boundaries; in JSON
    (the HTTP report route) images travel as base64."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    reference: str = Field(description="Non-identifying study reference for logs and errors.")
    images_png: tuple[bytes, ...] = Field(min_length=1, description="PNG-encoded images.")
    context: StudyContext


def context_text(context: StudyContext, *, limit: int = MAX_CONTEXT_CHARS) -> str:
    """The clinical context as a few labelled lines, cut at ``limit`` characters."""
    lines = [f"Modality: {context.modality}"]
    if context.body_part:
        lines.append(f"Body part: {context.body_part}")
    if context.study_description:
        lines.append(f"Study: {context.study_description}")
    lines.append(f"Indication: {context.indication or 'not provided'}")
    if context.conditions:
        lines.append("Relevant conditions: " + "; ".join(context.conditions))
    if context.prior_impression:
        lines.append(f"Prior impression: {context.prior_impression}")
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_messages(model_input: ModelInput) -> list[dict[str, object]]:
    """OpenAI-style chat messages: system instructions, then images and context as one turn."""
    content: list[dict[str, object]] = [
        {"type": "image_url", "image_url": {"url": png_data_url(png)}}
        for png in model_input.images_png
    ]
    schema = json.dumps(report_json_schema(), separators=(",", ":"))
    content.append(
        {
            "type": "text",
            "text": f"{context_text(model_input.context)}\n\nJSON schema of the answer: {schema}",
        }
    )
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]
