"""The EHR as a folder in FHIR Bulk Data layout: ``Patient.ndjson``, ``ServiceRequest.ndjson``, …

One resource per line, one file per resource type (the output layout of FHIR Bulk Data
``$export``). It is the embedded default source of context and the sink of drafts when no FHIR
server is configured. Reads stream the files line by line. Writes are idempotent by identifier
(conditional create implemented here, FHIR R4 http.html#ccreate semantics) and atomic per file:
the new file is written to a temporary file in the same folder, fsynced and renamed over the old
one, under an exclusive ``flock`` on ``.lock`` so concurrent writers (threads or processes) do not
lose each other's lines. A transaction touching several files is atomic per file only.

Must not log or raise resource content: messages name a file and line, a type and logical id, or
an identifier hash.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
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
    EhrContext,
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


class NdjsonEhr:
    """``connectors.ehr.Ehr`` over a FHIR Bulk Data style NDJSON folder."""

    def __init__(self, folder: Path, *, accession_system: str | None = None) -> None:
        self.folder = folder
        self.accession_system = accession_system
        self._thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"NdjsonEhr(folder={str(self.folder)!r})"

    # -- files ------------------------------------------------------------------------------

    def _path(self, rtype: str) -> Path:
        return self.folder / f"{rtype}.ndjson"

    def _raw(self, rtype: str) -> Iterator[dict[str, Any]]:
        """JSON objects of ``{rtype}.ndjson``, streamed; a bad line names its file and number."""
        path = self._path(rtype)
        if not path.exists():
            return
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    raise EhrInvalidResourceError(f"{path.name} line {number}: not JSON") from None
                if not isinstance(data, dict) or data.get("resourceType") != rtype:
                    raise EhrInvalidResourceError(
                        f"{path.name} line {number}: not a {rtype} resource"
                    )
                yield data

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

    def _replace(self, rtype: str, lines: list[dict[str, Any]]) -> None:
        """Write ``{rtype}.ndjson`` anew: temp file in the same folder, fsync, rename."""
        path = self._path(rtype)
        fd, tmp = tempfile.mkstemp(prefix=f".{rtype}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                for data in lines:
                    handle.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False))
                    handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- reads ------------------------------------------------------------------------------

    def read_patient(self, patient_id: str) -> Patient:
        for data in self._raw("Patient"):
            if data.get("id") == patient_id:
                return self._parsed(data, Patient)
        raise EhrNotFoundError(f"Patient/{patient_id}: not in {self._path('Patient').name}")

    def find_service_request(self, accession_number: str) -> ServiceRequest | None:
        found = [
            data
            for data in self._raw("ServiceRequest")
            if _has_identifier(data, self.accession_system, accession_number)
        ]
        if len(found) > 1:
            ref = identifier_ref(accession_number, self.accession_system)
            raise EhrError(f"ServiceRequest {ref}: {len(found)} orders carry this accession number")
        return self._parsed(found[0], ServiceRequest) if found else None

    def find_patient(self, identifier_value: str, system: str | None = None) -> Patient | None:
        found = [
            data for data in self._raw("Patient") if _has_identifier(data, system, identifier_value)
        ]
        if len(found) > 1:
            ref = identifier_ref(identifier_value, system)
            raise EhrError(f"Patient {ref}: {len(found)} patients carry this identifier")
        return self._parsed(found[0], Patient) if found else None

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
            ref = identifier_ref(accession_number, self.accession_system)
            raise EhrNotFoundError(f"ServiceRequest {ref}: no order and no patient id given")
        patient = self.read_patient(patient_id)
        conditions = tuple(
            self._parsed(d, Condition)
            for d in self._raw("Condition")
            if _subject_id(d) == patient_id
            and any(
                c.get("code") == "active"
                for c in (d.get("clinicalStatus") or {}).get("coding") or []
            )
        )
        reports = [
            self._parsed(d, DiagnosticReport)
            for d in self._raw("DiagnosticReport")
            if _subject_id(d) == patient_id and d.get("status") in FINAL_REPORT_STATUSES
        ]
        studies = sorted(
            (
                self._parsed(d, ImagingStudy)
                for d in self._raw("ImagingStudy")
                if _subject_id(d) == patient_id
            ),
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

        return signed_report_of(
            (
                self._parsed(d, DiagnosticReport)
                for d in self._raw("DiagnosticReport")
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
            lines = list(self._raw(rtype))
            data = self._create_in(lines, resource, identifier.system, identifier.value)
            if data is None:
                return WriteResult(self._existing(lines, identifier, resource), created=False)
            self._replace(rtype, lines)
            return WriteResult(parse_resource(data, type(resource)), created=True)

    def _existing(self, lines: list[dict[str, Any]], identifier: Identifier, resource: R) -> R:
        assert identifier.value is not None
        match = next(d for d in lines if _has_identifier(d, identifier.system, identifier.value))
        return parse_resource(match, type(resource))

    def _create_in(
        self,
        lines: list[dict[str, Any]],
        resource: Resource,
        system: str | None,
        value: str,
        match: Callable[[dict[str, Any], str | None, str], bool] = _has_identifier,
    ) -> dict[str, Any] | None:
        """Append ``resource`` to ``lines`` unless one matches (then None).

        ``match`` is the conditional-create criterion: by identifier (default) or by tag.
        """
        matches = [d for d in lines if match(d, system, value)]
        if len(matches) > 1:
            ref = identifier_ref(value, system)
            raise EhrConflictError(
                f"{resource.get_resource_type()} {ref}: {len(matches)} resources match"
            )
        if matches:
            return None
        data: dict[str, Any] = json.loads(
            resource.model_dump_json(by_alias=True, exclude_none=True)
        )
        data["id"] = uuid.uuid4().hex
        data["meta"] = {**(data.get("meta") or {}), "versionId": "1", "lastUpdated": _now()}
        lines.append(data)
        return data

    def update(self, resource: Resource, if_match: str) -> Resource:
        rtype = resource.get_resource_type()
        if resource.id is None:
            raise ValueError(f"update() needs a {rtype} with a logical id")
        ref = f"{rtype}/{resource.id}"
        with self._locked():
            lines = list(self._raw(rtype))
            index = next((i for i, d in enumerate(lines) if d.get("id") == resource.id), None)
            if index is None:
                raise EhrNotFoundError(f"{ref}: not in {self._path(rtype).name}")
            current = str((lines[index].get("meta") or {}).get("versionId", "1"))
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
            lines[index] = data
            self._replace(rtype, lines)
            return parse_resource(data, type(resource))

    def transaction(self, bundle: Bundle) -> Bundle:
        """POST entries (with ``ifNoneExist`` = ``identifier=…``) and PUT ``Type/id`` entries.

        ``urn:uuid:`` references between entries are rewritten to the assigned ids (FHIR R4
        transaction rules). All entries are checked before any file is replaced.
        """
        if bundle.type != "transaction":
            raise ValueError("transaction() needs Bundle.type = transaction")
        with self._locked():
            files: dict[str, list[dict[str, Any]]] = {}
            changed: set[str] = set()
            mapping: dict[str, str] = {}
            planned: list[tuple[str, dict[str, Any], str]] = []  # (rtype, data, status)
            for i, entry in enumerate(bundle.entry or []):
                if entry.request is None or entry.resource is None:
                    raise EhrInvalidResourceError(
                        f"transaction entry {i}: request and resource needed"
                    )
                rtype = entry.resource.get_resource_type()
                lines = files.setdefault(rtype, list(self._raw(rtype)))
                method = entry.request.method
                if method == "POST":
                    data, new = self._post_entry(
                        i, entry.resource, entry.request.ifNoneExist, lines
                    )
                elif method == "PUT":
                    data, new = self._put_entry(entry.resource, str(entry.request.url), lines), True
                else:
                    raise EhrInvalidResourceError(f"transaction entry {i}: {method} not supported")
                if new:
                    changed.add(rtype)
                if entry.fullUrl:
                    mapping[str(entry.fullUrl)] = f"{rtype}/{data['id']}"
                planned.append((rtype, data, "201 Created" if new else "200 OK"))
            for rtype, data, _ in planned:
                if rtype in changed:
                    _rewrite_references(data, mapping)
            for rtype in changed:
                self._replace(rtype, files[rtype])
        return Bundle.model_validate(
            {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [
                    {
                        "resource": data,
                        "response": {
                            "status": status,
                            "location": _location(rtype, data),
                        },
                    }
                    for rtype, data, status in planned
                ],
            }
        )

    def _post_entry(
        self, index: int, resource: Resource, if_none_exist: str | None, lines: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        if not if_none_exist:
            raise EhrInvalidResourceError(
                f"transaction entry {index}: POST without ifNoneExist would not be idempotent"
            )
        query = dict(parse_qsl(if_none_exist))
        criteria = {"identifier": _has_identifier, "_tag": _has_tag}
        if len(query) != 1 or next(iter(query)) not in criteria:
            raise EhrInvalidResourceError(
                f"transaction entry {index}: ifNoneExist supports identifier=… or _tag=… only"
            )
        ((name, token),) = query.items()
        match = criteria[name]
        system, value = _split_token(token)
        created = self._create_in(lines, resource, system, value, match)
        if created is None:
            return next(d for d in lines if match(d, system, value)), False
        return created, True

    def _put_entry(
        self, resource: Resource, url: str, lines: list[dict[str, Any]]
    ) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            resource.model_dump_json(by_alias=True, exclude_none=True)
        )
        data["id"] = url.rstrip("/").split("/")[-1]
        old = next((j for j, d in enumerate(lines) if d.get("id") == data["id"]), None)
        previous = "0" if old is None else str((lines[old].get("meta") or {}).get("versionId", "0"))
        version = str(int(previous) + 1) if previous.isdigit() else uuid.uuid4().hex
        data["meta"] = {**(data.get("meta") or {}), "versionId": version, "lastUpdated": _now()}
        if old is None:
            lines.append(data)
        else:
            lines[old] = data
        return data


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
    return f"{rtype}/{data['id']}/_history/{data['meta']['versionId']}"
