"""The main job through a real Triton Inference Server (issue 19).

The server is the ``tritonserver`` binary (Triton 2.51) of PyPI's nvidia-pytriton in its own venv
(scripts/install-triton.sh), started and stopped by PID on loopback (medvlm/dev/triton.py). Its
model takes the tensors of Triton's vLLM backend and runs them through the session's real vLLM
engine with guided decoding (the Serve app's ``/v1/generate``, over loopback): no canned answer.
The drafter is ``TritonDrafter`` over HTTP and over gRPC, as ``MEDVLM_JOB__MODEL_ENDPOINT=triton``
builds it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.fhir import FhirEhr, build_http_client
from connectors.ledger_store import LedgerStore, open_engine
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM
from medvlm.dev.triton import TritonDevServer, TritonPorts
from medvlm.errors import EngineUnavailableError
from medvlm.settings import EhrSettings, MedvlmSettings, TritonSettings
from pipeline.ledger import JobState
from pipeline.prompts import ModelInput
from pipeline.report import DraftResult
from serving.triton_drafter import TritonDrafter, build_triton_drafter
from tests.conftest import free_port
from tests.integration import test_draft_flow
from tests.integration.folder_site import build_folder_site, http_run_env
from tests.integration.test_draft_flow import World, _reports_on_server, _run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The main job's cohort on the session's Orthanc and FHIR server (tests/integration/
# test_draft_flow.py): its sample studies, one undecodable study, its orders and priors.
world = test_draft_flow.world


@pytest.fixture(scope="module")
def triton(
    serve_url: str, settings: MedvlmSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonDevServer]:
    """A Triton dev server in front of the session's Serve app, up for this module."""
    # The venv as the environment names it (MEDVLM_HOME, MEDVLM_DEV__TRITON_VENV), like the
    # FHIR server's: the session's settings have a temporary home.
    venv = MedvlmSettings().dev.triton_venv
    assert venv is not None and settings.serving.api_key is not None
    if not (venv / "bin" / "python").is_file():
        pytest.fail(f"no Triton venv at {venv}: bash scripts/install-triton.sh")
    server = TritonDevServer(
        venv,
        tmp_path_factory.mktemp("triton"),
        serve_url=serve_url,
        serve_api_key=settings.serving.api_key.get_secret_value(),
        ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(triton: TritonDevServer, protocol: str, **edge: Any) -> TritonSettings:
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    return TritonSettings.model_validate({"url": url, "protocol": protocol, **edge})


def _drafter(
    triton: TritonDevServer, protocol: str, settings: MedvlmSettings, **edge: Any
) -> TritonDrafter:
    return build_triton_drafter(
        _settings(triton, protocol, **edge),
        model_source=settings.model.source,
        max_tokens=settings.model.max_tokens,
        seed=settings.model.seed,
    )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_study_is_drafted_through_triton_and_written(
    protocol: str,
    triton: TritonDevServer,
    world: World,
    settings: MedvlmSettings,
    fhir_base_url: str,
) -> None:
    summary = _run(world, _drafter(triton, protocol, settings))
    ledger = LedgerStore(open_engine(world.ledger_url))
    jobs = {job.study_uid: job for job in ledger.jobs("test-1")}
    for case in world.cases:
        assert jobs[case.study_uid].state is JobState.WRITTEN, jobs[case.study_uid].reason
    assert jobs[world.broken_uid].state is JobState.FAILED  # undecodable: never drafted
    assert summary.counts["written"] == len(world.cases)
    reports = _reports_on_server(world, fhir_base_url)
    assert len(reports) == len(world.cases)
    assert {r["status"] for r in reports} == {"preliminary"}
    # Every draft has findings from the schema-constrained model, written as Observations.
    assert all(r.get("result") for r in reports)


class _StopsTritonAtTheFirstDraft:
    """The drafter under test, with Triton stopped (by PID) before the first draft is sent."""

    def __init__(self, drafter: TritonDrafter, triton: TritonDevServer) -> None:
        self._drafter = drafter
        self._triton = triton
        self._stopped = False
        self._lock = asyncio.Lock()

    async def draft(self, model_input: ModelInput) -> DraftResult:
        async with self._lock:
            if not self._stopped:
                assert await asyncio.to_thread(self._triton.stop)
                self._stopped = True
        return await self._drafter.draft(model_input)

    async def aclose(self) -> None:
        await self._drafter.aclose()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_stopped_mid_run_fails_the_drafts_with_a_reason_and_a_rerun_drafts_them(
    protocol: str,
    triton: TritonDevServer,
    world: World,
    settings: MedvlmSettings,
    fhir_base_url: str,
) -> None:
    edge = {"retry_attempts": 3, "retry_budget_s": 4.0, "retry_initial_backoff_s": 0.2}
    try:
        drafter = _StopsTritonAtTheFirstDraft(_drafter(triton, protocol, settings, **edge), triton)
        first = _run(world, drafter)
    finally:
        triton.start()
    ledger = LedgerStore(open_engine(world.ledger_url))
    jobs = {job.study_uid: job for job in ledger.jobs("test-1")}
    failed = [jobs[case.study_uid] for case in world.cases]
    assert first.counts.get("written", 0) == 0
    for job in failed:
        assert job.state is JobState.FAILED
        assert job.reason is not None and job.reason.startswith(job.study_ref), job.reason
        assert "Triton" in job.reason and (
            "unavailable" in job.reason or "unreachable" in job.reason
        )
        assert "ACC-" not in job.reason and "SYN-" not in job.reason  # no accession, no MRN

    second = _run(world, _drafter(triton, protocol, settings))
    jobs = {job.study_uid: job for job in ledger.jobs("test-1")}
    for case in world.cases:
        assert jobs[case.study_uid].state is JobState.WRITTEN, jobs[case.study_uid].reason
    assert second.counts["written"] == len(world.cases)
    assert len(_reports_on_server(world, fhir_base_url)) == len(world.cases)


def test_triton_error_for_a_bad_request_names_the_study_and_is_not_retried(
    triton: TritonDevServer, settings: MedvlmSettings
) -> None:
    """A model the server does not have: refused at once (no retry), the study named."""
    from pipeline.prompts import StudyContext
    from serving.triton_drafter import ChatTemplate

    assert settings.model.source is not None
    drafter = TritonDrafter(
        TritonSettings(url=triton.http_url, model_name="no-such-model"),
        ChatTemplate.load(Path(settings.model.source)),
        max_tokens=16,
    )
    model_input = ModelInput(
        reference="study-ref-x", images_png=(_png(),), context=StudyContext(modality="CR")
    )

    async def go() -> None:
        try:
            await drafter.draft(model_input)
        finally:
            await drafter.aclose()

    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        asyncio.run(go())
    assert not isinstance(caught.value, EngineUnavailableError)
    assert str(caught.value).startswith("study-ref-x: Triton http")
    assert "no-such-model" in str(caught.value)
    assert time.monotonic() - started < 5


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "PNG")
    return buffer.getvalue()


