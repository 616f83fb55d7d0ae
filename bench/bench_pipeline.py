"""The whole flow against raw vLLM on identical requests, side by side in one run.

The same N chest CR studies (the real radiograph from pydicom-data, each relabelled as its own
patient and order: folder PACS, NDJSON EHR, SQLite ledger) go, interleaved ``--repeats`` times,

  (a) raw: to a vLLM engine in this process, all N requests submitted at once (the model inputs
      are what the pipeline's own fetch step makes of each study: same images, prompt, schema,
      max tokens, seed);
  (b) pipeline: through the ``draft-reports`` Prefect flow (discover, fetch, draft on the Ray
      Serve replica, write to the EHR, ledger), a fresh ledger and EHR each time;

and then (c) through the flow with a no-op drafter (orchestration alone). It prints the
figures last, one ``name: value`` line each:

  raw_studies_per_s, pipeline_studies_per_s, pipeline_vs_raw (medians of the repeats; the
  ratio is the median of each repeat's pipeline/raw), stage_*_s_per_study (summed stage time
  over N), model_mean_in_flight (requests at the model over the run, as the flow sees it),
  pipeline_peak_rss_mib (this process while the flow ran), noop_studies_per_s,
  noop_ms_per_study, rss_noop_<N>_mib for each ``--rss-sizes`` (peak RSS of a fresh process
  running the no-op flow over N studies) and rss_growth_ratio (largest over smallest), and
  noop_run_<rows>_rows_s (a run with nothing to do on a ledger of ``--ledger-rows`` written
  rows, in a fresh process: discovery, the pending query and the summary) and
  noop_cli_run_<rows>_rows_s (the same as ``medvlm run`` in its own process, start to exit).

    .venv/bin/python bench/bench_pipeline.py [--studies 128] [--repeats 3]
        [--rss-sizes 128,512] [--ledger-rows 100000]

``--replicas 1,2`` runs another comparison instead: the flow against Serve applications of 1
and of 2 replicas, both running at once on the local Ray, the repeats alternating between
them (``replicas_<k>_studies_per_s``, ``replicas_<k>_mean_in_flight``, ``replicas_2_vs_1``).

Run it in a loopback-only namespace as the tests do: ``scripts/bench.sh`` (or
``unshare -rn sh -c 'ip link set lo up && .venv/bin/python bench/bench_pipeline.py'``).
Method and latest figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDY_DATE = dt.date(2026, 11, 2)


def _rss_mib() -> float:
    """This process's resident set now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]  # idle + iowait
            out.append((sum(values) - idle, sum(values)))
    return out


