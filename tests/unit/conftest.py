"""Fixtures of the unit tier's chart tests."""

from __future__ import annotations

import pytest

from tests.helm_chart import helm_binary


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary (tests/helm_chart.py)."""
    return helm_binary()
