"""`medvlm run` over 500 and then 2,000 studies (``--load-sizes``), each in one run: every
study drafted exactly once, peak memory that does not grow with the batch, no growth in open
files or threads.

As an operator runs it (the approach of tests/integration/test_kill_resume.py): `medvlm run` in
its own process, settings from the environment, a folder PACS, the session's real FHIR server as
the EHR, a model over HTTP (`/v1/reports`), a SQLite ledger. Each size has its own folder,
ledger, model version and identifier system, so the two batches never mix.

The model is a loopback stand-in owned by the test (``--load-model tiny``: the session's real
tiny model instead): it answers `/v1/reports` with one fixed
valid draft after ``STUB_LATENCY_S`` (so each request waits at the model a while, as at a
real one). What is measured is the run's process, the same whichever model
answers; the tiny random-weight model on the session's real model service writes ~1,300 tokens
a draft at ~820 tokens/s on 2 cores (measured here: 160 studies in 258 s), so 2,000 studies
through it would take ~50 minutes, more than the CI run can spend (tests/integration/
test_kill_resume.py drafts 200 studies through it with `medvlm run`).

While a run goes, its process and its descendants (the image process pool; the stand-in model
lives in the test's process and is not counted) are sampled every ~0.5 s from /proc: resident
memory (VmRSS), open file descriptors (/proc/PID/fd) and threads (``Threads:`` of
/proc/PID/status), each summed over the tree.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.fhir import FhirEhr, build_http_client
from connectors.ledger_store import LedgerStore, open_engine
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM
from medvlm.settings import EhrSettings, MedvlmSettings
from pipeline.ledger import JobState
from tests.integration.folder_site import build_folder_site, http_run_env, stand_in_model
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

DAY = dt.date(1962, 3, 9)
SAMPLE_EVERY_S = 0.5
RUN_TIMEOUT_S = 1800.0
# With ``--load-model tiny`` a run may take this much longer per study (the model drafts at
# ~1.6 s a study on 2 cores: 2,000 studies are ~55 minutes, past RUN_TIMEOUT_S).
TINY_S_PER_STUDY = 3.0
# Peak RSS may grow by at most this much from the small batch to the large one.
RSS_GROWTH = 1.2
# Open files and threads of the run may not grow between the two halves of the large run beyond
# this slack. What is open at the peak is bounded by settings, not by the batch (the I/O thread
# pool of fetch + write + 2 threads, the keep-alive pools to the PACS, EHR and model, the
# ledger's connections, the image process pool); the slack covers what such a bounded pool does
# at any moment: a keep-alive connection closed and reopened (for an instant both sockets are
# counted), a pool thread started late because a burst first needed it then, a sample taken
# while Python's import or logging machinery holds a file open.
FD_SLACK = 8
THREAD_SLACK = 4
STUB_LATENCY_S = 0.25  # the stand-in model answers each draft after this long


@pytest.fixture
def model_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The stand-in model, on a free loopback port, for the test's duration; with
    ``--load-model tiny`` the session's real model service (``serve_url``) instead."""
    if request.config.getoption("--load-model") == "tiny":
        yield str(request.getfixturevalue("serve_url"))
        return
    with stand_in_model(STUB_LATENCY_S) as url:
        yield url


@dataclass(frozen=True)
class Sample:
    """The run's process tree at one moment."""

    at_s: float
    rss_kib: int
    fds: int
    threads: int


@dataclass(frozen=True)
class RunResult:
    returncode: int
    seconds: float
    samples: list[Sample]
    output: str

    @property
    def peak_rss_mib(self) -> float:
        return max(s.rss_kib for s in self.samples) / 1024


