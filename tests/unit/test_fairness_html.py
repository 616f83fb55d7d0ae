from __future__ import annotations

import dataclasses
import datetime as dt
import re
from html.parser import HTMLParser

import pytest

from pipeline.fairness_html import DEFAULT_HEADLINE, render_html
from pipeline.fairness_types import (
    UNKNOWN,
    Alert,
    Estimate,
    FairnessReport,
    GroupResult,
    MetricResult,
    TrendPoint,
)

pytestmark = pytest.mark.unit

UTC = dt.UTC
SINCE = dt.datetime(2025, 3, 1, tzinfo=UTC)
UNTIL = dt.datetime(2025, 4, 1, tzinfo=UTC)
ALERT_MESSAGE = "Underdiagnosis rate for race=Black is 1.8 times the overall rate"
# A value no other number in the report formats to; set on the suppressed group on purpose (the
# computation leaves it None) to prove the renderer never reads a suppressed cell's numbers.
SECRET = 0.7319
SECRET_N = 4937
NAMESPACES = ("http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


def group(
    attribute: str,
    name: str,
    n: int,
    value: float,
    overall: float,
    *,
    ratio_ci: tuple[float, float] = (0.8, 1.2),
    suppressed: bool = False,
) -> GroupResult:
    return GroupResult(
        attribute=attribute,
        group=name,
        n=n,
        numerator=value * n,
        suppressed=suppressed,
        estimate=Estimate(value, value - 0.03, value + 0.03),
        ratio=Estimate(value / overall, *ratio_ci),
        difference=Estimate(value - overall, value - overall - 0.03, value - overall + 0.03),
    )


def rate_metric(name: str, title: str, overall: float) -> MetricResult:
    groups = (
        group("sex", "female", 410, overall * 0.9, overall),
        group("sex", "male", 380, overall * 1.1, overall),
        group("sex", UNKNOWN, 45, overall * 1.3, overall, ratio_ci=(1.05, 1.6)),
        group("race", "White", 500, overall * 0.95, overall, ratio_ci=(0.85, 0.98)),
        group("race", "Black", 180, overall * 1.8, overall, ratio_ci=(1.3, 2.4)),
        # Suppressed, with numbers it must never show.
        group("race", "Pacific Islander", SECRET_N, SECRET, overall, suppressed=True),
        group("race", UNKNOWN, 120, overall - 0.0004, overall),
    )
    return MetricResult(
        name=name,
        title=title,
        kind="rate",
        unit="1",
        population="drafted studies with a signed final report",
        overall_n=815,
        overall_numerator=overall * 815,
        overall=Estimate(overall, overall - 0.02, overall + 0.02),
        groups=groups,
    )


def mean_metric() -> MetricResult:
    groups = (
        GroupResult("sex", "female", 410, 410 * 12.5, False, Estimate(12.5, 11.9, 13.1),
                    Estimate(0.98, 0.93, 1.03), Estimate(-0.25, -0.9, 0.4)),
        GroupResult("sex", "male", 380, 380 * 13.0, False, Estimate(13.0, 12.3, 13.6),
                    Estimate(1.02, 0.97, 1.07), Estimate(0.25, -0.4, 0.9)),
    )  # fmt: skip
    return MetricResult(
        name="latency_mean",
        title="Drafting time",
        kind="mean",
        unit="s",
        population="drafted studies",
        overall_n=790,
        overall_numerator=790 * 12.75,
        overall=Estimate(12.75, 12.3, 13.2),
        groups=groups,
    )


def trend(metric: str) -> tuple[TrendPoint, ...]:
    points = []
    for week in range(4):
        start = SINCE + dt.timedelta(days=7 * week)
        end = start + dt.timedelta(days=7)
        points.append(TrendPoint(start, end, metric, "overall", "overall", 200, 0.1 + week / 100))
        points.append(TrendPoint(start, end, metric, "sex", "female", 100, 0.09))
        # Suppressed in week 2: a gap.
        value = None if week == 2 else 0.11
        points.append(TrendPoint(start, end, metric, "sex", "male", 100 if value else 5, value))
    return tuple(points)


def make_report(*, alerts: bool = True, with_trend: bool = True) -> FairnessReport:
    underdiagnosis = rate_metric("underdiagnosis_rate", "Underdiagnosis rate", 0.12)
    alert = Alert(
        rule="ratio_high",
        metric="underdiagnosis_rate",
        attribute="race",
        group="Black",
        n=180,
        estimate=Estimate(0.216, 0.18, 0.25),
        overall=Estimate(0.12, 0.1, 0.14),
        ratio=Estimate(1.8, 1.3, 2.4),
        difference=Estimate(0.096, 0.06, 0.13),
        message=ALERT_MESSAGE,
    )
    return FairnessReport(
        since=SINCE,
        until=UNTIL,
        generated=dt.datetime(2025, 4, 1, 6, 30, tzinfo=UTC),
        model_versions=("medgemma-4b@abc123",),
        studies=1000,
        drafted=900,
        with_final_report=815,
        min_group_size=30,
        n_boot=1000,
        confidence=0.95,
        attributes=("sex", "race"),
        metrics=(
            underdiagnosis,
            rate_metric("critical_rate", "Critical flag rate", 0.05),
            mean_metric(),
        ),
        alerts=(alert,) if alerts else (),
        trend=trend("underdiagnosis_rate") if with_trend else (),
    )


class Structure(HTMLParser):
    """Checks that every element is closed in order; collects table rows and link targets."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.references: list[str] = []
        self.ids: list[str] = []
        self.rows: list[list[tuple[str, str]]] = []  # (text, class) per cell
        self._cell: list[str] | None = None
        self._cell_class = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attributes(attrs)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell, self._cell_class = [], dict(attrs).get("class") or ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._attributes(attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(("".join(self._cell).strip(), self._cell_class))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def _attributes(self, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "data", "srcset"):
                self.references.append(value or "")
            if name == "id":
                self.ids.append(value or "")


def parse(html: str) -> Structure:
    parser = Structure()
    parser.feed(html)
    parser.close()
    return parser


def row(html: str, metric: str, attribute: str, group_name: str) -> list[tuple[str, str]]:
    """The cells of `group_name`'s row under `attribute` in `metric`'s table."""
    start = re.search(rf'<section class="metric" id="metric-\d+-{metric}">', html)
    assert start is not None, metric
    section = html[start.start() : html.index("</section>", start.start())]
    seen = False
    for cells in parse(section).rows:
        if cells and cells[0][0].split(" (reference")[0] == attribute:
            seen = True
        elif seen and cells and cells[0][0] == group_name:
            return cells
    raise AssertionError(f"no row {group_name!r} under {attribute!r} in {metric}")


@pytest.fixture(scope="module")
def html() -> str:
    return render_html(make_report())


def test_page_is_well_formed_and_shows_the_alert_first(html: str) -> None:
    parser = parse(html)
    assert parser.errors == []
    assert parser.stack == []
    assert html.startswith("<!DOCTYPE html>")
    assert "Draft fairness report" in html
    card = "Underdiagnosis rate: higher for race = Black than for all studies (the overall value)"
    assert card in html
    assert "No alert rule fired" not in html
    # The alert box comes before every plot and table.
    assert html.index(card) < html.index("<svg") < html.index("<table>")
    assert "2025-03-01 00:00 – 2025-04-01 00:00 UTC" in html
    assert "medgemma-4b@abc123" in html
    assert "groups smaller than 30 are suppressed" in html
    assert "1,000 bootstrap samples; 95% confidence intervals" in html


def test_plots_are_inline_svg_one_per_headline_metric_and_trend(html: str) -> None:
    # underdiagnosis_rate and critical_rate are headline metrics; only the first has a trend.
    assert html.count("<svg") == 3
    assert html.count("</svg>") == 3
    assert "<img" not in html and "<?xml" not in html and "<!DOCTYPE svg" not in html
    svg = html[html.index("<svg") : html.rindex("</svg>")]
    # Text stays text in the SVG (svg.fonttype none): the groups and the suppressed label are there.
    assert ">Pacific Islander<" in svg
    assert ">suppressed (n &lt; 30)<" in svg
    assert f">{UNKNOWN}<" in svg


def test_nothing_is_loaded_from_outside_the_page(html: str) -> None:
    parser = parse(html)
    assert parser.references, "the SVGs reference their own markers and clip paths"
    assert all(ref.startswith("#") for ref in parser.references), parser.references
    rest = html
    for namespace in NAMESPACES:
        rest = rest.replace(f'"{namespace}"', "")
    assert "http://" not in rest and "https://" not in rest
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert re.findall(r"url\((?!#)", html) == []


def test_ids_are_unique_across_the_inlined_svgs(html: str) -> None:
    ids = parse(html).ids
    assert len(ids) > 10
    assert len(ids) == len(set(ids))
    referenced = {ref[1:] for ref in parse(html).references}
    referenced |= set(re.findall(r"url\(#([^)]+)\)", html))
    assert referenced <= set(ids)


def test_suppressed_group_shows_no_numbers(html: str) -> None:
    cells = row(html, "underdiagnosis_rate", "race", "Pacific Islander")
    assert [text for text, _ in cells] == [
        "Pacific Islander", "suppressed", "n < 30", "—", "—", "—", "",
    ]  # fmt: skip
    for hidden in (f"{SECRET * 100:.1f}", f"{SECRET:.2f}", str(SECRET), f"{SECRET_N:,}"):
        assert hidden not in html, hidden
    assert str(SECRET_N) not in html


def test_unknown_group_is_reported_like_any_other(html: str) -> None:
    cells = row(html, "underdiagnosis_rate", "sex", UNKNOWN)
    assert cells[1][0] == "45"
    assert cells[2][0] == "15.6% [12.6%, 18.6%]"  # 0.12 * 1.3, CI ± 3 points
    assert cells[3] == ("1.30 [1.05, 1.60]", "")  # an interval excluding 1 is not an alert
    assert cells[4][0] == "+3.6 pp [+0.6 pp, +6.6 pp]"


def test_differences_that_round_to_zero_have_no_minus_sign(html: str) -> None:
    cells = row(html, "underdiagnosis_rate", "race", UNKNOWN)
    assert cells[4][0] == "+0.0 pp [-3.0 pp, +3.0 pp]"
    assert "-0.0" not in html[html.index('<section id="tables">') :]


def test_only_cells_where_a_rule_fired_are_flagged(html: str) -> None:
    """Not every interval that excludes 1: only the alert's cell, with a mark and its rule."""
    black = row(html, "underdiagnosis_rate", "race", "Black")
    assert black[-1] == ("\u25b2 alert: ratio_high (vs overall)", "flag")
    flagged = [
        (metric, attribute, name)
        for metric in ("underdiagnosis_rate", "critical_rate", "latency_mean")
        for attribute, names in (("sex", ("female", "male")), ("race", ("White", "Black")))
        for name in names
        if metric != "latency_mean" or attribute == "sex"
        if any(css for _, css in row(html, metric, attribute, name))
    ]
    assert flagged == [("underdiagnosis_rate", "race", "Black")]


def test_means_have_two_decimals_and_their_unit(html: str) -> None:
    assert "Overall: <strong>12.75 s [12.30 s, 13.20 s]</strong> (n = 790)" in html
    cells = row(html, "latency_mean", "sex", "male")
    assert [text for text, _ in cells] == [
        "male",
        "380",
        "13.00 s [12.30 s, 13.60 s]",
        "1.02 [0.97, 1.07]",
        "+0.25 s [-0.40 s, +0.90 s]",
        "—",
        "",
    ]


def test_trend_plot_has_a_line_per_group_and_the_overall(html: str) -> None:
    start = html.index('<figure id="trend-0-underdiagnosis_rate">')
    trend_svg = html[start : html.index("</figure>", start)]
    for label in ("overall", "female", "male"):
        assert f"\u2501 {label}<" in trend_svg
    assert "2025-03-" in trend_svg  # dated x axis: each window end as a date


def test_metrics_an_alert_fired_for_are_plotted_even_if_not_headline() -> None:
    html = render_html(make_report(), headline=("latency_mean",))
    assert 'id="plot-1-underdiagnosis_rate"' in html
    assert '<a href="#plot-1-underdiagnosis_rate">See the chart</a>' in html


def test_the_alert_card_says_it_in_plain_words() -> None:
    alert = dataclasses.replace(
        make_report().alerts[0],
        comparison="reference",
        against="White",
        against_estimate=Estimate(0.114, 0.1, 0.13),
        against_n=500,
        against_numerator=57,
        numerator=39,
        threshold="ratio > 1.25",
        min_effect=0.03,
        q_value=0.0012,
        action="Audit 20 drafts.",
        owner="Dr. Quality",
        since_last="persisting",
    )
    report = dataclasses.replace(make_report(), alerts=(alert,), tests=240)
    html = render_html(report)
    card = html[html.index('<article class="alert-card"') : html.index("</article>")]
    text = re.sub(r"<[^>]+>", "", card)
    assert (
        "Underdiagnosis rate: higher for race = Black than for race = White (the reference "
        "group)" in text
    )
    assert (
        "race = Black: 39 of 180 studies (21.6%); race = White: 57 of 500 studies (11.4%)." in text
    )
    assert "Ratio 1.80 (95% CI 1.30–2.40)" in text
    assert (
        "the rule alerts when the ratio is above 1.25 and the difference is at least 3.0 pp" in text
    )
    assert "over 240 comparisons (q = 0.0012" in text
    assert "Persisting: it also fired in the previous window." in text
    assert "Action: Audit 20 drafts. Owner: Dr. Quality" in text
    assert '<a href="#plot-0-underdiagnosis_rate">See the chart</a>' in card
    assert "race=Black" in text and text.count("ratio_high") == 1  # the rule named once
    assert ALERT_MESSAGE not in html


def test_report_without_alerts_says_so() -> None:
    html = render_html(make_report(alerts=False))
    assert "No alert rule fired" in html
    assert ALERT_MESSAGE not in html
    assert 'class="alerts"' not in html


def test_without_trend_points_there_is_no_trend_section() -> None:
    html = render_html(make_report(with_trend=False))
    assert 'id="trend"' not in html
    assert html.count("<svg") == 2


def test_headline_metrics_missing_from_the_report_are_skipped() -> None:
    html = render_html(make_report(alerts=False), headline=("no_such_metric", "latency_mean"))
    assert html.count("<svg") == 1
    assert 'id="plot-0-latency_mean"' in html
    assert "no_such_metric" not in html
    assert DEFAULT_HEADLINE == (
        "underdiagnosis_rate",
        "no_finding_rate",
        "failure_rate",
        "critical_rate",
    )


def test_render_is_deterministic_for_equal_input(html: str) -> None:
    assert render_html(make_report()) == html


def test_text_is_escaped_and_never_parsed_as_markup_or_mathtext() -> None:
    report = make_report()
    metric = report.metrics[0]
    odd = dataclasses.replace(metric.groups[0], group='<b>site $x$</b> id="q"')
    report = dataclasses.replace(
        report,
        metrics=(dataclasses.replace(metric, title="<i>Rate</i>", groups=(odd,)),),
    )
    html = render_html(report)
    assert "<b>" not in html and "<i>" not in html
    assert "&lt;i&gt;Rate&lt;/i&gt;" in html
    svg = html[html.index("<svg") : html.index("</svg>")]
    # Literal in the bar chart (not typeset as math, which splits the text) and in the table.
    assert '>&lt;b&gt;site $x$&lt;/b&gt; id="q"<' in svg
    assert "<td>&lt;b&gt;site $x$&lt;/b&gt; id=&#34;q&#34;</td>" in html
    assert parse(html).errors == []


def test_a_published_sibling_of_a_suppressed_group_withholds_its_count(html: str) -> None:
    """Overall n minus the published n would otherwise be the suppressed group's n."""
    assert row(html, "underdiagnosis_rate", "race", UNKNOWN)[1][0] == "withheld"
    assert row(html, "underdiagnosis_rate", "race", "Black")[1][0] == "180"
    assert row(html, "underdiagnosis_rate", "sex", UNKNOWN)[1][0] == "45"  # nothing suppressed


def test_svgs_are_labelled_images(html: str) -> None:
    svgs = re.findall(r"<svg[^>]*>\s*<title>[^<]+</title>", html)
    assert len(svgs) == html.count("<svg") == 3
    for svg in svgs:
        assert 'role="img"' in svg and 'aria-label="' in svg
    assert 'aria-label="Bar chart of Underdiagnosis rate by group of sex, race' in html
    assert "Alert for race = Black." in html
    assert parse(html).errors == []


def test_long_group_names_are_shortened_uniquely() -> None:
    from pipeline.fairness_html import _short, _unique_short

    names = [
        "Saint Elsewhere University Hospital North Campus",
        "Saint Elsewhere University Hospital South Campus",
        "Saint Elsewhere University Hospital",
        "short",
    ]
    labels = _unique_short(names, 24)
    assert len(set(labels)) == len(names) and all(len(label) <= 24 for label in labels)
    assert labels[3] == "short"
    assert labels[2].startswith("Saint Elsewhere") and "…" in labels[2]
    same_ends = ["A" * 30 + "x" + "B" * 30, "A" * 30 + "y" + "B" * 30]
    assert len(set(_unique_short(same_ends, 20))) == 2
    assert _unique_short(["unknown", "unknown"], 24) == ["unknown", "unknown"]  # same name
    assert len(_short("x" * 100)) == 36


def test_trend_axis_spans_every_window_even_empty_ones() -> None:
    """Earlier windows with no studies: the x limits come from all windows, ticks are one per
    window with its study count, and the trend still draws."""
    points = []
    for week in range(4):
        start = SINCE + dt.timedelta(days=7 * week)
        end = start + dt.timedelta(days=7)
        value = 0.1 if week == 3 else None
        n = 200 if week == 3 else 0
        points.append(TrendPoint(start, end, "underdiagnosis_rate", "overall", "overall", n, value))
        points.append(TrendPoint(start, end, "underdiagnosis_rate", "sex", "female", n, value))
    report = dataclasses.replace(
        make_report(), trend=tuple(points), until=SINCE + dt.timedelta(days=28)
    )
    html = render_html(report)
    start = html.index('<figure id="trend-0-underdiagnosis_rate">')
    svg = html[start : html.index("</figure>", start)]
    ticks = re.findall(r">(\d{4}-\d{2}-\d{2})<", svg)
    assert ticks == ["2025-03-08", "2025-03-15", "2025-03-22", "2025-03-29"]
    assert ">n=0<" in svg and ">n=200<" in svg
    assert "1 with values" in svg
    # This window's alert (race=Black, underdiagnosis) is marked on its last point.
    black = TrendPoint(
        SINCE + dt.timedelta(days=21), SINCE + dt.timedelta(days=28), "underdiagnosis_rate",
        "race", "Black", 180, 0.2,
    )  # fmt: skip
    marked = render_html(dataclasses.replace(report, trend=(*points, black)))
    start = marked.index('<figure id="trend-0-underdiagnosis_rate">')
    marked_svg = marked[start : marked.index("</figure>", start)]
    assert "\u2501 Black \u25b2<" in marked_svg and "\u2501 female<" in marked_svg
    assert "#cc3311" in marked_svg
    only_empty = dataclasses.replace(report, trend=tuple(p for p in points if p.value is None))
    assert 'id="trend-0-underdiagnosis_rate"' not in render_html(only_empty)
