"""The MonitoringStore contract, run against SQLite (a file in tmp_path) and PostgreSQL
(the machine's server, a fresh schema per test, dropped after) alike.

A factory opens a separate store instance on the same file or schema at each call —
what a restarted process, or a second replica, would see."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from modelplane.kernel.errors import Conflict, Unavailable
from modelplane.services.monitoring.store import (
    DAY_US,
    HOUR_US,
    MINUTE_US,
    AlertRow,
    LabelRow,
    MonitoringStore,
    NewBatch,
    StoredBatch,
    WindowKey,
)
from modelplane.services.monitoring.store.postgres import PostgresMonitoringStore
from modelplane.services.monitoring.store.sqlite import SqliteMonitoringStore
from tests.postgres import POSTGRES_URL, fresh_schema
from tests.postgres import store_factory as store_factory_of

StoreFactory = Callable[[], MonitoringStore]

T0 = 1_700_000_000_000_000 // MINUTE_US * MINUTE_US  # a minute boundary, in µs


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    with store_factory_of(
        request.param,
        lambda: SqliteMonitoringStore(tmp_path / "monitoring.db"),
        lambda schema: PostgresMonitoringStore(POSTGRES_URL, schema=schema, max_connections=4),
        "monitoring",
    ) as factory:
        yield factory


@pytest.fixture
def store(store_factory: StoreFactory) -> MonitoringStore:
    return store_factory()


def keys_blob(*keys: int) -> bytes:
    return b"".join(k.to_bytes(8, "little") for k in keys)


def new_batch(
    model: str = "fraud",
    version: str = "1",
    time_us: int = T0,
    keys: tuple[int, ...] = (1, 2),
    payload: bytes | None = None,
) -> NewBatch:
    return NewBatch(
        model=model,
        version=version,
        min_time_us=time_us,
        max_time_us=time_us + 1_000,
        rows=len(keys),
        payload=payload if payload is not None else f"{model}/{version}/{keys}".encode(),
        keys=keys_blob(*keys),
    )


def label(
    request_id: str,
    row_index: int = 0,
    label_value: float = 1.0,
    time_us: int = T0,
    version: str = "1",
    model: str = "fraud",
    label_time_us: int = T0 + 5,
) -> LabelRow:
    return LabelRow(
        model=model,
        request_id=request_id,
        row_index=row_index,
        version=version,
        time_us=time_us,
        slices={"region": "eu", "channel": "web"},
        prediction=0.25,
        label=label_value,
        label_time_us=label_time_us,
    )


def alert(
    id: str, model: str = "fraud", state: int = 1, updated_us: int = T0, payload: bytes = b"a"
) -> AlertRow:
    return AlertRow(id, model, "1", "drift", "amount", state, updated_us, payload)


def window(start_us: int, granularity_us: int = MINUTE_US, **kwargs: str) -> WindowKey:
    fields = {"model": "fraud", "version": "1", **kwargs}
    return WindowKey(
        fields["model"],
        fields["version"],
        granularity_us,
        start_us,
        fields.get("slice_key", ""),
        fields.get("slice_value", ""),
    )


def concurrently(calls: list[Callable[[], object]]) -> list[object]:
    """Runs the calls at once (released together by a barrier); results or exceptions."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait()
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# --- prediction batches ---------------------------------------------------------------


def test_appended_batches_are_numbered_increasingly_and_read_back_whole(store):
    big = bytes(range(256)) * 4096  # 1 MiB with every byte value, zeros included
    seqs = store.append_batches(
        "a", [new_batch(keys=(1, 2)), new_batch(version="2", keys=(3,), payload=big)]
    )
    assert len(seqs) == 2 and seqs[0] < seqs[1]
    more = store.append_batches("a", [new_batch(keys=(4,))])
    assert more[0] > seqs[1]
    assert store.append_batches("a", []) == []

    got = store.batches([seqs[1], seqs[0], seqs[0], more[0] + 1000])
    assert set(got) == {seqs[0], seqs[1]}
    assert got[seqs[0]] == StoredBatch(
        seqs[0], "a", "fraud", "1", b"fraud/1/(1, 2)", keys_blob(1, 2)
    )
    assert got[seqs[1]] == StoredBatch(seqs[1], "a", "fraud", "2", big, keys_blob(3))
    assert type(got[seqs[1]].payload) is bytes and type(got[seqs[1]].keys) is bytes
    assert store.batches([]) == {}


