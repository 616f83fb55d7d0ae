"""checkov over the rendered chart k8s/medvlm and the Containerfiles in images/, offline.

The chart is rendered by helm (as test_k8s_chart.py does) with the CPU-test values and the
multi-node GPU values, and scanned with checkov's ``kubernetes`` framework. checkov knows no
KubeRay CRD, so the RayService's head and worker pod templates are added to each rendering as
Pods: otherwise the Ray pods, the ones on the GPU nodes, would not be scanned at all. checkov's
own ``helm`` framework is not used: it renders with the chart's values.yaml plus one var file,
under a release name of its own, one chart rendering per run, and would scan no Ray pod either.

checkov only recognises Dockerfiles by name (``Containerfile`` is silently not scanned: "no
runners", exit 0), so each Containerfile is linked in as ``<image>.Dockerfile``; every target
must report passed checks, which proves it was scanned.

All targets, with a deliberately broken chart rendering and a deliberately broken Containerfile
(which must fail with the expected check), go through one checkov run: its start-up takes
seconds. Skipped checks and why: .checkov.yaml, the only place. checkov comes from
scripts/install-checkov.sh (a venv of its own); the tests skip when it is not installed.
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

import pytest
import yaml

from tests.helm_chart import CI_VALUES, GPU_VALUES, ROOT, render, template, tools_home

pytestmark = pytest.mark.unit

CONFIG = ROOT / ".checkov.yaml"
CHECKOV_LOCK = ROOT / "requirements" / "checkov-lock.txt"
# The chart renderings that must pass: values file per profile.
CHART_VALUES = {"ci-cpu": CI_VALUES, "gpu-multinode": GPU_VALUES}
CONTAINERFILES = {p.parent.name: p for p in sorted((ROOT / "images").glob("*/Containerfile"))}
# A rendering with one security setting broken, and the check that must catch it.
BROKEN_CHART = [
    "-f", str(CHART_VALUES["ci-cpu"]),
    "--set", "containerSecurityContext.allowPrivilegeEscalation=true",
]  # fmt: skip
BROKEN_CHART_CHECK = "CKV_K8S_20"  # "Containers should not run with allowPrivilegeEscalation"
# The flows Containerfile, ending as root, and the check that must catch it.
BROKEN_CONTAINERFILE_TAIL = "\nUSER root\n"
BROKEN_CONTAINERFILE_CHECK = "CKV_DOCKER_8"  # "Ensure the last USER is not root"
SCAN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Result:
    check_id: str
    check_name: str
    resource: str
    file: str
    lines: str

    def __str__(self) -> str:
        return f"{self.check_id} {self.resource} ({self.file}:{self.lines}): {self.check_name}"


@dataclass(frozen=True)
class Scan:
    passed: dict[str, list[Result]]
    failed: dict[str, list[Result]]
    parsing_errors: list[str]


@pytest.fixture(scope="session")
def checkov() -> Path:
    home = tools_home()
    venv = Path(os.environ.get("CHECKOV_VENV", home / "checkov-venv"))
    binary = venv / "bin" / "checkov"
    if not binary.is_file():
        pytest.skip(f"checkov is not installed at {binary}: run scripts/install-checkov.sh")
    pinned = re.search(r"^checkov==(\S+)$", CHECKOV_LOCK.read_text(), re.M)
    assert pinned is not None, f"{CHECKOV_LOCK} pins no checkov version"
    installed = sorted(venv.glob("lib/python3*/site-packages/checkov-*.dist-info"))
    assert [p.name for p in installed] == [f"checkov-{pinned.group(1)}.dist-info"], (
        f"the checkov venv {venv} does not hold checkov {pinned.group(1)} "
        "(requirements/checkov-lock.txt): run scripts/install-checkov.sh"
    )
    return binary


def ray_pods(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The RayService's head and worker pod templates as Pods, for checkov to scan."""
    for doc in docs:
        if doc["kind"] != "RayService":
            continue
        cluster = doc["spec"]["rayClusterConfig"]
        groups = [("head", cluster["headGroupSpec"])]
        groups += [(f"worker-{g['groupName']}", g) for g in cluster["workerGroupSpecs"]]
        for group, spec in groups:
            yield {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{doc['metadata']['name']}-ray-{group}",
                    "labels": spec["template"]["metadata"].get("labels", {}),
                    "annotations": {"medvlm.io/scanned-as-pod": f"RayService/{group}"},
                },
                "spec": spec["template"]["spec"],
            }


def write_rendering(helm: str, path: Path, *args: str) -> None:
    """``helm template`` with ``args``, and the Ray pods as Pods, into ``path``."""
    done = template(helm, *args)
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    pods = list(ray_pods(docs))
    assert pods, "no RayService pod templates rendered"
    path.write_text(done.stdout + "\n---\n" + yaml.safe_dump_all(pods, sort_keys=False))


def _results(report: dict[str, Any], kind: str) -> Iterator[tuple[str, Result]]:
    for r in report.get("results", {}).get(kind, []):
        lines = "-".join(str(n) for n in r.get("file_line_range") or [])
        name = Path(r["file_path"]).name
        yield name, Result(r["check_id"], r["check_name"], r["resource"], name, lines)


