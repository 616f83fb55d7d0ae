"""A fairness monitoring run as one self-contained HTML page. Pure: returns text, does no I/O.

The page is meant to be opened on offline hospital machines: no scripts, no external stylesheets,
fonts or images. Plots are drawn with matplotlib's object API (``Figure`` saved as SVG, never
pyplot, so no GUI backend and no global figure registry) and inlined as SVG text.

Content, top to bottom: the run's window, model versions, counts and method; the fired alerts (or a
line saying none fired); for each headline metric a bar chart of the per-group values with their
confidence intervals against the overall value, one panel per attribute; trend plots over the past
windows when the report carries them; a table for every metric.

A suppressed cell (a group smaller than the minimum group size) is shown as "suppressed", never
with a number: neither its value nor its size is read. All text goes through jinja2's autoescape;
text drawn in the plots is escaped by matplotlib's SVG writer and never parsed as mathtext.

Rendering is deterministic for equal input: the SVG writer's ids come from a fixed hash salt and
its date metadata is left out. ``matplotlib.rc_context`` sets the SVG options only while a figure
is built and saved (rcParams are process-global, so concurrent renders in threads may interleave).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal

import jinja2
import matplotlib
from markupsafe import Markup, escape
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedLocator,
    Formatter,
    FuncFormatter,
    MaxNLocator,
    NullLocator,
    PercentFormatter,
)
from matplotlib.transforms import blended_transform_factory

from pipeline.fairness_types import (
    Alert,
    Estimate,
    FairnessReport,
    GroupCoverage,
    GroupResult,
    MetricResult,
    TrendPoint,
    complementary_suppression,
)

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

__all__ = ["DEFAULT_HEADLINE", "render_html"]

#: The metrics that get plots (bar charts and trends); those missing from a report are skipped.
DEFAULT_HEADLINE: tuple[str, ...] = (
    "underdiagnosis_rate",
    "no_finding_rate",
    "failure_rate",
    "critical_rate",
)

#: The attribute of the trend points that carry the whole population's value.
_OVERALL = "overall"
_DASH = "—"
_BAR = "#4477aa"
# The alert colour, used only where a rule fired (never in the trend palette), always with a
# second cue: hatching and a mark in the label. A watch (would fire with more studies) is hatched
# in the plain bar colour.
_BAR_FLAGGED = "#cc3311"
_ALERT_HATCH = "////"
_WATCH_HATCH = "...."
_ALERT_MARK = "\u25b2"  # ▲
_WATCH_MARK = "\u25b3"  # △
_OVERALL_LINE = "#222222"
_MUTED = "#777777"
# Colour-blind-safe qualitative palette (Paul Tol's "vibrant", grey darkened so its legend
# text stays readable), then the darker half of matplotlib's default cycle.
_SERIES_COLOURS = (
    "#0077bb",
    "#ee7733",
    "#009988",
    "#33bbee",
    "#ee3377",
    "#666666",
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_RC: dict[RcKeyType, object] = {
    "svg.fonttype": "none",  # text stays text: small, searchable, selectable
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica", "Liberation Sans"],
    "font.size": 8.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.unicode_minus": False,
}
# No Date (it would change on every render), no Creator/Type/Format (they carry URLs).
_SVG_METADATA: dict[str, str | None] = {
    "Date": None,
    "Creator": None,
    "Type": None,
    "Format": None,
}
# Within a tag (matplotlib escapes "<" and ">" in attribute values and text): an id, a reference.
_SVG_TAG = re.compile(r"<[^>]*>")
_SVG_ID = re.compile(r'(\sid=")([^"]+)(")|(href="#)([^"]+)(")|(url\(#)([^)]+)(\))')


# --- formatting -------------------------------------------------------------------------------


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _unit_label(unit: str) -> str:
    """UCUM unit as shown after a mean: "1" is dimensionless, ``{char}`` annotations lose braces."""
    if unit in ("", "1"):
        return ""
    if unit == "{char}":
        return "characters"
    return unit.replace("{", "").replace("}", "")


def _format_value(metric: MetricResult, value: float | None, *, signed: bool = False) -> str:
    v = _finite(value)
    if v is None:
        return _DASH
    scale, decimals = (100, 1) if metric.kind == "rate" else (1, 2)
    if round(v * scale, decimals) == 0:
        v = 0.0  # no "-0.0"
    sign = "+" if signed else ""
    if metric.kind == "rate":
        return f"{v * 100:{sign}.1f} pp" if signed else f"{v * 100:.1f}%"
    unit = _unit_label(metric.unit)
    text = f"{v:{sign},.2f}"
    return f"{text} {unit}" if unit else text


def _format_ratio(value: float | None) -> str:
    v = _finite(value)
    return _DASH if v is None else f"{v:.2f}"


def _with_ci(estimate: Estimate, fmt: str, metric: MetricResult) -> str:
    def one(v: float | None) -> str:
        if fmt == "ratio":
            return _format_ratio(v)
        return _format_value(metric, v, signed=fmt == "difference")

    text = one(estimate.value)
    if text == _DASH:
        return text
    low, high = _finite(estimate.ci_low), _finite(estimate.ci_high)
    if low is None or high is None:
        return text
    return f"{text} [{one(low)}, {one(high)}]"


Status = Literal["alert", "watch", ""]


def _statuses(report: FairnessReport) -> dict[tuple[str, str, str], tuple[Status, Alert]]:
    """(metric, attribute, group) → whether a rule fired there ("alert") or would have with
    more studies ("watch"), and the first such alert: the only cells drawn as flagged."""
    found: dict[tuple[str, str, str], tuple[Status, Alert]] = {}
    for alert in report.watches:
        found[(alert.metric, alert.attribute, alert.group)] = ("watch", alert)
    for alert in reversed(report.alerts):  # an alert wins over a watch; the first alert wins
        found[(alert.metric, alert.attribute, alert.group)] = ("alert", alert)
    return found


def _status(
    statuses: dict[tuple[str, str, str], tuple[Status, Alert]],
    metric: MetricResult,
    group: GroupResult,
) -> Status:
    found = statuses.get((metric.name, group.attribute, group.group))
    return "" if found is None else found[0]


def _mark(status: Status) -> str:
    return {"alert": f" {_ALERT_MARK}", "watch": f" {_WATCH_MARK}", "": ""}[status]


def _utc(moment: dt.datetime) -> dt.datetime:
    """Aware datetimes converted to UTC; naive ones are taken to be UTC already."""
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _format_time(moment: dt.datetime) -> str:
    return f"{_utc(moment):%Y-%m-%d %H:%M}"


def _plot_text(text: str) -> str:
    """Literal text for a matplotlib label: dollar signs escaped so mathtext never parses it."""
    return text.replace("$", r"\$")


# --- plots ------------------------------------------------------------------------------------

# Fixed layout in inches (matplotlib's layout engines cost more than everything else here).
_WIDTH = 7.5
_ROW = 0.24  # one group's bar
_HEADER = 0.3  # an attribute's name above its groups
_CHAR = 0.068  # average width of one 8 pt character
_LABEL_CHARS = 36  # longer group names are shortened in plots (never in the tables)


def _svg(figure: Figure, key: str, label: str) -> Markup:
    """The figure as an inline ``<svg>`` element whose ids are unique within the page.

    ``label`` describes it to screen readers: ``role="img"`` with ``aria-label`` on the element
    and a ``<title>`` (also a tooltip) as its first child.
    """
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata=_SVG_METADATA)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: not valid inside HTML

    def prefix(match: re.Match[str]) -> str:
        before, name, after = (g for g in match.groups() if g is not None)
        return f"{before}{key}-{name}{after}"

    # Ids prefixed with the figure's key: several SVGs share the page's id space.
    text = _SVG_TAG.sub(lambda tag: _SVG_ID.sub(prefix, tag.group()), text)
    escaped = escape(label)
    start = text.index(">", text.index("<svg")) + 1
    text = (
        text[: start - 1].replace("<svg ", f'<svg role="img" aria-label="{escaped}" ', 1)
        + f">\n <title>{escaped}</title>"
        + text[start:]
    )
    return Markup(text.strip())  # matplotlib escaped the text it drew; the label is escaped


def _rc(key: str) -> dict[RcKeyType, object]:
    return {**_RC, "svg.hashsalt": f"medvlm-fairness-{key}"}


def _short(text: str, limit: int = _LABEL_CHARS) -> str:
    """At most ``limit`` characters: the start and the end of a long name around "…" (names
    that share a long prefix, such as sites of one trust, usually differ at the end)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) * 2 // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def _unique_short(names: Sequence[str], limit: int = _LABEL_CHARS) -> list[str]:
    """``_short`` of each name, numbered where two different names still shorten alike."""
    short = {name: _short(name, limit) for name in dict.fromkeys(names)}
    sources: dict[str, list[str]] = {}
    for name, label in short.items():
        sources.setdefault(label, []).append(name)
    for clashing in sources.values():
        if len(clashing) > 1:  # different names, one label: number them in order
            for number, name in enumerate(clashing, start=1):
                suffix = f" #{number}"
                short[name] = _short(name, limit - len(suffix)) + suffix
    return [short[name] for name in names]


