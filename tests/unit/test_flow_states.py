"""The main flow's state machine, fast: folder PACS, NDJSON EHR, SQLite ledger, scripted drafter.

Every ledger transition the flow makes, resume from each stage, dead-lettering, the safety skips
and the per-study error boundary, in milliseconds per study. The drafter is
``tests.flow_doubles.ScriptedDrafter`` (the same ``Drafter`` protocol as the real backends);
everything else is the product's own code on real files. The real end-to-end tests with vLLM,
Orthanc and the FHIR server are in tests/integration/test_draft_flow.py.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from connectors.dicom_folder import DicomFolderSource
from connectors.ledger_store import LedgerStore, open_engine
from connectors.ndjson import NdjsonEhr
from connectors.pacs import StudyQuery
from flows.draft_reports import (
    FLAG_BURNED_IN,
    RunSummary,
    Services,
    run_draft_job,
)
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM, ehr_bundle
from medvlm.dev.synthetic_dicom import make_study
from medvlm.errors import LedgerUnavailableError
from medvlm.settings import JobSettings
from pipeline.fhir_resources import ModelIdentity
from pipeline.imaging import study_reference
from pipeline.ledger import DraftJob, JobState
from pipeline.prompts import context_text
from tests.flow_doubles import Outcome, ProcessKilled, ScriptedDrafter

pytestmark = pytest.mark.unit

STUDY_DATE = dt.date(2026, 11, 2)
VERSION = "scripted-1"
DRAFT_SYSTEM = "urn:medvlm-test:draft"


class RecordingLedger(LedgerStore):
    """The product's ledger, also noting each state a job is saved in (consecutive repeats once)."""

    def __init__(self, url: str) -> None:
        super().__init__(open_engine(url))
        self.states: dict[str, list[str]] = defaultdict(list)

    def save(self, jobs: Iterable[DraftJob]) -> None:
        jobs = list(jobs)
        super().save(jobs)
        for job in jobs:
            seen = self.states[job.study_uid]
            if not seen or seen[-1] != job.state.value:
                seen.append(job.state.value)


@dataclass
class Case:
    study_uid: str
    accession: str
    mrn: str

    @property
    def ref(self) -> str:
        return study_reference(self.study_uid)


@dataclass
class World:
    root: Path
    cases: list[Case] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ehr = NdjsonEhr(self.root / "ehr", accession_system=ACCESSION_SYSTEM)
        self.ledger = RecordingLedger(f"sqlite:///{self.root / 'ledger.db'}")

    def store(self, datasets: list[Dataset]) -> None:
        for ds in datasets:
            path = self.root / "dicom" / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)

    def add(
        self,
        *,
        modality: str = "CR",
        with_order: bool = True,
        image_patient_id: str | None = None,
        change: Callable[[Dataset], None] | None = None,
        extra: Callable[[Case], list[dict[str, Any]]] | None = None,
    ) -> Case:
        """A study in the PACS folder and its patient, order, condition, prior in the EHR."""
        i = len(self.cases)
        mrn, accession = f"SYN-T-{i:04d}", f"ACC-T-{i:03d}"
        datasets = make_study(
            modality,  # type: ignore[arg-type]
            seed=i,
            accession=accession,
            patient_id=image_patient_id or mrn,
            study_date=STUDY_DATE,
            instances_per_series=2 if modality == "CT" else None,
        )
        for ds in datasets:
            if change is not None:
                change(ds)
        case = Case(str(datasets[0].StudyInstanceUID), accession, mrn)
        bundle = ehr_bundle(
            mrn=mrn,
            accession=accession,
            study_uid=case.study_uid,
            modality=modality,
            reason="Shortness of breath",
            condition="Heart failure",
            prior_impression=f"Prior impression of case {i}.",
            sex="female",
            birth_date="1960-01-01",
            with_order=with_order,
        )
        self.ehr.transaction(Bundle.model_validate(bundle))
        for resource in extra(case) if extra is not None else []:
            self.ehr.conditional_create(resource_model(resource), identifier_of(resource))
        self.store(datasets)
        self.cases.append(case)
        return case

    def services(self, drafter: ScriptedDrafter, **job: Any) -> Services:
        return Services(
            source=DicomFolderSource(self.root / "dicom"),
            ehr=self.ehr,
            drafter=drafter,
            ledger=self.ledger,
            model=ModelIdentity("scripted", VERSION),
            job=JobSettings.model_validate(
                {
                    "max_attempts": 2,
                    "page_size": 2,
                    "concurrency": 2,
                    "identifier_system": DRAFT_SYSTEM,
                    **job,
                }
            ),
            max_images=2,
            patient_identifier_system=MRN_SYSTEM,
            accession_system=ACCESSION_SYSTEM,
            site_timezone=ZoneInfo("Europe/Berlin"),
        )

    def run(self, drafter: ScriptedDrafter, *, dry_run: bool = False, **job: Any) -> RunSummary:
        query = StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE)
        return run_draft_job(self.services(drafter, **job), query, dry_run)

    def job(self, case: Case) -> DraftJob:
        (job,) = self.ledger.jobs(VERSION, [case.study_uid])
        return job

    def drafts(self, rtype: str = "DiagnosticReport") -> list[dict[str, Any]]:
        """What the pipeline wrote into the EHR folder (resources with its identifier system)."""
        path = self.root / "ehr" / f"{rtype}.ndjson"
        lines = path.read_text().splitlines() if path.exists() else []
        found = [json.loads(line) for line in lines if line.strip()]
        return [
            r
            for r in found
            if any(t.get("system") == DRAFT_SYSTEM for t in (r.get("meta") or {}).get("tag", []))
        ]


