"""Building connectors from settings: the one place an implementation is chosen by name.

``build_image_source`` and ``build_ehr`` turn ``PacsSettings``/``EhrSettings`` into a connector;
the interfaces (``connectors.pacs.ImageSource``, ``connectors.ehr.Ehr``) know no implementation,
so a new backend is a new module plus a branch here, and no import cycle can form. Only entry
points use this module (flows/services.py, the demo, tests); connectors never import it.
A backend's module (and its client library: dicomweb-client, pynetdicom, httpx) is imported by
its branch only, so a command pays for the backends it uses and no others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medvlm.errors import ConfigurationError
from medvlm.settings import EhrSettings, PacsSettings

if TYPE_CHECKING:
    import httpx

    from connectors.ehr import Ehr
    from connectors.orthanc import OrthancChangeFeed
    from connectors.pacs import ImageSource

__all__ = ["build_ehr", "build_image_source"]


def build_image_source(settings: PacsSettings, *, session: Any = None) -> ImageSource:
    """The image source ``settings.kind`` names, built from settings alone.

    ``session`` is an optional long-lived ``requests.Session`` for DICOMweb (built from the
    settings when None); the caller that passes one owns it.
    """
    if settings.kind == "folder":
        from connectors.dicom_folder import DicomFolderSource

        if settings.folder is None:
            raise ConfigurationError("pacs.folder is unset (load settings via MedvlmSettings)")
        return DicomFolderSource(
            settings.folder, lookback_days=settings.qido_watermark_lookback_days
        )
    if settings.kind == "dicomweb":
        from connectors.dicomweb import DicomWebSource
        from connectors.orthanc import OrthancChangeFeed

        feed = None
        if settings.new_study_detection == "orthanc_changes":
            orthanc_url = settings.orthanc_url
            if not orthanc_url:
                raise ConfigurationError("pacs.orthanc_url is required for orthanc_changes")
            timeout = (settings.connect_timeout_s, settings.read_timeout_s)

            def feed(http: Any, edge: Any) -> OrthancChangeFeed:
                return OrthancChangeFeed(http, orthanc_url, timeout=timeout, edge=edge)

        return DicomWebSource.from_settings(settings, session=session, change_feed=feed)
    if settings.kind == "dimse":
        from connectors.dimse import DimseSource

        return DimseSource.from_settings(settings)
    raise ConfigurationError(f"unknown pacs.kind {settings.kind!r}")


def build_ehr(
    settings: EhrSettings, client: httpx.Client | None = None, *, pseudonym_key: bytes | None = None
) -> Ehr:
    """The EHR named by ``settings.kind``.

    For ``fhir``, pass the one long-lived pooled ``httpx.Client`` (``connectors.fhir.
    build_http_client(settings)`` makes one with timeouts, TLS and auth from settings); without
    it one is built and owned by the returned ``FhirEhr`` (close it with ``.close()``).
    ``pseudonym_key`` (``job.pseudonym_key``) keys the identifier references in its messages.
    """
    if settings.kind == "folder":
        from connectors.ndjson import NdjsonEhr

        if settings.folder is None:
            raise ConfigurationError("ehr.folder is not set (MEDVLM_EHR__FOLDER)")
        return NdjsonEhr(
            settings.folder, accession_system=settings.accession_system, pseudonym_key=pseudonym_key
        )
    from connectors.fhir import FhirEhr, build_http_client

    if client is None:
        return FhirEhr(
            build_http_client(settings), settings, owns_client=True, pseudonym_key=pseudonym_key
        )
    return FhirEhr(client, settings, pseudonym_key=pseudonym_key)