def test_medvlm_run_with_model_endpoint_triton(
    tmp_path: Path,
    triton: TritonDevServer,
    fhir_base_url: str,
    settings: MedvlmSettings,
    prefect_api: None,
) -> None:
    """`medvlm run` as an operator starts it, MEDVLM_JOB__MODEL_ENDPOINT=triton over gRPC."""
    day = dt.date(1962, 3, 4) + dt.timedelta(days=int(uuid.uuid4().int % 3000))
    prefix = uuid.uuid4().hex[:6].upper()
    ehr_settings = EhrSettings.model_validate(
        {"kind": "fhir", "base_url": fhir_base_url, "accession_system": ACCESSION_SYSTEM}
    )
    client = build_http_client(ehr_settings)
    try:
        build_folder_site(tmp_path, 3, day, prefix=prefix, ehr=FhirEhr(client, ehr_settings))
    finally:
        client.close()
    assert settings.serving.api_key is not None and settings.model.source is not None
    system = f"urn:medvlm-test:{prefix}"
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = http_run_env(
        tmp_path,
        fhir_base_url=fhir_base_url,
        model_url="unused",
        api_key=settings.serving.api_key.get_secret_value(),
        version=f"triton-{prefix}",
        identifier_system=system,
        ledger_url=ledger_url,
    )
    del env["MEDVLM_JOB__MODEL_URL"]
    env |= {
        "MEDVLM_JOB__MODEL_ENDPOINT": "triton",
        "MEDVLM_JOB__TRITON__URL": triton.grpc_url,
        "MEDVLM_JOB__TRITON__PROTOCOL": "grpc",
        "MEDVLM_JOB__TRITON__CHAT_TEMPLATE": settings.model.source,
        "MEDVLM_MODEL__MAX_TOKENS": str(settings.model.max_tokens),
    }
    medvlm = str(Path(sys.executable).parent / "medvlm")
    run = subprocess.run(
        [medvlm, "run", "--since", day.isoformat(), "--until", day.isoformat()],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    jobs = LedgerStore(open_engine(ledger_url)).jobs(f"triton-{prefix}")
    assert len(jobs) == 3
    assert {job.state for job in jobs} == {JobState.WRITTEN}, [job.reason for job in jobs]
    with httpx.Client(base_url=fhir_base_url, timeout=30) as fhir:
        for job in jobs:
            found = fhir.get(
                "/DiagnosticReport", params={"identifier": f"{system}|{job.draft_id}"}
            ).json()
            (entry,) = found["entry"]
            assert entry["resource"]["status"] == "preliminary"