def _value_formatter(metric: MetricResult) -> Formatter:
    if metric.kind == "rate":
        return PercentFormatter(xmax=1.0)
    return FuncFormatter(lambda v, _pos: f"{v:,.4g}")


def _margins(figure: Figure, *, left: float, right: float, top: float, bottom: float) -> None:
    """Subplot margins in inches."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(
        left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height
    )


def _bar_figure(
    metric: MetricResult,
    report: FairnessReport,
    key: str,
    statuses: dict[tuple[str, str, str], tuple[Status, Alert]],
) -> Markup | None:
    """A forest-style chart: per attribute, each group's value and interval on one axis.

    A bar is red and hatched, its label marked ▲, only where an alert rule fired for the group
    (in the harmful direction, by the rule's thresholds); hatched and marked △ where one would
    fire with more studies. The reference group is labelled "(ref)".
    """
    blocks = [
        (a, metric.by_attribute(a)) for a in _attributes(report, metric) if report.assessable(a)
    ]
    blocks = [(a, g) for a, g in blocks if g]
    if not blocks:
        return None
    # Vertical positions in row units, top to bottom: a header per attribute, then its groups.
    headers: list[tuple[float, str]] = []
    rows: list[tuple[float, GroupResult]] = []
    y = 0.0
    for attribute, groups in blocks:
        headers.append((y, attribute))
        y += _HEADER / _ROW
        for g in groups:
            rows.append((y, g))
            y += 1.0
    span = y
    labels = [
        short
        + (" (ref)" if report.reference(g.attribute) == g.group else "")
        + _mark(_status(statuses, metric, g))
        for (_, g), short in zip(rows, _unique_short([g.group for _, g in rows]), strict=True)
    ]
    left = min(max(0.9, _CHAR * max(len(t) for t in labels) + 0.3), 3.0)
    height = span * _ROW + 0.7

    with matplotlib.rc_context(_rc(key)):
        figure = Figure(figsize=(_WIDTH, height))
        _margins(figure, left=left, right=0.25, top=0.1, bottom=0.45)
        ax = figure.add_subplot()
        ax.set_ylim(span - 0.4, -0.6)
        ax.set_yticks([])
        ax.spines[["left", "top", "right"]].set_visible(False)
        ax.xaxis.set_major_formatter(_value_formatter(metric))
        if metric.kind == "mean" and _unit_label(metric.unit):
            ax.set_xlabel(_plot_text(_unit_label(metric.unit)))
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)

        label_at = ax.get_yaxis_transform()  # x in axes fraction, y in rows
        header_at = blended_transform_factory(figure.transFigure, ax.transData)
        for position, attribute in headers:
            figure.text(
                0.1 / _WIDTH,
                position,
                _plot_text(attribute),
                transform=header_at,
                va="center",
                fontweight="bold",
            )
            if position > 0:
                ax.axhline(position - 0.5, color="#bbbbbb", linewidth=0.6)
        for (position, _), label in zip(rows, labels, strict=True):
            figure.text(
                -0.01, position, _plot_text(label), transform=label_at, va="center", ha="right"
            )

        overall = metric.overall
        low, high = _finite(overall.ci_low), _finite(overall.ci_high)
        if low is not None and high is not None:
            ax.axvspan(low, high, color=_OVERALL_LINE, alpha=0.08, linewidth=0)
        overall_value = _finite(overall.value)
        if overall_value is not None:
            ax.axvline(overall_value, color=_OVERALL_LINE, linestyle="--", linewidth=1.0)

        # The rules' ratio thresholds against each attribute's reference group, as dotted
        # segments over that attribute's rows: a bar beyond one crosses the threshold.
        thresholds = _ratio_thresholds(report, metric)
        threshold_x: list[float] = []
        for attribute, _groups in blocks:
            reference = metric.group(attribute, report.reference(attribute) or "")
            ref_value = (
                None if reference is None or reference.suppressed else reference.estimate.value
            )
            block_ys = [position for position, g in rows if g.attribute == attribute]
            if ref_value is None or not block_ys:
                continue
            for threshold in thresholds:
                threshold_x.append(ref_value * threshold)
                ax.vlines(ref_value * threshold, min(block_ys) - 0.45, max(block_ys) + 0.45,
                          colors=_MUTED, linestyles=":", linewidth=1.2, zorder=3)  # fmt: skip
        shown: list[tuple[float, float, str, str]] = []
        errors: list[tuple[float, float, float, float]] = []
        extent = [0.0, *(v for v in (overall_value, high) if v is not None), *threshold_x]
        for position, group in rows:
            value = None if group.suppressed else _finite(group.estimate.value)
            if value is None:
                note = (
                    f"suppressed (n < {report.min_group_size})"
                    if group.suppressed
                    else "not computable"
                )
                figure.text(
                    0.01,
                    position,
                    note,
                    transform=label_at,
                    va="center",
                    color=_MUTED,
                    style="italic",
                )
                continue
            status = _status(statuses, metric, group)
            colour = _BAR_FLAGGED if status == "alert" else _BAR
            hatch = {"alert": _ALERT_HATCH, "watch": _WATCH_HATCH, "": ""}[status]
            shown.append((position, value, colour, hatch))
            extent.append(value)
            g_low, g_high = _finite(group.estimate.ci_low), _finite(group.estimate.ci_high)
            if g_low is not None and g_high is not None:
                errors.append((position, value, max(value - g_low, 0.0), max(g_high - value, 0.0)))
                extent.extend((g_low, g_high))
        if shown:
            ys, values, colours, hatches = zip(*shown, strict=True)
            bars = ax.barh(ys, values, height=0.62, color=colours, edgecolor="white")
            for bar, hatch in zip(bars, hatches, strict=True):
                if hatch:
                    bar.set_hatch(hatch)
        if errors:
            ys, values, below, above = zip(*errors, strict=True)
            ax.errorbar(
                values,
                ys,
                xerr=[below, above],
                fmt="none",
                ecolor=_OVERALL_LINE,
                elinewidth=0.9,
                capsize=2.5,
            )
        top = max(extent)
        ax.set_xlim(min(min(extent), 0.0), top * 1.06 if top > 0 else 1.0)
        flagged = [
            f"{g.attribute} = {g.group}" for _, g in rows if _status(statuses, metric, g) == "alert"
        ]
        label = (
            f"Bar chart of {metric.title} by group of {', '.join(a for a, _ in blocks)}, "
            f"with confidence intervals and the overall value "
            f"{_format_value(metric, metric.overall.value)}. "
            + (f"Alert for {', '.join(flagged)}." if flagged else "No alert.")
        )
        return _svg(figure, key, label)


_RATIO_TICKS = (0.1, 0.2, 0.33, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def _ratio_thresholds(report: FairnessReport, metric: MetricResult) -> list[float]:
    """Ratio thresholds of the rules that compare this metric with the reference group."""
    found = {
        threshold
        for rule in report.rules
        if fnmatch.fnmatchcase(metric.name, rule.metric) and "reference" in rule.comparisons
        for threshold in (rule.ratio_above, rule.ratio_below)
        if threshold is not None
    }
    return sorted(found)


def _forest_figure(
    metric: MetricResult,
    report: FairnessReport,
    key: str,
    statuses: dict[tuple[str, str, str], tuple[Status, Alert]],
) -> Markup | None:
    """Each group's ratio to its attribute's reference group with its interval, on a log axis,
    against parity (solid line at 1) and the rules' thresholds (dotted lines).

    Where an alert fired: a red triangle and ▲ (the interval is the ratio's own, so whether it
    crosses a threshold line is read directly).
    """
    blocks = [
        (a, [g for g in metric.by_attribute(a) if not g.suppressed])
        for a in _attributes(report, metric)
        if report.assessable(a) and report.reference(a) is not None
    ]
    blocks = [(a, g) for a, g in blocks if any(x.reference_ratio.value for x in g)]
    if not blocks:
        return None
    headers: list[tuple[float, str]] = []
    rows: list[tuple[float, GroupResult]] = []
    y = 0.0
    for attribute, groups in blocks:
        headers.append((y, f"{attribute} (reference: {report.reference(attribute)})"))
        y += _HEADER / _ROW
        for g in groups:
            rows.append((y, g))
            y += 1.0
    span = y
    labels = [
        short + _mark(_status(statuses, metric, g))
        for (_, g), short in zip(rows, _unique_short([g.group for _, g in rows]), strict=True)
    ]
    left = min(max(0.9, _CHAR * max(len(t) for t in labels) + 0.3), 3.0)
    thresholds = _ratio_thresholds(report, metric)
    with matplotlib.rc_context(_rc(key)):
        figure = Figure(figsize=(_WIDTH, span * _ROW + 0.7))
        _margins(figure, left=left, right=0.25, top=0.1, bottom=0.45)
        ax = figure.add_subplot()
        ax.set_xscale("log")
        ax.set_ylim(span - 0.4, -0.6)
        ax.set_yticks([])
        ax.spines[["left", "top", "right"]].set_visible(False)
        ax.set_xlabel("ratio to the reference group (log scale)")
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        label_at = ax.get_yaxis_transform()
        header_at = blended_transform_factory(figure.transFigure, ax.transData)
        for position, text in headers:
            figure.text(0.1 / _WIDTH, position, _plot_text(text), transform=header_at,
                        va="center", fontweight="bold")  # fmt: skip
        for (position, _), label in zip(rows, labels, strict=True):
            figure.text(-0.01, position, _plot_text(label), transform=label_at, va="center",
                        ha="right")  # fmt: skip
        extent = [1.0, *thresholds]
        ax.axvline(1.0, color=_OVERALL_LINE, linewidth=1.0)
        for threshold in thresholds:
            ax.axvline(threshold, color=_MUTED, linestyle=":", linewidth=1.2)
        for position, group in rows:
            ratio = group.reference_ratio
            value = _finite(ratio.value)
            if value is None or value <= 0:
                note = "reference" if report.reference(group.attribute) == group.group else _DASH
                figure.text(0.01, position, note, transform=label_at, va="center",
                            color=_MUTED, style="italic")  # fmt: skip
                continue
            alert = _status(statuses, metric, group) == "alert"
            low, high = _finite(ratio.ci_low), _finite(ratio.ci_high)
            if low is not None and high is not None and low > 0:
                ax.hlines(position, low, high, color=_OVERALL_LINE, linewidth=0.9)
                extent.extend((low, high))
            ax.plot([value], [position], linestyle="none", marker="^" if alert else "o",
                    markersize=6.0 if alert else 4.0,
                    color=_BAR_FLAGGED if alert else _BAR)  # fmt: skip
            extent.append(value)
        low_x, high_x = min(extent) / 1.15, max(extent) * 1.15
        ax.set_xlim(low_x, high_x)
        ticks = [t for t in _RATIO_TICKS if low_x <= t <= high_x]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        lines = ", ".join(f"{t:g}" for t in thresholds) or "none"
        label = (
            f"Forest plot of {metric.title}: each group's ratio to its reference group with "
            f"its confidence interval, parity at 1, rule thresholds at {lines}."
        )
        return _svg(figure, key, label)


def _attributes(report: FairnessReport, metric: MetricResult) -> list[str]:
    """The report's attributes in order, then any others the metric has groups for."""
    names = list(report.attributes)
    names.extend(g.attribute for g in metric.groups if g.attribute not in names)
    return list(dict.fromkeys(names))


def _tick_label(metric: MetricResult, value: float, step: float) -> str:
    if metric.kind == "rate":
        decimals = 0 if step * 100 >= 1 - 1e-9 else 1
        return f"{value * 100:.{decimals}f}%"
    return f"{value:,.4g}"


def _nice_ticks(metric: MetricResult, values: Sequence[float]) -> list[float]:
    """Three or four round tick values covering `values` (from 0 for rates and positive means)."""
    finite = [v for v in values if math.isfinite(v)]
    low, high = min(finite, default=0.0), max(finite, default=1.0)
    if metric.kind == "rate" or low >= 0:
        low = min(low, 0.0)
    if high <= low:
        high = low + (abs(low) or 1.0)
    return [float(t) for t in MaxNLocator(nbins=3).tick_values(low, high)]


def _series_colour(number: int) -> str:
    return _SERIES_COLOURS[number % len(_SERIES_COLOURS)]


def _legend_label(label: str, values: Sequence[float]) -> str:
    shown = any(math.isfinite(v) for v in values)
    return label + ("" if shown else " (no value)")


def _rescale(
    values: Sequence[float], ticks: Sequence[float], base: float, height: float
) -> list[float]:
    """Values mapped onto a panel: the first tick at `base`, the last `height` above it."""
    span = (ticks[-1] - ticks[0]) or 1.0
    return [base + (v - ticks[0]) / span * height for v in values]


def _trend_figure(
    metric: MetricResult, points: Sequence[TrendPoint], report: FairnessReport, key: str
) -> Markup | None:
    """Per attribute, the overall value and each group's value over the windows.

    Small multiples drawn on one Axes (a panel per attribute, each with its own value scale):
    matplotlib's fixed cost per Axes would otherwise dominate the page's rendering time. The
    y data unit is the inch, so panels, gaps and legends are laid out in inches.
    """
    # Every window of the report, also those where this metric has no value (empty windows):
    # the x axis spans them all, so ticks never crowd into the few windows with data.
    ends = sorted({_utc(p.window_end) for p in points})
    points = [p for p in points if p.metric == metric.name]
    if not points:
        return None
    column = {end: index for index, end in enumerate(ends)}
    xs = [float(x) for x in date2num(ends)]  # type: ignore[no-untyped-call]
    series: dict[tuple[str, str], list[float]] = {}
    # Each point's interval (Wilson, from trend_points): whiskers in the line's colour.
    lows: dict[tuple[str, str], list[float]] = {}
    highs: dict[tuple[str, str], list[float]] = {}
    window_n = [0] * len(ends)
    for p in points:
        key_ = (p.attribute, p.group)
        values = series.setdefault(key_, [math.nan] * len(ends))
        low = lows.setdefault(key_, [math.nan] * len(ends))
        high = highs.setdefault(key_, [math.nan] * len(ends))
        value = _finite(p.value)
        at = column[_utc(p.window_end)]
        values[at] = math.nan if value is None else value
        if value is not None and p.low is not None and p.high is not None:
            low[at], high[at] = p.low, p.high
        if p.attribute == _OVERALL:
            window_n[column[_utc(p.window_end)]] = p.n
    finite_windows = sum(
        any(math.isfinite(values[i]) for values in series.values()) for i in range(len(ends))
    )
    if finite_windows == 0:
        return None  # nothing to draw: every window empty or suppressed
    overall = next((v for (a, _g), v in series.items() if a == _OVERALL), None)
    alerted = {
        (a.attribute, a.group)
        for a in report.alerts
        if a.metric == metric.name and ends[-1] == _utc(report.until)
    }
    present = {a for a, _g in series if a != _OVERALL and report.assessable(a)}
    attributes = [a for a in report.attributes if a in present]
    attributes += sorted(present - set(attributes))
    panels: list[tuple[str, list[str]]] = [
        (a, [g for (b, g) in series if b == a]) for a in attributes
    ]
    if not panels and overall is not None:
        panels = [(_OVERALL, [])]
    if not panels:
        return None

    labels = {
        (a, g): _legend_label(label, series[(a, g)])
        for a, gs in panels
        for g, label in zip(gs, _unique_short(gs, 24), strict=True)
    }
    legend_chars = max([len("overall")] + [len(label) + 2 for label in labels.values()])
    right = min(0.5 + legend_chars * _CHAR * 0.9, 2.4)
    entry = 0.125  # inches per legend line
    gap = 0.4  # inches above each panel, for its title
    heights = [max(1.1, entry * (len(groups) + 1) + 0.1) for _, groups in panels]
    plot_height = sum(heights) + gap * len(panels)
    with matplotlib.rc_context(_rc(key)):
        figure = Figure(figsize=(_WIDTH, plot_height + 0.45))
        _margins(figure, left=0.7, right=right, top=0.0, bottom=0.45)
        ax = figure.add_subplot()
        ax.set_ylim(0.0, plot_height)
        ax.set_yticks([])
        ax.spines[["left", "top", "right"]].set_visible(False)
        label_at = ax.get_yaxis_transform()  # x in axes fraction, y in inches from the bottom
        top = plot_height
        grid_y: list[float] = []
        for (attribute, groups), height in zip(panels, heights, strict=True):
            top -= gap
            base = top - height
            named = [("overall", overall)] if overall is not None else []
            named += [(g, series[(attribute, g)]) for g in groups]
            keys = [(_OVERALL, _OVERALL)] if overall is not None else []
            keys += [(attribute, g) for g in groups]
            span = [v for k in keys for v in lows[k] + highs[k]]
            ticks = _nice_ticks(metric, [v for _, values in named for v in values] + span)
            tick_y = _rescale(ticks, ticks, base, height)
            grid_y.extend(tick_y)
            step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
            for tick, y in zip(ticks, tick_y, strict=True):
                label = _tick_label(metric, tick, step)
                figure.text(-0.01, y, label, transform=label_at, ha="right", va="center")
            figure.text(
                0.0,
                top + 0.08,
                _plot_text(attribute),
                transform=label_at,
                fontweight="bold",
                va="bottom",
            )
            for number, (name, values) in enumerate(named):
                is_overall = overall is not None and number == 0
                colour = (
                    _OVERALL_LINE
                    if is_overall
                    else _series_colour(number - len(named) + len(groups))
                )
                key_ = keys[number]
                whiskers = [
                    (x, lo, hi)
                    for x, lo, hi in zip(xs, lows[key_], highs[key_], strict=True)
                    if math.isfinite(lo) and math.isfinite(hi)
                ]
                if whiskers:
                    wx, wlo, whi = zip(*whiskers, strict=True)
                    ax.vlines(
                        wx,
                        _rescale(list(wlo), ticks, base, height),
                        _rescale(list(whi), ticks, base, height),
                        color=colour,
                        linewidth=0.8,
                        alpha=0.55,
                        clip_on=False,
                    )
                ax.plot(
                    xs,
                    _rescale(values, ticks, base, height),
                    color=colour,
                    linewidth=2.0 if is_overall else 1.2,
                    marker="o",
                    markersize=3.0 if is_overall else 2.5,
                    clip_on=False,
                )
                mark = ""
                if not is_overall and (attribute, name) in alerted:
                    # This window's alert: a large red triangle on the last point, and ▲.
                    ax.plot(
                        xs[-1:],
                        _rescale(values[-1:], ticks, base, height),
                        linestyle="none",
                        marker="^",
                        markersize=7.0,
                        color=_BAR_FLAGGED,
                        clip_on=False,
                    )
                    mark = f" {_ALERT_MARK}"
                # A legend of coloured labels: matplotlib's Legend costs more than the panel.
                figure.text(
                    1.02,
                    top - entry * number,
                    "\u2501 " + _plot_text(labels.get((attribute, name), name)) + mark,
                    transform=label_at,
                    color=colour,
                    fontsize=7.0,
                    va="top",
                )
            top = base
        ax.hlines(grid_y, 0.0, 1.0, transform=label_at, color="#dddddd", linewidth=0.6, zorder=0)
        # Few windows: a tick at each window's end, labelled with its date and its studies;
        # many: round dates.
        if len(xs) <= 8:
            ax.xaxis.set_major_locator(FixedLocator(xs))
            tick_text = {
                x: f"{end:%Y-%m-%d}\nn={n:,}" for x, end, n in zip(xs, ends, window_n, strict=True)
            }
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: tick_text.get(v, "")))
        else:
            locator = AutoDateLocator(maxticks=7)  # type: ignore[no-untyped-call]
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
        ax.set_axisbelow(True)
        # Limits from all windows (not autoscaled to the finite points), half a window's
        # spacing beyond the first and last.
        pad = (xs[-1] - xs[0]) / (2 * (len(xs) - 1)) if len(xs) > 1 else 1.0
        ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        label = (
            f"Trend of {metric.title} over {len(xs)} windows ending {ends[0]:%Y-%m-%d} to "
            f"{ends[-1]:%Y-%m-%d}, {finite_windows} with values, overall and by group of "
            f"{', '.join(a for a, _ in panels)}, each value with its interval."
        )
        return _svg(figure, key, label)


