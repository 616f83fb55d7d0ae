"""The one settings tree of medvlm-pipeline.

Loaded once at an entry point (the CLI, a flow deployment, a test fixture) with
``MedvlmSettings()`` and passed down. Every field can be set from the environment with the
``MEDVLM_`` prefix and ``__`` between levels, e.g. ``MEDVLM_SERVING__NUM_GPUS=1`` or
``MEDVLM_MODEL__SOURCE=/models/med-r1``. No other module reads ``os.environ`` for configuration.

Secrets are ``SecretStr`` and never have a value written in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TinyArchitecture = Literal["qwen2_vl", "gemma3"]


def _default_home() -> Path:
    return Path.home() / ".cache" / "medvlm"


class ModelSettings(BaseModel):
    """Which Med-VLM runs and how the vLLM engine is built for it."""

    source: str | None = Field(
        default=None,
        description=(
            "Checkpoint directory or hub id of the model (e.g. a local Med-R1 or MedGemma "
            "checkpoint). Unset: the project's tiny random-weight checkpoint is built under "
            "MEDVLM_HOME and used (development and tests only: its drafts carry no meaning)."
        ),
    )
    tiny_architecture: TinyArchitecture = Field(
        default="qwen2_vl",
        description="Architecture of the tiny checkpoint built when `source` is unset.",
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
            "vLLM `gpu_memory_utilization`. On the CPU backend it is the fraction of host RAM "
            "for the KV cache. Unset: 0.9 with GPUs, 0.3 on CPU (0.9 fails on CPU)."
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


class ServingSettings(BaseModel):
    """The Ray Serve application that wraps the engine."""

    app_name: str = Field(default="medvlm", description="Ray Serve application name.")
    host: str = Field(
        default="127.0.0.1",
        description="Address of Ray Serve's HTTP proxy. Loopback unless a cluster fronts it.",
    )
    port: int = Field(default=8765, ge=1, le=65535, description="Port of Ray Serve's HTTP proxy.")
    route_prefix: str = Field(default="/", description="HTTP route prefix of the application.")
    num_replicas: int = Field(default=1, ge=1, description="Model replicas.")
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


class PacsSettings(BaseModel):
    """The image source: a DICOM folder (default), a DICOMweb PACS, or a DIMSE PACS.

    Owned by connectors/ (see connectors/pacs.py); extend here, one description per field.
    """

    kind: Literal["folder", "dicomweb", "dimse"] = Field(
        default="folder", description="Which image source implementation to use."
    )
    folder: Path | None = Field(
        default=None, description="DICOM folder source (files or DICOMDIR). Unset: HOME/dicom."
    )


class EhrSettings(BaseModel):
    """The EHR: an NDJSON/Bundle folder (default) or a FHIR R4 REST server.

    Owned by connectors/ (see connectors/fhir.py); extend here, one description per field.
    """

    kind: Literal["folder", "fhir"] = Field(
        default="folder", description="Which EHR implementation to use."
    )
    folder: Path | None = Field(
        default=None, description="FHIR Bulk Data style folder (NDJSON). Unset: HOME/ehr."
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

    @model_validator(mode="after")
    def _resolve_paths(self) -> MedvlmSettings:
        if self.dev.workdir is None:
            self.dev.workdir = self.home / "dev"
        if self.dev.fhir_venv is None:
            self.dev.fhir_venv = self.home / "fhir-venv"
        if self.pacs.folder is None:
            self.pacs.folder = self.home / "dicom"
        if self.ehr.folder is None:
            self.ehr.folder = self.home / "ehr"
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