def _process_ticks() -> dict[int, tuple[str, int]]:
    """CPU ticks (user + system) so far of every process, with a short name."""
    out: dict[int, tuple[str, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        words = [w.decode(errors="replace") for w in cmdline if w]
        script = next((Path(w).name for w in words[1:3] if w.endswith(".py")), "")
        out[int(stat.parent.name)] = (f"{name} {script}".strip(), int(fields[11]) + int(fields[12]))
    return out


@contextmanager
def _cpu_by_process(label: str) -> Iterator[None]:
    """Prints the processes that used the most CPU during the block (seconds), by name."""
    before = _process_ticks()
    started = time.perf_counter()
    try:
        yield
    finally:
        wall = time.perf_counter() - started
        ticks = os.sysconf("SC_CLK_TCK")
        used: dict[str, float] = {}
        for pid, (name, total) in _process_ticks().items():
            spent = (total - before.get(pid, (name, 0))[1]) / ticks
            used[name] = used.get(name, 0.0) + spent
        top = sorted(used.items(), key=lambda kv: -kv[1])[:8]
        print(
            f"cpu-seconds by process during {label} ({wall:.1f} s): "
            + ", ".join(f"{name}={seconds:.1f}" for name, seconds in top if seconds > 0),
            flush=True,
        )


@contextmanager
def _cpu_busy() -> Iterator[list[float]]:
    """Yields a list filled, after the block, with each CPU's busy fraction during it."""
    before = _cpu_times()
    result: list[float] = []
    try:
        yield result
    finally:
        after = _cpu_times()
        result += [
            (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
            for (b0, t0), (b1, t1) in zip(before, after, strict=True)
        ]


@contextmanager
def _peak_rss() -> Iterator[list[float]]:
    """Samples VmRSS every 20 ms while the block runs; yields a one-item list with the peak."""
    peak = [_rss_mib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_mib())


@dataclass
class Site:
    """A folder PACS with N studies and an NDJSON EHR template with their records."""

    root: Path
    count: int

    @property
    def dicom(self) -> Path:
        return self.root / "dicom"

    @property
    def ehr_template(self) -> Path:
        return self.root / "ehr-template"


def build_site(root: Path, count: int, image: str = "real") -> Site:
    import pydicom
    from fhir.resources.R4B.bundle import Bundle

    from connectors.ndjson import NdjsonEhr
    from medvlm.dev.sample_cohort import chest_cohort
    from medvlm.dev.sample_data import CHEST_RADIOGRAPH, sample_file
    from medvlm.dev.synthetic_dicom import make_study

    site = Site(root, count)
    chest = (
        pydicom.dcmread(sample_file(CHEST_RADIOGRAPH))
        if image == "real"
        else make_study("CR", seed=11)[0]  # the demo's synthetic chest CR, 96 x 80
    )
    ehr = NdjsonEhr(site.ehr_template)
    for case in chest_cohort(chest, count, study_date=STUDY_DATE):
        for ds in case.datasets:
            path = site.dicom / case.study_uid / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
        assert case.bundle is not None
        ehr.transaction(Bundle.model_validate(case.bundle))
    return site


def site_settings(settings: Any, site: Site, run_dir: Path) -> Any:
    """Settings for one run: the site's PACS, a fresh copy of its EHR, a fresh ledger."""
    from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM

    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(site.ehr_template, run_dir / "ehr")
    return settings.model_copy(
        update={
            "pacs": settings.pacs.model_copy(update={"kind": "folder", "folder": site.dicom}),
            "ehr": settings.ehr.model_copy(
                update={
                    "kind": "folder",
                    "folder": run_dir / "ehr",
                    "accession_system": ACCESSION_SYSTEM,
                    "patient_identifier_system": MRN_SYSTEM,
                }
            ),
            "job": settings.job.model_copy(
                update={"ledger_url": f"sqlite:///{run_dir / 'ledger.db'}"}
            ),
        }
    )


@contextmanager
def flow_services(settings: Any, drafter: Any, model: Any) -> Iterator[Any]:
    """The flow's services as ``open_services`` builds them, with the given drafter."""
    from connectors.factory import build_ehr, build_image_source
    from connectors.ledger_store import LedgerStore, open_engine
    from flows.draft_reports import Services
    from flows.services import model_capacity, source_name

    source = build_image_source(settings.pacs)
    engine = open_engine(settings.job.ledger_url)
    try:
        yield Services(
            source=source,
            ehr=build_ehr(settings.ehr),
            drafter=drafter,
            ledger=LedgerStore(engine),
            model=model,
            job=settings.job,
            max_images=settings.model.max_images_per_prompt,
            patient_identifier_system=settings.ehr.patient_identifier_system,
            accession_system=settings.ehr.accession_system,
            site_timezone=settings.pacs.site_timezone,
            source_name=source_name(settings),
            model_capacity=model_capacity(settings),
        )
    finally:
        source.close()
        engine.dispose()


class NoopDrafter:
    """Answers at once with one fixed valid report: what is left is orchestration."""

    async def draft(self, model_input: Any) -> Any:
        from pipeline.report import result_from_completion
        from tests.flow_doubles import VALID_REPORT

        return result_from_completion(
            json.dumps(VALID_REPORT),
            reference=model_input.reference,
            finish_reason="stop",
            model="noop",
            prompt_tokens=0,
            completion_tokens=0,
            latency_s=0.0,
        )

    async def aclose(self) -> None:
        return None


def run_flow(settings: Any, drafter: Any, model: Any) -> tuple[Any, float, float]:
    """The Prefect flow over every study of the site; (summary, seconds, peak RSS MiB)."""
    from flows.deployments import draft_reports

    with flow_services(settings, drafter, model) as services, _peak_rss() as peak:
        started = time.perf_counter()
        summary = draft_reports(services, None)
        seconds = time.perf_counter() - started
    return summary, seconds, peak[0]


def model_inputs(settings: Any, model: Any) -> list[Any]:
    """What the pipeline's fetch step makes of each study: the raw path's requests."""
    from flows.draft_reports import Skip, discover, fetch, pending_pages

    with flow_services(settings, NoopDrafter(), model) as services:
        discover(services, None)
        inputs = []
        for page in pending_pages(services):
            for job in page:
                fetched = fetch(services, job)
                assert not isinstance(fetched, Skip), fetched
                inputs.append(fetched.model_input)
    return inputs


async def raw_vllm(engine: Any, settings: Any, inputs: list[Any]) -> tuple[float, int]:
    """All requests submitted at once to the engine; seconds until the last completes, and
    the tokens generated."""
    from pipeline.prompts import build_messages
    from pipeline.report import report_json_schema
    from serving.engine import GenerationOptions

    options = GenerationOptions(
        max_tokens=settings.model.max_tokens,
        temperature=settings.model.temperature,
        seed=settings.model.seed,
        json_schema=report_json_schema(),
    )
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            engine.chat(build_messages(item), options, request_id=f"raw-{i}")
            for i, item in enumerate(inputs)
        )
    )
    return time.perf_counter() - started, sum(r.completion_tokens for r in results)


class EngineThread:
    """The raw engine on one event loop of its own for the whole benchmark (vLLM's AsyncLLM
    binds its output handler to the loop of its first request)."""

    def __init__(self, resolved_source: str, settings: Any) -> None:
        from serving.engine import VllmChatEngine

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> Any:
            return VllmChatEngine(resolved_source, settings.model, on_gpu=False)

        self.engine = self.run(make())

    def run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)