# --- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    group: str
    n: str
    value: str
    ratio: str
    difference: str
    reference_ratio: str
    status: Status  # "alert", "watch" or "": the only thing the row's colour and mark show
    status_text: str
    suppressed: bool


@dataclass(frozen=True)
class _Block:
    attribute: str
    reference: str
    rows: tuple[_Row, ...]


@dataclass(frozen=True)
class _Table:
    anchor: str
    title: str
    name: str
    population: str
    overall: str
    overall_n: str
    blocks: tuple[_Block, ...]
    note: str = ""


_WITHHELD = "withheld"


def _withheld(metric: MetricResult, attribute: str) -> set[str]:
    """Groups whose counts are withheld so that no suppressed count can be derived from the
    overall count (complementary suppression, as in the MeasureReport)."""
    return complementary_suppression(
        [(g.group, g.n, g.suppressed) for g in metric.by_attribute(attribute)]
    )


def _status_text(status: Status, alert: Alert | None) -> str:
    if alert is None or not status:
        return ""
    against = "overall" if alert.against == "overall" else alert.against
    mark = _ALERT_MARK if status == "alert" else _WATCH_MARK
    verdict = "alert" if status == "alert" else "would alert with more studies"
    threshold = f", {alert.threshold}" if alert.threshold else ""
    return f"{mark} {verdict}: {alert.rule} (vs {against}{threshold})"


