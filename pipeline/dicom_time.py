"""Lenient DICOM dates and times, and the instant a study started. Pure functions, no I/O.

DICOM DA and TM values (PS3.5 6.2, Table 6.2-1) are local wall-clock values without a zone;
the SOP Common attribute TimezoneOffsetFromUTC (0008,0201) (PS3.3 C.12.1, Table C.12-1), when
present, says which offset they are in. Without it the only honest reading is "the site's local
time", so ``study_instant`` takes the site's zone from the caller (a ``zoneinfo.ZoneInfo``)
and never guesses UTC.

Old devices still write the ACR-NEMA 300 forms that PS3.5 6.2 asks readers to accept for
backward compatibility (``YYYY.MM.DD``, ``HH:MM:SS.frac``), and some write ISO ``YYYY-MM-DD``.
These are accepted; anything else is ``None`` rather than an exception, because an unreadable
header time must lower the precision of a study's time, not fail the study.

pydicom's ``valuerep.DA``/``TM`` are not used: they reject the ``YYYY-MM-DD`` and ``HH:MM``
forms, accept signs and spaces inside the digits (``int()`` on slices), and warn on second 60.
Values must never be echoed into messages (dates are quasi-identifiers); nothing here logs.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["fhir_datetime", "parse_da", "parse_tm", "parse_utc_offset", "study_instant"]

# DA: YYYYMMDD, or the ACR-NEMA YYYY.MM.DD / ISO YYYY-MM-DD forms (one separator throughout).
_DA = re.compile(r"(\d{4})([.-]?)(\d{2})\2(\d{2})")
# TM: HH, HHMM, HHMMSS, HHMMSS.F{1,6} (PS3.5 Table 6.2-1); second 60 is a leap second.
_TM = re.compile(r"([01]\d|2[0-3])(?:([0-5]\d)(?:([0-5]\d|60)(?:\.(\d{1,6}))?)?)?")
# The ACR-NEMA form PS3.5 6.2 mentions for backward compatibility: HH:MM[:SS[.frac]].
_TM_LEGACY = re.compile(r"([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d|60)(?:\.(\d{1,6}))?)?")
# TimezoneOffsetFromUTC: "&ZZXX", & = + or - (PS3.3 C.12.1, Table C.12-1).
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")
# The range PS3.5 Table 6.2-1 gives for the offset suffix of DT: -1200 to +1400.
_OFFSET_MIN = dt.timedelta(hours=-12)
_OFFSET_MAX = dt.timedelta(hours=14)


def _text(value: object) -> str | None:
    """A header value as text with DICOM padding (spaces, trailing NULs) removed."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    return value.strip(" \x00\t\r\n")


def parse_da(value: object) -> dt.date | None:
    """A DA value (PS3.5 6.2, Table 6.2-1: ``YYYYMMDD``) as a date, or None if unreadable.

    Also accepts the ACR-NEMA ``YYYY.MM.DD`` form (PS3.5 6.2 asks readers to keep accepting
    it) and ``YYYY-MM-DD``; padding spaces and NULs are stripped. A ``datetime.date`` (e.g.
    pydicom's ``DA`` with ``datetime_conversion`` on) is returned as a plain date. Empty,
    malformed or impossible dates (``20230230``), ranges and multi-values give None.
    """
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return dt.date(value.year, value.month, value.day)
    text = _text(value)
    match = _DA.fullmatch(text) if text else None
    if match is None:
        return None
    try:
        return dt.date(int(match[1]), int(match[3]), int(match[4]))
    except ValueError:
        return None


def parse_tm(value: object) -> dt.time | None:
    """A TM value (PS3.5 6.2, Table 6.2-1) as a naive time of day, or None if unreadable.

    Accepts ``HH``, ``HHMM``, ``HHMMSS`` and ``HHMMSS.F`` to ``HHMMSS.FFFFFF``, and the
    ACR-NEMA ``HH:MM`` / ``HH:MM:SS(.ffffff)`` form PS3.5 6.2 notes for backward
    compatibility. Second 60 (a leap second, allowed by PS3.5) becomes 59 because
    ``datetime.time`` has no second 60. Padding is stripped; anything else gives None.
    """
    if isinstance(value, dt.time):
        return dt.time(value.hour, value.minute, value.second, value.microsecond)
    text = _text(value)
    if not text:
        return None
    match = _TM.fullmatch(text) or _TM_LEGACY.fullmatch(text)
    if match is None:
        return None
    hour, minute, second, fraction = match.groups()
    return dt.time(
        int(hour),
        int(minute or 0),
        min(int(second or 0), 59),
        int(fraction.ljust(6, "0")) if fraction else 0,
    )


