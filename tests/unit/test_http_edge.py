"""The one ``Retry-After`` rule of every network edge (medvlm/http_edge.py): parsed, waited for
up to the cap, refused at once over it; the PACS edge (connectors/dicomweb.py) follows it as the
EHR's does (tests/unit/test_fhir_read_side.py)."""

from __future__ import annotations

import contextlib
import email.utils
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from connectors.dicomweb import HttpEdge
from medvlm.errors import PacsUnavailableError
from medvlm.http_edge import retry_after_s, retry_after_wait
from medvlm.settings import EhrSettings, HttpEdgeSettings, PacsSettings

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)


def _http_error(status: int, retry_after: str | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return requests.HTTPError(response=response)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (email.utils.format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        (email.utils.format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),  # past: now
        ("Sun, 02 Nov 2026 12:00:30", 30.0),  # no zone: GMT, as RFC 9110 dates are
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_delta_seconds_or_an_http_date(value: str | None, seconds: float) -> None:
    assert retry_after_s(value, now=NOW) == seconds


class _Busy(Exception):
    def __init__(self, retry_after: str | None) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


def _waits(edge: HttpEdgeSettings, *answers: str | None) -> tuple[list[float], list[str]]:
    """The waits of a call failing with ``answers`` (Retry-After values) then succeeding."""
    waits: list[float] = []
    refused: list[str] = []
    left = list(answers)

    def call() -> str:
        if left:
            raise _Busy(left.pop(0))
        return "ok"

    def refuse(state: object, why: str) -> Exception:
        refused.append(why)
        return RuntimeError(why)

    wait = retry_after_wait(
        edge,
        retry_after=lambda exc: exc.retry_after if isinstance(exc, _Busy) else None,
        refuse=refuse,
        setting="pacs.retry_after_max_s",
    )
    retrying = Retrying(
        retry=retry_if_exception_type(_Busy),
        stop=stop_after_attempt(10),
        wait=wait,
        sleep=waits.append,
        reraise=True,
    )
    with contextlib.suppress(RuntimeError):  # refused: ``refuse``'s error ends the call
        assert retrying(call) == "ok"
    return waits, refused


def test_the_servers_retry_after_replaces_the_backoff_and_its_absence_keeps_it() -> None:
    edge = HttpEdgeSettings(
        retry_initial_backoff_s=0.5, retry_max_backoff_s=1.0, retry_after_max_s=30
    )
    waits, refused = _waits(edge, "3", None, "30", "junk")
    assert waits[0] == 3.0 and waits[2] == 30.0  # longer than the backoff's cap: still waited
    assert 0 < waits[1] <= 1.5 and 0 < waits[3] <= 1.5  # backoff (with jitter)
    assert refused == []


def test_a_retry_after_over_the_cap_is_refused_at_once_naming_the_setting() -> None:
    waits, refused = _waits(HttpEdgeSettings(retry_after_max_s=60), "3600")
    assert waits == []
    assert refused == [
        "the server asked to retry after 3600 s, over the 60 s cap (pacs.retry_after_max_s); "
        "not retried"
    ]


def test_the_cap_is_one_setting_of_every_edge() -> None:
    for model in (HttpEdgeSettings, PacsSettings, EhrSettings):
        field = model.model_fields["retry_after_max_s"]
        assert field.default == 120.0 and "Retry-After" in str(field.description)
    assert PacsSettings(kind="folder", retry_after_max_s=5).retry_after_max_s == 5


def test_the_pacs_edge_waits_for_retry_after_within_the_cap() -> None:
    answers = [_http_error(503, "1"), _http_error(429, "0")]
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if answers:
            raise answers.pop(0)
        return "ok"

    edge = HttpEdge(HttpEdgeSettings(retry_initial_backoff_s=0.0, retry_max_backoff_s=0.0))
    assert edge.call(flaky, study_uid=None, what="QIDO-RS") == "ok"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.95  # the server's second, not the (zero) backoff


def test_the_pacs_edge_refuses_a_retry_after_over_the_cap_without_the_url() -> None:
    calls = []

    def busy() -> None:
        calls.append(1)
        raise _http_error(503, "3600")

    edge = HttpEdge(HttpEdgeSettings(retry_after_max_s=10))
    started = time.monotonic()
    with pytest.raises(PacsUnavailableError) as raised:
        edge.call(busy, study_uid=None, what="QIDO-RS")
    assert time.monotonic() - started < 1.0 and len(calls) == 1
    assert str(raised.value) == (
        "pacs: QIDO-RS: PACS answered 503, the server asked to retry after 3600 s, over the "
        "10 s cap (pacs.retry_after_max_s); not retried"
    )
    # Not chained: the library's message would print the request URL with its query.
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