def rss_probe(count: int, image: str) -> None:
    """(In a fresh process.) Peak RSS of the no-op flow over ``count`` studies."""
    import resource

    settings, model = bench_settings()
    with tempfile.TemporaryDirectory(prefix="medvlm-bench-rss-") as tmp:
        site = build_site(Path(tmp) / "site", count, image)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with _peak_rss() as peak:
            summary, seconds, _ = run_flow(
                site_settings(settings, site, Path(tmp) / "run"), NoopDrafter(), model
            )
        assert summary.counts["written"] == count, summary.counts
    print(json.dumps({"peak_mib": peak[0], "before_mib": before, "seconds": seconds}))


def ledger_probe(rows: int) -> None:
    """(In a fresh process.) A run with nothing to do on a ledger of ``rows`` written rows."""
    from sqlalchemy import insert

    from connectors.ledger_store import open_engine
    from flows.draft_reports import run_draft_job
    from pipeline.ledger import DraftJob, JobState

    settings, model = bench_settings()
    with tempfile.TemporaryDirectory(prefix="medvlm-bench-ledger-") as tmp:
        site = build_site(Path(tmp) / "site", 1)
        run = site_settings(settings, site, Path(tmp) / "run")
        engine = open_engine(run.job.ledger_url)
        table = DraftJob.__table__  # type: ignore[attr-defined]
        with engine.begin() as connection:
            for start in range(0, rows, 5000):
                connection.execute(
                    insert(table),
                    [
                        {
                            "study_uid": f"1.2.826.0.1.3680043.10.999.{i}",
                            "study_ref": f"study-{i:08x}",
                            "accession_number": f"L{i:08d}",
                            "model_version": model.version,
                            "state": JobState.WRITTEN,
                            "attempts": 0,
                            "flags": [],
                            "timings": {},
                            "links": {},
                            "subgroups": {},
                            "fhir_ids": {},
                            "context_sources": [],
                        }
                        for i in range(start, min(rows, start + 5000))
                    ],
                )
        engine.dispose()
        with flow_services(run, NoopDrafter(), model) as services:
            run_draft_job(services, None)  # registers the site's one study, drafts it
            started = time.perf_counter()
            summary = run_draft_job(services, None)  # nothing new, nothing pending
            seconds = time.perf_counter() - started
        assert summary.attempted == 0, summary
        assert summary.counts["written"] == rows + 1, summary.counts
        cli_seconds = cli_noop_run(run, STUDY_DATE)
    print(json.dumps({"seconds": seconds, "cli_seconds": cli_seconds}))


