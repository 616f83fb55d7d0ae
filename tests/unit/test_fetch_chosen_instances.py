"""Only what the model sees is read: headers first, then the chosen instances (folder source).

A 200-slice CT in a DICOM folder: ``instance_headers`` carries no pixel data, the reportable
selection (burned-in check included) works on it, and ``load_model_images`` reads exactly the
files of the chosen slices, giving the PNGs the whole-study path gave.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from connectors.dicom_folder import DicomFolderSource
from flows.study_images import load_model_images
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import ImagingError, PacsNotFoundError
from pipeline.imaging import (
    PixelBudget,
    choose_images,
    image_to_png,
    study_images,
    study_reference,
)
from pipeline.reportable import select_reportable

pytestmark = pytest.mark.unit

SLICES = 200


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Dataset]]:
    root = tmp_path_factory.mktemp("ct200")
    study = make_study("CT", instances_per_series=SLICES, rows=256, columns=256, seed=5)
    study[17].BurnedInAnnotation = "YES"
    for i, ds in enumerate(reversed(study)):  # file order is not slice order
        ds.save_as(root / f"f{i:04d}.dcm", enforce_file_format=True)
    return root, study


class _FullReads:
    """Counts the full (pixel data) reads of pydicom.dcmread; header reads are not counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sop_uids: list[str] = []
        real = pydicom.dcmread

        def dcmread(path: Any, *args: Any, **kwargs: Any) -> Dataset:
            ds = real(path, *args, **kwargs)
            if not kwargs.get("stop_before_pixels"):
                self.sop_uids.append(str(ds.SOPInstanceUID))
            return ds

        monkeypatch.setattr(pydicom, "dcmread", dcmread)


def test_headers_carry_no_pixel_data_and_serve_the_reportable_selection(
    ct_folder: tuple[Path, list[Dataset]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, study = ct_folder
    src = DicomFolderSource(root)
    reads = _FullReads(monkeypatch)
    headers = src.instance_headers(str(study[0].StudyInstanceUID))
    assert len(headers) == SLICES
    assert not any("PixelData" in h for h in headers)
    assert [int(h.InstanceNumber) for h in headers] == list(range(1, SLICES + 1))
    reportable = select_reportable(headers)
    assert len(reportable.instances) == SLICES
    assert reportable.burned_in_annotation  # BurnedInAnnotation is read from the header
    assert reads.sop_uids == []


def test_only_the_chosen_slices_are_read_and_the_images_are_those_of_the_whole_study_path(
    ct_folder: tuple[Path, list[Dataset]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, study = ct_folder
    study_uid = str(study[0].StudyInstanceUID)
    src = DicomFolderSource(root)
    headers = src.instance_headers(study_uid)
    series = {str(study[0].SeriesInstanceUID): headers}
    chosen = [p.sop_instance_uid for p in choose_images(series, reference="s", max_images=4)]

    reads = _FullReads(monkeypatch)
    tracemalloc.start()
    try:
        pngs = load_model_images(
            src, study_uid, headers, reference="s", max_images=4, max_side=1024
        ).pngs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reads.sop_uids == chosen
    assert len(pngs) == 4
    one_slice = 256 * 256 * 2
    assert peak < SLICES * one_slice // 5  # a few slices, never the study

    monkeypatch.undo()
    whole = list(src.iter_instances(study_uid))
    expected = study_images(
        {str(study[0].SeriesInstanceUID): whole},
        reference="s",
        max_images=4,
        budget=PixelBudget(max_side=1024),
    )
    assert pngs == [image_to_png(image) for image in expected]


def test_retrieve_instances_keeps_the_order_given_and_names_the_study_on_a_missing_one(
    ct_folder: tuple[Path, list[Dataset]],
) -> None:
    root, study = ct_folder
    study_uid = str(study[0].StudyInstanceUID)
    src = DicomFolderSource(root)
    headers = src.instance_headers(study_uid)
    asked = [headers[150], headers[3], headers[77]]
    got = src.retrieve_instances(study_uid, asked)
    assert [str(ds.SOPInstanceUID) for ds in got] == [str(h.SOPInstanceUID) for h in asked]
    assert all("PixelData" in ds for ds in got)

    ghost = Dataset()
    ghost.SOPInstanceUID = "1.2.3.4.5"
    ghost.SeriesInstanceUID = str(study[0].SeriesInstanceUID)
    with pytest.raises(PacsNotFoundError, match=study_reference(study_uid)) as caught:
        src.retrieve_instances(study_uid, [headers[0], ghost])
    assert "SYN-" not in str(caught.value)  # no patient identifier in the message


def _truncate(path: Path) -> None:
    """Cut a file inside its Pixel Data, as an interrupted transfer leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])


def test_a_broken_chosen_instance_is_replaced_by_another_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two of the four chosen slices are truncated on disk (both the read and the decode can
    fail): the study is still drafted, from four slices that decode, and the two are named
    (by SOP Instance UID) with a reason naming the study, never the patient."""
    study = make_study("CT", instances_per_series=20, rows=64, columns=64, seed=11)
    paths = {}
    for i, ds in enumerate(study):
        paths[str(ds.SOPInstanceUID)] = path = tmp_path / f"f{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
    study_uid = str(study[0].StudyInstanceUID)
    src = DicomFolderSource(tmp_path)
    headers = src.instance_headers(study_uid)
    series = {str(study[0].SeriesInstanceUID): headers}
    first_choice = [p.sop_instance_uid for p in choose_images(series, reference="s", max_images=4)]
    broken = first_choice[1:3]
    for uid in broken:
        _truncate(paths[uid])

    reads = _FullReads(monkeypatch)
    images = load_model_images(
        src, study_uid, headers, reference=study_reference(study_uid), max_images=4, max_side=64
    )
    assert len(images.pngs) == 4
    assert set(images.unusable) == set(broken)
    assert all(reason.startswith(study_reference(study_uid)) for reason in images.unusable.values())
    assert not any("SYN-" in reason for reason in images.unusable.values())
    # Each says why it failed (the read or the decode), not only that it is missing.
    assert not any("not retrieved" in reason for reason in images.unusable.values())
    assert not set(broken) & set(reads.sop_uids[-4:])  # the last choice avoided them


def test_a_study_whose_every_instance_is_broken_fails_naming_it(tmp_path: Path) -> None:
    study = make_study("CT", instances_per_series=3, rows=64, columns=64, seed=12)
    for i, ds in enumerate(study):
        ds.save_as(tmp_path / f"f{i}.dcm", enforce_file_format=True)
        _truncate(tmp_path / f"f{i}.dcm")
    study_uid = str(study[0].StudyInstanceUID)
    src = DicomFolderSource(tmp_path)
    ref = study_reference(study_uid)
    with pytest.raises(ImagingError, match=rf"^{ref}: .*\(and 2 more unusable instance\(s\)\)$"):
        load_model_images(
            src,
            study_uid,
            src.instance_headers(study_uid),
            reference=ref,
            max_images=4,
            max_side=64,
        )