def test_batches_after_are_one_replicas_oldest_first_and_limited(store):
    a1 = store.append_batches("a", [new_batch(keys=(1,)), new_batch(keys=(2,))])
    b1 = store.append_batches("b", [new_batch(keys=(3,))])
    a2 = store.append_batches("a", [new_batch(keys=(4,)), new_batch(keys=(5,))])
    a_seqs = a1 + a2

    assert [b.seq for b in store.batches_after("a", 0, 100)] == a_seqs
    assert all(b.replica == "a" for b in store.batches_after("a", 0, 100))
    assert [b.seq for b in store.batches_after("a", 0, 3)] == a_seqs[:3]
    assert [b.seq for b in store.batches_after("a", a_seqs[1], 100)] == a_seqs[2:]
    assert store.batches_after("a", a_seqs[-1], 100) == []
    assert [b.seq for b in store.batches_after("b", 0, 100)] == b1
    assert store.batches_after("nobody", 0, 100) == []


def test_recent_keys_are_newest_first_and_stop_near_max_keys(store):
    seqs = store.append_batches("a", [new_batch(keys=tuple(range(i, i + 10))) for i in range(5)])
    store.append_batches("a", [new_batch(model="other", keys=(99,))])

    everything = list(store.recent_keys("fraud", 1_000))
    assert [seq for seq, _ in everything] == seqs[::-1]
    assert everything[0][1] == keys_blob(*range(4, 14))
    # 25 keys are reached within the third batch (30 keys): no fourth is read.
    assert [seq for seq, _ in store.recent_keys("fraud", 25)] == seqs[::-1][:3]
    assert [seq for seq, _ in store.recent_keys("fraud", 10)] == seqs[-1:]
    assert list(store.recent_keys("nobody", 10)) == []


def test_recent_keys_page_through_many_batches(store):
    seqs = store.append_batches("a", [new_batch(keys=(i,)) for i in range(600)])
    assert [seq for seq, _ in store.recent_keys("fraud", 10_000)] == seqs[::-1]
    assert [seq for seq, _ in store.recent_keys("fraud", 300)] == seqs[::-1][:300]


def test_models_are_those_with_batches_or_statistics(store):
    assert store.models() == []
    store.append_batches("a", [new_batch(model="zeta"), new_batch(model="alpha")])
    store.save_windows("a", 1, {window(T0, model="mid"): b"s", window(T0, model="alpha"): b"s"})
    store.save_reference("refonly", "1", b"r")
    assert store.models() == ["alpha", "mid", "zeta"]


def test_sequence_numbers_are_never_reused_after_pruning_the_newest(store):
    seqs = store.append_batches("a", [new_batch(time_us=T0), new_batch(time_us=T0)])
    assert store.prune(T0 + DAY_US) == 2
    again = store.append_batches("a", [new_batch(time_us=T0 + 2 * DAY_US)])
    # A checkpoint at seqs[-1] must still see the new batch as after it.
    assert again[0] > seqs[-1]
    assert [b.seq for b in store.batches_after("a", seqs[-1], 10)] == again


def test_concurrent_appends_of_one_instance_are_all_stored_in_order(store):
    results = concurrently(
        [lambda i=i: store.append_batches("a", [new_batch(keys=(i, i))] * 3) for i in range(6)]
    )
    seqs = sorted(seq for result in results for seq in result)  # type: ignore[attr-defined]
    assert len(set(seqs)) == 18
    assert [b.seq for b in store.batches_after("a", 0, 100)] == seqs
    for result in results:
        assert result == sorted(result)  # type: ignore[type-var]


# --- window statistics ----------------------------------------------------------------


