"""Mergeable window statistics: exact where they can be, and merge order never matters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring.statistics import (
    COUNTER_MAX,
    MAX_CATEGORIES,
    OTHER,
    CategoricalColumn,
    NumericColumn,
    WindowStats,
    column_from_proto,
    histogram,
    merge_column,
    output_column_names,
)

EDGES = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
RANKS = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
FEATURES = [f"f{i}" for i in range(3)]
OUTPUTS = output_column_names(["probabilities"], [2])


def _values(seed: int, n: int, missing: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n).astype(np.float32)
    values[rng.random(n) < missing] = np.nan
    return values


def _numeric(values: np.ndarray, edges: np.ndarray | None = EDGES) -> NumericColumn:
    column = NumericColumn(edges)
    for chunk in np.array_split(values, max(1, len(values) // 1000)):
        column.update(chunk)
    return column


def _rank_error(column: NumericColumn, values: np.ndarray) -> float:
    """Largest gap between asked ranks and the true ranks of the sketch's quantiles."""
    present = np.sort(values[~np.isnan(values)])
    quantiles = column.quantiles(RANKS)
    true_ranks = np.searchsorted(present, quantiles, side="right") / len(present)
    return float(np.max(np.abs(true_ranks - RANKS)))


def _assert_same_numeric(a: NumericColumn, b: NumericColumn) -> None:
    assert (a.count, a.missing, a.min, a.max) == (b.count, b.missing, b.min, b.max)
    assert a.bin_counts is not None and b.bin_counts is not None
    np.testing.assert_array_equal(a.bin_counts, b.bin_counts)
    np.testing.assert_array_equal(a.edges, b.edges)
    assert math.isclose(a.mean, b.mean, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(a.variance, b.variance, rel_tol=1e-9)
    assert a.sketch.n == b.sketch.n


def _rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, len(FEATURES))).astype(np.float32)
    features[rng.random(n) < 0.02, 1] = np.nan
    score = 1.0 / (1.0 + np.exp(-features[:, :1]))
    outputs = np.hstack([1.0 - score, score]).astype(np.float32)
    categories = [str(c) for c in rng.choice(["a", "b", "c", ""], n, p=[0.5, 0.3, 0.15, 0.05])]
    return features, outputs, categories, rng.random(n) * 10


def _times(seed: int, n: int) -> np.ndarray:
    return 1_700_000_000_000_000 + np.sort(np.random.default_rng(seed).integers(0, 10**8, n))


def _window(seed: int, n: int) -> WindowStats:
    features, outputs, categories, latency = _rows(seed, n)
    window = WindowStats()
    window.add_rows(
        features, FEATURES, outputs, OUTPUTS, {"cat": categories}, latency, {"f0": EDGES}
    )
    window.add_records(f"route{seed % 2}", _times(seed, n), latency)
    return window


# -- numeric columns


def test_nan_is_missing_and_excluded_from_every_statistic() -> None:
    column = NumericColumn(EDGES)
    column.update(np.array([1.0, np.nan, 3.0, np.nan], dtype=np.float32))
    assert (column.count, column.missing, column.present) == (4, 2, 2)
    assert column.mean == 2.0 and column.variance == 1.0 and column.stddev == 1.0
    assert (column.min, column.max) == (1.0, 3.0)
    assert column.bin_counts is not None and column.bin_counts.sum() == 2
    assert column.sketch.n == 2


def test_all_missing_column_has_no_moments() -> None:
    column = NumericColumn()
    column.update(np.full(5, np.nan, dtype=np.float32))
    assert (column.count, column.missing) == (5, 5)
    assert math.isnan(column.variance) and math.isnan(column.quantiles([0.5])[0])
    assert (column.min, column.max) == (math.inf, -math.inf)


def test_histogram_puts_out_of_range_values_in_the_end_bins() -> None:
    values = np.array([-9.0, -2.0, -1.0, -0.7, 0.0, 1.99, 2.0, 9.0])
    np.testing.assert_array_equal(histogram(values, EDGES), [2, 2, 0, 1, 0, 3])
    inside = np.random.default_rng(0).uniform(-2, 2, 1000)
    np.testing.assert_array_equal(histogram(inside, EDGES), np.histogram(inside, EDGES)[0])


def test_update_refuses_bad_edges_and_shapes() -> None:
    for edges in ([1.0], [0.0, 0.0, 1.0], [0.0, np.inf]):
        with pytest.raises(InvalidArgument):
            NumericColumn(np.array(edges))
    with pytest.raises(InvalidArgument):
        NumericColumn().update(np.zeros((2, 2)))


def test_merge_of_parts_equals_the_whole() -> None:
    a, b = _values(1, 30_000), _values(2, 20_000)
    merged = _numeric(a)
    merged.merge(_numeric(b))
    whole = _numeric(np.concatenate([a, b]))
    _assert_same_numeric(merged, whole)
    assert _rank_error(merged, np.concatenate([a, b])) < 0.02


