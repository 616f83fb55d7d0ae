"""The random-weight test model runs only where it is asked for, and its drafts say so."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvlm.cli import app
from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings
from pipeline.fhir_resources import (
    RANDOM_WEIGHTS_NOTICE,
    ModelIdentity,
    StudyLinks,
    build_device,
    build_draft_resources,
)
from pipeline.report import DraftReport
from serving.model_source import resolve_model
from tests.flow_doubles import VALID_REPORT

pytestmark = pytest.mark.unit


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home with no MEDVLM_* settings but the home itself."""
    import os

    for name in list(os.environ):
        if name.startswith("MEDVLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("command", [["run", "--since", "2026-11-01"], ["serve"]])
def test_commands_against_a_hospital_refuse_to_start_without_a_model_source(
    clean_env: Path, command: list[str]
) -> None:
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    assert "MEDVLM_MODEL__SOURCE is not set" in " ".join(result.output.split())
    assert not (clean_env / "models").exists()  # no random checkpoint was even built
    assert "Traceback" not in result.output


def test_the_tiny_checkpoint_named_as_source_is_refused_too(tiny_model_dir: Path) -> None:
    settings = MedvlmSettings(model={"source": str(tiny_model_dir)})
    with pytest.raises(ConfigurationError, match="random-weight test model"):
        resolve_model(settings)
    allowed = MedvlmSettings(model={"source": str(tiny_model_dir), "allow_random_weights": True})
    assert resolve_model(allowed).random_weights is True


def test_a_real_checkpoint_path_is_not_taken_for_random_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"not really weights")
    resolved = resolve_model(MedvlmSettings(model={"source": str(tmp_path), "version": "v7"}))
    assert (resolved.random_weights, resolved.version) == (False, "v7")


def test_a_draft_from_random_weights_says_so_in_its_device_and_text() -> None:
    report = DraftReport.model_validate(VALID_REPORT)
    links = StudyLinks(accession_number="ACC-1", patient="Patient/1")
    model = ModelIdentity("tiny-qwen2_vl", "tiny-1", random_weights=True)
    import datetime as dt

    issued = dt.datetime(2026, 11, 2, tzinfo=dt.UTC)
    draft = build_draft_resources(report, links, model, device="Device/d", issued=issued)
    device = build_device(model)
    assert RANDOM_WEIGHTS_NOTICE in device["type"]["text"]
    assert device["note"][0]["text"] == RANDOM_WEIGHTS_NOTICE
    text = base64.b64decode(draft.main.resource["presentedForm"][0]["data"]).decode()
    assert text.splitlines()[0] == RANDOM_WEIGHTS_NOTICE
    real = ModelIdentity("med-r1", "1.0")
    real_bundle = [
        build_device(real),
        *build_draft_resources(report, links, real, device="Device/d", issued=issued).resources,
    ]
    assert RANDOM_WEIGHTS_NOTICE not in str(real_bundle)
