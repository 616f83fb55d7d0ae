"""The ledger's disk fills up mid-run — for real, on a small tmpfs — and nothing is lost.

The flow (folder PACS, NDJSON EHR, a scripted model: tests/unit/test_flow_states.py's World)
with its SQLite ledger on a 4 MiB tmpfs that is then filled to the last byte. The run must stop
with one clear message (the ledger's disk is full), write nothing to the EHR it could not
record, and the next run, once space is free, must finish the batch with every draft once.
Needs root to mount the tmpfs (the suite runs as root in CI); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from medvlm.errors import LedgerUnavailableError
from pipeline.ledger import JobState
from tests.flow_doubles import ScriptedDrafter
from tests.reliability_figures import Figures, record
from tests.unit.test_flow_states import RecordingLedger, World

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write to a filler file until the filesystem refuses another byte (unbuffered)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def test_a_full_ledger_disk_stops_the_run_cleanly_and_the_next_run_finishes(
    tmp_path: Path, small_disk: Path
) -> None:
    started = time.monotonic()
    world = World(tmp_path / "site")
    world.ledger = RecordingLedger(f"sqlite:///{small_disk / 'ledger.db'}")
    for _ in range(6):
        world.add()
    world.run(ScriptedDrafter(), dry_run=True)  # drafted: the ledger holds the six drafts
    filler = _fill(small_disk)
    with pytest.raises(LedgerUnavailableError, match="its disk is full") as stopped:
        world.run(ScriptedDrafter())
    assert "free space, then run again" in str(stopped.value)
    # Nothing the ledger could not record reached the EHR, and the ledger is whole.
    assert world.drafts() == []
    assert {world.job(case).state for case in world.cases} == {JobState.DRAFTED}
    filler.unlink()
    summary = world.run(ScriptedDrafter())
    assert summary.counts["written"] == 6 and not summary.failures
    assert len(world.drafts()) == 6 and len(world.drafts("Provenance")) == 6
    per_order = Counter(ref["reference"] for d in world.drafts() for ref in d["basedOn"])
    drafted_once = sum(n == 1 for n in per_order.values())
    record(
        Figures(
            scenario="ledger-disk-full",
            faults="the SQLite ledger's 4 MiB tmpfs filled to the last byte before the writes",
            studies=len(world.cases),
            drafted_once=drafted_once,
            lost=len(world.cases) - len(per_order),
            duplicated=sum(n > 1 for n in per_order.values()),
            seconds=round(time.monotonic() - started, 1),
            extra={"counted": "drafts in the NDJSON EHR (scripted model)"},
        )
    )