def test_merge_is_associative_and_commutative() -> None:
    parts = [_values(seed, 15_000 + 5_000 * seed) for seed in range(3)]
    a, b, c = (_numeric(p) for p in parts)
    left = a.copy()
    left.merge(b)
    left.merge(c)
    bc = b.copy()
    bc.merge(c)
    right = a.copy()
    right.merge(bc)
    backwards = c.copy()
    backwards.merge(b)
    backwards.merge(a)
    everything = np.concatenate(parts)
    for result in (right, backwards):
        _assert_same_numeric(left, result)
        assert _rank_error(result, everything) < 0.02


def test_empty_columns_merge_as_identity_and_merges_do_not_alias() -> None:
    full = _numeric(_values(3, 5_000))
    before = full.to_proto()
    full.merge(NumericColumn())
    assert full.to_proto() == before
    empty = NumericColumn()
    empty.merge(full)
    _assert_same_numeric(empty, full)
    empty.update(np.ones(10, dtype=np.float32))
    assert full.to_proto() == before


def test_merge_over_different_edges_keeps_own_edges_and_converts_through_the_sketch() -> None:
    a, b = _values(4, 40_000), _values(5, 40_000)
    other_edges = np.array([-3.0, -1.5, 0.25, 3.0])
    mine = _numeric(a)
    mine.merge(_numeric(b, other_edges))
    np.testing.assert_array_equal(mine.edges, EDGES)
    assert mine.bin_counts is not None
    assert mine.bin_counts.sum() == mine.present
    truth = histogram(np.concatenate([a, b])[~np.isnan(np.concatenate([a, b]))], EDGES)
    # Only b's half is approximate; its cumulative error is bounded by the rank error.
    assert np.max(np.abs(np.cumsum(mine.bin_counts) - np.cumsum(truth))) < 0.02 * 40_000


def test_merge_adopts_edges_from_the_side_that_has_them() -> None:
    no_edges = _numeric(_values(6, 10_000), None)
    with_edges = _numeric(_values(7, 10_000))
    no_edges.merge(with_edges)
    np.testing.assert_array_equal(no_edges.edges, EDGES)
    assert no_edges.bin_counts is not None
    assert no_edges.bin_counts.sum() == no_edges.present


def test_bin_counts_over_is_exact_on_own_edges_and_close_on_others() -> None:
    values = _values(8, 50_000)
    column = _numeric(values)
    present = values[~np.isnan(values)]
    np.testing.assert_array_equal(column.bin_counts_over(EDGES), histogram(present, EDGES))
    other = np.linspace(-2.5, 2.5, 11)
    approx = column.bin_counts_over(other)
    assert approx.sum() == len(present)
    error = np.abs(np.cumsum(approx) - np.cumsum(histogram(present, other)))
    assert error.max() < 0.02 * len(present)


def test_numeric_proto_round_trip() -> None:
    column = _numeric(_values(9, 5_000))
    back = NumericColumn.from_proto(column.to_proto())
    _assert_same_numeric(back, column)
    np.testing.assert_array_equal(back.quantiles(RANKS), column.quantiles(RANKS))
    empty = column_from_proto(NumericColumn().to_proto())
    assert isinstance(empty, NumericColumn)
    assert (empty.count, empty.min, empty.max, empty.edges) == (0, math.inf, -math.inf, None)


def test_inconsistent_numeric_protos_are_refused() -> None:
    good = _numeric(_values(10, 2_000)).to_proto()
    broken = []
    for change in ("counts", "missing", "sketch", "rows"):
        message = pb.ColumnStatistics()
        message.CopyFrom(good)
        if change == "counts":
            message.bin_counts.append(1)
        elif change == "missing":
            message.missing = message.count + 1
        elif change == "sketch":
            message.quantile_sketch = b"\x01\x02garbage"
        else:
            message.count += 1
        broken.append(message)
    for message in broken:
        with pytest.raises(InvalidArgument):
            NumericColumn.from_proto(message)


# -- categorical columns


def test_categorical_counts_and_missing() -> None:
    column = CategoricalColumn()
    column.update(["a", "b", "", "a"])
    column.update(np.array(["b", "c", ""]))
    assert (column.count, column.missing) == (7, 2)
    assert column.counts == {"a": 2, "b": 2, "c": 1}


def test_categorical_merge_is_exact_associative_and_commutative() -> None:
    rng = np.random.default_rng(11)
    parts = [rng.choice(["x", "y", "z", ""], 1000 * (i + 1)) for i in range(3)]
    columns = []
    for part in parts:
        column = CategoricalColumn()
        column.update(part)
        columns.append(column)
    a, b, c = columns
    left = a.copy()
    left.merge(b)
    left.merge(c)
    right = c.copy()
    right.merge(a)
    right.merge(b)
    whole = CategoricalColumn()
    whole.update(np.concatenate(parts))
    for result in (left, right):
        assert (result.count, result.missing, result.counts) == (
            whole.count,
            whole.missing,
            whole.counts,
        )


