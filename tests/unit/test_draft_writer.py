"""The draft writer: strategy choice, no duplicate after a lost answer, one Device per version.

Runs on the NDJSON folder EHR (a real implementation of ``connectors.ehr.Ehr``). The lost answer
(the EHR applied the write, the answer never arrived) is made by ``LosingEhr``, a wrapper that
applies a create and then raises as a timed-out gateway would: a fault the folder cannot make
by itself. The same faults against the real FHIR server, through a proxy, are in
tests/integration/test_fhir_write_back.py.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from connectors.draft_writer import DraftWriter, WriteStrategy, choose_strategy
from connectors.ehr import WRITTEN_TYPES, WriteCapabilities
from connectors.ndjson import NdjsonEhr
from medvlm.errors import EhrUnavailableError
from pipeline.fhir_resources import (
    DraftResources,
    ModelIdentity,
    StudyLinks,
    WriteOptions,
    build_device,
    build_draft_resources,
    device_key,
)
from pipeline.report import DraftReport

pytestmark = pytest.mark.unit

REPORT = DraftReport.model_validate(
    {
        "rationale": "r",
        "findings": [
            {
                "name": "edema",
                "presence": "absent",
                "laterality": "bilateral",
                "location": "lungs",
                "severity": "not_applicable",
                "detail": "No edema.",
            },
            {
                "name": "cardiomegaly",
                "presence": "present",
                "laterality": "not_applicable",
                "location": "heart",
                "severity": "mild",
                "detail": "Mildly enlarged.",
            },
        ],
        "impression": "Mild cardiomegaly.",
        "critical": False,
        "recommendation": "none",
    }
)
MODEL = ModelIdentity("m", "a&b|c,d")
STRATEGIES = [WriteStrategy.TRANSACTION, WriteStrategy.CONDITIONAL, WriteStrategy.SEARCH]


class LosingEhr:
    """The folder EHR, but the answers of the next ``lose`` writes are lost after they were
    applied (a fake for a fault the folder cannot cause itself), and every write counted."""

    def __init__(self, inner: NdjsonEhr, lose: int = 0) -> None:
        self.inner = inner
        self.lose = lose
        self.writes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _maybe_lose(self, what: str) -> None:
        self.writes.append(what)
        if self.lose > 0:
            self.lose -= 1
            raise EhrUnavailableError(f"{what}: HTTP 504 (unavailable)")

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None) -> str:
        ref = self.inner.create(resource, if_none_exist=if_none_exist)
        self._maybe_lose(f"create {resource['resourceType']}")
        return ref

    def transaction(
        self, bundle: Bundle, *, retry: bool = True, about: str | None = None
    ) -> Bundle:
        answer = self.inner.transaction(bundle)
        self._maybe_lose("transaction")
        return answer


def _draft(accession: str = "ACC-1", target: str = "diagnostic_report") -> DraftResources:
    return build_draft_resources(
        REPORT,
        StudyLinks(accession_number=accession, patient="Patient/p-1"),
        MODEL,
        device="Device/dev-1",
        issued=datetime(2026, 11, 2, tzinfo=UTC),
        options=WriteOptions(target=target),  # type: ignore[arg-type]
    )


def _rows(folder: Path, rtype: str) -> list[dict[str, Any]]:
    path = folder / f"{rtype}.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _writer(ehr: Any, strategy: WriteStrategy, **kwargs: Any) -> DraftWriter:
    return DraftWriter(ehr, strategy, sleep=lambda _s: None, **kwargs)


def test_auto_takes_the_strongest_strategy_the_server_lists() -> None:
    everything = WriteCapabilities(True, WRITTEN_TYPES)
    no_transactions = WriteCapabilities(False, WRITTEN_TYPES)
    missing_one = WriteCapabilities(True, WRITTEN_TYPES - {"Provenance"})
    assert choose_strategy("auto", everything, WRITTEN_TYPES) is WriteStrategy.TRANSACTION
    assert choose_strategy("auto", no_transactions, WRITTEN_TYPES) is WriteStrategy.CONDITIONAL
    assert choose_strategy("auto", missing_one, WRITTEN_TYPES) is WriteStrategy.SEARCH
    assert choose_strategy("search", everything, WRITTEN_TYPES) is WriteStrategy.SEARCH


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lost", [1, 2, 3])
def test_a_lost_answer_is_looked_up_and_never_written_twice(
    tmp_path: Path, strategy: WriteStrategy, lost: int
) -> None:
    ehr = LosingEhr(NdjsonEhr(tmp_path), lose=lost)
    ids = _writer(ehr, strategy).write(_draft())
    assert len(_rows(tmp_path, "DiagnosticReport")) == 1
    assert len(_rows(tmp_path, "Observation")) == 2
    assert len(_rows(tmp_path, "Provenance")) == 1
    assert ids["DiagnosticReport"] == [_rows(tmp_path, "DiagnosticReport")[0]["id"]]
    assert sorted(ids["Observation"]) == sorted(r["id"] for r in _rows(tmp_path, "Observation"))
    # The Provenance points at the stored report and observations, not at placeholders.
    targets = {t["reference"] for t in _rows(tmp_path, "Provenance")[0]["target"]}
    assert targets == {f"DiagnosticReport/{ids['DiagnosticReport'][0]}"} | {
        f"Observation/{i}" for i in ids["Observation"]
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_write_interrupted_half_way_is_finished_on_resume(
    tmp_path: Path, strategy: WriteStrategy
) -> None:
    ehr = LosingEhr(NdjsonEhr(tmp_path), lose=1)
    with pytest.raises(EhrUnavailableError):
        _writer(ehr, strategy, attempts=1).write(_draft())
    # The next run (the ledger said `writing`) looks first and sends only what is missing.
    ehr.writes.clear()
    first = _writer(ehr, strategy).write(_draft(), resume=True)
    again = _writer(ehr, strategy).write(_draft(), resume=True)
    assert first == again
    assert len(_rows(tmp_path, "DiagnosticReport")) == 1
    assert len(_rows(tmp_path, "Observation")) == 2
    assert len(_rows(tmp_path, "Provenance")) == 1
    sent = 0 if strategy is WriteStrategy.TRANSACTION else 3  # the first Observation exists
    assert len(ehr.writes) == sent


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_note_target_writes_the_document_and_its_provenance(
    tmp_path: Path, strategy: WriteStrategy
) -> None:
    ehr = LosingEhr(NdjsonEhr(tmp_path), lose=1)
    ids = _writer(ehr, strategy).write(_draft(target="document_reference"))
    assert set(ids) == {"DocumentReference", "Provenance"}
    assert len(_rows(tmp_path, "DocumentReference")) == 1
    assert len(_rows(tmp_path, "Provenance")) == 1


def test_the_writer_gives_up_after_its_attempts_with_the_last_error(tmp_path: Path) -> None:
    ehr = LosingEhr(NdjsonEhr(tmp_path), lose=10)
    with pytest.raises(EhrUnavailableError, match="504"):
        _writer(ehr, WriteStrategy.SEARCH, attempts=3).write(_draft())


def test_eight_concurrent_first_writes_make_one_device(tmp_path: Path) -> None:
    ehr = NdjsonEhr(tmp_path)
    writer = _writer(ehr, WriteStrategy.SEARCH)
    remembered: list[str] = []
    refs: list[str] = []
    barrier = threading.Barrier(8)

    def first_write() -> None:
        barrier.wait()
        refs.append(
            writer.device(
                build_device(MODEL),
                device_key(MODEL),
                lookup=lambda: None,
                remember=remembered.append,
            )
        )

    threads = [threading.Thread(target=first_write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (device,) = _rows(tmp_path, "Device")
    assert set(refs) == {f"Device/{device['id']}"} and remembered == refs[:1]
    assert device["version"] == [{"value": "a&b|c,d"}]
    # Another run (a new writer) finds it in the EHR, or takes the ledger's without asking.
    assert (
        _writer(ehr, WriteStrategy.SEARCH).device(build_device(MODEL), device_key(MODEL)) == refs[0]
    )
    assert (
        _writer(ehr, WriteStrategy.SEARCH).device(
            build_device(MODEL), device_key(MODEL), lookup=lambda: "Device/from-ledger"
        )
        == "Device/from-ledger"
    )


def test_of_several_devices_with_one_key_every_writer_takes_the_oldest(tmp_path: Path) -> None:
    ehr = NdjsonEhr(tmp_path)
    twins = [ehr.create(build_device(MODEL)) for _ in range(3)]  # plain creates: three Devices
    for _ in range(2):
        assert (
            _writer(ehr, WriteStrategy.SEARCH).device(build_device(MODEL), device_key(MODEL))
            in twins
        )
    chosen = {
        _writer(ehr, WriteStrategy.SEARCH).device(build_device(MODEL), device_key(MODEL))
        for _ in range(3)
    }
    oldest = min(_rows(tmp_path, "Device"), key=lambda d: (d["meta"]["lastUpdated"], d["id"]))
    assert chosen == {f"Device/{oldest['id']}"}
    assert len(_rows(tmp_path, "Device")) == 3  # nothing new was made