def resource_model(data: dict[str, Any]) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(data["resourceType"]).model_validate(data)


def identifier_of(data: dict[str, Any]) -> Any:
    from fhir.resources.R4B.identifier import Identifier

    return Identifier.model_validate(data["identifier"][0])


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def scripted(world: World, outcomes: dict[int, Outcome]) -> ScriptedDrafter:
    return ScriptedDrafter({world.cases[i].ref: outcome for i, outcome in outcomes.items()})


# -- the happy path and idempotency ----------------------------------------------------------


def test_every_study_goes_discovered_fetched_drafted_written(world: World) -> None:
    for modality in ("CR", "CT", "US"):
        world.add(modality=modality)
    drafter = ScriptedDrafter()
    summary = world.run(drafter)
    assert summary.discovered == summary.attempted == 3
    assert summary.counts["written"] == 3 and not summary.failures and not summary.skipped
    for case in world.cases:
        assert world.ledger.states[case.study_uid] == ["fetched", "drafted", "writing", "written"]
        job = world.job(case)
        assert set(job.timings) >= {"fetch_s", "draft_s", "write_s"}
        assert job.context_sources  # the order, its condition and the prior were used
    assert sorted(drafter.calls) == sorted(c.ref for c in world.cases)
    reports = world.drafts()
    assert len(reports) == 3 and {r["status"] for r in reports} == {"preliminary"}


def test_a_rerun_drafts_nothing_and_writes_nothing_new(world: World) -> None:
    world.add()
    world.add()
    world.run(ScriptedDrafter())
    written = world.drafts()
    again = ScriptedDrafter()
    summary = world.run(again)
    assert summary.attempted == 0 and again.calls == []
    assert world.drafts() == written


# -- failures, retries, dead letters ---------------------------------------------------------


def test_invalid_json_fails_at_the_draft_stage_then_is_retried_then_dead_lettered(
    world: World,
) -> None:
    bad, good = world.add(), world.add()
    drafter = scripted(world, {0: "invalid-json"})
    first = world.run(drafter)
    job = world.job(bad)
    assert job.state is JobState.FAILED and job.failed_stage is JobState.FETCHED
    assert job.attempts == 1 and job.error_type == "InvalidModelOutputError"
    assert job.reason is not None and "not a valid report" in job.reason
    assert world.job(good).state is JobState.WRITTEN
    assert first.failures == [(bad.ref, job.reason)]

    second = world.run(drafter)  # retried from its failed stage, fails again: out of attempts
    assert second.attempted == 1
    assert world.job(bad).state is JobState.DEAD_LETTERED and world.job(bad).attempts == 2
    assert world.ledger.states[bad.study_uid] == [
        "fetched",
        "failed",
        "fetched",
        "dead_lettered",
    ]
    calls = len(drafter.calls)
    third = world.run(drafter)
    assert third.attempted == 0 and len(drafter.calls) == calls
    assert third.counts["dead_lettered"] == 1 and third.counts["written"] == 1
    assert len(world.drafts()) == 1


