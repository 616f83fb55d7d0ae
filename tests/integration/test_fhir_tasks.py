"""On-demand drafting through FHIR Task against the real FHIR server and Orthanc.

A client creates a ``draft-imaging-report`` Task on the server; ``flows.tasks`` claims it with
an If-Match update, drafts the study through the main pipeline and ends the Task completed with
the preliminary DiagnosticReport as output, or failed with a coded reason. Two workers racing
for one Task draft it once (the second claim is answered 412); a cancelled Task is not drafted.

The model is not under test here: it is ``stand_in_model`` (tests/integration/folder_site.py),
a loopback HTTP service answering every study with a schema-valid report, reached through the
product's own ``HttpDrafter`` as with ``MEDVLM_JOB__MODEL_ENDPOINT=http``.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fhir.resources.R4B.task import Task

from connectors.ehr import TaskQueue
from connectors.factory import build_image_source
from connectors.fhir import FhirEhr
from connectors.ledger_store import LedgerStore, open_engine
from flows.draft_reports import Services
from flows.tasks import TaskTally, draft_requested_tasks
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM
from medvlm.dev.servers import OrthancInfo
from medvlm.settings import JobSettings
from pipeline.fhir_resources import ModelIdentity
from pipeline.ledger import JobState
from pipeline.tasks import DRAFT_IMAGING_REPORT, TASK_CODE_SYSTEM, TASK_REASON_SYSTEM
from serving.clients import HttpDrafter
from tests.integration.folder_site import stand_in_model
from tests.integration.test_write_safety import Site, open_site

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path, version=lambda p: f"tasks-{p}") as opened:
        yield opened


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with stand_in_model(latency_s=0.05) as url:
        yield url


def _client(site: Site) -> httpx.Client:
    return httpx.Client(base_url=site.fhir_base_url, timeout=30, trust_env=False)


def _search(site: Site, path: str, **params: str) -> list[dict[str, Any]]:
    with _client(site) as client:
        bundle = client.get(path, params={**params, "_count": "500"}).json()
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") != "outcome"
    ]


def _read(site: Site, ref: str) -> dict[str, Any]:
    with _client(site) as client:
        response = client.get(f"/{ref}")
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer


def _imaging_study(site: Site, study_uid: str) -> dict[str, Any]:
    (found,) = _search(site, "/ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
    return found


def _request(site: Site, **fields: Any) -> str:
    """A client's requested Task; returns ``Task/{id}``."""
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": DRAFT_IMAGING_REPORT}]},
        "authoredOn": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **fields,
    }
    with _client(site) as client:
        response = client.post("/Task", json=task, headers={"Prefer": "return=representation"})
        response.raise_for_status()
        return f"Task/{response.json()['id']}"


def _for_study(site: Site, study_uid: str) -> str:
    study = _imaging_study(site, study_uid)
    return _request(
        site,
        focus={"reference": f"ImagingStudy/{study['id']}"},
        **{"for": study["subject"]},
    )


def _cancel(site: Site, ref: str) -> None:
    """The requester cancels its Task (a plain update, as a client would)."""
    task = _read(site, ref) | {"status": "cancelled"}
    with _client(site) as client:
        client.put(f"/{ref}", json=task).raise_for_status()


def _drafts_of_order(site: Site, order: str) -> list[dict[str, Any]]:
    return _search(site, "/DiagnosticReport", **{"based-on": order, "status": "preliminary"})


@contextmanager
def _services(site: Site, model_url: str, worker: str = "worker-a") -> Iterator[Services]:
    source = build_image_source(site.orthanc.pacs_settings())
    try:
        with site.ehr() as ehr:
            yield Services(
                source=source,
                ehr=ehr,
                drafter=HttpDrafter(None, model_url),
                ledger=LedgerStore(open_engine(site.ledger_url)),
                model=ModelIdentity("stand-in", site.version),
                job=JobSettings.model_validate(
                    {"identifier_system": site.draft_system, "worker_id": worker}
                ),
                max_images=1,
                patient_identifier_system=MRN_SYSTEM,
                accession_system=ACCESSION_SYSTEM,
                site_timezone=ZoneInfo("Europe/Berlin"),
            )
    finally:
        source.close()


def _since() -> dt.datetime:
    """This test's Tasks only: the server is shared by the session's tests."""
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)


def _tasks(site: Site, model_url: str, since: dt.datetime, **kwargs: Any) -> TaskTally:
    with _services(site, model_url, **kwargs) as services:
        return draft_requested_tasks(services, since=since)


