"""A small site for tests that run the product as an operator does, from its environment: a
folder PACS of synthetic chest CR studies and an NDJSON EHR holding their orders and context.

``build_folder_site`` writes it under a root folder; ``folder_site_env`` gives the ``MEDVLM_*``
variables that point a process (``medvlm run``, a Prefect worker) at it; ``stand_in_model``
is a loopback model service for runs whose model is not what is tested. Used by test_cli_run,
test_prefect_work_pool, test_load and test_images (tests/integration).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from connectors.ehr import Ehr
from connectors.ndjson import NdjsonEhr
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM, ehr_bundle
from medvlm.dev.synthetic_dicom import make_study
from pipeline.report import DraftReport, DraftResult

#: Patients per EHR transaction when a site is built: one Bundle per patient made the
#: 2,500 of the load test cost minutes of round trips on the FHIR server.
PATIENTS_PER_TRANSACTION = 50


def build_folder_site(
    root: Path, count: int, day: dt.date, *, prefix: str = "SITE", ehr: Ehr | None = None
) -> None:
    """``count`` one-image CR studies dated ``day`` in ``root/dicom`` and, in ``root/ehr`` (or
    ``ehr``), a patient, an order (by accession number), a condition and a signed prior report
    for each (``PATIENTS_PER_TRANSACTION`` patients to a transaction)."""
    ehr = ehr or NdjsonEhr(root / "ehr", accession_system=ACCESSION_SYSTEM)
    entries: list[dict[str, object]] = []
    for i in range(count):
        mrn, accession = f"SYN-{prefix}-{i:04d}", f"ACC-{prefix}-{i:03d}"
        (ds,) = make_study("CR", seed=100 + i, accession=accession, patient_id=mrn, study_date=day)
        path = root / "dicom" / f"{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        bundle = ehr_bundle(
            mrn=mrn,
            accession=accession,
            study_uid=str(ds.StudyInstanceUID),
            modality="CR",
            reason="Cough",
            condition="Asthma",
            prior_impression="No acute abnormality.",
            sex="female",
            birth_date="1970-01-01",
        )
        entries += bundle["entry"]
        if (i + 1) % PATIENTS_PER_TRANSACTION == 0 or i + 1 == count:
            ehr.transaction(Bundle.model_validate({**bundle, "entry": entries}))
            entries = []


def folder_site_env(root: Path) -> dict[str, str]:
    """The ``MEDVLM_*`` variables for the site's PACS folder and EHR folder."""
    return {
        "MEDVLM_PACS__KIND": "folder",
        "MEDVLM_PACS__FOLDER": str(root / "dicom"),
        "MEDVLM_EHR__KIND": "folder",
        "MEDVLM_EHR__FOLDER": str(root / "ehr"),
        "MEDVLM_EHR__ACCESSION_SYSTEM": ACCESSION_SYSTEM,
        "MEDVLM_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
    }


def http_run_env(
    root: Path,
    *,
    fhir_base_url: str,
    model_url: str,
    api_key: str,
    version: str,
    identifier_system: str,
    ledger_url: str,
) -> dict[str, str]:
    """The environment of a `medvlm run` as an operator starts it over the site's PACS folder
    (``root/dicom``), the session's real FHIR server and a model service over HTTP, with the
    session's Prefect server, its own home, ledger, model version and identifier system."""
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MEDVLM_HOME": str(root / "home"),
        "MEDVLM_PACS__KIND": "folder",
        "MEDVLM_PACS__FOLDER": str(root / "dicom"),
        "MEDVLM_EHR__KIND": "fhir",
        "MEDVLM_EHR__BASE_URL": fhir_base_url,
        "MEDVLM_EHR__ACCESSION_SYSTEM": ACCESSION_SYSTEM,
        "MEDVLM_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
        "MEDVLM_JOB__MODEL_ENDPOINT": "http",
        "MEDVLM_JOB__MODEL_URL": model_url,
        "MEDVLM_SERVING__API_KEY": api_key,
        "MEDVLM_MODEL__VERSION": version,
        "MEDVLM_JOB__IDENTIFIER_SYSTEM": identifier_system,
        "MEDVLM_JOB__LEDGER_URL": ledger_url,
        "COLUMNS": "200",
    }


def preliminary_drafts_per_order(root: Path) -> Counter[str]:
    """How many preliminary DiagnosticReports (drafts) the site's EHR holds per order
    (``DiagnosticReport.basedOn`` → ServiceRequest)."""
    per_order: Counter[str] = Counter()
    for line in (root / "ehr" / "DiagnosticReport.ndjson").read_text().splitlines():
        report = json.loads(line)
        if report.get("status") == "preliminary":
            (order,) = report["basedOn"]
            per_order[order["reference"]] += 1
    return per_order


def orders(root: Path) -> set[str]:
    """``ServiceRequest/<id>`` of every order in the site's EHR."""
    lines = (root / "ehr" / "ServiceRequest.ndjson").read_text().splitlines()
    return {f"ServiceRequest/{json.loads(line)['id']}" for line in lines}


STAND_IN_REPORT = DraftReport.model_validate(
    {
        "rationale": "Stand-in model of the tests.",
        "findings": [
            {
                "name": "pleural_effusion",
                "presence": "absent",
                "laterality": "not_applicable",
                "location": "pleura",
                "severity": "not_applicable",
                "detail": "No effusion.",
            }
        ],
        "impression": "No acute abnormality.",
        "critical": False,
        "recommendation": "none",
    }
)


class _StandInModel(BaseHTTPRequestHandler):
    """``POST /v1/reports``: ``STAND_IN_REPORT`` for the study the request names, after
    ``latency_s``."""

    latency_s = 0.0

    protocol_version = "HTTP/1.1"  # keep-alive, as Serve's proxy answers

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        reference = str(json.loads(body)["reference"])
        time.sleep(self.latency_s)
        answer = DraftResult(
            reference=reference,
            report=STAND_IN_REPORT,
            raw_text=STAND_IN_REPORT.model_dump_json(),
            model="stand-in",
            finish_reason="stop",
            prompt_tokens=len(body) // 4,
            completion_tokens=64,
            latency_s=self.latency_s,
        )
        payload = answer.model_dump_json().encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # thousands of requests: no line each


@contextmanager
def stand_in_model(latency_s: float) -> Iterator[str]:
    """A loopback stand-in of the model service (``/v1/reports``) that answers every study with
    ``STAND_IN_REPORT`` after ``latency_s``: its base URL, for the block's duration. For tests
    that measure or check the run's own process, not the model."""
    handler = type("StandInModel", (_StandInModel,), {"latency_s": latency_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="stand-in-model", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
