"""Write-back that stays idempotent on any EHR: real FHIR server, real Orthanc, the real model.

A loopback proxy in front of the real FHIR server (tests/integration/loopback.py) takes away
what many EHRs do not offer — conditional create, transactions — and loses the answer of a write
the server has committed (a gateway timing out): faults the real server cannot be made to
produce on demand. In each write mode a run and its re-runs leave exactly one draft per order,
one Device per model version (whose version string carries FHIR search syntax), and a
Provenance that lists every resource the prompt used.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.draft_writer import WriteStrategy, choose_strategy
from medvlm.dev.servers import OrthancInfo
from pipeline.fhir_resources import written_types
from pipeline.ledger import JobState
from serving.clients import HandleDrafter
from tests.integration.test_write_safety import Site, WatchingDrafter, open_site
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    """A site whose model version needs escaping in every search (``&``, ``|``, ``,``)."""
    with open_site(
        orthanc, fhir_base_url, tmp_path, version=lambda prefix: f"a&b|c,d-{prefix}"
    ) as opened:
        yield opened


@pytest.fixture
def drafter(serve_handle: Any) -> WatchingDrafter:
    return WatchingDrafter(HandleDrafter(serve_handle))


def _get(site: Site, path: str, **params: str) -> list[dict[str, Any]]:
    """Every resource of a search on the real server (not through the proxy)."""
    with httpx.Client(base_url=site.fhir_base_url, timeout=30, trust_env=False) as client:
        bundle = client.get(path, params={**params, "_count": "500"}).json()
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") != "outcome"
    ]


def _devices(site: Site) -> list[dict[str, Any]]:
    escaped = site.version.replace("|", "\\|").replace(",", "\\,")
    return _get(site, "/Device", identifier=f"{site.draft_system}:device|tiny-qwen2-vl\\|{escaped}")


def _drafts_per_order(site: Site, rtype: str = "DiagnosticReport") -> dict[str, int]:
    """Preliminary drafts of this site's model version on each of its orders."""
    counts: dict[str, int] = {}
    for job in site_jobs(site):
        order = job.links.get("service_request")
        assert order, job.study_ref
        if rtype == "DiagnosticReport":
            found = _get(site, "/DiagnosticReport", **{"based-on": order, "status": "preliminary"})
        else:
            found = [
                d
                for d in _get(site, "/DocumentReference", patient=job.links["patient"])
                if {"reference": order} in d.get("context", {}).get("related", [])
            ]
        counts[order] = sum(
            any(i.get("value") == job.draft_id for i in r.get("identifier", [])) for r in found
        )
    return counts


def site_jobs(site: Site) -> list[Any]:
    from connectors.ledger_store import LedgerStore, open_engine

    return LedgerStore(open_engine(site.ledger_url)).jobs(site.version)


def _lose(site: Site, mode: WriteStrategy) -> None:
    """One committed write whose answer is lost: the transaction, or a create of the draft's
    (not the Device's, which is written once and looked up the same way)."""
    site.proxy.lose_answers = 1
    if mode is WriteStrategy.TRANSACTION:
        site.proxy.lose_where = lambda path: path.rstrip("/") == "/fhir"
    else:
        site.proxy.lose_where = lambda path: not path.startswith("/fhir/Device")