def cli_noop_run(run: Any, day: dt.date) -> float:
    """Wall time of ``medvlm run`` in its own process (the operator's view: interpreter start,
    imports, settings, discovery, the pending query, the summary) with nothing left to do."""
    env = {
        **os.environ,
        "MEDVLM_MODEL__SOURCE": str(run.model.source),
        "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",  # the tiny test model
        "MEDVLM_PACS__KIND": "folder",
        "MEDVLM_PACS__FOLDER": str(run.pacs.folder),
        "MEDVLM_EHR__KIND": "folder",
        "MEDVLM_EHR__FOLDER": str(run.ehr.folder),
        "MEDVLM_EHR__ACCESSION_SYSTEM": str(run.ehr.accession_system),
        "MEDVLM_EHR__PATIENT_IDENTIFIER_SYSTEM": str(run.ehr.patient_identifier_system),
        "MEDVLM_JOB__LEDGER_URL": str(run.job.ledger_url),
        "COLUMNS": "200",
    }
    medvlm = str(Path(sys.executable).parent / "medvlm")
    args = [medvlm, "run", "--since", day.isoformat(), "--until", day.isoformat()]
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "studies in" not in output, output[-2000:]
    return seconds


def bench_settings() -> tuple[Any, Any]:
    """The tiny random-weight model's settings and identity (built once, cached on disk)."""
    from flows.services import model_identity
    from medvlm.dev.tiny_model import with_tiny_checkpoint
    from medvlm.settings import MedvlmSettings

    settings = MedvlmSettings()
    settings.model.allow_random_weights = True  # the tiny model unless MEDVLM_MODEL__SOURCE is set
    settings = with_tiny_checkpoint(settings)
    model, _ = model_identity(settings)
    return settings, model


