"""Only what the model sees is fetched, against the session's real Orthanc (DICOMweb and DIMSE).

Headers come first (WADO-RS RetrieveStudyMetadata; C-FIND at IMAGE level), without pixel data;
the model's slices and frames are chosen from them; only the chosen instances are retrieved
(WADO-RS RetrieveInstance; C-GET/C-MOVE at IMAGE level with their SOP Instance UIDs). The
images are those the whole-study path gives. Studies are synthetic, on their own StudyDates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter

from connectors.dicomweb import DicomWebSource, build_session
from connectors.dimse import DimseSource
from connectors.factory import build_image_source
from connectors.pacs import ImageSource, sort_instances
from flows.study_images import load_model_images
from medvlm.dev.servers import DevServers, OrthancInfo
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import PacsNotFoundError
from pipeline.imaging import (
    PixelBudget,
    choose_images,
    image_to_png,
    study_images,
    study_reference,
)
from pipeline.reportable import select_reportable
from tests.conftest import dimse_pacs_settings

pytestmark = pytest.mark.integration

MAX_IMAGES = 4


class _RecordingAdapter(HTTPAdapter):
    """Records the path of every request the source sends (test only; paths carry UIDs)."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.paths.append(requests.utils.urlparse(request.url).path)  # type: ignore[arg-type]
        return super().send(request, *args, **kwargs)


@pytest.fixture(scope="module")
def studies(orthanc: OrthancInfo) -> dict[str, list[Dataset]]:
    """A CT of 2 x 30 slices and a US cine, stored with STOW-RS."""
    made = {
        "CT": make_study("CT", series=2, instances_per_series=30, study_date="19870404", seed=701),
        "US": make_study("US", study_date="19870405", accession="CHOSEN-US", seed=702),
    }
    stow = build_image_source(orthanc.pacs_settings())
    assert isinstance(stow, DicomWebSource)
    try:
        for datasets in made.values():
            assert stow.store(datasets).failed == ()
    finally:
        stow.close()
    return made


@pytest.fixture
def recorded_dicomweb(orthanc: OrthancInfo) -> Iterator[tuple[DicomWebSource, _RecordingAdapter]]:
    settings = orthanc.pacs_settings(retry_attempts=2)
    session = build_session(settings)
    adapter = _RecordingAdapter()
    session.mount("http://", adapter)
    src = DicomWebSource.from_settings(settings, session=session)
    try:
        yield src, adapter
    finally:
        session.close()


def _whole_study_pngs(source: ImageSource, study_uid: str) -> list[bytes]:
    """The PNGs of the path before headers-first fetching: every instance, then study_images
    (series in SeriesNumber order, as from headers; a PACS streams them in any order)."""
    by_series: dict[str, list[Dataset]] = {}
    for ds in sort_instances(list(source.iter_instances(study_uid))):
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    images = study_images(
        {uid: sort_instances(instances) for uid, instances in by_series.items()},
        reference="s",
        max_images=MAX_IMAGES,
        budget=PixelBudget(max_side=1024),
    )
    return [image_to_png(image) for image in images]


def _chosen(headers: list[Dataset]) -> list[str]:
    by_series: dict[str, list[Dataset]] = {}
    for header in headers:
        by_series.setdefault(str(header.SeriesInstanceUID), []).append(header)
    picks = choose_images(
        {uid: sort_instances(hs) for uid, hs in by_series.items()},
        reference="s",
        max_images=MAX_IMAGES,
    )
    return [p.sop_instance_uid for p in picks]


def _check_headers(headers: list[Dataset], sent: list[Dataset]) -> None:
    assert sorted(str(h.SOPInstanceUID) for h in headers) == sorted(
        str(ds.SOPInstanceUID) for ds in sent
    )
    assert not any("PixelData" in h for h in headers)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sent}
    for header in headers:
        original = by_uid[str(header.SOPInstanceUID)]
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPClassUID",
            "Modality",
            "InstanceNumber",
            "PatientID",
            "StudyDate",
            "AccessionNumber",
        ):
            assert str(header.get(keyword)) == str(original.get(keyword)), keyword
    reportable = select_reportable(headers)
    assert len(reportable.instances) == len(sent)
    assert not reportable.burned_in_annotation


