"""``LedgerStore.claim_jobs``: taking named jobs (a FHIR Task names its study: flows.tasks), only
when open and free, with the same stamp and version bump as ``claim_page``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.ledger import JobState, skip
from tests.unit.test_ledger_claims import LEASE_S, _expire, _register, _row, _store

pytestmark = pytest.mark.unit


def test_named_jobs_are_taken_only_when_open_and_free(tmp_path: Path) -> None:
    store = _store(tmp_path)
    free, held, done = _register(store, 3)
    skip(done, "signed-before-draft: DiagnosticReport/1 is final")
    store.save([done])
    assert [j.id for j in store.claim_page("v1", "other", limit=1, lease_s=LEASE_S)] == [free.id]
    store.release([_row(store, free)], "other")
    (held,) = [
        j for j in store.claim_page("v1", "other", limit=2, lease_s=LEASE_S) if j.id == held.id
    ]
    store.release([_row(store, free)], "other")
    ids = [j.id for j in (free, held, done) if j.id is not None]
    taken = store.claim_jobs(ids, "tasks", lease_s=LEASE_S)
    assert [j.id for j in taken] == [free.id]  # held is another live worker's, done is skipped
    (job,) = taken
    assert job.claimed_by == "tasks" and job.lease_until is not None
    assert job.version == _row(store, free).version > free.version
    assert store.claim_jobs(ids, "tasks", lease_s=LEASE_S)[0].id == free.id  # its own again
    _expire(store, [held])
    assert [j.id for j in store.claim_jobs([held.id or 0], "tasks", lease_s=LEASE_S)] == [held.id]
    assert _row(store, done).state is JobState.SKIPPED and _row(store, done).claimed_by is None
    assert store.claim_jobs([], "tasks", lease_s=LEASE_S) == []
