"""Drift tests and verdicts, down to the detection targets: a quarter-sd shift in one
feature of ten is caught almost always, a tenth of an sd most of the time, and unshifted
windows are flagged at about the family alpha."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.registry.v1 import registry_pb2 as registry_pb
from modelplane.services.monitoring import drift
from modelplane.services.monitoring.drift import (
    DEFAULT_MIN_SAMPLES,
    QUANTILE_RANKS,
    ColumnReference,
    Reference,
    Verdict,
    assess,
    column_drift,
    column_report,
    drift_reports,
    holm_bonferroni,
    js_distance,
    psi,
    reference_from_registry,
    reference_from_rows,
)
from modelplane.services.monitoring.statistics import (
    CategoricalColumn,
    NumericColumn,
    WindowStats,
)

FEATURES = [f"f{i}" for i in range(10)]
WEIGHTS = np.linspace(-1.0, 1.0, len(FEATURES))
CATEGORIES = np.array(["a", "b", "c", "d", "e"])
SHARES = np.array([0.4, 0.25, 0.15, 0.12, 0.08])
REFERENCE_ROWS = 100_000
WINDOW_ROWS = 10_000
BATCH = 1_000


@dataclass
class Rows:
    features: np.ndarray  # float32 [rows, 10]
    score: np.ndarray  # float32 [rows, 1]
    category: np.ndarray  # str [rows]


def _rows(seed: int, n: int, shift: float = 0.0, column: int = 0) -> Rows:
    """Ten N(0, 1) features (one shifted by `shift` sd), a 5-way category, and a model's
    score: a sigmoid of a linear combination of the features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(FEATURES)))
    x[:, column] += shift
    score = 1.0 / (1.0 + np.exp(-0.5 * (x @ WEIGHTS)))
    category = CATEGORIES[rng.choice(len(CATEGORIES), n, p=SHARES)]
    return Rows(x.astype(np.float32), score[:, None].astype(np.float32), category)


def _registry_statistics(rows: Rows) -> list[registry_pb.FeatureStatistics]:
    """Decile edges and counts, as the registry keeps them (see examples/fraud.py)."""
    matrix = np.hstack([rows.features, rows.score]).astype(np.float64)
    statistics = []
    for j, name in enumerate([*FEATURES, "score"]):
        edges = np.unique(np.quantile(matrix[:, j], np.linspace(0, 1, 11)))
        counts, _ = np.histogram(matrix[:, j], bins=edges)
        statistics.append(
            registry_pb.FeatureStatistics(
                name=name, bin_edges=edges.tolist(), counts=counts.tolist()
            )
        )
    return statistics


@pytest.fixture(scope="module")
def reference() -> Reference:
    rows = _rows(12_345, REFERENCE_ROWS)
    ref = reference_from_registry(_registry_statistics(rows))
    names, counts = np.unique(rows.category, return_counts=True)
    ref.columns["category"] = ColumnReference.categorical_counts(
        dict(zip(names.tolist(), counts.tolist(), strict=True))
    )
    return ref


def _window(rows: Rows, reference: Reference) -> WindowStats:
    """A window filled the way ingest fills it: batches of 1,000 rows."""
    edges = {
        name: np.asarray(column.bin_edges)
        for name, column in reference.columns.items()
        if not column.categorical
    }
    window = WindowStats()
    for start in range(0, len(rows.category), BATCH):
        part = slice(start, start + BATCH)
        window.add_rows(
            rows.features[part],
            FEATURES,
            rows.score[part],
            ["score"],
            {"category": rows.category[part]},
            np.ones(len(rows.category[part])),
            edges,
        )
    return window


def _verdicts(window: WindowStats, reference: Reference) -> dict[str, Verdict]:
    drifts = {
        name: column_drift(name, reference.columns[name], column)
        for name, column in window.columns.items()
    }
    return assess(drifts, pb.DriftPolicy())


# -- the detection targets


