"""The monitoring service over gRPC with its SQLite store: columnar batches stored once
per record key, a malformed batch rejected alone and reported, kept across restarts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as pb_grpc
from modelplane.services.monitoring.domain import MAX_RECORDS_PER_CALL
from modelplane.services.monitoring.ingest import decode
from modelplane.services.monitoring.main import Settings, build
from modelplane.services.monitoring.store.sqlite import SqliteMonitoringStore
from tests.support import running_aio_in_thread

FEATURES = ["amount", "age"]


def batch(
    ids: list[str],
    version: str = "1",
    route: str = "",
    start_s: int = 1_000,
    model: str = "fraud",
) -> pb.PredictionBatch:
    rows = len(ids)
    return prediction_batch(
        model,
        version,
        ids,
        latency_ms=[float(i + 1) for i in range(rows)],
        features=np.arange(rows * 2, dtype=np.float32).reshape(rows, 2),
        feature_names=FEATURES,
        outputs={
            "score": np.full((rows, 1), 0.5, np.float32),
            "probs": np.tile(np.array([[0.25, 0.75]], np.float32), (rows, 1)),
        },
        route=route,
        time_unix_us=[(start_s + i) * 1_000_000 for i in range(rows)],
        slices={"region": ["eu" if i % 2 else "us" for i in range(rows)]},
    )


@pytest.fixture
def monitoring(tmp_path: Path):
    server = build(Settings(port=0, data_dir=tmp_path, log_json=False, log_level="WARNING"))
    with running_aio_in_thread(server) as address, MonitoringClient(address, timeout=10) as c:
        yield c


def stored(tmp_path: Path, model: str = "fraud") -> list[tuple[pb.PredictionBatch, object]]:
    """Every stored record of a model: (its batch as stored, decoded), one per row."""
    store = SqliteMonitoringStore(tmp_path / "monitoring.db")
    try:
        records = []
        for _, batch in sorted(store.batches(list(range(1, 1_000))).items()):
            if batch.model != model:
                continue
            message = pb.PredictionBatch.FromString(batch.payload)
            decoded = decode("stored", message, 0)
            records.extend((decoded, row) for row in range(decoded.rows))
        return records
    finally:
        store.close()


def test_batches_are_summarised_per_version_and_route(monitoring):
    result = monitoring.log_predictions(
        [
            batch(["a", "b", "c"], version="1", route="production"),
            batch(["d"], version="2", route="canary", start_s=1_003),
        ]
    )
    assert (result.stored, result.duplicates) == (4, 0)

    v1 = monitoring.summary("fraud", "1")
    assert v1.count == 3
    assert v1.mean_latency_ms == pytest.approx(2.0)
    assert v1.p50_latency_ms == 2.0 and v1.p99_latency_ms == 3.0
    assert v1.first_time.seconds == 1_000 and v1.last_time.seconds == 1_002

    every = monitoring.summary("fraud")
    assert every.count == 4
    assert [(c.model_version, c.route, c.count) for c in every.by_version_route] == [
        ("1", "production", 3),
        ("2", "canary", 1),
    ]
    # Summaries are kept per whole minute: a range covers the minutes it touches.
    monitoring.log_predictions([batch(["e"], start_s=1_200)])
    windowed = monitoring.summary(
        "fraud",
        start=datetime.fromtimestamp(1_140, UTC),
        end=datetime.fromtimestamp(1_260, UTC),
    )
    assert windowed.count == 1
    assert monitoring.summary("other").count == 0


def test_the_same_batch_three_times_is_stored_once(monitoring, tmp_path):
    records = batch([f"r{i}" for i in range(10)])
    results = [monitoring.log_predictions([records]) for _ in range(3)]
    assert [(r.stored, r.duplicates) for r in results] == [(10, 0), (0, 10), (0, 10)]
    assert monitoring.summary("fraud").count == 10
    # A batch that overlaps stored records stores only the new ones.
    overlap = monitoring.log_predictions([batch(["r8", "r9", "r10"])])
    assert (overlap.stored, overlap.duplicates) == (1, 2)
    assert monitoring.summary("fraud").count == 11
    assert len(stored(tmp_path)) == 11


def test_rows_of_one_request_are_distinct_records(monitoring, tmp_path):
    multi = batch(["req", "req", "req"])
    multi.row_indices[:] = [0, 1, 2]
    assert monitoring.log_predictions([multi]).stored == 3
    assert monitoring.log_predictions([multi]).duplicates == 3
    # Same request id, another model: another record.
    assert monitoring.log_predictions([batch(["req"], model="other")]).stored == 1
    assert [int(b.row_indices[row]) for b, row in stored(tmp_path)] == [0, 1, 2]


def test_a_repeated_key_within_one_call_is_stored_once(monitoring, tmp_path):
    result = monitoring.log_predictions([batch(["a", "b", "a"]), batch(["b", "c"])])
    assert (result.stored, result.duplicates) == (3, 2)
    assert sorted(b.request_ids[row] for b, row in stored(tmp_path)) == ["a", "b", "c"]


def test_records_are_stored_with_their_columns(monitoring, tmp_path):
    monitoring.log_predictions([batch(["a", "b"], route="production")])
    (first, row0), (second, row1) = stored(tmp_path)
    assert (first.request_ids[row0], first.model_version, first.route) == (
        "a",
        "1",
        "production",
    )
    assert first.features[row0].tolist() == [0.0, 1.0]
    assert second.features[row1].tolist() == [2.0, 3.0]
    assert second.outputs[row1].tolist() == [0.5, 0.25, 0.75]
    assert (first.slices["region"][row0], second.slices["region"][row1]) == ("us", "eu")
    assert int(first.time_us[row0]) == 1_000 * 1_000_000
    assert second.latency_ms[row1] == 2.0


def _bad(change) -> pb.PredictionBatch:
    broken = batch(["x", "y"])
    change(broken)
    return broken


BAD_BATCHES = {
    "feature width": (
        lambda b: setattr(b, "feature_values", b.feature_values[:-4]),
        "batches[1].feature_values",
    ),
    "output width": (
        lambda b: b.outputs[1].__setattr__("width", 3),
        "batches[1].output_values",
    ),
    "nan latency": (lambda b: b.latency_ms.__setitem__(1, float("nan")), "latency_ms[1]"),
    "inf latency": (lambda b: b.latency_ms.__setitem__(0, float("inf")), "latency_ms[0]"),
    "negative latency": (lambda b: b.latency_ms.__setitem__(0, -1.0), "latency_ms[0]"),
    "latency count": (lambda b: b.latency_ms.append(1.0), "batches[1].latency_ms has 3"),
    "time count": (lambda b: b.time_unix_us.pop(), "batches[1].time_unix_us has 1"),
    "slice count": (lambda b: b.slices[0].values.pop(), "slices 'region'"),
    "empty id": (lambda b: b.request_ids.__setitem__(1, ""), "request_ids[1] is empty"),
    "no model": (lambda b: setattr(b, "model_name", ""), "batches[1].model_name"),
    "repeated feature": (
        lambda b: b.feature_names.__setitem__(1, "amount"),
        "'amount' appears more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_malformed_batch_is_rejected_alone_and_reported(monitoring, case):
    change, message = BAD_BATCHES[case]
    good = batch(["g1", "g2"])
    result = monitoring.log_predictions([good, _bad(change)])
    assert result.stored == 2
    assert result.rejected == {"invalid_batch": 2}
    assert len(result.errors) == 1 and message in result.errors[0]
    assert monitoring.summary("fraud").count == 2


def test_a_record_with_an_infinite_value_is_rejected_alone(monitoring):
    records = batch(["a", "b", "c"])
    values = np.frombuffer(records.feature_values, "<f4").copy()
    values[2] = np.inf  # row 1's first feature
    records.feature_values = values.tobytes()
    result = monitoring.log_predictions([records])
    assert (result.stored, result.rejected) == (2, {"non_finite": 1})
    report = monitoring.report("fraud", start=datetime.fromtimestamp(60, UTC))
    amount = next(c for c in report.columns if c.name == "amount")
    assert (amount.count, amount.max) == (2, 4.0)  # rows 0 and 2 only
    assert list(report.rejected) == [pb.RejectedCount(reason="non_finite", count=1)]


def test_a_call_is_bounded(monitoring):
    ids = [f"r{i}" for i in range(MAX_RECORDS_PER_CALL // 2 + 1)]
    too_many = pb.PredictionBatch(
        model_name="fraud",
        model_version="1",
        request_ids=ids,
        latency_ms=[1.0] * len(ids),
    )
    with pytest.raises(grpc.RpcError) as error:
        monitoring.log_predictions([too_many, too_many])
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_RECORDS_PER_CALL} records" in error.value.details()


def test_records_survive_a_restart_and_stay_idempotent(tmp_path):
    records = batch(["a", "b"])
    for expected_new in (2, 0):
        server = build(Settings(port=0, data_dir=tmp_path, log_json=False))
        with running_aio_in_thread(server) as address, MonitoringClient(address) as client:
            assert client.log_predictions([records]).stored == expected_new
            assert client.summary("fraud").count == 2


def test_out_of_range_input_is_invalid_argument(tmp_path: Path):
    """Found by tests/fuzz, each answered INTERNAL: timestamps that are not valid
    (nanos outside 0..999,999,999, seconds past year 9999) or at year 1 (a report's
    buckets then fall before year 1); producer counters past int64 (SQLite cannot store
    them); a config revision of 2**63 - 1 (its successor overflows int64)."""
    server = build(Settings(port=0, data_dir=tmp_path, log_json=False, log_level="WARNING"))
    with running_aio_in_thread(server) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        year_1 = Timestamp(seconds=-62_135_596_800)
        calls = []
        for bad in [Timestamp(seconds=1, nanos=-1), Timestamp(seconds=2**62), year_1]:
            summary = pb.GetPredictionSummaryRequest(model_name="fraud", start_time=bad)
            report = pb.GetReportRequest(model_name="fraud", start_time=bad, end_time=bad)
            calls += [(stub.GetPredictionSummary, summary), (stub.GetReport, report)]
        counters = pb.LogPredictionsRequest(
            producer_id="inference-0",
            counters=[pb.ProducerCounters(model_name="fraud", dropped_records=2**63)],
        )
        config = pb.SetMonitorConfigRequest(
            config=pb.MonitorConfig(model_name="fraud", revision=2**63 - 1)
        )
        calls += [(stub.LogPredictions, counters), (stub.SetMonitorConfig, config)]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as error:
                method(request, timeout=10)
            assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, request
        counters.counters[0].dropped_records = 2**63 - 1
        stub.LogPredictions(counters, timeout=10)


def test_producers_counting_near_the_bound_never_break_summaries(tmp_path: Path):
    """Found by tests/fuzz: several producers each reporting totals near the bound made
    the model's minute window unserializable, so every summary and report of the model
    answered INTERNAL from then on. The window's counts now saturate."""
    server = build(Settings(port=0, data_dir=tmp_path, log_json=False, log_level="WARNING"))
    with running_aio_in_thread(server) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        near = 2**63 - 1
        for producer in ("inference-0", "inference-1", "inference-2"):
            stub.LogPredictions(
                pb.LogPredictionsRequest(
                    producer_id=producer,
                    counters=[
                        pb.ProducerCounters(
                            model_name="fraud", dropped_records=near, failed_requests=near
                        )
                    ],
                ),
                timeout=10,
            )
        summary = stub.GetPredictionSummary(
            pb.GetPredictionSummaryRequest(model_name="fraud"), timeout=10
        )
        assert summary.count == 0
        report = stub.GetReport(pb.GetReportRequest(model_name="fraud"), timeout=10)
        assert report.model_name == "fraud"