def test_saved_windows_replace_per_replica_and_move_the_checkpoint(store):
    k1, k2, k3 = window(T0), window(T0, HOUR_US), window(T0, slice_key="region", slice_value="eu")
    assert store.checkpoint("a") == 0
    assert store.windows("a", [k1, k2]) == {}

    store.save_windows("a", 7, {k1: b"one", k2: b"two"})
    assert store.checkpoint("a") == 7
    assert store.windows("a", [k1, k2, k3]) == {k1: b"one", k2: b"two"}
    assert store.windows("b", [k1, k2]) == {}
    assert store.windows("a", []) == {}

    store.save_windows("a", 9, {k1: b"ONE", k3: b"three"})
    assert store.windows("a", [k3, k1, k2]) == {k1: b"ONE", k2: b"two", k3: b"three"}
    assert store.checkpoint("a") == 9
    store.save_windows("a", 12, {})  # no statistics changed, the checkpoint still moves
    assert store.checkpoint("a") == 12
    assert store.checkpoint("b") == 0


def test_a_failed_save_changes_neither_windows_nor_checkpoint(store):
    k1, k2 = window(T0), window(T0 + MINUTE_US)
    store.save_windows("a", 3, {k1: b"before"})
    with pytest.raises(Exception):  # noqa: B017 - each backend has its own error
        # The second window's NULL statistics fail the transaction after the first row.
        store.save_windows("a", 4, {k1: b"after", k2: None})  # type: ignore[dict-item]
    assert store.windows("a", [k1, k2]) == {k1: b"before"}
    assert store.checkpoint("a") == 3
    store.save_windows("a", 5, {k1: b"after"})  # the store is still usable
    assert store.windows("a", [k1]) == {k1: b"after"}


@pytest.fixture
def many_windows(store_factory: StoreFactory, store: MonitoringStore) -> MonitoringStore:
    """Minute windows at T0, T0+1m, T0+2m for versions 1 and 2, overall and by region,
    from two replicas (a and b), plus an hour window and another model's window."""
    rows: dict[str, dict[WindowKey, bytes]] = {"a": {}, "b": {}}
    for replica in rows:
        for i in range(3):
            for version in ("1", "2"):
                start = T0 + i * MINUTE_US
                rows[replica][window(start, version=version)] = f"{replica}{i}{version}".encode()
                for region in ("eu", "us"):
                    key = window(start, version=version, slice_key="region", slice_value=region)
                    rows[replica][key] = f"{replica}{i}{version}{region}".encode()
    rows["a"][window(T0, HOUR_US)] = b"hour"
    rows["a"][window(T0, model="other")] = b"other"
    store.save_windows("a", 1, rows["a"])
    store_factory().save_windows("b", 1, rows["b"])
    return store


