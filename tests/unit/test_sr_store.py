"""``job.store_sr`` in the main flow, fast (folder PACS, NDJSON EHR, SQLite ledger): the SR is
stored after the EHR write and recorded; a refused store fails the job at the write stage, is
retried without a second EHR draft; a PACS connector that cannot store says so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from connectors.dicom_folder import DicomFolderSource
from connectors.pacs import StoreResult, StudyQuery
from flows.draft_reports import SR_KEY, run_draft_job
from pipeline.ledger import JobState
from pipeline.sr import is_sr, sr_uids
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import STUDY_DATE, World

pytestmark = pytest.mark.unit


class StoringFolder(DicomFolderSource):
    """A folder PACS with STOW: keeps what it is given; refuses the first ``refuse`` stores."""

    def __init__(self, root: Path, refuse: int = 0) -> None:
        super().__init__(root)
        self.stored: list[Dataset] = []
        self.refuse = refuse

    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        if self.refuse:
            self.refuse -= 1
            return StoreResult(stored=(), failed=tuple((d.SOPInstanceUID, 272) for d in datasets))
        self.stored += datasets
        return StoreResult(stored=tuple(d.SOPInstanceUID for d in datasets), failed=())


def _run(world: World, source: DicomFolderSource, **job: object) -> None:
    services = world.services(ScriptedDrafter(), **job)
    services.source = source
    run_draft_job(services, StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE), False)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_the_sr_is_stored_after_the_ehr_write_and_recorded(world: World) -> None:
    case = world.add()
    pacs = StoringFolder(world.root / "dicom")
    _run(world, pacs, store_sr=True)
    job = world.job(case)
    assert job.state is JobState.WRITTEN and job.draft_id
    (sr,) = pacs.stored
    assert is_sr(sr) and sr.StudyInstanceUID == case.study_uid
    assert job.fhir_ids[SR_KEY] == [sr_uids(job.draft_id).instance] == [sr.SOPInstanceUID]
    assert len(world.drafts()) == 1


def test_without_the_setting_nothing_is_stored(world: World) -> None:
    case = world.add()
    pacs = StoringFolder(world.root / "dicom")
    _run(world, pacs)
    assert world.job(case).state is JobState.WRITTEN and pacs.stored == []
    assert SR_KEY not in world.job(case).fhir_ids


def test_a_refused_sr_fails_the_write_and_is_retried_without_a_second_ehr_draft(
    world: World,
) -> None:
    case = world.add()
    pacs = StoringFolder(world.root / "dicom", refuse=1)
    _run(world, pacs, store_sr=True)
    job = world.job(case)
    assert job.state is JobState.FAILED and job.failed_stage is JobState.WRITING
    assert "refused the draft SR (failure 272)" in (job.reason or "")
    assert len(world.drafts()) == 1  # the EHR draft stays
    _run(world, pacs, store_sr=True)
    job = world.job(case)
    assert job.state is JobState.WRITTEN and len(pacs.stored) == 1
    assert len(world.drafts()) == 1 and len(world.drafts("Provenance")) == 1


def test_a_pacs_connector_that_cannot_store_is_named_in_the_failure(world: World) -> None:
    case = world.add()
    _run(world, DicomFolderSource(world.root / "dicom"), store_sr=True)
    job = world.job(case)
    assert job.state is JobState.FAILED
    assert "cannot store instances" in (job.reason or "")
    assert len(world.drafts()) == 1
