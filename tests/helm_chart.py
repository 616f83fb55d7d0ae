"""helm for the chart tests (tests/unit/test_k8s_chart.py, test_k8s_scan.py): the pinned binary
(scripts/install-k8s-tools.sh, run here when it is missing), ``helm template`` of k8s/medvlm,
and the chart's test values files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "k8s" / "medvlm"
CI_VALUES = CHART / "ci" / "values-cpu.yaml"  # CPU-only, what CI could install
GPU_VALUES = CHART / "ci" / "values-gpu-multinode.yaml"  # two GPU nodes, TP 2, autoscaling


def tools_home() -> Path:
    """Where the install scripts put the chart tools (helm, the checkov venv): MEDVLM_HOME."""
    return Path(os.environ.get("MEDVLM_HOME", Path.home() / ".cache" / "medvlm"))


def helm_binary() -> str:
    """The pinned helm in MEDVLM_HOME/bin, installed when missing; else one on PATH; else the
    calling test skips with the installer's last line."""
    candidate = tools_home() / "bin" / "helm"
    if not candidate.is_file():
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install-k8s-tools.sh")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0 or not candidate.is_file():
            on_path = shutil.which("helm")
            if on_path is None:
                pytest.skip(
                    "helm is not installed and scripts/install-k8s-tools.sh failed: "
                    + (done.stderr.strip().splitlines() or ["no output"])[-1]
                )
            return on_path
    return str(candidate)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)


def template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart with ``args`` only: callers add the values they need."""
    return run_helm(helm, "template", "medvlm", str(CHART), "--namespace", "medvlm", *args)


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    """The objects ``template`` renders (it must succeed)."""
    done = template(helm, *args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