def _read(store: MonitoringStore, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
    """(start minute, version, slice key, slice value, stats), sorted."""
    rows = store.read_windows(*args, **kwargs)  # type: ignore[arg-type]
    return sorted(
        ((k.start_us - T0) // MINUTE_US, k.version, k.slice_key, k.slice_value, s) for k, s in rows
    )


def test_read_windows_returns_every_replicas_rows_of_one_slice_key(many_windows):
    assert _read(many_windows, "fraud", "1", MINUTE_US, T0, T0 + MINUTE_US) == [
        (0, "1", "", "", b"a01"),
        (0, "1", "", "", b"b01"),
    ]
    everything = many_windows.read_windows("fraud", "1", MINUTE_US, T0, T0 + MINUTE_US)
    assert all(k == window(T0) for k, _ in everything)


def test_read_windows_range_is_start_inclusive_end_exclusive(many_windows):
    got = _read(many_windows, "fraud", "1", MINUTE_US, T0 + MINUTE_US, T0 + 2 * MINUTE_US)
    assert {(m, s) for m, _, _, _, s in got} == {(1, b"a11"), (1, b"b11")}
    got = _read(many_windows, "fraud", "1", MINUTE_US, T0 + 1, T0 + 3 * MINUTE_US)
    assert sorted({m for m, *_ in got}) == [1, 2]
    assert _read(many_windows, "fraud", "1", MINUTE_US, T0 + 3 * MINUTE_US, T0 + HOUR_US) == []


def test_read_windows_version_empty_means_any(many_windows):
    got = _read(many_windows, "fraud", "", MINUTE_US, T0, T0 + MINUTE_US)
    assert [(v, s) for _, v, _, _, s in got] == [
        ("1", b"a01"),
        ("1", b"b01"),
        ("2", b"a02"),
        ("2", b"b02"),
    ]
    assert {v for _, v, *_ in _read(many_windows, "fraud", "2", MINUTE_US, T0, T0 + HOUR_US)} == {
        "2"
    }


def test_read_windows_slice_filters(many_windows):
    by_region = _read(many_windows, "fraud", "1", MINUTE_US, T0, T0 + MINUTE_US, "region")
    assert [(k, v, s) for _, _, k, v, s in by_region] == [
        ("region", "eu", b"a01eu"),
        ("region", "eu", b"b01eu"),
        ("region", "us", b"a01us"),
        ("region", "us", b"b01us"),
    ]
    every = _read(many_windows, "fraud", "1", MINUTE_US, T0, T0 + MINUTE_US, None)
    assert len(every) == 6
    assert {(k, v) for _, _, k, v, _ in every} == {("", ""), ("region", "eu"), ("region", "us")}
    assert _read(many_windows, "fraud", "1", MINUTE_US, T0, T0 + MINUTE_US, "channel") == []


def test_read_windows_filters_model_and_granularity(many_windows):
    assert _read(many_windows, "fraud", "1", HOUR_US, T0, T0 + DAY_US) == [
        (0, "1", "", "", b"hour")
    ]
    assert _read(many_windows, "other", "", MINUTE_US, T0, T0 + DAY_US) == [
        (0, "1", "", "", b"other")
    ]
    assert _read(many_windows, "nobody", "", MINUTE_US, T0, T0 + DAY_US) == []


def test_two_replicas_on_one_database_see_each_others_windows(store_factory):
    a, b = store_factory(), store_factory()
    key = window(T0)
    seq_a = a.append_batches("a", [new_batch(keys=(1,))])
    seq_b = b.append_batches("b", [new_batch(keys=(2,))])
    assert set(seq_a).isdisjoint(seq_b)
    a.save_windows("a", seq_a[-1], {key: b"from a"})
    b.save_windows("b", seq_b[-1], {key: b"from b"})

    for reader in (a, b):
        got = reader.read_windows("fraud", "1", MINUTE_US, T0, T0 + MINUTE_US)
        assert sorted(s for _, s in got) == [b"from a", b"from b"]
        assert reader.windows("a", [key]) == {key: b"from a"}
        assert reader.windows("b", [key]) == {key: b"from b"}
        assert (reader.checkpoint("a"), reader.checkpoint("b")) == (seq_a[-1], seq_b[-1])
        assert [x.seq for x in reader.batches_after("b", 0, 10)] == seq_b
        assert reader.models() == ["fraud"]


# --- references -----------------------------------------------------------------------


def test_the_first_reference_written_wins(store):
    assert store.reference("fraud", "1") is None
    assert store.save_reference("fraud", "1", b"\x00first") == b"\x00first"
    assert store.save_reference("fraud", "1", b"second") == b"\x00first"
    assert store.reference("fraud", "1") == b"\x00first"
    assert store.reference("fraud", "2") is None
    assert store.save_reference("fraud", "2", b"v2") == b"v2"


def test_the_first_reference_wins_a_race(store_factory):
    stores = [store_factory() for _ in range(4)]
    for round in range(5):
        results = concurrently(
            [
                lambda s=s, i=i, r=round: s.save_reference("fraud", str(r), f"ref{i}".encode())
                for i, s in enumerate(stores)
            ]
        )
        assert len(set(results)) == 1, results
        assert results[0] in {f"ref{i}".encode() for i in range(4)}
        assert stores[0].reference("fraud", str(round)) == results[0]


# --- labels ---------------------------------------------------------------------------


def test_labels_are_inserted_then_replaced_and_counted(store):
    assert store.save_labels([]) == (0, 0)
    assert store.save_labels([label("r1"), label("r1", 1), label("r2")]) == (3, 0)
    assert store.save_labels([label("r1", label_value=0.0, label_time_us=T0 + 9), label("r3")]) == (
        1,
        1,
    )
    # The same key twice in one call: new once, then replaced; the last label stays.
    assert store.save_labels([label("r4", label_value=0.0), label("r4", label_value=1.0)]) == (
        1,
        1,
    )
    rows = {(r.request_id, r.row_index): r for r in store.labels("fraud", "", T0, T0 + 1)}
    assert set(rows) == {("r1", 0), ("r1", 1), ("r2", 0), ("r3", 0), ("r4", 0)}
    assert rows[("r1", 0)] == label("r1", label_value=0.0, label_time_us=T0 + 9)
    assert rows[("r4", 0)].label == 1.0
    assert rows[("r2", 0)].slices == {"region": "eu", "channel": "web"}
    assert store.labels("other", "", T0, T0 + 1) == []


def test_labels_filter_by_prediction_time_and_version(store):
    store.save_labels(
        [
            label("early", time_us=T0 - 1),
            label("start", time_us=T0),
            label("v2", time_us=T0 + 10, version="2"),
            label("end", time_us=T0 + 100),
        ]
    )

    def ids(version: str) -> list[str]:
        return sorted(r.request_id for r in store.labels("fraud", version, T0, T0 + 100))

    assert ids("") == ["start", "v2"]
    assert ids("1") == ["start"]
    assert ids("2") == ["v2"]


# --- configuration --------------------------------------------------------------------


def test_config_is_compare_and_set_by_revision(store):
    assert store.config("fraud") is None
    assert store.configs() == []
    assert store.save_config("fraud", 0, b"c1") == 1
    with pytest.raises(Conflict, match="revision 1"):
        store.save_config("fraud", 0, b"stale")
    assert store.save_config("fraud", 1, b"c2") == 2
    with pytest.raises(Conflict):
        store.save_config("fraud", 1, b"stale")
    with pytest.raises(Conflict):
        store.save_config("fraud", 3, b"future")
    with pytest.raises(Conflict):
        store.save_config("new", 1, b"never set")
    assert store.config("fraud") == (b"c2", 2)
    assert store.config("new") is None
    assert store.save_config("other", 0, b"o1") == 1
    assert sorted(store.configs()) == [("fraud", b"c2"), ("other", b"o1")]


def test_of_concurrent_writers_of_one_revision_exactly_one_wins(store_factory):
    stores = [store_factory() for _ in range(4)]
    for revision in range(4):
        results = concurrently(
            [
                lambda s=s, i=i, r=revision: s.save_config("fraud", r, f"{r}/{i}".encode())
                for i, s in enumerate(stores)
            ]
        )
        winners = [r for r in results if not isinstance(r, Exception)]
        assert winners == [revision + 1], results
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, Exception))
    assert stores[0].config("fraud")[1] == 4  # type: ignore[index]


