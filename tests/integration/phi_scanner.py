"""Find distinctive patient data (PHI) in text, files, folders and SQLite databases, and say
where each hit is without showing the value.

A ``Phi`` is one value (a name part, an MRN, an accession number, a birth date) with the label a
hit is reported as. It is searched for in the forms it takes when software copies it around:

- names: as given, upper-cased (``ß`` → ``SS``), case-insensitively, NFC and NFD, folded to
  ASCII (``Zyxwövä`` → ``Zyxwova``), JSON ``\\u`` escapes (once and twice escaped),
  percent-encoded UTF-8, HTML numeric character references; in UTF-8 and in Latin-1 bytes
  (DICOM ISO_IR 100). A name with ``^`` (DICOM PN), "Given Family" or upper case contains its
  parts, so the parts are what is searched for;
- MRNs and accession numbers: the distinctive part without its ``MRN-``/``ACC-`` prefix, so a
  reformatted identifier is found too;
- birth dates: ``YYYY-MM-DD``, DICOM ``YYYYMMDD`` (not inside a longer number), ``YYYY/MM/DD``,
  ``YYYY.MM.DD`` (ACR-NEMA), ``DD.MM.YYYY``, ``MM/DD/YYYY``, ``DD/MM/YYYY`` and Python's
  ``date(Y, M, D)``;
- digests (an unkeyed hash of an identifier, which a list of candidate identifiers reverses):
  as they are.

A hit is reported as where it is (file, table and column, offset) and its context with every
value replaced by its label: the report itself carries no PHI.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

CONTEXT = 70  # characters shown either side of a hit

_ASCII_EXTRA = {"ß": "ss", "Þ": "Th", "þ": "th", "Ð": "D", "ð": "d", "Ł": "L", "ł": "l", "Ø": "O"}


@dataclass(frozen=True)
class Phi:
    label: str  # how a hit is reported ("patient A MRN")
    value: str
    kind: str  # name | mrn | accession | birth_date | digest


@dataclass(frozen=True)
class Hit:
    where: str
    label: str
    context: str  # masked

    def __str__(self) -> str:
        return f"{self.where}: {self.label}: …{self.context}…"


def _ascii_fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(_ASCII_EXTRA.get(c, c) for c in kept)


def _json_escaped(text: str) -> str:
    return json.dumps(text)[1:-1]


def forms(phi: Phi) -> set[str]:
    """The spellings of ``phi`` searched for (matched case-insensitively)."""
    value = phi.value
    if phi.kind == "name":
        found = {
            value,
            value.upper(),
            unicodedata.normalize("NFC", value),
            unicodedata.normalize("NFD", value),
            _ascii_fold(value),
            _json_escaped(value),
            _json_escaped(_json_escaped(value)),
            quote(value, safe=""),
            "".join(c if ord(c) < 128 else f"&#{ord(c)};" for c in value),
            "".join(c if ord(c) < 128 else f"&#x{ord(c):x};" for c in value),
        }
        return {f for f in found if f}
    if phi.kind == "digest":  # a hash of an identifier: only as it is
        return {value}
    if phi.kind in ("mrn", "accession"):
        _, _, core = value.partition("-")
        return {core or value}
    if phi.kind == "birth_date":
        day = dt.date.fromisoformat(value)
        return {
            day.isoformat(),
            day.strftime("%Y%m%d"),
            day.strftime("%Y/%m/%d"),
            day.strftime("%Y.%m.%d"),
            day.strftime("%d.%m.%Y"),
            day.strftime("%m/%d/%Y"),
            day.strftime("%d/%m/%Y"),
            f"date({day.year}, {day.month}, {day.day})",
        }
    raise ValueError(f"unknown kind {phi.kind!r}")


def _alternation(spellings: Iterable[str]) -> str:
    parts = []
    for spelling in sorted(set(spellings), key=len, reverse=True):
        escaped = re.escape(spelling)
        parts.append(rf"(?<!\d){escaped}(?!\d)" if spelling[0].isdigit() else escaped)
    return "|".join(parts)


def _regex(phis: list[Phi], keep: Callable[[str], bool]) -> re.Pattern[str] | None:
    groups = []
    for i, phi in enumerate(phis):
        spellings = [f for f in forms(phi) if keep(f)]
        if spellings:
            groups.append(f"(?P<p{i}>{_alternation(spellings)})")
    return re.compile("|".join(groups), re.IGNORECASE) if groups else None


def _latin1(spelling: str) -> bool:
    """Non-ASCII and encodable in Latin-1: may occur in Latin-1 bytes (ASCII ones are found
    in the UTF-8 reading already)."""
    try:
        spelling.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not spelling.isascii()


_CONTROL = re.compile(r"[\x00-\x1f\x7f\ufffd]")


class Scanner:
    """Searches for a set of ``Phi`` in one pass per text."""

    def __init__(self, phis: Iterable[Phi]) -> None:
        self.phis = list(phis)
        # Regular expressions mask contexts; plain searches find the hits (see ``_scan``).
        self._utf8 = _regex(self.phis, lambda _f: True)
        self._latin1 = _regex(self.phis, _latin1)
        self._needles = sorted(
            {
                (i, spelling.lower(), spelling[0].isdigit())
                for i, phi in enumerate(self.phis)
                for spelling in forms(phi)
            }
        )
        self._latin1_needles = [n for n in self._needles if _latin1(n[1])]

    def without(self, *kinds: str) -> Scanner:
        return Scanner(p for p in self.phis if p.kind not in kinds)

    def _label(self, match: re.Match[str]) -> str:
        assert match.lastgroup is not None
        return self.phis[int(match.lastgroup[1:])].label

    def mask(self, text: str) -> str:
        """``text`` with every value replaced by «its label», control characters escaped."""
        for pattern in (self._utf8, self._latin1):
            if pattern is not None:
                text = pattern.sub(lambda m: f"«{self._label(m)}»", text)
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)

    def scan_text(self, text: str, where: str) -> list[Hit]:
        return self._scan(self._needles, text, where)

    def _scan(self, needles: list[tuple[int, str, bool]], text: str, where: str) -> list[Hit]:
        """Hits of ``needles`` (phi index, lower-cased spelling, digits only) in ``text``.

        ``str.find`` over the lower-cased text: a regular expression of all spellings with
        IGNORECASE reads ~0.3 MB/s, too slow for Ray's logs."""
        lowered = text.lower()
        shown = text if len(lowered) == len(text) else lowered  # offsets valid in ``shown``
        found: set[tuple[int, int, int]] = set()
        for index, needle, digits in needles:
            at = lowered.find(needle)
            while at != -1:
                end = at + len(needle)
                if not digits or not (
                    (at > 0 and lowered[at - 1].isdigit())
                    or (end < len(lowered) and lowered[end].isdigit())
                ):
                    found.add((at, end, index))
                at = lowered.find(needle, at + 1)
        hits = []
        for start, end, index in sorted(found):
            context = self.mask(
                shown[self._edge(shown, start - CONTEXT) : self._edge(shown, end + CONTEXT)]
            )
            hits.append(Hit(f"{where} @{start}", self.phis[index].label, context))
        return hits

    def _edge(self, text: str, at: int) -> int:
        """``at`` within ``text``, moved off any value it would cut in two (a context must not
        show part of a value unmasked)."""
        at = min(max(at, 0), len(text))
        near = text[max(0, at - 200) : at + 200]
        offset = max(0, at - 200)
        for pattern in (self._utf8, self._latin1):
            if pattern is None:
                continue
            for match in pattern.finditer(near):
                start, end = match.start() + offset, match.end() + offset
                if start < at < end:
                    return end
        return at

    def scan_bytes(self, data: bytes, where: str) -> list[Hit]:
        """UTF-8 reading, then (if not ASCII) a Latin-1 reading for Latin-1 spellings."""
        hits = self._scan(self._needles, data.decode("utf-8", errors="replace"), where)
        if not data.isascii():
            latin1 = data.decode("latin-1")
            hits += self._scan(self._latin1_needles, latin1, f"{where} (latin-1)")
        return hits

    def scan_file(self, path: Path, where: str | None = None) -> list[Hit]:
        return self.scan_bytes(path.read_bytes(), where or str(path))

    def scan_tree(
        self, root: Path, *, exclude: Iterable[Path] = (), skip: Iterable[Path] = ()
    ) -> tuple[list[Hit], list[Path]]:
        """Every name (files, folders, sockets, links) and every regular file's content under
        ``root`` (symbolic links not followed); ``exclude``: folders left out, ``skip``: files
        whose content is left out (scanned otherwise by the caller). Returns the hits and the
        files whose content was scanned."""
        excluded = {p.resolve() for p in exclude}
        skipped = {p.resolve() for p in skip}
        hits: list[Hit] = []
        scanned: list[Path] = []
        for path in _entries(root, excluded):
            hits += self.scan_text(str(path.relative_to(root)), f"name under {root}")
            if not path.is_file() or path.is_symlink() or path.resolve() in skipped:
                continue
            try:
                hits += self.scan_file(path)
            except OSError:  # vanished meanwhile
                continue
            scanned.append(path)
        return hits, scanned

    def scan_sqlite(
        self,
        path: Path,
        *,
        allowed: Callable[[str, str, dict[str, Any], Any], Any] | None = None,
    ) -> tuple[list[Hit], dict[str, int]]:
        """Every text and blob value of every table of the SQLite database at ``path`` (with
        its ``-wal``: read from a copy). ``allowed(table, column, row, value)`` returns what
        of a value to scan (``None``: nothing) where the caller allows some PHI by design.
        Returns the hits and the row count per table."""
        hits: list[Hit] = []
        counts: dict[str, int] = {}
        for table, column, index, row, value in _sqlite_values(path):
            counts[table] = max(counts.get(table, 0), index + 1)
            if allowed is not None:
                value = allowed(table, column, row, value)
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            if isinstance(value, str):
                hits += self.scan_text(value, f"{path.name}: {table}.{column} (row {index})")
        return hits, counts