def replicas_bench(counts: list[int], studies: int, repeats: int, image: str) -> None:
    """The flow against Serve applications of ``counts`` replicas each, side by side on one
    local Ray: every application runs at once, and the repeats alternate between them.

    Prints ``replicas_<k>_studies_per_s`` and ``replicas_<k>_mean_in_flight`` (medians) and
    ``replicas_<k>_vs_<first>`` (the median of each repeat's ratio of studies/s)."""
    from flows.services import model_capacity
    from serving.app import run_app
    from serving.clients import HandleDrafter
    from serving.kv_cache import with_kv_cache
    from serving.model_source import resolve_model
    from serving.ray_runtime import init_ray, shutdown_ray

    settings, model = bench_settings()
    resolved = resolve_model(settings)
    settings = with_kv_cache(settings, resolved.source)
    apps: dict[int, tuple[Any, Any]] = {}
    rates: dict[int, list[float]] = {k: [] for k in counts}
    in_flight: dict[int, list[float]] = {k: [] for k in counts}
    with tempfile.TemporaryDirectory(prefix="medvlm-bench-") as tmp:
        site = build_site(Path(tmp) / "site", studies, image)
        # One logical CPU per replica: Ray places them all; they share the machine's cores.
        init_ray(settings.serving, num_cpus=sum(counts), bind_shim=settings.bind_shim)
        try:
            for k in counts:
                serving = settings.serving.model_copy(
                    update={"num_replicas": k, "app_name": f"bench-{k}", "route_prefix": f"/r{k}"}
                )
                app_settings = settings.model_copy(update={"serving": serving})
                started = time.perf_counter()
                handle = run_app(app_settings, resolved.source)
                print(f"{k} replica(s) up in {time.perf_counter() - started:.0f} s", flush=True)
                apps[k] = (app_settings, HandleDrafter(handle))
            for k, (app_settings, drafter) in apps.items():  # warm-up, not counted
                run_flow(site_settings(app_settings, site, Path(tmp) / f"warm{k}"), drafter, model)
            for repeat in range(repeats):
                for k, (app_settings, drafter) in apps.items():
                    run_dir = Path(tmp) / f"r{k}-{repeat}"
                    summary, seconds, _ = run_flow(
                        site_settings(app_settings, site, run_dir), drafter, model
                    )
                    assert summary.attempted == studies, summary.counts
                    assert summary.tally is not None
                    rates[k].append(studies / seconds)
                    in_flight[k].append(summary.tally.model_mean_in_flight)
                    print(
                        f"repeat {repeat + 1}, {k} replica(s) (capacity "
                        f"{model_capacity(app_settings)}): {seconds:.1f} s, "
                        f"{summary.tally.model_mean_in_flight:.1f} requests at the model",
                        flush=True,
                    )
        finally:
            shutdown_ray()
    first = counts[0]
    print(f"\nmodel {model.version}; {studies} studies ({image} chest CR), {repeats} repeats")
    for k in counts:
        print(f"replicas_{k}_studies_per_s: {statistics.median(rates[k]):.3f}")
        print(f"replicas_{k}_mean_in_flight: {statistics.median(in_flight[k]):.3f}")
    for k in counts[1:]:
        ratios = [a / b for a, b in zip(rates[k], rates[first], strict=True)]
        print(f"replicas_{k}_vs_{first}: {statistics.median(ratios):.3f}")


