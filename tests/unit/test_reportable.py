from __future__ import annotations

from typing import Any

import pydicom
import pytest
from pydicom import config, uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import UID, generate_uid

from medvlm.dev.sample_data import CHEST_RADIOGRAPH, sample_file
from pipeline.reportable import (
    DEFAULT_REPORTABLE_MODALITIES,
    DEFAULT_REPORTABLE_SOP_CLASSES,
    Reportability,
    not_reportable_reason,
    select_reportable,
)

pytestmark = pytest.mark.unit

PIXEL_DATA = Tag(0x7FE0, 0x0010)


def _instance(sop_class: str | None, modality: str | None, **attributes: Any) -> Dataset:
    ds = Dataset()
    if sop_class is not None:
        ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    if modality is not None:
        ds.Modality = modality
    ds.PatientID = "MRN-0042"
    ds.PatientName = "Synthetic^Jane"
    ds.AccessionNumber = "ACC-777"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _malformed(ds: Dataset, keyword: str, vr: str, value: str) -> Dataset:
    """Set a value that breaks its VR, as a real malformed file would carry it."""
    ds[keyword] = DataElement(keyword, vr, value, validation_mode=config.IGNORE)
    return ds


def _read(name: str) -> Dataset:
    return pydicom.dcmread(sample_file(name), stop_before_pixels=True)


# --- the default lists ------------------------------------------------------------------------


def test_every_default_sop_class_is_a_registered_image_storage_class() -> None:
    assert len(set(DEFAULT_REPORTABLE_SOP_CLASSES)) == len(DEFAULT_REPORTABLE_SOP_CLASSES)
    for value in DEFAULT_REPORTABLE_SOP_CLASSES:
        sop_class = UID(value)
        assert sop_class.is_valid, value
        assert sop_class.type == "SOP Class", value
        assert "Image Storage" in sop_class.name, (value, sop_class.name)


def test_retired_ultrasound_and_nm_classes_still_seen_in_archives_are_included() -> None:
    retired = {
        UID(value).keyword for value in DEFAULT_REPORTABLE_SOP_CLASSES if UID(value).is_retired
    }
    assert retired == {
        "UltrasoundImageStorageRetired",
        "UltrasoundMultiFrameImageStorageRetired",
        "NuclearMedicineImageStorageRetired",
    }


def test_default_sop_classes_cover_each_modality_family() -> None:
    names = {UID(value).name for value in DEFAULT_REPORTABLE_SOP_CLASSES}
    for expected in (
        "Computed Radiography Image Storage",
        "Digital X-Ray Image Storage - For Presentation",
        "Digital X-Ray Image Storage - For Processing",
        "CT Image Storage",
        "Enhanced CT Image Storage",
        "MR Image Storage",
        "Enhanced MR Image Storage",
        "Ultrasound Image Storage",
        "Ultrasound Multi-frame Image Storage",
        "Digital Mammography X-Ray Image Storage - For Presentation",
        "Digital Mammography X-Ray Image Storage - For Processing",
        "X-Ray Angiographic Image Storage",
        "Enhanced XA Image Storage",
        "X-Ray Radiofluoroscopic Image Storage",
        "Enhanced XRF Image Storage",
        "Nuclear Medicine Image Storage",
        "Positron Emission Tomography Image Storage",
        "Enhanced PET Image Storage",
        "Secondary Capture Image Storage",
        "Multi-frame True Color Secondary Capture Image Storage",
    ):
        assert expected in names


@pytest.mark.parametrize(
    "sop_class",
    [
        uid.SegmentationStorage,
        uid.RTDoseStorage,
        uid.RTStructureSetStorage,
        uid.ComprehensiveSRStorage,
        uid.BasicTextSRStorage,
        uid.KeyObjectSelectionDocumentStorage,
        uid.GrayscaleSoftcopyPresentationStateStorage,
        uid.EncapsulatedPDFStorage,
        uid.RawDataStorage,
    ],
)
def test_non_image_sop_classes_are_not_reportable_by_default(sop_class: str) -> None:
    assert sop_class not in DEFAULT_REPORTABLE_SOP_CLASSES


def test_default_modalities_are_the_validated_set() -> None:
    assert DEFAULT_REPORTABLE_MODALITIES == (
        "CR", "DX", "CT", "MR", "US", "MG", "XA", "RF", "NM", "PT", "OT",
    )  # fmt: skip


