"""The one settings tree of medvlm-pipeline.

Loaded once at an entry point (the CLI, a flow deployment, a test fixture) with
``MedvlmSettings()`` and passed down. Every field can be set from the environment with the
``MEDVLM_`` prefix and ``__`` between levels, e.g. ``MEDVLM_SERVING__NUM_GPUS=1`` or
``MEDVLM_MODEL__SOURCE=/models/med-r1``. No other module reads ``os.environ`` for configuration.

Secrets are ``SecretStr`` and never have a value written in code.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Final, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ByteSize,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from medvlm.errors import ConfigurationError
from pipeline.fairness_types import ATTRIBUTES, AlertRule
from pipeline.reportable import DEFAULT_REPORTABLE_MODALITIES, DEFAULT_REPORTABLE_SOP_CLASSES

TinyArchitecture = Literal["qwen2_vl", "gemma3"]


def _default_home() -> Path:
    return Path.home() / ".cache" / "medvlm"


def host_timezone() -> tzinfo:
    """The host's time zone with its DST rules: the zone /etc/localtime links to, else the
    current fixed offset (a container without zone data)."""
    target = Path("/etc/localtime").resolve()
    if "zoneinfo" in target.parts:
        key = "/".join(target.parts[target.parts.index("zoneinfo") + 1 :])
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else UTC


class ModelSettings(BaseModel):
    """Which Med-VLM runs and how the vLLM engine is built for it."""

    source: str | None = Field(
        default=None,
        description=(
            "Checkpoint directory or hub id of the model (e.g. a local Med-R1 or MedGemma "
            "checkpoint). Required, except for development with `allow_random_weights`: then "
            "unset builds the tiny random-weight checkpoint under MEDVLM_HOME."
        ),
    )
    tiny_architecture: TinyArchitecture = Field(
        default="qwen2_vl",
        description="Architecture of the tiny checkpoint built when `source` is unset.",
    )
    allow_random_weights: bool = Field(
        default=False,
        description=(
            "Development only: allow the project's tiny random-weight checkpoint (built when "
            "`source` is unset, or named by `source`). Off: every command that would load it "
            "refuses to start. `medvlm demo` and `draft-one` turn it on for themselves; drafts "
            "from random weights say so in their Device and text."
        ),
    )
    served_name: str = Field(
        default="medvlm-draft",
        description="Model name answered on the OpenAI-compatible route (`model` field).",
    )
    version: str | None = Field(
        default=None,
        description=(
            "Version label of the model recorded with every draft. Unset: derived from the "
            "checkpoint's weights hash."
        ),
    )
    max_model_len: int = Field(default=4096, ge=256, description="Context length given to vLLM.")
    max_tokens: int = Field(
        default=1536, ge=16, description="Upper bound of generated tokens for one draft report."
    )
    temperature: float = Field(
        default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy (reproducible drafts)."
    )
    seed: int = Field(default=0, description="Sampling seed passed to vLLM for reproducibility.")
    dtype: str = Field(
        default="auto", description="vLLM dtype (`auto`, `bfloat16`, `float16`, `float32`)."
    )
    kv_cache_memory_fraction: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "GPUs only: vLLM `gpu_memory_utilization`, the share of GPU memory for weights and "
            "KV cache. Unset: 0.9. On CPU use `kv_cache_bytes` (vLLM reads a fraction there as "
            "a share of one NUMA node's RAM, which differs between machines)."
        ),
    )
    kv_cache_bytes: ByteSize | None = Field(
        default=None,
        gt=0,
        description=(
            "KV cache size in bytes (vLLM `kv_cache_memory_bytes`; accepts e.g. `512MiB`). "
            "Unset on CPU: computed from the checkpoint's config.json as max_num_seqs × "
            "max_model_len × bytes per token, at least 256 MiB, and checked against the "
            "memory of the NUMA node before Ray starts (serving/kv_cache.py). Unset on GPU: "
            "the fraction is used."
        ),
    )
    max_num_seqs: int = Field(
        default=16,
        ge=1,
        le=1024,
        description=(
            "Sequences one engine runs at once (vLLM `max_num_seqs`); with max_model_len it "
            "sizes the CPU KV cache. Keep it at least serving.max_ongoing_requests."
        ),
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per replica for tensor parallelism."
    )
    max_images_per_prompt: int = Field(
        default=4, ge=1, description="Images one request may carry (CT/MR slices, cine frames)."
    )
    enforce_eager: bool = Field(
        default=False, description="Disable CUDA graphs / compilation (faster start, slower run)."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow checkpoint-supplied Python code. Leave off unless vetted."
    )


# ServingSettings fields that tune Serve's autoscaling, named as in its `autoscaling_config`
# (each only with `max_replicas`; unset ones keep Serve's defaults).
AUTOSCALING_TUNING = (
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "look_back_period_s",
)


class ServingSettings(BaseModel):
    """The Ray Serve application that wraps the engine."""

    app_name: str = Field(default="medvlm", description="Ray Serve application name.")
    host: str = Field(
        default="127.0.0.1",
        description="Address of Ray Serve's HTTP proxy. Loopback unless a cluster fronts it.",
    )
    port: int = Field(default=8765, ge=1, le=65535, description="Port of Ray Serve's HTTP proxy.")
    route_prefix: str = Field(default="/", description="HTTP route prefix of the application.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        default="EveryNode",
        description=(
            "Where Ray Serve runs its HTTP proxies: on every node with a replica (a cluster's "
            "load balancer spreads over them), on the head only (nodes that share one address, "
            "e.g. a test cluster on one host: proxies on one host and port would collide), or "
            "none (handles only)."
        ),
    )
    num_replicas: int | None = Field(
        default=None,
        ge=1,
        description=(
            "A fixed number of model replicas. Unset: 1, or as many as autoscaling decides when "
            "`max_replicas` is set (the two exclude each other)."
        ),
    )
    min_replicas: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Autoscaling: replicas kept when idle, and started first (Serve's `min_replicas`). "
            "Unset: 1. 0 frees the model's resources when idle, at the cost of a cold start "
            "(a minute or more for vLLM) on the next request. Needs `max_replicas`."
        ),
    )
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Autoscaling on: Ray Serve runs between `min_replicas` and this many replicas, "
            "following the queued requests (Serve's `autoscaling_config`). Unset: a fixed "
            "`num_replicas`. The flows size their concurrency for this many replicas."
        ),
    )
    target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Autoscaling: requests per replica, running and queued, that Serve aims at; more "
            "scales up, fewer scales down. At most `max_ongoing_requests` (below it leaves "
            "headroom). Unset: Serve's default (2). Needs `max_replicas`."
        ),
    )
    upscale_delay_s: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Autoscaling: seconds the load must stay above target before a replica is added. "
            "Unset: Serve's default (30). Needs `max_replicas`."
        ),
    )
    downscale_delay_s: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Autoscaling: seconds the load must stay below target before a replica is removed. "
            "Unset: Serve's default (600). Needs `max_replicas`."
        ),
    )
    look_back_period_s: float | None = Field(
        default=None,
        gt=10,
        description=(
            "Autoscaling: seconds of load Serve averages before it decides (Serve's "
            "`look_back_period_s`); shorter reacts faster to a batch starting. Above 10 (the "
            "interval at which Serve collects the load). Unset: Serve's default (30). Needs "
            "`max_replicas`."
        ),
    )
    max_replicas_per_node: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description=(
            "Replicas of the model one Ray node runs at most (Serve's `max_replicas_per_node`): "
            "1 spreads the replicas over nodes, so losing a node loses one replica. Unset: Serve "
            "packs replicas wherever resources are free."
        ),
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per replica (0 on CPU machines, >= 1 in production)."
    )
    max_ongoing_requests: int = Field(
        default=16, ge=1, description="Requests one replica accepts at once (backpressure)."
    )
    ray_address: str | None = Field(
        default=None,
        description="Address of an existing Ray cluster (`auto`, `ray://...`). Unset: local Ray.",
    )
    ray_start_timeout_s: float = Field(
        default=180.0,
        ge=30.0,
        description=(
            "Seconds a local Ray start may take in all: Ray's own start-up waits (GCS port, "
            "dashboard head) and Serve's proxy ready checks get this budget, and a start that "
            "misses Ray's fixed windows (15 s for the dashboard agent, 30 s for the raylet) is "
            "retried within it. Sized for a loaded 2-core machine: one start took 6-46 s there."
        ),
    )
    ray_start_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Local Ray starts tried within `ray_start_timeout_s` before giving up.",
    )
    include_dashboard: bool = Field(
        default=False,
        description=(
            "Run Ray's dashboard web UI (127.0.0.1:8265) with a local Ray. Off: Ray still runs "
            "what it cannot start without, a reduced dashboard head (no UI) and its agents."
        ),
    )
    ray_worker_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description=(
            "Nice value of a local Ray's workers (Serve controller, proxy, replicas and the vLLM "
            "engine they start), Ray's `worker_niceness`. Ray's own default, 15, loses every CPU "
            "contest: beside two busy processes on 2 cores serve.start() took ~70-100 s and a "
            "replica had not loaded the tiny model after 13 minutes (measured); at 0 they run "
            "as any other program."
        ),
    )
    startup_timeout_s: float = Field(
        default=600.0, gt=0, description="Seconds to wait for the application to become healthy."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Seconds one draft request may take end to end."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token the OpenAI-compatible route requires. Unset: no auth (loopback).",
    )

    @property
    def autoscaling(self) -> bool:
        """Serve autoscales the replicas (``max_replicas`` is set)."""
        return self.max_replicas is not None

    @property
    def replicas_at_most(self) -> int:
        """The most replicas that can run: ``max_replicas`` when autoscaling, else the fixed
        number."""
        if self.max_replicas is not None:
            return self.max_replicas
        return self.num_replicas or 1

    @model_validator(mode="after")
    def _check_replicas(self) -> ServingSettings:
        tuning = [
            name
            for name in ("min_replicas", *AUTOSCALING_TUNING)
            if getattr(self, name) is not None
        ]
        if self.max_replicas is None:
            if tuning:
                raise ValueError(
                    f"{', '.join(tuning)} only apply with autoscaling: set max_replicas "
                    "(MEDVLM_SERVING__MAX_REPLICAS) too"
                )
            return self
        if self.num_replicas is not None:
            raise ValueError(
                "num_replicas and max_replicas exclude each other: a fixed number of replicas, "
                "or autoscaling between min_replicas and max_replicas"
            )
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        target = self.target_ongoing_requests
        if target is not None and target > self.max_ongoing_requests:
            raise ValueError(
                f"target_ongoing_requests ({target:g}) exceeds max_ongoing_requests "
                f"({self.max_ongoing_requests}): replicas would run full, with requests queued, "
                "before Serve adds one; keep the target below max_ongoing_requests"
            )
        return self


class DevServerSettings(BaseModel):
    """Local development servers: Orthanc (PACS) and a FHIR R4 server, loopback only."""

    workdir: Path | None = Field(
        default=None,
        description="Where dev servers keep data, logs, PIDs and credentials. Unset: HOME/dev.",
    )
    orthanc_http_port: int = Field(default=8942, ge=1, le=65535, description="Orthanc HTTP port.")
    orthanc_dicom_port: int = Field(
        default=4342, ge=1, le=65535, description="Orthanc DICOM (DIMSE) port."
    )
    orthanc_aet: str = Field(default="MEDVLM_PACS", max_length=16, description="Orthanc AE title.")
    orthanc_user: str = Field(default="medvlm", description="Orthanc HTTP user.")
    fhir_port: int = Field(default=8943, ge=1, le=65535, description="FHIR R4 server port.")
    fhir_venv: Path | None = Field(
        default=None,
        description="Virtualenv of the FHIR server (its own dependencies). Unset: HOME/fhir-venv.",
    )
    triton_venv: Path | None = Field(
        default=None,
        description=(
            "Virtualenv of the Triton dev server (nvidia-pytriton on Debian's Python 3.11, "
            "scripts/install-triton.sh). Unset: HOME/triton-venv."
        ),
    )
    startup_timeout_s: float = Field(default=60.0, gt=0, description="Health-check deadline.")
    stop_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a dev server gets to exit after SIGTERM before it is sent SIGKILL.",
    )
    scp_aet: str = Field(
        default="MEDVLM_SCP",
        max_length=16,
        description=(
            "AE title of the project's storage SCP, registered in Orthanc's DicomModalities."
        ),
    )
    scp_port: int = Field(
        default=4343,
        ge=1,
        le=65535,
        description="Port of the project's storage SCP on 127.0.0.1 (C-MOVE destination).",
    )
    orthanc_stable_age_s: int = Field(
        default=2,
        ge=1,
        le=60,
        description="Orthanc `StableAge`: seconds without new instances before a study is stable.",
    )
    orthanc_executable: Path = Field(
        default=Path("/usr/sbin/Orthanc"),
        description="Orthanc server binary (Debian package `orthanc`).",
    )
    orthanc_plugins_dir: Path = Field(
        default=Path("/usr/share/orthanc/plugins"),
        description=(
            "Directory of the DICOMweb and GDCM plugins (`orthanc-dicomweb`, `orthanc-gdcm`)."
        ),
    )
    bind_shim: Path | None = Field(
        default=None,
        description=(
            "LD_PRELOAD library that rewrites Orthanc's wildcard bind() to loopback (built by "
            "scripts/install-servers.sh). Unset: HOME/lib/bind_loopback.so when it exists."
        ),
    )
    allow_wildcard_bind: bool = Field(
        default=False,
        description=(
            "Start Orthanc even when the bind shim is missing and the host has interfaces other "
            "than loopback (Orthanc then listens on all of them). Leave off."
        ),
    )


class HttpEdgeSettings(BaseModel):
    """TLS, timeouts and the retry policy of one peer called over the network.

    Shared by the PACS, the EHR and the model service (``job.model_client``): the same names,
    the same meaning, one retry helper (``medvlm.http_edge``). Retries happen on connection
    errors, timeouts and 429/502/503/504 only.
    """

    verify_tls: bool = Field(
        default=True, description="Verify the peer's TLS certificate. Leave on outside loopback."
    )
    ca_bundle: Path | None = Field(
        default=None, description="PEM CA bundle of the hospital's own CA. Unset: system CAs."
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds to open a (TLS) connection."
    )
    read_timeout_s: float = Field(
        default=60.0, gt=0, description="Seconds to wait for data between bytes of an answer."
    )
    write_timeout_s: float = Field(default=30.0, gt=0, description="Seconds to send a request.")
    pool_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds to wait for a free pooled connection."
    )
    max_connections: int = Field(
        default=16,
        ge=1,
        le=1024,
        description=(
            "Keep-alive connections pooled for this peer at most (one pool per run). At least "
            "job.fetch_concurrency + job.write_concurrency, so that no study waits for one; "
            "the model client takes at least the run's model concurrency."
        ),
    )
    retry_attempts: int = Field(
        default=10,
        ge=1,
        le=50,
        description=(
            "Attempts per request on connection errors, timeouts and 429/502/503/504, within "
            "retry_budget_s."
        ),
    )
    retry_budget_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds one call may spend on retries (with retry_attempts, whichever ends first). "
            "A call that spends it without an answer marks the service down: new work waits "
            "for it (a probe every probe_interval_s) instead of failing study after study."
        ),
    )
    probe_interval_s: float = Field(
        default=5.0, gt=0, description="Seconds between two probes of a service that is down."
    )
    retry_initial_backoff_s: float = Field(
        default=0.5, ge=0, description="First backoff; doubles per attempt, plus jitter."
    )
    retry_max_backoff_s: float = Field(
        default=20.0,
        ge=0,
        description="Upper bound of one backoff between two attempts.",
    )
    retry_after_max_s: float = Field(
        default=120.0,
        ge=0,
        description=(
            "Longest Retry-After (429/503) that is honoured by waiting instead of the backoff; "
            "a server asking for longer fails the call at once (that study fails, not the run)."
        ),
    )

    @model_validator(mode="after")
    def _check_ca_bundle(self) -> HttpEdgeSettings:
        if self.ca_bundle is not None and not self.ca_bundle.is_file():
            raise ValueError(f"ca_bundle {self.ca_bundle} is not a file")
        return self


class TritonSettings(HttpEdgeSettings):
    """A Triton Inference Server serving the Med-VLM (``job.model_endpoint=triton``).

    The wire contract is that of Triton's vLLM backend (serving/triton_drafter.py): the prompt,
    already rendered with the model's chat template, as ``text_input``; the images as
    ``image``; the sampling parameters with the report's JSON Schema as ``sampling_parameters``.
    TLS, timeouts (``read_timeout_s`` is one inference's deadline) and retries (on UNAVAILABLE,
    503 and connection errors) are those of every network edge.
    """

    url: str | None = Field(
        default=None,
        description=(
            "Triton's address for the chosen protocol: `host:port` of its HTTP endpoint "
            "(default port 8000) or of its gRPC endpoint (8001); an `http://`/`https://` "
            "prefix is accepted for HTTP and turns TLS on for https."
        ),
    )
    protocol: Literal["http", "grpc"] = Field(
        default="http", description="KServe v2 protocol to speak: `http` or `grpc`."
    )
    model_name: str = Field(
        default="medvlm",
        min_length=1,
        max_length=200,
        description="Name of the model in Triton's model repository.",
    )
    model_version: str = Field(
        default="",
        max_length=20,
        pattern=r"^[0-9]*$",
        description="Version of that model to call; empty: the server's version policy chooses.",
    )
    chat_template: Path | None = Field(
        default=None,
        description=(
            "The served model's chat template (Jinja), or its checkpoint folder holding "
            "chat_template.jinja or tokenizer_config.json: Triton's vLLM backend takes a "
            "rendered prompt, so the client applies the template. Unset: model.source, when it "
            "is a local folder."
        ),
    )
    add_vision_id: bool = Field(
        default=False,
        description="Passed to the chat template: number the images ('Picture 1: …').",
    )


class PacsSettings(HttpEdgeSettings):
    """The image source: a DICOM folder (default), a DICOMweb PACS, or a DIMSE PACS.

    Owned by connectors/ (see connectors/pacs.py); extend here, one description per field.
    """

    kind: Literal["folder", "dicomweb", "dimse"] = Field(
        default="folder", description="Which image source implementation to use."
    )
    folder: Path | None = Field(
        default=None, description="DICOM folder source (files or DICOMDIR). Unset: HOME/dicom."
    )
    # -- DICOMweb (kind = "dicomweb") ----------------------------------------------------------
    dicomweb_url: str | None = Field(
        default=None,
        description="DICOMweb root (QIDO/WADO/STOW share it), e.g. https://pacs/dicom-web.",
    )
    auth: Literal["none", "basic", "bearer"] = Field(
        default="none", description="HTTP authentication towards the PACS (DICOMweb, REST)."
    )
    username: str | None = Field(default=None, description="User for basic auth.")
    password: SecretStr | None = Field(default=None, description="Password for basic auth.")
    token: SecretStr | None = Field(default=None, description="Bearer token (auth = bearer).")
    token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token, re-read for every new client (rotation).",
    )
    # TLS, timeouts and retries: HttpEdgeSettings (a DICOMweb answer can be a large multipart).
    read_timeout_s: float = Field(
        default=120.0, gt=0, description="Seconds to wait for data between bytes of an answer."
    )
    retry_max_backoff_s: float = Field(
        default=10.0, ge=0, description="Upper bound of one backoff between two attempts."
    )
    page_size: int = Field(
        default=100, ge=1, le=10000, description="QIDO results per page (limit/offset)."
    )
    wado_transfer_syntax: str = Field(
        default="*",
        description=(
            "Transfer syntax asked for in WADO-RS retrieves: `*` keeps what the PACS stored "
            "(compressed stays compressed), or a UID such as 1.2.840.10008.1.2.1."
        ),
    )
    qido_filter_modalities_client_side: bool = Field(
        default=False,
        description=(
            "Do not send ModalitiesInStudy to QIDO; filter modalities after each page instead "
            "(PACS whose paging breaks with that key, e.g. Orthanc 1.10 + DICOMweb 1.7)."
        ),
    )
    new_study_detection: Literal["qido", "orthanc_changes"] = Field(
        default="qido",
        description=(
            "How new studies are found: a QIDO StudyDate window with a seen-UID set (any PACS) "
            "or Orthanc's /changes feed acting on StableStudy."
        ),
    )
    qido_watermark_lookback_days: int = Field(
        default=1,
        ge=0,
        le=365,
        description="Days before the newest seen StudyDate that QIDO detection keeps re-querying.",
    )
    orthanc_url: str | None = Field(
        default=None,
        description="Orthanc REST root for /changes (new_study_detection = orthanc_changes).",
    )
    timezone: str | None = Field(
        default=None,
        description=(
            "IANA time zone of the site's DICOM dates and times (StudyDate/StudyTime are local "
            "time), used when an instance has no TimezoneOffsetFromUTC. Unset: the host's."
        ),
    )

    @property
    def site_timezone(self) -> tzinfo:
        """``timezone`` as a zone, else the host's."""
        return ZoneInfo(self.timezone) if self.timezone is not None else host_timezone()

    # -- DIMSE (kind = "dimse") ----------------------------------------------------------------
    dimse_host: str | None = Field(default=None, description="PACS DIMSE host.")
    dimse_port: int = Field(default=104, ge=1, le=65535, description="PACS DIMSE port.")
    called_aet: str = Field(
        default="ANY-SCP", min_length=1, max_length=16, description="AE title of the PACS."
    )
    calling_aet: str = Field(
        default="MEDVLM", min_length=1, max_length=16, description="Our AE title towards the PACS."
    )
    scp_aet: str = Field(
        default="MEDVLM_SCP",
        min_length=1,
        max_length=16,
        description="AE title of our storage SCP (C-MOVE destination, known to the PACS).",
    )
    scp_host: str = Field(
        default="127.0.0.1", description="Address our storage SCP listens on (C-MOVE)."
    )
    scp_port: int = Field(
        default=4343, ge=1, le=65535, description="Port our storage SCP listens on (C-MOVE)."
    )
    dimse_retrieve: Literal["get", "move"] = Field(
        default="get", description="How instances are retrieved over DIMSE: C-GET or C-MOVE."
    )
    dimse_timeout_s: float = Field(
        default=60.0, gt=0, description="DIMSE, ACSE and network timeout in seconds."
    )

    @model_validator(mode="after")
    def _check_pacs(self) -> PacsSettings:
        if self.kind == "dicomweb" and not self.dicomweb_url:
            raise ValueError("pacs.dicomweb_url is required when pacs.kind is 'dicomweb'")
        if self.kind == "dimse" and not self.dimse_host:
            raise ValueError("pacs.dimse_host is required when pacs.kind is 'dimse'")
        if self.new_study_detection == "orthanc_changes" and not self.orthanc_url:
            raise ValueError("pacs.orthanc_url is required for new_study_detection=orthanc_changes")
        if self.auth == "basic" and (self.username is None or self.password is None):
            raise ValueError("pacs.auth 'basic' needs pacs.username and pacs.password")
        if self.auth == "bearer" and self.token is None and self.token_file is None:
            raise ValueError("pacs.auth 'bearer' needs pacs.token or pacs.token_file")
        if self.timezone is not None:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"pacs.timezone {self.timezone!r} is not an IANA zone") from exc
        return self