def test_a_failed_study_that_succeeds_on_retry_is_written_once(world: World) -> None:
    case = world.add()
    world.run(scripted(world, {0: "invalid-json"}))
    summary = world.run(ScriptedDrafter())
    assert summary.counts["written"] == 1
    job = world.job(case)
    assert job.state is JobState.WRITTEN and job.attempts == 1 and job.error_type is None
    assert world.ledger.states[case.study_uid][-4:] == ["fetched", "drafted", "writing", "written"]


def test_output_cut_at_max_tokens_is_a_failure_never_a_partial_report(world: World) -> None:
    case = world.add()
    world.run(scripted(world, {0: "cut"}))
    job = world.job(case)
    assert job.state is JobState.FAILED and job.reason is not None
    assert "cut at max_tokens" in job.reason and job.draft is None
    assert world.drafts() == []


def test_a_draft_that_never_comes_times_out_and_the_run_goes_on(world: World) -> None:
    slow, fine = world.add(), world.add()
    world.run(scripted(world, {0: "timeout"}), draft_timeout_s=0.5)
    job = world.job(slow)
    assert job.state is JobState.FAILED and job.error_type == "EngineUnavailableError"
    assert job.reason is not None and "no draft within 0.5 s" in job.reason
    assert job.timings["draft_s"] >= 0.5  # timings so far are kept
    assert world.job(fine).state is JobState.WRITTEN


def test_an_unexpected_exception_fails_one_study_with_its_type_and_the_run_goes_on(
    world: World,
) -> None:
    for _ in range(5):
        world.add()
    summary = world.run(scripted(world, {2: "crash"}), page_size=5, concurrency=5)
    assert summary.counts["written"] == 4 and summary.counts["failed"] == 1
    job = world.job(world.cases[2])
    assert job.error_type == "KeyError" and job.attempts == 1
    reason = job.reason or ""
    assert reason.startswith(f"{job.study_ref}: unexpected KeyError at the fetched stage")
    assert "\n" not in reason and "\x1b" not in reason and "Traceback" not in reason
    assert "flow_doubles.py" in reason  # where it was raised, not what it said
    assert {"fetch_s", "draft_s"} <= set(job.timings)


