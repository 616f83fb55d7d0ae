"""The image-source interface: how the pipeline finds and fetches studies from a PACS.

``ImageSource`` is a small ``typing.Protocol`` with three implementations: DICOMweb
(``connectors.dicomweb``), DIMSE (``connectors.dimse``) and a DICOM folder
(``connectors.dicom_folder``, the embedded default). ``build_image_source`` picks one from
``PacsSettings`` alone (``connectors.factory.build_image_source``), so a hospital points the
pipeline at its PACS by configuration.

The value types here are frozen and carry no behaviour beyond parsing. Patient ID is kept on
``StudyRef`` for matching with the EHR but excluded from ``repr`` so that it never reaches a log;
errors and logs name a study by ``pipeline.imaging.study_reference`` (a hash of the UID).

What this module must not do: open connections (the factory builds clients, it does not use them),
or log identifiers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset

# Values that break their VR's rules are common in archives (StudyTime "10:15:00" from old
# modalities). pydicom's default is to warn on reading them, and its warning quotes the value:
# for a PatientName or PatientID that puts PHI into logs. Received values are read as they are
# (invalid ones stay plain strings) and the pipeline parses what it uses leniently itself
# (pipeline.dicom_time, pipeline.identity). Every DICOM reader of the project imports this module.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


HEADER_KEYWORDS: tuple[str, ...] = (
    # identity of the instance and what it is (pipeline.reportable)
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "BurnedInAnnotation",
    # slice and frame choice (pipeline.imaging.choose_images)
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "NumberOfFrames",
    # the study's context and links (pipeline.study.prepare_study, pipeline.identity)
    "PatientID",
    "IssuerOfPatientID",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    "AccessionNumber",
    "StudyDescription",
    "BodyPartExamined",
    # fairness subgroups (pipeline.subgroups.SUBGROUP_HEADER_KEYWORDS)
    "PatientSex",
    "PatientBirthDate",
    "InstitutionName",
    "Manufacturer",
    "ManufacturerModelName",
)
"""What ``ImageSource.instance_headers`` must carry for each instance (where the PACS has it)."""


@dataclass(frozen=True)
class StudyQuery:
    """Study-level search (PS3.4 C.6.2.1.2 Study Root; PS3.18 §10.6 QIDO-RS).

    ``date_from``/``date_to`` are inclusive StudyDate bounds (either may be open); ``time_from``
    and ``time_to`` narrow StudyTime within them (HHMMSS). ``modalities`` match any modality in
    the study. ``limit`` caps the total number of studies yielded and ``offset`` skips the first
    ones; the source pages through the PACS itself.
    """

    date_from: dt.date | None = None
    date_to: dt.date | None = None
    time_from: str | None = None
    time_to: str | None = None
    modalities: frozenset[str] = frozenset()
    accession_number: str | None = None
    patient_id: str | None = field(default=None, repr=False)
    study_uid: str | None = None
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError("limit must be >= 0")
        if self.offset < 0:
            raise ValueError("offset must be >= 0")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("date_from is after date_to")
        if isinstance(self.modalities, str):  # a common slip: modalities="CT"
            raise TypeError("modalities must be a set of codes, e.g. frozenset({'CT'})")

    def date_range(self) -> str | None:
        """The StudyDate matching key (PS3.4 C.2.2.2.5 range matching) or None."""
        if self.date_from is None and self.date_to is None:
            return None
        lo = self.date_from.strftime("%Y%m%d") if self.date_from else ""
        hi = self.date_to.strftime("%Y%m%d") if self.date_to else ""
        return lo if lo == hi else f"{lo}-{hi}"

    def time_range(self) -> str | None:
        if self.time_from is None and self.time_to is None:
            return None
        return f"{self.time_from or ''}-{self.time_to or ''}"

    def matches(self, study: StudyRef) -> bool:
        """Client-side check of this query against a study (used where a PACS cannot filter)."""
        if self.modalities and not (self.modalities & study.modalities):
            return False
        if self.accession_number and study.accession_number != self.accession_number:
            return False
        if self.patient_id and study.patient_id != self.patient_id:
            return False
        if self.study_uid and study.study_uid != self.study_uid:
            return False
        if self.date_from or self.date_to:
            if study.study_date is None:
                return False
            if self.date_from and study.study_date < self.date_from:
                return False
            if self.date_to and study.study_date > self.date_to:
                return False
        if self.time_from or self.time_to:
            t = (study.study_time or "")[:6]
            if self.time_from and t < self.time_from:
                return False
            if self.time_to and t > self.time_to:
                return False
        return True


@dataclass(frozen=True)
class StudyRef:
    """One study as a PACS lists it. ``patient_id`` is never part of ``repr``."""

    study_uid: str
    accession_number: str | None = None
    modalities: frozenset[str] = frozenset()
    study_date: dt.date | None = None
    study_time: str | None = None
    description: str | None = None
    number_of_series: int | None = None
    number_of_instances: int | None = None
    patient_id: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> StudyRef:
        """From a study-level identifier (C-FIND response, QIDO result, or an instance)."""
        modalities = ds.get("ModalitiesInStudy") or ds.get("Modality") or ()
        if isinstance(modalities, str):
            modalities = [modalities]
        return cls(
            study_uid=str(ds.StudyInstanceUID),
            accession_number=_text(ds.get("AccessionNumber")),
            modalities=frozenset(str(m) for m in modalities if m),
            study_date=parse_da(ds.get("StudyDate")),
            study_time=_text(ds.get("StudyTime")),
            description=_text(ds.get("StudyDescription")),
            number_of_series=_int(ds.get("NumberOfStudyRelatedSeries")),
            number_of_instances=_int(ds.get("NumberOfStudyRelatedInstances")),
            patient_id=_text(ds.get("PatientID")),
        )


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str
    modality: str | None = None
    series_number: int | None = None
    description: str | None = None
    number_of_instances: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, study_uid: str) -> SeriesRef:
        return cls(
            study_uid=str(ds.get("StudyInstanceUID") or study_uid),
            series_uid=str(ds.SeriesInstanceUID),
            modality=_text(ds.get("Modality")),
            series_number=_int(ds.get("SeriesNumber")),
            description=_text(ds.get("SeriesDescription")),
            number_of_instances=_int(ds.get("NumberOfSeriesRelatedInstances")),
        )


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, study_uid: str, series_uid: str) -> InstanceRef:
        return cls(
            study_uid=str(ds.get("StudyInstanceUID") or study_uid),
            series_uid=str(ds.get("SeriesInstanceUID") or series_uid),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=_text(ds.get("SOPClassUID")),
            instance_number=_int(ds.get("InstanceNumber")),
            number_of_frames=_int(ds.get("NumberOfFrames")),
        )


@dataclass(frozen=True)
class Watermark:
    """Where new-study detection stopped; persist it with ``to_dict`` between runs.

    Generic (QIDO/C-FIND) detection uses ``floor_date`` (StudyDate from which the PACS is
    re-queried) and ``seen`` (``(StudyDate, StudyInstanceUID)`` pairs at or after the floor, so a
    study is reported once). Orthanc detection uses ``change_seq`` (the last ``/changes`` seq).
    """

    floor_date: dt.date | None = None
    seen: frozenset[tuple[str, str]] = field(default=frozenset(), repr=False)
    change_seq: int | None = None

    @classmethod
    def starting(cls, day: dt.date) -> Watermark:
        """A watermark that reports studies dated ``day`` or later (a first run in production:
        ``None`` would report every study the PACS holds)."""
        return cls(floor_date=day)

    @property
    def seen_uids(self) -> frozenset[str]:
        return frozenset(uid for _, uid in self.seen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "floor_date": self.floor_date.isoformat() if self.floor_date else None,
            "seen": sorted([d, u] for d, u in self.seen),
            "change_seq": self.change_seq,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Watermark:
        floor = data.get("floor_date")
        return cls(
            floor_date=dt.date.fromisoformat(floor) if floor else None,
            seen=frozenset((str(d), str(u)) for d, u in data.get("seen", [])),
            change_seq=data.get("change_seq"),
        )


class ChangeFeed(Protocol):
    """A PACS's own record of new studies (e.g. Orthanc's ``/changes``), used instead of QIDO
    date windows when configured: Study Instance UIDs that became complete since a position."""

    def stable_studies_since(self, since: int | None) -> tuple[list[str], int]:
        """UIDs that became stable after position ``since`` (None: from the start), and the
        position to pass next time."""
        ...


@dataclass(frozen=True)
class StoreResult:
    """STOW-RS outcome (PS3.18 §10.5.3): stored and failed SOP Instance UIDs."""

    stored: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]
    """(SOP Instance UID, FailureReason) per refused instance."""


@runtime_checkable
class InstanceStore(Protocol):
    """A PACS that takes instances (DICOMweb STOW-RS): the drafts' DICOM SR (``job.store_sr``)."""

    def store(self, datasets: Sequence[Dataset]) -> StoreResult: ...