def _row(
    metric: MetricResult,
    group: GroupResult,
    report: FairnessReport,
    statuses: dict[tuple[str, str, str], tuple[Status, Alert]],
) -> _Row:
    if group.suppressed:
        return _Row(
            group.group, "suppressed", f"n < {report.min_group_size}", _DASH, _DASH, _DASH, "",
            "", True,
        )  # fmt: skip
    withheld = group.group in _withheld(metric, group.attribute)
    found = statuses.get((metric.name, group.attribute, group.group))
    status: Status = "" if found is None else found[0]
    alert = None if found is None else found[1]
    is_reference = report.reference(group.attribute) == group.group
    return _Row(
        group=group.group,
        n=_WITHHELD if withheld else f"{group.n:,}",
        value=_with_ci(group.estimate, "value", metric),
        ratio=_with_ci(group.ratio, "ratio", metric),
        difference=_with_ci(group.difference, "difference", metric),
        reference_ratio=(
            "reference" if is_reference else _with_ci(group.reference_ratio, "ratio", metric)
        ),
        status=status,
        status_text=_status_text(status, alert),
        suppressed=False,
    )


def _constant(metric: MetricResult) -> bool:
    """Every published group has exactly the overall value (e.g. a finding no draft marked)."""
    overall = _finite(metric.overall.value)
    values = [_finite(g.estimate.value) for g in metric.groups if not g.suppressed]
    return overall is not None and bool(values) and all(v == overall for v in values)


