"""Where the model's weights come from, resolved once before serving starts.

A configured ``model.source`` (checkpoint directory or hub id) is used as given: that is the
production path. The project's tiny random-weight checkpoint (built when ``source`` is unset, or
recognised by its ``medvlm_tiny.json`` marker when ``source`` names it) runs only where it is
asked for: ``model.allow_random_weights``, which ``medvlm demo``, ``draft-one`` and the tests
turn on. Everywhere else — ``medvlm run``, ``serve``, the deployments against a real PACS and
EHR — a missing source is a ``ConfigurationError`` at start-up, so random weights can never
draft for patients by default. Both paths go through the same engine code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings

NO_SOURCE = (
    "MEDVLM_MODEL__SOURCE is not set: name the checkpoint directory or hub id of the model "
    "(e.g. a local Med-R1 or MedGemma checkpoint). The random-weight test model runs only in "
    "`medvlm demo` and `medvlm draft-one`, or with MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS=true for "
    "development: its drafts carry no meaning."
)


@dataclass(frozen=True)
class ResolvedModel:
    """The model a deployment loads, and the version label recorded with every draft.

    ``random_weights``: the project's tiny random-weight checkpoint (development and tests).
    """

    source: str
    version: str
    random_weights: bool


def resolve_model(settings: MedvlmSettings) -> ResolvedModel:
    from serving.tiny_model import build_tiny_checkpoint, read_marker, weights_sha256

    model = settings.model
    if model.source is None:
        if not model.allow_random_weights:
            raise ConfigurationError(NO_SOURCE)
        path = build_tiny_checkpoint(
            settings.models_dir / f"tiny-{model.tiny_architecture}",
            architecture=model.tiny_architecture,
            seed=0,
        )
        version = model.version or f"tiny-{model.tiny_architecture}-{weights_sha256(path)[:12]}"
        return ResolvedModel(source=str(path), version=version, random_weights=True)
    local = Path(model.source)
    random_weights = local.is_dir() and read_marker(local) is not None
    if random_weights and not model.allow_random_weights:
        raise ConfigurationError(
            f"MEDVLM_MODEL__SOURCE names the project's random-weight test model ({local.name}); "
            "it runs only with MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS=true (development and tests)"
        )
    if model.version:
        version = model.version
    elif local.is_dir():
        version = f"{local.name}-{weights_sha256(local)[:12]}"
    else:
        version = model.source
    return ResolvedModel(source=model.source, version=version, random_weights=random_weights)
