"""DICOMweb image source (PS3.18): QIDO-RS search, WADO-RS retrieve, STOW-RS store.

Built on ``dicomweb-client``'s ``DICOMwebClient`` over one long-lived ``requests.Session``
(auth none/basic/bearer, TLS verification on by default with an optional CA bundle, finite
connect/read timeouts). Retries (tenacity) live only at the I/O edge, in ``HttpEdge``: connection
errors, timeouts and HTTP 429/502/503/504, never other 4xx; after the server's ``Retry-After`` up
to ``pacs.retry_after_max_s`` (a longer one fails the call at once), else after a backoff.
Library exceptions are translated to ``medvlm.errors`` in ``HttpEdge.translate`` and nowhere
else.

Server quirks are handled by settings, not by server names: query values are exact (wildcards are
refused, since some servers do not decode percent-encoded values: Orthanc quirk 1);
``qido_filter_modalities_client_side`` pages by date and filters modalities here (Orthanc quirk 2);
frames are asked for with an explicit media type (quirk 3); stored datasets get a preamble
(quirk 4).

What this module must not do: log URLs or query values (they may carry a patient ID), or hold a
whole study in memory (WADO-RS responses are streamed part by part; ``instance_headers`` fetches
metadata only and ``retrieve_instances`` one instance per request).
"""

from __future__ import annotations

import copy
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying

from connectors.circuit import CircuitBreaker
from connectors.pacs import (
    ChangeFeed,
    InstanceRef,
    SeriesRef,
    StoreResult,
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
    PacsDownError,
    PacsError,
    PacsNotFoundError,
    PacsUnauthorizedError,
    PacsUnavailableError,
)
from medvlm.http_edge import retry_after_wait, retry_policy
from medvlm.settings import HttpEdgeSettings, PacsSettings
from pipeline.imaging import study_reference

T = TypeVar("T")

# dicomweb-client logs request URLs (with query values such as PatientID) at DEBUG/INFO, and
# urllib3 logs each request line (the URL with its query) at DEBUG.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)

RETRY_STATUS: Final = frozenset({429, 502, 503, 504})
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"
FRAME_MEDIA_TYPES: Final = (("application/octet-stream", EXPLICIT_VR_LITTLE_ENDIAN),)
STUDY_FIELDS: Final = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "PatientID",
)
SERIES_FIELDS: Final = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_FIELDS: Final = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames")
_WILDCARDS: Final = frozenset("*?\\")
_PARSE_ERRORS: Final = (PydicomInvalidDicomError, ValueError, EOFError, struct.error, KeyError)


def _status_of(exc: BaseException | None) -> int | None:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    return None


