"""Materialization in slices writes what one pass over the whole source would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modelplane.kernel.errors import FailedPrecondition
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
    # Each of the 8 entities counts once, however many slices it appears in.
    assert (result[0].rows_read, result[0].rows_written, result[0].rows_ignored) == (400, 8, 0)
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


COMPOSITE_YAML = """
entities:
  - name: account
    join_keys: [{{name: bank, type: int64}}, {{name: account, type: string}}]
feature_views:
  - name: balance
    entity: account
    source: {{path: "{source}", timestamp_field: t}}
    features:
      - {{name: x, type: double}}
"""


def test_every_entity_is_written_once_with_its_newest_row_whatever_the_slices(tmp_path):
    """Composite keys, ties, newer and older rows in later row groups and files, and
    slices small enough that the first pass folds what it keeps many times."""
    rng = np.random.default_rng(11)
    n = 3_000
    bank = rng.integers(0, 5, n)
    account = np.array([f"a{v}" for v in rng.integers(0, 120, n)], dtype=object)
    t = rng.integers(1, 40, n) * 1_000_000
    source = tmp_path / "balance"
    source.mkdir()
    table = pa.table(
        {
            "bank": pa.array(bank, pa.int64()),
            "account": pa.array(account, pa.string()),
            "t": pa.array(t, pa.int64()),
            "x": pa.array(np.arange(n, dtype=np.float64)),
        }
    )
    for part, begin in enumerate(range(0, n, 1_000)):
        pq.write_table(
            table.slice(begin, 1_000), source / f"part-{part}.parquet", row_group_size=300
        )
    newest: dict[str, tuple[int, float]] = {}
    for i in range(n):  # a later row wins a tie
        key = f"{bank[i]}\x1f{account[i]}"
        if key not in newest or t[i] >= newest[key][0]:
            newest[key] = (int(t[i]), float(i))

    definitions = SqliteDefinitionStore(tmp_path / "defs.db")
    registry = DefinitionRegistry(definitions)
    registry.apply(definitions_from_yaml(COMPOSITE_YAML.format(source=source)))
    store = SqliteOnlineStore(tmp_path / "online.db")
    store.ensure_view("balance", ["x"])
    materializer = Materializer(registry, store, definitions, clock_us=lambda: 10**9, slice_rows=64)
    (result,) = materializer.run([])
    assert (result.rows_read, result.rows_written, result.rows_ignored) == (n, len(newest), 0)
    keys = sorted(newest)
    rows = store.read_rows("balance", ["x"], keys)
    assert rows.event_us.tolist() == [newest[k][0] for k in keys]
    stored = [np.frombuffer(c, np.float64)[0] for c in rows.cells[0]]
    assert stored == [newest[k][1] for k in keys]

    # Again from the start: the same rows, each entity once (equal times replace).
    (again,) = materializer.run([], start_us=0)
    assert (again.rows_written, again.rows_ignored) == (len(newest), 0)
    store.close()
    definitions.close()


def test_a_source_that_changes_between_the_passes_fails_and_keeps_the_watermark(
    tmp_path, monkeypatch
):
    source = tmp_path / "stats.parquet"
    data = {"customer_id": pa.array([1, 2], pa.int64()), "x": pa.array([1.0, 2.0])}
    pq.write_table(pa.table({**data, "t": pa.array([5, 6], pa.int64())}), source)
    definitions = SqliteDefinitionStore(tmp_path / "defs.db")
    registry = DefinitionRegistry(definitions)
    registry.apply(definitions_from_yaml(YAML.format(source=source)))
    store = SqliteOnlineStore(tmp_path / "online.db")
    store.ensure_view("stats", ["x"])
    first_pass = Materializer._newest_rows

    def then_rewrite(self, *args):  # the file is replaced after the first pass
        found = first_pass(self, *args)
        pq.write_table(pa.table({**data, "t": pa.array([7, 8], pa.int64())}), source)
        return found

    monkeypatch.setattr(Materializer, "_newest_rows", then_rewrite)
    materializer = Materializer(registry, store, definitions, clock_us=lambda: 10**9)
    (result,) = materializer.run([])  # a failed view is its result, not the run's end
    assert isinstance(result.error, FailedPrecondition)
    assert "changed while it was being materialized" in str(result.error)
    assert definitions.watermark("stats") is None
    store.close()
    definitions.close()
