"""bench/reliability_table.py: the README's reliability table from the scenarios' JSON lines,
written here the way the scenarios write them (tests.reliability_figures.record)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.reliability_table import COLUMNS, main
from tests.reliability_figures import ENV, Figures, record

pytestmark = pytest.mark.unit


def _write(path: Path, monkeypatch: pytest.MonkeyPatch, *figures: Figures) -> None:
    monkeypatch.setenv(ENV, str(path))
    for one in figures:
        record(one)


def test_one_row_per_scenario_in_order_with_every_column_and_the_cpu_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "reliability.jsonl"
    _write(
        out,
        monkeypatch,
        Figures(
            "load-2000",
            "none | load",
            2000,
            2000,
            peak_rss_mib=412.46,
            seconds=431.04,
            extra={"fds_max": 79},
        ),
        Figures("phi-scan", "distinctive names", 12, 11, 1, lost=0, phi_hits=0, seconds=12.34),
    )
    assert main([str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    header, rule, load, phi, blank, machine = printed
    assert header == "| " + " | ".join(heading for _, heading in COLUMNS) + " |"
    assert header.startswith("| scenario | faults injected | studies | drafted once |")
    assert rule.count("|") == len(COLUMNS) + 1
    # Thousands separated, RSS and seconds rounded, a `|` in text escaped, not measured = dash.
    assert load == "| load-2000 | none \\| load | 2,000 | 2,000 | 0 | 0 | 0 | – | 412 | 431 |"
    assert phi == "| phi-scan | distinctive names | 12 | 11 | 1 | 0 | 0 | 0 | – | 12.3 |"
    assert blank == ""
    assert machine == f"CPUs: {os.cpu_count()}"


def test_no_figures_or_a_bad_line_is_an_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([str(empty)]) == 1
    assert "no figures" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"scenario": "a", "studies": 1}\nnot json\n')
    assert main([str(bad)]) == 2
    assert f"{bad}:2: not a JSON line" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl")]) == 2
