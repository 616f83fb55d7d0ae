"""Connector plumbing without a server: settings validation, HTTP session, retry policy, types."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from connectors.dicomweb import HttpEdge, build_session, is_transient
from connectors.pacs import StudyQuery, StudyRef, Watermark, advance_date_watermark
from medvlm.errors import (
    InvalidDicomError,
    PacsNotFoundError,
    PacsUnauthorizedError,
    PacsUnavailableError,
)
from medvlm.settings import HttpEdgeSettings, MedvlmSettings, PacsSettings
from pipeline.imaging import study_reference

pytestmark = pytest.mark.unit


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(response=response)


def test_dicomweb_settings_without_url_fail_at_startup() -> None:
    with pytest.raises(ValidationError, match="dicomweb_url"):
        PacsSettings(kind="dicomweb")
    with pytest.raises(ValidationError, match="basic"):
        PacsSettings(kind="dicomweb", dicomweb_url="https://pacs/dicom-web", auth="basic")


def test_pacs_settings_load_from_environment_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDVLM_HOME", str(tmp_path))
    monkeypatch.setenv("MEDVLM_PACS__KIND", "dicomweb")
    monkeypatch.setenv("MEDVLM_PACS__DICOMWEB_URL", "https://pacs.example/dicom-web")
    monkeypatch.setenv("MEDVLM_PACS__AUTH", "bearer")
    monkeypatch.setenv("MEDVLM_PACS__TOKEN", "s3cret-token")
    pacs = MedvlmSettings().pacs
    assert pacs.verify_tls is True
    assert pacs.token is not None and pacs.token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(pacs)


def test_session_carries_auth_and_tls_settings(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    bearer = build_session(
        PacsSettings(
            kind="dicomweb",
            dicomweb_url="https://pacs/dicom-web",
            auth="bearer",
            token_file=token_file,
            ca_bundle=ca,
        )
    )
    assert bearer.headers["Authorization"] == "Bearer from-file"
    assert bearer.verify == str(ca)
    assert bearer.trust_env is False
    basic = build_session(
        PacsSettings(
            kind="dicomweb", dicomweb_url="https://p", auth="basic", username="u", password="p"
        )
    )
    assert basic.auth == ("u", "p")
    assert basic.verify is True


def test_only_network_errors_and_429_5xx_gateway_errors_are_retried() -> None:
    assert is_transient(requests.ConnectionError())
    assert is_transient(requests.Timeout())
    assert all(is_transient(_http_error(s)) for s in (429, 502, 503, 504))
    assert not any(is_transient(_http_error(s)) for s in (400, 401, 403, 404, 500))


def test_edge_retries_transient_failures_then_succeeds() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _http_error(503)
        return "ok"

    assert (
        HttpEdge(HttpEdgeSettings(retry_attempts=3, retry_initial_backoff_s=0.01)).call(
            flaky, study_uid=None, what="x"
        )
        == "ok"
    )
    assert len(calls) == 3


def test_edge_does_not_retry_client_errors_and_translates_them() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise _http_error(401)

    with pytest.raises(PacsUnauthorizedError) as info:
        HttpEdge(HttpEdgeSettings(retry_attempts=5, retry_initial_backoff_s=0.01)).call(
            refused, study_uid="1.2.3", what="QIDO-RS"
        )
    assert len(calls) == 1
    # Not chained: the library's message would print the request URL (test_phi_in_errors.py).
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert str(info.value).startswith(study_reference("1.2.3"))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_http_error(404), PacsNotFoundError),
        (_http_error(503), PacsUnavailableError),
        (requests.ConnectionError(), PacsUnavailableError),
        (ValueError("bad part"), InvalidDicomError),
    ],
)
def test_library_errors_map_to_one_pacs_error_each(
    exc: BaseException, expected: type[Exception]
) -> None:
    assert isinstance(HttpEdge.translate(exc, study_uid="1.2", what="x"), expected)


def test_study_ref_never_prints_patient_id() -> None:
    ref = StudyRef(study_uid="1.2.3", patient_id="MRN-998877")
    assert "MRN-998877" not in repr(ref)
    assert "MRN-998877" not in repr(StudyQuery(patient_id="MRN-998877"))


def test_date_watermark_moves_forward_and_forgets_old_uids() -> None:
    d = dt.date(2024, 5, 10)
    first = [StudyRef("1", study_date=d), StudyRef("2", study_date=d + dt.timedelta(days=3))]
    new, mark = advance_date_watermark(None, first, lookback_days=1)
    assert [s.study_uid for s in new] == ["1", "2"]
    assert mark.floor_date == d + dt.timedelta(days=2)
    assert mark.seen_uids == {"2"}  # "1" is older than the floor: it will not be queried again
    again, _ = advance_date_watermark(mark, [first[1]], lookback_days=1)
    assert again == []
    assert Watermark.from_dict(mark.to_dict()) == mark
