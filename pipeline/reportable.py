"""Which instances of a study may be sent to the model. Pure logic over DICOM headers.

A study in the PACS holds more than images: segmentations, RT objects, structured reports,
presentation states and key-object selections. Only image storage SOP classes of the modalities
the model was validated on are reportable; everything else is listed as skipped, by its SOP
class name from pydicom's UID registry (PS3.6 Annex A) and its Modality (0008,0060), never by
anything identifying. The selection reads header attributes only and never touches pixel data:
decoding happens later, and only for what is reportable.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pydicom import config, uid
from pydicom.dataset import Dataset
from pydicom.uid import UID

__all__ = [
    "DEFAULT_REPORTABLE_MODALITIES",
    "DEFAULT_REPORTABLE_SOP_CLASSES",
    "Reportability",
    "not_reportable_reason",
    "select_reportable",
]

#: Modality (0008,0060) defined terms (PS3.3 C.7.3.1.1.1) of the studies the model may draft.
DEFAULT_REPORTABLE_MODALITIES: tuple[str, ...] = (
    "CR",
    "DX",
    "CT",
    "MR",
    "US",
    "MG",
    "XA",
    "RF",
    "NM",
    "PT",
    "OT",
)


def _retired(value: str, keyword: str) -> UID:
    """A retired UID, checked against its keyword in pydicom's registry (PS3.6 Annex A).

    pydicom exports constants only for current UIDs; the retired image storage classes that
    archives still hold are written out here, and a typo fails at import, not in a study.
    """
    registered = UID(value)
    if registered.keyword != keyword or not registered.is_retired:
        raise LookupError(f"{value} is not the retired {keyword} in pydicom's registry")
    return registered


#: Image storage SOP classes (PS3.4 B.5) of ``DEFAULT_REPORTABLE_MODALITIES``.
DEFAULT_REPORTABLE_SOP_CLASSES: tuple[str, ...] = tuple(
    str(sop_class)
    for sop_class in (
        # CR
        uid.ComputedRadiographyImageStorage,
        # DX (the "for processing" images are raw detector data, but some sites only send those)
        uid.DigitalXRayImageStorageForPresentation,
        uid.DigitalXRayImageStorageForProcessing,
        # CT
        uid.CTImageStorage,
        uid.EnhancedCTImageStorage,
        # MR
        uid.MRImageStorage,
        uid.EnhancedMRImageStorage,
        # US, with the retired classes (…1.1.6, …1.1.3) still written by older scanners
        uid.UltrasoundImageStorage,
        uid.UltrasoundMultiFrameImageStorage,
        _retired("1.2.840.10008.5.1.4.1.1.6", "UltrasoundImageStorageRetired"),
        _retired("1.2.840.10008.5.1.4.1.1.3", "UltrasoundMultiFrameImageStorageRetired"),
        # MG
        uid.DigitalMammographyXRayImageStorageForPresentation,
        uid.DigitalMammographyXRayImageStorageForProcessing,
        # XA and RF
        uid.XRayAngiographicImageStorage,
        uid.EnhancedXAImageStorage,
        uid.XRayRadiofluoroscopicImageStorage,
        uid.EnhancedXRFImageStorage,
        # NM, with the retired class (…1.1.5) of pre-1996 cameras
        uid.NuclearMedicineImageStorage,
        _retired("1.2.840.10008.5.1.4.1.1.5", "NuclearMedicineImageStorageRetired"),
        # PT
        uid.PositronEmissionTomographyImageStorage,
        uid.EnhancedPETImageStorage,
        # OT: Secondary Capture and the multi-frame SC classes
        uid.SecondaryCaptureImageStorage,
        uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
        uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    )
)

# CS: upper-case letters, digits, space and underscore, at most 16 characters (PS3.5 6.2).
_CS = re.compile(r"[A-Z0-9 _]{1,16}")


@dataclass(frozen=True)
class Reportability:
    """The reportable part of a study and what was left out.

    ``instances``: the reportable datasets, in the order given. ``skipped``: one PHI-free line
    per kind of skipped instance with its count, e.g. ``"Segmentation Storage (SEG) ×1"``.
    ``burned_in_annotation``: True when any reportable instance declares BurnedInAnnotation
    (0028,0301) ``YES`` (PS3.3 C.7.6.1, General Image Module): its pixels may show text such
    as a name.
    """

    instances: tuple[Dataset, ...]
    skipped: tuple[str, ...]
    burned_in_annotation: bool


def _sop_class(ds: Dataset) -> str | None:
    """SOPClassUID (0008,0016) (PS3.3 C.12.1), else the file meta MediaStorageSOPClassUID
    (0002,0002) (PS3.10 7.1) for a Part 10 file whose dataset lacks it."""
    value = ds.get("SOPClassUID")
    if not value:
        file_meta = getattr(ds, "file_meta", None)
        value = file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    text = str(value).strip(" \x00") if value else ""
    return text or None


def _modality(ds: Dataset) -> str | None:
    """Modality (0008,0060) (PS3.3 C.7.3.1), upper-cased and stripped; None if absent."""
    value = ds.get("Modality")
    text = str(value).strip().upper() if value is not None else ""
    return text or None


def _describe(sop_class: str | None, modality: str | None) -> str:
    """A PHI-free label for a kind of instance: the registry name of its SOP class (PS3.6
    Annex A) and its Modality, e.g. ``"RT Dose Storage (RTDOSE)"``."""
    if sop_class is None:
        name = "no SOP Class UID"
    else:
        # Checked below with is_valid; pydicom's own check would only warn.
        sop = UID(sop_class, validation_mode=config.IGNORE)
        if sop.keyword:  # in pydicom's registry
            name = sop.name + (" (retired)" if sop.is_retired else "")
        elif sop.is_valid:
            name = f"SOP Class {sop}"  # private or newer than pydicom's registry
        else:
            name = "invalid SOP Class UID"
    if modality is None:
        label = "no Modality"
    elif _CS.fullmatch(modality):
        label = modality
    else:
        label = "invalid Modality"
    return f"{name} ({label})"


def _burned_in(ds: Dataset) -> bool:
    """BurnedInAnnotation (0028,0301) is ``YES`` (PS3.3 C.7.6.1, General Image Module)."""
    value = ds.get("BurnedInAnnotation")
    return value is not None and str(value).strip().upper() == "YES"


def select_reportable(
    instances: Iterable[Dataset],
    *,
    sop_classes: Collection[str] = DEFAULT_REPORTABLE_SOP_CLASSES,
    modalities: Collection[str] = DEFAULT_REPORTABLE_MODALITIES,
) -> Reportability:
    """Split a study's instances into reportable ones and a summary of the rest.

    An instance is reportable only if its SOP Class UID (0008,0016) is in ``sop_classes`` and
    its Modality (0008,0060) is in ``modalities`` (case-insensitive): a CT Image Storage
    instance labelled ``RTIMAGE``, or a Segmentation labelled ``CT``, is not. Only header
    attributes are read; Pixel Data (7FE0,0010) is never accessed, so an undecodable skipped
    instance costs nothing and cannot fail the study.
    """
    wanted_classes = {str(value).strip() for value in sop_classes}
    wanted_modalities = {value.strip().upper() for value in modalities}
    kept: list[Dataset] = []
    skipped: dict[str, int] = {}
    burned_in = False
    for ds in instances:
        sop_class, modality = _sop_class(ds), _modality(ds)
        if sop_class in wanted_classes and modality in wanted_modalities:
            kept.append(ds)
            burned_in = burned_in or _burned_in(ds)
        else:
            label = _describe(sop_class, modality)
            skipped[label] = skipped.get(label, 0) + 1
    return Reportability(
        instances=tuple(kept),
        skipped=tuple(f"{label} ×{count}" for label, count in skipped.items()),
        burned_in_annotation=burned_in,
    )


def not_reportable_reason(reportability: Reportability) -> str:
    """One line saying why a study has nothing to report, e.g.
    ``"not-reportable: Segmentation Storage (SEG) ×1; RT Dose Storage (RTDOSE) ×1"``.

    Only for a study without reportable instances; calling it for one that has some is a
    ``ValueError`` (a caller bug, not an outcome).
    """
    if reportability.instances:
        raise ValueError("the study has reportable instances")
    return "not-reportable: " + ("; ".join(reportability.skipped) or "the study has no instances")
