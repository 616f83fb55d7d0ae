"""The ledger at the size of a long-lived site: behaviour on 100,000 written rows.

What a run asks of a big ledger (counts, pending pages, registering) must give the right
answers there; how fast is measured by the benchmarks (bench/), not asserted here. (About 3 s,
most of it registering the rows: many of the insert's multi-row statements.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from connectors.ledger_store import LedgerStore, NewStudy, open_engine
from pipeline.ledger import JobState, advance

pytestmark = pytest.mark.unit

ROWS = 100_000


def test_a_run_over_a_big_written_ledger_finds_only_the_new_studies(tmp_path: Path) -> None:
    store = LedgerStore(open_engine(f"sqlite:///{tmp_path / 'ledger.db'}"))
    studies = [NewStudy(f"1.2.826.{i}", f"study-{i:06d}", f"ACC-{i}") for i in range(ROWS)]
    assert store.register(studies, "v1") == ROWS  # more rows than one statement can carry
    with store._engine.begin() as connection:  # every one of them drafted and written long ago
        connection.execute(text("UPDATE draft_job SET state = 'WRITTEN'"))

    assert store.pending("v1") == []
    assert list(store.pending_pages("v1", page_size=500)) == []
    assert store.counts("v1") == {**dict.fromkeys(JobState, 0), JobState.WRITTEN: ROWS}

    tonight = [NewStudy(f"1.2.827.{i}", f"study-new-{i}", None) for i in range(3)]
    assert store.register(studies[-1000:] + tonight, "v1") == 3
    pages = list(store.pending_pages("v1", page_size=2))
    assert [[j.study_uid for j in page] for page in pages] == [
        ["1.2.827.0", "1.2.827.1"],
        ["1.2.827.2"],
    ]
    first, second = pages[0]
    advance(first, JobState.FETCHED)
    store.save([first])
    counts = store.counts("v1")
    assert (counts[JobState.WRITTEN], counts[JobState.DISCOVERED], counts[JobState.FETCHED]) == (
        ROWS,
        2,
        1,
    )
    assert [j.id for j in store.pending("v1")] == [first.id, second.id, pages[1][0].id]
