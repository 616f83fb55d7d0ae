"""No patient identifier in anything a run leaves behind (issue 15).

The product runs as an operator runs it (its own processes, settings from the environment, the
tiny model served by a Ray Serve the run starts, Prefect's temporary API server with its SQLite
database in a PREFECT_HOME of its own), over a batch whose patients carry distinctive names,
MRNs, accession numbers and birth dates (tests/integration/phi_site.py), on two sites: folders
(folder PACS whose file names carry names and MRNs, NDJSON EHR) and servers (Orthanc over
DICOMweb, the FHIR server: requests whose URLs carry identifiers). The batch takes every path:
written, written without an order, skipped as signed, skipped as another patient's images,
failed on undecodable pixels. Then:

1. ``medvlm run`` over the batch's day;
2. ``medvlm run --accession`` of the failed study (an operator retrying one study; Prefect
   records the query);
3. the nightly deployment's flow (``scheduled-draft-reports``, as a Prefect worker runs it)
   while the ledger refuses writes (a fault injected with a trigger): the task and the flow
   fail, and Prefect and the process record why;
4. ``medvlm fairness`` (HTML report, MeasureReport, Prefect artifact).

Log lines are kept at INFO from every library (PREFECT_LOGGING_ROOT_LEVEL; PHI_SCAN_LOG_LEVEL
=DEBUG for a stricter pass), and the project's loggers go to Prefect too
(PREFECT_LOGGING_EXTRA_LOGGERS), as an operator sets them to see them in the UI.

Then every value is searched for, in every form (tests/integration/phi_scanner.py), in:

- the commands' stdout and stderr;
- every name and every file under the test's folder (MEDVLM_HOME: ledger, fairness HTML;
  PREFECT_HOME: Prefect's database and whatever else it writes) but the sources, the DICOM
  folder and the NDJSON EHR (they hold the PHI, and the drafts are meant to go there);
- every name and file under the run's TMPDIR, which is also its RAY_TMPDIR (serving/
  ray_runtime.py leaves Ray's temporary folder to Ray: RAY_TMPDIR, else TMPDIR, else /tmp):
  Ray's session (GCS, raylet, Serve controller and replica, vLLM engine) and temporary files;
- Prefect's database cell by cell (flow and task run names, parameters, logs, artifacts,
  events, states) and the ledger cell by cell (every text and JSON column);
- what the run wrote into the EHR that is about no patient: the MeasureReport, the Device.

The ledger keeps two values by design: a job's accession number (``draft_job.accession_number``
and ``links.accession_number``: the run finds the order by it) and the digest of the images'
PatientID (``links.dicom_patient.digest``: the write gate compares it with the Patient; SHA-256,
HMAC under the site key of the ``servers`` case). They are allowed there and nowhere else; no
other value may be anywhere in the ledger file. A hit is reported by where it is and its
context, each value replaced by its label.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.ehr import identifier_ref
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM
from medvlm.dev.servers import OrthancInfo
from medvlm.settings import EhrSettings, PacsSettings
from tests.conftest import free_port, processes_of_run
from tests.integration.folder_site import folder_site_env
from tests.integration.phi_scanner import Hit, Phi, Scanner, report
from tests.integration.phi_site import (
    BY_KEY,
    PATIENTS,
    all_phi,
    build_phi_site,
    dicom_path,
    load_phi_servers,
)
from tests.reliability_figures import Figures, record

DAY = dt.date.today() - dt.timedelta(days=29)  # in the nightly flow's window (step 3)


@pytest.fixture
def run_tmp() -> Iterator[Path]:
    """The run's TMPDIR and RAY_TMPDIR: short (Ray's socket paths are limited to 107 bytes),
    private, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="phi-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Refuses every registration of a study (a fault injected into the ledger).
_LEDGER_FAULT = """
CREATE TRIGGER phi_scan_ledger_fault BEFORE INSERT ON draft_job
BEGIN SELECT RAISE(ABORT, 'injected ledger fault'); END
"""


def _ledger_rows(ledger: Path) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(ledger)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM draft_job")]


def _ledger_allows(table: str, column: str, row: dict[str, Any], value: Any) -> Any:
    """What of a ledger cell is scanned: all of it, but a job's own accession number and the
    images' PatientID digest where the ledger keeps them (see the module's docstring)."""
    if table != "draft_job":
        return value
    if column == "accession_number":
        return None
    if column == "links" and isinstance(value, str):
        links = json.loads(value)
        if links.get("accession_number") == row["accession_number"]:
            links.pop("accession_number")
        (links.get("dicom_patient") or {}).pop("digest", None)
        return json.dumps(links, ensure_ascii=False)
    return value