def _process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it, from /proc (parents from /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _sample(root: int, at_s: float) -> Sample | None:
    """The tree's summed VmRSS, open file descriptors and threads; None once it is gone."""
    rss = fds = threads = 0
    seen = False
    for pid in _process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            open_fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # exited between the listing and the read
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" not in fields:  # a zombie
            continue
        seen = True
        rss += int(fields["VmRSS"].split()[0])
        threads += int(fields["Threads"])
        fds += open_fds
    return Sample(at_s, rss, fds, threads) if seen else None


def _run_sampled(args: list[str], env: dict[str, str], log: Path, timeout_s: float) -> RunResult:
    """Run ``args`` to its end (killed after ``timeout_s``), sampling its process tree every
    ``SAMPLE_EVERY_S``."""
    samples: list[Sample] = []
    started = time.monotonic()
    with log.open("w") as out, subprocess.Popen(args, env=env, stdout=out, stderr=out) as run:
        while True:
            try:
                run.wait(timeout=SAMPLE_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic() - started
            if now > timeout_s:
                run.kill()
                run.wait()
                pytest.fail(f"{args[1]} over {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
            sample = _sample(run.pid, now)
            if sample is not None:
                samples.append(sample)
    return RunResult(run.returncode, time.monotonic() - started, samples, log.read_text())


def _drafts_per_order(fhir_base_url: str, system: str) -> Counter[str]:
    """Preliminary DiagnosticReports carrying an identifier of ``system``, per order (basedOn):
    every page of one search, so the count is exact and costs a few requests."""
    per_order: Counter[str] = Counter()
    with httpx.Client(base_url=fhir_base_url, timeout=120, trust_env=False) as http:
        url: str | None = "/DiagnosticReport"
        params: dict[str, str] | None = {
            "identifier": f"{system}|",
            "status": "preliminary",
            "_count": "500",
        }
        while url is not None:
            response = http.get(url, params=params)
            response.raise_for_status()
            bundle: dict[str, Any] = response.json()
            for entry in bundle.get("entry", []):
                if entry.get("search", {}).get("mode", "match") != "match":
                    continue
                report = entry["resource"]
                assert any(i.get("system") == system for i in report.get("identifier", []))
                (order,) = report["basedOn"]
                per_order[order["reference"]] += 1
            url = next(
                (link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None
            )
            params = None  # the next link carries them
    return per_order


def _one_batch(
    root: Path,
    studies: int,
    *,
    fhir_base_url: str,
    model_url: str,
    model_label: str,
    tiny: bool,
    settings: MedvlmSettings,
) -> tuple[RunResult, Figures]:
    """Build a site of ``studies`` studies, draft it with one `medvlm run`, count the outcome."""

    prefix = f"L{uuid.uuid4().hex[:5].upper()}"  # accession numbers: 16 characters at most
    ehr_settings = EhrSettings.model_validate(
        {"kind": "fhir", "base_url": fhir_base_url, "accession_system": ACCESSION_SYSTEM}
    )
    client = build_http_client(ehr_settings)
    try:
        build_folder_site(root, studies, DAY, prefix=prefix, ehr=FhirEhr(client, ehr_settings))
    finally:
        client.close()
    assert settings.serving.api_key is not None
    version = f"load{studies}-{prefix}"
    system = f"urn:medvlm-test:load{studies}-{prefix}"
    ledger_url = f"sqlite:///{root / 'ledger.db'}"
    env = http_run_env(
        root,
        fhir_base_url=fhir_base_url,
        model_url=model_url,
        api_key=settings.serving.api_key.get_secret_value(),
        version=version,
        identifier_system=system,
        ledger_url=ledger_url,
    )
    medvlm = str(Path(sys.executable).parent / "medvlm")
    args = [medvlm, "run", "--since", DAY.isoformat(), "--until", DAY.isoformat()]
    timeout_s = RUN_TIMEOUT_S + (TINY_S_PER_STUDY * studies if tiny else 0.0)
    result = _run_sampled(args, env, root / "run.log", timeout_s)
    assert result.returncode == 0 and result.samples, result.output[-4000:]
    print(
        f"{studies} studies: exit {result.returncode} in {result.seconds:.0f} s, "
        f"peak RSS {result.peak_rss_mib:.0f} MiB, {len(result.samples)} samples, "
        f"fds {min(s.fds for s in result.samples)}-{max(s.fds for s in result.samples)}, "
        f"threads {min(s.threads for s in result.samples)}-"
        f"{max(s.threads for s in result.samples)}"
    )

    jobs = LedgerStore(open_engine(ledger_url)).jobs(version)
    per_order = _drafts_per_order(fhir_base_url, system)
    orders = {job.links.get("service_request") for job in jobs}
    written = {job.study_ref for job in jobs if job.state is JobState.WRITTEN}
    with_reason = [job for job in jobs if job.state is not JobState.WRITTEN and job.reason]
    drafted_once = sum(1 for order in orders if per_order.get(str(order)) == 1)
    duplicated = sum(1 for n in per_order.values() if n > 1)
    figures = Figures(
        scenario=f"load: {studies:,} studies in one run",
        faults="none (load)",
        studies=studies,
        drafted_once=drafted_once,
        recorded_with_reason=len(with_reason),
        lost=studies - drafted_once - len(with_reason) - duplicated,
        duplicated=duplicated,
        peak_rss_mib=round(result.peak_rss_mib, 1),
        seconds=round(result.seconds, 1),
        extra={
            "fds_max": max(s.fds for s in result.samples),
            "threads_max": max(s.threads for s in result.samples),
            "samples": len(result.samples),
            "model": model_label,
        },
    )
    assert len(jobs) == studies and len(written) == studies, Counter(j.state for j in jobs)
    assert set(per_order) == orders and set(per_order.values()) == {1}, {
        order: n for order, n in per_order.items() if n != 1
    }
    assert drafted_once == studies
    return result, figures


def _sizes(option: str) -> tuple[int, int]:
    """``--load-sizes SMALL,LARGE``: the large batch at least twice the small one, so that
    memory growing with the batch would show."""
    try:
        small, large = (int(part) for part in option.split(","))
    except ValueError:
        raise pytest.UsageError(f"--load-sizes {option}: expected SMALL,LARGE") from None
    if not 0 < 2 * small <= large:
        raise pytest.UsageError(f"--load-sizes {option}: LARGE must be at least twice SMALL")
    return small, large


@pytest.mark.timeout(4 * 3600)
def test_a_large_batch_in_one_run_drafts_each_once_in_bounded_memory_files_and_threads(
    tmp_path: Path,
    fhir_base_url: str,
    model_url: str,
    settings: MedvlmSettings,
    prefect_api: None,
    request: pytest.FixtureRequest,
) -> None:
    tiny = request.config.getoption("--load-model") == "tiny"
    small_size, large_size = _sizes(str(request.config.getoption("--load-sizes")))
    common: dict[str, Any] = {
        "fhir_base_url": fhir_base_url,
        "model_url": model_url,
        "model_label": (
            "the tiny model on Ray Serve over HTTP"
            if tiny
            else f"stand-in over HTTP, {STUB_LATENCY_S} s a draft"
        ),
        "tiny": tiny,
        "settings": settings,
    }
    small, small_figures = _one_batch(tmp_path / "small", small_size, **common)
    record(small_figures)
    large, large_figures = _one_batch(tmp_path / "large", large_size, **common)
    record(large_figures)

    # Memory is bounded by the pipeline's limits, not by the batch.
    assert large.peak_rss_mib <= RSS_GROWTH * small.peak_rss_mib, (
        f"peak RSS {small.peak_rss_mib:.0f} MiB at {small_size}, "
        f"{large.peak_rss_mib:.0f} at {large_size}"
    )
    # No leak of files or threads: the second half of the large run never holds more than the
    # first half did (both halves are mostly steady drafting; the first includes start-up).
    half = large.seconds / 2
    first = [s for s in large.samples if s.at_s < half]
    second = [s for s in large.samples if s.at_s >= half]
    assert first and second
    fds = (max(s.fds for s in first), max(s.fds for s in second))
    threads = (max(s.threads for s in first), max(s.threads for s in second))
    print(f"{large_size} studies, first and second half: fds {fds}, threads {threads}")
    assert fds[1] <= fds[0] + FD_SLACK, f"open files grew: {fds[0]} then {fds[1]}"
    assert threads[1] <= threads[0] + THREAD_SLACK, f"threads grew: {threads[0]} then {threads[1]}"
