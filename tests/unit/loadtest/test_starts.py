"""The stability scenario's arithmetic and report (no servers)."""

from __future__ import annotations

import math

import pytest

from modelplane.loadtest.starts import Batches, Measured, print_stability, print_workers, spread
from modelplane.loadtest.stats import LatencySummary, LevelResult


def level(label: str, ok: int, p50_ms: float, server_cpu_s: float) -> LevelResult:
    latency = LatencySummary(ok, p50_ms, p50_ms, p50_ms, p50_ms, p50_ms, p50_ms * 2)
    return LevelResult(
        label=label,
        mode="closed",
        concurrency=int(label[2:]),
        rate=None,
        elapsed_s=1.0,
        ok=ok,
        errors={},
        scheduled=ok,
        rows_per_request=1,
        latency=latency,
        server_cpu_s=server_cpu_s,
        client_cpu_s=0.1,
    )


def start(rps: int, p50_ms: float, others: float = 0.0) -> Measured:
    return Measured(
        {"c=1": level("c=1", 700, p50_ms, 0.7), "c=64": level("c=64", rps, 20.0, rps * 3e-4)},
        others,
        [Batches(1.0, 450.0), Batches(20.0, 3000.0)],
    )


def test_spread_is_max_over_min_and_the_coefficient_of_variation():
    ratio, cv = spread([2.0, 4.0])
    assert ratio == 2.0 and cv == pytest.approx(1 / 3)
    assert spread([5.0, 5.0, 5.0]) == (1.0, 0.0)
    assert all(math.isnan(value) for value in spread([]))


def test_the_report_gives_each_start_and_the_spread(capsys):
    print_stability(
        [start(4000, 1.0), start(4200, 1.05, others=0.5), start(3900, 1.02)], 400.0, 180.0
    )
    out = capsys.readouterr().out
    assert out.count("\n    ") >= 3  # one row per start
    assert "c=64 throughput: 3900-4200 req/s, max/min 1.08" in out
    assert (
        "c=1 p50" in out
        and "floor at c=64: 180 µs" in out
        and "floor at c=1 (400 µs" in out
        and "one row on its runtime thread (median 450 µs)" in out
    )
    assert "the 2 starts with others + steal under 0.1 CPU" in out


def test_the_workers_report_gives_the_ratio(capsys):
    print_workers(start(3000, 1.0), start(4800, 1.0), 2)
    assert "2 workers / 1 worker throughput: 1.60x" in capsys.readouterr().out
