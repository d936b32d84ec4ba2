"""Materialization in slices writes what one pass over the whole source would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modelplane.services.feature.definition_store.sqlite import SqliteDefinitionStore
from modelplane.services.feature.definitions import DefinitionRegistry, definitions_from_yaml
from modelplane.services.feature.materialize import Materializer
from modelplane.services.feature.online_store.sqlite import SqliteOnlineStore

YAML = """
entities:
  - name: customer
    join_keys: [customer_id]
feature_views:
  - name: stats
    entity: customer
    max_age: 1h
    source: {{path: "{source}", timestamp_field: t}}
    features:
      - {{name: x, type: double}}
"""


def materialized(tmp_path: Path, name: str, source: Path, slice_rows: int) -> dict[str, tuple]:
    definitions = SqliteDefinitionStore(tmp_path / f"{name}-defs.db")
    registry = DefinitionRegistry(definitions)
    registry.apply(definitions_from_yaml(YAML.format(source=source)))
    store = SqliteOnlineStore(tmp_path / f"{name}-online.db")
    store.ensure_view("stats", ["x"])
    result = Materializer(
        registry, store, definitions, clock_us=lambda: 10**9, slice_rows=slice_rows
    ).run([])
    keys = [str(k) for k in range(8)]
    rows = store.read_rows("stats", ["x"], keys)
    assert result[0].rows_read == 400
    store.close()
    definitions.close()
    return {
        k: (bool(found), int(event), cells)
        for k, found, event, cells in zip(
            keys, rows.found, rows.event_us, rows.cells[0], strict=True
        )
    }


def test_slices_give_the_result_of_one_pass_ties_and_order_included(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    source = tmp_path / "stats.parquet"
    # Few distinct times, so the same key meets the same time in different slices:
    # the later file row must win, as it does in one pass.
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array(rng.integers(0, 8, n), pa.int64()),
                "t": pa.array(rng.integers(1, 6, n) * 1_000_000, pa.int64()),
                "x": pa.array(np.arange(n, dtype=np.float64)),
            }
        ),
        source,
        row_group_size=37,
    )
    whole = materialized(tmp_path, "whole", source, slice_rows=1_000_000)
    sliced = materialized(tmp_path, "sliced", source, slice_rows=16)
    assert sliced == whole
    assert all(found for found, _, _ in whole.values())
