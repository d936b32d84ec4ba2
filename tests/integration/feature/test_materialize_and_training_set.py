"""Materialization from Parquet and point-in-time training sets, through the service.

The training set is checked against a brute-force as-of lookup written here
independently (no future value may leak in), and against the online store at the
same instant (what a model sees in training equals what it sees in serving).
"""

from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.feature.v1 import feature_pb2 as pb
from tests.integration.feature.messages import (
    DEFINITIONS,
    HOUR_US,
    STATUS,
    customers,
    now_us,
    stats_write,
)

FEATURES = ["trips", "rating", "orders", "vip", "city"]
REFS = [f"customer_stats:{f}" for f in FEATURES]
MAX_AGE_US = HOUR_US


def ts(micros: int) -> Timestamp:
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1_000)


def source_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array([r["customer_id"] for r in rows], pa.int64()),
            "event_timestamp": pa.array([r["t"] for r in rows], pa.timestamp("us", tz="UTC")),
            "trips": pa.array([r.get("trips") for r in rows], pa.float64()),
            "rating": pa.array([r.get("rating", 1.0) for r in rows], pa.float32()),
            "orders": pa.array([r.get("orders", 1) for r in rows], pa.int32()),
            "vip": pa.array([r.get("vip", False) for r in rows], pa.bool_()),
            "city": pa.array([r.get("city", "x") for r in rows], pa.string()),
            "unused": pa.array([0] * len(rows), pa.int8()),
        }
    )


def random_history(rng: np.random.Generator, start: int, end: int, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "customer_id": int(rng.integers(1, 8)),
                "t": int(rng.integers(start, end)),
                "trips": None if rng.random() < 0.1 else float(i),
                "rating": float(rng.random()),
                "orders": i,
                "vip": bool(i % 2),
                "city": f"c{i}",
            }
        )
    return rows


def brute_force(rows: list[dict], customer: int, at: int) -> tuple[dict | None, str]:
    """The source row in force for `customer` at instant `at`, and its status."""
    best = None
    for row in rows:  # later rows win ties, as in file order
        if (
            row["customer_id"] == customer
            and row["t"] <= at
            and (best is None or row["t"] >= best["t"])
        ):
            best = row
    if best is None:
        return None, "NOT_FOUND"
    if best.get("trips") is None:
        return best, "NULL"
    if at - best["t"] > MAX_AGE_US:
        return best, "STALE"
    return best, "PRESENT"


@pytest.fixture
def defined(stub, tmp_path):
    source = tmp_path / "stats.parquet"
    stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=DEFINITIONS.format(source=source)))
    return stub, source


def test_materialization_is_incremental_and_keeps_the_newest_row(defined):
    stub, source = defined
    now = now_us()
    t1, t2 = now - HOUR_US // 2, now - HOUR_US // 4
    rows = [
        {"customer_id": 1, "t": t1 - 10, "trips": 1.0},
        {"customer_id": 1, "t": t1 - 5, "trips": 2.0},
        {"customer_id": 2, "t": t1 - 7, "trips": 3.0},
        {"customer_id": 1, "t": t2 - 1, "trips": 4.0},
        {"customer_id": 3, "t": now - 60_000_000, "trips": 5.0},
    ]
    pq.write_table(source_table(rows), source)

    first = stub.Materialize(pb.MaterializeRequest(end_time=ts(t1)), timeout=60).views[0]
    assert (first.feature_view, first.rows_read, first.rows_written) == ("customer_stats", 3, 2)
    read = pb.GetOnlineFeaturesRequest(
        entity_keys=customers(1, 2, 3), features=["customer_stats:trips"]
    )
    trips = stub.GetOnlineFeatures(read).columns[0]
    assert trips.values.double_values[0] == 2.0  # the newest row of customer 1 before t1
    assert list(trips.event_time_unix_us)[:2] == [t1 - 5, t1 - 7]
    assert trips.statuses[2] == STATUS["NOT_FOUND"]

    # No start: continues from the watermark t1, up to now.
    second = stub.Materialize(pb.MaterializeRequest(), timeout=60).views[0]
    assert second.start_time == ts(t1)
    assert (second.rows_read, second.rows_written) == (2, 2)
    trips = stub.GetOnlineFeatures(read).columns[0]
    assert trips.values.double_values[0] == 4.0 and trips.values.double_values[2] == 5.0
    assert list(trips.statuses) == [STATUS["PRESENT"]] * 3

    nothing_new = stub.Materialize(pb.MaterializeRequest(), timeout=60).views[0]
    assert nothing_new.rows_read == 0

    # An explicit old range re-reads history; older rows never replace newer ones.
    replay = stub.Materialize(
        pb.MaterializeRequest(start_time=ts(0), end_time=ts(t1)), timeout=60
    ).views[0]
    assert (replay.rows_read, replay.rows_ignored) == (3, 1)
    assert stub.GetOnlineFeatures(read).columns[0].values.double_values[0] == 4.0