def _entries(root: Path, excluded: set[Path]) -> Iterator[Path]:
    """Everything under ``root`` but the ``excluded`` folders, folders before their content."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excluded)
        for name in [*dirnames, *sorted(filenames)]:
            yield here / name


def _sqlite_values(path: Path) -> Iterator[tuple[str, str, int, dict[str, Any], Any]]:
    """(table, column, row index, row, value) of every cell, from a copy of the database (and
    its write-ahead log) so that the original is not touched."""
    with tempfile.TemporaryDirectory(prefix="phi-sqlite-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + "-wal")
        if wal.is_file():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        with closing(sqlite3.connect(copy)) as db:
            tables = [
                name
                for (name,) in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
            for table in tables:
                cursor = db.execute(f'SELECT * FROM "{table}"')
                columns = [d[0] for d in cursor.description]
                for index, values in enumerate(cursor):
                    row = dict(zip(columns, values, strict=True))
                    for column, value in row.items():
                        yield table, column, index, row, value


def report(hits: list[Hit], limit: int = 200) -> str:
    """The hits, one per line, grouped by where they are (at most ``limit`` lines)."""
    lines = [str(hit) for hit in hits[:limit]]
    if len(hits) > limit:
        lines.append(f"… and {len(hits) - limit} more")
    return "\n".join(lines)
