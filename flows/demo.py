"""The demo job: draft a report for a real chest radiograph with real vLLM inside Ray Serve.

Runs on embedded defaults only: the sample radiograph from ``pydicom-data``, the tiny model
built locally (or ``MEDVLM_MODEL__SOURCE``), a private Ray on loopback. No PACS or EHR needed.
"""

from __future__ import annotations

import pydicom

from connectors.sample_data import CHEST_RADIOGRAPH, sample_file
from medvlm.settings import MedvlmSettings
from pipeline.imaging import image_to_png, instance_to_images, study_reference
from pipeline.prompts import ModelInput, StudyContext
from pipeline.report import DraftResult
from serving.app import run_app
from serving.model_source import ResolvedModel, resolve_model
from serving.ray_runtime import init_ray, shutdown_ray


def sample_model_input() -> ModelInput:
    """Model input for the bundled chest radiograph (no clinical history: none ships with it)."""
    ds = pydicom.dcmread(sample_file(CHEST_RADIOGRAPH))
    reference = study_reference(str(ds.StudyInstanceUID))
    images = instance_to_images(ds, reference=reference)
    return ModelInput(
        reference=reference,
        images_png=tuple(image_to_png(image) for image in images),
        context=StudyContext(
            modality=str(ds.Modality),
            body_part=str(ds.get("BodyPartExamined", "")) or "CHEST",
            study_description=str(ds.get("StudyDescription", "")) or None,
            indication=None,
        ),
    )


def run_demo(settings: MedvlmSettings) -> tuple[ResolvedModel, DraftResult]:
    """Serve the model, draft the sample study through a DeploymentHandle, shut down."""
    resolved = resolve_model(settings)
    model_input = sample_model_input()
    init_ray(settings.serving, bind_shim=settings.bind_shim)
    try:
        handle = run_app(settings, resolved.source)
        result: DraftResult = handle.draft.remote(model_input).result(
            timeout_s=settings.serving.request_timeout_s
        )
    finally:
        shutdown_ray()
    return resolved, result
