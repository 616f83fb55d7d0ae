"""The fairness report as a quality officer sees it: rendered and printed by headless Chromium.

What only a browser can tell: that the alert card and the coverage panel are laid out and
visible, that the trend's tick labels do not overlap once fonts are applied, and how many pages
the report prints to (the planted-disparity report printed 55 before the print stylesheet).

Needs a Chromium binary (``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH; on
Debian's ``chromium``, which scripts/install-servers.sh installs); without one the test fails
with that hint, as CI must run it. Starts no server: the page is a
file, measured by a script added to a copy of it, and the DOM read back with ``--dump-dom``.
"""

from __future__ import annotations

import datetime as dt
import html
import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.fairness import trend_points
from pipeline.fairness_html import render_html
from pipeline.fairness_types import FairnessReport
from tests.fairness_data import WINDOW_END, WINDOW_START, cohort
from tests.unit.test_fairness import ATTRIBUTES, records, report_of

pytestmark = [pytest.mark.integration]

CHROMIUM = next(
    (
        found
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (found := shutil.which(name))
    ),
    None,
)

# Added to a copy of the page: measures what the assertions need and writes it into the DOM.
_MEASURE = """<script>
addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect();
    return {left: r.left, top: r.top, width: r.width, height: r.height}; };
  const one = (selector) => { const e = document.querySelector(selector);
    return e ? {text: e.innerText, box: box(e)} : null; };
  const out = {
    card: one(".alert-card"),
    coverage: one("#coverage"),
    firstFigure: one("figure"),
    ticks: [...document.querySelectorAll('figure[id^="trend-"] svg')].map((svg) =>
      [...svg.querySelectorAll("text")]
        .filter((t) => /^\\d{4}-\\d{2}-\\d{2}$/.test(t.textContent.trim()))
        .map(box)),
  };
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    if CHROMIUM is None:
        pytest.fail("no headless Chromium on PATH: bash scripts/install-servers.sh installs it")
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=180,
        check=True,
    )


def _planted_with_empty_earlier_windows() -> FairnessReport:
    """The issue's case: the two windows before this one had no studies."""
    recs = records(cohort(planted=True))
    length = WINDOW_END - WINDOW_START
    windows = [(WINDOW_START - k * length, WINDOW_END - k * length, []) for k in (2, 1)]
    windows.append((WINDOW_START, WINDOW_END, recs))
    trend = trend_points(windows, attributes=ATTRIBUTES, min_group_size=30)
    return report_of(recs, trend=trend, generated=dt.datetime(2026, 11, 1, 6, tzinfo=dt.UTC))


def _measured(page: Path, tmp_path: Path) -> dict[str, Any]:
    copy = tmp_path / "measured.html"
    copy.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))
    dom = _chromium(
        tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()
    ).stdout.decode()
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.DOTALL)
    assert found is not None, "the measuring script did not run"
    return json.loads(html.unescape(found.group(1)))


def _pdf_pages(pdf: bytes) -> int:
    """Page objects of a PDF (Chromium writes each as a plain ``/Type /Page`` dictionary)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf))


def test_the_planted_report_renders_and_prints_compactly(tmp_path: Path) -> None:
    page = tmp_path / "planted.html"
    page.write_text(render_html(_planted_with_empty_earlier_windows()), encoding="utf-8")
    measured = _measured(page, tmp_path)

    card = measured["card"]
    assert card is not None and card["box"]["height"] > 0
    assert "for sex = female than for sex = male (the reference group)" in card["text"]
    assert "the rule alerts when" in card["text"] and "Owner:" in card["text"]
    assert card["box"]["top"] < measured["firstFigure"]["box"]["top"]  # the alert comes first

    coverage = measured["coverage"]
    assert coverage is not None and coverage["box"]["height"] > 0
    assert "Not assessable" in coverage["text"] and "ethnicity (100% unknown)" in coverage["text"]

    assert measured["ticks"], "no trend figure"
    for ticks in measured["ticks"]:
        assert len(ticks) == 3  # one per window, the empty ones included
        ticks.sort(key=lambda t: t["left"])
        for left, right in itertools.pairwise(ticks):
            assert left["left"] + left["width"] + 4 <= right["left"], (left, right)

    pdf = tmp_path / "planted.pdf"
    _chromium(
        tmp_path / "profile",
        "--no-pdf-header-footer",
        f"--print-to-pdf={pdf}",
        page.as_uri(),
    )
    pages = _pdf_pages(pdf.read_bytes())
    print(f"the planted report prints to {pages} A4/Letter pages")
    assert 1 <= pages <= 24, pages  # 55 before; 19 with the print stylesheet (2026-12-02)