class EhrSettings(HttpEdgeSettings):
    """The EHR: an NDJSON/Bundle folder (default) or a FHIR R4 REST server.

    Owned by connectors/ (see connectors/fhir.py); extend here, one description per field.
    """

    kind: Literal["folder", "fhir"] = Field(
        default="folder", description="Which EHR implementation to use."
    )
    folder: Path | None = Field(
        default=None, description="FHIR Bulk Data style folder (NDJSON). Unset: HOME/ehr."
    )
    base_url: str | None = Field(
        default=None,
        description=(
            "FHIR R4 base URL (e.g. https://ehr.example.org/fhir/R4); needed for kind=fhir."
        ),
    )
    auth: Literal["none", "bearer", "smart"] = Field(
        default="none",
        description=(
            "How to authenticate to the FHIR server: none, a static bearer token, or SMART "
            "Backend Services (OAuth2 client credentials with a signed JWT assertion)."
        ),
    )
    token: SecretStr | None = Field(
        default=None, description="Static bearer token (auth=bearer). Prefer token_file."
    )
    token_file: Path | None = Field(
        default=None,
        description="File holding the bearer token (auth=bearer); re-read per request (rotation).",
    )
    smart_client_id: str | None = Field(
        default=None, description="SMART Backend Services client_id (iss and sub of the assertion)."
    )
    smart_private_key_file: Path | None = Field(
        default=None,
        description="PEM private key that signs the client assertion (RSA, or EC P-384).",
    )
    smart_key_id: str | None = Field(
        default=None, description="`kid` of the signing key, as published in the client's JWK Set."
    )
    smart_algorithm: Literal["RS384", "ES384"] = Field(
        default="RS384", description="JWS algorithm of the client assertion."
    )
    smart_scopes: str = Field(
        default=(
            "system/Patient.rs system/ServiceRequest.rs system/Condition.rs "
            "system/ImagingStudy.rs system/DiagnosticReport.crs system/Observation.crs "
            "system/Device.crs system/Provenance.crs system/DocumentReference.crs "
            "system/MeasureReport.crs"
        ),
        description=(
            "Space-separated SMART system scopes requested with each token, in SMART App Launch "
            "2 syntax (`system/Type.cruds`, a subset in that order): reads `.rs`; what the "
            "pipeline writes `.crs`, since a conditional create searches and may return the "
            "match. A server that knows only SMART 1 scopes needs `.read` / `.write` here."
        ),
    )
    smart_token_url: str | None = Field(
        default=None,
        description=(
            "OAuth2 token endpoint. Unset: discovered from BASE/.well-known/smart-configuration."
        ),
    )
    # TLS, timeouts and retries: HttpEdgeSettings.
    connect_timeout_s: float = Field(default=5.0, gt=0, description="TCP/TLS connect timeout.")
    read_timeout_s: float = Field(default=30.0, gt=0, description="Timeout waiting for a response.")
    patient_identifier_system: str | None = Field(
        default=None,
        description="Identifier system of the MRN that DICOM PatientID carries; used to find "
        "the Patient of a study that has no order. Unset: match the value in any system.",
    )
    patient_identifier_issuers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "DICOM IssuerOfPatientID → the FHIR identifier system of that issuer's MRNs, for "
            "sites with several issuers; the images' PatientID must match the order's Patient "
            "in that system (else in patient_identifier_system)."
        ),
    )
    accession_system: str | None = Field(
        default=None,
        description=(
            "ServiceRequest.identifier system of accession numbers at this site (FHIR token "
            "search system|value). Unset: match the value in any system."
        ),
    )
    page_size: int = Field(default=100, ge=1, le=1000, description="`_count` of searches.")
    max_pages: int = Field(
        default=50,
        ge=1,
        description="Pages of one search followed at most (bounds a runaway search).",
    )
    strict_search: bool = Field(
        default=True,
        description=(
            "Send `Prefer: handling=strict` with searches, so that a server which does not "
            "support a search parameter rejects the search instead of ignoring the parameter "
            "and answering a wider search (another patient's reports). Some servers reject "
            "unknown Prefer values: turn this off for them; an OperationOutcome warning in a "
            "search answer still fails the search."
        ),
    )

    @model_validator(mode="after")
    def _check_ehr(self) -> EhrSettings:
        if self.kind == "fhir" and not self.base_url:
            raise ValueError("ehr.kind 'fhir' needs ehr.base_url")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("ehr.base_url must be an http(s) URL")
        if self.auth == "bearer" and self.token is None and self.token_file is None:
            raise ValueError("ehr.auth 'bearer' needs ehr.token or ehr.token_file")
        if self.auth == "smart" and not (
            self.smart_client_id and self.smart_private_key_file and self.smart_key_id
        ):
            raise ValueError(
                "ehr.auth 'smart' needs ehr.smart_client_id, ehr.smart_private_key_file and "
                "ehr.smart_key_id"
            )
        return self