# --- real sample files that are not images ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("liver_1frame.dcm", "Segmentation Storage (SEG) ×1"),
        ("rtdose.dcm", "RT Dose Storage (RTDOSE) ×1"),
        ("test-SR.dcm", "Comprehensive SR Storage (SR) ×1"),
        ("reportsi.dcm", "Basic Text SR Storage (SR) ×1"),
    ],
)
def test_real_non_image_object_is_skipped_by_its_registry_name(name: str, label: str) -> None:
    result = select_reportable([_read(name)])
    assert result.instances == ()
    assert result.skipped == (label,)


def test_presentation_state_is_skipped() -> None:
    result = select_reportable([_instance(uid.GrayscaleSoftcopyPresentationStateStorage, "PR")])
    assert result.instances == ()
    assert result.skipped == ("Grayscale Softcopy Presentation State Storage (PR) ×1",)


def test_reason_lists_every_kind_of_skipped_object_with_counts() -> None:
    seg = _read("liver_1frame.dcm")
    result = select_reportable([seg, _read("rtdose.dcm"), seg])
    assert not_reportable_reason(result) == (
        "not-reportable: Segmentation Storage (SEG) ×2; RT Dose Storage (RTDOSE) ×1"
    )


def test_reason_carries_no_patient_or_accession_data() -> None:
    dose = _read("rtdose.dcm")
    dose.PatientName = "Synthetic^Jane"
    dose.AccessionNumber = "ACC-777"
    sr = _instance(uid.ComprehensiveSRStorage, "SR")
    reason = not_reportable_reason(select_reportable([dose, sr]))
    for secret in (str(dose.PatientID), "Synthetic", "Jane", "ACC-777", "MRN-0042"):
        assert secret not in reason
    assert str(dose.SOPInstanceUID) not in reason and str(sr.SOPInstanceUID) not in reason


def test_reason_for_an_empty_study_says_so() -> None:
    assert not_reportable_reason(select_reportable([])) == (
        "not-reportable: the study has no instances"
    )


def test_reason_for_a_study_with_images_is_a_caller_error() -> None:
    result = select_reportable([_instance(uid.CTImageStorage, "CT")])
    with pytest.raises(ValueError, match="reportable instances"):
        not_reportable_reason(result)


# --- mixed studies ----------------------------------------------------------------------------


def test_ct_study_keeps_its_images_in_order_and_lists_the_ko_and_pr_as_skipped() -> None:
    real_ct = _read("CT_small.dcm")
    slices = [real_ct, _instance(uid.CTImageStorage, "CT"), _instance(uid.CTImageStorage, "CT")]
    key_objects = _instance(uid.KeyObjectSelectionDocumentStorage, "KO")
    presentation = _instance(uid.GrayscaleSoftcopyPresentationStateStorage, "PR")
    result = select_reportable([slices[0], key_objects, slices[1], presentation, slices[2]])
    assert result.instances == tuple(slices)
    assert result.skipped == (
        "Key Object Selection Document Storage (KO) ×1",
        "Grayscale Softcopy Presentation State Storage (PR) ×1",
    )
    assert result.burned_in_annotation is False


def test_real_radiograph_and_ultrasound_are_reportable() -> None:
    radiograph, ultrasound = _read(CHEST_RADIOGRAPH), _read("US1_UNCR.dcm")
    result = select_reportable([radiograph, ultrasound])
    assert result.instances == (radiograph, ultrasound)
    assert result.skipped == ()


def test_image_class_with_an_unreportable_modality_is_skipped() -> None:
    result = select_reportable(
        [_instance(uid.SecondaryCaptureImageStorage, "DOC"), _instance(uid.CTImageStorage, "SEG")]
    )
    assert result.instances == ()
    assert result.skipped == (
        "Secondary Capture Image Storage (DOC) ×1",
        "CT Image Storage (SEG) ×1",
    )


def test_reportable_modality_with_a_non_image_class_is_skipped() -> None:
    result = select_reportable([_instance(uid.SegmentationStorage, "CT")])
    assert result.instances == ()
    assert result.skipped == ("Segmentation Storage (CT) ×1",)


def test_modality_comparison_ignores_case_and_padding() -> None:
    ds = _malformed(_instance(uid.CTImageStorage, None), "Modality", "CS", "ct ")
    assert select_reportable([ds]).instances == (ds,)


def test_narrower_modality_setting_excludes_other_modalities() -> None:
    chest, head = (
        _instance(uid.ComputedRadiographyImageStorage, "CR"),
        _instance(uid.CTImageStorage, "CT"),
    )
    result = select_reportable([chest, head], modalities=("CR",))
    assert result.instances == (chest,)
    assert result.skipped == ("CT Image Storage (CT) ×1",)


