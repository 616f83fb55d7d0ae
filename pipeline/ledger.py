"""The job ledger: one row per (study, model version), and the state machine it follows.

    discovered → fetched → drafted → writing → written
         │          │         │         │
         ├──────────┴─────────┴─────────┴──→ skipped (a safety rule said no: never retried)
         │          │         │         │
         └──────────┴─────────┴─────────┴──→ failed ──(attempts < limit)──→ back to that stage
                                               └──(attempts ≥ limit)──→ dead_lettered

Nothing is dropped: a failure is a row with a reason, retried or dead-lettered; a skip is a row
with its reason (``signed-before-draft``, ``patient-mismatch``, ``not-reportable: …``,
``burned-in-annotation``). ``writing`` is saved before the first request to the EHR: a job
found in it (after a crash, a lost answer) may be in the EHR already, so its writer looks there
(by the draft's identifiers) before sending anything. ``written`` is terminal and is what makes a
re-run skip a study, so idempotency does not depend on the EHR.
Models and transition rules only; sessions and engines are opened by the caller (flows, via
``connectors.ledger_store``). Reasons and references never hold patient data.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


class JobState(StrEnum):
    DISCOVERED = "discovered"
    FETCHED = "fetched"
    DRAFTED = "drafted"
    WRITING = "writing"
    WRITTEN = "written"
    SKIPPED = "skipped"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"


TERMINAL = frozenset({JobState.WRITTEN, JobState.SKIPPED, JobState.DEAD_LETTERED})

_FORWARD: dict[JobState, frozenset[JobState]] = {
    JobState.DISCOVERED: frozenset({JobState.FETCHED, JobState.SKIPPED, JobState.FAILED}),
    JobState.FETCHED: frozenset({JobState.DRAFTED, JobState.SKIPPED, JobState.FAILED}),
    JobState.DRAFTED: frozenset({JobState.WRITING, JobState.SKIPPED, JobState.FAILED}),
    JobState.WRITING: frozenset({JobState.WRITTEN, JobState.SKIPPED, JobState.FAILED}),
    JobState.FAILED: frozenset(
        {
            JobState.DISCOVERED,
            JobState.FETCHED,
            JobState.DRAFTED,
            JobState.WRITING,
            JobState.DEAD_LETTERED,
        }
    ),
    JobState.WRITTEN: frozenset(),
    # An operator's explicit requeue, e.g. after fixing an order or the allow-list.
    JobState.SKIPPED: frozenset({JobState.DISCOVERED}),
    JobState.DEAD_LETTERED: frozenset({JobState.DISCOVERED}),
}


class InvalidTransitionError(ValueError):
    """A state change the machine does not allow (a bug in the caller, not a study problem)."""


def _now() -> datetime:
    return datetime.now(UTC)


class DraftJob(SQLModel, table=True):
    """One study drafted by one model version."""

    __tablename__ = "draft_job"
    __table_args__ = (
        UniqueConstraint("study_uid", "model_version", name="uq_study_model"),
        # A run's queries: counts per state (index only) and pending pages in id order.
        Index("ix_draft_job_version_state_id", "model_version", "state", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(index=True, max_length=64, description="Study Instance UID.")
    study_ref: str = Field(max_length=32, description="Non-identifying reference for logs.")
    accession_number: str | None = Field(default=None, max_length=64, index=True)
    model_version: str = Field(max_length=200, index=True)
    state: JobState = Field(default=JobState.DISCOVERED, index=True)
    failed_stage: JobState | None = Field(
        default=None, description="Stage to resume from after a failure."
    )
    attempts: int = Field(default=0, description="Failed attempts so far.")
    reason: str | None = Field(
        default=None, description="Last failure or why it was skipped, without patient data."
    )
    error_type: str | None = Field(
        default=None, max_length=100, description="Exception type of the last failure."
    )
    flags: list[str] = Field(
        default_factory=list, sa_column=Column(JSON), description="e.g. missing-ehr-context."
    )
    timings: dict[str, float] = Field(
        default_factory=dict, sa_column=Column(JSON), description="Seconds per stage."
    )
    links: dict[str, Any] = Field(
        default_factory=dict,
        sa_column=Column(JSON),
        description="FHIR references the draft points to (patient, order, imaging study).",
    )
    context_sources: list[str] = Field(
        default_factory=list,
        sa_column=Column(JSON),
        description="FHIR references whose content went into the prompt (provenance).",
    )
    draft: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON), description="The validated draft report."
    )
    output_sha256: str | None = Field(default=None, max_length=64)
    draft_id: str | None = Field(default=None, max_length=64)
    subgroups: dict[str, str] = Field(
        default_factory=dict,
        sa_column=Column(JSON),
        description="Fairness attributes captured at draft time (pipeline.subgroups).",
    )
    fhir_ids: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON), description="Resource type → ids written."
    )
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    # Claims (several workers on one ledger): a worker takes jobs by stamping its id and a
    # lease; another may take a job only once the lease has run out. ``version`` is bumped by
    # every claim and save, and a save applies only to the version it read, so a worker that
    # lost a job (lease expired, taken by another) cannot overwrite the new owner's progress.
    claimed_by: str | None = Field(
        default=None, max_length=200, description="Worker holding the job; NULL when free."
    )
    lease_until: datetime | None = Field(
        default=None, description="When the claim runs out (UTC); then any worker may take it."
    )
    version: int = Field(
        default=0,
        sa_column_kwargs={"server_default": "0"},
        description="Bumped by every claim and save (optimistic concurrency).",
    )


def advance(job: DraftJob, to: JobState, **changes: Any) -> DraftJob:
    """Move ``job`` to ``to`` (in place) if the machine allows it; set ``changes`` fields."""
    if to not in _FORWARD[job.state]:
        raise InvalidTransitionError(f"{job.study_ref}: {job.state} → {to} is not allowed")
    if job.state is JobState.FAILED and to is not JobState.DEAD_LETTERED:
        job.failed_stage = None
    job.state = to
    for name, value in changes.items():
        setattr(job, name, value)
    job.updated_at = _now()
    return job


def fail(
    job: DraftJob, reason: str, *, max_attempts: int, error_type: str | None = None
) -> DraftJob:
    """Record a failure at the job's current stage; dead-letter it once attempts run out."""
    stage = job.state
    if stage in TERMINAL or stage is JobState.FAILED:
        raise InvalidTransitionError(f"{job.study_ref}: cannot fail from {stage}")
    job.attempts += 1
    job.reason = reason[:2000]
    job.error_type = error_type
    job.failed_stage = stage
    job.state = JobState.FAILED
    job.updated_at = _now()
    if job.attempts >= max_attempts:
        job.state = JobState.DEAD_LETTERED
    return job