class JobSettings(BaseModel):
    """The drafting job: batching, retries, where drafts go, the ledger."""

    ledger_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job ledger (PostgreSQL in production), best without "
        "its password (job.ledger_password_file). Unset: SQLite at HOME/ledger.db.",
    )
    ledger_password: SecretStr | None = Field(
        default=None,
        description="Password of the ledger's database user, set into job.ledger_url escaped "
        "(so '@', ':', '/', '%' need no care). Prefer ledger_password_file.",
    )
    ledger_password_file: Path | None = Field(
        default=None,
        description="File holding the ledger's database password (a Kubernetes Secret mounted "
        "as a file), read at start-up.",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Failed attempts before a study is dead-lettered."
    )
    page_size: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description=(
            "Pending jobs read from the ledger per query (keyset pages): a run holds at most "
            "this many job rows besides the studies in flight, however large the ledger."
        ),
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "Studies at the model at once. Unset: what the model service takes, "
            "the replicas (serving.num_replicas, or serving.max_replicas when autoscaling) × "
            "serving.max_ongoing_requests (for `openai` endpoints serving.max_ongoing_requests), "
            "so every replica is kept busy."
        ),
    )
    fetch_concurrency: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "Studies fetched and decoded at once (EHR context, PACS retrieve, image "
            "preprocessing), overlapped with drafting so the model does not wait for I/O."
        ),
    )
    write_concurrency: int = Field(
        default=4, ge=1, le=256, description="Draft write-backs to the EHR at once."
    )
    image_processes: int | None = Field(
        default=None,
        ge=0,
        le=256,
        description=(
            "Processes that decode and encode the model's images (CPU-bound: a 2k radiograph "
            "costs ~80 ms of CPU). 0: in the fetch threads. Unset: 0 with a local model, which "
            "shares this machine's CPUs; else one per CPU this process may use (a worker whose "
            "model runs on a GPU cluster)."
        ),
    )
    max_image_side: int = Field(
        default=1024, ge=64, description="Longest image side sent to the model, in pixels."
    )
    write_target: Literal["diagnostic_report", "document_reference"] = Field(
        default="diagnostic_report",
        description="What a draft becomes in the EHR: a preliminary DiagnosticReport with "
        "Observations, or a preliminary DocumentReference (EHRs that take drafts only as notes, "
        "e.g. Epic); both with the model's Device and a Provenance.",
    )
    store_sr: bool = Field(
        default=False,
        description=(
            "Also store each draft in the PACS as a DICOM Structured Report (STOW-RS, DICOMweb "
            "PACS only), after its EHR write: in the source study, marked UNVERIFIED and as an "
            "AI draft, with a SOP Instance UID derived from the draft (a re-run replaces it)."
        ),
    )
    write_strategy: Literal["auto", "transaction", "conditional", "search"] = Field(
        default="auto",
        description=(
            "How drafts are sent to a FHIR EHR: one transaction of conditional creates, one "
            "conditional create (If-None-Exist) per resource, or a search before each plain "
            "create (EHRs with neither, e.g. Epic, Oracle Health). `auto`: the strongest the "
            "server's CapabilityStatement lists. In every mode a write whose answer was lost is "
            "looked up by its identifiers before anything is sent again."
        ),
    )
    outage_wait_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "Seconds a study waits for the EHR or PACS once it is known to be down (the "
            "service is probed meanwhile) before the run stops taking studies and ends with "
            "the rest still pending: an outage spends no study's attempts."
        ),
    )
    outage_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Times one study goes on after waiting for a service that was down.",
    )
    write_attempts: int = Field(
        default=4,
        ge=1,
        le=20,
        description=(
            "Attempts of one draft's write within a run when the EHR's answer is lost or it is "
            "unavailable (each after looking up what the last one wrote)."
        ),
    )
    write_backoff_s: float = Field(
        default=1.0,
        ge=0,
        description="Wait before the second write attempt; doubles per attempt, up to 20 s.",
    )
    organization: str | None = Field(
        default=None,
        description=(
            "Organization/{id} of the radiology department in the EHR: the drafts' performer "
            "(DiagnosticReport), author (DocumentReference) and the AI's onBehalfOf "
            "(Provenance, US Core provenance-1). Unset: named by organization_display only."
        ),
    )
    organization_display: str = Field(
        default="Radiology",
        min_length=1,
        max_length=200,
        description="Name of that Organization as shown in the drafts.",
    )
    identifier_system: str = Field(
        default="urn:medvlm-pipeline:draft",
        description="Identifier system of the project's resources (stable draft ids).",
    )
    model_endpoint: Literal["local", "http", "openai", "triton"] = Field(
        default="local",
        description="How the flow reaches the model: `local` starts Ray Serve in-process "
        "(demo, tests); `http` calls a running Serve app's /v1/reports; `openai` any "
        "OpenAI-compatible server; `triton` a Triton Inference Server (job.triton).",
    )
    model_url: str | None = Field(
        default=None,
        description="Base URL for `http` (Serve root) or `openai` (…/v1) model endpoints.",
    )
    model_client: HttpEdgeSettings = Field(
        default_factory=lambda: HttpEdgeSettings(read_timeout_s=300.0),
        description=(
            "TLS, timeouts and retries of the model service for `http` and `openai` endpoints "
            "(a draft can take minutes on a loaded service)."
        ),
    )
    triton: TritonSettings = Field(
        default_factory=lambda: TritonSettings(read_timeout_s=300.0, retry_budget_s=120.0),
        description=(
            "The Triton Inference Server of the `triton` endpoint: address, protocol, model "
            "name and version, chat template, TLS, timeouts and retries."
        ),
    )
    draft_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds one study's draft may take, whatever the backend; then it fails.",
    )
    reportable_sop_classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REPORTABLE_SOP_CLASSES),
        description=(
            "SOP Class UIDs sent to the model: the image storage classes of CR, DX, CT, MR, "
            "US, MG, XA, RF, NM, PT and OT. Other objects (SEG, RT, SR, PR, KO, waveforms, "
            "documents) are never decoded; a study with nothing else is skipped."
        ),
    )
    reportable_modalities: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REPORTABLE_MODALITIES),
        description="Modalities sent to the model (an instance needs both lists to match).",
    )
    skip_burned_in_annotation: bool = Field(
        default=False,
        description=(
            "Skip studies whose images declare BurnedInAnnotation YES (text such as a name in "
            "the pixels). Off: they are drafted and flagged `burned-in-annotation`."
        ),
    )
    worker_id: str = Field(
        default_factory=lambda: JobSettings.default_worker_id(),
        min_length=1,
        max_length=200,
        description=(
            "This worker's name in the ledger's claims (several workers may share one "
            "PostgreSQL ledger). Unset: host:pid:random, new for every process; set it only to "
            "a value no other running worker has."
        ),
    )
    lease_s: float = Field(
        default=600.0,
        ge=1,
        le=86_400,
        description=(
            "Seconds a job claimed by this worker stays its own without renewal (the run "
            "renews its claims every lease_s/3, and releases them when it ends); a worker that "
            "dies loses its jobs to the others this long after its last renewal. Must exceed "
            "a study's fetch + draft + write time, so that a stalled renewal does not hand a "
            "study in progress to another worker."
        ),
    )

    preflight: bool = Field(
        default=True,
        description=(
            "Before a run discovers studies or starts the model: check that the PACS, the EHR "
            "and the ledger answer (one cheap request each, no patient data), and stop with "
            "exit code 2 naming the one that does not. `medvlm check` runs the same checks."
        ),
    )
    preflight_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "Seconds each pre-flight check may take, one attempt: the connect timeout (at most "
            "the service's own connect_timeout_s) and the wait for its answer. The checks run "
            "at once, so the pre-flight takes about this long at most."
        ),
    )
    pseudonym_key: SecretStr | None = Field(
        default=None,
        description=(
            "Site secret for HMAC-SHA-256 pseudonyms: the digest of the images' PatientID "
            "the ledger keeps for the write gate, and the `identifier-…` references of "
            "accession numbers and MRNs in messages and Prefect parameters. Unset: plain "
            "SHA-256, which anyone can reverse for short MRNs or sequential accession numbers "
            "by trying every value. Prefer pseudonym_key_file. Changing it makes studies "
            "prepared under the old key fail the write gate with a reason (requeue them)."
        ),
    )
    pseudonym_key_file: Path | None = Field(
        default=None,
        description="File holding the pseudonym key (a Kubernetes Secret mounted as a file).",
    )

    @model_validator(mode="after")
    def _check_pseudonym_key(self) -> JobSettings:
        if self.pseudonym_key is not None and self.pseudonym_key_file is not None:
            raise ValueError("set job.pseudonym_key or job.pseudonym_key_file, not both")
        self._read_pseudonym_key()
        return self

    @field_serializer("ledger_url", when_used="json")
    def _ledger_url_without_password(self, url: str | None) -> str | None:
        """As JSON (``medvlm settings``) the ledger's URL shows ``***`` for its password."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            return None if url is None else make_url(url).render_as_string(hide_password=True)
        except ArgumentError:  # not a URL: the pre-flight says so
            return url

    @model_validator(mode="after")
    def _ledger_password_into_url(self) -> JobSettings:
        """``ledger_password[_file]`` set into ``ledger_url`` by SQLAlchemy's URL, which
        escapes it: a password pasted into a URL by hand breaks on ``@ / : %``."""
        if self.ledger_password is not None and self.ledger_password_file is not None:
            raise ValueError("set job.ledger_password or job.ledger_password_file, not both")
        if self.ledger_password is not None:
            password = self.ledger_password.get_secret_value()
        elif self.ledger_password_file is not None:
            try:
                text = Path(self.ledger_password_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(f"job.ledger_password_file unreadable: {why}") from None
            password = text.rstrip("\r\n")  # a Secret file may end with a newline
        else:
            return self
        if not self.ledger_url:
            raise ValueError("job.ledger_password needs job.ledger_url (the database server)")
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(self.ledger_url)
        except ArgumentError:
            raise ValueError("job.ledger_url is not an SQLAlchemy database URL") from None
        if url.password is not None and url.password != password:
            raise ValueError(
                "job.ledger_url holds a password and job.ledger_password is set: give it once"
            )
        self.ledger_url = url.set(password=password).render_as_string(hide_password=False)
        return self

    def _read_pseudonym_key(self) -> bytes | None:
        if self.pseudonym_key is not None:
            key = self.pseudonym_key.get_secret_value().strip()
        elif self.pseudonym_key_file is not None:
            try:
                key = Path(self.pseudonym_key_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ValueError(f"job.pseudonym_key_file unreadable: {why}") from None
        else:
            return None
        if len(key) < 16:
            raise ValueError("job.pseudonym_key is shorter than 16 characters")
        return key.encode("utf-8")

    def pseudonym_key_bytes(self) -> bytes | None:
        """The pseudonym key (read from its file when given, so a rotated Secret is seen by
        the next run), None when none is set."""
        try:
            return self._read_pseudonym_key()
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    @staticmethod
    def default_worker_id() -> str:
        """host:pid:random suffix (the suffix tells apart processes that reuse a pid)."""
        import os
        import secrets
        import socket

        return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"[:200]


def _default_alert_rules() -> list[AlertRule]:
    """Each group against its attribute's reference group and between highest and lowest
    group (the overall value contains the group, which dilutes a gap: CheXclusion, Aequitas)."""
    return [
        AlertRule(
            name="underdiagnosis",
            metric="underdiagnosis_rate",
            ratio_above=1.25,
            min_effect=0.03,
        ),
        AlertRule(name="sensitivity-gap", metric="sensitivity:*", ratio_below=0.8, min_effect=0.05),
        AlertRule(name="failure-gap", metric="failure_rate", difference_above=0.05),
    ]


class FairnessSettings(BaseModel):
    """Fairness monitoring of drafts across patient and operational subgroups (issue 5)."""

    window_days: int = Field(
        default=30, ge=1, le=3650, description="Days of drafts one monitoring run looks at."
    )
    trend_windows: int = Field(
        default=6,
        ge=1,
        le=52,
        description="Windows of `window_days` (this one and earlier ones) shown as trends.",
    )
    attributes: list[str] = Field(
        default_factory=lambda: list(ATTRIBUTES),
        description="Subgroup attributes to stratify by (captured at draft time).",
    )
    min_group_size: int = Field(
        default=30,
        ge=1,
        description="Smallest cell (group members in a metric's denominator) reported with "
        "numbers; smaller cells are reported as suppressed.",
    )
    n_boot: int = Field(
        default=500, ge=50, le=20000, description="Bootstrap resamples for confidence intervals."
    )
    confidence: float = Field(
        default=0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals."
    )
    seed: int = Field(default=0, description="Seed of the bootstrap (reproducible reports).")
    reference_groups: dict[str, str] = Field(
        default_factory=dict,
        description='Reference group per attribute (JSON object, e.g. `{"sex": "male"}`); '
        "an attribute not named, or whose group is absent, uses its largest known group.",
    )
    false_discovery_rate: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Benjamini-Hochberg false discovery rate over the comparisons alert rules "
        "examine in one report.",
    )
    intersections: list[tuple[str, str]] = Field(
        default_factory=lambda: [("sex", "age_band"), ("sex", "race")],
        description="Pairs of attributes whose combined groups (e.g. `female & Black`) are "
        "reported and alerted on like an attribute's (JSON list of pairs).",
    )
    max_unknown_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="An attribute with a larger share of studies unknown is reported as not "
        "assessable.",
    )
    rules: list[AlertRule] = Field(
        default_factory=_default_alert_rules,
        description="Alert rules; the defaults follow CheXclusion-style underdiagnosis checks.",
    )
    report_dir: Path | None = Field(
        default=None, description="Where HTML reports are written. Unset: HOME/fairness."
    )
    write_measure_report: bool = Field(
        default=True, description="Write the summary as a FHIR MeasureReport into the EHR."
    )
    measure_url: str = Field(
        default="urn:medvlm-pipeline:Measure:draft-fairness",
        description="Canonical of the Measure the MeasureReport reports on.",
    )

    @model_validator(mode="after")
    def _check_attributes(self) -> FairnessSettings:
        named = set(self.attributes) | set(self.reference_groups)
        named |= {a for pair in self.intersections for a in pair}
        unknown = sorted(named - set(ATTRIBUTES))
        if unknown:
            raise ValueError(
                f"fairness.attributes {unknown} are not captured; choose from {list(ATTRIBUTES)}"
            )
        return self


class WatchSettings(BaseModel):
    """``medvlm watch``: event-driven drafting of studies as they become stable (issue 17)."""

    interval_s: float = Field(
        default=10.0,
        ge=0.5,
        le=3600,
        description="Seconds between passes over the PACS's change feed or QIDO-RS.",
    )
    stable_age_s: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        description=(
            "QIDO-RS polling: seconds a new study's instance count must stay unchanged before "
            "it is stable (Orthanc's change feed reports stable studies itself: StableAge)."
        ),
    )
    modalities: list[str] = Field(
        default_factory=list,
        description="Draft only studies with one of these modalities (JSON list; empty: all).",
    )
    urgent_priorities: list[str] = Field(
        default_factory=lambda: ["stat", "asap"],
        description="ServiceRequest.priority codes drafted first, before routine studies.",
    )
    retry_after_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description=(
            "Seconds a study that failed waits, times its failed attempts, before the watcher "
            "tries it again (until job.max_attempts, then it is dead-lettered)."
        ),
    )


class TaskSettings(BaseModel):
    """``medvlm tasks --listen``: requested FHIR Tasks found through a rest-hook Subscription,
    with the watermark search as fallback (issue 17)."""

    listen_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the notification listener binds to.",
    )
    listen_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port the notification listener binds to (0: any free port).",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description=(
            "URL the EHR posts notifications to (channel.endpoint), e.g. the hospital proxy's; "
            "unset: http://<listen_host>:<bound port>/."
        ),
    )
    interval_s: float = Field(
        default=60.0,
        ge=1,
        le=86400,
        description=(
            "Seconds between fallback passes when no notification comes (the watermark search "
            "stays the source of truth: a lost notification costs only this much latency)."
        ),
    )


class MedvlmSettings(BaseSettings):
    """Root of the settings tree."""

    model_config = SettingsConfigDict(
        env_prefix="MEDVLM_",
        env_nested_delimiter="__",
        env_file=None,
        extra="forbid",
    )

    home: Path = Field(
        default_factory=_default_home,
        description="Working directory of the project: built models, dev servers, the ledger.",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    dev: DevServerSettings = Field(default_factory=DevServerSettings)
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    ehr: EhrSettings = Field(default_factory=EhrSettings)
    job: JobSettings = Field(default_factory=JobSettings)
    fairness: FairnessSettings = Field(default_factory=FairnessSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    tasks: TaskSettings = Field(default_factory=TaskSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, after a check of every ``MEDVLM_`` variable the environment and
        a .env file (``_env_file=``) hold: one that names no setting is an error."""
        read = [
            (source, where)
            for source, where in ((env_settings, ""), (dotenv_settings, "env file"))
            if isinstance(source, EnvSettingsSource)
        ]
        return (
            _VariableCheck(settings_cls, read),
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _resolve_paths(self) -> MedvlmSettings:
        if self.dev.workdir is None:
            self.dev.workdir = self.home / "dev"
        if self.dev.fhir_venv is None:
            self.dev.fhir_venv = self.home / "fhir-venv"
        if self.dev.triton_venv is None:
            self.dev.triton_venv = self.home / "triton-venv"
        if self.pacs.folder is None:
            self.pacs.folder = self.home / "dicom"
        if self.ehr.folder is None:
            self.ehr.folder = self.home / "ehr"
        if self.fairness.report_dir is None:
            self.fairness.report_dir = self.home / "fairness"
        if self.job.ledger_url is None:
            self.job.ledger_url = f"sqlite:///{self.home / 'ledger.db'}"
        return self

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def bind_shim(self) -> Path | None:
        """The loopback bind shim: ``dev.bind_shim``, else HOME/lib/bind_loopback.so if built."""
        if self.dev.bind_shim is not None:
            return self.dev.bind_shim
        shim = self.home / "lib" / "bind_loopback.so"
        return shim if shim.is_file() else None


# -- MEDVLM_ variables that name no setting ------------------------------------------------------

ENV_PREFIX: Final = "MEDVLM_"
ENV_DELIMITER: Final = "__"

#: The ``MEDVLM_`` variables that are not settings: read by the project's scripts, its Prefect
#: deployment and its tests, never by ``MedvlmSettings``. The check of the environment lets
#: exactly these through; any other ``MEDVLM_`` variable must name a setting.
NOT_SETTINGS: Final = frozenset(
    {
        "MEDVLM_CODE_DIR",  # prefect.yaml's pull step (and the chart): where the flow code is
        "MEDVLM_FHIR_PYTHON",  # scripts/install-servers.sh: the dev FHIR server's interpreter
        "MEDVLM_TRITON_PYTHON",  # scripts/install-triton.sh: the Triton dev server's interpreter
        # medvlm/dev/triton.py → triton_model.py (the Triton venv): the Serve app's bearer token
        "MEDVLM_TRITON_SERVE_API_KEY",
        "MEDVLM_BUILD_CA",  # scripts/build-images.sh: the CA bundle pip gets as a build secret
        "MEDVLM_IMAGE_CACHE",  # scripts/build-images.sh: base tarball, .deb cache, build logs
        "MEDVLM_IMAGE_PREFIX",  # scripts/build-images.sh, test_images.py: image name prefix
        "MEDVLM_PIP_INDEX_URL",  # scripts/build-images.sh: package index for the image builds
        "MEDVLM_RELIABILITY_OUT",  # scripts/reliability.sh: where scenario tests put figures
        "MEDVLM_TORCH_PIP_ARGS",  # scripts/install.sh: pip options for torch (package mirror)
        "MEDVLM_TEST_MODEL_CACHE",  # tests/conftest.py: where the tiny test model is cached
        "MEDVLM_TEST_PG_BIN",  # tests/integration/conftest_servers.py: PostgreSQL's programs
        "MEDVLM_TEST_RUN_ID",  # tests/integration/test_cli_run.py: marks a run's processes
    }
)


class SettingsVariableError(ConfigurationError, ValueError):
    """``MEDVLM_`` variables that name no setting (a typo would otherwise be ignored), or the
    value of a structured setting (a section, a list, a mapping) that is not JSON. Raised while
    the settings load; the message is one line naming each variable, never its value."""


def _shape(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """What a field holds: ``model`` (a settings section, with its class), ``mapping``,
    ``sequence`` (both given as JSON) or ``scalar``; ``X | None`` is X."""
    arms = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    for arm in arms or (annotation,):
        origin = get_origin(arm)
        if origin is None and isinstance(arm, type) and issubclass(arm, BaseModel):
            return "model", arm
        base = origin if origin is not None else arm
        if isinstance(base, type) and issubclass(base, Mapping | dict):
            return "mapping", None
        if isinstance(base, type) and issubclass(base, list | tuple | set | frozenset):
            return "sequence", None
    return "scalar", None


def _variable(path: Sequence[str]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(part.upper() for part in path)


def _walk(model: type[BaseModel], path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for name, field in model.model_fields.items():
        yield (*path, name)
        shape, section = _shape(field.annotation)
        if shape == "model" and section is not None:
            yield from _walk(section, (*path, name))


@functools.cache
def setting_variables() -> dict[str, str]:
    """Every setting's variable (sections included) → its dotted name, e.g.
    ``MEDVLM_JOB__CONCURRENCY`` → ``job.concurrency``."""
    return {_variable(path): ".".join(path) for path in _walk(MedvlmSettings, ())}


def _lookup(parts: Sequence[str]) -> tuple[str, type[BaseModel] | None] | None:
    """The shape of the setting that ``parts`` (field names, one per level) name; anything
    below a mapping names an entry of it (``scalar``); None when no setting has that name."""
    model: type[BaseModel] = MedvlmSettings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        shape, section = _shape(field.annotation)
        if depth == len(parts) - 1:
            return shape, section
        if shape == "mapping":
            return "scalar", None
        if shape != "model" or section is None:
            return None
        model = section
    return None


def _suggestion(variable: str) -> str:
    known = {name.removeprefix(ENV_PREFIX): name for name in (*setting_variables(), *NOT_SETTINGS)}
    close = difflib.get_close_matches(variable.removeprefix(ENV_PREFIX), known, n=1, cutoff=0.6)
    return f"did you mean {known[close[0]]}?" if close else "no setting has a similar name"


def _json_keys(section: type[BaseModel], data: Mapping[str, Any], holder: str) -> Iterator[str]:
    """The keys of a section's JSON value that name no setting of it (at any depth); JSON keys
    are matched as written (case matters)."""
    for key, value in data.items():
        field = section.model_fields.get(key)
        if field is None:
            close = difflib.get_close_matches(str(key), section.model_fields, n=1, cutoff=0.6)
            hint = f'did you mean "{close[0]}"?' if close else "no setting has a similar name"
            yield f'"{key}" (a key of the JSON in {holder}) is not a setting; {hint}'
            continue
        shape, inner = _shape(field.annotation)
        if shape == "model" and inner is not None and isinstance(value, dict):
            yield from _json_keys(inner, value, holder)


def variable_problems(variables: Mapping[str, str | None], *, where: str = "") -> list[str]:
    """One message per ``MEDVLM_`` variable of ``variables`` (name → value, names in any
    case) that names no setting and is not in ``NOT_SETTINGS``, or that holds a structured
    setting whose value is not JSON (a section's JSON is checked key by key too). ``where``
    names the file the variables come from ("" for the environment)."""
    problems = []
    origin = f" (in the {where})" if where else ""
    for name in sorted(variables):
        variable = name.upper()
        if not variable.startswith(ENV_PREFIX) or variable in NOT_SETTINGS:
            continue
        parts = variable.removeprefix(ENV_PREFIX).lower().split(ENV_DELIMITER)
        found = _lookup(parts)
        if found is None:
            problems.append(f"{variable}{origin} is not a setting; {_suggestion(variable)}")
            continue
        shape, section = found
        value = variables[name]
        if shape == "scalar" or value is None:
            continue
        try:
            data = json.loads(value)
        except ValueError:
            takes = {"model": "an object", "mapping": "an object", "sequence": "an array"}[shape]
            problems.append(f"{variable}{origin} is not JSON (this setting takes {takes})")
            continue
        if section is not None and isinstance(data, dict):
            problems.extend(_json_keys(section, data, f"{variable}{origin}"))
    return problems


class _VariableCheck(PydanticBaseSettingsSource):
    """Not a source of values: the check of the variables the environment and .env sources
    read, run before them (``MedvlmSettings.settings_customise_sources``)."""

    def __init__(
        self, settings_cls: type[BaseSettings], sources: Sequence[tuple[EnvSettingsSource, str]]
    ) -> None:
        super().__init__(settings_cls)
        self._sources = sources

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        problems = [
            problem
            for source, where in self._sources
            for problem in variable_problems(source.env_vars, where=_file_label(source, where))
        ]
        if problems:
            raise SettingsVariableError("; ".join(problems))
        return {}


def _file_label(source: EnvSettingsSource, where: str) -> str:
    """``env file NAME`` for a .env source, "" for the environment."""
    files = getattr(source, "env_file", None)
    if not where or files is None:
        return where
    names = [files] if isinstance(files, str | os.PathLike) else list(files)
    return f"{where} {', '.join(str(name) for name in names)}"


# -- one line for invalid settings ---------------------------------------------------------------


@functools.cache
def _dotted_names() -> re.Pattern[str]:
    """Dotted setting names as written in validators' messages (``ehr.base_url``)."""
    names = sorted(setting_variables().values(), key=len, reverse=True)
    return re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")


def _named(message: str, section: type[BaseModel] | None, path: Sequence[str]) -> str:
    """``message`` with setting names as their variables: dotted ones (``pacs.kind``) and, for a
    section's own validator, the section's field names that have an underscore (``ca_bundle``;
    one-word names such as ``kind`` are also ordinary words)."""
    dotted = {dotted: variable for variable, dotted in setting_variables().items()}
    message = _dotted_names().sub(lambda m: dotted[m.group(1)], message)
    if section is not None:
        own = sorted((n for n in section.model_fields if "_" in n), key=len, reverse=True)
        if own:
            pattern = r"(?<![\w.])(" + "|".join(own) + r")(?!\w)"
            message = re.sub(pattern, lambda m: _variable((*path, m.group(1))), message)
    return re.sub(r"(MEDVLM_\w+) \(\1\)", r"\1", message)  # "X (X)" → "X"


def with_variable_names(message: str) -> str:
    """``message`` with the dotted setting names in it (``pacs.token_file``) written as their
    variables (``MEDVLM_PACS__TOKEN_FILE``), for messages shown to whoever sets them."""
    return _named(message, None, ())


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error.get("loc", ()))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    model: type[BaseModel] | None = MedvlmSettings
    path: list[str] = []
    for item in loc:
        if model is None or not isinstance(item, str) or item not in model.model_fields:
            break
        field = model.model_fields[item]
        path.append(str(item))
        shape, section = _shape(field.annotation)
        model = section if shape == "model" else None
    message = _named(message, model if len(path) == len(loc) else None, path)
    rest = loc[len(path) :]
    if not path:
        return message
    where = f" (item {'.'.join(str(item) for item in rest)})" if rest else ""
    if model is not None and not rest and ENV_PREFIX in message:
        return message  # a section's own check, already naming its variables
    return f"{_variable(path)}{where}: {message}"


def describe_settings_error(exc: BaseException) -> str:
    """One line for settings that failed to load: each problem with the ``MEDVLM_`` variable it
    concerns, joined by "; ". Values are never shown (a value may be a secret or carry one)."""
    if isinstance(exc, ValidationError):
        errors: Iterable[Mapping[str, Any]] = exc.errors(include_url=False, include_input=False)
        return "; ".join(dict.fromkeys(_describe(error) for error in errors))
    return " ".join(str(exc).split())