def test_narrower_sop_class_setting_excludes_other_classes() -> None:
    chest = _instance(uid.ComputedRadiographyImageStorage, "CR")
    processing = _instance(uid.DigitalXRayImageStorageForProcessing, "DX")
    result = select_reportable(
        [chest, processing], sop_classes=(uid.ComputedRadiographyImageStorage,)
    )
    assert result.instances == (chest,)
    assert result.skipped == ("Digital X-Ray Image Storage - For Processing (DX) ×1",)


def test_retired_ultrasound_class_is_reportable_and_named_retired_when_skipped() -> None:
    retired = "1.2.840.10008.5.1.4.1.1.6"
    kept = _instance(retired, "US")
    assert select_reportable([kept]).instances == (kept,)
    skipped = select_reportable([kept], modalities=("CT",))
    assert skipped.skipped == ("Ultrasound Image Storage (retired) (US) ×1",)


def test_sop_class_falls_back_to_the_file_meta_media_storage_class() -> None:
    ds = _instance(None, "CT")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = uid.CTImageStorage
    assert select_reportable([ds]).instances == (ds,)


def test_unknown_missing_and_invalid_classes_and_modalities_get_safe_labels() -> None:
    result = select_reportable(
        [
            _instance("1.2.840.113619.4.26", "OT"),  # a vendor-private class
            _instance("1.2.840.113619.4.26", "OT"),
            _instance(None, None),
            _malformed(_instance(None, "OT"), "SOPClassUID", "UI", "not-a-uid"),
            _malformed(_instance(uid.RTPlanStorage, None), "Modality", "CS", "rt plan!"),
        ]
    )
    assert result.skipped == (
        "SOP Class 1.2.840.113619.4.26 (OT) ×2",
        "no SOP Class UID (no Modality) ×1",
        "invalid SOP Class UID (OT) ×1",
        "RT Plan Storage (invalid Modality) ×1",
    )


# --- burned-in annotation ---------------------------------------------------------------------


def test_burned_in_annotation_on_a_reportable_image_is_flagged() -> None:
    clean = _instance(uid.ComputedRadiographyImageStorage, "CR", BurnedInAnnotation="NO")
    burned = _instance(uid.SecondaryCaptureImageStorage, "OT", BurnedInAnnotation="YES")
    result = select_reportable([clean, burned])
    assert result.instances == (clean, burned)
    assert result.burned_in_annotation is True


def test_no_burned_in_flag_when_images_say_no_or_nothing() -> None:
    result = select_reportable(
        [
            _instance(uid.ComputedRadiographyImageStorage, "CR", BurnedInAnnotation="NO"),
            _instance(uid.ComputedRadiographyImageStorage, "CR"),
        ]
    )
    assert len(result.instances) == 2
    assert result.burned_in_annotation is False


def test_burned_in_annotation_on_a_skipped_object_does_not_flag_the_study() -> None:
    burned_seg = _instance(uid.SegmentationStorage, "SEG", BurnedInAnnotation="YES")
    image = _instance(uid.CTImageStorage, "CT")
    assert select_reportable([burned_seg, image]).burned_in_annotation is False


# --- pixel data is never touched --------------------------------------------------------------


class _PixelsMustNotBeRead(Dataset):
    """A dataset whose Pixel Data fails the test if anything reads it."""

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, slice) and Tag(key) == PIXEL_DATA:
            raise AssertionError("Pixel Data was read")
        return super().__getitem__(key)

    @property
    def pixel_array(self) -> Any:
        raise AssertionError("pixel_array was decoded")


def test_selection_never_reads_pixel_data() -> None:
    ds = _PixelsMustNotBeRead()
    ds.SOPClassUID = uid.CTImageStorage
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = b"\x00" * 8
    skipped = _PixelsMustNotBeRead()
    skipped.SOPClassUID = uid.SegmentationStorage
    skipped.Modality = "SEG"
    skipped.PixelData = b"\x00" * 8
    with pytest.raises(AssertionError):
        _ = ds.PixelData  # the guard works
    result = select_reportable([ds, skipped])
    assert result.instances == (ds,)
    assert result.burned_in_annotation is True
    assert result.skipped == ("Segmentation Storage (SEG) ×1",)


def test_undecodable_image_is_still_selected_because_decoding_happens_later() -> None:
    ds = _instance(uid.CTImageStorage, "CT")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not a JPEG stream"])
    with pytest.raises(Exception):  # noqa: B017 - any decoder error proves it is undecodable
        _ = ds.pixel_array
    result = select_reportable([ds])
    assert result == Reportability(instances=(ds,), skipped=(), burned_in_annotation=False)
