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
