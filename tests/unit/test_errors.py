"""Error messages as the ledger and the CLI show them: one line, no colour codes."""

from __future__ import annotations

import pickle

import pytest

from medvlm.errors import InvalidModelOutputError, RayStartError, one_line

pytestmark = pytest.mark.unit


def test_one_line_keeps_the_first_line_of_a_coloured_traceback() -> None:
    ray_style = "\n\x1b[36mray::MedVLMServer.draft()\x1b[39m (pid=1)\nTraceback (most recent call)"
    assert one_line(ray_style) == "ray::MedVLMServer.draft() (pid=1)"
    assert one_line("x" * 50, limit=10) == "x" * 9 + "…"
    assert one_line("  \n ") == ""


@pytest.mark.parametrize("error", [InvalidModelOutputError("study-1: bad"), RayStartError("no")])
def test_errors_cross_process_boundaries(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