@pytest.mark.parametrize("mode", list(WriteStrategy)[1:], ids=str)
def test_a_lost_answer_on_a_server_without_conditional_create_leaves_one_draft_per_order(
    site: Site, drafter: WatchingDrafter, mode: WriteStrategy
) -> None:
    studies = [site.add() for _ in range(2)]
    site.run(drafter, dry_run=True)  # drafted once; the writes below are what is under test
    site.proxy.ignore_if_none_exist = True  # the server creates twins when asked twice
    site.proxy.reject_transactions = mode is not WriteStrategy.TRANSACTION
    _lose(site, mode)
    # One attempt per run: the study whose answer was lost stays `writing`-failed ...
    first = site.run(drafter, write_strategy=mode.value, write_attempts=1)
    assert site.proxy.lost and first.counts["written"] == 1 and first.counts["failed"] == 1
    (failed,) = [site.job(s) for s in studies if site.job(s).state is JobState.FAILED]
    assert failed.failed_stage is JobState.WRITING and failed.attempts == 1
    # ... and the next run looks before it sends: a transaction was all there (nothing is
    # sent); of one-by-one creates the rest is sent, and its own lost answer looked up in-run.
    _lose(site, mode)
    writes_before = len(site.proxy.writes)
    second = site.run(drafter, write_strategy=mode.value)
    assert second.counts["written"] == 2 and not second.failures
    if mode is WriteStrategy.TRANSACTION:
        assert len(site.proxy.lost) == 1 and len(site.proxy.writes) == writes_before
    else:
        assert len(site.proxy.lost) == 2
    third = site.run(drafter, write_strategy=mode.value)
    assert third.attempted == 0
    assert set(_drafts_per_order(site).values()) == {1}
    for job in site_jobs(site):
        assert len(_get(site, "/Observation", _tag=f"{site.draft_system}|{job.draft_id}")) == len(
            job.draft["findings"]
        )
        assert len(_get(site, "/Provenance", _tag=f"{site.draft_system}|{job.draft_id}")) == 1
    (device,) = _devices(site)
    assert device["version"] == [{"value": site.version}]  # `a&b|c,d-…` round-trips
    if mode is not WriteStrategy.TRANSACTION:
        assert ("POST", "/fhir") not in site.proxy.writes


def test_eight_concurrent_first_writes_of_a_new_model_version_make_one_device(
    site: Site, drafter: WatchingDrafter
) -> None:
    for _ in range(8):
        site.add()
    site.run(drafter, dry_run=True, page_size=8, concurrency=4)
    summary = site.run(drafter, write_concurrency=8, page_size=8)  # eight writes start at once
    assert summary.counts["written"] == 8
    (device,) = _devices(site)
    assert device["type"]["coding"][0]["code"] == "Artificial-Intelligence"
    assert set(_drafts_per_order(site).values()) == {1} and len(_drafts_per_order(site)) == 8
    for job in site_jobs(site):
        (report,) = _get(
            site, "/DiagnosticReport", identifier=f"{site.draft_system}|{job.draft_id}"
        )
        assert all(
            o["device"]["reference"] == f"Device/{device['id']}"
            for o in _get(site, "/Observation", _tag=f"{site.draft_system}|{job.draft_id}")
        )
        assert report["status"] == "preliminary"


def test_the_provenance_of_a_draft_lists_every_resource_the_prompt_used(
    site: Site, drafter: WatchingDrafter
) -> None:
    study = site.add(earlier_prior=True)
    site.run(drafter)
    job = site.job(study)
    assert job.state is JobState.WRITTEN
    (report_id,) = job.fhir_ids["DiagnosticReport"]
    (provenance,) = _get(site, "/Provenance", target=f"DiagnosticReport/{report_id}")
    entities = {e["what"].get("reference") for e in provenance["entity"]}
    used = set(job.context_sources) | {job.links["service_request"], job.links["imaging_study"]}
    assert any(s.startswith("Condition/") for s in job.context_sources)
    assert any(s.startswith("DiagnosticReport/") for s in job.context_sources)
    assert used <= entities
    assert provenance["agent"][0]["who"]["reference"].startswith("Device/")
    assert provenance["reason"][0]["coding"][0]["code"] == "AIAST"


@pytest.mark.parametrize("mode", list(WriteStrategy)[1:], ids=str)
def test_a_note_draft_is_found_by_the_us_core_clinical_note_search(
    site: Site, drafter: WatchingDrafter, mode: WriteStrategy
) -> None:
    study = site.add()
    site.proxy.ignore_if_none_exist = mode is WriteStrategy.SEARCH
    site.proxy.reject_transactions = mode is not WriteStrategy.TRANSACTION
    site.run(drafter, write_target="document_reference", write_strategy=mode.value)
    site.run(drafter, write_target="document_reference", write_strategy=mode.value)
    job = site.job(study)
    assert job.state is JobState.WRITTEN
    notes = _get(site, "/DocumentReference", patient=job.links["patient"], category="clinical-note")
    assert [n["docStatus"] for n in notes] == ["preliminary"]
    (provenance,) = _get(site, "/Provenance", target=f"DocumentReference/{notes[0]['id']}")
    assert provenance["agent"][0]["who"]["reference"] == f"Device/{_devices(site)[0]['id']}"


