"""Training sets streamed in slices give what one pass over the whole source would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelplane.services.feature.definitions import catalog_of, definitions_from_yaml
from modelplane.services.feature.domain import Catalog
from modelplane.services.feature.offline import training_set

S = 1_000_000
REFS = ["stats:x", "stats:name"]
YAML = """
entities:
  - name: customer
    join_keys: [customer_id]
feature_views:
  - name: stats
    entity: customer
    max_age: 3s
    source: {{path: "{source}", timestamp_field: t}}
    features:
      - {{name: x, type: double}}
      - {{name: name, type: string}}
"""


def catalog(source: Path) -> Catalog:
    return catalog_of(definitions_from_yaml(YAML.format(source=source)))


def write_source(path: Path, rows: list[tuple[int, int, float | None]], time_type: pa.DataType):
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array([k for k, _, _ in rows], pa.int64()),
                "t": pa.array([t for _, t, _ in rows], pa.int64()).cast(time_type),
                "x": pa.array([x for _, _, x in rows], pa.float64()),
                "name": pa.array([f"r{i}" for i in range(len(rows))], pa.string()),
            }
        ),
        path,
        row_group_size=37,
    )


def test_slices_give_the_result_of_one_pass_ties_nulls_and_staleness_included(tmp_path):
    rng = np.random.default_rng(5)
    # Few distinct times, so the same key meets the same time in different slices, and
    # some rows come after entity timestamps (they must never leak into the past).
    noise = [
        (int(k), int(t) * S, None if rng.random() < 0.15 else float(i))
        for i, (k, t) in enumerate(
            zip(rng.integers(0, 5, 300), rng.integers(1, 8, 300), strict=True)
        )
    ]
    # Customer 9, known by hand: the tie at 2 s spans slices (rows 0 and 100, which no
    # slice of 1, 7 or 64 rows holds together); the 4 s row is NULL; the 6 s row is in
    # range (entity rows go up to 16 s) but in the future of those before 6 s.
    rows = [(9, 2 * S, 100.0), *noise[:99], (9, 2 * S, 200.0), *noise[99:]]
    rows += [(9, 4 * S, None), (9, 6 * S, 300.0)]
    source = tmp_path / "stats.parquet"
    write_source(source, rows, pa.int64())
    keys = [9, 9, 9, 9, 9, 9, 0, 1, 2, 3, 4, 5] * 3
    times = [1, 2, 3, 4, 5, 12, 0, 1, 3, 5, 7, 12]
    times += [t + 0.5 for t in times] + [t + 4 for t in times]
    entities = pa.table(
        {
            "customer_id": pa.array(keys, pa.int64()),
            "event_timestamp": pa.array([int(t * S) for t in times], pa.int64()),
        }
    )

    def result(slice_rows: int) -> pa.Table:
        return training_set(
            catalog(source), entities, REFS, include_statuses=True, slice_rows=slice_rows
        )

    whole = result(len(rows))
    for slice_rows in (1, 7, 64):
        assert result(slice_rows).equals(whole), slice_rows

    got = {
        name: (x, status, n)
        for name, x, status, n in zip(
            [f"{k}@{t}" for k, t in zip(keys, times, strict=True)],
            whole["stats__x"].to_pylist(),
            whole["stats__x__status"].to_pylist(),
            whole["stats__name"].to_pylist(),
            strict=True,
        )
    }
    assert got["9@1"] == (None, "NOT_FOUND", None)  # before any row of customer 9
    assert got["9@2"] == (200.0, "PRESENT", "r100")  # equal time: the later file row wins
    assert got["9@3"] == (200.0, "PRESENT", "r100")
    null_row = f"r{len(rows) - 2}"  # NULL x, but its name is there: statuses are per feature
    assert got["9@4"] == (None, "NULL", null_row)  # a NULL value is a row found, not "no row"
    assert got["9@5.5"] == (None, "NULL", null_row)  # the 6 s row does not leak into 5.5 s
    assert got["9@6"] == (300.0, "PRESENT", f"r{len(rows) - 1}")
    assert got["9@12"] == (None, "STALE", None)  # 6 s old, max age 3 s
    assert got["5@12"] == (None, "NOT_FOUND", None)  # a key the source never has
    assert got["0@0"] == (None, "NOT_FOUND", None)  # before every source row
    statuses = set(whole["stats__x__status"].to_pylist())
    assert statuses == {"PRESENT", "NULL", "STALE", "NOT_FOUND"}


@pytest.mark.parametrize("time_type", [pa.int64(), pa.timestamp("us", tz="UTC")])
def test_a_source_entirely_after_the_entity_rows_finds_nothing(tmp_path, time_type):
    source = tmp_path / "late.parquet"
    write_source(source, [(1, 10 * S, 1.0), (2, 11 * S, 2.0)], time_type)
    entities = pa.table({"customer_id": [1, 2], "event_timestamp": [5 * S, 9 * S]})
    table = training_set(catalog(source), entities, REFS, include_statuses=True, slice_rows=1)
    assert table.schema.field("stats__x").type == pa.float64()
    assert table.schema.field("stats__name").type == pa.string()
    assert table["stats__x"].to_pylist() == [None, None]
    assert table["stats__name__status"].to_pylist() == ["NOT_FOUND", "NOT_FOUND"]


def test_an_empty_entity_frame_reads_no_source(tmp_path):
    # An unreadable source proves it: scanning it would fail.
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"not parquet")
    entities = pa.table(
        {"customer_id": pa.array([], pa.int64()), "event_timestamp": pa.array([], pa.int64())}
    )
    table = training_set(catalog(source), entities, REFS, include_statuses=True)
    assert table.num_rows == 0
    assert table.schema.field("stats__x").type == pa.float64()
    assert table.schema.field("stats__name__status").type == pa.string()