def _table(
    metric: MetricResult,
    report: FairnessReport,
    anchor: str,
    statuses: dict[tuple[str, str, str], tuple[Status, Alert]],
) -> _Table:
    blocks = []
    for attribute in _attributes(report, metric):
        groups = metric.by_attribute(attribute)
        if groups and report.assessable(attribute):  # the others: see data coverage
            rows = tuple(_row(metric, g, report, statuses) for g in groups)
            blocks.append(_Block(attribute, report.reference(attribute) or _DASH, rows))
    # A table of nothing but dashes says less than one line (and costs pages in print).
    note = ""
    if metric.overall_n == 0:
        blocks, note = [], "No studies in its population in this window."
    elif blocks and all(r.suppressed for b in blocks for r in b.rows):
        blocks = []
        note = f"Every group has fewer than {report.min_group_size} studies: all suppressed."
    elif blocks and _constant(metric):
        blocks = []
        note = (
            f"{_format_value(metric, metric.overall.value)} in every group shown: no variation "
            "between groups."
        )
    return _Table(
        anchor=anchor,
        title=metric.title,
        name=metric.name,
        population=metric.population,
        overall=_with_ci(metric.overall, "value", metric),
        overall_n=f"{metric.overall_n:,}",
        blocks=tuple(blocks),
        note=note,
    )