def test_a_failure_before_the_first_state_change_is_recorded_on_the_study(
    world: World,
) -> None:
    def truncated(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[:64]  # an archive file cut short

    broken, good = world.add(change=truncated), world.add()
    summary = world.run(ScriptedDrafter())
    job = world.job(broken)
    assert job.state is JobState.FAILED and job.failed_stage is JobState.DISCOVERED
    assert job.attempts == 1 and job.error_type is not None
    assert job.reason is not None and job.reason.startswith(broken.ref)
    assert world.job(good).state is JobState.WRITTEN
    assert summary.counts["failed"] == 1 and summary.counts["written"] == 1


def test_a_failure_at_the_write_resumes_at_the_write_without_drafting_again(
    world: World,
) -> None:
    case = world.add()
    observations = world.root / "ehr" / "Observation.ndjson"
    observations.mkdir()  # a real fault: the EHR folder cannot take the Observations file
    drafter = ScriptedDrafter()
    world.run(drafter)
    job = world.job(case)
    assert job.state is JobState.FAILED and job.failed_stage is JobState.WRITING
    assert job.error_type == "IsADirectoryError" and "write_s" in job.timings
    observations.rmdir()
    world.run(drafter)
    assert world.job(case).state is JobState.WRITTEN
    assert drafter.calls == [case.ref]  # drafted once, written on the second run
    # Resumed at its failed stage (writing: the EHR is searched first) and written.
    assert world.ledger.states[case.study_uid] == [
        "fetched",
        "drafted",
        "writing",
        "failed",
        "written",
    ]
    assert len(world.drafts()) == 1 and len(world.drafts("Provenance")) == 1


# -- resume from each stage --------------------------------------------------------------------


def test_a_killed_run_resumes_a_fetched_study_by_fetching_and_drafting_it(world: World) -> None:
    case = world.add()
    with pytest.raises(ProcessKilled):
        world.run(scripted(world, {0: "killed"}), page_size=1, concurrency=1)
    assert world.job(case).state is JobState.FETCHED
    drafter = ScriptedDrafter()
    world.run(drafter)
    assert world.job(case).state is JobState.WRITTEN and drafter.calls == [case.ref]
    assert world.ledger.states[case.study_uid] == ["fetched", "drafted", "writing", "written"]


def test_a_drafted_study_is_written_on_resume_without_drafting_again(world: World) -> None:
    case = world.add()
    drafter = ScriptedDrafter()
    dry = world.run(drafter, dry_run=True)
    assert dry.counts["drafted"] == 1 and world.drafts() == []
    world.run(drafter)
    assert world.job(case).state is JobState.WRITTEN and drafter.calls == [case.ref]


# -- the ledger itself failing stops the run -------------------------------------------------


def test_a_failing_ledger_stops_the_run_instead_of_blaming_a_study(world: World) -> None:
    world.add()
    world.add()

    class LedgerVanishes(ScriptedDrafter):
        async def draft(self, model_input: Any) -> Any:
            # A real fault: the ledger database is gone (deleted, volume lost) mid-run.
            world.ledger._engine.dispose()
            (world.root / "ledger.db").unlink()
            return await super().draft(model_input)

    with pytest.raises(LedgerUnavailableError, match="job ledger"):
        world.run(LedgerVanishes(), page_size=1, concurrency=1)


# -- safety: what is never drafted or never written ------------------------------------------


def _segmentation(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.Modality = "SEG"


def test_a_study_with_nothing_reportable_is_skipped_before_any_pixel_is_decoded(
    world: World,
) -> None:
    seg = world.add(change=_segmentation)
    drafter = ScriptedDrafter()
    summary = world.run(drafter)
    job = world.job(seg)
    assert job.state is JobState.SKIPPED and job.attempts == 0
    assert job.reason == "not-reportable: Segmentation Storage (SEG) ×1"
    assert drafter.calls == [] and world.drafts() == []
    assert summary.skipped == [(seg.ref, job.reason)] and not summary.failures
    assert world.ledger.states[seg.study_uid] == ["skipped"]
    assert world.run(drafter).attempted == 0  # skipped is final: never retried


def _radiology_report(case: Case, key: str, when: str, conclusion: str) -> dict[str, Any]:
    """A signed radiology report of the case's patient (subject fixed by the tests as needed)."""
    return {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": f"urn:test:{key}", "value": f"{case.accession}-{key}"}],
        "status": "final",
        "category": [{"coding": [{"system": "http://loinc.org", "code": "LP29684-5"}]}],
        "code": {"text": key},
        "subject": {"reference": "Patient/unknown"},
        "effectiveDateTime": when,
        "conclusion": conclusion,
    }


def _signed_report(case: Case) -> dict[str, Any]:
    return _radiology_report(
        case, "signed", "2026-11-02T12:00:00+01:00", "THE RADIOLOGIST'S SIGNED ANSWER."
    )


def test_a_study_whose_order_is_already_signed_gets_no_draft(world: World) -> None:
    case = world.add()
    order = json.loads((world.root / "ehr" / "ServiceRequest.ndjson").read_text().splitlines()[0])
    signed = _signed_report(case) | {"basedOn": [{"reference": f"ServiceRequest/{order['id']}"}]}
    world.ehr.conditional_create(resource_model(signed), identifier_of(signed))
    drafter = ScriptedDrafter()
    world.run(drafter)
    job = world.job(case)
    assert job.state is JobState.SKIPPED
    assert job.reason is not None and job.reason.startswith("signed-before-draft: ")
    # Never drafted at all: the model never saw this study, let alone the signed answer.
    assert drafter.calls == [] and drafter.inputs == {}
    assert world.drafts() == [] and world.drafts("Observation") == []


def test_an_order_signed_between_drafting_and_writing_gets_no_draft(world: World) -> None:
    case = world.add()
    world.run(ScriptedDrafter(), dry_run=True)
    assert world.job(case).state is JobState.DRAFTED
    order = json.loads((world.root / "ehr" / "ServiceRequest.ndjson").read_text().splitlines()[0])
    signed = _signed_report(case) | {"basedOn": [{"reference": f"ServiceRequest/{order['id']}"}]}
    world.ehr.conditional_create(resource_model(signed), identifier_of(signed))
    world.run(ScriptedDrafter())
    job = world.job(case)
    assert job.state is JobState.SKIPPED and (job.reason or "").startswith("signed-before-draft")
    assert world.drafts() == [] and world.drafts("Provenance") == []
    assert world.ledger.states[case.study_uid] == ["fetched", "drafted", "writing", "skipped"]


def test_images_of_another_patient_never_get_a_draft_on_this_order(world: World) -> None:
    case = world.add(image_patient_id="SYN-SOMEONE-ELSE")
    drafter = ScriptedDrafter()
    world.run(drafter)
    job = world.job(case)
    assert job.state is JobState.SKIPPED
    assert job.reason == "patient-mismatch: PatientID matches no Patient.identifier"
    assert "SYN-" not in (job.reason or "")  # no MRN in the reason
    assert world.drafts() == []


def test_burned_in_annotation_is_flagged_or_skipped_as_configured(world: World) -> None:
    def burned(ds: Dataset) -> None:
        ds.BurnedInAnnotation = "YES"

    case = world.add(modality="US", change=burned)
    world.run(ScriptedDrafter(), dry_run=True)
    assert FLAG_BURNED_IN in world.job(case).flags
    other = World(world.root / "strict")
    strict_case = other.add(modality="US", change=burned)
    other.run(ScriptedDrafter(), skip_burned_in_annotation=True)
    job = other.job(strict_case)
    assert job.state is JobState.SKIPPED and job.reason == "burned-in-annotation"


# -- clinical time and what the model is shown -------------------------------------------------


def test_legacy_study_time_with_a_utc_offset_is_read_as_the_right_instant(world: World) -> None:
    def legacy(ds: Dataset) -> None:
        with warnings.catch_warnings():  # pydicom warns on writing it; old modalities did
            warnings.simplefilter("ignore", UserWarning)
            ds.StudyTime = "10:15:00"
        ds.TimezoneOffsetFromUTC = "+0100"

    case = world.add(change=legacy)
    later = world.add()  # local Europe/Berlin time without an offset: 10:15 CET
    world.run(ScriptedDrafter())
    effective = {r["identifier"][0]["value"]: r["effectiveDateTime"] for r in world.drafts()}
    assert effective[world.job(case).draft_id] == "2026-11-02T10:15:00+01:00"
    assert effective[world.job(later).draft_id] == "2026-11-02T10:15:00+01:00"


def test_a_study_without_a_date_has_no_effective_time_and_is_flagged(world: World) -> None:
    def undated(ds: Dataset) -> None:
        ds.StudyDate = ""

    # Undated studies cannot be found by a date query: discover them by accession.
    case = world.add(change=undated)
    services = world.services(ScriptedDrafter())
    summary = run_draft_job(services, StudyQuery(accession_number=case.accession))
    (report,) = world.drafts()
    assert "effectiveDateTime" not in report and "issued" in report
    assert summary.flags == {"no-study-time": 1}


def test_the_prompt_shows_priors_from_before_the_study_only(world: World) -> None:
    def later_ct(case: Case) -> list[dict[str, Any]]:
        return [_radiology_report(case, "later", "2026-12-24T09:00:00Z", "A LATER CT FINDING.")]

    case = world.add(extra=later_ct)
    drafter = ScriptedDrafter()
    world.run(drafter)
    text = context_text(drafter.inputs[case.ref].context)
    assert "Prior impression of case 0." in text  # the 2023 radiology report
    assert "A LATER CT FINDING" not in text
    sources = world.job(case).context_sources
    assert any(s.startswith("DiagnosticReport/") for s in sources)
    assert any(s.startswith("ServiceRequest/") for s in sources)


# -- the pipeline: every stage bounded, stages overlapping, the model started on demand ------


class GatedDrafter(ScriptedDrafter):
    """Holds every draft until ``release`` studies are at the model at once (or a timeout),
    recording how many were there together at most."""

    def __init__(self, release: int) -> None:
        super().__init__()
        self.release = release
        self.at_model = 0
        self.most = 0
        self._full: Any = None

    async def draft(self, model_input: Any) -> Any:
        import asyncio

        if self._full is None:
            self._full = asyncio.Event()
        self.at_model += 1
        self.most = max(self.most, self.at_model)
        if self.at_model >= self.release:
            self._full.set()
        try:
            await asyncio.wait_for(self._full.wait(), timeout=10)
            return await super().draft(model_input)
        finally:
            self.at_model -= 1


def test_the_run_keeps_the_model_service_full_but_never_over_its_capacity(world: World) -> None:
    for _ in range(7):
        world.add()
    drafter = GatedDrafter(release=3)
    services = world.services(drafter, concurrency=None)
    services.model_capacity = 3  # e.g. 3 replicas x max_ongoing_requests 1
    summary = run_draft_job(services, StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE))
    assert summary.counts["written"] == 7
    # All three slots were used together (the gate opens only then), and never a fourth.
    assert drafter.most == 3
    assert summary.tally is not None and summary.tally.model_mean_in_flight > 0


def test_an_explicit_concurrency_overrides_the_model_capacity(world: World) -> None:
    for _ in range(4):
        world.add()
    drafter = GatedDrafter(release=2)
    services = world.services(drafter, concurrency=2)
    services.model_capacity = 64
    run_draft_job(services, StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE))
    assert drafter.most == 2


