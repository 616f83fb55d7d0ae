"""DIMSE image source against the session's real Orthanc: C-ECHO, C-FIND, C-GET, C-MOVE.

Studies are put into Orthanc with STOW-RS (the DICOMweb connector), then read back over DIMSE.
Our calling AE title is the dev Orthanc's registered modality (``dev.scp_aet``), which is also the
C-MOVE destination: the project's storage SCP on ``dev.scp_port``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import numpy as np
import pytest
from pydicom.dataset import Dataset

from connectors.dicomweb import DicomWebSource
from connectors.dimse import DimseClient, DimseEndpoint, DimseSource, study_identifier
from connectors.factory import build_image_source
from connectors.pacs import ImageSource, StudyQuery
from medvlm.dev.servers import DevServers, OrthancInfo
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import PacsUnavailableError
from medvlm.settings import HttpEdgeSettings, PacsSettings
from tests.conftest import dimse_pacs_settings, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stow(orthanc: OrthancInfo) -> Iterator[DicomWebSource]:
    src = build_image_source(
        PacsSettings(
            kind="dicomweb",
            dicomweb_url=orthanc.dicomweb_url,
            auth="basic",
            username=orthanc.username,
            password=orthanc.password,
        )
    )
    assert isinstance(src, DicomWebSource)
    yield src
    src.close()


@pytest.fixture(scope="module")
def studies(stow: DicomWebSource) -> dict[str, list[Dataset]]:
    """A CT (2 series) and an MR study on 1985-01-01, a CR study on 1985-01-02."""
    made = {
        "CT": make_study("CT", series=2, instances_per_series=3, study_date="19850101", seed=601),
        "MR": make_study("MR", instances_per_series=2, study_date="19850101", seed=602),
        "CR": make_study("CR", study_date="19850102", seed=603),
    }
    for datasets in made.values():
        assert stow.store(datasets).failed == ()
    return made


@pytest.fixture
def source(orthanc: OrthancInfo, dev_servers: DevServers) -> Iterator[DimseSource]:
    src = build_image_source(dimse_pacs_settings(orthanc, dev_servers))
    assert isinstance(src, DimseSource)
    yield src
    src.close()


def test_dimse_source_satisfies_the_image_source_protocol(source: DimseSource) -> None:
    assert isinstance(source, ImageSource)


def test_echo_returns_success_status(source: DimseSource) -> None:
    status = source.client.echo()
    assert (status.code, status.category) == (0, "success")


# pynetdicom 3.0.4 leaks the socket of a refused connection (its _shutdown_socket calls
# shutdown() on an unconnected socket, which raises before close()); GC closes it with a
# ResourceWarning that is not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreachable_pacs_raises_unavailable() -> None:
    client = DimseClient(
        DimseEndpoint("127.0.0.1", free_port(), "NOBODY", "MEDVLM", 2.0),
        retries=HttpEdgeSettings(retry_attempts=1),
    )
    with pytest.raises(PacsUnavailableError):
        client.echo()


def test_find_by_date_and_modality_returns_only_matching_study(
    source: DimseSource, studies: dict[str, list[Dataset]]
) -> None:
    day = dt.date(1985, 1, 1)
    on_day = {s.study_uid for s in source.find_studies(StudyQuery(date_from=day, date_to=day))}
    assert on_day == {
        str(studies["CT"][0].StudyInstanceUID),
        str(studies["MR"][0].StudyInstanceUID),
    }

    query = StudyQuery(date_from=day, date_to=day, modalities=frozenset({"CT"}))
    [ct] = source.find_studies(query)
    assert ct.study_uid == str(studies["CT"][0].StudyInstanceUID)
    assert ct.modalities == {"CT"}
    assert ct.number_of_series == 2
    assert ct.number_of_instances == 6


def test_find_statuses_are_data(source: DimseSource, studies: dict[str, list[Dataset]]) -> None:
    result = source.client.find(
        study_identifier(StudyQuery(date_from=dt.date(1985, 1, 2), date_to=dt.date(1985, 1, 2)))
    )
    assert result.status.category == "success"
    assert [str(m.StudyInstanceUID) for m in result.matches] == [
        str(studies["CR"][0].StudyInstanceUID)
    ]
    none = source.client.find(study_identifier(StudyQuery(accession_number="NO-SUCH-ACC")))
    assert none.status.category == "success"
    assert none.matches == ()


def test_series_and_instances_are_listed(
    source: DimseSource, studies: dict[str, list[Dataset]]
) -> None:
    study_uid = str(studies["CT"][0].StudyInstanceUID)
    series = source.list_series(study_uid)
    assert sorted(s.series_number or 0 for s in series) == [1, 2]
    instances = source.list_instances(study_uid, series[0].series_uid)
    assert len(instances) == 3


def _assert_same_pixels(got: list[Dataset], sent: list[Dataset]) -> None:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sent}
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(by_uid)
    for ds in got:
        np.testing.assert_array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)


def test_c_get_streams_study_series_by_series_with_pixels_intact(
    source: DimseSource, studies: dict[str, list[Dataset]]
) -> None:
    sent = studies["CT"]
    got = list(source.iter_instances(str(sent[0].StudyInstanceUID)))
    _assert_same_pixels(got, sent)
    # instances of a series come out in acquisition order
    first_series = [int(ds.InstanceNumber) for ds in got[:3]]
    assert first_series == [1, 2, 3]


def test_c_move_delivers_study_to_the_project_scp(
    orthanc: OrthancInfo, dev_servers: DevServers, studies: dict[str, list[Dataset]]
) -> None:
    src = build_image_source(dimse_pacs_settings(orthanc, dev_servers, dimse_retrieve="move"))
    try:
        sent = studies["MR"]
        got = list(src.iter_instances(str(sent[0].StudyInstanceUID)))
        _assert_same_pixels(got, sent)
    finally:
        src.close()


def test_c_move_to_unknown_destination_is_a_failure_status(
    source: DimseSource, studies: dict[str, list[Dataset]]
) -> None:
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = str(studies["CR"][0].StudyInstanceUID)
    result = source.client.move(ident, "NOT_A_MODALITY")
    assert result.status.category == "failure"
    assert result.completed == 0


def test_c_move_reports_completed_suboperations(
    source: DimseSource, dev_servers: DevServers, studies: dict[str, list[Dataset]]
) -> None:
    from connectors.dimse import StorageSCP

    dev = dev_servers.settings
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = str(studies["CT"][0].StudyInstanceUID)
    with StorageSCP(dev.scp_aet, "127.0.0.1", dev.scp_port) as scp:
        result = source.client.move(ident, dev.scp_aet)
        received = scp.drain()
    assert (result.status.category, result.completed, result.failed) == ("success", 6, 0)
    assert len(received) == 6


def test_c_find_watermark_reports_only_new_studies(
    source: DimseSource, stow: DicomWebSource
) -> None:
    _, mark = source.new_studies_since(None)
    added = make_study("CR", study_date=dt.date.today(), accession="DIMSE-WM", seed=604)
    assert stow.store(added).failed == ()
    new, mark = source.new_studies_since(mark)
    assert [s.study_uid for s in new] == [str(added[0].StudyInstanceUID)]
    assert source.new_studies_since(mark)[0] == []
