"""Renders a monitoring report (GetReportResponse) for people: lines for a terminal, and
one self-contained HTML page of charts.

Pure: no grpc, no I/O, so both renderings are tested on reports built in memory.

The HTML page is a single file someone can attach to a ticket or open from a mail: all
CSS is inline, every chart is SVG generated here, and a Content-Security-Policy forbids
the page to load or run anything, so a column name a user chose cannot turn the report
into a script even if an escape were missed (every string is escaped anyway).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelplane.monitoring.v1 import monitoring_pb2 as pb

# Drift is commonly read as "moderate" from a PSI of 0.1 and "significant" from 0.2; the
# guide line on the drift chart marks the latter.
PSI_GUIDE = 0.2
SPARK_WIDTH = 16
"""Most bins a terminal sparkline shows; finer histograms are merged into this many."""
MAX_DRIFT_LINES = 10
"""Columns drawn on the drift-over-time chart (those that drifted most)."""
MAX_SLICE_LINES = 8
"""Slices drawn on a quality-over-time chart (all rows first, then the most labelled)."""
MAX_ALERT_ROWS = 30
"""Alerts drawn on the timeline (newest first)."""

_BLOCKS = "▁▂▃▄▅▆▇█"
# Tableau 10: distinct hues that stay apart for most colour-blind readers.
_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2",
            "#edc948", "#9c755f", "#ff9da7", "#e15759", "#bab0ac")  # fmt: skip
_REFERENCE_COLOUR = "#9aa7b8"
_CURRENT_COLOUR = "#2f6fdf"
_DRIFT_COLOUR = "#d62728"
_STATE_COLOURS = {
    pb.ALERT_STATE_FIRING: "#d62728",
    pb.ALERT_STATE_PENDING: "#f0a30a",
    pb.ALERT_STATE_RESOLVED: "#7f8c8d",
}
_STATE_NAMES = {
    pb.ALERT_STATE_UNSPECIFIED: "unknown",
    pb.ALERT_STATE_PENDING: "pending",
    pb.ALERT_STATE_FIRING: "firing",
    pb.ALERT_STATE_RESOLVED: "resolved",
}
_REFERENCE_NAMES = {
    pb.REFERENCE_SOURCE_UNSPECIFIED: "none yet",
    pb.REFERENCE_SOURCE_REGISTRY: "registry statistics",
    pb.REFERENCE_SOURCE_FIRST_ROWS: "first rows seen",
}
_TASK_NAMES = {
    pb.TASK_TYPE_UNSPECIFIED: "no quality metrics",
    pb.TASK_TYPE_BINARY_CLASSIFICATION: "binary classification",
    pb.TASK_TYPE_REGRESSION: "regression",
}
# The metrics charted over time, by what the report holds: a classifier's, a
# regressor's; otherwise the first two present.
_METRIC_SETS = (("f1", "roc_auc"), ("rmse", "r2"))


# --- shared facts -----------------------------------------------------------------------


def _moment(ts: Any) -> datetime | None:
    """A Timestamp as a UTC datetime; None when unset (a proto3 message field reads as
    the epoch then, which no report means)."""
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    moment: datetime = ts.ToDatetime(tzinfo=UTC)
    return moment


def _stamp(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%MZ") if moment else "-"


def _duration(seconds: float) -> str:
    """24h, 90m, 2d 3h: how long a range is, roughly, for a header."""
    minutes = round(seconds / 60)
    days, rest = divmod(minutes, 1440)
    if days < 2:  # "36h" reads faster than "1d 12h"
        days, rest = 0, minutes
    hours, minutes = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return " ".join(parts) or "0m"


def _num(value: float) -> str:
    """Three significant digits: enough to compare, short enough for a table cell."""
    if math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _p(value: float) -> str:
    return f"{value:.2g}"


def tested(column: pb.ColumnReport) -> bool:
    """Whether the column was judged: the service compares every column it has a
    reference for (so `test` is set) but judges only those with enough rows that the
    policy does not ignore, and leaves the adjusted p-value of the others NaN."""
    return bool(column.test) and not math.isnan(column.adjusted_p_value)


def verdict(column: pb.ColumnReport) -> str:
    """`drifted`, `ok`, or `no verdict` when the column was not judged (too few rows, no
    reference, or ignored by the policy: `reason` says which)."""
    if column.drifted:
        return "drifted"
    return "ok" if tested(column) else "no verdict"


def _padded(
    reference: Sequence[float], current: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Both count vectors at the same length, so a malformed pair still draws."""
    size = max(len(reference), len(current))
    return (
        [*reference, *[0.0] * (size - len(reference))],
        [*current, *[0.0] * (size - len(current))],
    )


