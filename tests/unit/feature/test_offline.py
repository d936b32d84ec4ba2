"""The point-in-time join against a brute-force reference on random data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet
from hypothesis import given, settings
from hypothesis import strategies as st

from modelplane.services.feature.domain import Entity, JoinKey, ValueType
from modelplane.services.feature.offline import as_of_match, key_codes, latest_per_key

rows = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(rows, rows)
def test_as_of_match_is_the_latest_row_at_or_before_each_instant(right, left):
    right_codes = np.array([k for k, _ in right], dtype=np.int64)
    right_us = np.array([t for _, t in right], dtype=np.int64)
    left_codes = np.array([k for k, _ in left], dtype=np.int64)
    left_us = np.array([t for _, t in left], dtype=np.int64)
    match = as_of_match(left_codes, left_us, right_codes, right_us)
    for i, (key, at) in enumerate(left):
        best = -1
        for j, (k, t) in enumerate(right):
            if k == key and t <= at and (best < 0 or t >= right[best][1]):
                best = j
        assert match[i] == best


@settings(max_examples=100, deadline=None)
@given(rows)
def test_latest_per_key_keeps_one_newest_row_per_key(data):
    codes = np.array([k for k, _ in data], dtype=np.int64)
    times = np.array([t for _, t in data], dtype=np.int64)
    chosen = latest_per_key(codes, times).tolist()
    assert sorted({k for k, _ in data}) == sorted(data[i][0] for i in chosen)
    for i in chosen:
        key, t = data[i]
        later = [j for j, (k, u) in enumerate(data) if k == key and (u > t or (u == t and j > i))]
        assert later == []


def test_key_codes_agree_across_tables_for_composite_keys():
    entity = Entity("pair", (JoinKey("a", ValueType.INT64), JoinKey("b", ValueType.STRING)))
    left = pa.table({"a": [1, 1, 2], "b": ["x", "y", "x"]})
    right = pa.table({"a": pa.array([2, 1, 1], pa.int32()), "b": ["x", "x", "z"]})
    left_codes, right_codes = key_codes(entity, left, right)
    assert left_codes[0] == right_codes[1] and left_codes[2] == right_codes[0]
    assert len({*left_codes.tolist(), right_codes[2]}) == 4


def test_source_ranges_are_exact_for_every_timestamp_unit(tmp_path):
    from modelplane.services.feature.domain import Feature, FeatureView, ParquetSource
    from modelplane.services.feature.offline import scan_source

    entity = Entity("e", (JoinKey("id", ValueType.INT64),))
    micros = [999_999, 1_000_000, 1_500_000, 1_999_999, 2_000_000, 2_500_000]
    for unit, tz in [("s", None), ("ms", "UTC"), ("us", None), ("ns", "Europe/Paris")]:
        column = (
            pa.array(micros, pa.int64())
            .cast(pa.timestamp("us", tz=tz))
            .cast(pa.timestamp(unit, tz=tz), safe=False)
        )
        path = tmp_path / f"{unit}.parquet"
        pa.parquet.write_table(
            pa.table({"id": list(range(6)), "ts": column, "x": [float(m) for m in micros]}),
            path,
        )
        view = FeatureView(
            "v", "e", (Feature("x", ValueType.DOUBLE),), source=ParquetSource(str(path), "ts")
        )
        slices = scan_source(view, entity, view.features, start_us=1_000_000, end_us=2_000_000)
        ids = [i for rows in slices for i in rows.table["id"].to_pylist()]
        stored = {"s": lambda m: m // 1_000_000 * 1_000_000, "ms": lambda m: m // 1_000 * 1_000}
        expected = [
            i
            for i, m in enumerate(micros)
            if 1_000_000 <= stored.get(unit, lambda m: m)(m) < 2_000_000
        ]
        assert ids == expected, unit