def test_quarter_sd_shift_in_one_feature_is_detected(reference: Reference) -> None:
    detected = 0
    for seed in range(100, 110):
        verdicts = _verdicts(_window(_rows(seed, WINDOW_ROWS, 0.25, 3), reference), reference)
        detected += verdicts["f3"].drifted
    assert detected >= 9


def test_tenth_sd_shift_in_one_feature_is_detected_most_of_the_time(
    reference: Reference,
) -> None:
    detected = 0
    for seed in range(200, 210):
        verdicts = _verdicts(_window(_rows(seed, WINDOW_ROWS, 0.1, 7), reference), reference)
        detected += verdicts["f7"].drifted
    assert detected >= 5


def test_unshifted_windows_rarely_raise_an_alarm(reference: Reference) -> None:
    # Family alpha 0.01 over 12 columns: about 0.5 false windows expected in 50.
    false_alarms = 0
    for seed in range(1_000, 1_050):
        verdicts = _verdicts(_window(_rows(seed, WINDOW_ROWS), reference), reference)
        assert all(v.tested for v in verdicts.values())
        false_alarms += any(v.drifted for v in verdicts.values())
    assert false_alarms <= 1


def test_shifted_category_is_detected_by_chi2(reference: Reference) -> None:
    rows = _rows(300, WINDOW_ROWS)
    rng = np.random.default_rng(301)
    rows.category = CATEGORIES[rng.choice(5, WINDOW_ROWS, p=[0.35, 0.25, 0.15, 0.12, 0.13])]
    window = _window(rows, reference)
    result = column_drift("category", reference.columns["category"], window.columns["category"])
    assert result.test == "chi2" and result.p_value < 1e-10
    assert result.categories[0] == "a"  # most frequent first
    assert _verdicts(window, reference)["category"].drifted


# -- distances and tests


def test_psi_and_js_are_zero_for_identical_and_positive_for_shifted() -> None:
    counts = np.array([100.0, 200.0, 300.0, 400.0])
    assert psi(counts, counts * 3) == pytest.approx(0.0, abs=1e-12)
    assert js_distance(counts, counts * 3) == pytest.approx(0.0, abs=1e-7)
    shifted = np.array([400.0, 300.0, 200.0, 100.0])
    assert psi(counts, shifted) > 0.5
    assert 0.0 < js_distance(counts, shifted) <= 1.0
    # An empty bin on one side gives a large but finite PSI.
    assert math.isfinite(psi(counts, np.array([0.0, 0.0, 0.0, 10.0])))
    assert math.isnan(psi(counts, np.zeros(4))) and math.isnan(js_distance(np.zeros(4), counts))


def test_ks_is_zero_for_identical_histograms_and_grows_with_a_shift() -> None:
    values = np.random.default_rng(1).standard_normal(20_000).astype(np.float32)
    edges = np.quantile(values, np.linspace(0, 1, 11))
    ref = ColumnReference.numeric(edges.tolist(), np.histogram(values, edges)[0].tolist())
    same, shifted = NumericColumn(edges), NumericColumn(edges)
    same.update(values)
    shifted.update(values + np.float32(0.5))
    unchanged = column_drift("x", ref, same)
    assert (unchanged.test, unchanged.statistic, unchanged.p_value) == ("ks", 0.0, 1.0)
    moved = column_drift("x", ref, shifted)
    assert moved.statistic > 0.15 and moved.p_value < 1e-12 and moved.psi > 0.1


def test_current_without_reference_edges_is_binned_through_its_sketch() -> None:
    values = np.random.default_rng(2).standard_normal(20_000).astype(np.float32)
    edges = np.quantile(values, np.linspace(0, 1, 11))
    ref = ColumnReference.numeric(edges.tolist(), np.histogram(values, edges)[0].tolist())
    column = NumericColumn()
    column.update(values)
    result = column_drift("x", ref, column)
    assert result.current_counts.sum() == 20_000 and result.statistic < 0.02