def test_a_requested_task_gets_a_preliminary_draft_and_ends_completed_with_it(
    site: Site, model_url: str
) -> None:
    since = _since()
    study_uid = site.add()
    ref = _for_study(site, study_uid)
    tally = _tasks(site, model_url, since)
    assert tally.found == 1 and not tally.failed and not tally.lost, tally
    ((done, report_ref),) = tally.completed
    assert done == ref and report_ref.startswith("DiagnosticReport/")
    task = _read(site, ref)
    assert task["status"] == "completed"
    assert task["owner"]["reference"].startswith("Device/")
    assert [o["valueReference"]["reference"] for o in task["output"]] == [report_ref]
    assert task["businessStatus"]["coding"][0]["code"] == "written"
    report = _read(site, report_ref)
    assert report["status"] == "preliminary"
    job = site.job(study_uid)
    assert job.state is JobState.WRITTEN and job.claimed_by is None
    assert job.fhir_ids["DiagnosticReport"] == [report_ref.removeprefix("DiagnosticReport/")]
    # A completed Task is not taken again; a second Task for the same order (by basedOn) is
    # completed with the same draft, drafted once.
    order = job.links["service_request"]
    again = _request(site, basedOn=[{"reference": order}])
    second = _tasks(site, model_url, since)
    assert second.found == 1 and second.completed == [(again, report_ref)], second
    assert second.run is None  # nothing reached the model
    assert [d["id"] for d in _drafts_of_order(site, order)] == [report_ref.split("/")[1]]


def test_a_task_for_a_study_the_pacs_does_not_hold_fails_with_unknown_study(
    site: Site, model_url: str
) -> None:
    since = _since()
    study_uid = site.add()
    study = _imaging_study(site, study_uid)
    missing_uid = f"2.25.{uuid.uuid4().int}"
    with _client(site) as client:  # in the EHR, not in the PACS
        client.post(
            "/ImagingStudy",
            json={k: v for k, v in study.items() if k not in ("id", "meta", "identifier")}
            | {"identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{missing_uid}"}]},
        ).raise_for_status()
    nowhere = _for_study(site, missing_uid)
    dangling = _request(site, focus={"reference": "ImagingStudy/no-such-study"})
    unreadable = _request(site)  # neither focus nor basedOn
    tally = _tasks(site, model_url, since)
    assert tally.found == 3 and not tally.completed, tally
    reasons = {}
    for ref in (nowhere, dangling, unreadable):
        task = _read(site, ref)
        (coding,) = task["statusReason"]["coding"]
        assert coding["system"] == TASK_REASON_SYSTEM
        reasons[ref] = (task["status"], coding["code"])
        assert missing_uid not in task["statusReason"]["text"]
    assert reasons == {
        nowhere: ("failed", "unknown-study"),
        dangling: ("failed", "unknown-study"),
        unreadable: ("rejected", "unreadable-task"),
    }
    assert LedgerStore(open_engine(site.ledger_url)).jobs(site.version) == []


def test_a_task_on_a_signed_order_fails_signed_before_draft_with_nothing_written(
    site: Site, model_url: str
) -> None:
    since = _since()
    study_uid = site.add()
    site.sign(site.accessions[-1])
    with site.ehr() as ehr:
        order = ehr.find_service_request(site.accessions[-1])
    assert order is not None
    ref = _request(site, basedOn=[{"reference": f"ServiceRequest/{order.id}"}])
    tally = _tasks(site, model_url, since)
    assert [r for r, _ in tally.failed] == [ref] and not tally.completed, tally
    task = _read(site, ref)
    assert task["status"] == "failed"
    assert task["statusReason"]["coding"][0]["code"] == "signed-before-draft"
    assert task["statusReason"]["text"].startswith("signed-before-draft: DiagnosticReport/")
    assert site.job(study_uid).state is JobState.SKIPPED
    assert _drafts_of_order(site, f"ServiceRequest/{order.id}") == []


class _Racing:
    """A worker's Task queue whose searches wait for each other: both workers hold the same
    requested Task (the same version) before either claims it."""

    def __init__(self, inner: TaskQueue, barrier: threading.Barrier) -> None:
        self.inner = inner
        self.barrier = barrier

    def search_tasks(self, *args: Any, **kwargs: Any) -> list[Task]:
        found = self.inner.search_tasks(*args, **kwargs)
        self.barrier.wait(timeout=60)
        return found

    def read(self, model: Any, rid: str) -> Any:
        return self.inner.read(model, rid)

    def update_task(self, task: Task) -> Task | None:
        return self.inner.update_task(task)


