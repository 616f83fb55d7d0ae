"""FHIR write-back: one transaction per draft against one request per resource, same drafts.

Each of N drafts (a DiagnosticReport, its Observations, the model's Device and the Provenance,
exactly what the flow writes: ``pipeline.fhir_resources.build_draft_bundle``) goes to the dev
FHIR server (started for the benchmark and stopped after it) either

  (a) as the flow sends it: one ``transaction`` Bundle of conditional creates, or
  (b) as an EHR without transactions needs it: one conditional create (``If-None-Exist``) per
      resource, in order, with the bundle's ``urn:uuid`` references replaced by the ids the
      server assigned,

with ``--concurrency`` drafts at once over the project's one pooled keep-alive client
(``connectors.fhir.build_http_client``). The two alternate ``--repeats`` times, each on new
drafts. Prints the figures last, ``name: value``: transaction_drafts_per_s,
individual_drafts_per_s, individual_vs_transaction, and the HTTP requests per draft of each.

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


def _drafts(client: Any, base: str, count: int, run: str) -> list[Any]:
    """``count`` draft bundles, each on its own (new) Patient."""
    from pipeline.fhir_resources import ModelIdentity, StudyLinks, build_draft_bundle
    from pipeline.report import DraftReport

    report = DraftReport.model_validate(REPORT)
    model = ModelIdentity(name="bench-model", version=f"bench-{run}")
    bundles = []
    for i in range(count):
        patient = client.post(
            f"{base}/Patient",
            content=json.dumps({"resourceType": "Patient", "active": True}),
            headers={"Content-Type": "application/fhir+json"},
        )
        patient.raise_for_status()
        patient_id = patient.json()["id"]
        links = StudyLinks(accession_number=f"B{run[:6]}{i:05d}", patient=f"Patient/{patient_id}")
        bundles.append(build_draft_bundle(report, links, model, issued=dt.datetime.now(dt.UTC)))
    return bundles


def _individual(client: Any, base: str, bundle: Any) -> int:
    """The bundle's entries one conditional create each; returns the requests sent."""
    mapping: dict[str, str] = {}
    for entry in bundle.entry:
        body = entry.resource.model_dump_json(by_alias=True, exclude_none=True)
        for urn, ref in mapping.items():
            body = body.replace(urn, ref)
        rtype = entry.resource.get_resource_type()
        response = client.post(
            f"{base}/{rtype}",
            content=body,
            headers={
                "Content-Type": "application/fhir+json",
                "If-None-Exist": entry.request.ifNoneExist,
            },
        )
        response.raise_for_status()
        location = response.headers.get("Location") or response.headers.get("Content-Location")
        logical = location.split(f"{rtype}/")[1].split("/")[0] if location else None
        logical = logical or response.json()["id"]
        mapping[str(entry.fullUrl)] = f"{rtype}/{logical}"
    return len(bundle.entry)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--drafts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from connectors.fhir import FhirEhr, build_http_client
    from medvlm.dev.servers import DevServers, dev_settings_from
    from medvlm.settings import MedvlmSettings

    settings = MedvlmSettings()
    servers = DevServers(dev_settings_from(settings))
    servers.up()
    ehr_settings = settings.ehr.model_copy(
        update={"kind": "fhir", "base_url": servers.fhir.base_url}
    )
    client = build_http_client(ehr_settings)
    ehr = FhirEhr(client, ehr_settings)
    base = servers.fhir.base_url
    rates: dict[str, list[float]] = {"transaction": [], "individual": []}
    requests = {"transaction": 1.0, "individual": 0.0}
    try:
        with ThreadPoolExecutor(args.concurrency) as pool:
            for _ in range(args.repeats):
                for kind in ("transaction", "individual"):
                    bundles = _drafts(client, base, args.drafts, uuid.uuid4().hex)
                    started = time.perf_counter()
                    if kind == "transaction":
                        list(pool.map(ehr.transaction, bundles))
                    else:
                        sent = list(pool.map(lambda b: _individual(client, base, b), bundles))
                        requests["individual"] = statistics.mean(sent)
                    rates[kind].append(args.drafts / (time.perf_counter() - started))
                    print(f"{kind}: {rates[kind][-1]:.1f} drafts/s", flush=True)
    finally:
        client.close()
        servers.down()
    transaction = statistics.median(rates["transaction"])
    individual = statistics.median(rates["individual"])
    print(
        f"\n{args.drafts} drafts x {args.repeats} repeats, {args.concurrency} at once, "
        f"server {base}"
    )
    print(f"transaction_drafts_per_s: {transaction:.3f}")
    print(f"individual_drafts_per_s: {individual:.3f}")
    print(f"individual_vs_transaction: {individual / transaction:.3f}")
    print(f"transaction_requests_per_draft: {requests['transaction']:.3f}")
    print(f"individual_requests_per_draft: {requests['individual']:.3f}")


if __name__ == "__main__":
    main()
