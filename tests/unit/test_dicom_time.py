from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pydicom
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom.valuerep import DA, TM

from medvlm.dev.sample_data import sample_file
from pipeline.dicom_time import (
    fhir_datetime,
    parse_da,
    parse_tm,
    parse_utc_offset,
    study_instant,
)

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")
UTC = dt.UTC


# --- DA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["20240115", "2024.01.15", "2024-01-15", "20240115 ", " 20240115\x00", b"20240115"],
)
def test_da_standard_and_legacy_forms_parse_to_the_same_date(value: object) -> None:
    assert parse_da(value) == dt.date(2024, 1, 15)


def test_da_already_converted_by_pydicom_is_returned_as_a_plain_date() -> None:
    parsed = parse_da(DA("20240115"))
    assert parsed == dt.date(2024, 1, 15)
    assert type(parsed) is dt.date


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "2024011",  # too short
        "202401150",  # too long
        "20240230",  # no 30 February
        "20241301",  # no month 13
        "2024.01-15",  # mixed separators
        "+2024010",  # a sign where a digit belongs
        "2024 115",
        "20240115-20240116",  # a range (query syntax), not a date
        "abcdefgh",
        20240115,  # not text
        b"\xff\xfe",  # not ASCII
    ],
)
def test_garbage_da_is_none_not_an_exception(value: object) -> None:
    assert parse_da(value) is None


# --- TM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10", dt.time(10, 0)),
        ("1015", dt.time(10, 15)),
        ("101500", dt.time(10, 15, 0)),
        ("101500.5", dt.time(10, 15, 0, 500000)),
        ("101500.123456", dt.time(10, 15, 0, 123456)),
        ("10:15:00", dt.time(10, 15, 0)),
        ("10:15", dt.time(10, 15)),
        ("10:15:00.25", dt.time(10, 15, 0, 250000)),
        ("101500 ", dt.time(10, 15, 0)),
        ("101500\x00", dt.time(10, 15, 0)),
        (b"0000", dt.time(0, 0)),
        ("235959", dt.time(23, 59, 59)),
    ],
)
def test_tm_standard_and_acr_nema_forms_parse(value: object, expected: dt.time) -> None:
    assert parse_tm(value) == expected


def test_leap_second_becomes_second_59_without_a_warning() -> None:
    # pytest turns warnings into errors here, so pydicom's own TM (which warns) would fail.
    assert parse_tm("235960") == dt.time(23, 59, 59)
    assert parse_tm("23:59:60.5") == dt.time(23, 59, 59, 500000)


def test_tm_already_converted_by_pydicom_is_returned_as_a_plain_time() -> None:
    parsed = parse_tm(TM("101500"))
    assert parsed == dt.time(10, 15)
    assert type(parsed) is dt.time


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "1",
        "24",  # no hour 24
        "1060",  # no minute 60
        "106",
        "101561",  # second 61 does not exist even as a leap second
        "101500.",  # a dot needs at least one digit
        "101500.1234567",  # at most 6 fraction digits
        "10:1",
        "10:15:",
        "1015:00",  # mixed forms
        "10.15",
        "-1015",
        "abc",
        "101500-101600",  # a range (query syntax), not a time
        101500,
    ],
)
def test_garbage_tm_is_none_not_an_exception(value: object) -> None:
    assert parse_tm(value) is None


# --- TimezoneOffsetFromUTC --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "hours", "minutes"),
    [
        ("+0100", 1, 0),
        ("-0500", -5, 0),
        ("+0530", 5, 30),
        ("-0330", -3, -30),
        ("+0000", 0, 0),
        ("+1400", 14, 0),
        ("-1200", -12, 0),
        ("+0100 ", 1, 0),
    ],
)
def test_utc_offset_parses_to_a_fixed_timezone(value: str, hours: int, minutes: int) -> None:
    zone = parse_utc_offset(value)
    assert zone is not None
    assert zone.utcoffset(None) == dt.timedelta(hours=hours, minutes=minutes)


@pytest.mark.parametrize(
    "value", [None, "", "0100", "+01:00", "+1401", "-1201", "+0160", "+100", "UTC", "+01000"]
)
def test_invalid_utc_offset_is_none(value: object) -> None:
    assert parse_utc_offset(value) is None


# --- the study's instant ----------------------------------------------------------------------


