"""The prediction log without a network: columnar batches built from queued records,
the buffer bound, sampling, and records dropped and counted when a send fails."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelplane.client.monitoring import MAX_RECORDS_PER_CALL
from modelplane.monitoring.v1 import monitoring_pb2 as mpb
from modelplane.services.inference.prediction_log import (
    MAX_VALUES_PER_ROW,
    PredictionLog,
    PredictionLogConfig,
    Record,
    build_batches,
    new_request_id,
    parse_rates,
)
from modelplane.services.monitoring import domain
from tests.support import wait_until


def floats(batch: mpb.PredictionBatch, values: bytes, width: int) -> np.ndarray:
    return np.frombuffer(values, "<f4").reshape(len(batch.request_ids), width)


def record(
    request_id: str,
    x: np.ndarray,
    y: np.ndarray,
    model: str = "m",
    version: str = "1",
    route: str = "",
    latency_ns: int = 2_000_000,
) -> Record:
    return Record(
        model, version, route, request_id, 5_000_000_000, latency_ns, {"x": x}, {"y": y}, len(x)
    )


class FakeMonitoring:
    """Stands in for MonitoringClient.log_predictions."""

    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[list[mpb.PredictionBatch], float]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batches: Sequence[mpb.PredictionBatch], timeout: float) -> object:
        assert self.gate.wait(10)
        self.calls.append((list(batches), timeout))
        if self.fail is not None:
            raise FakeRpcError(self.fail)
        return None

    def rows(self) -> int:
        return sum(len(b.request_ids) for batches, _ in self.calls for b in batches)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "fake"


def prediction_log(sender: FakeMonitoring, **config: object) -> tuple[PredictionLog, Metrics]:
    registry = CollectorRegistry()
    settings = PredictionLogConfig(address="unused:1", **config)  # type: ignore[arg-type]
    return PredictionLog(settings, registry, sender=sender), Metrics(registry)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def dropped(self, model: str, reason: str) -> float:
        value = self.registry.get_sample_value(
            "modelplane_inference_prediction_log_dropped_total",
            {"model": model, "reason": reason},
        )
        return value or 0.0

    def sent(self, model: str) -> float:
        value = self.registry.get_sample_value(
            "modelplane_inference_prediction_log_sent_total", {"model": model}
        )
        return value or 0.0

    def queued(self) -> float | None:
        return self.registry.get_sample_value("modelplane_inference_prediction_log_queued_rows")


def test_records_become_one_columnar_batch_per_version_and_route():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    y = rng.standard_normal((5, 2)).astype(np.float32)
    records = [
        record("a", x[0:1], y[0:1]),
        record("b", x[1:3], y[1:3]),  # a request of two rows
        record("c", x[3:4], y[3:4], version="2", route="canary"),
        record("d", x[4:5], y[4:5]),
    ]
    built = build_batches(records)
    assert [(model, rows) for model, rows, _ in built] == [("m", 4), ("m", 1)]
    v1, v2 = (batch for _, _, batch in built)
    assert (v1.model_version, v1.route, v2.model_version, v2.route) == ("1", "", "2", "canary")
    assert list(v1.request_ids) == ["a", "b", "b", "d"]
    assert list(v1.row_indices) == [0, 0, 1, 0]
    assert list(v2.row_indices) == []  # single-row requests only: all rows are 0
    assert list(v1.feature_names) == ["x[0]", "x[1]", "x[2]"]
    np.testing.assert_array_equal(floats(v1, v1.feature_values, 3), x[[0, 1, 2, 4]])
    assert [(o.name, o.width) for o in v1.outputs] == [("y", 2)]
    np.testing.assert_array_equal(floats(v1, v1.output_values, 2), y[[0, 1, 2, 4]])
    assert list(v1.latency_ms) == [2.0] * 4
    assert list(v1.time_unix_us) == [5_000_000] * 4


def test_a_built_batch_is_one_the_monitoring_service_accepts():
    x = np.arange(6, dtype=np.int64).reshape(3, 2)  # integer inputs are logged as float32
    flags = np.array([True, False, True])  # one value per row keeps the tensor's name
    scores = np.ones((3, 1), np.float32)
    ((_, _, batch),) = build_batches(
        [Record("m", "1", "", "r", 0, 1, {"x": x, "flag": flags}, {"score": scores}, 3)]
    )
    decoded = domain.decode_batch(
        "b",
        model_name=batch.model_name,
        model_version=batch.model_version,
        route=batch.route,
        request_ids=batch.request_ids,
        row_indices=batch.row_indices,
        time_unix_us=batch.time_unix_us,
        latency_ms=batch.latency_ms,
        feature_names=batch.feature_names,
        feature_values=batch.feature_values,
        output_names=[o.name for o in batch.outputs],
        output_widths=[o.width for o in batch.outputs],
        output_values=batch.output_values,
        slices={},
        now_us=0,
    )
    assert decoded.feature_names == ("x[0]", "x[1]", "flag")
    np.testing.assert_array_equal(decoded.features, [[0, 1, 1], [2, 3, 0], [4, 5, 1]])
    assert MAX_RECORDS_PER_CALL == domain.MAX_RECORDS_PER_CALL


def test_text_tensors_internal_outputs_and_oversized_tensors_are_left_out():
    text = np.array([b"a"], dtype=object)
    wide = np.zeros((1, MAX_VALUES_PER_ROW + 1), np.float32)
    outputs = {"y": np.ones((1, 1), np.float32), "__feature_status": np.ones((1, 4), np.int32)}
    ((_, _, batch),) = build_batches(
        [
            Record(
                "m",
                "1",
                "",
                "r",
                0,
                1,
                {"name": text, "image": wide, "x": np.ones((1, 2))},
                outputs,
                1,
            )
        ]
    )
    assert list(batch.feature_names) == ["x[0]", "x[1]"]
    assert [o.name for o in batch.outputs] == ["y"]


def test_records_are_sent_in_calls_of_at_most_batch_rows():
    monitoring = FakeMonitoring()
    log, metrics = prediction_log(monitoring, batch_rows=4, interval_s=3600)
    x, y = np.ones((1, 2), np.float32), np.ones((1, 1), np.float32)
    ids = [
        log.record("m", "1", "", f"r{i}", time.perf_counter_ns(), {"x": x}, {"y": y}, 1)
        for i in range(10)
    ]
    assert ids == [f"r{i}" for i in range(10)]
    assert log.queued_rows == 10 and metrics.queued() == 10
    log.start()
    log.close()  # the last flush sends what the batch size left behind
    assert [len(batches[0].request_ids) for batches, _ in monitoring.calls] == [4, 4, 2]
    assert metrics.sent("m") == 10
    assert metrics.queued() == 0


def test_the_sender_wakes_once_batch_rows_are_queued():
    monitoring = FakeMonitoring()
    log, metrics = prediction_log(monitoring, batch_rows=3, interval_s=3600)
    log.start()
    x, y = np.ones((1, 2), np.float32), np.ones((1, 1), np.float32)
    try:
        for i in range(3):
            log.record("m", "1", "", f"r{i}", time.perf_counter_ns(), {"x": x}, {"y": y}, 1)
        # The interval is an hour: the third record woke the sender.
        wait_until(lambda: metrics.sent("m") == 3, timeout=10)
    finally:
        log.close()


def test_a_full_buffer_drops_and_counts_new_records():
    monitoring = FakeMonitoring()
    log, metrics = prediction_log(monitoring, buffer_rows=5, batch_rows=100, interval_s=3600)
    x, y = np.ones((2, 2), np.float32), np.ones((2, 1), np.float32)
    for i in range(4):  # 2 rows each: the first two fit, the next ones do not
        log.record("m", "1", "", f"r{i}", time.perf_counter_ns(), {"x": x}, {"y": y}, 2)
    assert log.queued_rows == 4
    assert metrics.dropped("m", "buffer_full") == 4
    log.start()
    log.close()
    assert monitoring.rows() == 4


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.UNAVAILABLE, "unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
        (grpc.StatusCode.INVALID_ARGUMENT, "rejected"),
        (grpc.StatusCode.INTERNAL, "error"),
    ],
)
def test_a_failed_send_drops_and_counts_its_records(code, reason):
    monitoring = FakeMonitoring(fail=code)
    log, metrics = prediction_log(monitoring, batch_rows=100, timeout_s=0.5)
    x, y = np.ones((1, 2), np.float32), np.ones((1, 1), np.float32)
    for i in range(3):
        log.record("m", "1", "", f"r{i}", time.perf_counter_ns(), {"x": x}, {"y": y}, 1)
    log.start()
    log.close()
    assert monitoring.calls[0][1] == 0.5  # the deadline travels with the call
    assert metrics.dropped("m", reason) == 3
    assert metrics.sent("m") == 0


def test_sampling_per_model():
    monitoring = FakeMonitoring()
    log, _ = prediction_log(monitoring, default_rate=0.0, rates={"kept": 1.0})
    x, y = np.ones((1, 2), np.float32), np.ones((1, 1), np.float32)
    for model in ("dropped", "kept"):
        for _ in range(50):
            request_id = log.record(
                model, "1", "", "", time.perf_counter_ns(), {"x": x}, {"y": y}, 1
            )
            assert len(request_id) == 32  # made up for a request without an id
    assert log.queued_rows == 50
    half, _ = prediction_log(FakeMonitoring(), rates={"m": 0.5})
    for i in range(2000):
        half.record("m", "1", "", f"r{i}", 0, {"x": x}, {"y": y}, 1)
    assert 800 < half.queued_rows < 1200


def test_sample_rates_parse_from_flags():
    assert parse_rates(["fraud=0.1", " demo = 1"]) == {"fraud": 0.1, "demo": 1.0}
    assert parse_rates({"a": 0}) == {"a": 0.0}
    for bad in (["fraud"], ["=0.1"], ["fraud=x"], ["fraud=1.5"], ["fraud=-0.1"]):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_settings_take_rates_from_flags_and_the_environment(monkeypatch):
    import argparse

    from modelplane.cli.serve import settings_from_args
    from modelplane.services.inference import main

    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    args = parser.parse_args(
        [
            "--monitoring",
            "127.0.0.1:50053",
            "--prediction-log-sample",
            "fraud=0.1",
            "--prediction-log-sample",
            "demo=0",
            "--prediction-log-sample-rate",
            "0.5",
        ]
    )
    settings = settings_from_args(main, args)
    assert settings.monitoring == "127.0.0.1:50053"
    assert settings.prediction_log_sample == {"fraud": 0.1, "demo": 0.0}
    assert settings.prediction_log_sample_rate == 0.5
    monkeypatch.setenv("MODELPLANE_INFERENCE_PREDICTION_LOG_SAMPLE", '{"fraud": 0.25}')
    assert main.Settings().prediction_log_sample == {"fraud": 0.25}
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        main.Settings(prediction_log_sample=["fraud=2"])
    with pytest.raises(ValueError):
        main.Settings(prediction_log_batch_rows=MAX_RECORDS_PER_CALL + 1)


def test_made_up_request_ids_are_uuid4_hex():
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in ids:
        made = uuid.UUID(hex=text)
        assert made.hex == text and made.version == 4 and made.variant == uuid.RFC_4122


def test_a_bundles_columns_are_named_by_feature_reference():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    names = ("stats:a", "stats:b", "stats:c")
    plain, named = build_batches(
        [record("a", x[:1], x[:1, :1]), record("b", x[1:], x[1:, :1])._replace(input_names=names)]
    )
    assert list(plain[2].feature_names) == ["x[0]", "x[1]", "x[2]"]
    assert list(named[2].feature_names) == list(names)
    # Names that do not fit the columns are not used.
    (fallback,) = build_batches([record("c", x[:1], x[:1, :1])._replace(input_names=("one",))])
    assert list(fallback[2].feature_names) == ["x[0]", "x[1]", "x[2]"]


def test_running_totals_count_requests_failures_and_drops():
    log = PredictionLog(
        PredictionLogConfig("unused", buffer_rows=2, batch_rows=100, interval_s=600),
        CollectorRegistry(),
        sender=FakeMonitoring(),
    )
    x = np.zeros((1, 2), np.float32)
    for i in range(3):  # the third does not fit the buffer of 2 rows
        log.record("m", "1", "", f"r{i}", time.perf_counter_ns(), {"x": x}, {"y": x}, 1)
    log.failed("m")
    (counters,) = log._counters()
    assert (counters.model_name, counters.dropped_records) == ("m", 1)
    assert (counters.failed_requests, counters.requests) == (1, 4)


def test_a_flush_sends_what_was_queued_not_what_arrives_meanwhile():
    x = np.zeros((1, 2), np.float32)
    log: PredictionLog

    def arrive(n: int, prefix: str) -> None:
        for i in range(n):
            log.record("m", "1", "", f"{prefix}{i}", time.perf_counter_ns(), {"x": x}, {"y": x}, 1)

    sent: list[int] = []

    def sender(batches: Sequence[mpb.PredictionBatch], timeout: float) -> object:
        sent.append(sum(len(b.request_ids) for b in batches))
        arrive(3, f"during{len(sent)}-")  # requests keep coming while a call is out
        return None

    log = PredictionLog(
        PredictionLogConfig("unused", batch_rows=4, interval_s=600), CollectorRegistry(), sender
    )
    arrive(10, "before-")
    log.flush_due()
    assert sent == [4, 4, 2]  # the 10 queued at the flush, in calls of at most 4
    assert log.queued_rows == 9  # the rest waits for the next flush