def test_studies_are_fetched_and_written_while_the_model_is_busy(world: World) -> None:
    """The model never waits for I/O: with one slot at the model, the first draft is held
    until the other study has been fetched, and the second draft until the first study has
    been written."""
    import asyncio
    import time

    first, second = world.add(), world.add()

    by_ref = {first.ref: first, second.ref: second}

    class Watching(ScriptedDrafter):
        async def draft(self, model_input: Any) -> Any:
            if not self.calls:  # the first at the model: the other study is fetched meanwhile
                (other,) = (c for ref, c in by_ref.items() if ref != model_input.reference)
                state = JobState.FETCHED
            else:  # the second: the first was written meanwhile
                other, state = by_ref[self.calls[0]], JobState.WRITTEN
            deadline = time.monotonic() + 10
            while world.ledger.states[other.study_uid][-1:] != [state.value]:
                assert time.monotonic() < deadline, f"{other.ref} not {state} while drafting"
                await asyncio.sleep(0.01)
            return await super().draft(model_input)

    summary = world.run(Watching(), concurrency=1, fetch_concurrency=2, write_concurrency=1)
    assert summary.counts["written"] == 2


def test_concurrent_stage_changes_share_ledger_commits(world: World) -> None:
    for _ in range(8):
        world.add()
    commits: list[int] = []
    save = world.ledger.save

    def counting(jobs: Iterable[DraftJob]) -> None:
        jobs = list(jobs)
        commits.append(len(jobs))
        save(jobs)

    world.ledger.save = counting  # type: ignore[method-assign]
    summary = world.run(ScriptedDrafter(), concurrency=8, fetch_concurrency=8)
    assert summary.counts["written"] == 8
    # 8 studies x 4 saves (fetched, drafted, writing, written) in fewer commits than saves.
    assert sum(commits) == 32 and len(commits) < 32


