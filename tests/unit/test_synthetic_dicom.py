"""Synthetic study builders: valid Part 10 objects with real pixels and no real identity."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from medvlm.dev.synthetic_dicom import SYNTHETIC_PATIENT_NAME, make_study
from pipeline.imaging import dataset_frames

pytestmark = pytest.mark.unit


def _reread(ds: Dataset) -> pydicom.FileDataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"  # preamble (Orthanc quirk 4)
    return pydicom.dcmread(BytesIO(raw))


@pytest.mark.parametrize("modality", ["CR", "CT", "MR", "US"])
def test_every_instance_survives_a_part10_round_trip_with_pixels(modality: str) -> None:
    for ds in make_study(modality, series=2, instances_per_series=2):  # type: ignore[arg-type]
        back = _reread(ds)
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
        assert back.pixel_array.std() > 0  # real content, not a blank image


def test_study_has_the_requested_shape_and_unique_uids() -> None:
    study = make_study("CT", series=3, instances_per_series=4)
    assert len(study) == 12
    assert len({str(ds.StudyInstanceUID) for ds in study}) == 1
    assert len({str(ds.SeriesInstanceUID) for ds in study}) == 3
    assert len({str(ds.SOPInstanceUID) for ds in study}) == 12
    for ds in study:
        assert UID(str(ds.SOPInstanceUID)).is_valid


def test_same_arguments_give_same_study_and_other_seed_another() -> None:
    a, b = make_study("CR", seed=1), make_study("CR", seed=1)
    c = make_study("CR", seed=2)
    assert a[0].SOPInstanceUID == b[0].SOPInstanceUID
    assert np.array_equal(a[0].pixel_array, b[0].pixel_array)
    assert c[0].StudyInstanceUID != a[0].StudyInstanceUID


def test_monochrome_modalities_are_16_bit_and_ct_has_hounsfield_rescale() -> None:
    cr = make_study("CR")[0]
    assert (cr.PhotometricInterpretation, cr.BitsAllocated) == ("MONOCHROME2", 16)
    ct = make_study("CT", instances_per_series=3)
    assert all(ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1 for ds in ct)
    locations = [float(ds.SliceLocation) for ds in ct]
    assert locations == sorted(locations, reverse=True) and len(set(locations)) == 3
    assert [float(ds.ImagePositionPatient[2]) for ds in ct] == locations


def test_ultrasound_is_an_rgb_cine() -> None:
    [us] = make_study("US")
    assert us.PhotometricInterpretation == "RGB"
    assert int(us.NumberOfFrames) > 1
    frames = dataset_frames(us, reference="test")
    assert frames.shape[0] == int(us.NumberOfFrames) and frames.shape[-1] == 3
    assert not np.array_equal(frames[0], frames[1])  # frames differ: it moves


def test_patient_is_synthetic_and_marked_deidentified() -> None:
    ds = make_study("MR", patient_id="SYN-0042", study_date="20240301", accession="A-1")[0]
    assert str(ds.PatientName) == SYNTHETIC_PATIENT_NAME
    assert ds.PatientID == "SYN-0042"
    assert ds.PatientIdentityRemoved == "YES"
    assert (ds.StudyDate, ds.AccessionNumber) == ("20240301", "A-1")
    assert ds.PatientBirthDate == ""


def test_unknown_modality_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported modality"):
        make_study("PT")  # type: ignore[arg-type]
