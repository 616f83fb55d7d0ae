"""DICOMweb image source against the session's real Orthanc (QIDO-RS, WADO-RS, STOW-RS).

Studies are synthetic (``medvlm.dev.synthetic_dicom``) or pydicom's sample files with fresh UIDs,
each test on its own StudyDate so that tests sharing the session's Orthanc do not see each other.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any, ClassVar

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from connectors.dicomweb import DicomWebSource
from connectors.factory import build_image_source
from connectors.pacs import ImageSource, StudyQuery
from medvlm.dev.sample_data import sample_file
from medvlm.dev.servers import OrthancInfo
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import InvalidDicomError, PacsUnauthorizedError
from medvlm.settings import PacsSettings
from pipeline.imaging import study_reference

pytestmark = pytest.mark.integration


def _settings(orthanc: OrthancInfo, **extra: Any) -> PacsSettings:
    return orthanc.pacs_settings(
        page_size=5, retry_attempts=2, connect_timeout_s=5, read_timeout_s=30, **extra
    )


@pytest.fixture(scope="module")
def source(orthanc: OrthancInfo) -> Iterator[DicomWebSource]:
    src = build_image_source(_settings(orthanc))
    assert isinstance(src, DicomWebSource)
    yield src
    src.close()


def _store(source: DicomWebSource, datasets: list[Dataset]) -> None:
    result = source.store(datasets)
    assert result.failed == ()
    assert set(result.stored) == {str(ds.SOPInstanceUID) for ds in datasets}


def test_dicomweb_source_satisfies_the_image_source_protocol(source: DicomWebSource) -> None:
    assert isinstance(source, ImageSource)


@pytest.mark.parametrize(
    ("modality", "series", "per_series"), [("CR", 1, 1), ("CT", 2, 3), ("US", 1, 2)]
)
def test_stored_study_comes_back_with_identical_pixels(
    source: DicomWebSource, modality: Any, series: int, per_series: int
) -> None:
    sent = make_study(
        modality,
        series=series,
        instances_per_series=per_series,
        study_date="19800102",
        accession=f"RT-{modality}",
        seed=11,
    )
    _store(source, sent)
    study_uid = str(sent[0].StudyInstanceUID)

    [ref] = source.find_studies(StudyQuery(study_uid=study_uid))
    assert ref.modalities == {modality}
    assert ref.accession_number == f"RT-{modality}"
    assert ref.number_of_series == series
    assert ref.number_of_instances == series * per_series
    assert "SYN-0001" not in repr(ref)  # patient id is kept but never printed

    listed = source.list_series(study_uid)
    assert len(listed) == series
    for s in listed:
        assert len(source.list_instances(study_uid, s.series_uid)) == per_series

    by_uid = {str(ds.SOPInstanceUID): ds for ds in sent}
    got = list(source.iter_instances(study_uid))
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(by_uid)
    for ds in got:
        np.testing.assert_array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)

    one_series = list(source.iter_instances(study_uid, listed[0].series_uid))
    assert len(one_series) == per_series
    assert {str(ds.SeriesInstanceUID) for ds in one_series} == {listed[0].series_uid}


def test_frames_are_retrieved_as_uncompressed_bytes(source: DicomWebSource) -> None:
    sent = make_study("CT", instances_per_series=2, study_date="19800103", seed=12)
    _store(source, sent)
    ds = sent[1]
    [frame] = source.retrieve_frames(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), [1]
    )
    assert frame == ds.PixelData


def test_paging_yields_every_study_once_across_pages(source: DicomWebSource) -> None:
    day = dt.date(1981, 5, 6)
    uids = set()
    for i in range(12):  # page_size is 5: three pages
        study = make_study("CR", study_date=day, accession=f"PG-{i:02d}", seed=100 + i)
        _store(source, study)
        uids.add(str(study[0].StudyInstanceUID))
    one_day = StudyQuery(date_from=day, date_to=day)
    found = [s.study_uid for s in source.find_studies(one_day)]
    assert sorted(found) == sorted(uids)

    with_modality = StudyQuery(date_from=day, date_to=day, modalities=frozenset({"CR"}))
    assert {s.study_uid for s in source.find_studies(with_modality)} == uids
    other_modality = StudyQuery(date_from=day, date_to=day, modalities=frozenset({"MR"}))
    assert list(source.find_studies(other_modality)) == []

    window = StudyQuery(date_from=day, date_to=day, limit=4, offset=3)
    assert [s.study_uid for s in source.find_studies(window)] == found[3:7]


def test_date_window_selects_exactly_the_studies_inside_it(source: DicomWebSource) -> None:
    by_day: dict[dt.date, str] = {}
    for d in range(1, 6):
        day = dt.date(1982, 3, d)
        study = make_study("CT", instances_per_series=1, study_date=day, seed=200 + d)
        _store(source, study)
        by_day[day] = str(study[0].StudyInstanceUID)
    query = StudyQuery(date_from=dt.date(1982, 3, 2), date_to=dt.date(1982, 3, 4))
    found = {s.study_uid for s in source.find_studies(query)}
    assert found == {by_day[dt.date(1982, 3, d)] for d in (2, 3, 4)}


def test_wildcard_query_values_are_refused(source: DicomWebSource) -> None:
    with pytest.raises(ValueError, match="wildcard"):
        list(source.find_studies(StudyQuery(accession_number="AB*")))


def test_qido_watermark_reports_only_studies_added_after_it(source: DicomWebSource) -> None:
    _, mark = source.new_studies_since(None)
    today = dt.date.today()
    added = [make_study("MR", study_date=today, accession=f"WM-{i}", seed=300 + i) for i in (1, 2)]
    for study in added:
        _store(source, study)

    new, mark2 = source.new_studies_since(mark)
    assert {s.study_uid for s in new} == {str(st[0].StudyInstanceUID) for st in added}
    again, _ = source.new_studies_since(mark2)
    assert again == []
    # the watermark survives a round trip through JSON (it is persisted between runs)
    from connectors.pacs import Watermark

    assert Watermark.from_dict(json.loads(json.dumps(mark2.to_dict()))) == mark2


def test_orthanc_change_feed_reports_only_new_stable_studies(
    orthanc: OrthancInfo, dev_servers: Any
) -> None:
    settings = _settings(
        orthanc, new_study_detection="orthanc_changes", orthanc_url=orthanc.http_url
    )
    src = build_image_source(settings)
    stable_age = dev_servers.settings.orthanc_stable_age_s
    try:
        time.sleep(stable_age + 1.5)  # let studies stored by earlier tests become stable first
        _, mark = src.new_studies_since(None)
        added = [
            make_study("CR", study_date="19830101", accession=f"CH-{i}", seed=400 + i)
            for i in (1, 2)
        ]
        for study in added:
            _store(src, study)  # type: ignore[arg-type]
        expected = {str(st[0].StudyInstanceUID) for st in added}
        seen: set[str] = set()
        deadline = time.monotonic() + stable_age + 15
        while seen != expected and time.monotonic() < deadline:
            new, mark = src.new_studies_since(mark)
            seen |= {s.study_uid for s in new}
            assert seen <= expected, "reported a study that was not added after the watermark"
            time.sleep(0.5)
        assert seen == expected
        nothing, _ = src.new_studies_since(mark)
        assert nothing == []
    finally:
        src.close()


def _fresh_uids(ds: Dataset, name: str) -> Dataset:
    """Sample files share UIDs with each other: give each its own so the PACS keeps all."""
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", name])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", name])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["sop", name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = "19840101"
    return ds


@pytest.mark.parametrize(
    "name",
    [
        "RG1_J2KR.dcm",  # JPEG 2000 lossless, a real chest radiograph
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_RLE.dcm",  # RLE lossless
        "emri_small.dcm",  # multi-frame MR
    ],
)
def test_sample_files_round_trip_byte_identical(source: DicomWebSource, name: str) -> None:
    original = _fresh_uids(pydicom.dcmread(sample_file(name)), name)
    _store(source, [original])
    [back] = source.iter_instances(str(original.StudyInstanceUID))
    assert back.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert back.PixelData == original.PixelData
    np.testing.assert_array_equal(back.pixel_array, original.pixel_array)


def test_wrong_password_raises_unauthorized(orthanc: OrthancInfo) -> None:
    src = build_image_source(_settings(orthanc, password="not-the-password"))
    try:
        with pytest.raises(PacsUnauthorizedError) as info:
            list(src.find_studies(StudyQuery(limit=1)))
        assert orthanc.password.get_secret_value() not in str(info.value)
    finally:
        src.close()


# -- a server that answers garbage for one study ----------------------------------------------
# Orthanc cannot be made to send a malformed payload, so this tiny loopback server plays a
# DICOMweb PACS: QIDO lists three studies, WADO-RS answers a valid multipart for two and a
# multipart whose part is not DICOM for the third. It also answers 503 once, to show retries.


def _part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class _FakePacs(BaseHTTPRequestHandler):
    studies: ClassVar[dict[str, bytes]] = {}
    qido: ClassVar[list[dict[str, Any]]] = []
    unavailable_once: ClassVar[list[bool]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.unavailable_once:
            self.unavailable_once.pop()
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if parts == ["dicom-web", "studies"]:
            query = self.path.split("?", 1)[1] if "?" in self.path else ""
            body = json.dumps(self.qido if "offset=0" in query or "offset" not in query else [])
            self._send(200, "application/dicom+json", body.encode())
            return
        if len(parts) == 3 and parts[:2] == ["dicom-web", "studies"] and parts[2] in self.studies:
            boundary = "b0undary"
            payload = (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + self.studies[parts[2]]
                + f"\r\n--{boundary}--\r\n".encode()
            )
            ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
            self._send(200, ctype, payload)
            return
        self._send(404, "text/plain", b"no")

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_pacs() -> Iterator[tuple[str, list[str], str]]:
    good = [make_study("CR", accession=f"OK-{i}", seed=500 + i)[0] for i in (1, 2)]
    bad_uid = generate_uid(entropy_srcs=["bad-study"])
    studies = {str(ds.StudyInstanceUID): _part10(ds) for ds in good}
    studies[bad_uid] = b"\x00garbage, not a DICOM part\x00" * 20
    order = [str(good[0].StudyInstanceUID), bad_uid, str(good[1].StudyInstanceUID)]
    _FakePacs.studies = studies
    _FakePacs.qido = [
        {
            "0020000D": {"vr": "UI", "Value": [uid]},
            "00080020": {"vr": "DA", "Value": ["20240115"]},
            "00080061": {"vr": "CS", "Value": ["CR"]},
        }
        for uid in order
    ]
    _FakePacs.unavailable_once = [True]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dicom-web", order, bad_uid
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_malformed_payload_fails_only_its_study(fake_pacs: tuple[str, list[str], str]) -> None:
    url, order, bad_uid = fake_pacs
    settings = PacsSettings(kind="dicomweb", dicomweb_url=url, retry_attempts=3, page_size=10)
    src = build_image_source(settings)
    fetched: dict[str, int] = {}
    failures: dict[str, str] = {}
    try:
        for ref in src.find_studies(StudyQuery()):  # the first answer is a 503: retried
            try:
                fetched[ref.study_uid] = len(list(src.iter_instances(ref.study_uid)))
            except InvalidDicomError as exc:
                failures[ref.study_uid] = str(exc)
    finally:
        src.close()
    assert fetched == {order[0]: 1, order[2]: 1}
    assert list(failures) == [bad_uid]
    assert failures[bad_uid].startswith(study_reference(bad_uid))
    assert "malformed DICOM payload" in failures[bad_uid]
    assert bad_uid not in failures[bad_uid]
    assert _FakePacs.unavailable_once == []  # the 503 was answered, and retried past