# --- alerts ---------------------------------------------------------------------------


def test_alerts_are_upserted_and_listed_newest_first(store):
    store.save_alerts(
        [
            alert("x1", updated_us=T0 + 1),
            alert("x2", state=2, updated_us=T0 + 3),
            alert("y1", model="other", updated_us=T0 + 2),
            alert("x0", updated_us=T0 + 3),
        ],
        {},
    )
    assert [a.id for a in store.alerts("", [], 10)] == ["x0", "x2", "y1", "x1"]  # ties by id
    assert [a.id for a in store.alerts("", [], 2)] == ["x0", "x2"]
    assert [a.id for a in store.alerts("fraud", [], 10)] == ["x0", "x2", "x1"]
    assert [a.id for a in store.alerts("", [2], 10)] == ["x2"]
    assert [a.id for a in store.alerts("fraud", [1, 2], 10)] == ["x0", "x2", "x1"]
    assert store.alerts("nobody", [], 10) == []

    # An upsert changes state, time and payload; the alert stays one row.
    store.save_alerts([alert("x1", state=3, updated_us=T0 + 9, payload=b"\x00resolved")], {})
    listed = store.alerts("", [], 10)
    assert [a.id for a in listed] == ["x1", "x0", "x2", "y1"]
    assert listed[0] == alert("x1", state=3, updated_us=T0 + 9, payload=b"\x00resolved")
    assert [a.id for a in store.alerts("", [3], 10)] == ["x1"]