def _header_of(exc: BaseException | None, name: str) -> str | None:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        value = exc.response.headers.get(name)
        return str(value) if value is not None else None
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: network trouble or 429/502/503/504 (never other 4xx)."""
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    return _status_of(exc) in RETRY_STATUS


class HttpEdge:
    """Retries and exception translation for every HTTP call to the PACS, in one place."""

    def __init__(self, settings: HttpEdgeSettings, breaker: CircuitBreaker | None = None) -> None:
        self._settings = settings
        self.breaker = breaker

    def call(self, fn: Callable[[], T], *, study_uid: str | None, what: str) -> T:
        """Run ``fn`` with retries; library errors come out as ``PacsError`` subclasses.

        With a breaker: nothing is sent while the PACS is known down (``PacsDownError``), and a
        call that spends its retry budget without an answer marks it down."""
        breaker = self.breaker
        ref = f"{study_reference(study_uid) if study_uid else 'pacs'}: {what}"
        if breaker is not None:
            breaker.check(ref)
        retrying = Retrying(
            **retry_policy(self._settings, retry_on=is_transient, wait=self._wait(ref))
        )
        try:
            result = retrying(fn)
        except (requests.RequestException, *_PARSE_ERRORS) as exc:
            if breaker is not None and is_transient(exc):
                status = _status_of(exc)
                cause = f"HTTP {status}" if status else type(exc).__name__
                raise breaker.failed(cause, ref) from None
            if breaker is not None and isinstance(exc, requests.HTTPError):
                breaker.succeeded()  # it answered, with an error of this call's own
            raise self.translate(exc, study_uid=study_uid, what=what) from None
        if breaker is not None:
            breaker.succeeded()
        return result

    def _wait(self, ref: str) -> Callable[[RetryCallState], float]:
        """The server's ``Retry-After`` (429/503) up to ``pacs.retry_after_max_s``, else
        backoff; a longer one fails the call at once (``PacsUnavailableError``)."""

        def refuse(state: RetryCallState, why: str) -> PacsError:
            exc = state.outcome.exception() if state.outcome is not None else None
            return PacsUnavailableError(f"{ref}: PACS answered {_status_of(exc)}, {why}")

        return retry_after_wait(
            self._settings,
            retry_after=lambda exc: _header_of(exc, "Retry-After"),
            refuse=refuse,
            setting="pacs.retry_after_max_s",
        )

    @staticmethod
    def translate(exc: BaseException, *, study_uid: str | None, what: str) -> PacsError:
        """The one mapping from requests/pydicom exceptions to the project's PACS errors.

        Raised ``from None`` by every caller: the library's message names the request URL with
        its query (an AccessionNumber, a PatientID) or a header value, and a chained exception
        would print it in every traceback (stderr, Prefect's log table). Only its type is kept.
        """
        ref = study_reference(study_uid) if study_uid else "pacs"
        status = _status_of(exc)
        if status in (401, 403):
            return PacsUnauthorizedError(f"{ref}: {what}: PACS refused the credentials ({status})")
        if status == 404:
            return PacsNotFoundError(f"{ref}: {what}: not found on the PACS")
        if status is not None and (status in RETRY_STATUS or status >= 500):
            return PacsUnavailableError(f"{ref}: {what}: PACS answered {status}")
        if status is not None:
            return PacsError(f"{ref}: {what}: PACS answered {status}")
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return PacsUnavailableError(f"{ref}: {what}: {type(exc).__name__}")
        if isinstance(exc, requests.RequestException):
            return PacsError(f"{ref}: {what}: {type(exc).__name__}")
        return InvalidDicomError(f"{ref}: {what}: malformed DICOM payload ({type(exc).__name__})")


def build_session(settings: PacsSettings) -> requests.Session:
    """One pooled session with auth and TLS settings; environment variables are ignored."""
    session = requests.Session()
    session.trust_env = False  # no proxy or CA bundle from the environment: settings decide
    # Keep-alive connections for every study fetched at once (requests keeps 10 by default).
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=settings.max_connections)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = str(settings.ca_bundle) if settings.ca_bundle else settings.verify_tls
    if settings.auth == "basic":
        if settings.username is None or settings.password is None:
            raise ConfigurationError("pacs.auth 'basic' needs pacs.username and pacs.password")
        session.auth = (settings.username, settings.password.get_secret_value())
    elif settings.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {_bearer_token(settings)}"
    return session


def _bearer_token(settings: PacsSettings) -> str:
    if settings.token is not None:
        return settings.token.get_secret_value()
    if settings.token_file is None:
        raise ConfigurationError("pacs.auth 'bearer' needs pacs.token or pacs.token_file")
    try:
        return Path(settings.token_file).read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"pacs.token_file unreadable: {exc.strerror}") from exc


def _exact(key: str, value: str) -> str:
    """A QIDO matching value used for exact matching; wildcards are refused (quirk 1)."""
    if any(c in _WILDCARDS for c in value):
        raise ValueError(f"{key}: wildcard or multi-value matching is not supported")
    return value


class DicomWebSource:
    """``ImageSource`` over DICOMweb. Receives a client (and its session) built elsewhere."""

    def __init__(
        self,
        client: DICOMwebClient,
        *,
        page_size: int = 100,
        transfer_syntax: str = "*",
        filter_modalities_client_side: bool = False,
        lookback_days: int = 1,
        edge: HttpEdge | None = None,
        change_feed: ChangeFeed | None = None,
        session: requests.Session | None = None,
    ) -> None:
        client.set_http_retry_params(retry=False)  # retries are ours (HttpEdge), not doubled
        self._client = client
        self._page_size = page_size
        self._media_types = (("application/dicom", transfer_syntax),)
        self._client_side_modalities = filter_modalities_client_side
        self._lookback_days = lookback_days
        self._edge = edge or HttpEdge(HttpEdgeSettings(retry_attempts=3, retry_max_backoff_s=5.0))
        self._change_feed = change_feed
        self._session = session

    @classmethod
    def from_settings(
        cls,
        settings: PacsSettings,
        *,
        session: requests.Session | None = None,
        change_feed: Callable[[requests.Session, HttpEdge], ChangeFeed] | None = None,
    ) -> DicomWebSource:
        """A source from settings; ``change_feed`` builds the new-study feed on the same
        session and edge (connectors.factory passes Orthanc's when configured)."""
        if not settings.dicomweb_url:
            raise ConfigurationError("pacs.dicomweb_url is required for DICOMweb")
        owned = session is None
        http = build_session(settings) if session is None else session
        client = DICOMwebClient(
            settings.dicomweb_url,
            session=http,
            timeout=(settings.connect_timeout_s, settings.read_timeout_s),
        )
        url = settings.dicomweb_url.rstrip("/")

        def probe() -> None:
            """One QIDO-RS study search for a single result, no retry."""
            answer = http.get(
                f"{url}/studies",
                params={"limit": "1"},
                headers={"Accept": "application/dicom+json"},
                timeout=(settings.connect_timeout_s, settings.read_timeout_s),
            )
            if answer.status_code >= 500 or answer.status_code == 429:
                raise PacsUnavailableError(f"PACS probe: HTTP {answer.status_code}")

        breaker = CircuitBreaker(
            "PACS", url, probe, probe_interval_s=settings.probe_interval_s, error=PacsDownError
        )
        edge = HttpEdge(settings, breaker)
        return cls(
            client,
            page_size=settings.page_size,
            transfer_syntax=settings.wado_transfer_syntax,
            filter_modalities_client_side=settings.qido_filter_modalities_client_side,
            lookback_days=settings.qido_watermark_lookback_days,
            edge=edge,
            change_feed=change_feed(http, edge) if change_feed is not None else None,
            session=http if owned else None,
        )

    def close(self) -> None:
        """Close the session if this source built it."""
        if self._session is not None:
            self._session.close()

    # -- QIDO-RS ------------------------------------------------------------------------------

    def _filters(self, query: StudyQuery) -> tuple[dict[str, str], bool]:
        """QIDO filters for ``query`` and whether modalities must be checked client-side."""
        filters: dict[str, str] = {}
        if (dates := query.date_range()) is not None:
            filters["StudyDate"] = dates
        if (times := query.time_range()) is not None:
            filters["StudyTime"] = times
        if query.accession_number:
            filters["AccessionNumber"] = _exact("AccessionNumber", query.accession_number)
        if query.patient_id:
            filters["PatientID"] = _exact("PatientID", query.patient_id)
        if query.study_uid:
            filters["StudyInstanceUID"] = _exact("StudyInstanceUID", query.study_uid)
        client_side = bool(query.modalities) and (
            self._client_side_modalities or len(query.modalities) > 1
        )
        if query.modalities and not client_side:
            filters["ModalitiesInStudy"] = _exact("ModalitiesInStudy", next(iter(query.modalities)))
        return filters, client_side

    def _pages(
        self, search: Callable[[int, int], list[dict[str, Any]]], *, study_uid: str | None
    ) -> Iterator[Dataset]:
        offset = 0
        while True:
            page = self._edge.call(
                partial(search, self._page_size, offset), study_uid=study_uid, what="QIDO-RS"
            )
            for item in page:
                try:
                    yield Dataset.from_json(item)
                except _PARSE_ERRORS as exc:
                    raise self._edge.translate(exc, study_uid=study_uid, what="QIDO-RS") from None
            if len(page) < self._page_size:
                return
            offset += len(page)

    def find_studies(self, query: StudyQuery) -> Iterator[StudyRef]:
        """QIDO-RS SearchForStudies paged with limit/offset; ``query.limit/offset`` apply here."""
        filters, client_side = self._filters(query)

        def search(limit: int, offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_studies(
                limit=limit, offset=offset, fields=list(STUDY_FIELDS), search_filters=filters
            )

        skipped = yielded = 0
        if query.limit == 0:
            return
        for ds in self._pages(search, study_uid=query.study_uid):
            study = StudyRef.from_dataset(ds)
            if client_side and not query.matches(study):
                continue
            if skipped < query.offset:
                skipped += 1
                continue
            yield study
            yielded += 1
            if query.limit is not None and yielded >= query.limit:
                return

    def list_series(self, study_uid: str) -> list[SeriesRef]:
        def search(limit: int, offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_series(
                study_uid, limit=limit, offset=offset, fields=list(SERIES_FIELDS)
            )

        return [
            SeriesRef.from_dataset(ds, study_uid) for ds in self._pages(search, study_uid=study_uid)
        ]

    def list_instances(self, study_uid: str, series_uid: str) -> list[InstanceRef]:
        def search(limit: int, offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_instances(
                study_uid, series_uid, limit=limit, offset=offset, fields=list(INSTANCE_FIELDS)
            )

        return [
            InstanceRef.from_dataset(ds, study_uid, series_uid)
            for ds in self._pages(search, study_uid=study_uid)
        ]

    # -- WADO-RS ------------------------------------------------------------------------------

    def iter_instances(self, study_uid: str, series_uid: str | None = None) -> Iterator[Dataset]:
        """WADO-RS RetrieveStudy/RetrieveSeries, streamed one multipart part at a time."""
        if series_uid is None:
            stream = self._edge.call(
                lambda: self._client.iter_study(study_uid, media_types=self._media_types),
                study_uid=study_uid,
                what="WADO-RS study",
            )
        else:
            stream = self._edge.call(
                lambda: self._client.iter_series(
                    study_uid, series_uid, media_types=self._media_types
                ),
                study_uid=study_uid,
                what="WADO-RS series",
            )
        yield from self._checked(stream, study_uid)

    def instance_headers(self, study_uid: str) -> list[Dataset]:
        """WADO-RS RetrieveStudyMetadata: every instance's attributes, without pixel data.

        Bulk data (pixel data, and any value the server moved out as a BulkDataURI) is left out
        and never fetched.
        """
        what = "WADO-RS metadata"
        items = self._edge.call(
            lambda: self._client.retrieve_study_metadata(study_uid),
            study_uid=study_uid,
            what=what,
        )
        headers: list[Dataset] = []
        for item in items:
            try:
                headers.append(Dataset.from_json(_without_bulk_data(item), _no_bulk_data))
            except _PARSE_ERRORS as exc:
                raise self._edge.translate(exc, study_uid=study_uid, what=what) from None
        return sort_instances(headers)

    def retrieve_instances(self, study_uid: str, headers: Sequence[Dataset]) -> list[Dataset]:
        """WADO-RS RetrieveInstance for each header (one request, one instance in memory each)."""
        what = "WADO-RS instance"
        out: list[Dataset] = []
        for header in headers:
            series_uid = str(header.get("SeriesInstanceUID", ""))
            sop_uid = str(header.get("SOPInstanceUID", ""))
            if not series_uid or not sop_uid:
                raise PacsNotFoundError(
                    f"{study_reference(study_uid)}: {what}: header without series or SOP UID"
                )
            ds = self._edge.call(
                partial(
                    self._client.retrieve_instance,
                    study_uid,
                    series_uid,
                    sop_uid,
                    media_types=self._media_types,
                ),
                study_uid=study_uid,
                what=what,
            )
            try:
                check_instance(ds, study_uid)
                if str(ds.SOPInstanceUID) != sop_uid:
                    raise ValueError("the PACS returned another instance than asked for")
            except _PARSE_ERRORS as exc:
                raise self._edge.translate(exc, study_uid=study_uid, what=what) from None
            out.append(ds)
        return out

    def _checked(self, stream: Iterator[Dataset], study_uid: str) -> Iterator[Dataset]:
        what = "WADO-RS"
        while True:
            try:
                ds = next(stream)
                check_instance(ds, study_uid)
            except StopIteration:
                return
            except (requests.RequestException, *_PARSE_ERRORS) as exc:
                raise self._edge.translate(exc, study_uid=study_uid, what=what) from None
            yield ds

    def retrieve_frames(
        self, study_uid: str, series_uid: str, sop_instance_uid: str, frames: Sequence[int]
    ) -> list[bytes]:
        """WADO-RS RetrieveFrames (1-based numbers), uncompressed little endian bytes."""
        return self._edge.call(
            lambda: self._client.retrieve_instance_frames(
                study_uid,
                series_uid,
                sop_instance_uid,
                frame_numbers=list(frames),
                media_types=FRAME_MEDIA_TYPES,
            ),
            study_uid=study_uid,
            what="WADO-RS frames",
        )

    # -- STOW-RS ------------------------------------------------------------------------------

    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """STOW-RS StoreInstances in one request (a study at a time is the intended unit)."""
        prepared = [_with_preamble(ds) for ds in datasets]
        study_uid = str(prepared[0].StudyInstanceUID) if prepared else None
        answer = self._edge.call(
            lambda: self._client.store_instances(prepared), study_uid=study_uid, what="STOW-RS"
        )
        stored = tuple(
            str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])
        )
        failed = tuple(
            (str(item.ReferencedSOPInstanceUID), int(item.get("FailureReason", 0)))
            for item in answer.get("FailedSOPSequence", [])
        )
        return StoreResult(stored=stored, failed=failed)

    # -- new studies --------------------------------------------------------------------------

    @property
    def change_feed(self) -> ChangeFeed | None:
        """The PACS's own new-study feed this source follows (Orthanc's), if configured."""
        return self._change_feed

    def new_studies_since(self, watermark: Watermark | None) -> tuple[list[StudyRef], Watermark]:
        """Orthanc /changes when configured, else a QIDO StudyDate window + seen UIDs."""
        if self._change_feed is not None:
            since = watermark.change_seq if watermark else None
            uids, last = self._change_feed.stable_studies_since(since)
            studies: list[StudyRef] = []
            for uid in uids:
                found = next(iter(self.find_studies(StudyQuery(study_uid=uid, limit=1))), None)
                if found is not None:  # deleted since it became stable: nothing to do
                    studies.append(found)
            return studies, Watermark(change_seq=last)
        floor = watermark.floor_date if watermark else None
        found_all = self.find_studies(StudyQuery(date_from=floor))
        return advance_date_watermark(watermark, found_all, self._lookback_days)

    # -- pre-flight ---------------------------------------------------------------------------

    def ping(self) -> None:
        """One QIDO-RS SearchForStudies, one attempt, within the client's timeouts: that the
        PACS answers and accepts our credentials (flows/preflight.py). It asks for a study UID
        that no study has (``limit=1``), so no patient data travels.

        Raises ``PacsUnauthorizedError`` (401/403), ``PacsUnavailableError`` (no connection,
        timeout, 5xx) or ``PacsError``, chained to the library's exception for its cause (this
        request's URL holds no patient value).
        """
        nobody = {"StudyInstanceUID": "2.25.0"}
        try:
            self._client.search_for_studies(limit=1, search_filters=nobody)
        except (requests.RequestException, *_PARSE_ERRORS) as exc:
            raise HttpEdge.translate(exc, study_uid=None, what="QIDO-RS (pre-flight)") from exc


_PIXEL_TAGS: Final = frozenset({"7FE00008", "7FE00009", "7FE00010"})


def _without_bulk_data(item: dict[str, Any]) -> dict[str, Any]:
    """A DICOM JSON dataset (PS3.18 F.2) without pixel data and top-level BulkDataURI values."""
    return {
        tag: value
        for tag, value in item.items()
        if tag.upper() not in _PIXEL_TAGS
        and not (isinstance(value, dict) and "BulkDataURI" in value)
    }


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    """Bulk data nested in sequences is not fetched: the header keeps an empty value."""
    return None


def _with_preamble(ds: Dataset) -> Dataset:
    """A shallow copy with a 128-byte preamble (PS3.10 §7.1; Orthanc quirk 4)."""
    if getattr(ds, "preamble", None) is not None:
        return ds
    out = copy.copy(ds)
    out.preamble = b"\0" * 128
    return out
