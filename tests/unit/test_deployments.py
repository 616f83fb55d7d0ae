from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from prefect.deployments.runner import RunnerDeployment
from prefect.utilities.callables import parameter_schema_from_entrypoint

from flows.deployments import (
    FAIRNESS_CRON,
    NIGHTLY_CRON,
    WATCH_CRON,
    deployments,
    fairness_window,
    window_query,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def parameter_names(deployment: RunnerDeployment) -> set[str]:
    """The parameters Prefect offers for the deployment's entrypoint flow (as ``prefect deploy``
    derives them from prefect.yaml)."""
    assert deployment.entrypoint is not None
    schema = parameter_schema_from_entrypoint(str(ROOT / deployment.entrypoint))
    return set(schema.properties)


def test_nightly_runs_on_cron_and_on_demand_has_no_schedule() -> None:
    nightly, on_demand, *_ = deployments("Europe/Berlin")
    assert nightly.name == "nightly" and on_demand.name == "on-demand"
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == NIGHTLY_CRON
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert nightly.parameters == {"days_back": 1}
    assert not on_demand.schedules


def test_deployment_parameters_are_plain_values_the_ui_can_set() -> None:
    (nightly, *_) = deployments()
    assert parameter_names(nightly) == {
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
    assert by_name["fairness-daily"]["schedules"][0]["cron"] == FAIRNESS_CRON
    for d in by_name.values():
        module, _, name = d["entrypoint"].partition(":")
        assert (ROOT / module).is_file()
        expected = {
            "fairness-daily": "scheduled_fairness_monitor",
            "watch-pass": "scheduled_watch_pass",
        }
        assert name == expected.get(d["name"], "scheduled_draft_reports")


def test_fairness_monitor_runs_daily_over_the_configured_window() -> None:
    _, _, fairness, _ = deployments()
    assert fairness.name == "fairness-daily"
    (schedule,) = fairness.schedules
    assert schedule.schedule.cron == FAIRNESS_CRON
    assert parameter_names(fairness) == {"window_days", "model_version"}
    since, until = fairness_window(30, dt.datetime(2026, 11, 30, 6, 0, 41, tzinfo=dt.UTC))
    assert until == dt.datetime(2026, 11, 30, 6, tzinfo=dt.UTC)
    assert since == dt.datetime(2026, 10, 31, 6, tzinfo=dt.UTC)


def test_prefect_records_the_run_query_without_patient_identifiers(tmp_path: Path) -> None:
    """What Prefect stores as the flow run's parameters (its own ``serialize_parameters``)
    holds the window and hashes, never the accession number, the patient id or the services."""
    from connectors.ehr import identifier_ref
    from connectors.pacs import StudyQuery
    from flows.deployments import FlowArgument, _draft_reports_flow, query_argument

    query = StudyQuery(
        date_from=dt.date(2026, 11, 1),
        date_to=dt.date(2026, 11, 2),
        modalities=frozenset({"CR"}),
        accession_number="ACC-Zoë-778899",
        patient_id="MRN-4455667",
    )
    services = FlowArgument(value=object(), summary={"model_version": "v1"})
    stored = _draft_reports_flow.serialize_parameters(
        {"services": services, "query": query_argument(query), "dry_run": False}
    )
    text = str(stored)
    assert "ACC-Zoë-778899" not in text and "MRN-4455667" not in text
    assert stored["query"] == {
        "summary": {
            "date_from": "2026-11-01",
            "date_to": "2026-11-02",
            "modalities": ["CR"],
            "accession": identifier_ref("ACC-Zoë-778899"),
            "patient": identifier_ref("MRN-4455667"),
        }
    }
    assert stored["services"] == {"summary": {"model_version": "v1"}}
    # Without the wrapper Prefect would have stored the query as it is.
    raw = _draft_reports_flow.serialize_parameters({"query": query})
    assert "MRN-4455667" in str(raw)


def test_a_watch_pass_runs_every_minute_without_parameters() -> None:
    *_, watch = deployments()
    assert watch.name == "watch-pass"
    (schedule,) = watch.schedules
    assert schedule.schedule.cron == WATCH_CRON
    assert parameter_names(watch) == set()
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (declared,) = [d for d in spec["deployments"] if d["name"] == "watch-pass"]
    assert declared["schedules"][0]["cron"] == WATCH_CRON
