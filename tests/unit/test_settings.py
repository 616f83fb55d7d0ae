from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from medvlm.settings import MedvlmSettings

pytestmark = pytest.mark.unit


def test_nested_settings_come_from_prefixed_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    monkeypatch.setenv("MEDVLM_SERVING__NUM_GPUS", "1")
    monkeypatch.setenv("MEDVLM_MODEL__SOURCE", "/models/med-r1")
    settings = MedvlmSettings()
    assert settings.serving.num_gpus == 1
    assert settings.model.source == "/models/med-r1"
    assert settings.dev.workdir == tmp_path / "dev"


def test_invalid_settings_fail_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDVLM_SERVING__PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        MedvlmSettings()


def test_secrets_are_masked_when_settings_are_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDVLM_SERVING__API_KEY", "s3cr3t-value")
    settings = MedvlmSettings()
    assert "s3cr3t-value" not in settings.model_dump_json()
    assert "s3cr3t-value" not in repr(settings)
    assert settings.serving.api_key is not None
    assert settings.serving.api_key.get_secret_value() == "s3cr3t-value"


def test_every_setting_is_documented() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation)
            else:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(MedvlmSettings)
