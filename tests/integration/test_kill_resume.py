"""`medvlm run` killed with SIGKILL at five random moments of a 200-study batch, each time run
again: every study drafted exactly once on the real FHIR server, and ledger and EHR agree.

As an operator runs it: `medvlm run` in its own process, settings from the environment, a folder
PACS, the session's real FHIR server as the EHR, the session's real model service over HTTP (so
that the kills hit the flow, not a model start-up). The kill moments are random (the seed is
printed): discovery, claims, fetches, drafts and writes are all hit across the runs.
"""

from __future__ import annotations

import datetime as dt
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.fhir import FhirEhr, build_http_client
from connectors.ledger_store import LedgerStore, open_engine
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM
from medvlm.settings import EhrSettings, MedvlmSettings
from pipeline.ledger import JobState
from tests.integration.folder_site import build_folder_site, http_run_env
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

STUDIES = 200
KILLS = 5
DAY = dt.date(1961, 5, 17)


def test_five_sigkills_of_a_200_study_batch_leave_every_study_drafted_once(
    tmp_path: Path,
    fhir_base_url: str,
    serve_url: str,
    settings: MedvlmSettings,
    prefect_api: None,
) -> None:

    prefix = uuid.uuid4().hex[:6].upper()
    ehr_settings = EhrSettings.model_validate(
        {"kind": "fhir", "base_url": fhir_base_url, "accession_system": ACCESSION_SYSTEM}
    )
    client = build_http_client(ehr_settings)
    try:
        build_folder_site(tmp_path, STUDIES, DAY, prefix=prefix, ehr=FhirEhr(client, ehr_settings))
    finally:
        client.close()
    assert settings.serving.api_key is not None
    version = f"kill-{prefix}"
    system = f"urn:medvlm-test:{prefix}"
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {
        **http_run_env(
            tmp_path,
            fhir_base_url=fhir_base_url,
            model_url=serve_url,
            api_key=settings.serving.api_key.get_secret_value(),
            version=version,
            identifier_system=system,
            ledger_url=ledger_url,
        ),
        "MEDVLM_JOB__PAGE_SIZE": "16",
    }
    medvlm = str(Path(sys.executable).parent / "medvlm")
    args = [medvlm, "run", "--since", DAY.isoformat(), "--until", DAY.isoformat()]
    seed = random.randrange(10**6)
    print(f"kill moments from seed {seed}")
    rng = random.Random(seed)
    ledger = LedgerStore(open_engine(ledger_url))
    progress: list[dict[str, int]] = []
    started = time.monotonic()
    for _ in range(KILLS):
        with subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as run:
            deadline = time.monotonic() + rng.uniform(4.0, 60.0)
            while run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
            run.wait(timeout=60)
        progress.append({s.value: n for s, n in ledger.counts(version).items() if n})
    print("ledger after each kill:", progress)
    final = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    assert final.returncode == 0, (final.stdout + final.stderr)[-4000:]

    jobs = ledger.jobs(version)
    assert len(jobs) == STUDIES and {job.state for job in jobs} == {JobState.WRITTEN}
    drafted_once = 0
    with httpx.Client(base_url=fhir_base_url, timeout=60, trust_env=False) as http:
        for job in jobs:
            order = job.links["service_request"]
            found: list[dict[str, Any]] = [
                entry["resource"]
                for entry in http.get(
                    "/DiagnosticReport",
                    params={"based-on": order, "status": "preliminary", "_count": "50"},
                )
                .json()
                .get("entry", [])
                if entry.get("search", {}).get("mode", "match") == "match"
            ]
            ours = [
                r for r in found if any(i.get("system") == system for i in r.get("identifier", []))
            ]
            assert len(ours) == 1, f"{job.study_ref}: {len(ours)} drafts on {order}"
            # Ledger and EHR agree on which report is the draft.
            assert job.fhir_ids["DiagnosticReport"] == [ours[0]["id"]], job.study_ref
            drafted_once += 1
    record(
        Figures(
            scenario="kill-resume",
            faults=f"SIGKILL of `medvlm run` at {KILLS} random moments, each run again",
            studies=STUDIES,
            drafted_once=drafted_once,
            lost=STUDIES - drafted_once,
            seconds=round(seconds, 1),
            extra={"seed": seed, "ledger_after_each_kill": progress},
        )
    )