def test_categories_beyond_the_cap_count_as_other_whatever_the_merge_order() -> None:
    names = [f"c{i:03d}" for i in range(MAX_CATEGORIES + 44)]
    a, b = CategoricalColumn(), CategoricalColumn()
    a.update(names[:200] * 3)
    b.update(names[150:] * 2)
    ab, ba = a.copy(), b.copy()
    ab.merge(b)
    ba.merge(a)
    assert ab.counts == ba.counts
    assert len(ab.counts) == MAX_CATEGORIES + 1 and OTHER in ab.counts
    assert sum(ab.counts.values()) == ab.count == 200 * 3 + 150 * 2
    # The most frequent categories (seen on both sides) are the ones kept by name.
    assert all(ab.counts[name] == 5 for name in names[150:200])


def test_categorical_proto_round_trip_and_checks() -> None:
    column = CategoricalColumn()
    column.update(["a", "b", "", "a"])
    back = column_from_proto(column.to_proto())
    assert isinstance(back, CategoricalColumn)
    assert (back.count, back.missing, back.counts) == (4, 1, {"a": 2, "b": 1})
    with pytest.raises(InvalidArgument):
        CategoricalColumn.from_proto(pb.ColumnStatistics(count=5, category_counts={"a": 2}))


def test_merging_columns_of_different_kinds_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        merge_column(NumericColumn(), CategoricalColumn())


# -- windows


def test_output_column_names() -> None:
    assert output_column_names(["label", "probabilities"], [1, 3]) == [
        "label",
        "probabilities[0]",
        "probabilities[1]",
        "probabilities[2]",
    ]
    with pytest.raises(InvalidArgument):
        output_column_names(["label"], [0])


def test_add_rows_fills_every_column() -> None:
    window = _window(12, 2_500)
    assert window.count == 2_500
    assert set(window.columns) == {*FEATURES, *OUTPUTS, "cat"}
    f0, f1, cat = window.columns["f0"], window.columns["f1"], window.columns["cat"]
    assert isinstance(f0, NumericColumn) and isinstance(f1, NumericColumn)
    np.testing.assert_array_equal(f0.edges, EDGES)
    assert f1.edges is None and f1.missing > 0 and f1.count == 2_500
    assert isinstance(cat, CategoricalColumn) and cat.missing > 0
    features, _, _, latency = _rows(12, 2_500)
    assert math.isclose(window.latency_sum_ms, float(latency.sum()), rel_tol=1e-12)
    assert math.isclose(f0.mean, float(features[:, 0].astype(np.float64).mean()), rel_tol=1e-9)


def test_add_rows_refuses_mismatched_shapes_and_names() -> None:
    features, outputs, categories, latency = _rows(13, 10)
    window = WindowStats()
    with pytest.raises(InvalidArgument):
        window.add_rows(features[:5], FEATURES, outputs, OUTPUTS, {}, latency, {})
    with pytest.raises(InvalidArgument):
        window.add_rows(features, FEATURES, outputs, OUTPUTS[:1], {}, latency, {})
    with pytest.raises(InvalidArgument):
        window.add_rows(features, FEATURES, outputs, OUTPUTS, {"f0": categories}, latency, {})
    with pytest.raises(InvalidArgument):
        window.add_rows(features, FEATURES, outputs, OUTPUTS, {"c": categories[:3]}, latency, {})
    with pytest.raises(InvalidArgument):
        window.add_records("", _times(13, 10), latency[:3])
    assert window.count == 0 and not window.routes


def _assert_same_window(a: WindowStats, b: WindowStats) -> None:
    assert (a.count, a.dropped_records, a.failed_requests, a.requests, a.rejected) == (
        b.count,
        b.dropped_records,
        b.failed_requests,
        b.requests,
        b.rejected,
    )
    assert math.isclose(a.latency_sum_ms, b.latency_sum_ms, rel_tol=1e-12)
    assert (a.routes, a.first_us, a.last_us, a.outputs) == (
        b.routes,
        b.first_us,
        b.last_us,
        b.outputs,
    )
    assert (a.latency.count, a.latency.min, a.latency.max) == (
        b.latency.count,
        b.latency.min,
        b.latency.max,
    )
    assert math.isclose(a.latency.mean, b.latency.mean, rel_tol=1e-9, abs_tol=1e-12)
    assert set(a.columns) == set(b.columns)
    for name, column in a.columns.items():
        other = b.columns[name]
        if isinstance(column, NumericColumn):
            assert isinstance(other, NumericColumn)
            assert (column.count, column.missing, column.min, column.max) == (
                other.count,
                other.missing,
                other.min,
                other.max,
            )
            if column.bin_counts is not None:
                np.testing.assert_array_equal(column.bin_counts, other.bin_counts)
            assert math.isclose(column.mean, other.mean, rel_tol=1e-9, abs_tol=1e-12)
            assert math.isclose(column.variance, other.variance, rel_tol=1e-9)
        else:
            assert isinstance(other, CategoricalColumn)
            assert (column.count, column.missing, column.counts) == (
                other.count,
                other.missing,
                other.counts,
            )