def test_auto_reads_what_the_server_offers_from_its_capability_statement(site: Site) -> None:
    def chosen() -> WriteStrategy:
        with site.ehr(site.proxy.base_url) as ehr:
            return choose_strategy("auto", ehr.capabilities(), written_types("diagnostic_report"))

    assert chosen() is WriteStrategy.TRANSACTION  # the real server offers both
    site.proxy.reject_transactions = True
    assert chosen() is WriteStrategy.CONDITIONAL
    site.proxy.ignore_if_none_exist = True
    assert chosen() is WriteStrategy.SEARCH


# A short retry budget and probe interval, so that outages of seconds show what hours would.
QUICK_EHR = {"retry_budget_s": 2.0, "retry_initial_backoff_s": 0.2, "probe_interval_s": 0.5}


def _record_ehr_outage(site: Site, scenario: str, faults: str, started: float) -> None:
    per_order = _drafts_per_order(site)
    drafted_once = sum(n == 1 for n in per_order.values())
    record(
        Figures(
            scenario=scenario,
            faults=faults,
            studies=len(per_order),
            drafted_once=drafted_once,
            lost=len(per_order) - drafted_once - sum(n > 1 for n in per_order.values()),
            duplicated=sum(n > 1 for n in per_order.values()),
            seconds=round(time.monotonic() - started, 1),
            extra={"refused_in_outage": site.proxy.refused_in_outage},
        )
    )


@pytest.mark.reliability
def test_an_ehr_outage_mid_run_is_waited_out_and_costs_no_attempt(
    site: Site, drafter: WatchingDrafter
) -> None:
    for _ in range(4):
        site.add()
    site.run(drafter, dry_run=True)
    site.proxy.outage(6.0)  # from the first write on: every request answers 503 for 6 s
    started = time.monotonic()
    summary = site.run(drafter, ehr_settings=QUICK_EHR, outage_wait_s=60)
    assert site.proxy.refused_in_outage > 0
    assert summary.counts["written"] == 4 and not summary.failures
    assert all(job.attempts == 0 for job in site_jobs(site))
    assert set(_drafts_per_order(site).values()) == {1}
    # The breaker held the calls: a few probes per second of outage, not a storm of retries.
    assert site.proxy.refused_in_outage < 60
    _record_ehr_outage(
        site, "ehr-outage-6s", "the EHR answers 503 for 6 s from the first write (proxy)", started
    )


@pytest.mark.reliability
def test_an_ehr_outage_longer_than_the_wait_leaves_the_studies_pending_for_the_next_run(
    site: Site, drafter: WatchingDrafter
) -> None:
    for _ in range(3):
        site.add()
    site.run(drafter, dry_run=True)
    site.proxy.outage(3600.0)
    started = time.monotonic()
    first = site.run(drafter, ehr_settings=QUICK_EHR, outage_wait_s=2)
    assert first.tally is not None and first.tally.outage is not None
    assert (
        "EHR http://127.0.0.1:" in first.tally.outage and "is down (HTTP 503)" in first.tally.outage
    )
    assert not first.failures and first.counts["written"] == 0
    assert all(job.attempts == 0 and job.state is not JobState.FAILED for job in site_jobs(site))
    site.proxy.outage(0.0, on_first_post=False)  # the EHR is back
    second = site.run(drafter, ehr_settings=QUICK_EHR)
    assert second.counts["written"] == 3 and not second.failures
    assert set(_drafts_per_order(site).values()) == {1}
    _record_ehr_outage(
        site,
        "ehr-outage-past-wait",
        "the EHR answers 503 past the run's outage wait (run ends early, exit 4), then run again",
        started,
    )