def _shares(counts: Sequence[float]) -> list[float]:
    """Counts as fractions of their total: reference and current differ in size, so
    only their shapes compare."""
    total = sum(counts)
    return [c / total if total > 0 else 0.0 for c in counts]


def _whole_range(report: pb.GetReportResponse) -> list[pb.QualityPoint]:
    return [q for q in report.quality if _moment(q.start_time) is None]


def _over_time(report: pb.GetReportResponse) -> list[pb.QualityPoint]:
    return [q for q in report.quality if _moment(q.start_time) is not None]


def _slice_name(point: pb.QualityPoint) -> str:
    return f"{point.slice_key}={point.slice_value}" if point.slice_key else "all rows"


def _charted_metrics(points: Iterable[pb.QualityPoint]) -> list[str]:
    present = {name for point in points for name in point.metrics}
    for wanted in _METRIC_SETS:
        chosen = [m for m in wanted if m in present]
        if chosen:
            return chosen
    return sorted(present)[:2]


# --- terminal ---------------------------------------------------------------------------


def _merged(counts: Sequence[float], width: int) -> list[float]:
    """Adjacent bins summed so that at most `width` remain."""
    if len(counts) <= width:
        return list(counts)
    step = math.ceil(len(counts) / width)
    return [sum(counts[i : i + step]) for i in range(0, len(counts), step)]


def sparkline(values: Sequence[float], top: float) -> str:
    """One block character per value, scaled to `top`; a blank for exactly zero so an
    empty bin reads differently from a small one."""
    if top <= 0:
        return " " * len(values)
    chars = []
    for value in values:
        if value <= 0:
            chars.append(" ")
        else:
            level = min(len(_BLOCKS) - 1, int(value / top * (len(_BLOCKS) - 1) + 0.5))
            chars.append(_BLOCKS[level])
    return "".join(chars)


def spark_pair(column: pb.ColumnReport) -> tuple[str, str]:
    """Reference and current distributions on one scale, so their shapes compare."""
    reference, current = _padded(column.reference_counts, column.current_counts)
    ref = _shares(_merged(reference, SPARK_WIDTH))
    cur = _shares(_merged(current, SPARK_WIDTH))
    top = max([*ref, *cur, 0.0])
    return sparkline(ref, top), sparkline(cur, top)


def _header_lines(report: pb.GetReportResponse) -> list[str]:
    start, end = _moment(report.start_time), _moment(report.end_time)
    span = f"  ({_duration((end - start).total_seconds())})" if start and end else ""
    source = _REFERENCE_NAMES.get(report.reference_source, "unknown")
    reference = f"{source}, {report.reference_count:,} rows" if report.reference_count else source
    return [
        f"model {report.model_name}  version {report.model_version or '-'}",
        f"range      {_stamp(start)} → {_stamp(end)}{span}",
        f"rows       {report.count:,}",
        f"reference  {reference}",
    ]


def _column_line(column: pb.ColumnReport, width: int) -> str:
    kind = "out" if column.is_output else "cat" if column.categorical else "num"
    ref, cur = spark_pair(column)
    test = f"{column.test} {_num(column.statistic)}" if column.test else "-"
    p_adj = _p(column.adjusted_p_value) if tested(column) else "-"
    line = (
        f"  {_clip(column.name, width):<{width}}  {kind}  {verdict(column):<10}  "
        f"psi {_num(column.psi):>6}  js {_num(column.js_distance):>6}  "
        f"{test:<12}  p_adj {p_adj:>7}  ref [{ref}]  cur [{cur}]"
    )
    return f"{line}  ({column.reason})" if column.reason and not tested(column) else line


def _column_lines(report: pb.GetReportResponse) -> list[str]:
    if not report.columns:
        return ["columns    none: no rows in this range"]
    drifted = sum(c.drifted for c in report.columns)
    width = min(24, max(len(c.name) for c in report.columns))
    return [
        f"columns    {drifted} of {len(report.columns)} drifted",
        *(_column_line(c, width) for c in report.columns),
    ]


def _quality_lines(report: pb.GetReportResponse) -> list[str]:
    points = [q for q in _whole_range(report) if q.labelled]
    if not points:
        return ["quality    no labelled predictions in this range"]
    width = max(len(_slice_name(q)) for q in points)
    lines = ["quality    whole range"]
    for point in points:
        metrics = "  ".join(f"{k} {_num(v)}" for k, v in sorted(point.metrics.items()))
        lines.append(f"  {_slice_name(point):<{width}}  labelled {point.labelled:,}  {metrics}")
    return lines