def _probe(kind: str, value: int, image: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, f"--{kind}-probe", str(value), "--image", image],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--studies", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-sizes", default="128,512")
    parser.add_argument("--ledger-rows", type=int, default=100_000)
    parser.add_argument(
        "--image",
        choices=("real", "synthetic"),
        default="real",
        help="the real 1955 x 1841 radiograph (default) or the synthetic 96 x 80 chest CR "
        "(image preprocessing all but free: the orchestration alone)",
    )
    parser.add_argument(
        "--replicas",
        help="instead of the main comparison: the flow against Serve applications of these "
        "replica counts side by side (e.g. 1,2)",
    )
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ledger-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe, args.image)
        return
    if args.ledger_probe:
        ledger_probe(args.ledger_probe)
        return
    if args.replicas:
        counts = [int(n) for n in args.replicas.split(",") if n]
        replicas_bench(counts, args.studies, args.repeats, args.image)
        return

    from serving.app import start_model_service
    from serving.clients import HandleDrafter
    from serving.kv_cache import with_kv_cache
    from serving.model_source import resolve_model
    from serving.ray_runtime import shutdown_ray

    settings, model = bench_settings()
    resolved = resolve_model(settings)
    settings = with_kv_cache(settings, resolved.source)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="medvlm-bench-") as tmp:
        site = build_site(Path(tmp) / "site", args.studies, args.image)
        inputs = model_inputs(site_settings(settings, site, Path(tmp) / "inputs"), model)
        raw = EngineThread(resolved.source, settings)
        handle = start_model_service(settings, resolved.source)
        drafter = HandleDrafter(handle)
        try:
            raw.run(raw_vllm(raw.engine, settings, inputs[:2]))  # warm-up, not counted
            run_flow(
                site_settings(settings, site, Path(tmp) / "warm"), NoopDrafter(), model
            )  # Prefect's temporary API server starts here, not counted
            raws, pipes, ratios, peaks = [], [], [], []
            busy_raw: list[list[float]] = []
            token_ratios: list[float] = []
            busy_pipe: list[list[float]] = []
            tally = None
            for repeat in range(args.repeats):
                with _cpu_busy() as busy, _cpu_by_process("raw"):
                    raw_s, raw_tokens = raw.run(raw_vllm(raw.engine, settings, inputs))
                busy_raw.append(busy)
                with _cpu_busy() as busy, _cpu_by_process("pipeline"):
                    summary, pipe_s, peak = run_flow(
                        site_settings(settings, site, Path(tmp) / f"run{repeat}"), drafter, model
                    )
                busy_pipe.append(busy)
                done = summary.attempted
                assert done == args.studies, summary.counts
                raws.append(args.studies / raw_s)
                pipes.append(done / pipe_s)
                ratios.append(raw_s / pipe_s)
                peaks.append(peak)
                tally = summary.tally
                assert summary.tally is not None
                pipe_tokens = summary.tally.completion_tokens
                token_ratios.append((pipe_tokens / pipe_s) / (raw_tokens / raw_s))
                print(
                    f"repeat {repeat + 1}: raw {raw_s:.1f} s ({raw_tokens} tokens), pipeline "
                    f"{pipe_s:.1f} s ({pipe_tokens} tokens; {summary.counts}), "
                    f"ratio {raw_s / pipe_s:.2f}",
                    flush=True,
                )
        finally:
            raw.close()
            shutdown_ray()
        figures["raw_studies_per_s"] = statistics.median(raws)
        figures["pipeline_studies_per_s"] = statistics.median(pipes)
        figures["pipeline_vs_raw"] = statistics.median(ratios)
        figures["pipeline_vs_raw_tokens_per_s"] = statistics.median(token_ratios)
        assert tally is not None
        for stage, seconds in sorted(tally.stage_s.items()):
            figures[f"stage_{stage.removesuffix('_s')}_s_per_study"] = seconds / args.studies
        figures["model_mean_in_flight"] = tally.model_mean_in_flight
        figures["pipeline_peak_rss_mib"] = max(peaks)
        for name, samples in (("raw", busy_raw), ("pipeline", busy_pipe)):
            for cpu in range(len(samples[0])):
                figures[f"cpu{cpu}_busy_{name}"] = statistics.median(b[cpu] for b in samples)

        noop = []
        for repeat in range(args.repeats):
            summary, seconds, _ = run_flow(
                site_settings(settings, site, Path(tmp) / f"noop{repeat}"), NoopDrafter(), model
            )
            assert summary.attempted == args.studies, summary.counts
            noop.append(seconds)
        figures["noop_studies_per_s"] = args.studies / statistics.median(noop)
        figures["noop_ms_per_study"] = 1000 * statistics.median(noop) / args.studies

    sizes = [int(n) for n in args.rss_sizes.split(",") if n]
    rss = {n: _probe("rss", n, args.image)["peak_mib"] for n in sizes}
    for n, mib in rss.items():
        figures[f"rss_noop_{n}_mib"] = mib
    if len(rss) > 1:
        figures["rss_growth_ratio"] = rss[max(sizes)] / rss[min(sizes)]
    ledger = _probe("ledger", args.ledger_rows, args.image)
    figures[f"noop_run_{args.ledger_rows}_rows_s"] = ledger["seconds"]
    figures[f"noop_cli_run_{args.ledger_rows}_rows_s"] = ledger["cli_seconds"]

    print(
        f"\nmodel {model.version}; {args.studies} studies ({args.image} chest CR), "
        f"{args.repeats} repeats interleaved"
    )
    for name, value in figures.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
