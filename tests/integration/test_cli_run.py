"""`medvlm run` end to end as an operator runs it: its own process, settings from the
environment, folder PACS, NDJSON EHR, the model served by a local Ray Serve it starts itself.

The model service starts on the first study that needs a draft (in a worker thread of the run)
and not at all when nothing is left to draft; then no Prefect flow run starts either.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port, processes_of_run
from tests.integration.folder_site import build_folder_site, folder_site_env

pytestmark = pytest.mark.integration

DAY = dt.date(2026, 11, 3)


def test_medvlm_run_drafts_with_a_model_it_starts_on_demand_and_none_when_idle(
    tmp_path: Path, tiny_model_dir: Path, prefect_api: None
) -> None:
    from prefect.settings import PREFECT_API_URL

    build_folder_site(tmp_path, 2, DAY, prefix="CLI")
    run_id = uuid.uuid4().hex
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "MEDVLM_HOME": str(tmp_path / "home"),
        "MEDVLM_MODEL__SOURCE": str(tiny_model_dir),
        "MEDVLM_MODEL__ALLOW_RANDOM_WEIGHTS": "true",  # the project's test model
        **folder_site_env(tmp_path),
        "MEDVLM_JOB__LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "MEDVLM_SERVING__PORT": str(free_port()),  # beside the session's own Serve
        "COLUMNS": "200",
        "MEDVLM_TEST_RUN_ID": run_id,  # inherited by every process of the run
    }
    medvlm = str(Path(sys.executable).parent / "medvlm")
    args = [medvlm, "run", "--since", DAY.isoformat(), "--until", DAY.isoformat()]

    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-4000:]
    # Everything the run started ends with it: Ray, and the vLLM engine core the Serve replica
    # spawned (it outlived Ray's shutdown once, orphaned, holding ~1 GiB).
    assert processes_of_run(run_id) == [], output[-4000:]
    assert "Started a local Ray instance" in output
    assert "2 studies in" in output  # the run's rate line
    assert "for flow 'draft-reports'" in output  # a Prefect flow run
    lines = (tmp_path / "ehr" / "DiagnosticReport.ndjson").read_text().splitlines()
    assert sum('"preliminary"' in line for line in lines) == 2

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-4000:]
    assert "Started a local Ray instance" not in output  # nothing to draft: no model started
    assert "studies in" not in output and "written" in output
    assert "for flow 'draft-reports'" not in output  # nothing pending: no flow run either
