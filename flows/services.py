"""Building the flow's ``Services`` from settings: the one place connectors are constructed.

``open_services`` is a context manager: it builds the image source, the EHR client (one pooled
HTTP client), the ledger and the model drafter from one ``MedvlmSettings``, and closes them
(and a local Ray, when it started one) on exit; ``open_fairness_services`` builds the fairness
monitor's (ledger and EHR). Tests and other callers may build ``Services``
directly with their own connectors instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.ehr import Ehr
from connectors.factory import build_ehr, build_image_source
from connectors.ledger_store import LedgerStore, open_engine
from flows.draft_reports import Services
from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings
from pipeline.fhir_resources import ModelIdentity
from pipeline.ledger import DraftJob
from serving.clients import Drafter, HandleDrafter, HttpDrafter, LazyDrafter, OpenAIChatDrafter

if TYPE_CHECKING:
    from flows.fairness import FairnessServices


def model_identity(settings: MedvlmSettings) -> tuple[ModelIdentity, str | None]:
    """The model's identity for the ledger and FHIR Device, and the source to serve locally."""
    job = settings.job
    if job.model_endpoint == "local":
        from serving.model_source import resolve_model, weights_sha256

        resolved = resolve_model(settings)
        local = Path(resolved.source)
        identity = ModelIdentity(
            name=local.name if local.is_dir() else resolved.source,
            version=resolved.version,
            weights_sha256=weights_sha256(local) if local.is_dir() else None,
            random_weights=resolved.random_weights,
        )
        return identity, resolved.source
    if not settings.model.version:
        raise ConfigurationError(
            "MEDVLM_MODEL__VERSION must be set when the model is remote "
            f"(job.model_endpoint={job.model_endpoint}): it keys the ledger and the draft ids"
        )
    name = settings.model.source or settings.model.served_name
    return ModelIdentity(name=name, version=settings.model.version), None


def model_capacity(settings: MedvlmSettings) -> int:
    """Requests the model service takes at once: every replica's ``max_ongoing_requests``.

    Local and ``http`` endpoints are this project's Serve application, configured by the same
    ``serving`` settings; an ``openai`` or ``triton`` endpoint is taken as one replica of that
    size. With autoscaling the run keeps ``max_replicas`` replicas busy: the requests queued
    beyond what the running replicas take are the load that makes Serve add replicas.
    """
    serving = settings.serving
    remote = settings.job.model_endpoint in ("openai", "triton")
    replicas = 1 if remote else serving.replicas_at_most
    return replicas * serving.max_ongoing_requests


def image_processes(settings: MedvlmSettings) -> int:
    """``job.image_processes``, or by default: none with a local model (it shares the CPUs),
    else one per CPU this process may run on."""
    if settings.job.image_processes is not None:
        return settings.job.image_processes
    if settings.job.model_endpoint == "local":
        return 0
    return len(os.sched_getaffinity(0))


def source_name(settings: MedvlmSettings) -> str:
    """Names the image source in the ledger's watermark table (no credentials)."""
    pacs = settings.pacs
    where = {
        "folder": str(pacs.folder),
        "dicomweb": str(pacs.dicomweb_url),
        "dimse": f"{pacs.called_aet}@{pacs.dimse_host}:{pacs.dimse_port}",
    }[pacs.kind]
    return f"{pacs.kind}:{where}"[:200]


def ehr_name(settings: MedvlmSettings) -> str:
    """Names the EHR in the ledger (its model Device is remembered per EHR; no credentials)."""
    ehr = settings.ehr
    return f"{ehr.kind}:{ehr.base_url if ehr.kind == 'fhir' else ehr.folder}"[:200]


def _start_local(settings: MedvlmSettings, source: str) -> Any:
    """Start (or join) Ray and the Serve app; Ray is imported here, on the first draft only."""
    from serving.app import start_model_service

    return start_model_service(settings, source)


def _stop_local() -> None:
    from serving.ray_runtime import shutdown_ray

    shutdown_ray()


