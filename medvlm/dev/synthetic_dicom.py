"""Synthetic, de-identified DICOM studies with real pixel data, for tests and the demo.

Pure builders: they return pydicom datasets in memory and never read or write files or talk to
the network. Every dataset is a complete Part 10 object (file meta information, explicit VR
little endian, a 128-byte preamble so that a PACS that stores the bytes as sent writes a valid
file; PS3.10 §7.1). Patients are synthetic (``SYNTHETIC^PATIENT``, IDs ``SYN-…``) and carry
Patient Identity Removed = YES (PS3.15 E.1). UIDs derive from the arguments, so the same call
gives the same study (idempotent stores) and different seeds or accessions give different ones.

Shapes per modality (PS3.3 IODs, minimal but valid):
- CR: MONOCHROME2, 16-bit allocated / 12 stored, one frame per instance.
- CT: MONOCHROME2, 16-bit, RescaleSlope/Intercept (HU), ImagePositionPatient and SliceLocation
  so that instances can be ordered along the patient axis.
- MR: MONOCHROME2, 16-bit, positioned like CT but without rescale.
- US: RGB 8-bit multi-frame (a short cine), Ultrasound Multi-frame Image Storage.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

Modality = Literal["CR", "CT", "US", "MR"]

SYNTHETIC_PATIENT_NAME: Final = "SYNTHETIC^PATIENT"
_SOP_CLASSES: Final[dict[str, str]] = {
    "CR": ComputedRadiographyImageStorage,
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "US": UltrasoundMultiFrameImageStorage,
}
_DEFAULT_INSTANCES: Final[dict[str, int]] = {"CR": 1, "CT": 6, "MR": 4, "US": 1}
_DEFAULT_SIZE: Final[dict[str, tuple[int, int]]] = {
    "CR": (96, 80),
    "CT": (64, 64),
    "MR": (64, 64),
    "US": (48, 64),
}
_US_FRAMES: Final = 4
_SLICE_THICKNESS_MM: Final = 2.5


def _uid(*parts: object) -> str:
    """A deterministic UID from the given parts (PS3.5 §9; pydicom's root, hashed entropy)."""
    return generate_uid(entropy_srcs=[repr(p) for p in parts])


def _da(value: dt.date | str) -> str:
    return value.strftime("%Y%m%d") if isinstance(value, dt.date) else value


def _grey_image(
    rng: np.random.Generator, rows: int, cols: int, peak: int, index: int
) -> np.ndarray:
    """A smooth body-like ellipse with noise; ``index`` shifts it so slices differ."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = rows / 2 + index % 3, cols / 2 - index % 2
    ellipse = ((y - cy) / (rows * 0.4)) ** 2 + ((x - cx) / (cols * 0.35)) ** 2 <= 1.0
    base = np.where(ellipse, 0.6 * peak, 0.05 * peak) + (x / cols) * 0.1 * peak
    noise = rng.normal(0.0, 0.02 * peak, size=(rows, cols))
    image: np.ndarray = np.clip(base + noise, 0, peak).astype(np.uint16)
    return image


def _us_cine(rng: np.random.Generator, rows: int, cols: int, frames: int) -> np.ndarray:
    cine = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    for f in range(frames):
        speckle = rng.integers(0, 200, size=(rows, cols), dtype=np.uint8)
        cine[f, ..., 0] = speckle
        cine[f, ..., 1] = speckle
        cine[f, ..., 2] = speckle
        cine[f, 2 + f : 6 + f, 2:10, 0] = 255  # a red marker that moves frame to frame
    return cine


def make_study(
    modality: Modality,
    *,
    series: int = 1,
    instances_per_series: int | None = None,
    study_date: dt.date | str = "20240115",
    study_time: str = "101500",
    accession: str = "SYN-ACC-0001",
    patient_id: str = "SYN-0001",
    description: str | None = None,
    seed: int = 0,
    rows: int | None = None,
    columns: int | None = None,
) -> list[Dataset]:
    """Build one synthetic study: ``series`` series of ``instances_per_series`` instances each.

    Returns the instances in series then instance order. Same arguments, same UIDs and pixels.
    """
    if modality not in _SOP_CLASSES:
        raise ValueError(f"unsupported modality {modality!r}; use one of {sorted(_SOP_CLASSES)}")
    if series < 1:
        raise ValueError("series must be >= 1")
    per_series = (
        _DEFAULT_INSTANCES[modality] if instances_per_series is None else instances_per_series
    )
    if per_series < 1:
        raise ValueError("instances_per_series must be >= 1")
    default_rows, default_cols = _DEFAULT_SIZE[modality]
    n_rows, n_cols = rows or default_rows, columns or default_cols
    date = _da(study_date)
    rng = np.random.default_rng(seed)
    study_uid = _uid("study", modality, date, accession, patient_id, seed)
    out: list[Dataset] = []
    for s in range(1, series + 1):
        series_uid = _uid("series", study_uid, s)
        for i in range(1, per_series + 1):
            ds = _base(modality, study_uid, series_uid, _uid("sop", series_uid, i))
            ds.PatientID = patient_id
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
            ds.AccessionNumber = accession
            ds.StudyDescription = description or f"SYNTHETIC {modality} STUDY"
            ds.SeriesDescription = f"SYNTHETIC {modality} SERIES {s}"
            ds.SeriesNumber = s
            ds.InstanceNumber = i
            _add_pixels(ds, modality, rng, n_rows, n_cols, i)
            out.append(ds)
    return out


def _base(modality: str, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_SOP_CLASSES[modality])
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = _uid("for", series_uid)
    ds.Modality = modality
    ds.PatientName = SYNTHETIC_PATIENT_NAME
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "medvlm-synthetic"
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _add_pixels(
    ds: Dataset, modality: str, rng: np.random.Generator, rows: int, cols: int, index: int
) -> None:
    if modality == "US":
        ds.set_pixel_data(
            _us_cine(rng, rows, cols, _US_FRAMES), "RGB", 8, generate_instance_uid=False
        )
        ds.FrameTime = 33.3
        ds.CineRate = 30
        ds.FrameIncrementPointer = (0x0018, 0x1063)  # Frame Time
        return
    bits = 12
    ds.set_pixel_data(
        _grey_image(rng, rows, cols, 2**bits - 1, index),
        "MONOCHROME2",
        bits,
        generate_instance_uid=False,
    )
    ds.PixelSpacing = [0.5, 0.5] if modality != "CR" else [0.2, 0.2]
    if modality == "CR":
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.ViewPosition = "PA"
        ds.BodyPartExamined = "CHEST"
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        return
    z = -_SLICE_THICKNESS_MM * (index - 1)
    ds.ImagePositionPatient = [-16.0, -16.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = _SLICE_THICKNESS_MM
    ds.SliceLocation = z
    if modality == "CT":
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.KVP = 120
