"""DICOM folder image source: plain files (recursive) and a DICOMDIR, indexed from headers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from connectors.dicom_folder import DicomFolderSource
from connectors.factory import build_image_source
from connectors.pacs import ImageSource, StudyQuery
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import InvalidDicomError, PacsNotFoundError
from medvlm.settings import PacsSettings
from pipeline.imaging import study_reference

pytestmark = pytest.mark.unit


def _write(root: Path, study: list[Dataset], sub: str) -> list[Path]:
    folder = root / sub
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(study):
        path = folder / f"im{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, list[Dataset]]]:
    studies = {
        "CT": make_study("CT", series=2, instances_per_series=3, study_date="20240110", seed=1),
        "CR": make_study("CR", study_date="20240111", accession="ACC-CR", seed=2),
        "US": make_study("US", study_date="20240112", seed=3),
    }
    for name, study in studies.items():
        _write(tmp_path, study, f"deep/{name.lower()}/nested")
    (tmp_path / "README.txt").write_text("not dicom")
    return tmp_path, studies


def test_folder_source_is_built_from_settings_and_satisfies_protocol(tmp_path: Path) -> None:
    src = build_image_source(PacsSettings(kind="folder", folder=tmp_path))
    assert isinstance(src, DicomFolderSource)
    assert isinstance(src, ImageSource)


def test_finds_every_study_in_nested_folders_and_skips_other_files(
    folder: tuple[Path, dict[str, list[Dataset]]],
) -> None:
    root, studies = folder
    src = DicomFolderSource(root)
    found = {s.study_uid: s for s in src.find_studies(StudyQuery())}
    assert set(found) == {str(st[0].StudyInstanceUID) for st in studies.values()}
    assert src.skipped == 1
    ct = found[str(studies["CT"][0].StudyInstanceUID)]
    assert (ct.modalities, ct.number_of_series, ct.number_of_instances) == ({"CT"}, 2, 6)


def test_query_filters_by_date_modality_accession_and_pages(
    folder: tuple[Path, dict[str, list[Dataset]]],
) -> None:
    root, studies = folder
    src = DicomFolderSource(root)
    window = StudyQuery(date_from=dt.date(2024, 1, 11), date_to=dt.date(2024, 1, 12))
    assert {s.modalities for s in src.find_studies(window)} == {
        frozenset({"CR"}),
        frozenset({"US"}),
    }
    [cr] = src.find_studies(StudyQuery(accession_number="ACC-CR"))
    assert cr.study_uid == str(studies["CR"][0].StudyInstanceUID)
    assert list(src.find_studies(StudyQuery(modalities=frozenset({"MR"})))) == []
    ordered = [s.study_uid for s in src.find_studies(StudyQuery())]
    assert [s.study_uid for s in src.find_studies(StudyQuery(offset=1, limit=1))] == ordered[1:2]


def test_headers_are_indexed_without_pixel_data(
    folder: tuple[Path, dict[str, list[Dataset]]],
) -> None:
    root, _ = folder
    src = DicomFolderSource(root)
    list(src.find_studies(StudyQuery()))
    assert src._entries and all("PixelData" not in e.header for e in src._entries.values())


def test_series_instances_and_pixels_come_back_in_order(
    folder: tuple[Path, dict[str, list[Dataset]]],
) -> None:
    root, studies = folder
    src = DicomFolderSource(root)
    sent = studies["CT"]
    study_uid = str(sent[0].StudyInstanceUID)
    series = src.list_series(study_uid)
    assert [s.series_number for s in series] == [1, 2]
    assert [i.instance_number for i in src.list_instances(study_uid, series[1].series_uid)] == [
        1,
        2,
        3,
    ]
    got = list(src.iter_instances(study_uid))
    assert [(int(d.SeriesNumber), int(d.InstanceNumber)) for d in got] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    by_uid = {str(d.SOPInstanceUID): d for d in sent}
    for ds in got:
        np.testing.assert_array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)
    assert len(list(src.iter_instances(study_uid, series[0].series_uid))) == 3


def test_unknown_study_is_not_found(folder: tuple[Path, dict[str, list[Dataset]]]) -> None:
    with pytest.raises(PacsNotFoundError):
        DicomFolderSource(folder[0]).list_series("1.2.3.4")


def test_truncated_file_fails_its_study_only(tmp_path: Path) -> None:
    good = make_study("CR", seed=10)
    bad = make_study("CR", seed=11)
    _write(tmp_path, good, "good")
    [bad_path] = _write(tmp_path, bad, "bad")
    src = DicomFolderSource(tmp_path)
    refs = list(src.find_studies(StudyQuery()))
    raw = bad_path.read_bytes()
    bad_path.write_bytes(raw[: len(raw) - 4000])  # pixels cut short after indexing
    results: dict[str, str] = {}
    for ref in refs:
        try:
            results[ref.study_uid] = f"{len(list(src.iter_instances(ref.study_uid)))} ok"
        except InvalidDicomError as exc:
            results[ref.study_uid] = str(exc)
    bad_uid = str(bad[0].StudyInstanceUID)
    assert results[str(good[0].StudyInstanceUID)] == "1 ok"
    assert results[bad_uid].startswith(study_reference(bad_uid))


def test_new_files_are_detected_once_by_the_watermark(tmp_path: Path) -> None:
    _write(tmp_path, make_study("CR", study_date="20240201", seed=20), "a")
    src = DicomFolderSource(tmp_path)
    first, mark = src.new_studies_since(None)
    assert len(first) == 1
    later = make_study("MR", study_date="20240202", seed=21)
    _write(tmp_path, later, "b")
    new, mark = src.new_studies_since(mark)
    assert [s.study_uid for s in new] == [str(later[0].StudyInstanceUID)]
    assert src.new_studies_since(mark)[0] == []


def test_dicomdir_file_set_is_followed(tmp_path: Path) -> None:
    fs = FileSet()
    studies = [make_study("CT", instances_per_series=2, seed=30), make_study("CR", seed=31)]
    for study in studies:
        for ds in study:
            fs.add(ds)
    try:
        fs.write(tmp_path / "media")
    finally:
        fs._stage["t"].cleanup()  # FileSet's staging TemporaryDirectory has no public close
    (tmp_path / "media" / "stray.dcm").write_bytes(b"not part of the file-set")
    src = DicomFolderSource(tmp_path / "media")
    found = {s.study_uid for s in src.find_studies(StudyQuery())}
    assert found == {str(st[0].StudyInstanceUID) for st in studies}
    assert src.skipped == 0  # only the DICOMDIR's records are read
    ct_uid = str(studies[0][0].StudyInstanceUID)
    assert len(list(src.iter_instances(ct_uid))) == 2
    assert pydicom.dcmread(tmp_path / "media" / "DICOMDIR").DirectoryRecordSequence


def test_a_known_study_is_fetched_without_walking_the_whole_folder(
    folder: tuple[Path, dict[str, list[Dataset]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import connectors.dicom_folder as module

    root, _ = folder
    src = DicomFolderSource(root)
    refs = {s.accession_number: s for s in src.find_studies(StudyQuery())}  # discovery walks
    walks: list[Path] = []
    real_walk = os.walk

    def counted(top: Path) -> object:
        walks.append(top)
        return real_walk(top)

    monkeypatch.setattr(module.os, "walk", counted)
    cr = refs["ACC-CR"].study_uid
    assert len(src.instance_headers(cr)) == 1 and len(src.instance_headers(cr)) == 1
    assert walks == []  # a stat per instance of the study, no walk of the folder
    # A study whose file changed on disk (an instance sent again) is indexed again.
    (path,) = root.glob("deep/cr/nested/*.dcm")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert len(src.instance_headers(cr)) == 1
    assert walks == [root]
