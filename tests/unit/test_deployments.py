from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from flows.deployments import NIGHTLY_CRON, deployments, window_query

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_nightly_runs_on_cron_and_on_demand_has_no_schedule() -> None:
    nightly, on_demand = deployments("Europe/Berlin")
    assert nightly.name == "nightly" and on_demand.name == "on-demand"
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert nightly.parameters == {"days_back": 1}
    assert not on_demand.schedules


def test_deployment_parameters_are_plain_values_the_ui_can_set() -> None:
    (nightly, _) = deployments()
    properties = nightly._parameter_openapi_schema.properties
    assert set(properties) == {
        "days_back",
        "modalities",
        "model_endpoint",
        "dry_run",
        "since_watermark",
    }


def test_window_covers_days_back_through_today() -> None:
    query = window_query(2, ["CT"], dt.date(2026, 11, 30))
    assert (query.date_from, query.date_to) == (dt.date(2026, 11, 28), dt.date(2026, 11, 30))
    assert query.modalities == frozenset({"CT"})


def test_prefect_yaml_declares_the_same_deployments() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {d.name for d in deployments()}
    assert by_name["nightly"]["schedules"][0]["cron"] == NIGHTLY_CRON
    for d in by_name.values():
        module, _, name = d["entrypoint"].partition(":")
        assert (ROOT / module).is_file() and name == "scheduled_draft_reports"
