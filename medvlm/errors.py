"""The exception tree of medvlm-pipeline.

One root, ``MedvlmError``, and a branch per external system. Library exceptions are translated
into these in exactly one place per connector and chained with ``from`` (``from None`` where the
library's message would carry a request URL with its query, or a DICOM value). Messages name a
study or resource by a non-identifying reference (a study UID hash, a resource type and logical
id), never a patient name, MRN or birth date. Every class is picklable so it can cross Ray process
boundaries (only positional ``args`` are used).
"""

from __future__ import annotations

import re
from typing import Any


class MedvlmError(Exception):
    """Root of every error raised by this project."""


class ConfigurationError(MedvlmError):
    """Settings or installation are invalid; raised at start-up, not at study 1."""


class DevServerError(MedvlmError):
    """A local development server failed to install, start, answer or stop."""


class ImagingError(MedvlmError):
    """A study's pixels or metadata cannot be turned into model input."""


class ServingError(MedvlmError):
    """The model service failed."""


class EngineUnavailableError(ServingError):
    """The model engine is not running or not reachable."""


class RayStartError(EngineUnavailableError):
    """Ray could not be started locally or joined; its message names the logs and a remedy."""


class ModelServiceStartError(EngineUnavailableError):
    """The model service a run starts on first use did not come up: the run stops, no study is
    blamed (its studies stay where they were and are taken up by the next run)."""


class InvalidModelOutputError(ServingError):
    """The model answered with text that is not a valid report for the schema."""


class PacsError(MedvlmError):
    """The image source (DICOMweb, DIMSE, folder) failed or answered with unusable data."""


class PacsUnavailableError(PacsError):
    """The PACS cannot be reached, timed out or kept answering 429/5xx after retries."""


class PacsUnauthorizedError(PacsError):
    """The PACS refused our credentials (HTTP 401/403, DIMSE association rejected)."""


class PacsNotFoundError(PacsError):
    """The PACS has no such study, series or instance."""


class InvalidDicomError(PacsError):
    """A DICOM payload for a study could not be parsed; other studies are unaffected."""


class EhrError(MedvlmError):
    """The EHR (FHIR server or folder) failed or answered with unusable data."""


class EhrNotFoundError(EhrError):
    """No such resource (HTTP 404, or 410 for a deleted one: servers differ)."""


class EhrUnauthorizedError(EhrError):
    """The EHR refused our credentials or scopes (HTTP 401/403, token endpoint refusal)."""


class EhrConflictError(EhrError):
    """A write lost a race: version mismatch on If-Match (412) or a conflict (409)."""


class EhrInvalidResourceError(EhrError):
    """A resource was rejected (HTTP 400/422) or a payload from the EHR is not valid FHIR.

    ``issues`` holds the OperationOutcome issues as ``severity/code: diagnostics`` strings (values
    the client sent are redacted from them before they get here).
    """

    def __init__(self, message: str, issues: tuple[str, ...] = ()) -> None:
        super().__init__(message, issues)
        self.issues = issues

    def __str__(self) -> str:
        message = str(self.args[0])
        return f"{message} [{'; '.join(self.issues)}]" if self.issues else message


class EhrUnavailableError(EhrError):
    """The EHR cannot be reached, timed out or kept answering 429/5xx after retries."""


class ServiceDownError(MedvlmError):
    """An outside service (the EHR, the PACS) is known to be down: its circuit breaker is open
    (``connectors.circuit``). Not a study's failure: the study waits for the service or stays
    pending. ``breaker`` is the open breaker (to wait on)."""

    def __init__(self, message: str, breaker: Any = None) -> None:
        super().__init__(message)
        self.breaker = breaker


class EhrDownError(ServiceDownError, EhrUnavailableError):
    """The EHR is known to be down (its breaker is open)."""


class PacsDownError(ServiceDownError, PacsUnavailableError):
    """The PACS is known to be down (its breaker is open)."""


class LedgerUnavailableError(MedvlmError):
    """The job ledger's database cannot be read or written: the run stops, no study is blamed."""


class LedgerSchemaBehindError(LedgerUnavailableError):
    """The ledger's schema is older than this release needs (PostgreSQL is migrated only on
    request: ``medvlm db upgrade``); nothing was read or written."""


class LeaseLostError(MedvlmError):
    """Jobs this worker was saving now belong to another worker (their lease ran out and they
    were claimed again): they were not saved, the batch's other jobs were.

    ``study_refs`` holds their non-identifying references, ``job_ids`` their ledger row ids.
    Not a study's failure: the new holder finishes them.
    """

    def __init__(
        self, message: str, study_refs: tuple[str, ...] = (), job_ids: tuple[int, ...] = ()
    ) -> None:
        super().__init__(message, study_refs, job_ids)
        self.study_refs = study_refs
        self.job_ids = job_ids

    def __str__(self) -> str:
        return str(self.args[0])


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(message: str, limit: int = 300) -> str:
    """The first non-empty line of an error message, without colour codes, at most ``limit``
    characters: what a ledger row or a CLI error line shows (Ray's messages carry whole,
    colour-coded tracebacks)."""
    lines = [line.strip() for line in _ANSI.sub("", message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
