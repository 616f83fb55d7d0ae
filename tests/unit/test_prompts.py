from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from pipeline.prompts import (
    MAX_CONTEXT_CHARS,
    ModelInput,
    StudyContext,
    build_messages,
    context_text,
)

pytestmark = pytest.mark.unit


def test_study_context_has_no_place_for_direct_identifiers() -> None:
    with pytest.raises(ValidationError):
        StudyContext(modality="CR", patient_name="Doe^Jane")  # type: ignore[call-arg]


def test_messages_carry_every_image_and_the_context() -> None:
    model_input = ModelInput(
        reference="study-1",
        images_png=(b"\x89PNG-a", b"\x89PNG-b"),
        context=StudyContext(modality="CT", indication="Cough", conditions=("Asthma",)),
    )
    system, user = build_messages(model_input)
    assert system["role"] == "system"
    parts = user["content"]
    assert isinstance(parts, list)
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "Indication: Cough" in parts[2]["text"] and "Asthma" in parts[2]["text"]


def test_context_is_bounded() -> None:
    context = StudyContext(modality="CR", prior_impression="x" * 10_000)
    assert len(context_text(context)) == MAX_CONTEXT_CHARS


def test_model_input_round_trips_through_json_with_binary_images() -> None:
    model_input = ModelInput(
        reference="study-1", images_png=(bytes(range(256)),), context=StudyContext(modality="US")
    )
    again = ModelInput.model_validate_json(model_input.model_dump_json())
    assert again == model_input
    assert json.loads(model_input.model_dump_json())["images_png"][0].startswith("AAECAw")
