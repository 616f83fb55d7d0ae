"""The EHR as a folder in FHIR Bulk Data layout: ``Patient.ndjson``, ``ServiceRequest.ndjson``, …

One resource per line, one file per resource type (the output layout of FHIR Bulk Data
``$export``). It is the embedded default source of context and the sink of drafts when no FHIR
server is configured.

Reads parse each file once: a per-file cache keyed by the file's identity (``st_dev``,
``st_ino``; the open file is held so its inode number cannot be reused) keeps the parsed lines,
an index of what is looked up (id, identifier value, tag code, subject, ``basedOn`` order) and
the byte offset parsed so far. Each read stats the file: the same inode no shorter than that
offset → only the complete lines appended since are parsed; another inode (a rewrite, here or by
another process) or a shorter file → parsed again from the start. A last line without its
newline is a torn append when it does not parse (skipped), a complete resource otherwise.

Writes are idempotent by identifier (conditional create implemented here, FHIR R4
http.html#ccreate semantics), under an exclusive ``flock`` on ``.lock`` so concurrent writers
(threads or processes) do not lose each other's lines. New lines are appended (one write per file
and call, fsync); a torn append left by a crash is cut off by the next writer first. Replacing a
line (update, PUT of an existing id) writes the file anew: temporary file in the same folder,
fsync, rename. A transaction touching several files is atomic per file only.

Must not log or raise resource content: messages name a file and line, a type and logical id, or
an identifier hash.
"""

from __future__ import annotations

import bisect
import fcntl
import json
import os
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.servicerequest import ServiceRequest

from connectors.ehr import (
    FINAL_REPORT_STATUSES,
    WRITTEN_TYPES,
    EhrContext,
    WriteCapabilities,
    WriteResult,
    identifier_ref,
    parse_resource,
)
from medvlm.errors import (
    EhrConflictError,
    EhrError,
    EhrInvalidResourceError,
    EhrNotFoundError,
)
from pipeline.ehr_rules import local_id, signed_report_of

R = TypeVar("R", bound=Resource)

__all__ = ["NdjsonEhr"]