def test_a_run_with_nothing_to_draft_starts_no_model(world: World) -> None:
    from serving.clients import LazyDrafter

    world.add()
    world.run(ScriptedDrafter())  # everything written
    starts: list[int] = []

    def start() -> ScriptedDrafter:
        starts.append(1)
        return ScriptedDrafter()

    summary = world.run(LazyDrafter(start))  # type: ignore[arg-type]
    assert starts == [] and summary.attempted == 0 and summary.counts["written"] == 1


def test_a_model_service_that_does_not_start_stops_the_run_and_blames_no_study(
    world: World,
) -> None:
    from medvlm.errors import EngineUnavailableError, ModelServiceStartError
    from serving.clients import LazyDrafter

    cases = [world.add() for _ in range(3)]
    starts: list[int] = []

    def start() -> ScriptedDrafter:
        starts.append(1)
        raise EngineUnavailableError("Ray Serve did not start its HTTP proxy")

    with pytest.raises(ModelServiceStartError, match="did not start its HTTP proxy"):
        world.run(LazyDrafter(start), concurrency=3)  # type: ignore[arg-type]
    assert starts == [1]  # tried once, not once per study
    for case in cases:
        job = world.job(case)
        assert job.attempts == 0 and job.state in (JobState.DISCOVERED, JobState.FETCHED)
    drafter = ScriptedDrafter()
    assert world.run(drafter).counts["written"] == 3  # the next run takes them up


