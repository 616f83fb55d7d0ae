"""Bad input from the EHR, one batch through the real draft flow: every study ends with a clear
result of its own and the batch goes on.

The session's real FHIR server, Orthanc and model (tests/integration/test_write_safety.py's
``Site``). One study per case, all in one batch:

- ``normal``: the control — written;
- ``missing-patient``: the order's subject Patient was deleted on the server (reads answer 410):
  failed at fetch, naming the order and the Patient by reference, before the model is asked.
  (Before this test the "not found" was taken for "no order": the study was drafted without
  context, flagged ``no-order-in-ehr``, and failed only at the write.)
- ``no-order``: no ServiceRequest carries the accession number: drafted with what exists (the
  Patient found by the DICOM PatientID) and written, flagged ``no-order-in-ehr`` (README, "The
  main job");
- ``two-orders``: two ServiceRequests carry the accession number: failed, naming the search by
  the accession's hash, never drafted;
- ``extensions``: the Patient (on the resource, a name and a primitive), the order and the
  Condition carry extensions nobody here knows: ignored, written;
- ``modifier``: the order carries a ``modifierExtension``. ``fhir.resources`` parses it without a
  word, and it used to be drafted and written; but FHIR R4 (extensibility.html#modifierExtension)
  says a modifier the reader does not understand changes the meaning ("not to be done") and the
  reader SHALL refuse or process it safely. Now skipped with a reason naming the resource and
  the extension's URL, never drafted (``flows.draft_reports._not_understood``);
- ``invalid-json``: this study's order search is answered 200 with a body cut mid-JSON — an
  INJECTED fault (``BadInputProxy``: a real server cannot be made to send it): failed, naming the
  search by the accession's hash;
- ``write-refused``: this study's write is answered 422 with an OperationOutcome — an INJECTED
  fault (``BadInputProxy``, nothing reaches the real server): failed at the write, with the
  server's issue;
- ``unicode``: CJK, Arabic and combining-mark names in the EHR and in the DICOM header: written.

The batch is run twice (the failures are retried): both runs complete (the failures are what
make ``medvlm run`` exit with code 3), the counts on the FHIR server and in the ledger are the
same after both, and no reason, log line or printed output carries a name, MRN, accession number
or birth date.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle

from connectors.dicomweb import DicomWebSource
from connectors.ehr import identifier_ref
from connectors.factory import build_image_source
from connectors.fhir import FhirEhr
from medvlm.dev.sample_cohort import ACCESSION_SYSTEM, MRN_SYSTEM, ehr_bundle
from medvlm.dev.servers import OrthancInfo
from medvlm.dev.synthetic_dicom import make_study
from pipeline.fhir_resources import draft_id
from pipeline.imaging import study_reference
from pipeline.ledger import DraftJob, JobState
from serving.clients import HandleDrafter
from tests.integration.loopback import FhirProxy
from tests.integration.test_write_safety import Site, WatchingDrafter
from tests.reliability_figures import Figures, record

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.reliability]

FHIR_JSON = "application/fhir+json"
UNKNOWN = "http://example.org/fhir/StructureDefinition/unknown-to-medvlm"
NOT_TO_BE_DONE = "http://example.org/fhir/StructureDefinition/order-not-to-be-performed"
#: Every study's job settings: three attempts, so that a failure retried once is still
#: ``failed`` (not dead-lettered) after the second run.
JOB: dict[str, Any] = {"max_attempts": 3, "page_size": 9}


class BadInputProxy(FhirProxy):
    """``FhirProxy`` with two faults a real server cannot be made to produce on demand; both are
    INJECTED by this proxy, per study:

    - ``garble``: a GET whose query carries one of these values (an accession number) is
      answered 200 with a FHIR JSON body cut in the middle, as a broken gateway sends it;
    - ``refuse``: a POST whose body carries one of these values (``ServiceRequest/<id>``, the
      order a draft is based on) is answered 422 with an OperationOutcome echoing that value,
      as a server whose business rules reject the draft would; it is not forwarded.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.garble: set[str] = set()
        self.refuse: set[str] = set()
        self.garbled: list[str] = []
        self.refused: list[str] = []

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        query = unquote(path.partition("?")[2])
        if method == "GET" and any(value in query for value in self.garble):
            self.garbled.append(path)
            cut = b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resour'
            return 200, {"Content-Type": FHIR_JSON}, cut
        text = body.decode("utf-8", "replace")
        hit = next((value for value in self.refuse if value in text), None)
        if method == "POST" and hit is not None:
            self.refused.append(path)
            issue = {
                "severity": "error",
                "code": "business-rule",
                "diagnostics": f"{hit} is on hold: drafts are not accepted (injected)",
            }
            outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
            return 422, {"Content-Type": FHIR_JSON}, json.dumps(outcome).encode()
        return super()._forward(method, path, headers, body)


