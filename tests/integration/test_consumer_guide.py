"""docs/consumer-guide.md does what it says: after a draft was written to the real FHIR server,
every request of the guide's ``bash test`` blocks is run with curl, and its answer holds what the
line's ``# expect:`` comment says.

The model is not under test: ``stand_in_model`` answers through the product's ``HttpDrafter``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from medvlm.dev.servers import OrthancInfo
from pipeline.ledger import JobState
from serving.clients import HttpDrafter
from tests.integration.folder_site import stand_in_model
from tests.integration.test_write_safety import Site, open_site

pytestmark = [pytest.mark.integration]

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "consumer-guide.md"
_BLOCK = re.compile(r"^```bash test\n(.*?)^```", re.MULTILINE | re.DOTALL)
_PYTHON = re.compile(r"^```python test\n(.*?)^```", re.MULTILINE | re.DOTALL)
_EXPECT = re.compile(r"\s+#\s*expect:\s*(.+)$")


@dataclass(frozen=True)
class Example:
    command: str
    expect: str

    @property
    def nothing(self) -> bool:
        return self.expect.strip() == "nothing"

    @property
    def resource_type(self) -> str:
        return self.expect.split()[0]

    @property
    def fields(self) -> dict[str, str]:
        return dict(part.split("=", 1) for part in self.expect.split()[1:])


def examples(text: str) -> list[Example]:
    """Every curl line of the guide's ``bash test`` blocks, with its expectation."""
    found = []
    for block in _BLOCK.findall(text):
        for line in block.splitlines():
            if not line.startswith("curl "):
                continue
            match = _EXPECT.search(line)
            assert match, f"a tested example without '# expect:': {line}"
            found.append(Example(line[: match.start()], match.group(1)))
    return found


def test_the_guide_has_tested_examples() -> None:
    found = examples(GUIDE.read_text())
    assert len(found) >= 8
    assert {e.resource_type for e in found if not e.nothing} >= {
        "DiagnosticReport",
        "Observation",
        "Provenance",
        "Device",
        "ImagingStudy",
    }


@pytest.fixture
def site(orthanc: OrthancInfo, fhir_base_url: str, tmp_path: Path) -> Iterator[Site]:
    with open_site(orthanc, fhir_base_url, tmp_path, version=lambda p: f"guide-{p}") as opened:
        yield opened


def _matches(answer: dict[str, Any]) -> list[dict[str, Any]]:
    if answer.get("resourceType") != "Bundle":
        return [answer]
    return [
        e["resource"]
        for e in answer.get("entry", [])
        if e.get("search", {}).get("mode", "match") == "match"
    ]


def test_every_example_of_the_guide_answers_as_the_guide_says(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    study_uid = site.add()
    with stand_in_model(latency_s=0.05) as url:
        assert not site.run(HttpDrafter(None, url)).failures
    job = site.job(study_uid)
    assert job.state is JobState.WRITTEN and job.draft_id
    report = f"DiagnosticReport/{job.fhir_ids['DiagnosticReport'][0]}"
    with httpx.Client(base_url=site.fhir_base_url, timeout=30, trust_env=False) as client:
        (provenance,) = _matches(client.get("/Provenance", params={"target": report}).json())
    env = {
        **os.environ,
        "FHIR": site.fhir_base_url,
        "PATIENT": job.links["patient"],
        "ORDER": job.links["service_request"],
        "STUDY_UID": study_uid,
        "IMAGING_STUDY": job.links["imaging_study"],
        "DRAFT_SYSTEM": site.draft_system,
        "DRAFT_ID": job.draft_id,
        "REPORT": report,
        "DEVICE": provenance["agent"][0]["who"]["reference"],
    }
    for example in examples(GUIDE.read_text()):
        done = subprocess.run(
            ["bash", "-c", example.command + " --fail-with-body"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{example.command}: {done.stdout}{done.stderr}"
        found = _matches(json.loads(done.stdout))
        if example.nothing:
            assert found == [], example.command
            continue
        typed = [r for r in found if r.get("resourceType") == example.resource_type]
        assert typed, f"{example.command}: no {example.resource_type} in {done.stdout[:500]}"
        for resource in typed:
            for name, value in example.fields.items():
                assert str(resource.get(name)) == value, (example.command, name, resource)
        # Found the draft itself, not just any resource of that type.
        if example.resource_type == "DiagnosticReport":
            assert report in {f"DiagnosticReport/{r['id']}" for r in typed}
        if example.resource_type in ("Observation", "Provenance"):
            assert all(
                {"system": site.draft_system, "code": job.draft_id} in r["meta"]["tag"]
                for r in typed
            )

    # The Python example lists the patient's drafts, this one among them, with its Provenance.
    (python,) = _PYTHON.findall(GUIDE.read_text())
    capsys.readouterr()
    exec(python, {"FHIR": site.fhir_base_url, "PATIENT": job.links["patient"]})
    printed = capsys.readouterr().out.splitlines()
    assert f"{report.removeprefix('DiagnosticReport/')} preliminary" in {
        " ".join(line.split()[:2]) for line in printed
    }
    assert all(line.split()[-1] == "1" for line in printed), printed
