import math

import numpy as np
import pytest

from modelplane.loadtest.stats import LatencySummary, LevelResult, percentile


def test_nearest_rank_percentiles_of_1_to_100() -> None:
    values = np.arange(1, 101, dtype=float)
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(values)
    assert percentile(shuffled, 50) == 50
    assert percentile(shuffled, 90) == 90
    assert percentile(shuffled, 99) == 99
    assert percentile(shuffled, 100) == 100


def test_percentile_is_always_an_observed_value() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 50) == 20.0  # rank ceil(0.5 * 4) = 2
    assert percentile(values, 51) == 30.0
    assert percentile(values, 99) == 40.0
    assert percentile([7.0], 99) == 7.0


def test_tail_percentile_of_few_samples_is_the_maximum() -> None:
    assert percentile(list(range(1, 11)), 99) == 10


def test_empty_and_invalid() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_in_milliseconds() -> None:
    summary = LatencySummary.of([0.001 * v for v in range(1, 101)])
    assert summary.count == 100
    assert summary.p50_ms == pytest.approx(50.0)
    assert summary.p90_ms == pytest.approx(90.0)
    assert summary.p99_ms == pytest.approx(99.0)
    assert summary.min_ms == pytest.approx(1.0)
    assert summary.max_ms == pytest.approx(100.0)
    assert summary.mean_ms == pytest.approx(50.5)


def _level(**changes: object) -> LevelResult:
    values: dict[str, object] = dict(
        label="c=8",
        mode="closed",
        concurrency=8,
        rate=None,
        elapsed_s=2.0,
        ok=1000,
        errors={"UNAVAILABLE": 200},
        scheduled=1200,
        rows_per_request=4,
        latency=LatencySummary.of([0.002] * 10),
        server_cpu_s=0.6,
        client_cpu_s=0.3,
    )
    values.update(changes)
    return LevelResult(**values)  # type: ignore[arg-type]


def test_derived_figures() -> None:
    level = _level()
    assert level.completed == 1200
    assert level.throughput_rps == 500.0
    assert level.rows_per_s == 2000.0
    # CPU is divided by every answered request, errors included.
    assert level.server_cpu_us_per_request == pytest.approx(500.0)
    assert level.server_cpu_cores == pytest.approx(0.3)
    assert level.client_cpu_us_per_request == pytest.approx(250.0)


def test_figures_without_metrics_or_requests() -> None:
    level = _level(server_cpu_s=None, ok=0, errors={}, latency=LatencySummary.of([]))
    assert level.server_cpu_us_per_request is None
    assert level.client_cpu_us_per_request is None
    assert math.isnan(level.latency.p99_ms)
    assert level.to_json()["latency"]["p99_ms"] is None


def test_json_round_trip() -> None:
    level = _level()
    again = LevelResult.from_json(level.to_json())
    assert again == level
    empty = _level(ok=0, errors={}, latency=LatencySummary.of([]))
    assert LevelResult.from_json(empty.to_json()).latency.count == 0