def _prefect_parameters(database: Path) -> list[dict[str, Any]]:
    """``flow_run.parameters`` of every flow run (from a copy: the server may have gone with
    its write-ahead log not yet checkpointed)."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in _sqlite_files(database):
            if path.is_file():
                shutil.copyfile(path, Path(tmp) / path.name)
        with closing(sqlite3.connect(Path(tmp) / database.name)) as db:
            return [json.loads(p) for (p,) in db.execute("SELECT parameters FROM flow_run")]


def _sqlite_files(database: Path) -> list[Path]:
    return [database.with_name(database.name + suffix) for suffix in ("", "-wal", "-journal")]


def _folder_site(tmp_path: Path, scanner: Scanner) -> tuple[dict[str, str], dict[str, str]]:
    """The site as folders under ``tmp_path/site``: the Study Instance UIDs by key and the
    settings. The scanner is checked on it first: it finds every value in the sources, in the
    form each has there."""
    site = tmp_path / "site"
    uids = build_phi_site(site, DAY)
    found, _ = scanner.scan_tree(site)
    assert {h.label for h in found} == {p.label for p in scanner.phis if p.kind != "digest"}
    for key in ("A", "B", "E"):  # ISO_IR 100 (Latin-1) and ISO_IR 192 (UTF-8) names
        labels = {h.label for h in scanner.scan_file(dicom_path(site, key))}
        assert labels == {p.label for p in BY_KEY[key].phi() if p.kind != "digest"}
    return uids, folder_site_env(site)


def _server_site(request: pytest.FixtureRequest) -> tuple[dict[str, str], dict[str, str]]:
    """The site on the session's Orthanc (DICOMweb, basic auth) and FHIR server."""
    orthanc: OrthancInfo = request.getfixturevalue("orthanc")
    fhir_base_url: str = request.getfixturevalue("fhir_base_url")
    env = {
        "MEDVLM_PACS__KIND": "dicomweb",
        "MEDVLM_PACS__DICOMWEB_URL": orthanc.dicomweb_url,
        "MEDVLM_PACS__AUTH": "basic",
        "MEDVLM_PACS__USERNAME": orthanc.username,
        "MEDVLM_PACS__PASSWORD": orthanc.password.get_secret_value(),
        "MEDVLM_EHR__KIND": "fhir",
        "MEDVLM_EHR__BASE_URL": fhir_base_url,
        "MEDVLM_EHR__ACCESSION_SYSTEM": ACCESSION_SYSTEM,
        "MEDVLM_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
    }
    pacs = PacsSettings(
        kind="dicomweb",
        dicomweb_url=orthanc.dicomweb_url,
        auth="basic",
        username=orthanc.username,
        password=orthanc.password,
    )
    ehr = EhrSettings(kind="fhir", base_url=fhir_base_url, accession_system=ACCESSION_SYSTEM)
    return load_phi_servers(pacs, ehr, DAY), env


