"""A draft stored in the real Orthanc as a DICOM SR (``job.store_sr``): retrieved by WADO-RS
and parsed with highdicom, it is in the source study, references its images, says it is an
unverified AI draft and carries the findings; a re-run stores no second SR; a signed order gets
none.

The model is not under test: ``stand_in_model`` answers every study with ``STAND_IN_REPORT``
through the product's own ``HttpDrafter`` (as ``MEDVLM_JOB__MODEL_ENDPOINT=http``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.dataset import Dataset

from connectors.factory import build_image_source
from flows.draft_reports import SR_KEY
from medvlm.dev.servers import OrthancInfo
from pipeline.ledger import JobState
from pipeline.sr import AI_NOTICE, is_sr
from serving.clients import HttpDrafter
from tests.integration.folder_site import STAND_IN_REPORT, stand_in_model
from tests.integration.test_write_safety import Site, open_site

pytestmark = [pytest.mark.integration]


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path, version=lambda p: f"sr-{p}") as opened:
        yield opened


@pytest.fixture(scope="module")
def drafter() -> Iterator[HttpDrafter]:
    with stand_in_model(latency_s=0.05) as url:
        yield HttpDrafter(None, url)


def _study(site: Site, study_uid: str) -> list[Dataset]:
    """Every instance of the study, retrieved by WADO-RS."""
    source = build_image_source(site.orthanc.pacs_settings())
    try:
        return list(source.iter_instances(study_uid))
    finally:
        source.close()


def _items(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    for item in ds.get("ContentSequence", []):
        out += [item, *_items(item)]
    return out


def test_a_draft_is_stored_as_an_unverified_ai_sr_in_its_study_once(
    site: Site, drafter: HttpDrafter, tmp_path: Path
) -> None:
    study_uid = site.add()
    summary = site.run(drafter, store_sr=True)
    assert not summary.failures
    job = site.job(study_uid)
    assert job.state is JobState.WRITTEN
    assert job.fhir_ids["DiagnosticReport"]
    (sr_uid,) = job.fhir_ids[SR_KEY]

    instances = _study(site, study_uid)
    (stored,) = [ds for ds in instances if is_sr(ds)]
    images = [ds for ds in instances if not is_sr(ds)]
    sr = hd.sr.ComprehensiveSR.from_dataset(stored)
    assert sr.SOPInstanceUID == sr_uid
    assert sr.StudyInstanceUID == study_uid
    assert sr.AccessionNumber == site.accessions[0]
    assert sr.PatientID == images[0].PatientID
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == study_uid
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in images}
    items = _items(sr)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert AI_NOTICE in texts
    assert STAND_IN_REPORT.impression in texts
    (finding,) = STAND_IN_REPORT.findings
    (effusion,) = [
        i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Pleural effusion"
    ]
    assert effusion.ConceptCodeSequence[0].CodeMeaning == "Absent"
    assert finding.location in texts and finding.detail in texts

    # A second worker with an empty ledger drafts and writes the study again: the EHR
    # resources are found by their keys, the SR goes to the same instance.
    again = dataclasses.replace(site, ledger_url=f"sqlite:///{tmp_path / 'second.db'}")
    assert not again.run(drafter, store_sr=True).failures
    assert again.job(study_uid).fhir_ids[SR_KEY] == [sr_uid]
    assert [ds.SOPInstanceUID for ds in _study(site, study_uid) if is_sr(ds)] == [sr_uid]


def test_no_sr_without_the_setting_nor_on_a_signed_order(site: Site, drafter: HttpDrafter) -> None:
    plain = site.add()
    signed = site.add()
    site.sign(site.accessions[1])
    site.run(drafter)
    site.run(drafter, store_sr=True)  # nothing left to do for the first, the second is signed
    assert site.job(plain).state is JobState.WRITTEN
    assert SR_KEY not in site.job(plain).fhir_ids
    assert site.job(signed).state is JobState.SKIPPED
    for study_uid in (plain, signed):
        assert not [ds for ds in _study(site, study_uid) if is_sr(ds)]
