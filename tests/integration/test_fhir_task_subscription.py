"""``medvlm tasks --listen`` against the real FHIR server and Orthanc: the server's rest-hook
notification, not the fallback interval (set to 300 s here), brings a requested Task to
completion; the Subscription is gone after the stop; a notification without the run's token is
refused.

The dev FHIR server (sekmet) notifies an R4 rest-hook Subscription without ``channel.payload``
with an empty POST to ``channel.endpoint`` carrying the ``channel.header`` lines as headers,
from a worker pool shortly after the matching write commits; delivery failing after its
retries turns the Subscription to ``error``. The model is the stand-in of
tests/integration/test_fhir_tasks.py, whose fixtures and helpers are used here.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from connectors.ehr import TaskSubscriptions
from flows.task_listener import CRITERIA, TaskListener
from flows.tasks import TaskTally, draft_requested_tasks
from medvlm.dev.servers import OrthancInfo
from medvlm.settings import TaskSettings
from tests.integration.folder_site import stand_in_model
from tests.integration.test_fhir_tasks import (
    CLI,
    REPO,
    _client,
    _for_study,
    _read,
    _services,
    _since,
    cli_env,
)
from tests.integration.test_write_safety import Site, open_site

pytestmark = [pytest.mark.integration]

#: Far longer than the test waits for a Task: a Task completed came through a notification.
FALLBACK_S = 300.0


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path, version=lambda p: f"listen-{p}") as opened:
        yield opened


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    with stand_in_model(latency_s=0.05) as url:
        yield url


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


def _status(site: Site, ref: str) -> str:
    return str(_read(site, ref)["status"])


def _gone(site: Site, ref: str) -> bool:
    with _client(site) as client:
        return client.get(f"/{ref}").status_code in (404, 410)


def test_a_requested_task_is_drafted_on_the_servers_notification(
    site: Site, model_url: str
) -> None:
    since = _since()
    study_uid = site.add()
    lines: list[str] = []
    tallies: list[TaskTally] = []
    stop = threading.Event()
    with _services(site, model_url) as services:
        ehr = services.ehr
        assert isinstance(ehr, TaskSubscriptions)
        listener: TaskListener[TaskTally] = TaskListener(
            lambda: draft_requested_tasks(services, since=since),
            TaskSettings(interval_s=FALLBACK_S),
            ehr,
            on_pass=tallies.append,
            say=lines.append,
        )
        thread = threading.Thread(target=listener.run, args=(stop,), name="test-listen")
        thread.start()
        try:
            assert listener.ready.wait(60), lines
            sid = listener.subscription_id
            assert sid is not None, lines
            subscription = _read(site, f"Subscription/{sid}")
            assert subscription["status"] == "active", (subscription.get("error"), lines)
            assert subscription["criteria"] == CRITERIA
            assert ehr.subscription_status(sid) == "active"
            assert "payload" not in subscription["channel"]
            _until(lambda: listener.passes >= 1, 60, "the pass at start")
            ref = _for_study(site, study_uid)
            # The pass that completed it has ended (its tally handed over after the Task's
            # last update): only then are the counts below settled.
            _until(
                lambda: any(done == ref for t in tallies for done, _ in t.completed),
                120,
                f"{ref} completed",
            )
            assert _status(site, ref) == "completed"
            assert listener.listener.notifications >= 1, lines
            assert listener.passes >= 2  # at start, and on the notification
            # Anyone else posting to the listener is refused and starts nothing.
            passes = listener.passes
            with httpx.Client(timeout=10, trust_env=False) as client:
                url = listener.listener.url
                assert client.post(url).status_code == 401
                wrong = {"Authorization": "Bearer not-the-token"}
                assert client.post(url, headers=wrong).status_code == 401
            time.sleep(1)
            assert listener.passes == passes and listener.listener.refused == 2
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive()
        assert ehr.subscription_status(sid) is None
    assert listener.subscription_id is None
    assert _gone(site, f"Subscription/{sid}"), lines
    assert f"Subscription/{sid} deleted" in lines


def test_medvlm_tasks_listen_drafts_on_notification_and_deletes_its_subscription_on_sigterm(
    site: Site, model_url: str, tmp_path: Path
) -> None:
    since = _since()
    study_uid = site.add()
    env = cli_env(site, model_url, tmp_path) | {"MEDVLM_TASKS__INTERVAL_S": str(FALLBACK_S)}
    args = [*CLI, "tasks", "--listen", "--since", since.isoformat()]
    process = subprocess.Popen(
        args,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(process.stdout or []), daemon=True)
    reader.start()

    def output() -> str:
        return "".join(out)

    try:
        _until(
            lambda: "Subscription/" in output() or process.poll() is not None,
            240,
            "the Subscription",
        )
        found = re.search(r"Subscription/([A-Za-z0-9\-.]+) active", output())
        assert found, output()[-4000:]
        sid = found.group(1)
        ref = _for_study(site, study_uid)
        _until(lambda: _status(site, ref) == "completed", 120, f"{ref} completed")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        reader.join(10)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0, output()[-4000:]
    assert f"Subscription/{sid} deleted" in output()
    assert ref in output()
    assert _gone(site, f"Subscription/{sid}")
    job = site.job(study_uid)
    for identifier in (job.accession_number, f"SYN-{site.prefix}-000"):
        assert identifier and identifier not in output()  # no accession number, no MRN
