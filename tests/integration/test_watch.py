"""Event-driven drafting (``medvlm watch``) against the real Orthanc and FHIR server.

The watcher follows Orthanc's change feed (``StableStudy``, the dev server's ``StableAge``):
a study stored while it runs is drafted, a preliminary DiagnosticReport on its order, without
any batch run; a STAT order stored together with a routine one is drafted first; SIGTERM
finishes what is in the pipeline and leaves the rest registered and unclaimed, drafted by the
next start. Latencies from "seen stable" to "draft in the EHR" are printed (``-s``), not bound.

The model is ``stand_in_model`` (tests/integration/folder_site.py) through ``HttpDrafter``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from connectors.factory import build_image_source
from connectors.ledger_store import LedgerStore, open_engine
from flows.draft_reports import Services
from flows.watch import LATENCY_TIMING, Watcher, state_source
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM
from medvlm.dev.servers import OrthancInfo
from medvlm.settings import JobSettings, WatchSettings
from pipeline.fhir_resources import ModelIdentity
from pipeline.imaging import study_reference
from pipeline.ledger import JobState
from serving.clients import HttpDrafter
from tests.integration.folder_site import stand_in_model
from tests.integration.test_write_safety import Site, open_site

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path, version=lambda p: f"watch-{p}") as opened:
        yield opened


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with stand_in_model(latency_s=0.2) as url:
        yield url


def _pacs(orthanc: OrthancInfo) -> dict[str, Any]:
    return {"new_study_detection": "orthanc_changes", "orthanc_url": orthanc.http_url}


@contextmanager
def _watcher(site: Site, model_url: str) -> Iterator[Watcher]:
    source = build_image_source(site.orthanc.pacs_settings(**_pacs(site.orthanc)))
    try:
        with site.ehr() as ehr:
            services = Services(
                source=source,
                ehr=ehr,
                drafter=HttpDrafter(None, model_url),
                ledger=LedgerStore(open_engine(site.ledger_url)),
                model=ModelIdentity("stand-in", site.version),
                job=JobSettings.model_validate({"identifier_system": site.draft_system}),
                max_images=1,
                patient_identifier_system=MRN_SYSTEM,
                accession_system=ACCESSION_SYSTEM,
                site_timezone=ZoneInfo("Europe/Berlin"),
            )
            yield Watcher(services, WatchSettings(interval_s=1), stable_on_detection=True)
    finally:
        source.close()


def _wait(what: str, done: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _ledger(site: Site) -> LedgerStore:
    return LedgerStore(open_engine(site.ledger_url))


def _drafts(site: Site, study_uid: str) -> list[dict[str, Any]]:
    order = site.job(study_uid).links["service_request"]
    with httpx.Client(base_url=site.fhir_base_url, timeout=30, trust_env=False) as client:
        bundle = client.get(
            "/DiagnosticReport", params={"based-on": order, "status": "preliminary"}
        ).json()
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") != "outcome"
    ]


def _written(site: Site, study_uid: str) -> bool:
    jobs = _ledger(site).jobs(site.version, [study_uid])
    return bool(jobs) and jobs[0].state is JobState.WRITTEN


def _make_stat(site: Site, accession: str) -> None:
    """The order of ``accession`` becomes STAT (as an ordering clinician would set it)."""
    with site.ehr() as ehr:
        order = ehr.find_service_request(accession)
    assert order is not None
    with httpx.Client(base_url=site.fhir_base_url, timeout=30, trust_env=False) as client:
        resource = client.get(f"/ServiceRequest/{order.id}").json() | {"priority": "stat"}
        client.put(f"/ServiceRequest/{order.id}", json=resource).raise_for_status()


def _stable_in_orthanc(orthanc: OrthancInfo, uids: list[str]) -> bool:
    with httpx.Client(base_url=orthanc.http_url, auth=orthanc.auth, trust_env=False) as client:
        for uid in uids:
            found = client.post("/tools/lookup", content=uid).json()
            ids = [item["ID"] for item in found if item.get("Type") == "Study"]
            if not ids or not client.get(f"/studies/{ids[0]}").json().get("IsStable"):
                return False
    return True


def test_a_study_stored_while_watching_is_drafted_without_a_batch_run(
    site: Site, model_url: str
) -> None:
    stop = threading.Event()
    with _watcher(site, model_url) as watcher:
        thread = threading.Thread(target=watcher.run, args=(stop,), name="watch", daemon=True)
        thread.start()
        try:
            _wait(
                "the first pass",
                lambda: _ledger(site).watermark(state_source(watcher.services)) is not None,
            )
            study_uid = site.add()
            stored = time.monotonic()
            _wait("the draft", lambda: _written(site, study_uid))
            stored_to_written = time.monotonic() - stored  # with StableAge and the poll
        finally:
            stop.set()
            thread.join(timeout=120)
        assert not thread.is_alive()
    job = site.job(study_uid)
    assert job.claimed_by is None
    (report,) = _drafts(site, study_uid)
    assert report["status"] == "preliminary"
    latency = job.timings[LATENCY_TIMING]
    print(f"\nwatch: stable→EHR {latency:.2f} s; stored→written {stored_to_written:.2f} s")
    assert [ref for ref, _ in watcher.summary.latencies if ref == job.study_ref] == [job.study_ref]


def test_a_stat_study_stored_with_a_routine_one_is_drafted_first(
    site: Site, model_url: str
) -> None:
    with _watcher(site, model_url) as watcher:
        watcher.one_pass()  # the first pass: where the feed is now
        routine = site.add()
        stat = site.add()
        _make_stat(site, site.accessions[-1])
        _wait("both studies stable", lambda: _stable_in_orthanc(site.orthanc, [routine, stat]), 60)
        result = watcher.one_pass()
    mine = {study_reference(routine): "routine", study_reference(stat): "stat"}
    assert [mine[ref] for ref in result.order if ref in mine] == ["stat", "routine"], result
    written = [(mine[ref], s) for ref, s in result.written if ref in mine]
    assert [kind for kind, _ in written] == ["stat", "routine"], result
    for kind, seconds in written:
        print(f"\nwatch: {kind} study stable→EHR latency {seconds:.2f} s")
    assert all(len(_drafts(site, uid)) == 1 for uid in (routine, stat))


def _env(site: Site, model_url: str, home: Path) -> dict[str, str]:
    orthanc = site.orthanc
    return {
        **os.environ,
        "MEDVLM_HOME": str(home),
        "MEDVLM_PACS__KIND": "dicomweb",
        "MEDVLM_PACS__DICOMWEB_URL": orthanc.dicomweb_url,
        "MEDVLM_PACS__AUTH": "basic",
        "MEDVLM_PACS__USERNAME": orthanc.username,
        "MEDVLM_PACS__PASSWORD": orthanc.password.get_secret_value(),
        "MEDVLM_PACS__NEW_STUDY_DETECTION": "orthanc_changes",
        "MEDVLM_PACS__ORTHANC_URL": orthanc.http_url,
        "MEDVLM_EHR__KIND": "fhir",
        "MEDVLM_EHR__BASE_URL": site.fhir_base_url,
        "MEDVLM_EHR__ACCESSION_SYSTEM": ACCESSION_SYSTEM,
        "MEDVLM_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
        "MEDVLM_JOB__MODEL_ENDPOINT": "http",
        "MEDVLM_JOB__MODEL_URL": model_url,
        # Three studies in the pipeline at most: a SIGTERM finds some not yet started.
        "MEDVLM_JOB__CONCURRENCY": "1",
        "MEDVLM_JOB__FETCH_CONCURRENCY": "1",
        "MEDVLM_JOB__WRITE_CONCURRENCY": "1",
        "MEDVLM_MODEL__VERSION": site.version,
        "MEDVLM_JOB__IDENTIFIER_SYSTEM": site.draft_system,
        "MEDVLM_JOB__LEDGER_URL": site.ledger_url,
        "MEDVLM_WATCH__INTERVAL_S": "1",
        "COLUMNS": "200",
    }


# ``python -c`` with the repository as working directory: this checkout's code, whichever
# checkout the virtualenv's ``medvlm`` script was installed from.
_WATCH = [sys.executable, "-c", "from medvlm.cli import main; main()", "watch"]


def test_sigterm_finishes_the_studies_in_progress_and_loses_none(
    site: Site, tmp_path: Path
) -> None:
    with stand_in_model(latency_s=2.0) as slow_model:
        env = _env(site, slow_model, tmp_path / "home")
        ledger = _ledger(site)
        watching = subprocess.Popen(
            _WATCH, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            state = f"watch:dicomweb:{site.orthanc.dicomweb_url}"  # flows.services.source_name
            _wait("the first pass", lambda: ledger.watermark(state) is not None)
            uids = [site.add() for _ in range(5)]
            _wait(
                "a study in the pipeline",
                lambda: any(j.claimed_by for j in ledger.jobs(site.version, uids)),
            )
            watching.send_signal(signal.SIGTERM)
            output, _ = watching.communicate(timeout=180)
        finally:
            if watching.poll() is None:
                watching.kill()
                watching.wait()
        assert watching.returncode == 0, output[-4000:]
        assert "SIGTERM" in output and "stable→EHR" in output, output[-4000:]
        jobs = ledger.jobs(site.version, uids)
        assert all(job.claimed_by is None for job in jobs), jobs  # nothing stuck claimed
        assert all(job.state in (JobState.WRITTEN, JobState.DISCOVERED) for job in jobs), jobs
        assert any(job.state is JobState.WRITTEN for job in jobs)
        written = sum(j.state is JobState.WRITTEN for j in jobs)
        print(f"\nwatch: after SIGTERM {written} of {len(uids)} written, the rest unclaimed")
        # The next start drafts the rest: those seen stable from the saved state (their stable
        # instant kept), the others from the saved feed position.
        _wait("all stable", lambda: _stable_in_orthanc(site.orthanc, uids), 60)
        again = subprocess.run(
            [*_WATCH, "--once"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
        )
    output += again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    assert all(_written(site, uid) for uid in uids), output[-4000:]
    assert all(len(_drafts(site, uid)) == 1 for uid in uids)
    print(output[-1500:])
    for i, accession in enumerate(site.accessions):
        assert accession not in output and f"SYN-{site.prefix}-{i:03d}" not in output
