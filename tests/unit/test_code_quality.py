"""ruff (lint + format) and mypy --strict on the packages, as part of the suite.

Marked ``lint``, not ``unit``: a cold mypy --strict run takes a minute or more, so the fast
tier (``-m unit``) leaves it out while the full suite (no ``-m``) runs it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_finds_nothing() -> None:
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy_strict_passes_on_the_packages() -> None:
    result = _run("mypy", "--cache-dir", "/tmp/medvlm-mypy-cache")
    assert result.returncode == 0, result.stdout[-3000:]