def test_two_workers_racing_for_one_task_draft_it_once(site: Site, model_url: str) -> None:
    since = _since()
    study_uid = site.add()
    ref = _for_study(site, study_uid)
    # The SQLite ledger is migrated once, here: two workers are two processes in production,
    # and alembic's migration context is process-global (two threads migrating at once break).
    open_engine(site.ledger_url).dispose()
    barrier = threading.Barrier(2)
    tallies: dict[str, TaskTally] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with _services(site, model_url, worker=name) as services:
                assert isinstance(services.ehr, FhirEhr)
                tallies[name] = draft_requested_tasks(
                    services, since=since, queue=_Racing(services.ehr, barrier)
                )
        except BaseException as exc:
            traceback.print_exc()  # shown with a failure
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("worker-a", "worker-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(len(t.completed) for t in tallies.values()) == [0, 1], tallies
    assert sorted(t.lost for t in tallies.values()) == [[], [ref]], tallies
    task = _read(site, ref)
    assert task["status"] == "completed"
    job = site.job(study_uid)
    assert job.state is JobState.WRITTEN
    assert len(_drafts_of_order(site, job.links["service_request"])) == 1


def test_a_cancelled_task_is_never_drafted(site: Site, model_url: str) -> None:
    since = _since()
    before, during = site.add(), site.add()
    cancelled = _for_study(site, before)
    _cancel(site, cancelled)
    late = _for_study(site, during)

    class CancelledAfterTheSearch(_Racing):
        def search_tasks(self, *args: Any, **kwargs: Any) -> list[Task]:
            found = self.inner.search_tasks(*args, **kwargs)
            _cancel(site, late)  # the requester cancels between our search and our claim
            return found

    with _services(site, model_url) as services:
        assert isinstance(services.ehr, FhirEhr)
        tally = draft_requested_tasks(
            services,
            since=since,
            queue=CancelledAfterTheSearch(services.ehr, barrier=None),  # type: ignore[arg-type]
        )
    assert tally.found == 1 and tally.lost == [late] and not tally.completed, tally
    for ref in (cancelled, late):
        task = _read(site, ref)
        assert task["status"] == "cancelled" and "owner" not in task
    assert LedgerStore(open_engine(site.ledger_url)).jobs(site.version) == []


#: ``medvlm`` as a subprocess: ``python -c`` with the repository as working directory runs this
#: checkout's code, whichever checkout the virtualenv's ``medvlm`` script was installed from.
CLI = [sys.executable, "-c", "from medvlm.cli import main; main()"]


def cli_env(site: Site, model_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of ``medvlm`` drafting for ``site`` with the stand-in model."""
    orthanc = site.orthanc
    return {
        **os.environ,
        "MEDVLM_HOME": str(tmp_path / "home"),
        "MEDVLM_PACS__KIND": "dicomweb",
        "MEDVLM_PACS__DICOMWEB_URL": orthanc.dicomweb_url,
        "MEDVLM_PACS__AUTH": "basic",
        "MEDVLM_PACS__USERNAME": orthanc.username,
        "MEDVLM_PACS__PASSWORD": orthanc.password.get_secret_value(),
        "MEDVLM_EHR__KIND": "fhir",
        "MEDVLM_EHR__BASE_URL": site.fhir_base_url,
        "MEDVLM_EHR__ACCESSION_SYSTEM": ACCESSION_SYSTEM,
        "MEDVLM_EHR__PATIENT_IDENTIFIER_SYSTEM": MRN_SYSTEM,
        "MEDVLM_JOB__MODEL_ENDPOINT": "http",
        "MEDVLM_JOB__MODEL_URL": model_url,
        "MEDVLM_MODEL__VERSION": site.version,
        "MEDVLM_JOB__IDENTIFIER_SYSTEM": site.draft_system,
        "MEDVLM_JOB__LEDGER_URL": site.ledger_url,
        "COLUMNS": "200",
    }


def test_medvlm_tasks_drafts_from_its_environment_and_exits_3_on_a_failed_task(
    site: Site, model_url: str, tmp_path: Path
) -> None:
    since = _since()
    study_uid = site.add()
    good = _for_study(site, study_uid)
    bad = _request(site, focus={"reference": "ImagingStudy/no-such-study"})
    args = [*CLI, "tasks", "--since", since.isoformat()]
    result = subprocess.run(
        args,
        env=cli_env(site, model_url, tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-4000:]
    assert "requested Tasks: 2" in output
    task = _read(site, good)
    assert task["status"] == "completed", output[-4000:]
    assert f"{good}" in output and task["output"][0]["valueReference"]["reference"] in output
    assert f"{bad}" in output and "unknown-study" in output
    job = site.job(study_uid)
    assert job.state is JobState.WRITTEN
    assert job.accession_number
    for identifier in (job.accession_number, f"SYN-{site.prefix}-000"):
        assert identifier not in output  # no accession number, no MRN