def _alert_lines(report: pb.GetReportResponse) -> list[str]:
    if not report.alerts:
        return ["alerts     none"]
    rule = max(len(a.rule) for a in report.alerts)
    subject = max(len(a.subject or "-") for a in report.alerts)
    lines = [f"alerts     {len(report.alerts)}"]
    for alert in report.alerts:
        state = _STATE_NAMES.get(alert.state, "unknown")
        since = _stamp(_moment(alert.start_time))
        lines.append(
            f"  {state:<8}  {alert.rule:<{rule}}  {alert.subject or '-':<{subject}}  "
            f"since {since}  {alert.summary}"
        )
    return lines


def _rejected_lines(report: pb.GetReportResponse) -> list[str]:
    if not report.rejected:
        return []
    counts = ", ".join(f"{r.reason} {r.count:,}" for r in report.rejected)
    return ["", f"rejected   {counts}"]


def report_lines(report: pb.GetReportResponse) -> list[str]:
    """The report for a terminal: header, one line per column (verdict, PSI, JS, test
    and the reference|current distributions as sparklines), quality, alerts."""
    return [
        *_header_lines(report),
        "",
        *_column_lines(report),
        "",
        *_quality_lines(report),
        "",
        *_alert_lines(report),
        *_rejected_lines(report),
    ]


# --- SVG building blocks ----------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clip(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


@dataclass(frozen=True)
class Scale:
    """A linear map from data to pixels."""

    lo: float
    hi: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo
        fraction = (value - self.lo) / span if span else 0.5
        return self.start + fraction * (self.end - self.start)


@dataclass(frozen=True)
class Frame:
    """A chart's size and the plot area inside its margins."""

    width: int
    height: int
    left: int = 56
    right: int = 16
    top: int = 14
    bottom: int = 40

    @property
    def x0(self) -> float:
        return self.left

    @property
    def x1(self) -> float:
        return self.width - self.right

    @property
    def y0(self) -> float:
        return self.height - self.bottom

    @property
    def y1(self) -> float:
        return self.top


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    last = math.ceil(hi / step) * step
    n = round((last - first) / step)
    return [round(first + i * step, 12) for i in range(n + 1)]


_TIME_STEPS = (60, 300, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)


def time_ticks(start: float, end: float, count: int = 6) -> list[float]:
    """Tick times (epoch seconds) at whole minutes, hours or days, about `count` of them."""
    span = max(end - start, 60.0)
    step = next((s for s in _TIME_STEPS if s * count >= span), _TIME_STEPS[-1])
    first = math.ceil(start / step) * step
    return [float(t) for t in range(int(first), int(end) + 1, step)]


def _time_label(seconds: float, span: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    if span <= 86400:
        return moment.strftime("%H:%M")
    if span <= 7 * 86400:
        return moment.strftime("%d %b %H:%M")
    return moment.strftime("%Y-%m-%d")


def _svg(chart: str, frame: Frame, body: Iterable[str], label: str) -> str:
    return (
        f'<svg data-chart="{chart}" class="chart" viewBox="0 0 {frame.width} {frame.height}" '
        f'role="img" aria-label="{_e(label)}">{"".join(body)}</svg>'
    )


def _y_axis(frame: Frame, scale: Scale, ticks: Sequence[float], fmt: Callable[[float], str]) -> str:
    parts = []
    for tick in ticks:
        y = scale(tick)
        parts.append(
            f'<line class="grid" x1="{frame.x0}" x2="{frame.x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{frame.x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_e(fmt(tick))}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{frame.x0}" x2="{frame.x0}" y1="{frame.y1}" y2="{frame.y0}"/>'
    )
    return "".join(parts)


def _axis_title(frame: Frame, text: str) -> str:
    """The y axis's title, written up its left edge."""
    y = (frame.y0 + frame.y1) / 2
    return (
        f'<text class="axis-title" transform="translate(14 {y:.1f}) rotate(-90)" '
        f'text-anchor="middle">{_e(text)}</text>'
    )


def _time_axis(frame: Frame, scale: Scale, start: float, end: float) -> str:
    parts = [
        f'<line class="axis" x1="{frame.x0}" x2="{frame.x1}" y1="{frame.y0}" y2="{frame.y0}"/>'
    ]
    for tick in time_ticks(start, end):
        x = scale(tick)
        parts.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.y0}" y2="{frame.y0 + 5}"/>'
            f'<text class="tick" x="{x:.1f}" y="{frame.y0 + 18}" text-anchor="middle">'
            f"{_e(_time_label(tick, end - start))}</text>"
        )
    parts.append(
        f'<text class="axis-title" x="{(frame.x0 + frame.x1) / 2:.1f}" y="{frame.height - 4}" '
        'text-anchor="middle">time (UTC)</text>'
    )
    return "".join(parts)