def test_window_of_a_plus_b_equals_a_merged_with_b() -> None:
    features_a, outputs_a, categories_a, latency_a = _rows(14, 20_000)
    features_b, outputs_b, categories_b, latency_b = _rows(15, 30_000)
    a, b, whole = WindowStats(), WindowStats(), WindowStats()
    edges = {"f0": EDGES, "probabilities[1]": np.linspace(0, 1, 11)}
    a.add_rows(features_a, FEATURES, outputs_a, OUTPUTS, {"cat": categories_a}, latency_a, edges)
    b.add_rows(features_b, FEATURES, outputs_b, OUTPUTS, {"cat": categories_b}, latency_b, edges)
    whole.add_rows(
        np.vstack([features_a, features_b]),
        FEATURES,
        np.vstack([outputs_a, outputs_b]),
        OUTPUTS,
        {"cat": categories_a + categories_b},
        np.concatenate([latency_a, latency_b]),
        edges,
    )
    a.rejected, b.rejected = {"schema": 2}, {"schema": 1, "too_late": 4}
    whole.rejected = {"schema": 3, "too_late": 4}
    a.requests, b.requests, whole.requests = 3, 4, 7
    times_a, times_b = _times(14, 20_000), _times(15, 30_000)
    a.add_records("r", times_a, latency_a)
    b.add_records("r", times_b[:10_000], latency_b[:10_000])
    b.add_records("", times_b[10_000:], latency_b[10_000:])
    whole.add_records(
        "r",
        np.concatenate([times_a, times_b[:10_000]]),
        np.concatenate([latency_a, latency_b[:10_000]]),
    )
    whole.add_records("", times_b[10_000:], latency_b[10_000:])
    merged = a.copy()
    merged.merge(b)
    _assert_same_window(merged, whole)
    assert merged.routes == {"r": 30_000, "": 20_000}
    assert merged.first_us == min(times_a[0], times_b[0])
    assert merged.last_us == max(times_a[-1], times_b[-1])
    assert merged.outputs == set(OUTPUTS)
    for j, name in enumerate(FEATURES):
        column = merged.columns[name]
        assert isinstance(column, NumericColumn)
        assert _rank_error(column, np.concatenate([features_a[:, j], features_b[:, j]])) < 0.02


def test_window_merge_is_associative_and_commutative() -> None:
    a, b, c = (_window(seed, 3_000 + 1_000 * seed) for seed in (16, 17, 18))
    left = a.copy()
    left.merge(b)
    left.merge(c)
    bc = b.copy()
    bc.merge(c)
    right = a.copy()
    right.merge(bc)
    backwards = c.copy()
    backwards.merge(b)
    backwards.merge(a)
    _assert_same_window(left, right)
    _assert_same_window(left, backwards)


def test_window_bytes_round_trip() -> None:
    window = _window(19, 4_000)
    window.dropped_records, window.failed_requests, window.rejected = 3, 2, {"late": 1}
    back = WindowStats.from_bytes(window.to_bytes())
    _assert_same_window(back, window)
    assert back.to_bytes() == window.to_bytes()
    assert WindowStats.from_bytes(WindowStats().to_bytes()).count == 0
    with pytest.raises(InvalidArgument):
        WindowStats.from_bytes(b"\xff\xff\xff")


def test_producer_counts_saturate_so_a_window_always_serializes() -> None:
    """Found by tests/fuzz: producers each reporting totals near the bound summed past
    uint64 in one window, which then failed to serialize, and every summary and report
    of the model with it."""
    window = WindowStats()
    for _ in range(3):  # three producers, or one restarting twice
        window.add_producer_counts(COUNTER_MAX, COUNTER_MAX - 1, 5)
    other = WindowStats()
    other.add_producer_counts(COUNTER_MAX, 1, 7)
    window.merge(other)
    assert (window.dropped_records, window.failed_requests) == (COUNTER_MAX, COUNTER_MAX)
    assert window.requests == 22  # below the bound, counts stay exact
    back = WindowStats.from_bytes(window.to_bytes())
    assert (back.dropped_records, back.failed_requests, back.requests) == (
        COUNTER_MAX,
        COUNTER_MAX,
        22,
    )