@dataclass
class Case:
    """One study of the batch and what identifies its patient (which must never be printed)."""

    name: str
    study_uid: str
    mrn: str
    accession: str
    birth_date: str
    names: tuple[str, ...]
    patient: str = ""  # Patient/<id> on the server
    order: str = ""  # ServiceRequest/<id> on the server ("" without one)

    @property
    def ref(self) -> str:
        return study_reference(self.study_uid)

    @property
    def phi(self) -> tuple[str, ...]:
        return (self.mrn, self.accession, self.birth_date, self.birth_date.replace("-", ""))


class BadInputSite(Site):
    """``Site`` whose studies' EHR records are changed per case before (``bundle``) and after
    (``then``) they are loaded, with distinctive names and birth dates to look for."""

    cases: dict[str, Case]

    def add_case(
        self,
        name: str,
        *,
        names: list[dict[str, Any]] | None = None,
        dicom_name: str | None = None,
        with_order: bool = True,
        bundle: Callable[[dict[str, Any]], None] | None = None,
        then: Callable[[FhirEhr, Case], None] | None = None,
    ) -> Case:
        i = len(self.accessions)
        mrn, accession = f"SYN-{self.prefix}-{i:03d}", f"ACC-{self.prefix}-{i:02d}"
        birth_date = f"1931-0{1 + i % 9}-{11 + i:02d}"
        human_names = names or [{"family": f"Quillfeather{self.prefix}", "given": [f"Odo{i}"]}]
        flat = tuple(
            part for n in human_names for part in [n.get("family", ""), *n.get("given", [])]
        )
        (ds,) = make_study(
            "CR",
            seed=random.randrange(10**6),
            accession=accession,
            patient_id=mrn,
            study_date=self.study_date,
        )
        study_uid = pydicom.uid.generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.AccessionNumber = accession
        ds.PatientID = mrn
        ds.StudyDate = self.study_date.strftime("%Y%m%d")
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 (PS3.3 C.12.1.1.2)
        ds.PatientName = dicom_name or f"{flat[0]}^{flat[1]}"
        ds.PatientBirthDate = birth_date.replace("-", "")
        loaded = ehr_bundle(
            mrn=mrn,
            accession=accession,
            study_uid=study_uid,
            modality="CR",
            reason="Cough",
            condition="Asthma",
            prior_impression=f"PRIOR {self.prefix}-{i}.",
            sex="female",
            birth_date=birth_date,
            with_order=with_order,
        )
        loaded["entry"][0]["resource"]["name"] = human_names
        if bundle is not None:
            bundle(loaded)
        case = Case(name, study_uid, mrn, accession, birth_date, flat)
        with self.ehr() as ehr:
            ehr.transaction(Bundle.model_validate(loaded))
            patient = ehr.find_patient(mrn, MRN_SYSTEM)
            assert patient is not None
            case.patient = f"Patient/{patient.id}"
            order = ehr.find_service_request(accession) if with_order else None
            case.order = f"ServiceRequest/{order.id}" if order is not None else ""
            if then is not None:
                then(ehr, case)
        source = build_image_source(self.orthanc.pacs_settings())
        assert isinstance(source, DicomWebSource)
        try:
            assert source.store([ds]).failed == ()
        finally:
            source.close()
        self.accessions.append(accession)
        self.cases[name] = case
        return case

    def job_of(self, case: Case) -> DraftJob:
        return self.job(case.study_uid)

    def drafts_of(self, case: Case) -> int:
        """Drafts of this study on the FHIR server (read directly, not through the proxy): by
        the draft's key, and every preliminary report on its order or its Patient."""
        key = draft_id(case.accession, self.version)
        by_key = _search(self, "DiagnosticReport", identifier=f"{self.draft_system}|{key}")
        on_order = (
            _search(self, "DiagnosticReport", **{"based-on": case.order}) if case.order else []
        )
        on_patient = _search(self, "DiagnosticReport", subject=case.patient, status="preliminary")
        others = {r["id"] for r in on_order + on_patient if r.get("status") == "preliminary"}
        assert others <= {r["id"] for r in by_key}, f"{case.name}: a draft not made by this run"
        return len(by_key)