def _path(points: Sequence[tuple[float, float] | None]) -> str:
    """An SVG path through the points; None breaks the line (a bucket without data)."""
    commands, pen_down = [], False
    for point in points:
        if point is None:
            pen_down = False
            continue
        commands.append(f"{'L' if pen_down else 'M'}{point[0]:.1f} {point[1]:.1f}")
        pen_down = True
    return " ".join(commands)


def _legend(items: Iterable[tuple[str, str]], dashed: Iterable[str] = ()) -> str:
    """An HTML legend under a chart: it wraps on narrow screens where an SVG one would not."""
    dashed = set(dashed)
    entries = "".join(
        f'<li><span class="swatch{" dashed" if label in dashed else ""}" '
        f'style="background:{colour};border-color:{colour}"></span>{_e(label)}</li>'
        for label, colour in items
    )
    return f'<ul class="legend">{entries}</ul>'


def _note(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _range_seconds(report: pb.GetReportResponse) -> tuple[float, float] | None:
    """The report's range in epoch seconds, from the request or else from its buckets."""
    start, end = _moment(report.start_time), _moment(report.end_time)
    if start and end and end > start:
        return start.timestamp(), end.timestamp()
    moments = [
        m.timestamp()
        for p in report.drift_over_time
        for m in (_moment(p.start_time), _moment(p.end_time))
        if m
    ]
    return (
        (min(moments), max(moments)) if len(moments) >= 2 and max(moments) > min(moments) else None
    )


def _midpoint(start: Any, end: Any) -> float | None:
    first, last = _moment(start), _moment(end)
    if first is None:
        return None
    return (first.timestamp() + last.timestamp()) / 2 if last else first.timestamp()


# --- per-column histograms --------------------------------------------------------------


def _bin_labels(column: pb.ColumnReport, bins: int) -> list[str]:
    """A label per boundary between bins (numeric) or per bin (categorical)."""
    if column.categorical:
        names = list(column.categories)
        return [*names, *[""] * (bins - len(names))][:bins]
    edges = [_num(e) for e in column.bin_edges]
    if len(edges) == bins + 1:  # edges around every bin
        return edges
    if len(edges) == bins - 1:  # the end bins are open: < first edge, >= last edge
        return ["", *edges, ""]
    return [""] * (bins + 1)


def _thinned(labels: list[str], most: int) -> list[str]:
    """Every k-th label kept so that at most `most` are written."""
    step = max(1, math.ceil(len(labels) / most))
    return [label if i % step == 0 else "" for i, label in enumerate(labels)]


def _histogram_bars(
    frame: Frame,
    ref: list[float],
    cur: list[float],
    y: Scale,
    labels: list[str],
    column: pb.ColumnReport,
) -> list[str]:
    band = (frame.x1 - frame.x0) / len(ref)
    bar = band * 0.4
    parts = []
    for i, (r, c) in enumerate(zip(ref, cur, strict=True)):
        x = frame.x0 + i * band + band * 0.1
        name = labels[i] if column.categorical else f"bin {i + 1}"
        for offset, share, colour, what in ((0, r, _REFERENCE_COLOUR, "reference"),
                                            (bar, c, _CURRENT_COLOUR, "current")):  # fmt: skip
            top = y(share * 100)
            parts.append(
                f'<rect x="{x + offset:.1f}" y="{top:.1f}" width="{bar:.1f}" '
                f'height="{max(frame.y0 - top, 0):.1f}" fill="{colour}">'
                f"<title>{_e(name)}: {what} {share * 100:.1f}%</title></rect>"
            )
    return parts


def _histogram_x_labels(frame: Frame, column: pb.ColumnReport, bins: int) -> list[str]:
    band = (frame.x1 - frame.x0) / bins
    labels = _thinned(_bin_labels(column, bins), 6 if not column.categorical else 8)
    parts = [
        f'<line class="axis" x1="{frame.x0}" x2="{frame.x1}" y1="{frame.y0}" y2="{frame.y0}"/>'
    ]
    for i, label in enumerate(labels):
        if not label:
            continue
        x = frame.x0 + (i + 0.5 if column.categorical else i) * band
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{frame.y0 + 16}" text-anchor="middle">'
            f"{_e(_clip(label, 10))}<title>{_e(label)}</title></text>"
        )
    title = "category" if column.categorical else "bin edges (reference)"
    parts.append(
        f'<text class="axis-title" x="{(frame.x0 + frame.x1) / 2:.1f}" y="{frame.height - 4}" '
        f'text-anchor="middle">{title}</text>'
    )
    return parts


