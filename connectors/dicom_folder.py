"""DICOM folder image source: plain Part 10 files under a directory, or a DICOMDIR file-set.

The embedded default of ``connectors.pacs.ImageSource`` (``pacs.kind = "folder"``). The index
is built lazily from headers only (``stop_before_pixels=True``) and refreshed on every search:
files already indexed are re-read only when their size or mtime changed, so new files dropped
into the folder are found by ``find_studies`` and ``new_studies_since``. ``instance_headers``
hands out those indexed headers; pixel data is read one instance at a time in ``iter_instances``,
and only for the instances asked for in ``retrieve_instances``.

A DICOMDIR (PS3.10 §8, a file named ``DICOMDIR`` at the root, or the path of one) is followed
through ``pydicom.fileset.FileSet``; otherwise the directory is walked recursively and files that
are not DICOM are skipped and counted in ``skipped`` (they belong to no study). A file that
parses as DICOM in the header but fails when its pixels are read raises ``InvalidDicomError``
naming the study by reference.

What this module must not do: write into the folder, or log file names (they often carry
patient names or MRNs).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError

from connectors.pacs import (
    InstanceRef,
    SeriesRef,
    StudyQuery,
    StudyRef,
    Watermark,
    advance_date_watermark,
    check_instance,
    sort_instances,
)
from medvlm.errors import ConfigurationError, InvalidDicomError, PacsNotFoundError
from pipeline.imaging import study_reference

_HEADER_ERRORS = (PydicomInvalidDicomError, ValueError, EOFError, KeyError, TypeError)


@dataclass(frozen=True)
class _Entry:
    """One indexed file: where it is and the header fields the index needs."""

    path: Path
    stamp: tuple[int, int]
    header: Dataset


class DicomFolderSource:
    """``ImageSource`` over a folder of DICOM files or a DICOMDIR."""

    def __init__(self, root: Path, *, lookback_days: int = 1) -> None:
        self.root = Path(root)
        self._lookback_days = lookback_days
        self._entries: dict[Path, _Entry] = {}
        self._by_study: dict[str, list[_Entry]] = {}
        self.skipped = 0
        """Files found that are not DICOM (at the last scan)."""

    def close(self) -> None:
        self._entries.clear()

    # -- index ---------------------------------------------------------------------------------

    def _dicomdir(self) -> Path | None:
        if self.root.is_file() and self.root.name.upper() == "DICOMDIR":
            return self.root
        candidate = self.root / "DICOMDIR"
        return candidate if candidate.is_file() else None

    def _paths(self) -> Iterator[Path]:
        dicomdir = self._dicomdir()
        if dicomdir is not None:
            # The directory records are read directly: pydicom's FileSet stages into a temporary
            # directory per instance of it, which a read-only index does not need.
            try:
                records = pydicom.dcmread(dicomdir).DirectoryRecordSequence
            except (*_HEADER_ERRORS, AttributeError, OSError) as exc:
                raise ConfigurationError(
                    f"pacs.folder: DICOMDIR unreadable ({type(exc).__name__})"
                ) from None  # pydicom's message may quote a record's values (names)
            for record in records:
                file_id = record.get("ReferencedFileID")
                if file_id:  # PS3.3 F.3.2.2: components of the path relative to the DICOMDIR
                    parts = [file_id] if isinstance(file_id, str) else list(file_id)
                    yield dicomdir.parent.joinpath(*(str(p) for p in parts))
            return
        if not self.root.is_dir():
            raise ConfigurationError(f"pacs.folder {self.root} is not a directory")
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in sorted(filenames):
                yield Path(dirpath) / name

    def _scan(self) -> None:
        """Bring the index up to date: new or changed files are read, vanished ones dropped."""
        fresh: dict[Path, _Entry] = {}
        skipped = 0
        for path in self._paths():
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            known = self._entries.get(path)
            if known is not None and known.stamp == stamp:
                fresh[path] = known
                continue
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                if "StudyInstanceUID" not in header or "SeriesInstanceUID" not in header:
                    raise ValueError("not an image instance")
            except (*_HEADER_ERRORS, OSError):
                skipped += 1
                continue
            fresh[path] = _Entry(path, stamp, header)
        by_study: dict[str, list[_Entry]] = {}
        for entry in fresh.values():
            by_study.setdefault(str(entry.header.StudyInstanceUID), []).append(entry)
        # Swapped whole: concurrent fetches read one index or the other, never half of one.
        self._entries, self._by_study, self.skipped = fresh, by_study, skipped

    def _studies(self) -> dict[str, list[_Entry]]:
        self._scan()
        return self._by_study

    @staticmethod
    def _unchanged(entries: list[_Entry]) -> bool:
        for entry in entries:
            try:
                st = entry.path.stat()
            except OSError:
                return False
            if (st.st_size, st.st_mtime_ns) != entry.stamp:
                return False
        return True

    def _study_entries(self, study_uid: str) -> list[_Entry]:
        """The study's indexed files; the folder is walked again only when the study is not
        in the index or one of its files changed (a run's fetches cost a stat per instance of
        the study, not a walk of the whole folder). Discovery always walks it."""
        entries = self._by_study.get(study_uid)
        if entries is None or not self._unchanged(entries):
            self._scan()
            entries = self._by_study.get(study_uid)
        if not entries:
            raise PacsNotFoundError(f"{study_reference(study_uid)}: not in the DICOM folder")
        return entries

    # -- ImageSource ---------------------------------------------------------------------------

    def _study_ref(self, entries: list[_Entry]) -> StudyRef:
        first = entries[0].header
        ref = StudyRef.from_dataset(first)
        modalities = frozenset(str(e.header.get("Modality", "")) for e in entries) - {""}
        series = {str(e.header.SeriesInstanceUID) for e in entries}
        return StudyRef(
            study_uid=ref.study_uid,
            accession_number=ref.accession_number,
            modalities=modalities,
            study_date=ref.study_date,
            study_time=ref.study_time,
            description=ref.description,
            number_of_series=len(series),
            number_of_instances=len(entries),
            patient_id=ref.patient_id,
        )

    def find_studies(self, query: StudyQuery) -> Iterator[StudyRef]:
        """Studies matching ``query``, ordered by StudyDate, StudyTime, then UID."""
        studies = [self._study_ref(entries) for entries in self._studies().values()]
        studies.sort(key=lambda s: (s.study_date or dt.date.min, s.study_time or "", s.study_uid))
        matching = (s for s in studies if query.matches(s))
        for i, study in enumerate(matching):
            if i < query.offset:
                continue
            if query.limit is not None and i >= query.offset + query.limit:
                return
            yield study

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        by_series: dict[str, list[_Entry]] = {}
        for entry in self._study_entries(study_uid):
            by_series.setdefault(str(entry.header.SeriesInstanceUID), []).append(entry)
        out = []
        for entries in by_series.values():
            ref = SeriesRef.from_dataset(entries[0].header, study_uid)
            out.append(
                SeriesRef(
                    ref.study_uid,
                    ref.series_uid,
                    ref.modality,
                    ref.series_number,
                    ref.description,
                    len(entries),
                )
            )
        return sorted(out, key=lambda s: (s.series_number or 0, s.series_uid))

    def list_instances(self, study_uid: str, series_uid: str) -> list[InstanceRef]:
        headers = sort_instances(
            [
                e.header
                for e in self._study_entries(study_uid)
                if str(e.header.SeriesInstanceUID) == series_uid
            ]
        )
        return [InstanceRef.from_dataset(h, study_uid, series_uid) for h in headers]

    def iter_instances(self, study_uid: str, series_uid: str | None = None) -> Iterator[Dataset]:
        """Full instances, one file read at a time, in series then instance order."""
        entries = [
            e
            for e in self._study_entries(study_uid)
            if series_uid is None or str(e.header.SeriesInstanceUID) == series_uid
        ]
        order = {id(e.header): e.path for e in entries}
        for header in sort_instances([e.header for e in entries]):
            yield _read_instance(order[id(header)], study_uid)

    def instance_headers(self, study_uid: str) -> list[Dataset]:
        """The indexed headers (read with ``stop_before_pixels``), series then instance order."""
        return sort_instances([e.header for e in self._study_entries(study_uid)])

    def retrieve_instances(self, study_uid: str, headers: Sequence[Dataset]) -> list[Dataset]:
        """The files of exactly ``headers`` (by SOPInstanceUID), read one at a time, in order."""
        paths = {
            str(e.header.get("SOPInstanceUID", "")): e.path for e in self._study_entries(study_uid)
        }
        wanted = [str(h.get("SOPInstanceUID", "")) for h in headers]
        missing = sum(1 for uid in wanted if uid not in paths)
        if missing:
            raise PacsNotFoundError(
                f"{study_reference(study_uid)}: {missing} instance(s) not in the DICOM folder"
            )
        return [_read_instance(paths[uid], study_uid) for uid in wanted]

    def new_studies_since(self, watermark: Watermark | None) -> tuple[list[StudyRef], Watermark]:
        floor = watermark.floor_date if watermark else None
        return advance_date_watermark(
            watermark, self.find_studies(StudyQuery(date_from=floor)), self._lookback_days
        )

    # -- pre-flight ---------------------------------------------------------------------------

    def ping(self) -> None:
        """The folder (or DICOMDIR) exists and can be read (flows/preflight.py). Raises
        ``PacsUnavailableError`` chained to the ``OSError`` (no such folder, permission)."""
        from medvlm.errors import PacsUnavailableError

        try:
            if self.root.is_file():
                self.root.open("rb").close()
            else:
                with os.scandir(self.root) as entries:
                    next(entries, None)
        except OSError as exc:
            raise PacsUnavailableError(f"pacs: folder unreadable ({type(exc).__name__})") from exc


def _read_instance(path: Path, study_uid: str) -> Dataset:
    """One full instance, every element parsed now so that a broken file fails here."""
    try:
        ds = pydicom.dcmread(path)
        for _ in ds:  # parse every element now so a broken file fails here
            pass
        check_instance(ds, study_uid)
    except (*_HEADER_ERRORS, OSError) as exc:
        raise InvalidDicomError(
            f"{study_reference(study_uid)}: unreadable instance ({type(exc).__name__})"
        ) from None  # pydicom's message may quote element values (names, dates)
    return ds
