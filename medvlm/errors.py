"""The exception tree of medvlm-pipeline.

One root, ``MedvlmError``, and a branch per external system. Library exceptions are translated
into these in exactly one place per connector and chained with ``from``. Messages name a study or
resource by a non-identifying reference (a study UID hash, a resource type and logical id), never
a patient name, MRN or birth date. Every class is picklable so it can cross Ray process
boundaries (only positional ``args`` are used).
"""

from __future__ import annotations


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


class InvalidModelOutputError(ServingError):
    """The model answered with text that is not a valid report for the schema."""


class PacsError(MedvlmError):
    """The image source (DICOMweb, DIMSE, folder) failed or answered with unusable data."""


class EhrError(MedvlmError):
    """The EHR (FHIR server or folder) failed or answered with unusable data."""