def histogram_svg(column: pb.ColumnReport) -> str:
    """Reference and current share of rows per bin (or category), side by side."""
    ref, cur = _padded(column.reference_counts, column.current_counts)
    ref, cur = _shares(ref), _shares(cur)
    frame = Frame(width=380, height=220, left=48, bottom=44)
    ticks = nice_ticks(0, max([*ref, *cur]) * 100 or 1, 4)
    y = Scale(0, ticks[-1], frame.y0, frame.y1)
    body = [
        _y_axis(frame, y, ticks, lambda t: f"{t:g}%"),
        _axis_title(frame, "share of rows"),
        *_histogram_bars(frame, ref, cur, y, _bin_labels(column, len(ref)), column),
        *_histogram_x_labels(frame, column, len(ref)),
    ]
    return _svg("histogram", frame, body, f"{column.name}: reference vs current distribution")


def _badge(column: pb.ColumnReport) -> str:
    state = verdict(column)
    css = {"drifted": "bad", "ok": "good"}.get(state, "none")
    return f'<span class="badge {css}">{_e(state)} · PSI {_e(_num(column.psi))}</span>'


def _column_facts(column: pb.ColumnReport) -> str:
    facts = [("rows", f"{column.count:,}"), ("missing", f"{column.missing:,}")]
    if not column.categorical:
        facts += [("mean", _num(column.mean)), ("std", _num(column.stddev))]
    facts += [("JS", _num(column.js_distance))]
    if column.test:
        facts += [(column.test, _num(column.statistic)), ("p", _p(column.p_value))]
    if tested(column):
        facts.append(("adjusted p", _p(column.adjusted_p_value)))
    cells = "".join(f"<span><b>{_e(k)}</b> {_e(v)}</span>" for k, v in facts)
    reason = f'<p class="reason">{_e(column.reason)}</p>' if column.reason else ""
    return f'<div class="facts">{cells}</div>{reason}'


def _column_card(column: pb.ColumnReport) -> str:
    kind = "output" if column.is_output else "categorical" if column.categorical else "numeric"
    has_bins = bool(column.reference_counts or column.current_counts)
    chart = histogram_svg(column) if has_bins else _note("No distribution recorded yet.")
    return (
        f'<article class="card {verdict(column).replace(" ", "-")}">'
        f"<header><h3>{_e(column.name)}</h3>"
        f'<span class="kind">{kind}</span>{_badge(column)}</header>'
        f"{chart}{_column_facts(column)}</article>"
    )


def _columns_section(report: pb.GetReportResponse) -> str:
    if not report.columns:
        return _section("Distributions", _note("No rows in this range: nothing to compare."))
    legend = _legend([("reference", _REFERENCE_COLOUR), ("current", _CURRENT_COLOUR)])
    cards = "".join(_column_card(c) for c in report.columns)
    return _section("Distributions", f'{legend}<div class="cards">{cards}</div>')


# --- drift over time --------------------------------------------------------------------


def _drift_columns(report: pb.GetReportResponse) -> list[str]:
    """Columns on the chart: those with the highest PSI in any bucket, report order kept."""
    peak: dict[str, float] = {}
    for point in report.drift_over_time:
        for name, value in point.psi.items():
            peak[name] = max(peak.get(name, 0.0), value)
    order = [c.name for c in report.columns if c.name in peak]
    order += sorted(set(peak) - set(order))
    chosen = set(sorted(order, key=lambda n: -peak[n])[:MAX_DRIFT_LINES])
    return [n for n in order if n in chosen]


def _drift_series(
    report: pb.GetReportResponse, name: str, x: Scale, y: Scale, colour: str
) -> list[str]:
    points: list[tuple[float, float] | None] = []
    dots = []
    for point in report.drift_over_time:
        middle = _midpoint(point.start_time, point.end_time)
        if middle is None or name not in point.psi:
            points.append(None)
            continue
        value = point.psi[name]
        points.append((x(middle), y(value)))
        drifted = name in point.drifted
        css = "dot drifted" if drifted else "dot"
        dots.append(
            f'<circle class="{css}" cx="{x(middle):.1f}" cy="{y(value):.1f}" '
            f'r="{4.5 if drifted else 2.5}" fill="{colour}">'
            f"<title>{_e(name)} at {_e(_stamp(_moment(point.start_time)))}: PSI {_num(value)}"
            f"{' (drifted)' if drifted else ''}</title></circle>"
        )
    line = f'<path class="series" d="{_path(points)}" stroke="{colour}"/>'
    return [line, *dots]


