from __future__ import annotations

import pytest

from medvlm.telemetry import OPT_OUTS, disable_third_party_telemetry

pytestmark = pytest.mark.unit


def test_opt_outs_are_set_but_an_operator_choice_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPT_OUTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "operator-value")
    disable_third_party_telemetry()
    import os

    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["DO_NOT_TRACK"] == "operator-value"


def test_every_command_waits_long_enough_for_prefects_temporary_server() -> None:
    """Prefect reads its settings when imported, so the longer start-up timeout must be in the
    environment before any command imports it (``medvlm fairness`` imports the flow first; the
    20 s default once failed a run on a loaded machine)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_EPHEMERAL")}
    code = (
        "import medvlm.cli, flows.fairness\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as t\n"
        "print(t.value())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "180"
