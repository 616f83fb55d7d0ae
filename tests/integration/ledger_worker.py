"""One drafting worker in its own process, for tests/integration/test_ledger_workers.py.

    python -m tests.integration.ledger_worker '{"ledger_url": ..., "root": ..., ...}'

Runs the product's ``draft_pending`` against a folder PACS, a folder EHR and a shared ledger
with the scripted drafter, again and again (a scheduled worker) until no job is left open or
the deadline passes; it starts once the file ``go`` exists. Appends
``worker<TAB>study_ref<TAB>event`` lines to ``record``: ``draft`` when it asks the drafter,
then the state the job ended in. ``kill_after``: after that many drafts the process SIGKILLs
itself, holding the claims of the studies it has in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from connectors.dicom_folder import DicomFolderSource
from connectors.ledger_store import LedgerStore, open_engine
from connectors.ndjson import NdjsonEhr
from flows.draft_reports import Services, draft_pending
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM
from medvlm.settings import JobSettings
from pipeline.fhir_resources import ModelIdentity
from pipeline.ledger import TERMINAL, DraftJob, JobState
from tests.flow_doubles import ScriptedDrafter
from tests.unit.test_flow_states import DRAFT_SYSTEM, VERSION


class RecordingDrafter(ScriptedDrafter):
    def __init__(self, record: Path, worker: str, kill_after: int | None) -> None:
        super().__init__()
        self._record, self._worker, self._kill_after = record, worker, kill_after

    def note(self, reference: str, event: str) -> None:
        with self._record.open("a") as handle:  # one short line per write: appends stay whole
            handle.write(f"{self._worker}\t{reference}\t{event}\n")

    async def draft(self, model_input: Any) -> Any:
        self.note(model_input.reference, "draft")
        if self._kill_after is not None and len(self.calls) + 1 >= self._kill_after:
            await asyncio.sleep(0.2)  # the other studies in flight are claimed by now
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(0.01)  # a model takes a while: studies overlap between workers
        return await super().draft(model_input)


def main(args: dict[str, Any]) -> None:
    root = Path(args["root"])
    worker = args["worker"]
    ledger = LedgerStore(open_engine(args["ledger_url"]))
    drafter = RecordingDrafter(Path(args["record"]), worker, args.get("kill_after"))

    def finished(job: DraftJob) -> None:
        drafter.note(job.study_ref, job.state.value)

    services = Services(
        source=DicomFolderSource(root / "dicom"),
        ehr=NdjsonEhr(root / "ehr", accession_system=ACCESSION_SYSTEM),
        drafter=drafter,
        ledger=ledger,
        model=ModelIdentity("scripted", VERSION),
        job=JobSettings.model_validate(
            {
                "worker_id": worker,
                "lease_s": args["lease_s"],
                "page_size": 4,
                "concurrency": 2,
                "identifier_system": DRAFT_SYSTEM,
            }
        ),
        max_images=1,
        patient_identifier_system=MRN_SYSTEM,
        accession_system=ACCESSION_SYSTEM,
        site_timezone=ZoneInfo("Europe/Berlin"),
        on_progress=finished,
    )
    # Imports done, ledger open: all workers start claiming together.
    Path(args["go"]).with_name(f"ready-{worker}").touch()
    deadline = time.monotonic() + args["deadline_s"]
    while not Path(args["go"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    while time.monotonic() < deadline:
        draft_pending(services)
        counts = ledger.counts(VERSION)
        if not sum(n for state, n in counts.items() if state not in TERMINAL):
            return
        time.sleep(0.5)  # what is left is held by other workers (or leased by a dead one)
    sys.exit(f"{worker}: jobs still open at the deadline: {counts[JobState.DISCOVERED]}")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
