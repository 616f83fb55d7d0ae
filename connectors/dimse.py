"""DIMSE image source (PS3.4 Annex C Query/Retrieve, PS3.7 DIMSE) for PACS without DICOMweb.

``DimseClient`` speaks C-ECHO, C-FIND (Study Root; STUDY, SERIES, IMAGE levels), C-GET and
C-MOVE with ``pynetdicom``; ``StorageSCP`` is the project's own storage SCP (the C-MOVE
destination, on ``pacs.scp_host:scp_port`` with AE title ``pacs.scp_aet``); ``DimseSource``
implements ``connectors.pacs.ImageSource`` on top of them.

Protocol outcomes are data: every operation returns a ``DimseStatus`` with its category
(pending, success, warning, failure, cancel; PS3.4 C.4). Exceptions are raised only when no
association could be made (``PacsUnavailableError``, ``PacsUnauthorizedError`` when the PACS rejects
our AE titles) or for misuse; they are translated in ``DimseClient._associate`` alone.

What this module must not do: log identifiers. pynetdicom logs request and response identifiers
(patient names, IDs) by default; that is switched off here at import, and its logger is capped at
WARNING.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from connectors.pacs import (
    HEADER_KEYWORDS,
    InstanceRef,
    SeriesRef,
    StudyQuery,
    StudyRef,
    Watermark,
    advance_date_watermark,
    check_instance,
    sort_instances,
)
from medvlm.errors import (
    ConfigurationError,
    InvalidDicomError,
    PacsError,
    PacsNotFoundError,
    PacsUnauthorizedError,
    PacsUnavailableError,
)
from medvlm.http_edge import backoff_s
from medvlm.settings import HttpEdgeSettings, PacsSettings
from pipeline.imaging import study_reference

# SOP classes used as SCU (PS3.4 Annex C.6.2, A.4); pynetdicom's sop_class module builds these
# names at run time, which type checkers cannot see.
StudyRootQueryRetrieveInformationModelFind: Final = UID("1.2.840.10008.5.1.4.1.2.2.1")
StudyRootQueryRetrieveInformationModelMove: Final = UID("1.2.840.10008.5.1.4.1.2.2.2")
StudyRootQueryRetrieveInformationModelGet: Final = UID("1.2.840.10008.5.1.4.1.2.2.3")
Verification: Final = UID("1.2.840.10008.1.1")

# PHI: never log identifiers (pynetdicom logs them at INFO/DEBUG by default).
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

Level = Literal["STUDY", "SERIES", "IMAGE"]
StatusCategory = Literal["pending", "success", "warning", "failure", "cancel", "unknown"]

STORAGE_SOP_CLASSES: Final = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    SecondaryCaptureImageStorage,
)
"""Image storage classes we accept over C-GET/C-MOVE (extend for other modalities)."""
TRANSFER_SYNTAXES: Final = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEG2000,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]
STORE_SUCCESS: Final = 0x0000
STORE_CANNOT_UNDERSTAND: Final = 0xC210


@dataclass(frozen=True)
class DimseStatus:
    """A DIMSE response status (PS3.7 C.4) with its category."""

    code: int
    category: StatusCategory
    comment: str | None = None

    @classmethod
    def from_dataset(cls, status: Dataset) -> DimseStatus:
        code = int(status.Status)
        category = code_to_category(code).lower()
        if category not in ("pending", "success", "warning", "failure", "cancel"):
            category = "unknown"
        comment = status.get("ErrorComment")
        return cls(code, category, str(comment) if comment else None)  # type: ignore[arg-type]

    @property
    def ok(self) -> bool:
        return self.category in ("success", "warning")


NO_RESPONSE: Final = DimseStatus(-1, "failure", "no response (timeout or aborted association)")


@dataclass(frozen=True)
class FindResult:
    """C-FIND outcome: the final status and the identifiers of the pending responses."""

    status: DimseStatus
    matches: tuple[Dataset, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class RetrieveResult:
    """C-GET / C-MOVE outcome (PS3.4 C.4.2.1.4/C.4.3.1.4): final status and sub-operations."""

    status: DimseStatus
    completed: int = 0
    failed: int = 0
    warning: int = 0
    received: int = 0
    """Instances our C-STORE handler accepted (C-GET) during this operation."""
    undecodable: int = 0
    """Instances that arrived but could not be decoded (answered 0xC210)."""


@dataclass(frozen=True)
class DimseEndpoint:
    host: str
    port: int
    called_aet: str
    calling_aet: str
    timeout_s: float = 60.0


def _counts(status: Dataset) -> tuple[int, int, int]:
    return (
        int(status.get("NumberOfCompletedSuboperations", 0) or 0),
        int(status.get("NumberOfFailedSuboperations", 0) or 0),
        int(status.get("NumberOfWarningSuboperations", 0) or 0),
    )


def _decoded(event: Any) -> Dataset:
    """The dataset of a C-STORE request with its file meta, fully parsed (raises if broken)."""
    ds: Dataset = event.dataset
    ds.file_meta = event.file_meta
    for _ in ds:  # force parsing of every element now, not later in the pipeline
        pass
    return ds


class DimseClient:
    """SCU towards one PACS. One association per operation; timeouts from the endpoint."""

    def __init__(self, endpoint: DimseEndpoint, *, retries: HttpEdgeSettings | None = None) -> None:
        self.endpoint = endpoint
        # Association attempts and their backoff: the PACS's retry policy (HttpEdgeSettings).
        self._retries = retries or HttpEdgeSettings(
            retry_attempts=3, retry_initial_backoff_s=0.2, retry_max_backoff_s=5.0
        )

    def _ae(self) -> AE:
        ae = AE(ae_title=self.endpoint.calling_aet)
        t = self.endpoint.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        return ae

    @contextmanager
    def _associate(
        self,
        contexts: Sequence[str],
        *,
        storage: bool = False,
        handlers: list[Any] | None = None,
    ) -> Iterator[Association]:
        """An established association, or a translated ``PacsError`` (the one place)."""
        ae = self._ae()
        for ctx in contexts:
            ae.add_requested_context(ctx)
        roles: list[Any] = []
        if storage:  # C-GET: the PACS sends C-STORE back on this association (we are SCP)
            for sop in STORAGE_SOP_CLASSES:
                ae.add_requested_context(sop, TRANSFER_SYNTAXES)
                roles.append(build_role(sop, scp_role=True))
        ep = self.endpoint
        assoc: Association | None = None
        attempts = self._retries.retry_attempts
        for attempt in range(1, attempts + 1):
            assoc = ae.associate(
                ep.host,
                ep.port,
                ae_title=ep.called_aet,
                ext_neg=roles or None,
                evt_handlers=handlers or None,
            )
            if assoc.is_established or assoc.is_rejected:
                break
            if attempt < attempts:
                time.sleep(backoff_s(self._retries, attempt))
        assert assoc is not None
        if assoc.is_rejected:
            raise PacsUnauthorizedError(
                f"pacs: association rejected by {ep.called_aet} (check called/calling AE titles)"
            )
        if not assoc.is_established:
            raise PacsUnavailableError(
                f"pacs: no association with {ep.host}:{ep.port} after {attempts} attempts"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def echo(self) -> DimseStatus:
        """C-ECHO (PS3.7 9.1.5)."""
        with self._associate([Verification]) as assoc:
            status = assoc.send_c_echo()
        return DimseStatus.from_dataset(status) if status else NO_RESPONSE

    def find(self, identifier: Dataset) -> FindResult:
        """C-FIND, Study Root. ``identifier.QueryRetrieveLevel`` selects the level."""
        if "QueryRetrieveLevel" not in identifier:
            raise ValueError("identifier needs QueryRetrieveLevel (STUDY, SERIES or IMAGE)")
        matches: list[Dataset] = []
        final = NO_RESPONSE
        with self._associate([StudyRootQueryRetrieveInformationModelFind]) as assoc:
            for status, ident in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                if not status:
                    break
                s = DimseStatus.from_dataset(status)
                if s.category == "pending":
                    if ident is not None:
                        matches.append(ident)
                else:
                    final = s
        return FindResult(final, tuple(matches))

    def get(self, identifier: Dataset, sink: Callable[[Dataset], None]) -> RetrieveResult:
        """C-GET: instances arrive on this association and go to ``sink`` one by one."""
        received = undecodable = 0

        def on_store(event: Any) -> int:
            nonlocal received, undecodable
            try:
                ds = _decoded(event)
            except Exception:
                undecodable += 1
                return STORE_CANNOT_UNDERSTAND
            sink(ds)
            received += 1
            return STORE_SUCCESS

        handlers = [(evt.EVT_C_STORE, on_store)]
        model = StudyRootQueryRetrieveInformationModelGet
        with self._associate([model], storage=True, handlers=handlers) as assoc:
            result = self._retrieve(assoc.send_c_get(identifier, model))
        return RetrieveResult(
            result.status,
            result.completed,
            result.failed,
            result.warning,
            received=received,
            undecodable=undecodable,
        )

    def move(self, identifier: Dataset, destination_aet: str) -> RetrieveResult:
        """C-MOVE to ``destination_aet`` (which the PACS must know, e.g. our ``StorageSCP``)."""
        model = StudyRootQueryRetrieveInformationModelMove
        with self._associate([model]) as assoc:
            return self._retrieve(assoc.send_c_move(identifier, destination_aet, model))

    @staticmethod
    def _retrieve(responses: Iterator[tuple[Dataset, Dataset | None]]) -> RetrieveResult:
        final = NO_RESPONSE
        counts = (0, 0, 0)
        for status, _ in responses:
            if not status:
                break
            final = DimseStatus.from_dataset(status)
            counts = _counts(status)
        return RetrieveResult(final, *counts)


class StorageSCP:
    """The project's storage SCP: receives C-STORE (from C-MOVE) into a memory queue.

    Listens on ``host:port`` (loopback by default) as ``ae_title``. Instances that cannot be
    decoded are answered 0xC210 and counted in ``undecodable``.
    """

    def __init__(self, ae_title: str, host: str, port: int, *, timeout_s: float = 60.0) -> None:
        self.ae_title, self.host, self.port = ae_title, host, port
        self.received: queue.Queue[Dataset] = queue.Queue()
        self.undecodable = 0
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.acse_timeout = self._ae.dimse_timeout = self._ae.network_timeout = timeout_s
        for sop in STORAGE_SOP_CLASSES:
            self._ae.add_supported_context(sop, TRANSFER_SYNTAXES)
        self._ae.add_supported_context(Verification)
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        try:
            ds = _decoded(event)
        except Exception:
            with self._lock:
                self.undecodable += 1
            return STORE_CANNOT_UNDERSTAND
        self.received.put(ds)
        return STORE_SUCCESS

    def start(self) -> StorageSCP:
        if self._server is None:
            try:
                self._server = self._ae.start_server(
                    (self.host, self.port),
                    block=False,
                    evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
                )
            except OSError as exc:
                raise ConfigurationError(
                    f"storage SCP cannot listen on {self.host}:{self.port}: {exc.strerror}"
                ) from exc
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def drain(self) -> list[Dataset]:
        out: list[Dataset] = []
        while True:
            try:
                out.append(self.received.get_nowait())
            except queue.Empty:
                return out

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def study_identifier(query: StudyQuery) -> Dataset:
    """A STUDY-level C-FIND identifier for ``query`` (PS3.4 C.6.2.1.2, return keys empty)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = query.study_uid or ""
    ds.StudyDate = query.date_range() or ""
    ds.StudyTime = query.time_range() or ""
    ds.AccessionNumber = query.accession_number or ""
    ds.PatientID = query.patient_id or ""
    ds.ModalitiesInStudy = next(iter(query.modalities)) if len(query.modalities) == 1 else ""
    ds.StudyDescription = ""
    ds.NumberOfStudyRelatedSeries = None
    ds.NumberOfStudyRelatedInstances = None
    return ds