def test_training_set_has_no_future_values_and_equals_online_at_the_same_instant(defined):
    stub, source = defined
    rng = np.random.default_rng(7)
    now = now_us()
    rows = random_history(rng, now - 12 * HOUR_US, now - 1_000, 40)
    pq.write_table(source_table(rows), source)
    stub.Materialize(pb.MaterializeRequest(), timeout=60)
    online = stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(*range(1, 9)), features=REFS)
    )
    as_of = online.as_of_unix_us

    # Entity rows at random past instants, plus every customer at the online read's instant.
    past = [
        (int(rng.integers(1, 9)), int(rng.integers(now - 13 * HOUR_US, now))) for _ in range(200)
    ]
    entity_rows = past + [(c, as_of) for c in range(1, 9)]
    entities = pa.table(
        {
            "customer_id": pa.array([c for c, _ in entity_rows], pa.int64()),
            "event_timestamp": pa.array([t for _, t in entity_rows], pa.timestamp("us", tz="UTC")),
            "label": pa.array(range(len(entity_rows)), pa.int64()),
        }
    )
    sink = io.BytesIO()
    pq.write_table(entities, sink)
    response = stub.GetTrainingSet(
        pb.GetTrainingSetRequest(
            entity_parquet=sink.getvalue(), features=REFS, include_statuses=True
        ),
        timeout=60,
    )
    result = pq.read_table(io.BytesIO(response.parquet)).to_pylist()
    assert response.rows == len(entity_rows)
    assert list(response.columns) == [
        "customer_id",
        "event_timestamp",
        "label",
        *[f"customer_stats__{f}{s}" for f in FEATURES for s in ("", "__status")],
    ]
    for out, (customer, at) in zip(result, entity_rows, strict=True):
        expected, status = brute_force(rows, customer, at)
        assert out["customer_stats__trips__status"] == status
        if status == "PRESENT":
            assert expected is not None and expected["t"] <= at  # never a future value
            assert out["customer_stats__trips"] == expected["trips"]
            assert out["customer_stats__orders"] == expected["orders"]
            assert out["customer_stats__city"] == expected["city"]
        else:
            assert out["customer_stats__trips"] is None
    statuses = {r["customer_stats__trips__status"] for r in result}
    assert {"PRESENT", "STALE", "NOT_FOUND"} <= statuses  # the data exercises each case

    # The rows at the online read's instant equal the online values, status by status.
    at_as_of = result[len(past) :]
    names = {v: k for k, v in STATUS.items()}
    for feature, col in zip(FEATURES, online.columns, strict=True):
        kind = col.values.type
        values = {
            pb.VALUE_TYPE_DOUBLE: col.values.double_values,
            pb.VALUE_TYPE_INT64: col.values.int64_values,
            pb.VALUE_TYPE_BOOL: col.values.bool_values,
            pb.VALUE_TYPE_STRING: col.values.string_values,
        }[kind]
        for i, out in enumerate(at_as_of):
            status = names[col.statuses[i]]
            assert out[f"customer_stats__{feature}__status"] == status, (feature, i)
            if status == "PRESENT":
                offline_value = out[f"customer_stats__{feature}"]
                if isinstance(offline_value, float):
                    assert math.isclose(offline_value, values[i], rel_tol=1e-6)
                else:
                    assert offline_value == values[i]


def test_training_set_from_csv_with_a_bundle_written_server_side(defined, tmp_path):
    stub, source = defined
    now = now_us()
    pq.write_table(source_table([{"customer_id": 1, "t": now - 10, "trips": 2.5}]), source)
    csv = b"customer_id,event_timestamp\n1,%s\n1,%s\n" % (
        _iso(now).encode(),
        _iso(now - 3_600_000_000).encode(),
    )
    request = pb.GetTrainingSetRequest(
        entity_csv=csv, bundle="fraud_model", output_path="out/train.parquet"
    )
    response = stub.GetTrainingSet(request, timeout=60)
    output = tmp_path / "state" / "files" / "out" / "train.parquet"  # the files directory
    table = pq.read_table(output).to_pylist()
    assert response.rows == 2 and response.output_path == str(output)
    assert table[0]["customer_stats__trips"] == 2.5
    assert table[1]["customer_stats__trips"] is None  # the entity row predates the value

    # Server-side paths cannot leave the files directory.
    for outside in ("../escape.parquet", str(tmp_path / "escape.parquet")):
        request.output_path = outside
        with pytest.raises(grpc.RpcError) as error:
            stub.GetTrainingSet(request, timeout=30)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert not (tmp_path / "escape.parquet").exists()
    assert not (tmp_path / "state" / "escape.parquet").exists()