def _search(site: Site, rtype: str, **params: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=site.fhir_base_url, timeout=30, trust_env=False) as client:
        response = client.get(f"/{rtype}", params={**params, "_count": "200"})
        response.raise_for_status()
    bundle = response.json()
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode", "match") == "match"
    ]


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[BadInputSite]:
    """A site of its own (date decades back, identifiers of its own, see open_site) behind a
    ``BadInputProxy``."""
    prefix = uuid.uuid4().hex[:6].upper()
    with BadInputProxy(fhir_base_url) as proxy:
        opened = BadInputSite(
            orthanc,
            fhir_base_url,
            proxy,
            f"sqlite:///{tmp_path / 'ledger.db'}",
            dt.date(1950, 1, 1) + dt.timedelta(days=random.randrange(10_000)),
            prefix,
            f"urn:medvlm-test:{prefix}",
        )
        opened.cases = {}
        yield opened


@pytest.fixture
def drafter(serve_handle: Any) -> WatchingDrafter:
    return WatchingDrafter(HandleDrafter(serve_handle))


def _delete_patient(ehr: FhirEhr, case: Case) -> None:
    with httpx.Client(base_url=ehr.base_url, timeout=30, trust_env=False) as client:
        client.delete(f"/{case.patient}").raise_for_status()
        assert client.get(f"/{case.patient}").status_code in (404, 410)


def _second_order(ehr: FhirEhr, case: Case) -> None:
    twin = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": ACCESSION_SYSTEM, "value": case.accession}],
        "status": "active",
        "intent": "order",
        "code": {"text": "CR imaging (entered twice)"},
        "subject": {"reference": case.patient},
    }
    with httpx.Client(base_url=ehr.base_url, timeout=30, trust_env=False) as client:
        client.post("/ServiceRequest", json=twin).raise_for_status()


def _resource(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype
    ]
    (resource,) = found
    return resource


def _unknown_extensions(bundle: dict[str, Any]) -> None:
    patient = _resource(bundle, "Patient")
    patient["extension"] = [
        {"url": f"{UNKNOWN}/favourite-colour", "valueString": "teal"},
        {"url": f"{UNKNOWN}/nested", "extension": [{"url": "part", "valueInteger": 3}]},
    ]
    patient["name"][0]["extension"] = [{"url": f"{UNKNOWN}/name-origin", "valueCode": "x"}]
    patient["_birthDate"] = {"extension": [{"url": f"{UNKNOWN}/accuracy", "valueCode": "day"}]}
    _resource(bundle, "ServiceRequest")["extension"] = [
        {"url": f"{UNKNOWN}/ward-note", "valueString": "bring wheelchair"}
    ]
    _resource(bundle, "Condition")["extension"] = [
        {"url": f"{UNKNOWN}/registry", "valueBoolean": True}
    ]


