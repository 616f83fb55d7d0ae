"""Where the model's weights come from, resolved once before serving starts.

A configured ``model.source`` (checkpoint directory or hub id) is used as given: that is the
production path. Without one, the tiny random-weight checkpoint is built under MEDVLM_HOME, so a
fresh machine can run the whole pipeline offline. Both go through the same engine code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medvlm.settings import MedvlmSettings


@dataclass(frozen=True)
class ResolvedModel:
    """The model a deployment loads, and the version label recorded with every draft."""

    source: str
    version: str
    is_tiny: bool


def resolve_model(settings: MedvlmSettings) -> ResolvedModel:
    from serving.tiny_model import build_tiny_checkpoint, weights_sha256

    model = settings.model
    if model.source is None:
        path = build_tiny_checkpoint(
            settings.models_dir / f"tiny-{model.tiny_architecture}",
            architecture=model.tiny_architecture,
            seed=0,
        )
        version = model.version or f"tiny-{model.tiny_architecture}-{weights_sha256(path)[:12]}"
        return ResolvedModel(source=str(path), version=version, is_tiny=True)
    local = Path(model.source)
    if model.version:
        version = model.version
    elif local.is_dir():
        version = f"{local.name}-{weights_sha256(local)[:12]}"
    else:
        version = model.source
    return ResolvedModel(source=model.source, version=version, is_tiny=False)
