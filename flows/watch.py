"""Event-driven drafting: studies drafted within minutes of becoming stable in the PACS.

    every ``watch.interval_s`` (one pass):
      detect: the source's new studies since the watcher's position (``new_studies_since``:
        Orthanc's ``/changes`` StableStudy feed where configured, else QIDO-RS); from QIDO a
        study is stable once its instance count stayed the same for ``watch.stable_age_s``
      → the ``watch.modalities`` filter → registered in the ledger (one row per study and model
        version, as ``discover`` does; a study already written is not drafted again)
      → the position saved (after registration: a crash between the two registers again, which
        costs nothing)
      → the studies waiting (this pass's and any earlier one's not ended) in priority order: a
        STAT/ASAP order (``ServiceRequest.priority``, ``watch.urgent_priorities``) first, each
        tier claimed in the ledger (``LedgerStore.claim_jobs``) and run through the main
        pipeline (``flows.draft_reports.run_pending``) before the next tier starts
      → each written study's latency from "seen stable" to "draft in the EHR" saved in its
        ledger timings (``stable_to_ehr_s``) and logged by ``study-…`` reference

The watcher's state is one row of the ledger's watermark table (``watch:{source}``): the
detection position, the QIDO studies still settling, and the studies seen stable and not yet
ended with the instant they were seen stable. A restart resumes from it: nothing detected is
lost and latencies stay measured from the first sighting. The first pass of a watcher without
saved state only records where the PACS is: studies stable before the watcher first started are
the batch job's (``medvlm run --new``).

``stop`` (set by SIGTERM/SIGINT in ``medvlm watch``) is looked at between tiers and passes: the
studies in the pipeline are finished, and any not started stay registered and waiting, their
claims released, for the next start or the batch job. Logs name studies by ``study-…``
references only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.ledger_store import NewStudy
from connectors.pacs import StudyQuery, StudyRef, Watermark
from flows.draft_reports import RunTally, Services, run_pending
from medvlm.errors import LeaseLostError, MedvlmError
from medvlm.settings import WatchSettings
from pipeline.imaging import study_reference
from pipeline.ledger import TERMINAL, DraftJob, JobState

log = logging.getLogger("medvlm.flows.watch")

#: The ledger timing a written study's latency is saved under (seconds).
LATENCY_TIMING = "stable_to_ehr_s"


def state_source(services: Services) -> str:
    """Names the watcher's state in the ledger's watermark table (per image source)."""
    return f"watch:{services.source_name}"[:200]


@dataclass
class WatchState:
    """What the watcher keeps between passes and restarts (JSON in the watermark table).

    ``settling``: QIDO studies not yet stable, UID → (instance count, since when unchanged);
    ``waiting``: studies seen stable and not yet ended, UID → when they were first seen stable.
    """

    detection: Watermark
    settling: dict[str, tuple[int | None, dt.datetime]] = field(default_factory=dict)
    waiting: dict[str, dt.datetime] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "detection": self.detection.to_dict(),
            "settling": {u: [n, at.isoformat()] for u, (n, at) in self.settling.items()},
            "waiting": {u: at.isoformat() for u, at in self.waiting.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WatchState:
        return cls(
            Watermark.from_dict(data.get("detection") or {}),
            {
                str(u): (None if n is None else int(n), dt.datetime.fromisoformat(at))
                for u, (n, at) in (data.get("settling") or {}).items()
            },
            {
                str(u): dt.datetime.fromisoformat(at)
                for u, at in (data.get("waiting") or {}).items()
            },
        )


@dataclass
class PassResult:
    """One pass: studies seen stable, registered, written (with their latency), and the rest."""

    stable: int = 0
    registered: int = 0
    already_ended: int = 0  # seen stable again, but the ledger had ended them (not drafted)
    written: list[tuple[str, float]] = field(default_factory=list)  # (study ref, latency s)
    ended_otherwise: list[tuple[str, str]] = field(default_factory=list)  # (study ref, state)
    left_waiting: int = 0
    order: list[str] = field(default_factory=list)  # study refs in the order they were run
    runs: list[RunTally] = field(default_factory=list)


@dataclass
class WatchSummary:
    """Every pass of one watcher: the written studies' latencies, counted and summarized."""

    passes: int = 0
    latencies: list[tuple[str, float]] = field(default_factory=list)

    def add(self, result: PassResult) -> None:
        self.passes += 1
        self.latencies += result.written

    def line(self) -> str:
        seconds = [s for _, s in self.latencies]
        passes = f"{self.passes} pass{'' if self.passes == 1 else 'es'}"
        if not seconds:
            return f"watch: {passes}, no study drafted"
        return (
            f"watch: {passes}, {len(seconds)} studies drafted; stable→EHR latency "
            f"median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s"
        )


Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Watcher:
    """The watch loop over one ``Services``; ``stable_on_detection``: the source reports only
    stable studies (Orthanc's change feed), else QIDO studies settle for ``stable_age_s``."""

    def __init__(
        self,
        services: Services,
        settings: WatchSettings,
        *,
        stable_on_detection: bool,
        clock: Clock = _utcnow,
    ) -> None:
        self.services = services
        self.settings = settings
        self.stable_on_detection = stable_on_detection
        self.clock = clock
        self.summary = WatchSummary()
        self._modalities = frozenset(m.upper() for m in settings.modalities)
        self._urgent = frozenset(p.lower() for p in settings.urgent_priorities)
        self._written_at: dict[int, dt.datetime] = {}
        outer = services.on_progress

        def on_progress(job: DraftJob) -> None:
            if job.state is JobState.WRITTEN and job.id is not None:
                self._written_at[job.id] = self.clock()
            if outer is not None:
                outer(job)

        services.on_progress = on_progress

    # -- state ----------------------------------------------------------------------------

    def _load(self) -> WatchState | None:
        saved = self.services.ledger.watermark(state_source(self.services))
        return WatchState.from_dict(saved) if saved is not None else None

    def _save(self, state: WatchState) -> None:
        self.services.ledger.save_watermark(state_source(self.services), state.to_dict())

    # -- detection ------------------------------------------------------------------------

    def _wanted(self, study: StudyRef) -> bool:
        return not self._modalities or bool(self._modalities & study.modalities)

    def _settle(
        self, state: WatchState, found: Sequence[StudyRef], now: dt.datetime
    ) -> list[StudyRef]:
        """QIDO: the studies whose instance count stayed unchanged for ``stable_age_s``."""
        for study in found:
            state.settling.setdefault(study.study_uid, (study.number_of_instances, now))
        stable: list[StudyRef] = []
        age = dt.timedelta(seconds=self.settings.stable_age_s)
        for uid, (count, since) in list(state.settling.items()):
            query = StudyQuery(study_uid=uid, limit=1)
            current = next(iter(self.services.source.find_studies(query)), None)
            if current is None:  # deleted meanwhile
                del state.settling[uid]
            elif current.number_of_instances != count:
                state.settling[uid] = (current.number_of_instances, now)
            elif now - since >= age:
                del state.settling[uid]
                stable.append(current)
        return stable

    def _baseline(self, now: dt.datetime) -> Watermark:
        """Where the PACS is now: the change feed's last position (one request), else the QIDO
        window from yesterday (the local StudyDate may trail UTC) with its studies marked seen.
        Never the whole PACS: that is the main job's first run."""
        source = self.services.source
        last_seq = getattr(getattr(source, "change_feed", None), "last_seq", None)
        if callable(last_seq):
            return Watermark(change_seq=int(last_seq()))
        start = Watermark.starting((now - dt.timedelta(days=1)).date())
        return source.new_studies_since(start)[1]

    def detect(self, state: WatchState | None) -> tuple[WatchState, PassResult]:
        """New stable studies registered in the ledger and added to ``waiting``; the state
        saved after registration."""
        services, result, now = self.services, PassResult(), self.clock()
        if state is None:
            state = WatchState(self._baseline(now))
            self._save(state)
            log.info("watch: first pass; from now on new stable studies are drafted")
            return state, result
        found, mark = services.source.new_studies_since(state.detection)
        wanted = [study for study in found if self._wanted(study)]
        stable = wanted if self.stable_on_detection else self._settle(state, wanted, now)
        new = list({s.study_uid: s for s in stable if s.study_uid not in state.waiting}.values())
        result.stable = len(new)
        if new:
            result.registered = services.ledger.register(
                [
                    NewStudy(s.study_uid, study_reference(s.study_uid), s.accession_number)
                    for s in new
                ],
                services.model.version,
            )
            for study in new:
                state.waiting[study.study_uid] = now
                log.info("%s: stable; drafting", study_reference(study.study_uid))
        state.detection = mark
        self._save(state)
        return state, result

    # -- drafting -------------------------------------------------------------------------

    def _due(self, job: DraftJob) -> bool:
        """A failed study is tried again ``retry_after_s`` × its failed attempts after its
        last failure (the ledger's wall clock), not at every pass."""
        if job.state is not JobState.FAILED or not job.attempts:
            return True
        last = job.updated_at if job.updated_at.tzinfo else job.updated_at.replace(tzinfo=dt.UTC)
        wait = dt.timedelta(seconds=self.settings.retry_after_s * job.attempts)
        return dt.datetime.now(dt.UTC) - last >= wait

    def _urgent_job(self, job: DraftJob) -> bool:
        """Whether the study's order is STAT/ASAP (its ServiceRequest, found by accession as
        the pipeline finds it); an order not found or an EHR error: routine."""
        if not self._urgent or not job.accession_number:
            return False
        try:
            order = self.services.ehr.find_service_request(job.accession_number)
        except MedvlmError as exc:
            log.warning("%s: order priority not read (%s); routine", job.study_ref, exc)
            return False
        priority = getattr(order, "priority", None) if order is not None else None
        return priority is not None and str(priority).lower() in self._urgent

    def _run_tier(
        self, jobs: list[DraftJob], result: PassResult, stop: threading.Event | None
    ) -> list[DraftJob]:
        """Claim the tier's jobs and run them in order; once ``stop`` is set no further job
        enters the pipeline (those in it are finished), and the claims not ended are released."""
        services = self.services
        worker, lease_s = services.job.worker_id, services.job.lease_s
        taken = services.ledger.claim_jobs(
            [j.id for j in jobs if j.id is not None], worker, lease_s=lease_s
        )
        order = {job.id: i for i, job in enumerate(jobs)}
        taken.sort(key=lambda job: order.get(job.id, 0))
        open_jobs = [job for job in taken if job.state not in TERMINAL]
        try:
            if open_jobs:
                # One job a page: run_pending reads the next page as a place frees up, so a
                # stop is seen before each study enters the pipeline.
                def pages() -> Iterator[list[DraftJob]]:
                    for job in open_jobs:
                        if stop is not None and stop.is_set():
                            return
                        result.order.append(job.study_ref)
                        yield [job]

                result.runs.append(asyncio.run(run_pending(services, pages())))
        finally:
            services.ledger.release([job for job in taken if job.state not in TERMINAL], worker)
        return taken

    def _record(self, job: DraftJob, stable_at: dt.datetime, result: PassResult) -> None:
        """A written study's latency: saved in its ledger timings and logged."""
        written_at = self._written_at.pop(job.id, None) if job.id is not None else None
        latency = ((written_at or self.clock()) - stable_at).total_seconds()
        job.timings = {**(job.timings or {}), LATENCY_TIMING: round(latency, 3)}
        with contextlib.suppress(LeaseLostError):  # changed by another worker: its record stands
            self.services.ledger.save([job])
        result.written.append((job.study_ref, latency))
        log.info("%s: draft in the EHR, %.1f s after it was seen stable", job.study_ref, latency)

    def draft_waiting(
        self, state: WatchState, result: PassResult, stop: threading.Event | None = None
    ) -> None:
        """Run the waiting studies, urgent tier first; ended ones leave ``waiting``."""
        services = self.services
        if not state.waiting:
            return
        jobs = services.ledger.jobs(services.model.version, list(state.waiting))
        known = {job.study_uid for job in jobs}
        for uid in [uid for uid in state.waiting if uid not in known]:  # deleted from the ledger
            del state.waiting[uid]
        for job in jobs:
            if job.state in TERMINAL:
                result.already_ended += 1
                del state.waiting[job.study_uid]
        jobs = sorted(
            (job for job in jobs if job.state not in TERMINAL and self._due(job)),
            key=lambda job: state.waiting[job.study_uid],
        )
        urgent = [job for job in jobs if self._urgent_job(job)]
        routine = [job for job in jobs if job not in urgent]
        for tier in (urgent, routine):
            if not tier:
                continue
            if stop is not None and stop.is_set():
                break
            for job in self._run_tier(tier, result, stop):
                if job.state not in TERMINAL:
                    continue
                stable_at = state.waiting.pop(job.study_uid)
                if job.state is JobState.WRITTEN:
                    self._record(job, stable_at, result)
                else:
                    result.ended_otherwise.append((job.study_ref, job.state.value))
            self._save(state)
        result.left_waiting = len(state.waiting)

    def one_pass(self, stop: threading.Event | None = None) -> PassResult:
        state, result = self.detect(self._load())
        self.draft_waiting(state, result, stop)
        self.summary.add(result)
        return result

    def run(
        self,
        stop: threading.Event,
        *,
        once: bool = False,
        on_pass: Callable[[PassResult], None] | None = None,
    ) -> WatchSummary:
        """Passes every ``interval_s`` until ``stop`` is set (or one, ``once``); ``on_pass``
        sees each pass's result. A PACS, EHR or ledger error of a pass is logged and the next
        pass tries again (``once``: raised)."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                result = self.one_pass(stop)
                if on_pass is not None:
                    on_pass(result)
            except MedvlmError as exc:
                if once:
                    raise
                log.error("watch: pass failed (%s); trying again next pass", exc)
            if once:
                break
            stop.wait(max(0.0, self.settings.interval_s - (time.monotonic() - started)))
        log.info("%s", self.summary.line())
        return self.summary