def parse_utc_offset(value: object) -> dt.timezone | None:
    """TimezoneOffsetFromUTC (0008,0201) ``+HHMM``/``-HHMM`` as a fixed offset, or None.

    PS3.3 C.12.1 (Table C.12-1) defines the encoding ``&ZZXX``; offsets outside the range
    PS3.5 Table 6.2-1 allows (``-1200`` to ``+1400``) or with minutes above 59 are invalid.
    """
    if isinstance(value, dt.timezone):
        return value
    text = _text(value)
    match = _OFFSET.fullmatch(text) if text else None
    if match is None:
        return None
    sign, hours, minutes = match[1], int(match[2]), int(match[3])
    if minutes > 59:
        return None
    offset = dt.timedelta(hours=hours, minutes=minutes) * (-1 if sign == "-" else 1)
    if not _OFFSET_MIN <= offset <= _OFFSET_MAX:
        return None
    return dt.timezone(offset)


def study_instant(
    study_date: object, study_time: object, tz_offset: object, site_tz: dt.tzinfo
) -> dt.datetime | dt.date | None:
    """When the study started: an aware datetime, a date (date precision only), or None.

    ``study_date``/``study_time`` are StudyDate (0008,0020) and StudyTime (0008,0030), local
    wall-clock values (PS3.5 6.2); ``tz_offset`` is TimezoneOffsetFromUTC (0008,0201), which
    when valid says which offset they are in (PS3.3 C.12.1). Without a valid offset the wall
    time is read in ``site_tz`` (a ``zoneinfo.ZoneInfo``), following its DST rules:

    - an ambiguous wall time (the repeated hour when clocks go back) is read with ``fold=0``,
      i.e. as its first occurrence (still on summer time);
    - a non-existent wall time (the skipped hour when clocks go forward, e.g. 02:30 in
      Europe/Berlin on the last Sunday of March) is read, as ``zoneinfo`` does for ``fold=0``
      (PEP 495), with the offset in force before the transition: 02:30 +01:00 = 01:30 UTC,
      returned normalised to the real local time 03:30 +02:00.

    The result is returned in that zone (or offset), so ``.astimezone(datetime.UTC)`` is the
    correct instant. A valid date with a missing or unreadable time gives the ``date`` alone:
    its precision is a day, and midnight UTC would be a fabricated instant. No valid date
    gives None.
    """
    day = parse_da(study_date)
    if day is None:
        return None
    time_of_day = parse_tm(study_time)
    if time_of_day is None:
        return day
    wall = dt.datetime.combine(day, time_of_day)
    offset = parse_utc_offset(tz_offset)
    if offset is not None:
        return wall.replace(tzinfo=offset)
    local = wall.replace(tzinfo=site_tz, fold=0)
    # Round trip through UTC so a wall time in a DST gap comes back as a real local time.
    return local.astimezone(dt.UTC).astimezone(site_tz)


def fhir_datetime(value: dt.datetime | dt.date) -> str:
    """A FHIR ``dateTime`` string (FHIR R4 Datatypes, primitive ``dateTime``): ``YYYY-MM-DD``
    for a date, ``YYYY-MM-DDThh:mm:ss[.ffffff]+zz:zz`` for an aware datetime.

    FHIR requires an offset whenever a time is given, so a naive datetime is a ``ValueError``.
    FHIR offsets have minute precision; an offset with seconds (``zoneinfo`` LMT before
    standard time) is written as the same instant in UTC.
    """
    if isinstance(value, dt.datetime):
        offset = value.utcoffset()
        if offset is None:
            raise ValueError("a FHIR dateTime with a time needs a UTC offset; got a naive value")
        if offset % dt.timedelta(minutes=1):
            value = value.astimezone(dt.UTC)
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"expected datetime.date or datetime.datetime, got {type(value).__name__}")