def skip(job: DraftJob, reason: str) -> DraftJob:
    """End the job without writing, for a safety reason; not a failure, never retried."""
    return advance(job, JobState.SKIPPED, reason=reason[:2000], error_type=None)


def count_states(jobs: Iterable[DraftJob]) -> dict[JobState, int]:
    """How many jobs are in each state (every state present, zero included)."""
    result = dict.fromkeys(JobState, 0)
    for job in jobs:
        result[job.state] += 1
    return result


def resume_stage(job: DraftJob) -> JobState | None:
    """Where a re-run picks the job up: ``None`` when there is nothing to do."""
    if job.state in TERMINAL:
        return None
    if job.state is JobState.FAILED:
        return job.failed_stage or JobState.DISCOVERED
    return job.state


class EhrDevice(SQLModel, table=True):
    """The model's Device as one EHR knows it: written once per model version, then reused."""

    __tablename__ = "ehr_device"

    ehr: str = Field(primary_key=True, max_length=200, description="Which EHR (kind:where).")
    device_key: str = Field(
        primary_key=True, max_length=400, description="The Device's identifier system|value."
    )
    reference: str = Field(max_length=100, description="Device/{id} in that EHR.")
    created_at: datetime = Field(default_factory=_now)


class DiscoveryWatermark(SQLModel, table=True):
    """Where new-study detection stopped, per image source (``ImageSource.new_studies_since``)."""

    __tablename__ = "discovery_watermark"

    source: str = Field(primary_key=True, max_length=200, description="Which image source.")
    value: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    updated_at: datetime = Field(default_factory=_now)


class SignedReportLabels(SQLModel, table=True):
    """Labels extracted from a study's signed (final) report, kept so the monitor asks once.

    Keyed by study and labeler: every model version drafted for the study is compared with the
    same signed report. Only labels and a reference are stored, not the report text.
    """

    __tablename__ = "signed_report_labels"

    study_uid: str = Field(primary_key=True, max_length=64, description="Study Instance UID.")
    labeler: str = Field(primary_key=True, max_length=64, description="Labeler name/version.")
    report_ref: str = Field(max_length=200, description="DiagnosticReport/{id} that was read.")
    status: str = Field(max_length=20, description="Its status then (final/amended/corrected).")
    labels: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON), description="Finding → presence mentioned."
    )
    fetched_at: datetime = Field(default_factory=_now)


class FairnessRun(SQLModel, table=True):
    """A fairness report written to the EHR, so a re-run for the same window writes nothing new.

    ``key`` is the MeasureReport's stable identifier value (window and scope).
    """

    __tablename__ = "fairness_run"

    key: str = Field(primary_key=True, max_length=64, description="MeasureReport identifier.")
    since: datetime
    until: datetime
    scope: str = Field(max_length=200, description="Model version, or all versions.")
    measure_report_id: str = Field(max_length=64, description="Id the EHR gave it.")
    alerts: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=_now)