_STUDY_LEVEL_KEYWORDS: Final = frozenset(
    {
        "PatientID",
        "IssuerOfPatientID",
        "PatientSex",
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "TimezoneOffsetFromUTC",
        "AccessionNumber",
        "StudyDescription",
    }
)
_SERIES_LEVEL_KEYWORDS: Final = frozenset(
    {
        "Modality",
        "SeriesNumber",
        "BodyPartExamined",
        "InstitutionName",
        "Manufacturer",
        "ManufacturerModelName",
    }
)


def _present(found: Dataset, only: frozenset[str] | None = None) -> Dataset:
    """A C-FIND answer without its empty keys and QueryRetrieveLevel (optionally ``only``)."""
    out = Dataset()
    for element in found:
        keyword = element.keyword
        if keyword in ("QueryRetrieveLevel", "") or (only is not None and keyword not in only):
            continue
        if element.VR != "SQ" and element.value in (None, "", b"", []):
            continue
        out[element.tag] = element
    return out


def _sop_instance_in(uids: frozenset[str]) -> Callable[[Dataset], bool]:
    return lambda ds: str(ds.get("SOPInstanceUID", "")) in uids


class DimseSource:
    """``ImageSource`` over DIMSE: C-FIND to search, C-GET or C-MOVE per series (or per chosen
    instances) to fetch."""

    def __init__(
        self,
        client: DimseClient,
        *,
        retrieve: Literal["get", "move"] = "get",
        scp: StorageSCP | None = None,
        lookback_days: int = 1,
    ) -> None:
        if retrieve == "move" and scp is None:
            raise ConfigurationError("C-MOVE retrieval needs a StorageSCP")
        self.client = client
        self._retrieve = retrieve
        self._scp = scp
        self._lookback_days = lookback_days

    @classmethod
    def from_settings(cls, settings: PacsSettings) -> DimseSource:
        if not settings.dimse_host:
            raise ConfigurationError("pacs.dimse_host is required for DIMSE")
        endpoint = DimseEndpoint(
            settings.dimse_host,
            settings.dimse_port,
            settings.called_aet,
            settings.calling_aet,
            settings.dimse_timeout_s,
        )
        scp = None
        if settings.dimse_retrieve == "move":
            scp = StorageSCP(
                settings.scp_aet,
                settings.scp_host,
                settings.scp_port,
                timeout_s=settings.dimse_timeout_s,
            )
        return cls(
            DimseClient(endpoint, retries=settings),
            retrieve=settings.dimse_retrieve,
            scp=scp,
            lookback_days=settings.qido_watermark_lookback_days,
        )

    def close(self) -> None:
        if self._scp is not None:
            self._scp.stop()

    def _found(self, result: FindResult, study_uid: str | None) -> tuple[Dataset, ...]:
        if not result.status.ok:
            ref = study_reference(study_uid) if study_uid else "pacs"
            raise PacsError(
                f"{ref}: C-FIND failed with status 0x{result.status.code:04X} "
                f"({result.status.category})"
            )
        return result.matches

    def find_studies(self, query: StudyQuery) -> Iterator[StudyRef]:
        """C-FIND at STUDY level; modalities and offset/limit also checked here."""
        result = self.client.find(study_identifier(query))
        skipped = yielded = 0
        for ident in self._found(result, query.study_uid):
            study = StudyRef.from_dataset(ident)
            if not query.matches(study):
                continue
            if skipped < query.offset:
                skipped += 1
                continue
            if query.limit is not None and yielded >= query.limit:
                return
            yield study
            yielded += 1

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study_uid
        ident.SeriesInstanceUID = ""
        ident.Modality = ""
        ident.SeriesNumber = None
        ident.SeriesDescription = ""
        ident.NumberOfSeriesRelatedInstances = None
        found = self._found(self.client.find(ident), study_uid)
        return [SeriesRef.from_dataset(ds, study_uid) for ds in found]

    def list_instances(self, study_uid: str, series_uid: str) -> list[InstanceRef]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID = study_uid
        ident.SeriesInstanceUID = series_uid
        ident.SOPInstanceUID = ""
        ident.SOPClassUID = ""
        ident.InstanceNumber = None
        found = self._found(self.client.find(ident), study_uid)
        return [InstanceRef.from_dataset(ds, study_uid, series_uid) for ds in found]

    def iter_instances(self, study_uid: str, series_uid: str | None = None) -> Iterator[Dataset]:
        """One series at a time in memory (C-GET or C-MOVE at SERIES level)."""
        series = [series_uid] if series_uid else [s.series_uid for s in self.list_series(study_uid)]
        for uid in series:
            yield from sort_instances(self._fetch_series(study_uid, uid))

    def instance_headers(self, study_uid: str) -> list[Dataset]:
        """C-FIND at IMAGE level, series by series, for ``HEADER_KEYWORDS``.

        A key the PACS leaves empty is dropped (absent, not empty). Series and study attributes
        a PACS does not return at IMAGE level are taken from the SERIES and STUDY level answers.
        """
        study = self._study_attributes(study_uid)
        headers: list[Dataset] = []
        for series in self._series_attributes(study_uid):
            ident = Dataset()
            for keyword in HEADER_KEYWORDS:
                setattr(ident, keyword, None)
            ident.QueryRetrieveLevel = "IMAGE"
            ident.StudyInstanceUID = study_uid
            ident.SeriesInstanceUID = series.SeriesInstanceUID
            for found in self._found(self.client.find(ident), study_uid):
                header = _present(found)
                for inherited in (series, study):
                    for element in inherited:
                        if element.keyword not in header:
                            header[element.tag] = element
                headers.append(header)
        return sort_instances(headers)

    def _study_attributes(self, study_uid: str) -> Dataset:
        ident = Dataset()
        for keyword in HEADER_KEYWORDS:
            if keyword in _STUDY_LEVEL_KEYWORDS:
                setattr(ident, keyword, None)
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study_uid
        found = self._found(self.client.find(ident), study_uid)
        if not found:
            raise PacsNotFoundError(f"{study_reference(study_uid)}: not found on the PACS")
        return _present(found[0], only=_STUDY_LEVEL_KEYWORDS)

    def _series_attributes(self, study_uid: str) -> list[Dataset]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study_uid
        ident.SeriesInstanceUID = ""
        ident.Modality = ""
        ident.SeriesNumber = None
        ident.BodyPartExamined = ""
        ident.InstitutionName = ""
        ident.Manufacturer = ""
        ident.ManufacturerModelName = ""
        found = self._found(self.client.find(ident), study_uid)
        keep = frozenset({"SeriesInstanceUID", *_SERIES_LEVEL_KEYWORDS})
        return [_present(ds, only=keep) for ds in found if ds.get("SeriesInstanceUID")]

    def retrieve_instances(self, study_uid: str, headers: Sequence[Dataset]) -> list[Dataset]:
        """C-GET (or C-MOVE) at IMAGE level, one operation per series with the list of its
        SOP Instance UIDs (PS3.4 C.4.2.2.1, list of UID matching); returned in ``headers`` order.
        """
        wanted = [str(h.get("SOPInstanceUID", "")) for h in headers]
        by_series: dict[str, list[str]] = {}
        for header, sop_uid in zip(headers, wanted, strict=True):
            by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(sop_uid)
        got: dict[str, Dataset] = {}
        for series_uid, sop_uids in by_series.items():
            ident = Dataset()
            ident.QueryRetrieveLevel = "IMAGE"
            ident.StudyInstanceUID = study_uid
            ident.SeriesInstanceUID = series_uid
            ident.SOPInstanceUID = sop_uids[0] if len(sop_uids) == 1 else sop_uids
            for ds in self._fetch(ident, study_uid, _sop_instance_in(frozenset(sop_uids))):
                got[str(ds.SOPInstanceUID)] = ds
        missing = sum(1 for uid in wanted if uid not in got)
        if missing:
            raise PacsNotFoundError(
                f"{study_reference(study_uid)}: {missing} instance(s) not returned by the PACS"
            )
        return [got[uid] for uid in wanted]

    def _fetch_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study_uid
        ident.SeriesInstanceUID = series_uid
        return self._fetch(ident, study_uid, lambda ds: ds.get("SeriesInstanceUID") == series_uid)

    def _fetch(
        self, ident: Dataset, study_uid: str, belongs: Callable[[Dataset], bool]
    ) -> list[Dataset]:
        """C-GET or C-MOVE of ``ident``; with C-MOVE, what the SCP received that ``belongs``."""
        ref = study_reference(study_uid)
        if self._retrieve == "get":
            got: list[Dataset] = []
            result = self.client.get(ident, got.append)
            undecodable = result.undecodable
        else:
            assert self._scp is not None
            self._scp.start()
            before = self._scp.undecodable
            result = self.client.move(ident, self._scp.ae_title)
            got = [ds for ds in self._scp.drain() if belongs(ds)]
            undecodable = self._scp.undecodable - before
        for ds in got:
            try:
                check_instance(ds, study_uid)
            except ValueError as exc:
                raise InvalidDicomError(f"{ref}: malformed instance: {exc}") from exc
        if undecodable:
            raise InvalidDicomError(f"{ref}: {undecodable} instance(s) arrived malformed")
        if not result.status.ok:
            raise PacsError(
                f"{ref}: retrieve failed with status 0x{result.status.code:04X} "
                f"({result.failed} failed sub-operations)"
            )
        return got

    def new_studies_since(self, watermark: Watermark | None) -> tuple[list[StudyRef], Watermark]:
        floor = watermark.floor_date if watermark else None
        return advance_date_watermark(
            watermark, self.find_studies(StudyQuery(date_from=floor)), self._lookback_days
        )

    # -- pre-flight ---------------------------------------------------------------------------

    def ping(self) -> None:
        """A TCP connection to the PACS, then a C-ECHO on one association, one attempt each
        within the endpoint's timeout: that the PACS answers and accepts our AE titles
        (flows/preflight.py). No patient data.

        Raises ``PacsUnavailableError`` (no connection: chained to the socket's error, for its
        cause), ``PacsUnauthorizedError`` (association rejected) or ``PacsError`` (the echo
        failed).
        """
        import socket

        endpoint = self.client.endpoint
        try:
            socket.create_connection((endpoint.host, endpoint.port), endpoint.timeout_s).close()
        except OSError as exc:
            raise PacsUnavailableError(
                f"pacs: no connection to {endpoint.host}:{endpoint.port}"
            ) from exc
        once = DimseClient(endpoint, retries=HttpEdgeSettings(retry_attempts=1))
        try:
            status = once.echo()
        except PacsUnavailableError:
            raise PacsUnavailableError(
                "pacs: connected, but no DICOM association (is it the PACS's DICOM port?)"
            ) from None
        if not status.ok:
            raise PacsError(f"pacs: C-ECHO failed: status 0x{status.code & 0xFFFF:04X}")