def _modifier_extension(bundle: dict[str, Any]) -> None:
    _resource(bundle, "ServiceRequest")["modifierExtension"] = [
        {"url": NOT_TO_BE_DONE, "valueBoolean": True}
    ]


# Combining marks written decomposed (NFD): e + U+0301, o + U+0308, a + U+0323 + U+0302.
UNICODE_NAMES = [
    {"use": "official", "family": "山田", "given": ["太郎"]},
    {"use": "usual", "family": "العبدالله", "given": ["محمد"]},
    {"use": "nickname", "family": "Nguye\u0323\u0302n", "given": ["Jose\u0301", "Zo\u0308e"]},
]


def _load_batch(site: BadInputSite) -> None:
    site.add_case("normal")
    site.add_case("missing-patient", then=_delete_patient)
    site.add_case("no-order", with_order=False)
    site.add_case("two-orders", then=_second_order)
    site.add_case("extensions", bundle=_unknown_extensions)
    site.add_case("modifier", bundle=_modifier_extension)
    garbled = site.add_case("invalid-json")
    site.proxy.garble.add(garbled.accession)  # type: ignore[attr-defined]
    refused = site.add_case("write-refused")
    site.proxy.refuse.add(refused.order)  # type: ignore[attr-defined]
    site.add_case("unicode", names=UNICODE_NAMES, dicom_name="山田^太郎=やまだ^たろう")


WRITTEN = ("normal", "no-order", "extensions", "unicode")
FAILED = ("missing-patient", "two-orders", "invalid-json", "write-refused")
SKIPPED = ("modifier",)


def _check_outcomes(site: BadInputSite, drafter: WatchingDrafter, run: int) -> None:
    """Every study's ledger row and drafts after run ``run`` (1 or 2)."""
    cases = site.cases
    jobs = {name: site.job_of(case) for name, case in cases.items()}
    for name in WRITTEN:
        job = jobs[name]
        assert job.state is JobState.WRITTEN and job.reason is None, (name, job.reason)
        assert site.drafts_of(cases[name]) == 1, name
    for name in FAILED:
        job = jobs[name]
        assert job.state is JobState.FAILED and job.attempts == run, (name, job.state, job.reason)
        assert job.reason and "\n" not in job.reason, name
        assert site.drafts_of(cases[name]) == 0, name
    (modifier,) = [jobs[name] for name in SKIPPED]
    assert modifier.state is JobState.SKIPPED and modifier.attempts == 0
    assert site.drafts_of(cases["modifier"]) == 0

    # What each reason says: the resource (or the search, by the accession's hash) it is about.
    missing = cases["missing-patient"]
    assert jobs["missing-patient"].failed_stage is JobState.DISCOVERED
    assert jobs["missing-patient"].reason == (
        f"{missing.order}: its subject {missing.patient}: HTTP 410 (not found)"
    )
    twins = identifier_ref(cases["two-orders"].accession, ACCESSION_SYSTEM)
    assert jobs["two-orders"].reason == (
        f"ServiceRequest {twins}: 2 ServiceRequests carry this accession number"
    )
    garbled = identifier_ref(cases["invalid-json"].accession, ACCESSION_SYSTEM)
    assert jobs["invalid-json"].reason == f"ServiceRequest {garbled}: answer is not JSON"
    refused = jobs["write-refused"]
    assert refused.failed_stage is JobState.WRITING
    assert "HTTP 422 (rejected)" in (refused.reason or "")
    # The server's issue is kept, with the value it echoed from our request (the order's
    # reference) redacted, as every value we sent is (connectors/fhir.py).
    # It names the draft it refused (its identifier is a hash: no accession number).
    assert refused.reason == (
        f"DiagnosticReport {refused.draft_id} "
        "(transaction of 3 entries): HTTP 422 (rejected) [error/business-rule: [redacted] "
        "is on hold: drafts are not accepted (injected)]"
    )
    assert modifier.reason == (
        f"modifier-extension: {cases['modifier'].order} carries a modifierExtension this "
        f"pipeline does not understand ({NOT_TO_BE_DONE})"
    )
    assert jobs["no-order"].flags == ["no-order-in-ehr"]
    assert jobs["no-order"].links.get("service_request") is None
    assert jobs["no-order"].links["patient"] == cases["no-order"].patient
    assert jobs["normal"].flags == [] and jobs["unicode"].flags == []
    # The model never saw what was refused before drafting; the refused write was drafted.
    seen = set(drafter.inputs)
    for name in ("missing-patient", "two-orders", "invalid-json", "modifier"):
        assert cases[name].ref not in seen, name
    assert cases["write-refused"].ref in seen