def drift_svg(report: pb.GetReportResponse, names: Sequence[str], span: tuple[float, float]) -> str:
    """PSI per column per bucket, drifted buckets ringed, with the 0.2 guide line."""
    frame = Frame(width=960, height=300)
    peak = max((v for p in report.drift_over_time for v in p.psi.values()), default=0.0)
    ticks = nice_ticks(0, max(peak, PSI_GUIDE * 1.25), 5)
    x = Scale(span[0], span[1], frame.x0, frame.x1)
    y = Scale(0, ticks[-1], frame.y0, frame.y1)
    guide = y(PSI_GUIDE)
    body = [
        _y_axis(frame, y, ticks, _num),
        _axis_title(frame, "PSI"),
        _time_axis(frame, x, *span),
        f'<line class="guide" x1="{frame.x0}" x2="{frame.x1}" y1="{guide:.1f}" y2="{guide:.1f}"/>'
        f'<text class="guide-label" x="{frame.x1 - 4}" y="{guide - 5:.1f}" text-anchor="end">'
        f"PSI {PSI_GUIDE}</text>",
    ]
    for i, name in enumerate(names):
        body += _drift_series(report, name, x, y, _PALETTE[i % len(_PALETTE)])
    return _svg("drift-over-time", frame, body, "PSI per column over time")


def _drift_section(report: pb.GetReportResponse) -> str:
    span = _range_seconds(report)
    names = _drift_columns(report)
    if span is None or not names:
        return _section("Drift over time", _note("No drift measured in this range."))
    hidden = len({n for p in report.drift_over_time for n in p.psi}) - len(names)
    more = _note(f"{hidden} more columns not drawn (lowest PSI).") if hidden > 0 else ""
    legend = _legend(
        [*((n, _PALETTE[i % len(_PALETTE)]) for i, n in enumerate(names)),
         (f"PSI {PSI_GUIDE}", "#555"), ("drifted bucket (large dot)", _DRIFT_COLOUR)],
        dashed=[f"PSI {PSI_GUIDE}"],
    )  # fmt: skip
    return _section("Drift over time", drift_svg(report, names, span) + legend + more)


# --- quality over time ------------------------------------------------------------------


def _slices(points: Sequence[pb.QualityPoint]) -> list[str]:
    """Slices to draw: all rows first, then the most labelled."""
    labelled: dict[str, int] = {}
    for point in points:
        name = _slice_name(point)
        labelled[name] = labelled.get(name, 0) + point.labelled
    order = sorted(labelled, key=lambda n: (n != "all rows", -labelled[n], n))
    return order[:MAX_SLICE_LINES]