def test_cursors_are_saved_with_alerts(store):
    assert store.cursor("fraud", "drift") == 0
    store.save_alerts([], {("fraud", "drift"): T0, ("fraud", "quality"): T0 + 1})
    assert (store.cursor("fraud", "drift"), store.cursor("fraud", "quality")) == (T0, T0 + 1)
    store.save_alerts([alert("x1")], {("fraud", "drift"): T0 + MINUTE_US})
    assert store.cursor("fraud", "drift") == T0 + MINUTE_US
    assert store.cursor("fraud", "quality") == T0 + 1
    assert store.cursor("other", "drift") == 0
    assert [a.id for a in store.alerts("", [], 10)] == ["x1"]
    store.save_alerts([], {})


# --- producers ------------------------------------------------------------------------


def test_producer_deltas_count_growth_and_restarts(store):
    assert store.producer_deltas("p1", {}) == {}
    assert store.producer_deltas("p1", {"fraud": (5, 1, 100)}) == {"fraud": (5, 1, 100)}
    assert store.producer_deltas("p1", {"fraud": (7, 1, 150), "other": (0, 0, 3)}) == {
        "fraud": (2, 0, 50),
        "other": (0, 0, 3),
    }
    # Another producer has totals of its own.
    assert store.producer_deltas("p2", {"fraud": (1, 1, 1)}) == {"fraud": (1, 1, 1)}
    # p1 restarted: totals below the stored ones count whole; one that grew, its growth.
    assert store.producer_deltas("p1", {"fraud": (3, 2, 10)}) == {"fraud": (3, 1, 10)}
    assert store.producer_deltas("p1", {"fraud": (3, 2, 10)}) == {"fraud": (0, 0, 0)}
    assert store.producer_deltas("p1", {"other": (0, 0, 4)}) == {"other": (0, 0, 1)}


def test_a_producers_report_is_counted_once_when_it_races(store_factory):
    stores = [store_factory() for _ in range(4)]
    for step in range(1, 6):
        totals = {"fraud": (step, step, 10 * step), "other": (0, 0, step)}
        results = concurrently([lambda s=s, t=totals: s.producer_deltas("p", t) for s in stores])
        summed = {
            model: tuple(sum(r[model][i] for r in results) for i in range(3))  # type: ignore[index]
            for model in totals
        }
        assert summed == {"fraud": (1, 1, 10), "other": (0, 0, 1)}, results


# --- retention ------------------------------------------------------------------------


def test_prune_removes_old_batches_minute_windows_and_labels(store):
    cutoff = T0 + DAY_US
    old = store.append_batches(
        "a", [new_batch(time_us=T0), new_batch(time_us=cutoff - 1_001, keys=(3,))]
    )
    kept = store.append_batches(
        "a", [new_batch(time_us=cutoff - 1_000, keys=(4,)), new_batch(time_us=cutoff, keys=(5,))]
    )
    windows = {
        window(T0): b"old minute",
        window(cutoff - 2 * MINUTE_US): b"old minute",
        # Ends exactly at the cutoff: kept (a window goes once it ended before it).
        window(cutoff - MINUTE_US): b"boundary minute",
        window(cutoff): b"new minute",
        window(T0, HOUR_US): b"old hour",
        window(T0, DAY_US): b"old day",
        window(T0, slice_key="region", slice_value="eu"): b"old minute slice",
    }
    store.save_windows("a", kept[-1], windows)
    store.save_labels([label("old", time_us=cutoff - 1), label("new", time_us=cutoff)])

    assert store.prune(cutoff) == 2
    assert set(store.batches(old + kept)) == set(kept)
    assert [b.seq for b in store.batches_after("a", 0, 10)] == kept
    assert [s for s, _ in store.recent_keys("fraud", 100)] == kept[::-1]
    assert store.windows("a", list(windows)) == {
        window(cutoff - MINUTE_US): b"boundary minute",
        window(cutoff): b"new minute",
        window(T0, HOUR_US): b"old hour",
        window(T0, DAY_US): b"old day",
    }
    assert [r.request_id for r in store.labels("fraud", "", 0, cutoff + DAY_US)] == ["new"]
    assert store.checkpoint("a") == kept[-1]
    assert store.prune(cutoff) == 0