def test_the_summary_lists_this_runs_failures_and_counts_the_whole_ledger(world: World) -> None:
    bad, good = world.add(), world.add()
    world.run(scripted(world, {0: "invalid-json"}), max_attempts=1)
    assert world.job(bad).state is JobState.DEAD_LETTERED
    later = world.add()
    summary = world.run(ScriptedDrafter(), max_attempts=1)
    assert summary.attempted == 1 and summary.failures == []  # the dead letter is not re-listed
    assert summary.counts["dead_lettered"] == 1 and summary.counts["written"] == 2
    assert world.job(later).state is JobState.WRITTEN and world.job(good).state is JobState.WRITTEN


def test_model_capacity_is_every_replicas_max_ongoing_requests() -> None:
    from flows.services import model_capacity
    from medvlm.settings import MedvlmSettings

    settings = MedvlmSettings.model_validate(
        {"serving": {"num_replicas": 3, "max_ongoing_requests": 8}}
    )
    assert model_capacity(settings) == 24
    openai = settings.model_copy(
        update={"job": settings.job.model_copy(update={"model_endpoint": "openai"})}
    )
    assert model_capacity(openai) == 8


def test_with_autoscaling_the_model_capacity_counts_max_replicas() -> None:
    from flows.services import model_capacity
    from medvlm.settings import MedvlmSettings

    settings = MedvlmSettings.model_validate(
        {"serving": {"min_replicas": 1, "max_replicas": 4, "max_ongoing_requests": 8}}
    )
    # The queue beyond the running replicas is the load that makes Serve add replicas.
    assert model_capacity(settings) == 32


def test_images_made_in_a_process_pool_are_the_images_made_in_the_fetch_thread(
    world: World,
) -> None:
    from flows.draft_reports import Skip, fetch

    cases = [world.add(modality="CT"), world.add(modality="US"), world.add()]
    drafter = ScriptedDrafter()
    services = world.services(drafter)
    services.image_processes = 2
    summary = run_draft_job(services, StudyQuery(date_from=STUDY_DATE, date_to=STUDY_DATE))
    assert summary.counts["written"] == 3
    for case in cases:
        in_thread = fetch(world.services(ScriptedDrafter()), world.job(case))
        assert not isinstance(in_thread, Skip)
        assert drafter.inputs[case.ref].images_png == in_thread.model_input.images_png


def test_image_processes_default_to_none_beside_a_local_model_else_one_per_cpu() -> None:
    import os

    from flows.services import image_processes
    from medvlm.settings import MedvlmSettings

    local = MedvlmSettings()
    remote = MedvlmSettings.model_validate(
        {"job": {"model_endpoint": "http", "model_url": "http://model:8000"}}
    )
    assert image_processes(local) == 0
    assert image_processes(remote) == len(os.sched_getaffinity(0))
    pinned = remote.model_copy(update={"job": remote.job.model_copy(update={"image_processes": 3})})
    assert image_processes(pinned) == 3