@runtime_checkable
class ImageSource(Protocol):
    """A PACS or a folder: find studies, list their series and instances, stream instances."""

    def find_studies(self, query: StudyQuery) -> Iterator[StudyRef]:
        """Every study matching ``query``, paging through the source as needed."""
        ...

    def list_series(self, study_uid: str) -> list[SeriesRef]: ...

    def list_instances(self, study_uid: str, series_uid: str) -> list[InstanceRef]: ...

    def iter_instances(self, study_uid: str, series_uid: str | None = None) -> Iterator[Dataset]:
        """Instances with pixel data, streamed (a series or an instance at a time in memory).

        A payload that does not parse raises ``InvalidDicomError`` naming the study reference.
        """
        ...

    def instance_headers(self, study_uid: str) -> list[Dataset]:
        """Every instance's header, without pixel data: at least ``HEADER_KEYWORDS`` where the
        PACS has them (an attribute it does not return is absent, never empty).

        Enough to decide what is reportable and which slices or frames the model sees
        (``pipeline.imaging.choose_images``) before any pixel data is fetched.
        """
        ...

    def retrieve_instances(self, study_uid: str, headers: Sequence[Dataset]) -> list[Dataset]:
        """The full instances of exactly ``headers`` (matched by SOPInstanceUID), in that order,
        each checked with ``check_instance``.

        An instance the source does not return raises ``PacsNotFoundError``; one that does not
        parse ``InvalidDicomError``; both name the study reference.
        """
        ...

    def new_studies_since(self, watermark: Watermark | None) -> tuple[list[StudyRef], Watermark]:
        """Studies not reported before ``watermark`` (None: every study so far) and the next one."""
        ...

    def close(self) -> None: ...


