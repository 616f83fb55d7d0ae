"""FHIR write-back: the three write strategies side by side, on the same kind of drafts.

Each of N drafts (a DiagnosticReport, its Observations and the Provenance, exactly what the
flow writes: ``pipeline.fhir_resources.build_draft_resources``, the model's Device written once
beforehand) goes to the dev FHIR server (started for the benchmark and stopped after it) through
the flow's own writer (``connectors.draft_writer.DraftWriter``) with each strategy:

  transaction  one ``transaction`` Bundle of conditional creates;
  conditional  one conditional create (``If-None-Exist``) per resource, references rewritten;
  search       a search for each resource's key, then a plain create (EHRs with neither),

with ``--concurrency`` drafts at once over the project's one pooled keep-alive client
(``connectors.fhir.build_http_client``). The strategies alternate ``--repeats`` times, each on
new drafts. Prints the figures last, ``name: value``: ``<strategy>_drafts_per_s``,
``<strategy>_requests_per_draft`` and ``<strategy>_vs_transaction``.

    .venv/bin/python bench/bench_fhir_writes.py [--drafts 64] [--concurrency 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORT = {
    "rationale": "Benchmark draft.",
    "findings": [
        {
            "name": name,
            "presence": "absent",
            "laterality": "not_applicable",
            "location": "chest",
            "severity": "not_applicable",
            "detail": f"No {name.replace('_', ' ')}.",
        }
        for name in ("cardiomegaly", "pleural_effusion", "pneumothorax")
    ],
    "impression": "No acute abnormality.",
    "critical": False,
    "recommendation": "none",
}


def _drafts(client: Any, base: str, count: int, run: str, device: str) -> list[Any]:
    """``count`` drafts, each on its own (new) Patient."""
    from pipeline.fhir_resources import ModelIdentity, StudyLinks, build_draft_resources
    from pipeline.report import DraftReport

    report = DraftReport.model_validate(REPORT)
    model = ModelIdentity(name="bench-model", version="bench-1")
    drafts = []
    for i in range(count):
        patient = client.post(
            f"{base}/Patient",
            content=json.dumps({"resourceType": "Patient", "active": True}),
            headers={"Content-Type": "application/fhir+json"},
        )
        patient.raise_for_status()
        patient_id = patient.json()["id"]
        links = StudyLinks(accession_number=f"B{run[:6]}{i:05d}", patient=f"Patient/{patient_id}")
        drafts.append(
            build_draft_resources(
                report, links, model, device=device, issued=dt.datetime.now(dt.UTC)
            )
        )
    return drafts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--drafts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from connectors.draft_writer import DraftWriter, WriteStrategy
    from connectors.fhir import FhirEhr, build_http_client
    from medvlm.dev.servers import DevServers, dev_settings_from
    from medvlm.settings import MedvlmSettings
    from pipeline.fhir_resources import ModelIdentity, build_device, device_key

    settings = MedvlmSettings()
    servers = DevServers(dev_settings_from(settings))
    servers.up()
    ehr_settings = settings.ehr.model_copy(
        update={"kind": "fhir", "base_url": servers.fhir.base_url}
    )
    client = build_http_client(ehr_settings)
    sent = [0]
    client.event_hooks["request"].append(lambda _request: sent.__setitem__(0, sent[0] + 1))
    ehr = FhirEhr(client, ehr_settings)
    base = servers.fhir.base_url
    strategies = [WriteStrategy.TRANSACTION, WriteStrategy.CONDITIONAL, WriteStrategy.SEARCH]
    rates: dict[str, list[float]] = {s.value: [] for s in strategies}
    requests: dict[str, list[float]] = {s.value: [] for s in strategies}
    try:
        model = ModelIdentity(name="bench-model", version="bench-1")
        device = DraftWriter(ehr, WriteStrategy.SEARCH).device(
            build_device(model), device_key(model)
        )
        with ThreadPoolExecutor(args.concurrency) as pool:
            for _ in range(args.repeats):
                for strategy in strategies:
                    writer = DraftWriter(ehr, strategy)
                    drafts = _drafts(client, base, args.drafts, uuid.uuid4().hex, device)
                    sent[0] = 0
                    started = time.perf_counter()
                    list(pool.map(writer.write, drafts))
                    rates[strategy.value].append(args.drafts / (time.perf_counter() - started))
                    requests[strategy.value].append(sent[0] / args.drafts)
                    print(f"{strategy}: {rates[strategy.value][-1]:.1f} drafts/s", flush=True)
    finally:
        client.close()
        servers.down()
    print(
        f"\n{args.drafts} drafts x {args.repeats} repeats, {args.concurrency} at once, "
        f"server {base}"
    )
    transaction = statistics.median(rates["transaction"])
    for strategy in strategies:
        rate = statistics.median(rates[strategy.value])
        print(f"{strategy}_drafts_per_s: {rate:.3f}")
        print(f"{strategy}_requests_per_draft: {statistics.mean(requests[strategy.value]):.3f}")
        if strategy is not WriteStrategy.TRANSACTION:
            print(f"{strategy}_vs_transaction: {rate / transaction:.3f}")


if __name__ == "__main__":
    main()
