"""The demo: the main job on a sample cohort, with real servers or folders, and the tiny model.

``medvlm demo`` starts the local Orthanc and FHIR server (``medvlm dev up``), loads the sample
cohort (the real chest radiograph from ``pydicom-data`` plus generated CR, CT and US studies,
with synthetic Patients, ServiceRequests, Conditions and prior reports), runs ``draft_reports``
with the model served in-process by Ray Serve + vLLM, and leaves the servers up so the drafts
can be read. ``--folders`` does the same on the embedded folder sources, without servers.
``run_demo`` (one draft for the radiograph through a DeploymentHandle) is the quick check.
"""

from __future__ import annotations

import pydicom

from connectors.factory import build_ehr, build_image_source
from medvlm.dev.sample_cohort import SampleCase, sample_cohort
from medvlm.dev.sample_data import CHEST_RADIOGRAPH, sample_file
from medvlm.dev.tiny_model import with_tiny_checkpoint
from medvlm.settings import MedvlmSettings
from pipeline.imaging import image_to_png, instance_to_images, study_reference
from pipeline.prompts import ModelInput, StudyContext
from pipeline.report import DraftResult
from serving.app import start_model_service
from serving.model_source import ResolvedModel, resolve_model
from serving.ray_runtime import shutdown_ray


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


def with_random_weights(settings: MedvlmSettings) -> MedvlmSettings:
    """``settings`` allowing the tiny random-weight model, and naming it when no model source is
    set: what the demo and draft-one ask for."""
    model = settings.model.model_copy(update={"allow_random_weights": True})
    return with_tiny_checkpoint(settings.model_copy(update={"model": model}))


def run_demo(settings: MedvlmSettings) -> tuple[ResolvedModel, DraftResult]:
    """Serve the model, draft the sample study through a DeploymentHandle, shut down.

    Without ``MEDVLM_MODEL__SOURCE`` this is the tiny random-weight model (``draft-one`` is a
    check of the machinery); with it, the configured model.
    """
    settings = with_random_weights(settings)
    resolved = resolve_model(settings)
    model_input = sample_model_input()
    handle = start_model_service(settings, resolved.source)
    try:
        result: DraftResult = handle.draft.remote(model_input).result(
            timeout_s=settings.serving.request_timeout_s
        )
    finally:
        shutdown_ray()
    return resolved, result


def demo_settings(settings: MedvlmSettings, *, use_servers: bool) -> MedvlmSettings:
    """The demo's settings: the dev servers (or folders under HOME/demo), a demo ledger, and
    the model served in-process."""
    from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM
    from medvlm.dev.servers import DevServers, dev_settings_from

    demo_home = settings.home / "demo"
    settings = with_random_weights(settings)
    update: dict[str, object] = {
        "job": settings.job.model_copy(
            update={"model_endpoint": "local", "ledger_url": f"sqlite:///{demo_home / 'ledger.db'}"}
        ),
    }
    ehr_common = {"accession_system": ACCESSION_SYSTEM, "patient_identifier_system": MRN_SYSTEM}
    if use_servers:
        servers = DevServers(dev_settings_from(settings))
        servers.up()
        orthanc, fhir = servers.orthanc, servers.fhir
        update["pacs"] = orthanc.pacs_settings()
        update["ehr"] = settings.ehr.model_copy(
            update={"kind": "fhir", "base_url": fhir.base_url, **ehr_common}
        )
    else:
        update["pacs"] = settings.pacs.model_copy(
            update={"kind": "folder", "folder": demo_home / "dicom"}
        )
        update["ehr"] = settings.ehr.model_copy(
            update={"kind": "folder", "folder": demo_home / "ehr", **ehr_common}
        )
    return settings.model_copy(update=update)


def load_sample_cohort(settings: MedvlmSettings) -> list[SampleCase]:
    """Put the sample studies into the configured PACS and their records into the EHR."""
    from fhir.resources.R4B.bundle import Bundle

    chest = pydicom.dcmread(sample_file(CHEST_RADIOGRAPH))
    cases = sample_cohort(chest)
    if settings.pacs.kind == "folder":
        assert settings.pacs.folder is not None
        for case in cases:
            for ds in case.datasets:
                path = settings.pacs.folder / case.study_uid / f"{ds.SOPInstanceUID}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
    else:
        from connectors.dicomweb import DicomWebSource

        source = build_image_source(settings.pacs)
        try:
            assert isinstance(source, DicomWebSource)
            for case in cases:
                source.store(case.datasets)
        finally:
            source.close()
    ehr = build_ehr(settings.ehr)
    try:
        for case in cases:
            if case.bundle is not None:
                ehr.transaction(Bundle.model_validate(case.bundle))
    finally:
        close = getattr(ehr, "close", None)
        if close is not None:
            close()
    return cases
