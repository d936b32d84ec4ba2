"""The monitoring report rendered for a terminal and as one self-contained HTML page,
from reports built in memory: a rich one (drifted and steady numeric columns, a
categorical one, a column without a verdict whose name is markup, 24 drift buckets,
quality of two slices, a firing and a resolved alert) and an empty one."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.cli import monitor
from modelplane.cli.report_render import (
    nice_ticks,
    report_html,
    report_lines,
    sparkline,
    time_ticks,
    verdict,
)
from modelplane.client.monitoring import MonitoringClient
from modelplane.monitoring.v1 import monitoring_pb2 as pb

END = datetime(2026, 11, 21, tzinfo=UTC)
START = END - timedelta(hours=24)
HOSTILE = "<script>alert(1)</script>"
CHARTS = ("histogram", "drift-over-time", "quality-over-time", "alerts-timeline")


def ts(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def hour(n: int) -> datetime:
    return START + timedelta(hours=n)


def bell(centre: float, total: float, bins: int = 10) -> list[float]:
    """Counts of a bell-shaped distribution over `bins` bins."""
    weights = [math.exp(-(((i + 0.5) - centre) ** 2) / 4) for i in range(bins)]
    return [round(total * w / sum(weights)) for w in weights]


def numeric(name: str, shift: float, drifted: bool, **fields: object) -> pb.ColumnReport:
    column = pb.ColumnReport(
        name=name,
        count=48_000,
        missing=12,
        mean=50 + shift * 10,
        stddev=12.5,
        min=0.0,
        max=100.0,
        quantile_ranks=[0.5, 0.9, 0.99],
        quantiles=[50.0, 70.0, 90.0],
        bin_edges=[i * 10.0 for i in range(11)],
        reference_counts=bell(5, 10_000),
        current_counts=bell(5 + shift, 48_000),
        psi=0.41 if drifted else 0.02,
        js_distance=0.22 if drifted else 0.03,
        test="ks",
        statistic=0.21 if drifted else 0.01,
        p_value=1e-12 if drifted else 0.61,
        adjusted_p_value=4e-12 if drifted else 1.0,
        drifted=drifted,
    )
    for key, value in fields.items():
        setattr(column, key, value)
    return column


def categorical() -> pb.ColumnReport:
    return pb.ColumnReport(
        name="country",
        categorical=True,
        count=48_000,
        missing=40,
        categories=["US", "DE", "FR", "other"],
        reference_counts=[5_000, 3_000, 1_500, 500],
        current_counts=[14_000, 20_000, 10_000, 4_000],
        psi=0.35,
        js_distance=0.19,
        test="chi2",
        statistic=812.4,
        p_value=1e-30,
        adjusted_p_value=3e-30,
        drifted=True,
    )


def columns() -> list[pb.ColumnReport]:
    return [
        numeric("amount", 2.5, drifted=True),
        numeric("age", 0.1, drifted=False),
        # compared but not judged, as the service reports a column with too few rows
        numeric(
            HOSTILE, 0.0, drifted=False, adjusted_p_value=math.nan, reason="fewer than 1000 rows"
        ),
        categorical(),
        numeric("score", 0.2, drifted=False, is_output=True),
    ]


def drift_points() -> list[pb.DriftPoint]:
    points = []
    for n in range(24):
        amount = 0.03 + max(0, n - 10) * 0.03  # crosses 0.2 from hour 16
        country = 0.3 if n >= 20 else 0.05
        drifted = [name for name, v in (("amount", amount), ("country", country)) if v >= 0.2]
        points.append(
            pb.DriftPoint(
                start_time=ts(hour(n)),
                end_time=ts(hour(n + 1)),
                count=2_000,
                psi={"amount": amount, "age": 0.01 + 0.005 * (n % 3), "country": country,
                     HOSTILE: 0.02, "score": 0.04},
                drifted=drifted,
            )
        )  # fmt: skip
    return points


def quality_points() -> list[pb.QualityPoint]:
    whole = [
        pb.QualityPoint(labelled=9_000, metrics={"f1": 0.81, "roc_auc": 0.9, "accuracy": 0.86}),
        pb.QualityPoint(slice_key="region", slice_value="eu", labelled=5_000,
                        metrics={"f1": 0.84, "roc_auc": 0.92}),
        pb.QualityPoint(slice_key="region", slice_value="us", labelled=4_000,
                        metrics={"f1": 0.77, "roc_auc": 0.88}),
    ]  # fmt: skip
    timed = [
        pb.QualityPoint(
            start_time=ts(hour(n)),
            end_time=ts(hour(n + 1)),
            slice_key="region",
            slice_value=region,
            labelled=200,
            metrics={"f1": base - 0.004 * n, "roc_auc": base + 0.08 - 0.002 * n},
        )
        for n in range(24)
        for region, base in (("eu", 0.86), ("us", 0.8))
    ]
    return whole + timed


def alerts() -> list[pb.Alert]:
    firing = pb.Alert(
        id="a1",
        model_name="fraud",
        model_version="3",
        rule="amount-drift",
        kind=pb.ALERT_KIND_DRIFT,
        subject="amount",
        state=pb.ALERT_STATE_FIRING,
        value=0.41,
        threshold=0.2,
        start_time=ts(hour(16)),
        fired_time=ts(hour(18)),
        last_window_end=ts(END),
        windows=8,
        summary="amount drifted: PSI 0.41",
    )
    resolved = pb.Alert(
        id="a2", model_name="fraud", model_version="3", rule="f1-floor",
        kind=pb.ALERT_KIND_QUALITY, subject="f1", state=pb.ALERT_STATE_RESOLVED, value=0.79,
        threshold=0.8, start_time=ts(hour(3)), fired_time=ts(hour(5)),
        resolved_time=ts(hour(8)), summary="f1 0.74 below 0.8",
    )  # fmt: skip
    return [firing, resolved]


def rich_report() -> pb.GetReportResponse:
    """A day of a binary classifier whose `amount` and `country` drift in its afternoon."""
    return pb.GetReportResponse(
        model_name="fraud",
        model_version="3",
        start_time=ts(START),
        end_time=ts(END),
        count=48_000,
        reference_source=pb.REFERENCE_SOURCE_FIRST_ROWS,
        reference_count=10_000,
        columns=columns(),
        drift_over_time=drift_points(),
        quality=quality_points(),
        alerts=alerts(),
        rejected=[pb.RejectedCount(reason="non_finite", count=3)],
        config=pb.MonitorConfig(
            model_name="fraud", task=pb.TASK_TYPE_BINARY_CLASSIFICATION, revision=2
        ),
    )


def empty_report() -> pb.GetReportResponse:
    """A model that answered nothing in the range."""
    return pb.GetReportResponse(
        model_name="quiet", start_time=ts(START), end_time=ts(END), config=pb.MonitorConfig()
    )


# --- terminal ---------------------------------------------------------------------------


def test_terminal_lines_name_every_column_with_its_verdict():
    lines = report_lines(rich_report())
    text = "\n".join(lines)
    assert lines[0] == "model fraud  version 3"
    assert "2026-11-20 00:00Z → 2026-11-21 00:00Z  (24h)" in text
    assert "first rows seen, 10,000 rows" in text
    assert "columns    2 of 5 drifted" in text
    expected = {"amount": "drifted", "age": "ok", HOSTILE[:20]: "no verdict",
                "country": "drifted", "score": "ok"}  # fmt: skip
    for name, word in expected.items():
        line = next(li for li in lines if li.strip().startswith(name))
        assert f" {word} " in line
        assert "ref " in line and "cur " in line
    assert "fewer than 1000 rows" in text
    assert re.search(r"p_adj +4e-12", text) and "chi2 812" in text


def test_terminal_sparklines_show_the_shift():
    amount = next(li for li in report_lines(rich_report()) if li.strip().startswith("amount"))
    ref, cur = re.search(r"ref \[(.*)\]  cur \[(.*)\]", amount).groups()  # type: ignore[union-attr]
    assert len(ref) == len(cur) == 10
    # the reference peaks in the middle, the current one further right
    assert peak(ref) == 4 and peak(cur) == 7


def peak(spark: str) -> int:
    return max(range(len(spark)), key=lambda i: " ▁▂▃▄▅▆▇█".index(spark[i]))


def test_terminal_quality_and_alerts():
    text = "\n".join(report_lines(rich_report()))
    assert "all rows" in text and "region=eu" in text and "labelled 9,000" in text
    assert "f1 0.81" in text and "roc_auc 0.9" in text
    assert "firing    amount-drift  amount  since 2026-11-20 16:00Z  amount drifted" in text
    assert "resolved  f1-floor      f1      since 2026-11-20 03:00Z" in text
    assert "rejected   non_finite 3" in text


def test_terminal_empty_report_says_so():
    text = "\n".join(report_lines(empty_report()))
    assert "rows       0" in text
    assert "no rows in this range" in text
    assert "no labelled predictions" in text
    assert "alerts     none" in text


def test_sparkline_scale_and_zero():
    assert sparkline([0, 1, 2, 4], 4) == " ▃▅█"
    assert sparkline([0, 0], 0) == "  "


def test_verdicts():
    assert [verdict(c) for c in columns()] == ["drifted", "ok", "no verdict", "drifted", "ok"]
    assert verdict(pb.ColumnReport(name="new", reason="no reference for this column")) == (
        "no verdict"
    )


# --- html -------------------------------------------------------------------------------


def test_html_is_self_contained():
    page = report_html(rich_report())
    assert "http://" not in page and "https://" not in page
    assert "src=" not in page and "href=" not in page and "url(" not in page
    assert "@import" not in page and "<script" not in page and "<img" not in page
    assert "<link" not in page and "<iframe" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_html_escapes_names_from_users():
    page = report_html(rich_report())
    assert HOSTILE not in page
    assert html_escaped(HOSTILE) in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_html_draws_the_four_charts():
    page = report_html(rich_report())
    for chart in CHARTS:
        assert f'<svg data-chart="{chart}"' in page
    assert page.count('data-chart="histogram"') == 5
    assert page.count('data-chart="quality-over-time"') == 2  # f1 and roc_auc


def test_html_drift_chart_marks_drifted_buckets_and_the_guide():
    page = report_html(rich_report())
    drift = svg_of(page, "drift-over-time")
    assert drift.count('class="dot drifted"') == 8 + 4  # amount from hour 16, country from 20
    assert 'class="guide"' in drift and "PSI 0.2" in drift
    for name in ("amount", "age", "country", "score"):
        assert f">{name}<" in page  # legend


def test_html_alert_timeline_has_one_bar_per_alert():
    timeline = svg_of(report_html(rich_report()), "alerts-timeline")
    assert timeline.count("<rect") == 2
    assert "firing: amount drifted" in timeline
    assert "#d62728" in timeline and "#7f8c8d" in timeline


def test_html_histogram_bars_per_bin():
    histogram = svg_of(report_html(rich_report()), "histogram")  # amount: 10 bins
    assert histogram.count("<rect") == 20
    assert "reference" in histogram and "current" in histogram


def svg_of(page: str, chart: str) -> str:
    start = page.index(f'<svg data-chart="{chart}"')
    return page[start : page.index("</svg>", start)]


def test_html_of_an_empty_report_says_so_and_draws_nothing():
    page = report_html(empty_report())
    assert "<svg" not in page
    assert "No rows in this range" in page
    assert "No drift measured" in page
    assert "No labelled predictions" in page
    assert "No alerts in this range" in page


def test_regression_metrics_are_charted_when_present():
    report = rich_report()
    del report.quality[:]
    for n in range(3):
        report.quality.add(
            start_time=ts(hour(n)), end_time=ts(hour(n + 1)), labelled=50,
            metrics={"rmse": 1.5 + n, "r2": 0.7, "mae": 1.0},
        )  # fmt: skip
    page = report_html(report)
    assert page.count('data-chart="quality-over-time"') == 2
    assert "rmse over time" in page and "r2 over time" in page and "mae over time" not in page


@pytest.mark.parametrize(("lo", "hi"), [(0, 0.37), (0.71, 0.93), (0, 4200), (5, 5)])
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1
    mantissa = f"{steps.pop():e}".split("e")[0]
    assert float(mantissa) in (1.0, 2.0, 5.0)


def test_time_ticks_fall_on_whole_hours():
    ticks = time_ticks(START.timestamp() + 60, END.timestamp())
    assert 3 <= len(ticks) <= 8
    assert all(t % 3600 == 0 for t in ticks)


# --- `modelplane monitor report` --------------------------------------------------------


def run_monitor(argv: list[str]) -> int:
    """The monitor commands alone, parsed as `modelplane monitor ...` would be."""
    parser = argparse.ArgumentParser(prog="modelplane")
    monitor.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["monitor", *argv])
    return int(args.handler(args))


@pytest.fixture
def report_calls(monkeypatch) -> list[tuple[object, ...]]:
    """MonitoringClient.report answers the rich report and records its arguments."""
    calls: list[tuple[object, ...]] = []

    def report(self, model_name, model_version="", start=None, end=None, buckets=0, timeout=None):
        calls.append((model_name, model_version, start, end, buckets))
        return rich_report()

    monkeypatch.setattr(MonitoringClient, "report", report)
    return calls


def test_the_report_command_prints_the_lines_and_writes_the_page(report_calls, tmp_path, capsys):
    page = tmp_path / "fraud.html"
    argv = ["report", "fraud", "--version", "3", "--since", "2026-11-20T00:00:00Z",
            "--until", "2026-11-21T00:00:00Z", "--buckets", "12", "--html", str(page)]  # fmt: skip
    assert run_monitor(argv) == 0
    out = capsys.readouterr().out
    assert "columns    2 of 5 drifted" in out
    assert out.rstrip().endswith(f"wrote {page}")
    assert page.read_text(encoding="utf-8") == report_html(rich_report())
    assert report_calls == [("fraud", "3", START, END, 12)]


def test_the_report_command_as_json_keeps_stdout_json(report_calls, tmp_path, capsys):
    assert run_monitor(["report", "fraud", "--json", "--html", str(tmp_path / "r.html")]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["model_name"] == "fraud" and len(data["columns"]) == 5
    assert "wrote" in captured.err
    assert report_calls == [("fraud", "", None, None, 0)]


def test_the_report_command_rejects_bad_flags(report_calls, capsys):
    assert run_monitor(["report", "fraud", "--until", "soon"]) == 2
    assert "--until takes a duration" in capsys.readouterr().err
    assert run_monitor(["report", "fraud", "--buckets", "-1"]) == 2
    assert report_calls == []