# --- alert cards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Card:
    headline: str
    evidence: str
    comparison: str
    since_last: str
    action: str
    owner: str
    link: str  # id of the alert's chart, "" when the metric has none
    rule: str
    metric: str
    cell: str  # attribute=group, as the logs and events name it


def _counted(metric: MetricResult, who: str, n: int | None, events: float | None,
             value: float | None, *, withheld: bool = False) -> str:  # fmt: skip
    shown = _format_value(metric, value)
    if withheld:
        return f"{who}: {shown} (count withheld: it would reveal a suppressed group's)"
    if n is None:
        return f"{who}: {shown}"
    if metric.kind == "rate" and events is not None:
        return f"{who}: {round(events):,} of {n:,} studies ({shown})"
    return f"{who}: mean {shown} over {n:,} studies"


def _card(alert: Alert, report: FairnessReport, links: dict[str, str]) -> _Card:
    """An alert in plain words: who, against whom, how much, how sure, since when, what next."""
    metric = report.metric(alert.metric)
    ratio = alert.ratio
    higher = ratio.value is not None and ratio.value > 1.0
    if alert.against == "overall":
        against = "all studies (the overall value)"
        who_against = "All studies"
    else:
        role = "the reference group" if alert.comparison == "reference" else "the best group"
        if alert.comparison == "between" and higher:
            role = "the lowest group"
        against = f"{alert.attribute} = {alert.against} ({role})"
        who_against = f"{alert.attribute} = {alert.against}"
    headline = (
        f"{metric.title}: {'higher' if higher else 'lower'} for {alert.attribute} = "
        f"{alert.group} than for {against}"
    )
    withheld = _withheld(metric, alert.attribute)
    evidence = (
        _counted(metric, f"{alert.attribute} = {alert.group}", alert.n, alert.numerator,
                 alert.estimate.value, withheld=alert.group in withheld)
        + "; "
        + _counted(metric, who_against, alert.against_n, alert.against_numerator,
                   alert.against_estimate.value,
                   withheld=alert.against != "overall" and alert.against in withheld)
        + "."
    )  # fmt: skip
    confidence = f"{report.confidence * 100:g}%"
    low, high = _finite(ratio.ci_low), _finite(ratio.ci_high)
    interval = (
        f" ({confidence} CI {_format_ratio(low)}–{_format_ratio(high)})"
        if low is not None and high is not None
        else ""
    )
    rule_words = (
        alert.threshold.replace("ratio", "the ratio is")
        .replace("difference", "the difference is")
        .replace(" > ", " above ")
        .replace(" < ", " below ")
    )
    effect = (
        f" and the difference is at least "
        f"{_format_value(metric, alert.min_effect, signed=True).lstrip('+')}"
        if alert.min_effect
        else ""
    )
    q = (
        f" Significant after Benjamini–Hochberg control over {report.tests:,} comparisons "
        f"(q = {alert.q_value:.2g}, false discovery rate {report.false_discovery_rate:g})."
        if alert.q_value is not None
        else ""
    )
    comparison = (
        f"Ratio {_format_ratio(ratio.value)}{interval}, difference "
        f"{_format_value(metric, alert.difference.value, signed=True)}; the rule alerts when "
        f"{rule_words}{effect}.{q}"
    )
    since_last = {
        "new": "New: it did not fire in the previous window.",
        "persisting": "Persisting: it also fired in the previous window.",
        None: "No previous window was evaluated.",
    }[alert.since_last]
    return _Card(
        headline=headline,
        evidence=evidence,
        comparison=comparison,
        since_last=since_last,
        action=alert.action or "Not set in the rule.",
        owner=alert.owner or "Not set in the rule.",
        link=links.get(alert.metric, ""),
        rule=alert.rule,
        metric=alert.metric,
        cell=f"{alert.attribute}={alert.group}",
    )


# --- coverage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CoverageRow:
    group: str
    studies: str
    drafted: str
    signed: str
    suppressed: bool


@dataclass(frozen=True)
class _Coverage:
    name: str
    summary: str
    rows: tuple[_CoverageRow, ...]


def _coverage_row(group: GroupCoverage, min_n: int, *, withheld: bool) -> _CoverageRow:
    if group.suppressed:
        return _CoverageRow(group.group, "suppressed", f"n < {min_n}", _DASH, True)
    if withheld:
        share = f"{group.with_final_report / group.drafted:.0%}" if group.drafted else _DASH
        return _CoverageRow(group.group, _WITHHELD, _WITHHELD, share, False)
    share = f" ({group.with_final_report / group.drafted:.0%})" if group.drafted else ""
    return _CoverageRow(
        group=group.group,
        studies=f"{group.studies:,}",
        drafted=f"{group.drafted:,}",
        signed=f"{group.with_final_report:,}{share}",
        suppressed=False,
    )


def _coverage(report: FairnessReport) -> list[_Coverage]:
    shown = []
    for c in report.coverage:
        summary = (
            f"{c.unknown_share:.0%} unknown, {c.known_groups} known "
            f"group{'s' if c.known_groups != 1 else ''}"
        )
        if not c.assessable:
            summary += f"; not assessable: {c.reason}"
        withheld = complementary_suppression([(g.group, g.studies, g.suppressed) for g in c.groups])
        rows = tuple(
            _coverage_row(g, report.min_group_size, withheld=g.group in withheld) for g in c.groups
        )
        shown.append(_Coverage(c.attribute, summary, rows))
    return shown


def _not_assessable(report: FairnessReport) -> str:
    return ", ".join(f"{c.attribute} ({c.reason})" for c in report.not_assessable())


# --- page -------------------------------------------------------------------------------------

_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Draft fairness report, {{ window }}</title>
<style>
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; font-size: 14px;
  color: #222; margin: 1.5em auto; max-width: 60em; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.1em; margin-bottom: 0.2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: bold; }
dl.meta dd { margin: 0; }
.alerts { border: 2px solid #b00020; background: #fdecee; color: #700014;
  padding: 0.6em 1em; margin: 1em 0; border-radius: 4px; }