@pytest.fixture(scope="session")
def scan(helm: str, checkov: Path, tmp_path_factory: pytest.TempPathFactory) -> Scan:
    """One checkov run over every target; results by file name (``chart-<profile>.yaml``,
    ``<image>.Dockerfile``, and the broken ``chart-broken.yaml`` and ``broken.Dockerfile``)."""
    target = tmp_path_factory.mktemp("checkov-targets")
    for profile, values in CHART_VALUES.items():
        write_rendering(helm, target / f"chart-{profile}.yaml", "-f", str(values))
    write_rendering(helm, target / "chart-broken.yaml", *BROKEN_CHART)
    for image, containerfile in CONTAINERFILES.items():
        (target / f"{image}.Dockerfile").symlink_to(containerfile)
    broken = CONTAINERFILES["flows"].read_text() + BROKEN_CONTAINERFILE_TAIL
    (target / "broken.Dockerfile").write_text(broken)

    # Offline: no platform key reaches checkov, nothing is downloaded (skip-download in the
    # config, BC_SKIP_MAPPING), no PyPI version check.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_", "CKV_"))}
    env |= {"CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE"}
    cwd = tmp_path_factory.mktemp("checkov-cwd")  # no stray .checkov.yaml is read
    command = [
        str(checkov), "--config-file", str(CONFIG), "--directory", str(target),
        "--framework", "kubernetes", "dockerfile", "--output", "json",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SCAN_TIMEOUT_S, cwd=cwd, env=env
    )
    # 0: nothing failed, 1: something failed (the broken targets must); 2 and up: a crash.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert sorted(r.get("check_type") for r in reports) == ["dockerfile", "kubernetes"], (
        done.stdout[:2000]
    )
    passed: dict[str, list[Result]] = {}
    failed: dict[str, list[Result]] = {}
    errors: list[str] = []
    for report in reports:
        for name, result in _results(report, "passed_checks"):
            passed.setdefault(name, []).append(result)
        for name, result in _results(report, "failed_checks"):
            failed.setdefault(name, []).append(result)
        errors += report.get("results", {}).get("parsing_errors", [])
    return Scan(passed, failed, errors)


def _assert_clean(scan: Scan, name: str) -> None:
    assert not scan.parsing_errors, scan.parsing_errors
    assert scan.passed.get(name), f"checkov scanned nothing in {name}"
    failed = scan.failed.get(name, [])
    assert not failed, f"checkov: {len(failed)} failed checks in {name}:\n" + "\n".join(
        str(r) for r in sorted(failed, key=str)
    )


# -- the targets pass ----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", sorted(CHART_VALUES))
def test_rendered_chart_passes_checkov(scan: Scan, profile: str) -> None:
    name = f"chart-{profile}.yaml"
    _assert_clean(scan, name)
    # The Ray pods (from the RayService) were scanned too.
    resources = {r.resource for r in scan.passed[name]}
    assert {"Pod.default.medvlm-ray-head"} <= resources, sorted(resources)
    assert any(r.startswith("Pod.default.medvlm-ray-worker-") for r in resources)


@pytest.mark.parametrize("image", sorted(CONTAINERFILES))
def test_containerfile_passes_checkov(scan: Scan, image: str) -> None:
    _assert_clean(scan, f"{image}.Dockerfile")


# -- the scan can fail ---------------------------------------------------------------------------


def test_checkov_fails_a_container_allowed_to_escalate_privileges(scan: Scan) -> None:
    broken = scan.failed.get("chart-broken.yaml", [])
    failed = {r.resource for r in broken if r.check_id == BROKEN_CHART_CHECK}
    # Every workload of the chart, the Ray pods included, is caught.
    assert {
        "Deployment.default.medvlm-prefect-worker",
        "StatefulSet.default.medvlm-postgresql",
        "Job.default.medvlm-setup",
        "Pod.default.medvlm-ray-head",
        "Pod.default.medvlm-ray-worker-cpu",
    } <= failed, sorted(failed)


def test_checkov_fails_a_containerfile_ending_as_root(scan: Scan) -> None:
    failed = {r.check_id for r in scan.failed.get("broken.Dockerfile", [])}
    assert failed == {BROKEN_CONTAINERFILE_CHECK}, sorted(failed)


# -- what the skips in .checkov.yaml rely on -----------------------------------------------------


@pytest.mark.parametrize("profile", sorted(CHART_VALUES))
def test_long_running_pods_have_liveness_and_readiness_probes(helm: str, profile: str) -> None:
    """CKV_K8S_8/9 are skipped for the one-shot test Pod and KubeRay's pods: every Deployment
    and StatefulSet container still has both probes."""
    seen = 0
    for doc in render(helm, "-f", str(CHART_VALUES[profile])):
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                name = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
                assert "livenessProbe" in container and "readinessProbe" in container, name
                seen += 1
    assert seen == 2  # the Prefect worker and PostgreSQL


def test_every_skipped_check_has_a_reason() -> None:
    """In .checkov.yaml, each run of skipped check ids comes right after its comment."""
    config = yaml.safe_load(CONFIG.read_text())
    assert config["skip-download"] is True
    lines = [line.strip() for line in CONFIG.read_text().splitlines()]
    skips = [i for i, line in enumerate(lines) if re.fullmatch(r"- CKV2?_\w+", line)]
    assert [lines[i][2:] for i in skips] == config["skip-check"]
    for i in skips:
        before = lines[i - 1]
        assert before.startswith("# ") or re.fullmatch(r"- CKV2?_\w+", before), lines[i]
        assert not before.startswith("# --"), f"{lines[i]}: a section header is not a reason"