def test_chi2_ignores_empty_categories_and_pools_rare_ones() -> None:
    reference = ColumnReference.categorical_counts({"a": 5_000, "b": 5_000, "gone": 0})
    current = CategoricalColumn()
    current.update(["a"] * 1_000 + ["b"] * 1_000 + ["new"])
    result = column_drift("c", reference, current)
    assert set(result.categories) == {"a", "b", "gone", "new"}
    # A few rows of a never-seen category are no evidence of drift...
    assert result.p_value > 0.5
    # ...many are.
    current.update(["new"] * 80)
    assert column_drift("c", reference, current).p_value < 1e-20


def test_kind_mismatch_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        column_drift("x", ColumnReference.numeric([0.0, 1.0], [5]), CategoricalColumn())


def test_holm_bonferroni() -> None:
    adjusted = holm_bonferroni([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_bonferroni([]) == []
    assert holm_bonferroni([0.5, 0.9]) == [1.0, 1.0]


# -- verdicts


def _simple_drift(
    name: str, p_value: float, count: int = 5_000, psi_value: float = 0.2
) -> drift.ColumnDrift:
    return drift.ColumnDrift(
        name=name,
        categorical=False,
        test="ks",
        statistic=0.1,
        p_value=p_value,
        psi=psi_value,
        js_distance=0.1,
        reference_counts=np.ones(2),
        current_counts=np.ones(2),
        bin_edges=np.array([0.0, 1.0, 2.0]),
        categories=(),
        count=count,
        missing=0,
    )


def test_assess_gates_on_min_samples_and_ignores() -> None:
    drifts = {
        "small": _simple_drift("small", 1e-9, count=DEFAULT_MIN_SAMPLES - 1),
        "ignored": _simple_drift("ignored", 1e-9),
        "shifted": _simple_drift("shifted", 1e-9),
        "calm": _simple_drift("calm", 0.4),
    }
    policy = pb.DriftPolicy(columns={"ignored": pb.ColumnThreshold(ignore=True)})
    verdicts = assess(drifts, policy)
    assert list(verdicts) == list(drifts)
    assert not verdicts["small"].tested and "fewer than 1000 rows" in verdicts["small"].reason
    assert not verdicts["ignored"].tested and "ignored" in verdicts["ignored"].reason
    assert verdicts["shifted"].drifted and verdicts["shifted"].adjusted_p_value == pytest.approx(
        2e-9
    )
    assert not verdicts["calm"].drifted and verdicts["calm"].adjusted_p_value == 0.4
    policy.min_samples = 100
    smaller = assess(drifts, policy)
    # Three tested columns now: Holm multiplies the two smallest by 3 and 2, monotone.
    assert smaller["small"].drifted and smaller["shifted"].adjusted_p_value == pytest.approx(3e-9)


def test_assess_applies_effect_size_floors_and_alpha() -> None:
    drifts = {"x": _simple_drift("x", 1e-6, psi_value=0.05)}
    assert assess(drifts, pb.DriftPolicy())["x"].drifted
    floor = pb.DriftPolicy(columns={"x": pb.ColumnThreshold(min_psi=0.1)})
    verdict = assess(drifts, floor)["x"]
    assert verdict.tested and not verdict.drifted and "PSI" in verdict.reason
    js_floor = pb.DriftPolicy(columns={"x": pb.ColumnThreshold(min_js_distance=0.2)})
    assert not assess(drifts, js_floor)["x"].drifted
    assert not assess(drifts, pb.DriftPolicy(family_alpha=1e-7))["x"].drifted
    with pytest.raises(InvalidArgument):
        assess(drifts, pb.DriftPolicy(family_alpha=1.5))


def test_column_report_fills_statistics_and_verdict(reference: Reference) -> None:
    window = _window(_rows(400, WINDOW_ROWS, 0.5, 0), reference)
    column = window.columns["f0"]
    assert isinstance(column, NumericColumn)
    result = column_drift("f0", reference.columns["f0"], column)
    verdict = assess({"f0": result}, pb.DriftPolicy())["f0"]
    report = column_report(column, result, verdict, is_output=False)
    assert (report.name, report.count, report.categorical, report.test) == (
        "f0",
        WINDOW_ROWS,
        False,
        "ks",
    )
    assert report.mean == pytest.approx(0.5, abs=0.05) and report.stddev == pytest.approx(1, 0.05)
    assert report.min < report.max and list(report.quantile_ranks) == list(QUANTILE_RANKS)
    assert list(report.quantiles) == sorted(report.quantiles)
    assert len(report.bin_edges) == len(report.reference_counts) + 1
    assert sum(report.current_counts) == WINDOW_ROWS
    assert report.drifted and report.adjusted_p_value == result.p_value and report.psi > 0


def test_drift_reports_cover_every_window_column(reference: Reference) -> None:
    window = _window(_rows(500, 2_000), reference)
    extra = NumericColumn()
    extra.update(np.ones(5, dtype=np.float32))
    window.columns["unreferenced"] = extra
    reports = drift_reports(reference, window.columns, pb.DriftPolicy(), output_names={"score"})
    by_name = {r.name: r for r in reports}
    assert list(by_name) == list(window.columns)
    assert by_name["score"].is_output and not by_name["f0"].is_output
    assert by_name["category"].categorical and by_name["category"].test == "chi2"
    assert by_name["unreferenced"].reason == "no reference for this column"
    assert not any(r.drifted for r in reports)


# -- references


def test_reference_from_registry_skips_invalid_statistics() -> None:
    statistics = [
        registry_pb.FeatureStatistics(name="ok", bin_edges=[0, 1, 2], counts=[3, 4]),
        registry_pb.FeatureStatistics(name="unsorted", bin_edges=[0, 2, 1], counts=[3, 4]),
        registry_pb.FeatureStatistics(name="short", bin_edges=[0, 1, 2], counts=[3]),
        registry_pb.FeatureStatistics(name="negative", bin_edges=[0, 1], counts=[-1]),
    ]
    ref = reference_from_registry(statistics)
    assert list(ref.columns) == ["ok"]
    assert (ref.source, ref.count) == (pb.REFERENCE_SOURCE_REGISTRY, 7)


def test_reference_bytes_round_trip(reference: Reference) -> None:
    assert Reference.from_bytes(reference.to_bytes()) == reference
    with pytest.raises(InvalidArgument):
        Reference.from_bytes(b"{not json")
    with pytest.raises(InvalidArgument):
        Reference.from_bytes(b'{"source": 1, "count": 1, "columns": {"x": {"counts": [1]}}}')


def test_reference_from_first_rows() -> None:
    rng = np.random.default_rng(600)
    n = 10_000
    flag = (rng.random(n) < 0.1).astype(np.float32)
    features = np.column_stack([rng.standard_normal(n), flag, np.full(n, 3.0)])
    window = WindowStats()
    window.add_rows(
        features.astype(np.float32),
        ["normal", "flag", "constant"],
        np.empty((n, 0), dtype=np.float32),
        [],
        {"category": CATEGORIES[rng.choice(5, n, p=SHARES)]},
        np.ones(n),
        {},
    )
    ref = reference_from_rows(window)
    assert (ref.source, ref.count) == (pb.REFERENCE_SOURCE_FIRST_ROWS, n)
    for name in ("normal", "flag", "constant"):
        column = ref.columns[name]
        assert np.all(np.diff(column.bin_edges) > 0) and column.total == n
    normal = ref.columns["normal"]
    assert len(normal.counts) == 10
    assert max(abs(c - n / 10) for c in normal.counts) < 0.02 * n
    # A 0/1 flag keeps its ones apart from its zeros; a constant gets below/at/above.
    # (Counts come from the sketch here, so they are close, not exact.)
    flag_counts = [c for c in ref.columns["flag"].counts if c]
    assert len(flag_counts) == 2
    assert abs(min(flag_counts) - int(flag.sum())) < 0.02 * n
    assert ref.columns["constant"].counts == (0, n, 0)
    assert ref.columns["category"].categories[0] == "a"
    assert ref.columns["category"].total == n
    # The same rows compared with their own reference show no drift.
    verdicts = _verdicts(window, ref)
    assert not any(v.drifted for v in verdicts.values())