def test_bad_training_set_requests_name_the_problem(defined):
    stub, _source = defined
    entities = b"customer_id,ts\n1,2024-01-01T00:00:00Z\n"
    request = pb.GetTrainingSetRequest(entity_csv=entities, features=REFS[:1])
    with pytest.raises(Exception) as error:
        stub.GetTrainingSet(request, timeout=30)
    assert "event_timestamp" in error.value.details()
    request.timestamp_column = "ts"
    with pytest.raises(Exception) as error:
        stub.GetTrainingSet(request, timeout=30)  # the Parquet source does not exist yet
    assert error.value.code().name == "FAILED_PRECONDITION"
    assert "customer_stats" in error.value.details()


def _iso(micros: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(micros / 1e6, tz=UTC).isoformat()


def test_a_missing_or_unreadable_source_fails_the_precondition_by_name(defined):
    stub, source = defined
    for content in (None, b"not parquet at all"):
        if content is not None:
            source.write_bytes(content)
        with pytest.raises(grpc.RpcError) as error:
            stub.Materialize(pb.MaterializeRequest(), timeout=30)
        assert error.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "customer_stats" in error.value.details()
    pq.write_table(source_table([{"customer_id": 1, "t": now_us() - 5}]).drop(["city"]), source)
    with pytest.raises(grpc.RpcError) as error:
        stub.Materialize(pb.MaterializeRequest(), timeout=30)
    assert "city" in error.value.details()


def test_each_entity_counts_once_across_row_groups_and_files(stub, tmp_path):
    """1,898 source rows of 300 customers, in row groups of 700 over two files, each
    customer's newer rows further on: 300 written (the latest per entity), not one per
    row group an entity appears in (481)."""
    source = tmp_path / "stats"
    source.mkdir()
    ids = np.concatenate([np.arange(700) % 300, np.arange(700) % 100, 100 + np.arange(498) % 81])
    start = now_us() - HOUR_US // 2
    times = start + np.arange(len(ids))  # later in the files is newer
    rows = [
        {"customer_id": int(c), "t": int(t), "trips": float(i)}
        for i, (c, t) in enumerate(zip(ids, times, strict=True))
    ]
    table = source_table(rows)
    pq.write_table(table.slice(0, 1400), source / "part-0.parquet", row_group_size=700)
    pq.write_table(table.slice(1400), source / "part-1.parquet", row_group_size=700)
    groups = [pq.ParquetFile(source / f"part-{n}.parquet").num_row_groups for n in (0, 1)]
    assert groups == [2, 1] and len(set(ids.tolist())) == 300
    stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=DEFINITIONS.format(source=source)))

    first = stub.Materialize(pb.MaterializeRequest(), timeout=60).views[0]
    assert (first.rows_read, first.rows_written, first.rows_ignored) == (1898, 300, 0)
    latest = {int(c): float(i) for i, c in enumerate(ids)}
    keys = sorted(latest)
    read = pb.GetOnlineFeaturesRequest(
        entity_keys=customers(*keys), features=["customer_stats:trips"]
    )
    trips = stub.GetOnlineFeatures(read).columns[0]
    assert list(trips.values.double_values) == [latest[k] for k in keys]

    # Five customers already hold newer (pushed) values: each counts once, as ignored.
    pushed = keys[:5]
    stub.WriteFeatures(
        stats_write(pushed, [now_us()] * 5, pb.Values(type=pb.VALUE_TYPE_DOUBLE,
                                                      double_values=[-1.0] * 5))
    )  # fmt: skip
    replay = stub.Materialize(
        pb.MaterializeRequest(start_time=ts(start), end_time=ts(now_us())), timeout=60
    ).views[0]
    assert (replay.rows_read, replay.rows_written, replay.rows_ignored) == (1898, 295, 5)
    trips = stub.GetOnlineFeatures(read).columns[0]
    assert list(trips.values.double_values) == [-1.0] * 5 + [latest[k] for k in keys[5:]]
