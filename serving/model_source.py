"""Where the model's weights come from, resolved once before serving starts.

A configured ``model.source`` (checkpoint directory or hub id) is used as given: that is the
production path, and the only one: a missing source is a ``ConfigurationError`` at start-up, so
random weights can never draft for patients by default. The project's tiny random-weight
checkpoint (recognised by its ``medvlm_tiny.json`` marker, whatever its path) runs only with
``model.allow_random_weights``; the development tooling (``medvlm.dev.tiny_model.
with_tiny_checkpoint``: ``medvlm demo``, ``draft-one``, the tests) builds it and names it as the
source. Both go through the same engine code. This module never imports the dev tooling.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings

#: Written by the tiny-checkpoint builder (medvlm.dev.tiny_model) into each checkpoint it builds.
MARKER_FILE: Final = "medvlm_tiny.json"
_HASH_CHUNK: Final = 1 << 20

NO_SOURCE = (
    "MEDVLM_MODEL__SOURCE is not set: name the checkpoint directory or hub id of the model "
    "(e.g. a local Med-R1 or MedGemma checkpoint). The random-weight test model runs only in "
    "`medvlm demo` and `medvlm draft-one`, or with MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS=true for "
    "development (medvlm-pipeline[dev]): its drafts carry no meaning."
)


def weights_sha256(checkpoint_dir: Path) -> str:
    """SHA-256 over the bytes of the ``*.safetensors`` files of a checkpoint, in sorted name order.

    Works for any Hugging Face checkpoint directory, sharded or not. For a single-file checkpoint
    it equals ``sha256sum model.safetensors`` (and the hub's LFS object id of that file).
    """
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ConfigurationError(f"no *.safetensors weights in model directory {checkpoint_dir}")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def read_marker(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The ``medvlm_tiny.json`` marker of a tiny checkpoint, or None for any other directory."""
    try:
        marker = json.loads((checkpoint_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


@dataclass(frozen=True)
class ResolvedModel:
    """The model a deployment loads, and the version label recorded with every draft.

    ``random_weights``: the project's tiny random-weight checkpoint (development and tests).
    """

    source: str
    version: str
    random_weights: bool


def resolve_model(settings: MedvlmSettings) -> ResolvedModel:
    """The model ``settings`` name, checked: a source is required, and the project's
    random-weight checkpoint (recognised by its marker) only with ``allow_random_weights``."""
    model = settings.model
    if model.source is None:
        raise ConfigurationError(NO_SOURCE)
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