def _unescape_token(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _split_token(token: str) -> tuple[str | None, str]:
    """``system|value`` → (system, value); a bare value → (None, value). Escapes honoured."""
    i = 0
    while i < len(token):
        if token[i] == "\\":
            i += 2
            continue
        if token[i] == "|":
            return token[:i], _unescape_token(token[i + 1 :])
        i += 1
    return None, _unescape_token(token)


def _has_identifier(data: dict[str, Any], system: str | None, value: str) -> bool:
    for ident in data.get("identifier") or []:
        if (
            isinstance(ident, dict)
            and ident.get("value") == value
            and (system is None or ident.get("system") == system)
        ):
            return True
    return False


def _has_tag(data: dict[str, Any], system: str | None, code: str) -> bool:
    for tag in (data.get("meta") or {}).get("tag") or []:
        if (
            isinstance(tag, dict)
            and tag.get("code") == code
            and (system is None or tag.get("system") == system)
        ):
            return True
    return False


def _subject_id(data: dict[str, Any], field: str = "subject") -> str | None:
    ref = (data.get(field) or {}).get("reference")
    if isinstance(ref, str) and ref.startswith("Patient/"):
        return ref.split("/", 2)[1]
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _load_line(raw: bytes) -> Any:
    """One line's JSON (a module function so tests can count the lines parsed)."""
    return json.loads(raw)


def _dump_line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


Key = tuple[str, str]
"""An index key: (``id`` | ``identifier`` | ``tag`` | ``subject`` | ``basedOn``, value)."""


def _index_keys(data: dict[str, Any]) -> set[Key]:
    """What a line is looked up by. A superset filter: callers still apply their own test."""
    keys: set[Key] = set()
    if isinstance(rid := data.get("id"), str):
        keys.add(("id", rid))
    for ident in _dicts(data.get("identifier")):
        if isinstance(value := ident.get("value"), str):
            keys.add(("identifier", value))
    meta = data.get("meta")
    for tag in _dicts(meta.get("tag") if isinstance(meta, dict) else None):
        if isinstance(code := tag.get("code"), str):
            keys.add(("tag", code))
    subject = data.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    if isinstance(ref, str) and ref.startswith("Patient/"):
        keys.add(("subject", ref.split("/", 2)[1]))
    for based_on in _dicts(data.get("basedOn")):
        ref = based_on.get("reference")
        order = local_id(ref, "ServiceRequest") if isinstance(ref, str) else None
        if order is not None:
            keys.add(("basedOn", order))
    return keys


@dataclass
class _Table:
    """The parsed complete lines of one file (one inode). Rows are only ever appended."""

    key: tuple[int, int]  # (st_dev, st_ino)
    offset: int = 0  # bytes of complete lines consumed
    number: int = 0  # lines consumed (for line numbers in messages)
    rows: list[dict[str, Any]] = field(default_factory=list)
    index: dict[Key, list[int]] = field(default_factory=dict)

    def add(self, data: dict[str, Any]) -> None:
        position = len(self.rows)
        self.rows.append(data)
        for key in _index_keys(data):
            self.index.setdefault(key, []).append(position)


class _Cached:
    """One file's cache: the table, the open file it was read from, and their lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.table: _Table | None = None
        self.fd: int | None = None

    def drop(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.table, self.fd = None, None


def _close_all(files: dict[str, _Cached]) -> None:
    for cached in files.values():
        cached.drop()


@dataclass(frozen=True)
class _View:
    """One read of a file: its first ``n`` cached rows, a complete last line that has no newline
    yet (``tail``, position ``n``), and the message of a bad line that ends the readable part.

    The rows are the cache's own dicts: callers read them and never mutate them.
    """

    table: _Table | None
    n: int
    tail: dict[str, Any] | None
    error: str | None
    lock: threading.Lock

    def check(self) -> None:
        if self.error is not None:
            raise EhrInvalidResourceError(self.error)

    def positions(self, *keys: Key) -> list[int]:
        """Positions, in file order, of the rows that may match one of ``keys`` (index)."""
        found: set[int] = set()
        if self.table is not None:
            with self.lock:
                for key in keys:
                    hits = self.table.index.get(key, [])
                    found.update(hits[: bisect.bisect_left(hits, self.n)])
        ordered = sorted(found)
        if self.tail is not None:
            ordered.append(self.n)
        return ordered

    def row(self, position: int) -> dict[str, Any]:
        if position == self.n and self.tail is not None:
            return self.tail
        assert self.table is not None
        return self.table.rows[position]

    def rows(self, *keys: Key) -> Iterator[dict[str, Any]]:
        """The rows that may match ``keys`` in file order, then a bad line's error (as the file
        streamed line by line would: what precedes a bad line is seen first)."""
        for position in self.positions(*keys):
            yield self.row(position)
        self.check()

    def all(self) -> list[dict[str, Any]]:
        """Every row (a new list; for a rewrite)."""
        self.check()
        rows = []
        if self.table is not None:
            with self.lock:
                rows = self.table.rows[: self.n]
        return rows + ([self.tail] if self.tail is not None else [])


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _after_last_newline(fd: int, size: int) -> int:
    """Offset just past the last ``\\n`` of the first ``size`` bytes (0 when there is none)."""
    end, step = size, 4096
    while end > 0:
        start = max(0, end - step)
        found = _pread_all(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end, step = start, min(step * 4, 1 << 22)
    return 0


class NdjsonEhr:
    """``connectors.ehr.Ehr`` over a FHIR Bulk Data style NDJSON folder."""

    def __init__(
        self,
        folder: Path,
        *,
        accession_system: str | None = None,
        pseudonym_key: bytes | None = None,
    ) -> None:
        self.folder = folder
        self.accession_system = accession_system
        self._ref = partial(identifier_ref, key=pseudonym_key)
        self._thread_lock = threading.Lock()
        self._files: dict[str, _Cached] = {}
        self._files_lock = threading.Lock()
        weakref.finalize(self, _close_all, self._files)

    def __repr__(self) -> str:
        return f"NdjsonEhr(folder={str(self.folder)!r})"

    # -- files ------------------------------------------------------------------------------

    def _path(self, rtype: str) -> Path:
        return self.folder / f"{rtype}.ndjson"

    def _cached(self, rtype: str) -> _Cached:
        with self._files_lock:
            return self._files.setdefault(rtype, _Cached())

    def _view(self, rtype: str) -> _View:
        """``{rtype}.ndjson`` as it is now: the cache brought up to date with the file."""
        cached = self._cached(rtype)
        with cached.lock:
            try:
                fd = os.open(self._path(rtype), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                cached.drop()
                return _View(None, 0, None, None, cached.lock)
            try:
                stat = os.fstat(fd)
                table = cached.table
                if (
                    table is not None
                    and table.key == (stat.st_dev, stat.st_ino)
                    and stat.st_size >= table.offset
                ):
                    os.close(fd)  # the same file, held open since it was first read
                else:
                    cached.drop()
                    table = _Table((stat.st_dev, stat.st_ino))
                    cached.table, cached.fd = table, fd
            except BaseException:
                if cached.fd != fd:
                    os.close(fd)
                raise
            tail, error = None, None
            if stat.st_size > table.offset:
                assert cached.fd is not None
                new = _pread_all(cached.fd, stat.st_size - table.offset, table.offset)
                tail, error = self._consume(rtype, table, new)
            return _View(table, len(table.rows), tail, error, cached.lock)

    def _consume(
        self, rtype: str, table: _Table, data: bytes
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Parse the complete lines of ``data`` into ``table``; → (tail, error message).

        A bad complete line stops the parse there (it is parsed again, and fails again, on the
        next read). The bytes after the last newline: a resource (tail), a torn append (skipped)
        or JSON that is not a resource (error).
        """
        name = self._path(rtype).name
        start, complete = 0, data.rfind(b"\n") + 1
        while start < complete:
            stop = data.index(b"\n", start)
            line = data[start:stop]
            number = table.number + 1
            if line.strip():
                try:
                    parsed = _load_line(line)
                except ValueError:
                    return None, f"{name} line {number}: not JSON"
                if not isinstance(parsed, dict) or parsed.get("resourceType") != rtype:
                    return None, f"{name} line {number}: not a {rtype} resource"
                table.add(parsed)
            table.number = number
            table.offset += stop + 1 - start
            start = stop + 1
        rest = data[complete:]
        if not rest.strip():
            return None, None
        try:
            parsed = _load_line(rest)
        except ValueError:
            return None, None  # an append cut short: not (yet) a line
        if not isinstance(parsed, dict) or parsed.get("resourceType") != rtype:
            return None, f"{name} line {table.number + 1}: not a {rtype} resource"
        return parsed, None

    def _parsed(self, data: dict[str, Any], model: type[R]) -> R:
        return parse_resource(
            data, model, where=f" in {self._path(model.get_resource_type()).name}"
        )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append(self, rtype: str, lines: list[dict[str, Any]]) -> None:
        """Append ``lines`` to ``{rtype}.ndjson`` in one write, fsynced (under ``_locked``).

        A last line without its newline is first cut off when it does not parse (an append a
        crash cut short) and ended with a newline when it does (a complete resource).
        """
        payload = b"".join(_dump_line(data) for data in lines)
        fd = os.open(self._path(rtype), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            keep = _after_last_newline(fd, size)
            if keep < size:
                try:
                    _load_line(_pread_all(fd, size - keep, keep))
                except ValueError:
                    os.ftruncate(fd, keep)
                else:
                    payload = b"\n" + payload
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _replace(self, rtype: str, lines: list[dict[str, Any]]) -> None:
        """Write ``{rtype}.ndjson`` anew: temp file in the same folder, fsync, rename."""
        path = self._path(rtype)
        fd, tmp = tempfile.mkstemp(prefix=f".{rtype}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                for data in lines:
                    handle.write(_dump_line(data))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- reads ------------------------------------------------------------------------------

    def read_patient(self, patient_id: str) -> Patient:
        for data in self._view("Patient").rows(("id", patient_id)):
            if data.get("id") == patient_id:
                return self._parsed(data, Patient)
        raise EhrNotFoundError(f"Patient/{patient_id}: not in {self._path('Patient').name}")

    def find_service_request(self, accession_number: str) -> ServiceRequest | None:
        found = [
            data
            for data in self._view("ServiceRequest").rows(("identifier", accession_number))
            if _has_identifier(data, self.accession_system, accession_number)
        ]
        if len(found) > 1:
            ref = self._ref(accession_number, self.accession_system)
            raise EhrError(f"ServiceRequest {ref}: {len(found)} orders carry this accession number")
        return self._parsed(found[0], ServiceRequest) if found else None

    def find_patient(self, identifier_value: str, system: str | None = None) -> Patient | None:
        found = [
            data
            for data in self._view("Patient").rows(("identifier", identifier_value))
            if _has_identifier(data, system, identifier_value)
        ]
        if len(found) > 1:
            ref = self._ref(identifier_value, system)
            raise EhrError(f"Patient {ref}: {len(found)} patients carry this identifier")
        return self._parsed(found[0], Patient) if found else None

    def _of_patient(self, rtype: str, patient_id: str) -> Iterator[dict[str, Any]]:
        return (
            d
            for d in self._view(rtype).rows(("subject", patient_id))
            if _subject_id(d) == patient_id
        )

    def gather_context(self, accession_number: str, patient_id: str | None = None) -> EhrContext:
        order = self.find_service_request(accession_number)
        if order is not None:
            subject = order.subject.reference if order.subject is not None else None
            if not subject or not subject.startswith("Patient/"):
                raise EhrInvalidResourceError(
                    f"ServiceRequest/{order.id}: subject is not a Patient reference"
                )
            patient_id = subject.split("/", 2)[1]
        if patient_id is None:
            ref = self._ref(accession_number, self.accession_system)
            raise EhrNotFoundError(f"ServiceRequest {ref}: no order and no patient id given")
        try:
            patient = self.read_patient(patient_id)
        except EhrNotFoundError as exc:
            if order is None:
                raise
            # An order whose subject is gone is not "no order" (connectors/fhir.py alike).
            raise EhrInvalidResourceError(f"ServiceRequest/{order.id}: its subject {exc}") from None
        conditions = tuple(
            self._parsed(d, Condition)
            for d in self._of_patient("Condition", patient_id)
            if any(
                c.get("code") == "active"
                for c in (d.get("clinicalStatus") or {}).get("coding") or []
            )
        )
        reports = [
            self._parsed(d, DiagnosticReport)
            for d in self._of_patient("DiagnosticReport", patient_id)
            if d.get("status") in FINAL_REPORT_STATUSES
        ]
        studies = sorted(
            (self._parsed(d, ImagingStudy) for d in self._of_patient("ImagingStudy", patient_id)),
            key=lambda s: str(s.started or ""),
            reverse=True,
        )
        return EhrContext(patient, order, conditions, tuple(reports), tuple(studies))

    def find_final_report(
        self, accession_number: str | None, service_request: str | None = None
    ) -> DiagnosticReport | None:
        order_id = None
        if service_request:
            order_id = local_id(service_request, "ServiceRequest")
            if order_id is None:
                raise ValueError("find_final_report: service_request is not a ServiceRequest/id")

        def may_concern(data: dict[str, Any]) -> bool:
            # Only this order's candidates are parsed: one malformed report of another order
            # must not break every lookup. The rule itself is applied to the parsed models.
            refs = [b.get("reference") for b in data.get("basedOn") or [] if isinstance(b, dict)]
            values = [i.get("value") for i in data.get("identifier") or [] if isinstance(i, dict)]
            return (
                order_id is not None
                and any(
                    local_id(r, "ServiceRequest") == order_id for r in refs if isinstance(r, str)
                )
            ) or (accession_number is not None and accession_number in values)

        keys: list[Key] = []
        if order_id is not None:
            keys.append(("basedOn", order_id))
        if accession_number is not None:
            keys.append(("identifier", accession_number))
        return signed_report_of(
            (
                self._parsed(d, DiagnosticReport)
                for d in self._view("DiagnosticReport").rows(*keys)
                if d.get("status") in FINAL_REPORT_STATUSES and may_concern(d)
            ),
            order_id=order_id,
            accession_number=accession_number,
            accession_system=self.accession_system,
        )

    # -- writes -----------------------------------------------------------------------------

    def conditional_create(self, resource: Resource, identifier: Identifier) -> WriteResult:
        if identifier.value is None:
            raise ValueError("conditional_create needs Identifier.value")
        with self._locked():
            rtype = resource.get_resource_type()
            work = _Pending(self._view(rtype), self._ref)
            data = work.create(resource, identifier.system, identifier.value)
            if data is None:
                existing = work.matching("identifier", identifier.system, identifier.value)
                return WriteResult(parse_resource(existing[0], type(resource)), created=False)
            self._append(rtype, work.added)
            return WriteResult(parse_resource(data, type(resource)), created=True)

    def update(self, resource: Resource, if_match: str) -> Resource:
        rtype = resource.get_resource_type()
        if resource.id is None:
            raise ValueError(f"update() needs a {rtype} with a logical id")
        ref = f"{rtype}/{resource.id}"
        with self._locked():
            view = self._view(rtype)
            view.check()
            index = next(
                (
                    p
                    for p in view.positions(("id", resource.id))
                    if view.row(p).get("id") == resource.id
                ),
                None,
            )
            if index is None:
                raise EhrNotFoundError(f"{ref}: not in {self._path(rtype).name}")
            current = str((view.row(index).get("meta") or {}).get("versionId", "1"))
            if current != if_match.removeprefix("W/").strip('"'):
                raise EhrConflictError(f"{ref}: version conflict (If-Match {if_match!r})")
            data: dict[str, Any] = json.loads(
                resource.model_dump_json(by_alias=True, exclude_none=True)
            )
            data["meta"] = {
                **(data.get("meta") or {}),
                "versionId": str(int(current) + 1) if current.isdigit() else uuid.uuid4().hex,
                "lastUpdated": _now(),
            }
            lines = view.all()
            lines[index] = data
            self._replace(rtype, lines)
            return parse_resource(data, type(resource))

    def capabilities(self) -> WriteCapabilities:
        """A folder writes under one lock: transactions and conditional creates of any type."""
        return WriteCapabilities(True, WRITTEN_TYPES)

    def find_by_key(self, rtype: str, param: str, system: str, value: str) -> list[Resource]:
        if param not in _CRITERIA:
            raise ValueError(f"find_by_key: {param} is not a supported search parameter")
        with self._locked():
            rows = _Pending(self._view(rtype), self._ref).matching(param, system, value)
        return [parse_resource(row, where=f" in {self._path(rtype).name}") for row in rows]

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> str:
        rtype = str(resource["resourceType"])
        model = parse_resource({k: v for k, v in resource.items() if k != "id"})
        with self._locked():
            work = _Pending(self._view(rtype), self._ref)
            if if_none_exist is not None:
                data, new = _post_entry(0, model, if_none_exist, work)
            else:
                data, new = work.add(model), True
            if new:
                self._append(rtype, work.added)
        return f"{rtype}/{data['id']}"

    def transaction(
        self, bundle: Bundle, *, retry: bool = True, about: str | None = None
    ) -> Bundle:
        """POST entries (with ``ifNoneExist`` = ``identifier=…`` or ``_tag=…``) and PUT
        ``Type/id`` entries.

        ``urn:uuid:`` references between entries are rewritten to the assigned ids (FHIR R4
        transaction rules) in what is written. All entries are checked before any file is
        written; new lines are appended, a file with a replaced line is written anew.
        """
        if bundle.type != "transaction":
            raise ValueError("transaction() needs Bundle.type = transaction")
        with self._locked():
            files: dict[str, _Pending] = {}
            mapping: dict[str, str] = {}
            planned: list[tuple[str, dict[str, Any], bool]] = []  # (rtype, data, written)
            for i, entry in enumerate(bundle.entry or []):
                if entry.request is None or entry.resource is None:
                    raise EhrInvalidResourceError(
                        f"transaction entry {i}: request and resource needed"
                    )
                rtype = entry.resource.get_resource_type()
                work = files.get(rtype)
                if work is None:
                    work = files[rtype] = _Pending(self._view(rtype), self._ref)
                method = entry.request.method
                if method == "POST":
                    data, new = _post_entry(i, entry.resource, entry.request.ifNoneExist, work)
                elif method == "PUT":
                    data, new = work.put(entry.resource, str(entry.request.url)), True
                else:
                    raise EhrInvalidResourceError(f"transaction entry {i}: {method} not supported")
                if entry.fullUrl:
                    mapping[str(entry.fullUrl)] = f"{rtype}/{data['id']}"
                planned.append((rtype, data, new))
            for _, data, new in planned:
                if new:  # what exists is returned as stored (and is the cache's: not mutated)
                    _rewrite_references(data, mapping)
            for rtype, work in files.items():
                if work.replaced:
                    self._replace(rtype, work.lines())
                elif work.added:
                    self._append(rtype, work.added)
        return Bundle.model_validate(
            {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [
                    {
                        "resource": data,
                        "response": {
                            "status": "201 Created" if new else "200 OK",
                            "location": _location(rtype, data),
                        },
                    }
                    for rtype, data, new in planned
                ],
            }
        )

    # -- pre-flight ---------------------------------------------------------------------------

    def ping(self) -> None:
        """The folder exists and can be read (flows/preflight.py). Raises
        ``EhrUnavailableError`` chained to the ``OSError`` (no such folder, permission)."""
        from medvlm.errors import EhrUnavailableError

        try:
            with os.scandir(self.folder) as entries:
                next(entries, None)
        except OSError as exc:
            raise EhrUnavailableError(f"ehr: folder unreadable ({type(exc).__name__})") from exc


_CRITERIA: dict[str, Callable[[dict[str, Any], str | None, str], bool]] = {
    "identifier": _has_identifier,
    "_tag": _has_tag,
}
_INDEX_OF = {"identifier": "identifier", "_tag": "tag"}


class _Pending:
    """One file's changes planned under the lock: existing rows (a view), rows replaced by
    position, rows added. Existing rows are never mutated; replacing one means a rewrite."""

    def __init__(self, view: _View, ref: Callable[[str, str | None], str]) -> None:
        view.check()  # a bad line anywhere: nothing is written to this file
        self.view = view
        self._ref = ref
        self.replaced: dict[int, dict[str, Any]] = {}
        self.added: list[dict[str, Any]] = []

    def _row(self, position: int) -> dict[str, Any]:
        """An existing row as planned: replaced in this call, or as the file has it."""
        replaced = self.replaced.get(position)
        return replaced if replaced is not None else self.view.row(position)

    def matching(self, criterion: str, system: str | None, value: str) -> list[dict[str, Any]]:
        """Rows (existing as planned, then added) matching ``criterion=system|value``."""
        match = _CRITERIA[criterion]
        positions = set(self.view.positions((_INDEX_OF[criterion], value))) | set(self.replaced)
        rows = [self._row(p) for p in sorted(positions)]
        return [d for d in rows + self.added if match(d, system, value)]

    def create(
        self, resource: Resource, system: str | None, value: str, criterion: str = "identifier"
    ) -> dict[str, Any] | None:
        """Add ``resource`` unless a row matches (then None); more than one match: conflict."""
        matches = self.matching(criterion, system, value)
        if len(matches) > 1:
            ref = self._ref(value, system)
            raise EhrConflictError(
                f"{resource.get_resource_type()} {ref}: {len(matches)} resources match"
            )
        if matches:
            return None
        return self.add(resource)

    def add(self, resource: Resource) -> dict[str, Any]:
        """Add ``resource`` with a new id, whatever exists (a plain create)."""
        data: dict[str, Any] = json.loads(
            resource.model_dump_json(by_alias=True, exclude_none=True)
        )
        data["id"] = uuid.uuid4().hex
        data["meta"] = {**(data.get("meta") or {}), "versionId": "1", "lastUpdated": _now()}
        self.added.append(data)
        return data

    def put(self, resource: Resource, url: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            resource.model_dump_json(by_alias=True, exclude_none=True)
        )
        rid = data["id"] = url.rstrip("/").split("/")[-1]
        position = next(
            (p for p in self.view.positions(("id", rid)) if self._row(p).get("id") == rid), None
        )
        added = next((j for j, d in enumerate(self.added) if d.get("id") == rid), None)
        old: dict[str, Any] | None = None
        if position is not None:
            old = self._row(position)
        elif added is not None:
            old = self.added[added]
        previous = "0" if old is None else str((old.get("meta") or {}).get("versionId", "0"))
        version = str(int(previous) + 1) if previous.isdigit() else uuid.uuid4().hex
        data["meta"] = {**(data.get("meta") or {}), "versionId": version, "lastUpdated": _now()}
        if position is not None:
            self.replaced[position] = data
        elif added is not None:
            self.added[added] = data
        else:
            self.added.append(data)
        return data

    def lines(self) -> list[dict[str, Any]]:
        """The whole file as planned (for a rewrite)."""
        rows = self.view.all()
        for position, data in self.replaced.items():
            rows[position] = data
        return rows + self.added


def _post_entry(
    index: int, resource: Resource, if_none_exist: str | None, work: _Pending
) -> tuple[dict[str, Any], bool]:
    if not if_none_exist:
        raise EhrInvalidResourceError(
            f"transaction entry {index}: POST without ifNoneExist would not be idempotent"
        )
    query = dict(parse_qsl(if_none_exist))
    if len(query) != 1 or next(iter(query)) not in _CRITERIA:
        raise EhrInvalidResourceError(
            f"transaction entry {index}: ifNoneExist supports identifier=… or _tag=… only"
        )
    ((name, token),) = query.items()
    system, value = _split_token(token)
    created = work.create(resource, system, value, name)
    if created is None:
        return work.matching(name, system, value)[0], False
    return created, True


def _rewrite_references(data: Any, mapping: dict[str, str]) -> None:
    if isinstance(data, dict):
        ref = data.get("reference")
        if isinstance(ref, str) and ref in mapping:
            data["reference"] = mapping[ref]
        for value in data.values():
            _rewrite_references(value, mapping)
    elif isinstance(data, list):
        for item in data:
            _rewrite_references(item, mapping)


def _location(rtype: str, data: dict[str, Any]) -> str:
    """``Type/id/_history/version``; ``Type/id`` for a stored line without ``meta.versionId``."""
    meta = data.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return f"{rtype}/{data['id']}" + (f"/_history/{version}" if version is not None else "")