def test_bad_ehr_input_ends_each_study_with_its_own_reason_and_the_batch_goes_on(
    site: BadInputSite,
    drafter: WatchingDrafter,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    _load_batch(site)
    assert len(site.cases) == 9
    for logger in ("medvlm", "connectors", "flows", "pipeline", "serving"):
        caplog.set_level(logging.DEBUG, logger=logger)  # the debug log too, tracebacks included
    first = site.run(drafter, **JOB)
    # The run completed with failures: what makes `medvlm run` exit with code 3 (medvlm/cli.py).
    assert first.counts["written"] == 4 and first.counts["failed"] == 4, first
    assert first.counts["skipped"] == 1
    by_ref = {case.ref: name for name, case in site.cases.items()}
    assert sorted(by_ref[ref] for ref, _ in first.failures) == sorted(FAILED)
    assert [by_ref[ref] for ref, _ in first.skipped] == list(SKIPPED)
    _check_outcomes(site, drafter, run=1)
    assert site.proxy.garbled and len(site.proxy.refused) == 1  # type: ignore[attr-defined]

    # The failures are retried by the next run: same results, nothing written twice.
    second = site.run(drafter, **JOB)
    assert second.attempted == len(FAILED), second
    assert sorted(by_ref[ref] for ref, _ in second.failures) == sorted(FAILED)
    assert second.counts == first.counts
    _check_outcomes(site, drafter, run=2)
    assert len(site.proxy.refused) == 2  # type: ignore[attr-defined]

    # No name, MRN, accession number or birth date in any reason, log record or output.
    jobs = [site.job_of(case) for case in site.cases.values()]
    out, err = capfd.readouterr()
    texts = {
        "ledger reasons": "\n".join(job.reason or "" for job in jobs),
        "summaries": repr((first.failures, first.skipped, second.failures, second.skipped)),
        "log records": "\n".join(r.getMessage() for r in caplog.records),
        "log output": caplog.text,
        "stdout": out,
        "stderr": err,
    }
    hits = [
        (where, case.name, value)
        for case in site.cases.values()
        for value in (*case.phi, *case.names)
        for where, text in texts.items()
        if value and value in text
    ]
    assert hits == []

    counts = {name: site.drafts_of(case) for name, case in site.cases.items()}
    with_reason = sum(
        job.state in (JobState.FAILED, JobState.SKIPPED, JobState.DEAD_LETTERED)
        and bool(job.reason)
        for job in jobs
    )
    drafted_once = sum(n == 1 for n in counts.values())
    record(
        Figures(
            scenario="FHIR bad input",
            faults=(
                "one batch: order's Patient deleted; no order; two orders for one accession; "
                "unknown extensions; a modifierExtension; invalid JSON on a search (proxy); "
                "422 OperationOutcome on a write (proxy); CJK/Arabic/combining names; run twice"
            ),
            studies=len(site.cases),
            drafted_once=drafted_once,
            recorded_with_reason=with_reason,
            lost=len(site.cases) - drafted_once - with_reason,
            duplicated=sum(n > 1 for n in counts.values()),
            phi_hits=len(hits),
            extra={
                "states": {
                    name: str(job.state) for name, job in zip(site.cases, jobs, strict=True)
                },
                "drafts_on_server": counts,
            },
        )
    )