@pytest.mark.parametrize("modality", ["CT", "US"])
def test_dicomweb_fetches_metadata_then_only_the_chosen_instances(
    recorded_dicomweb: tuple[DicomWebSource, _RecordingAdapter],
    studies: dict[str, list[Dataset]],
    modality: str,
) -> None:
    src, adapter = recorded_dicomweb
    sent = studies[modality]
    study_uid = str(sent[0].StudyInstanceUID)

    headers = src.instance_headers(study_uid)
    _check_headers(headers, sent)
    if modality == "US":
        assert int(headers[0].NumberOfFrames) == int(sent[0].NumberOfFrames)
    else:
        assert all(len(h.ImagePositionPatient) == 3 for h in headers)
    assert adapter.paths == [f"/dicom-web/studies/{study_uid}/metadata"]

    chosen = _chosen(headers)
    adapter.paths.clear()
    pngs = load_model_images(
        src, study_uid, headers, reference="s", max_images=MAX_IMAGES, max_side=1024
    ).pngs
    assert [p.rsplit("/", 1)[-1] for p in adapter.paths] == chosen
    assert all("/instances/" in p and "/frames" not in p for p in adapter.paths)
    assert pngs == _whole_study_pngs(src, study_uid)


def test_dicomweb_names_the_study_when_a_chosen_instance_is_gone(
    recorded_dicomweb: tuple[DicomWebSource, _RecordingAdapter],
    studies: dict[str, list[Dataset]],
) -> None:
    src, _ = recorded_dicomweb
    study_uid = str(studies["US"][0].StudyInstanceUID)
    ghost = Dataset()
    ghost.SeriesInstanceUID = str(studies["US"][0].SeriesInstanceUID)
    ghost.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.999999"
    with pytest.raises(PacsNotFoundError, match=study_reference(study_uid)):
        src.retrieve_instances(study_uid, [ghost])


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_dimse_finds_headers_then_retrieves_only_the_chosen_instances(
    orthanc: OrthancInfo,
    dev_servers: DevServers,
    studies: dict[str, list[Dataset]],
    monkeypatch: pytest.MonkeyPatch,
    retrieve: str,
) -> None:
    src = build_image_source(dimse_pacs_settings(orthanc, dev_servers, dimse_retrieve=retrieve))
    assert isinstance(src, DimseSource)
    try:
        sent = studies["CT"]
        study_uid = str(sent[0].StudyInstanceUID)
        headers = src.instance_headers(study_uid)
        _check_headers(headers, sent)
        assert all(len(h.ImagePositionPatient) == 3 for h in headers)
        chosen = _chosen(headers)

        asked: list[tuple[str, list[str], int]] = []
        operation = "get" if retrieve == "get" else "move"
        real: Callable[..., Any] = getattr(src.client, operation)

        def spy(ident: Dataset, *args: Any) -> Any:
            result = real(ident, *args)
            uids = ident.SOPInstanceUID
            asked.append(
                (
                    str(ident.QueryRetrieveLevel),
                    [uids] if isinstance(uids, str) else [str(u) for u in uids],
                    result.completed,
                )
            )
            return result

        monkeypatch.setattr(src.client, operation, spy)
        pngs = load_model_images(
            src, study_uid, headers, reference="s", max_images=MAX_IMAGES, max_side=1024
        ).pngs
        monkeypatch.undo()
        # one IMAGE-level operation per series, each moving exactly its chosen instances
        assert [level for level, _, _ in asked] == ["IMAGE", "IMAGE"]
        assert [uid for _, uids, _ in asked for uid in uids] == chosen
        assert sum(completed for _, _, completed in asked) == MAX_IMAGES
        assert pngs == _whole_study_pngs(src, study_uid)
    finally:
        src.close()
