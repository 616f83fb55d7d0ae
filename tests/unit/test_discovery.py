"""New-study discovery through the ledger's watermark, on the real DICOM folder source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from connectors.dicom_folder import DicomFolderSource
from connectors.ledger_store import LedgerStore, open_engine
from connectors.ndjson import NdjsonEhr
from flows.draft_reports import Services, discover
from medvlm.dev.synthetic_dicom import make_study
from medvlm.settings import JobSettings
from pipeline.fhir_resources import ModelIdentity

pytestmark = pytest.mark.unit


def _write(folder: Path, datasets: list[Dataset]) -> str:
    for ds in datasets:
        path = folder / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return str(datasets[0].StudyInstanceUID)


class _NeverCalled:
    """Discovery must not draft: a drafter that fails the test if used."""

    async def draft(self, model_input: Any) -> Any:
        raise AssertionError("discovery drafted something")

    async def aclose(self) -> None:
        return None


def test_watermark_discovery_registers_only_new_studies(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    first = _write(dicom, make_study("CR", seed=1, accession="ACC-W-1"))
    services = Services(
        source=DicomFolderSource(dicom),
        ehr=NdjsonEhr(tmp_path / "ehr"),
        drafter=_NeverCalled(),
        ledger=LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}")),
        model=ModelIdentity(name="m", version="v1"),
        job=JobSettings(),
        source_name="folder:test",
    )
    assert [s.study_uid for s in discover(services, None)] == [first]
    assert services.ledger.watermark("folder:test") is not None
    assert discover(services, None) == []
    second = _write(dicom, make_study("CT", seed=2, accession="ACC-W-2", study_date="20240116"))
    assert [s.study_uid for s in discover(services, None)] == [second]
    assert sorted(j.study_uid for j in services.ledger.jobs("v1")) == sorted([first, second])