.alerts h2 { border: 0; margin: 0 0 0.3em; font-size: 1.15em; }
.alert-card { border-top: 1px solid #e8b4ba; padding: 0.3em 0; }
.alert-card:first-of-type { border-top: 0; }
.alert-card h3 { margin: 0.2em 0; }
.alert-card p { margin: 0.2em 0; }
.alerts .rule { color: #555; font-size: 0.85em; }
.alerts a { color: #700014; }
.no-alerts { border: 2px solid #1b7a2f; background: #e9f6ec; color: #124d1f;
  padding: 0.6em 1em; margin: 1em 0; border-radius: 4px; font-weight: bold; }
figure { margin: 1em 0 2em; }
figcaption { font-weight: bold; margin-bottom: 0.3em; }
figcaption .note { font-weight: normal; color: #555; font-size: 0.9em; }
figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; width: 100%; font-size: 0.9em; }
th, td { border-bottom: 1px solid #e2e2e2; padding: 0.25em 0.5em; text-align: right;
  vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
tbody th.attribute { text-align: left; background: #f3f3f3; font-weight: bold; }
td.flag { background: #fde0dc; color: #8a1000; font-weight: bold; text-align: left; }
td.watch { color: #444; font-style: italic; text-align: left; }
th .reference { font-weight: normal; color: #555; }
tr.suppressed td { color: #777; font-style: italic; }
p.population, p.overall { margin: 0.2em 0; }
.not-assessable { border-left: 4px solid #555; padding-left: 0.6em; }
.legend-note { color: #555; font-size: 0.9em; }
@media print {
  @page { size: A4; margin: 12mm; }
  body { max-width: none; margin: 0; padding: 0; font-size: 9pt; }
  h2 { break-after: avoid; margin-top: 1em; }
  h3, figcaption { break-after: avoid; }
  figure, .alert-card, .no-alerts, tr, p { break-inside: avoid; }
  figure { margin: 0.5em 0 1em; }
  figure svg { max-height: 24cm; }
  table { font-size: 7.5pt; margin-bottom: 0.8em; }
  th, td { padding: 0.1em 0.3em; }
  a { color: inherit; text-decoration: none; }
  .alerts, td.flag, .no-alerts { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
</style>
</head>
<body>
<header>
<h1>Draft fairness report</h1>
<dl class="meta">
<dt>Window</dt><dd>{{ window }}</dd>
<dt>Generated</dt><dd>{{ generated }}</dd>
<dt>Model versions</dt><dd>{{ models }}</dd>
<dt>Studies</dt><dd>{{ studies }} in the window; {{ drafted }} drafted; \
{{ with_final }} with a signed final report\
{% if unreadable %}; {{ unreadable }} whose signed report the EHR failed to return{% endif %}</dd>
<dt>Method</dt><dd>{{ method }}</dd>
</dl>
</header>
{% if alerts %}
<section class="alerts" id="alerts">
<h2>{{ alerts | length }} alert{{ "s" if alerts | length != 1 }} fired</h2>
{% if not_assessable %}
<p>Not assessed: {{ not_assessable }}; see data coverage.</p>
{% endif %}
{% for card in alerts %}
<article class="alert-card" id="alert-{{ loop.index }}">
<h3><span aria-hidden="true">▲</span> {{ card.headline }}</h3>
<p>{{ card.evidence }}</p>
<p>{{ card.comparison }}</p>
<p>{{ card.since_last }}</p>
<p><strong>Action:</strong> {{ card.action }} <strong>Owner:</strong> {{ card.owner }}</p>
<p class="rule">{% if card.link %}<a href="#{{ card.link }}">See the chart</a> · {% endif %}\
rule {{ card.rule }} · <code>{{ card.metric }}</code> · <code>{{ card.cell }}</code></p>
</article>
{% endfor %}
</section>
{% else %}
<p class="no-alerts" id="alerts">No alert rule fired in this window.\
{% if not_assessable %} Not assessed: {{ not_assessable }}; see data coverage.{% endif %}</p>
{% endif %}
<section id="coverage">
<h2>Data coverage</h2>
{% if not_assessable %}
<p class="not-assessable"><strong>Not assessable:</strong> {{ not_assessable }}. Fairness \
across these attributes cannot be judged from this window: they are left out of the charts \
and the metric tables.</p>
{% endif %}
<p class="legend-note">Unknown: studies whose attribute was not recorded. Signed report: \
drafted studies with a signed final report to score the draft against (agreement metrics such \
as sensitivity and underdiagnosis count only those). Groups smaller than {{ min_group_size }} \
studies are suppressed.</p>
<table class="coverage">
<thead><tr><th>Attribute / group</th><th>Studies</th><th>Drafted</th>\
<th>With signed report</th></tr></thead>
{% for attribute in coverage %}
<tbody>
<tr><th class="attribute" colspan="4">{{ attribute.name }} \
<span class="reference">({{ attribute.summary }})</span></th></tr>
{% for row in attribute.rows %}
<tr{% if row.suppressed %} class="suppressed"{% endif %}><td>{{ row.group }}</td>\
<td>{{ row.studies }}</td><td>{{ row.drafted }}</td><td>{{ row.signed }}</td></tr>
{% endfor %}
</tbody>
{% endfor %}
</table>
</section>
{% if bars %}
<section id="headline">
<h2>Headline metrics by subgroup</h2>
<p class="legend-note">Bars: group value; whiskers: the group's own {{ confidence }} \
confidence interval. Dashed line: overall value (shaded: its interval). Dotted segments: \
the alert rules' ratio thresholds applied to the attribute's reference group. Red hatched bars \
marked \
▲: an alert rule fired for the group (only in the harmful direction); hatched bars marked △: a \
rule would fire with more studies. (ref): the attribute's reference group. Groups smaller than \
{{ min_group_size }} are suppressed and drawn without a bar.</p>
{% for fig in bars %}
<figure id="plot-{{ fig.anchor }}">
<figcaption>{{ fig.title }} <span class="note">overall {{ fig.overall }}; {{ fig.population }}\
</span></figcaption>
{{ fig.svg }}
</figure>
{% endfor %}
</section>
{% endif %}
{% if forests %}
<section id="forest">
<h2>Ratios to the reference group</h2>
<p class="legend-note">Each group's ratio to its attribute's reference group, with its \
{{ confidence }} confidence interval (log scale). Solid line: parity (1); dotted lines: the \
alert rules' ratio thresholds. Red triangles marked ▲: an alert fired.</p>
{% for fig in forests %}
<figure id="forest-{{ fig.anchor }}">
<figcaption>{{ fig.title }}</figcaption>
{{ fig.svg }}
</figure>
{% endfor %}
</section>
{% endif %}
{% if trends %}
<section id="trend">
<h2>Trend over windows</h2>
<p class="legend-note">Point estimates per window (by window end, UTC); the thick black line is \
the overall value. Gaps are windows where the group was suppressed or had no studies.</p>
{% for fig in trends %}
<figure id="trend-{{ fig.anchor }}">
<figcaption>{{ fig.title }}</figcaption>
{{ fig.svg }}
</figure>
{% endfor %}
</section>
{% endif %}
<section id="tables">
<h2>All metrics</h2>
<p class="legend-note">Value, ratio to the overall value and difference from it (for rates in \
percentage points, pp), and ratio to the attribute's reference group, each with its \
{{ confidence }} bootstrap confidence interval. n "withheld": counts held back so that no \
suppressed group's count can be derived by subtraction from the total. Rule: ▲ where an alert \
rule fired (highlighted), △ where one would fire with more studies; nothing elsewhere, whatever \
the intervals.</p>
{% for table in tables %}
<section class="metric" id="metric-{{ table.anchor }}">
<h3>{{ table.title }}</h3>
<p class="population">Population: {{ table.population }} <code>{{ table.name }}</code></p>
<p class="overall">Overall: <strong>{{ table.overall }}</strong> (n = {{ table.overall_n }})</p>
{% if table.blocks %}
<table>
<thead><tr><th>Group</th><th>n</th><th>Value [CI]</th><th>Ratio to overall [CI]</th>\
<th>Difference to overall [CI]</th><th>Ratio to reference [CI]</th><th>Rule</th></tr></thead>
{% for block in table.blocks %}
<tbody>
<tr><th class="attribute" colspan="7">{{ block.attribute }} \
<span class="reference">(reference: {{ block.reference }})</span></th></tr>
{% for row in block.rows %}
<tr{% if row.suppressed %} class="suppressed"{% endif %}><td>{{ row.group }}</td>\
<td>{{ row.n }}</td><td>{{ row.value }}</td><td>{{ row.ratio }}</td>\
<td>{{ row.difference }}</td><td>{{ row.reference_ratio }}</td>\
<td{% if row.status %} class="{{ 'flag' if row.status == 'alert' else 'watch' }}"{% endif %}>\
{{ row.status_text }}</td></tr>
{% endfor %}
</tbody>
{% endfor %}
</table>
{% elif table.note %}
<p class="legend-note">{{ table.note }}</p>
{% endif %}
</section>
{% endfor %}
</section>
<section id="methods">
<h2>Methods</h2>
<p>Each metric is a ratio of sums over the studies of a group (a proportion, or a mean), \
computed per group of each attribute. Intervals are {{ confidence }} percentile intervals of \
{{ n_boot }} bootstrap resamples of the window's studies; a group's value, its comparisons and \
the overall value come from the same resamples.</p>
<p>Each group is compared in three ways: with the overall value (which contains the group and \
so dilutes a gap), with its attribute's reference group ({{ references }}; by default the \
largest known group, never <code>unknown</code>), and between groups (the highest against the \
lowest known group, the extreme pair's p-value multiplied by the number of pairs). Alert rules \
name the comparisons they use, a threshold (ratio or difference) whose side gives the harmful \
direction, and a minimum practical effect.</p>
<p>A rule fires only when the comparison crosses its threshold by at least that effect, its \
interval lies beyond parity, and it survives Benjamini–Hochberg control of the false discovery \
rate at {{ fdr }} over the {{ tests }} comparisons the rules examine in this report (p-values \
from the bootstrap standard error). A comparison that crosses a threshold without that evidence \
is marked "would alert with more studies" and is not an alert. Colour and marks show nothing \
else: an interval that excludes 1 is not, by itself, an alert.</p>
<p>Groups with fewer than {{ min_group_size }} studies in a metric's population are suppressed: \
no value, no count. Where exactly one group of an attribute is suppressed, the counts of one \
more group are withheld (complementary suppression), so that the total minus the published \
counts never gives a suppressed count. A missing attribute is the group <code>unknown</code>, \
reported like any other. An attribute with one known group, or with more than the allowed share \
unknown, is not assessable: it is listed under data coverage and left out of the charts and \
tables.</p>
<p>Agreement metrics (sensitivity, specificity, underdiagnosis: the draft says no finding where \
the signed report has one, after Seyyed-Kalantari et al., 2021) count only drafted studies with \
a signed final report, labelled by a negation- and uncertainty-aware rule labeler.</p>
</section>
</body>
</html>
"""


@dataclass(frozen=True)
class _Plot:
    anchor: str
    title: str
    overall: str
    population: str
    svg: Markup


@cache
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.from_string(_TEMPLATE)


def _anchor(index: int, name: str) -> str:
    return f"{index}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def render_html(report: FairnessReport, *, headline: Sequence[str] = DEFAULT_HEADLINE) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, nothing external)."""
    by_name = {m.name: m for m in report.metrics}
    # The headline metrics, then every other metric an alert fired for (its card links there).
    plotted = [*headline, *(a.metric for a in report.alerts)]
    headline_metrics = [by_name[n] for n in dict.fromkeys(plotted) if n in by_name]

    statuses = _statuses(report)
    forests: list[_Plot] = []
    bars: list[_Plot] = []
    trends: list[_Plot] = []
    links = {m.name: f"metric-{_anchor(i, m.name)}" for i, m in enumerate(report.metrics)}
    for index, metric in enumerate(headline_metrics):
        anchor = _anchor(index, metric.name)
        overall = _with_ci(metric.overall, "value", metric)
        svg = _bar_figure(metric, report, f"bar{index}", statuses)
        if svg is not None:
            links[metric.name] = f"plot-{anchor}"
            bars.append(_Plot(anchor, metric.title, overall, metric.population, svg))
        svg = _forest_figure(metric, report, f"forest{index}", statuses)
        if svg is not None:
            forests.append(_Plot(anchor, metric.title, overall, metric.population, svg))
        if report.trend:
            svg = _trend_figure(metric, report.trend, report, f"trend{index}")
            if svg is not None:
                trends.append(_Plot(anchor, metric.title, overall, metric.population, svg))

    confidence = f"{report.confidence * 100:g}%"
    method = (
        f"{report.n_boot:,} bootstrap samples; {confidence} confidence intervals; "
        f"groups smaller than {report.min_group_size} are suppressed."
    )
    return _template().render(
        window=f"{_format_time(report.since)} – {_format_time(report.until)} UTC",
        generated=f"{_format_time(report.generated)} UTC",
        models=", ".join(report.model_versions) or "none recorded",
        studies=f"{report.studies:,}",
        drafted=f"{report.drafted:,}",
        with_final=f"{report.with_final_report:,}",
        unreadable=f"{report.signed_unreadable:,}" if report.signed_unreadable else "",
        method=method,
        confidence=confidence,
        min_group_size=report.min_group_size,
        alerts=[_card(a, report, links) for a in report.alerts],
        coverage=_coverage(report),
        n_boot=f"{report.n_boot:,}",
        fdr=f"{report.false_discovery_rate:g}",
        tests=f"{report.tests:,}",
        references=", ".join(f"{a}: {g}" for a, g in report.reference_groups) or "none",
        not_assessable=_not_assessable(report),
        bars=bars,
        forests=forests,
        trends=trends,
        tables=[
            _table(m, report, _anchor(i, m.name), statuses) for i, m in enumerate(report.metrics)
        ],
    )