def advance_date_watermark(
    watermark: Watermark | None, found: Iterable[StudyRef], lookback_days: int
) -> tuple[list[StudyRef], Watermark]:
    """The generic watermark step shared by QIDO, C-FIND and folder sources.

    ``found`` are the studies with StudyDate at or after ``watermark.floor_date``. Those not yet
    seen are new. The floor moves to the newest StudyDate seen minus ``lookback_days`` (studies
    arriving late with an older date than that are not detected: a known limit of any date
    window), and ``seen`` keeps only UIDs at or after the new floor so it stays small.
    """
    seen_uids = watermark.seen_uids if watermark else frozenset()
    seen = set(watermark.seen) if watermark else set()
    new: list[StudyRef] = []
    for study in found:
        if study.study_uid in seen_uids or study.study_date is None:
            continue
        new.append(study)
        seen_uids |= {study.study_uid}
        seen.add((study.study_date.strftime("%Y%m%d"), study.study_uid))
    floor = watermark.floor_date if watermark else None
    if seen:
        newest = dt.datetime.strptime(max(d for d, _ in seen), "%Y%m%d").date()
        candidate = newest - dt.timedelta(days=lookback_days)
        floor = candidate if floor is None else max(floor, candidate)
    if floor is not None:
        cut = floor.strftime("%Y%m%d")
        seen = {(d, u) for d, u in seen if d >= cut}
    return new, Watermark(floor_date=floor, seen=frozenset(seen))


def check_instance(ds: Dataset, study_uid: str) -> None:
    """Cheap sanity checks of a received instance; ``ValueError`` when it is unusable.

    It must belong to ``study_uid``, have a SOP Instance UID, and native (uncompressed) Pixel
    Data must be as long as Rows x Columns x Frames x Samples x BitsAllocated/8 (PS3.5 §8.1.1);
    a truncated payload otherwise parses and fails only later, inside the pipeline.
    """
    if "SOPInstanceUID" not in ds or str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise ValueError("instance does not belong to the requested study")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if "PixelData" not in ds or syntax is None or syntax.is_compressed:
        return
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits < 8:
        return
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "YBR_FULL_422" and samples == 3:
        samples = (
            2  # native YBR_FULL_422: two Cb/Cr per two Y, 2 values a pixel (PS3.3 C.7.6.3.1.2)
        )
    expected = (
        int(ds.get("Rows", 0) or 0)
        * int(ds.get("Columns", 0) or 0)
        * int(ds.get("NumberOfFrames", 1) or 1)
        * samples
        * bits
        // 8
    )
    if len(ds.PixelData) < expected:
        raise ValueError(f"pixel data has {len(ds.PixelData)} bytes, {expected} expected")


def parse_da(value: object) -> dt.date | None:
    """A DICOM DA value (``YYYYMMDD``) as a date, or None if empty or malformed."""
    text = _text(value)
    if not text or len(text) < 8:
        return None
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value))
    except ValueError:
        return None


def sort_instances(instances: Sequence[Dataset]) -> list[Dataset]:
    """Instances in series then acquisition order (InstanceNumber; PS3.3 C.7.6.1)."""
    return sorted(
        instances,
        key=lambda ds: (_int(ds.get("SeriesNumber")) or 0, _int(ds.get("InstanceNumber")) or 0),
    )