@pytest.mark.integration
@pytest.mark.reliability
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("site_kind", ["folder", "servers"])
def test_a_run_with_failures_leaves_no_patient_identifier_behind(
    site_kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_model_dir: Path,
    run_tmp: Path,
) -> None:
    """``folder``: folder PACS and NDJSON EHR under ``tmp_path/site`` (left out of the scan).
    ``servers``: the session's Orthanc over DICOMweb and its FHIR server (HTTP requests whose
    URLs carry identifiers: FHIR searches by accession number and MRN), with a site pseudonym
    key: then not even the ledger may hold a plain digest of an MRN or reference of an
    accession number (both can be reversed by trying every value)."""
    started = time.monotonic()
    keyed = site_kind == "servers"
    plain_refs = [
        Phi(f"study {p.key} accession number, plain reference", ref, "digest")
        for p in PATIENTS
        for ref in (identifier_ref(p.accession, ACCESSION_SYSTEM), identifier_ref(p.accession))
    ]
    scanner = Scanner([*all_phi(), *plain_refs] if keyed else all_phi())
    if site_kind == "folder":
        uids, site_env = _folder_site(tmp_path, scanner)
    else:
        uids, site_env = _server_site(request)
    key_of = {uid: key for key, uid in uids.items()}
    sources = [tmp_path / "site" / "dicom", tmp_path / "site" / "ehr"]

    home, prefect_home = tmp_path / "home", tmp_path / "prefect"
    run_id = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MEDVLM_"))}
    env.update(
        {
            # Prefect's temporary API server and its SQLite database, in a home of its own.
            "PREFECT_HOME": str(prefect_home),
            # Log lines at INFO, from every library, on stderr; the project's in Prefect too.
            "PREFECT_LOGGING_ROOT_LEVEL": os.environ.get("PHI_SCAN_LOG_LEVEL", "INFO"),
            "PREFECT_LOGGING_EXTRA_LOGGERS": "medvlm,connectors,flows,pipeline,serving",
            "MEDVLM_HOME": str(home),  # the ledger (default) and the fairness reports
            "MEDVLM_MODEL__SOURCE": str(tiny_model_dir),
            "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",  # the project's test model
            **site_env,
            "MEDVLM_SERVING__PORT": str(free_port()),
            "TMPDIR": str(run_tmp),
            "RAY_TMPDIR": str(run_tmp),  # Ray's session: RAY_TMPDIR/ray/session_*
            "COLUMNS": "200",
            "MEDVLM_TEST_RUN_ID": run_id,
        }
    )
    key = b"phi-scan-site-secret-0123"
    if keyed:
        (tmp_path / "pseudonym.key").write_bytes(key)
        env["MEDVLM_JOB__PSEUDONYM_KEY_FILE"] = str(tmp_path / "pseudonym.key")
    medvlm = str(Path(sys.executable).parent / "medvlm")
    outputs: dict[str, str] = {}

    def medvlm_command(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([medvlm, *args], env=env, capture_output=True, text=True, timeout=900)
        outputs[name] = done.stdout + done.stderr
        return done

    first = medvlm_command(
        "medvlm run", "run", "--since", DAY.isoformat(), "--until", DAY.isoformat()
    )
    # Exit code 3: a study failed (E); the others were written or skipped.
    assert first.returncode == 3, scanner.mask(outputs["medvlm run"][-6000:])
    assert "for flow 'draft-reports'" in outputs["medvlm run"]

    # The failed study again, by its accession number (as an operator retries one study).
    retry = ("run", "--accession", BY_KEY["E"].accession)
    second = medvlm_command("medvlm run --accession", *retry)
    assert second.returncode == 3, scanner.mask(outputs["medvlm run --accession"][-6000:])

    # The nightly deployment's flow (scheduled-draft-reports, as a Prefect worker runs it) over
    # a window that holds the batch, while the ledger refuses writes (a full disk, a dropped
    # connection): the discovery's registration fails, and with it the task and the flow.
    with closing(sqlite3.connect(home / "ledger.db")) as db, db:
        db.execute(_LEDGER_FAULT)
    days_back = (dt.date.today() - DAY).days + 1
    flow_call = f"from flows.deployments import scheduled_draft_reports as f; f({days_back})"
    fault = subprocess.run(
        [sys.executable, "-c", flow_call], env=env, capture_output=True, text=True, timeout=900
    )
    outputs["the scheduled flow (ledger fault)"] = fault.stdout + fault.stderr
    with closing(sqlite3.connect(home / "ledger.db")) as db, db:
        db.execute("DROP TRIGGER phi_scan_ledger_fault")
    assert fault.returncode != 0, scanner.mask(fault.stderr[-6000:])
    assert "LedgerUnavailableError" in fault.stderr, scanner.mask(fault.stderr[-6000:])

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    fairness = medvlm_command(
        "medvlm fairness",
        "fairness",
        "--since",
        (now - dt.timedelta(days=1)).isoformat(),
        "--until",
        (now + dt.timedelta(hours=1)).isoformat(),
    )
    assert fairness.returncode in (0, 3), scanner.mask(outputs["medvlm fairness"][-6000:])
    assert "HTML report:" in outputs["medvlm fairness"]  # exit code 3: an alert fired
    assert processes_of_run(run_id) == []  # nothing left running that could still write

    # Every path was taken.
    jobs = {key_of[row["study_uid"]]: row for row in _ledger_rows(home / "ledger.db")}
    outcome = {k: (j["state"].lower(), j["reason"]) for k, j in sorted(jobs.items())}
    assert {k: state for k, (state, _) in outcome.items()} == {
        "A": "written",
        "B": "written",
        "C": "skipped",
        "D": "skipped",
        "E": "failed",
    }, outcome
    assert "no-order-in-ehr" in json.loads(jobs["B"]["flags"])
    assert jobs["C"]["reason"].startswith("signed-before-draft")
    assert jobs["D"]["reason"].startswith("patient-mismatch")
    assert jobs["E"]["attempts"] == 2 and jobs["E"]["reason"]

    hits: list[Hit] = []
    for name, text in outputs.items():
        hits += scanner.scan_text(text, f"output of {name}")

    ledger_files = _sqlite_files(home / "ledger.db")
    found, scanned = scanner.scan_tree(tmp_path, exclude=sources, skip=ledger_files)
    hits += found
    found, in_tmp = scanner.scan_tree(run_tmp)
    hits += found
    scanned += in_tmp
    # Raw bytes: no value but accession numbers and (without a key) MRN digests.
    in_ledger = scanner.without("accession") if keyed else scanner.without("accession", "digest")
    for path in ledger_files:
        if path.is_file():
            hits += in_ledger.scan_file(path)
    found, _ = scanner.scan_sqlite(home / "ledger.db", allowed=_ledger_allows)
    hits += found
    found, prefect_rows = scanner.scan_sqlite(prefect_home / "prefect.db")
    hits += found
    # What the run wrote into the EHR that is about no patient: the fairness MeasureReport (an
    # aggregate, read far more widely than a chart) and the model's Device.
    for rtype in ("MeasureReport", "Device"):
        if site_kind == "folder":
            text = (tmp_path / "site" / "ehr" / f"{rtype}.ndjson").read_text(encoding="utf-8")
        else:
            base = request.getfixturevalue("fhir_base_url")
            with httpx.Client(timeout=30) as client:
                answer = client.get(f"{base}/{rtype}", params={"_count": "1000"})
            answer.raise_for_status()
            text = answer.text
        assert f'"resourceType":"{rtype}"' in text.replace(" ", ""), f"no {rtype} was written"
        hits += scanner.scan_text(text, f"{rtype} written to the EHR")
    # Prefect recorded the query of ``--accession`` by its hash (flows.deployments.FlowArgument).
    parameters = _prefect_parameters(prefect_home / "prefect.db")
    expected = identifier_ref(BY_KEY["E"].accession, key=key if keyed else None)
    assert any(
        p.get("query", {}).get("summary", {}).get("accession") == expected for p in parameters
    ), scanner.mask(repr(parameters))

    # The scan saw what it is meant to see.
    assert list(home.glob("fairness/*.html")), "no fairness report was written"
    assert prefect_rows.get("flow_run", 0) >= 5, prefect_rows  # 2 runs, 2 scheduled, fairness
    assert prefect_rows.get("log", 0) > 0 and prefect_rows.get("task_run", 0) > 0, prefect_rows
    ray_logs = [p for p in in_tmp if p.parent.name == "logs" and "session_" in str(p)]
    assert any("serve" in str(p) for p in ray_logs), "no Ray Serve logs were scanned"

    areas: dict[str, int] = {}
    for path in scanned:
        top = path.relative_to(run_tmp if path.is_relative_to(run_tmp) else tmp_path).parts[0]
        areas[top] = areas.get(top, 0) + 1
    print(
        f"\n{site_kind}: {time.monotonic() - started:.0f} s; outcomes "
        f"{scanner.mask(repr(outcome))}; files scanned per folder {areas}; "
        f"Prefect rows per table {prefect_rows}"
    )
    settled = sum(1 for state, reason in outcome.values() if state != "written" and reason)
    drafted = sum(1 for state, _ in outcome.values() if state == "written")
    record(
        Figures(
            scenario=f"PHI scan ({site_kind}{', keyed' if keyed else ''})",
            faults="undecodable pixels, signed order, wrong patient, ledger refusing writes",
            studies=len(outcome),
            drafted_once=drafted,
            recorded_with_reason=settled,
            lost=len(outcome) - drafted - settled,
            duplicated=None,
            phi_hits=len(hits),
            seconds=round(time.monotonic() - started, 1),
            extra={"files_scanned": len(scanned), "prefect_rows": sum(prefect_rows.values())},
        )
    )
    if hits:
        pytest.fail(f"{len(hits)} patient identifiers left behind:\n{report(hits)}", pytrace=False)


@pytest.mark.unit
def test_the_scanner_finds_values_in_their_usual_forms_and_never_shows_them() -> None:
    scanner = Scanner(
        [
            Phi("name", "Grüßelheim", "name"),
            Phi("mrn", "MRN-Q7Z9X4E5", "mrn"),
            Phi("birth", "1926-06-30", "birth_date"),
        ]
    )
    text = (
        "GRÜSSELHEIM^VORLAQUA | grüßelheim | Grusselheim | Gr\\u00fc\\u00dfelheim | "
        "Gr%C3%BC%C3%9Felheim | q7z9x4e5 | 19260630 | 30.06.1926 | date(1926, 6, 30)"
    )
    hits = scanner.scan_text(text, "here")
    assert [h.label for h in hits] == ["name"] * 5 + ["mrn"] + ["birth"] * 3
    assert scanner.scan_text("a number 1192606301 is not a date", "here") == []
    latin1 = scanner.scan_bytes("PN=Grüßelheim^Vorlaqua".encode("latin-1"), "file")
    assert [h.where for h in latin1] == ["file (latin-1) @3"]
    for hit in [*hits, *latin1]:
        shown = str(hit).casefold()
        assert "grü" not in shown and "q7z9" not in shown and "1926" not in shown, shown