def _value_ticks(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 0.1
    return nice_ticks(lo - pad, hi + pad, 4)


def quality_svg(
    points: Sequence[pb.QualityPoint], metric: str, slices: Sequence[str], span: tuple[float, float]
) -> str:
    """One metric over time, a line per slice."""
    frame = Frame(width=960, height=240)
    values = [p.metrics[metric] for p in points if metric in p.metrics]
    ticks = _value_ticks(values)
    x = Scale(span[0], span[1], frame.x0, frame.x1)
    y = Scale(ticks[0], ticks[-1], frame.y0, frame.y1)
    body = [_y_axis(frame, y, ticks, _num), _axis_title(frame, metric), _time_axis(frame, x, *span)]
    for i, name in enumerate(slices):
        colour = _PALETTE[i % len(_PALETTE)]
        mine = [p for p in points if _slice_name(p) == name]
        mine.sort(key=lambda p: _midpoint(p.start_time, p.end_time) or 0.0)
        line: list[tuple[float, float] | None] = []
        for p in mine:
            middle = _midpoint(p.start_time, p.end_time)
            present = middle is not None and metric in p.metrics
            line.append((x(middle), y(p.metrics[metric])) if middle and present else None)
        body.append(f'<path class="series" d="{_path(line)}" stroke="{colour}"/>')
        body += [
            f'<circle class="dot" cx="{pt[0]:.1f}" cy="{pt[1]:.1f}" r="2.5" fill="{colour}"/>'
            for pt in line
            if pt
        ]
    return _svg("quality-over-time", frame, body, f"{metric} per slice over time")


def _quality_table(points: Sequence[pb.QualityPoint]) -> str:
    metrics = sorted({m for p in points for m in p.metrics})
    head = "".join(f"<th>{_e(m)}</th>" for m in ["slice", "labelled", *metrics])
    rows = "".join(
        f"<tr><td>{_e(_slice_name(p))}</td><td>{p.labelled:,}</td>"
        + "".join(f"<td>{_e(_num(p.metrics[m])) if m in p.metrics else '-'}</td>" for m in metrics)
        + "</tr>"
        for p in points
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _quality_section(report: pb.GetReportResponse) -> str:
    whole = [p for p in _whole_range(report) if p.labelled]
    timed = [p for p in _over_time(report) if p.labelled]
    span = _range_seconds(report)
    if not whole and not timed:
        return _section("Quality", _note("No labelled predictions in this range."))
    parts = ["<h3>Whole range</h3>", _quality_table(whole)] if whole else []
    slices = _slices(timed)
    for metric in _charted_metrics(timed):
        if span is None:
            break
        legend = _legend((n, _PALETTE[i % len(_PALETTE)]) for i, n in enumerate(slices))
        parts += [f"<h3>{_e(metric)} over time</h3>", quality_svg(timed, metric, slices, span)]
        parts.append(legend)
    if not timed:
        parts.append(_note("No labelled buckets to draw over time."))
    return _section("Quality", "".join(parts))


# --- alerts -----------------------------------------------------------------------------


def _alert_bar(alert: pb.Alert, row: int, frame: Frame, x: Scale, span: tuple[float, float]) -> str:
    begin = _moment(alert.start_time)
    until = _moment(alert.resolved_time)
    start = max(begin.timestamp() if begin else span[0], span[0])
    end = min(until.timestamp() if until else span[1], span[1])
    y = frame.y1 + row * 26
    colour = _STATE_COLOURS.get(alert.state, "#999")
    label = _clip(f"{alert.rule} · {alert.subject}" if alert.subject else alert.rule, 30)
    state = _STATE_NAMES.get(alert.state, "unknown")
    fired = _moment(alert.fired_time)
    mark = ""
    if fired and span[0] <= fired.timestamp() <= span[1]:
        fx = x(fired.timestamp())
        mark = f'<line class="fired" x1="{fx:.1f}" x2="{fx:.1f}" y1="{y}" y2="{y + 18}"/>'
    return (
        f'<text class="tick" x="{frame.x0 - 8}" y="{y + 13}" text-anchor="end">{_e(label)}</text>'
        f'<rect x="{x(start):.1f}" y="{y}" width="{max(x(end) - x(start), 3):.1f}" height="18" '
        f'rx="3" fill="{colour}"><title>{_e(state)}: {_e(alert.summary)}</title></rect>{mark}'
    )


def alerts_svg(alerts: Sequence[pb.Alert], span: tuple[float, float]) -> str:
    """A bar per alert from its first window to its resolution (or the range's end)."""
    frame = Frame(width=960, height=14 + 26 * len(alerts) + 40, left=240)
    x = Scale(span[0], span[1], frame.x0, frame.x1)
    body = [_time_axis(frame, x, *span)]
    body += [_alert_bar(a, i, frame, x, span) for i, a in enumerate(alerts)]
    return _svg("alerts-timeline", frame, body, "alerts over time")


def _alerts_table(alerts: Sequence[pb.Alert]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "state",
            "rule",
            "subject",
            "value",
            "threshold",
            "started",
            "resolved",
            "summary",
        )
    )
    rows = "".join(
        f'<tr><td><span class="state s{a.state}">{_e(_STATE_NAMES.get(a.state, "unknown"))}'
        f"</span></td><td>{_e(a.rule)}</td><td>{_e(a.subject or '-')}</td>"
        f"<td>{_e(_num(a.value))}</td><td>{_e(_num(a.threshold))}</td>"
        f"<td>{_e(_stamp(_moment(a.start_time)))}</td>"
        f"<td>{_e(_stamp(_moment(a.resolved_time)))}</td><td>{_e(a.summary)}</td></tr>"
        for a in alerts
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _alerts_section(report: pb.GetReportResponse) -> str:
    if not report.alerts:
        return _section("Alerts", _note("No alerts in this range."))
    span = _range_seconds(report)
    drawn = list(report.alerts)[:MAX_ALERT_ROWS]
    legend = _legend(
        (_STATE_NAMES[s], c) for s, c in _STATE_COLOURS.items() if any(a.state == s for a in drawn)
    )
    chart = alerts_svg(drawn, span) + legend if span else ""
    return _section("Alerts", chart + _alerts_table(report.alerts))


# --- page -------------------------------------------------------------------------------


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _tiles(report: pb.GetReportResponse) -> str:
    drifted = sum(c.drifted for c in report.columns)
    firing = sum(a.state == pb.ALERT_STATE_FIRING for a in report.alerts)
    labelled = sum(p.labelled for p in _whole_range(report) if not p.slice_key)
    rejected = sum(r.count for r in report.rejected)
    tiles = [
        ("rows", f"{report.count:,}", ""),
        ("columns drifted", f"{drifted} of {len(report.columns)}", "bad" if drifted else ""),
        ("alerts firing", f"{firing}", "bad" if firing else ""),
        ("labelled rows", f"{labelled:,}", ""),
        ("rejected records", f"{rejected:,}", "bad" if rejected else ""),
    ]
    return '<div class="tiles">' + "".join(
        f'<div class="tile {css}"><b>{_e(value)}</b><span>{_e(name)}</span></div>'
        for name, value, css in tiles
    ) + "</div>"  # fmt: skip


def _header(report: pb.GetReportResponse) -> str:
    start, end = _moment(report.start_time), _moment(report.end_time)
    span = f" ({_duration((end - start).total_seconds())})" if start and end else ""
    source = _REFERENCE_NAMES.get(report.reference_source, "unknown")
    task = _TASK_NAMES.get(report.config.task, "unknown task")
    facts = [
        f"{_stamp(start)} → {_stamp(end)}{span}",
        f"reference: {source}, {report.reference_count:,} rows",
        f"{task}, configuration revision {report.config.revision}",
    ]
    version = f"version {report.model_version}" if report.model_version else "no version had rows"
    return (
        f"<header><h1>{_e(report.model_name)} <small>{_e(version)}</small></h1>"
        f'<p class="meta">{" · ".join(_e(f) for f in facts)}</p>{_tiles(report)}</header>'
    )


_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  margin: 0; padding: 24px 32px; background: #f6f7f9; color: #1f2933; }
h1 { margin: 0 0 4px; font-size: 24px; } h1 small { color: #52606d; font-weight: 400; }
h2 { font-size: 18px; margin: 0 0 12px; } h3 { font-size: 14px; margin: 12px 0 6px; }
section { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; padding: 16px 20px;
  margin: 16px 0; }
.meta { color: #52606d; margin: 0 0 12px; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; padding: 10px 16px;
  min-width: 130px; } .tile b { display: block; font-size: 20px; }
.tile span { color: #52606d; font-size: 12px; } .tile.bad b { color: #d62728; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
.card { border: 1px solid #e4e7eb; border-radius: 8px; padding: 10px 12px; }
.card header { display: flex; align-items: center; gap: 8px; flex-wrap: wrap; }
.card.drifted { border-color: #f0b4b4; box-shadow: inset 3px 0 0 #d62728; }
.card h3 { margin: 0; overflow-wrap: anywhere; } .kind { color: #7b8794; font-size: 12px; }
.badge { margin-left: auto; border-radius: 10px; padding: 1px 9px; font-size: 12px;
  font-weight: 600; } .badge.bad { background: #fde2e1; color: #a61b1b; }
.badge.good { background: #e3f6e8; color: #1e7b34; }
.badge.none { background: #eceff2; color: #52606d; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 12px; color: #3e4c59; }
.reason { font-size: 12px; color: #7b8794; margin: 4px 0 0; }
.chart { width: 100%; height: auto; display: block; }
.chart text { font-size: 11px; fill: #52606d; }
.chart .axis-title { font-size: 12px; fill: #3e4c59; }
.chart .grid { stroke: #eef0f3; } .chart .axis { stroke: #9aa5b1; }
.chart .series { fill: none; stroke-width: 2; stroke-linejoin: round; }
.chart .dot.drifted { stroke: #d62728; stroke-width: 2.5; }
.chart .guide { stroke: #555; stroke-dasharray: 6 4; } .chart .guide-label { fill: #555; }
.chart .fired { stroke: #1f2933; stroke-width: 2; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 4px 16px; padding: 0;
  margin: 6px 0; font-size: 12px; }
.swatch { display: inline-block; width: 14px; height: 10px; margin-right: 5px; border-radius: 2px;
  vertical-align: middle; border: 1px solid; }
.swatch.dashed { height: 0; border-width: 0 0 2px; border-style: dashed;
  background: none !important; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #eef0f3; }
th { color: #52606d; font-weight: 600; }
.state { border-radius: 8px; padding: 0 7px; color: #fff; background: #999; }
.state.s1 { background: #f0a30a; } .state.s2 { background: #d62728; }
.state.s3 { background: #7f8c8d; }
.empty { color: #7b8794; font-style: italic; }
"""
# The page may load nothing and run nothing: its styles are the one thing inline.
_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def report_html(report: pb.GetReportResponse) -> str:
    """The report as one self-contained HTML page: per-column histograms with a drift
    badge, drift over time, quality over time per slice, and the alerts on a timeline."""
    title = f"{report.model_name} {report.model_version} monitoring report".strip()
    body = "".join(
        [
            _header(report),
            _columns_section(report),
            _drift_section(report),
            _quality_section(report),
            _alerts_section(report),
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )
