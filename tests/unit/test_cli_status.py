"""``medvlm status``: the ledger's recent jobs by study reference, state, reason and seconds per
stage, filtered by study or state; never an accession number."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from connectors.ledger_store import LedgerStore, NewStudy, open_engine
from medvlm.cli import app
from pipeline.imaging import study_reference
from pipeline.ledger import JobState, advance, skip

pytestmark = pytest.mark.unit

ACCESSION = "ACC-STATUS-SECRET"


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LedgerStore:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("MEDVLM_JOB__LEDGER_URL", url)
    monkeypatch.setenv("COLUMNS", "250")
    store = LedgerStore(open_engine(url))
    uids = ["1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"]
    store.register([NewStudy(u, study_reference(u), ACCESSION) for u in uids], "v-status")
    written, skipped, _ = store.jobs("v-status")
    advance(written, JobState.FETCHED, timings={"fetch_s": 0.25})
    advance(written, JobState.DRAFTED, timings={"fetch_s": 0.25, "draft_s": 1.5})
    skip(skipped, "signed-before-draft: DiagnosticReport/9 is final")
    store.save([written, skipped])
    return store


def test_status_lists_recent_jobs_without_identifiers(ledger: LedgerStore) -> None:
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    for job in ledger.jobs("v-status"):
        assert job.study_ref in result.output
    assert "signed-before-draft: DiagnosticReport/9 is final" in result.output
    assert "fetch 0.25, draft 1.50" in result.output and "drafted" in result.output
    assert ACCESSION not in result.output and "1.2.826.0.1" not in result.output


def test_status_filters_by_study_and_state(ledger: LedgerStore) -> None:
    written, skipped, discovered = ledger.jobs("v-status")
    by_ref = CliRunner().invoke(app, ["status", "--study", skipped.study_ref])
    assert by_ref.exit_code == 0 and skipped.study_ref in by_ref.output
    assert written.study_ref not in by_ref.output
    by_uid = CliRunner().invoke(app, ["status", "--study", discovered.study_uid])
    assert discovered.study_ref in by_uid.output and skipped.study_ref not in by_uid.output
    drafted = CliRunner().invoke(app, ["status", "--state", "drafted"])
    assert written.study_ref in drafted.output and discovered.study_ref not in drafted.output
    wrong = CliRunner().invoke(app, ["status", "--state", "done"])
    assert wrong.exit_code == 2 and "not a job state" in wrong.output