# --- restarts -------------------------------------------------------------------------


def test_everything_survives_reopening_the_store(store_factory):
    first = store_factory()
    seqs = first.append_batches("a", [new_batch(keys=(1, 2)), new_batch(model="other")])
    first.save_windows("a", seqs[-1], {window(T0): b"stats"})
    first.save_reference("fraud", "1", b"ref")
    first.save_labels([label("r1")])
    first.save_config("fraud", 0, b"config")
    first.save_alerts([alert("x1")], {("fraud", "drift"): T0})
    first.producer_deltas("p", {"fraud": (1, 2, 3)})
    first.close()

    second = store_factory()
    assert [b.seq for b in second.batches_after("a", 0, 10)] == seqs
    assert second.batches(seqs)[seqs[0]].keys == keys_blob(1, 2)
    assert list(second.recent_keys("fraud", 10)) == [(seqs[0], keys_blob(1, 2))]
    assert second.models() == ["fraud", "other"]
    assert second.checkpoint("a") == seqs[-1]
    assert second.windows("a", [window(T0)]) == {window(T0): b"stats"}
    assert second.reference("fraud", "1") == b"ref"
    assert second.labels("fraud", "1", T0, T0 + 1) == [label("r1")]
    assert second.config("fraud") == (b"config", 1)
    assert second.configs() == [("fraud", b"config")]
    assert second.alerts("", [], 10) == [alert("x1")]
    assert second.cursor("fraud", "drift") == T0
    assert second.producer_deltas("p", {"fraud": (1, 2, 4)}) == {"fraud": (0, 0, 1)}
    # Numbering carries on after the stored batches.
    assert second.append_batches("a", [new_batch()])[0] > seqs[-1]


# --- PostgreSQL only ------------------------------------------------------------------


def test_an_unreachable_postgres_is_unavailable():
    with pytest.raises(Unavailable):
        PostgresMonitoringStore(
            "postgresql://postgres@127.0.0.1:1/test", schema="unused", connect_timeout_s=0.5
        )


def test_replicas_starting_together_create_the_tables_once():
    with fresh_schema("monitoring") as schema:
        # The schema exists already: this is about the tables (open_pool's CREATE SCHEMA
        # IF NOT EXISTS is not guarded against a race of its own).
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        results = concurrently(
            [lambda: PostgresMonitoringStore(POSTGRES_URL, schema=schema) for _ in range(4)]
        )
        try:
            assert not [r for r in results if isinstance(r, Exception)], results
            results[0].save_config("fraud", 0, b"c")  # type: ignore[attr-defined]
            assert results[3].config("fraud") == (b"c", 1)  # type: ignore[attr-defined]
        finally:
            for r in results:
                if isinstance(r, PostgresMonitoringStore):
                    r.close()


def test_a_lease_has_one_holder_until_it_expires(store_factory):
    a, b = store_factory(), store_factory()  # two replicas on one database
    assert a.lease("alerts", "a", now_us=1_000, ttl_us=100)
    assert not b.lease("alerts", "b", now_us=1_050, ttl_us=100)
    assert a.lease("alerts", "a", now_us=1_090, ttl_us=100)  # renewed to 1_190
    assert not b.lease("alerts", "b", now_us=1_150, ttl_us=100)
    assert b.lease("alerts", "b", now_us=1_200, ttl_us=100)  # expired: taken over
    assert not a.lease("alerts", "a", now_us=1_210, ttl_us=100)
    assert a.lease("other", "a", now_us=1_210, ttl_us=100)  # leases are per name


def test_append_stores_batches_and_producer_totals_in_one_transaction(store):
    seqs, deltas = store.append(
        "r1", [new_batch("fraud")], producer="p1", totals={"fraud": (2, 1, 10)}
    )
    assert len(seqs) == 1 and deltas == {"fraud": (2, 1, 10)}
    assert store.append("r1", [], producer="p1", totals={"fraud": (2, 3, 15)}) == (
        [],
        {"fraud": (0, 2, 5)},
    )
    assert store.append("r1", []) == ([], {})
    assert list(store.batches(seqs)) == seqs