def test_legacy_study_time_with_dicom_offset_gives_the_right_utc_instant() -> None:
    started = study_instant("20240115", "10:15:00", "+0100", BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.utcoffset() == dt.timedelta(hours=1)
    assert started.astimezone(UTC) == dt.datetime(2024, 1, 15, 9, 15, tzinfo=UTC)


def test_dicom_offset_wins_over_the_site_zone() -> None:
    started = study_instant("20240715", "101500", "-0500", BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2024, 7, 15, 15, 15, tzinfo=UTC)


def test_without_offset_winter_study_is_read_in_site_standard_time() -> None:
    started = study_instant("20240115", "101500", None, BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2024, 1, 15, 9, 15, tzinfo=UTC)


def test_without_offset_summer_study_is_read_in_site_daylight_time() -> None:
    started = study_instant("20240715", "101500", "", BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2024, 7, 15, 8, 15, tzinfo=UTC)


def test_unreadable_offset_falls_back_to_the_site_zone() -> None:
    started = study_instant("20240715", "101500", "+01:00", BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2024, 7, 15, 8, 15, tzinfo=UTC)


def test_ambiguous_wall_time_when_clocks_go_back_is_its_first_occurrence() -> None:
    # 27 Oct 2024, Berlin: 02:00-03:00 happens twice; fold=0 is the first, still at +02:00.
    started = study_instant("20241027", "023000", None, BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC)


def test_non_existent_wall_time_when_clocks_go_forward_uses_the_offset_before_the_gap() -> None:
    # 31 Mar 2024, Berlin: 02:00-03:00 does not exist; 02:30 is read at +01:00 (01:30 UTC) and
    # returned as the real local time 03:30 +02:00.
    started = study_instant("20240331", "023000", None, BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2024, 3, 31, 1, 30, tzinfo=UTC)
    assert (started.hour, started.minute) == (3, 30)
    assert started.utcoffset() == dt.timedelta(hours=2)


@pytest.mark.parametrize("study_time", [None, "", "garbage", "2500"])
def test_date_without_a_usable_time_keeps_date_precision(study_time: object) -> None:
    started = study_instant("20240115", study_time, "+0100", BERLIN)
    assert started == dt.date(2024, 1, 15)
    assert not isinstance(started, dt.datetime)  # not midnight UTC


@pytest.mark.parametrize("study_date", [None, "", "20241301", "not a date", "15.01.2024"])
def test_no_valid_study_date_gives_no_instant(study_date: object) -> None:
    assert study_instant(study_date, "101500", "+0100", BERLIN) is None


def test_real_ct_header_offset_is_applied() -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"), stop_before_pixels=True)
    assert ds.TimezoneOffsetFromUTC == "-0500"
    started = study_instant(ds.StudyDate, ds.StudyTime, ds.TimezoneOffsetFromUTC, BERLIN)
    assert isinstance(started, dt.datetime)
    assert started.astimezone(UTC) == dt.datetime(2004, 1, 19, 12, 27, 30, tzinfo=UTC)


# --- FHIR dateTime ----------------------------------------------------------------------------


def test_fhir_datetime_of_a_date_is_date_only() -> None:
    assert fhir_datetime(dt.date(2024, 1, 15)) == "2024-01-15"


def test_fhir_datetime_keeps_the_offset_and_fraction() -> None:
    value = dt.datetime(2024, 1, 15, 10, 15, 0, 250000, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert fhir_datetime(value) == "2024-01-15T10:15:00.250000+01:00"


def test_fhir_datetime_of_a_study_instant_is_valid_fhir_for_the_same_instant() -> None:
    started = study_instant("20240715", "101500", None, BERLIN)
    assert isinstance(started, dt.datetime)
    text = fhir_datetime(started)
    assert text == "2024-07-15T10:15:00+02:00"
    report = DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": {"text": "x"},
            "effectiveDateTime": text,
        }
    )
    assert report.effectiveDateTime == started


def test_offset_with_seconds_is_written_in_utc_so_fhir_accepts_it() -> None:
    # Before 1893 Berlin used local mean time, +00:53:28, which FHIR cannot express.
    old = dt.datetime(1890, 1, 1, 12, 0, tzinfo=BERLIN)
    text = fhir_datetime(old)
    assert text.endswith("+00:00")
    assert dt.datetime.fromisoformat(text) == old
    report = DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "x"},
            "effectiveDateTime": text,
        }
    )
    assert report.effectiveDateTime == old


def test_naive_datetime_is_refused_because_fhir_needs_an_offset() -> None:
    with pytest.raises(ValueError, match="offset"):
        fhir_datetime(dt.datetime(2024, 1, 15, 10, 15))