def _open_ehr_and_ledger(
    settings: MedvlmSettings, stack: ExitStack, pseudonym_key: bytes | None
) -> tuple[Ehr, LedgerStore]:
    """The EHR (one pooled HTTP client, closed by ``stack``) and the ledger, as every job uses.
    ``pseudonym_key``: ``job.pseudonym_key_bytes()``, read once by the caller, so that one run
    never keys with two versions of a rotated key file."""
    client = None
    if settings.ehr.kind == "fhir":
        from connectors.fhir import build_http_client

        client = build_http_client(settings.ehr)
        stack.callback(client.close)
    assert settings.job.ledger_url is not None
    ehr = build_ehr(settings.ehr, client, pseudonym_key=pseudonym_key)
    return ehr, LedgerStore(open_engine(settings.job.ledger_url))


@contextmanager
def open_services(
    settings: MedvlmSettings, *, on_progress: Callable[[DraftJob], None] | None = None
) -> Iterator[Services]:
    model, local_source = model_identity(settings)
    job = settings.job
    api_key = settings.serving.api_key.get_secret_value() if settings.serving.api_key else None
    capacity = model_capacity(settings)
    in_flight = job.concurrency or capacity
    with ExitStack() as stack:
        drafter: Drafter
        if job.model_endpoint == "local":
            from serving.kv_cache import with_kv_cache

            assert local_source is not None
            # Checked now (a bad KV cache size fails before anything runs); started on the
            # first study that needs a draft, so a run with nothing to draft starts no model
            # (nor imports Ray).
            sized = with_kv_cache(settings, local_source)
            lazy = LazyDrafter(lambda: HandleDrafter(_start_local(sized, local_source)))
            drafter = lazy
            stack.callback(lambda: _stop_local() if lazy.started else None)
        elif job.model_endpoint == "triton":
            from serving.triton_drafter import build_triton_drafter

            drafter = build_triton_drafter(
                job.triton,
                model_source=settings.model.source,
                max_tokens=settings.model.max_tokens,
                seed=settings.model.seed,
                max_connections=in_flight,
            )
        elif job.model_url is None:
            raise ConfigurationError(f"job.model_url is required for {job.model_endpoint}")
        elif job.model_endpoint == "http":
            drafter = HttpDrafter(
                None,
                job.model_url,
                api_key=api_key,
                edge=job.model_client,
                max_connections=in_flight,
            )
        else:
            drafter = OpenAIChatDrafter(
                None,
                job.model_url,
                settings.model.served_name,
                max_tokens=settings.model.max_tokens,
                api_key=api_key,
                edge=job.model_client,
                max_connections=in_flight,
            )
        source = build_image_source(settings.pacs)
        stack.callback(source.close)
        pseudonym_key = job.pseudonym_key_bytes()
        ehr, ledger = _open_ehr_and_ledger(settings, stack, pseudonym_key)
        yield Services(
            source=source,
            ehr=ehr,
            drafter=drafter,
            ledger=ledger,
            model=model,
            job=job,
            max_images=settings.model.max_images_per_prompt,
            patient_identifier_system=settings.ehr.patient_identifier_system,
            patient_identifier_issuers=settings.ehr.patient_identifier_issuers,
            accession_system=settings.ehr.accession_system,
            site_timezone=settings.pacs.site_timezone,
            pseudonym_key=pseudonym_key,
            source_name=source_name(settings),
            ehr_name=ehr_name(settings),
            model_capacity=capacity,
            image_processes=image_processes(settings),
            on_progress=on_progress,
        )


@contextmanager
def open_fairness_services(
    settings: MedvlmSettings,
    *,
    model_version: str | None = None,
    write_measure_report: bool | None = None,
    refresh_signed: bool = False,
) -> Iterator[FairnessServices]:
    """The monitor's connectors (ledger and EHR only: no model is loaded)."""
    from flows.fairness import FairnessServices

    with ExitStack() as stack:
        ehr, ledger = _open_ehr_and_ledger(settings, stack, settings.job.pseudonym_key_bytes())
        yield FairnessServices(
            ledger=ledger,
            ehr=ehr,
            settings=settings.fairness,
            identifier_system=settings.job.identifier_system,
            model_version=model_version,
            write_measure_report=(
                settings.fairness.write_measure_report
                if write_measure_report is None
                else write_measure_report
            ),
            refresh_signed=refresh_signed,
            write_strategy=settings.job.write_strategy,
        )
