"""Inference logging its predictions to a real monitoring service: both servers on port
0 in this process, talking over gRPC only. Every acknowledged prediction arrives once;
with monitoring stopped, slow to answer or its buffer full, inference keeps answering
and counts the records it drops."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.client.monitoring import MonitoringClient
from modelplane.examples.models import LIGHT_MLP, mlp
from modelplane.services.inference.main import InferenceServer
from modelplane.services.monitoring.domain import StoredRecord
from modelplane.services.monitoring.ingest import stored_records
from modelplane.services.monitoring.main import Settings as MonitoringSettings
from modelplane.services.monitoring.main import build as build_monitoring
from modelplane.services.monitoring.store import DAY_US
from modelplane.services.monitoring.store.sqlite import SqliteMonitoringStore
from modelplane.services.monitoring.windows import ceil_minute, merged_range
from modelplane.services.registry.main import Settings as RegistrySettings
from tests.integration.inference.conftest import fp32_request, output, serving
from tests.integration.inference.test_registry_serving import MODEL, Registry, inference
from tests.support import running_aio_in_thread, wait_until

FEATURES = LIGHT_MLP[0]
DROPPED = "modelplane_inference_prediction_log_dropped_total"


@contextlib.contextmanager
def monitoring_server(data_dir: Path) -> Iterator[str]:
    settings = MonitoringSettings(port=0, data_dir=data_dir, log_json=False, log_level="WARNING")
    with running_aio_in_thread(build_monitoring(settings)) as address:
        yield address


def records(data_dir: Path, model: str) -> list[StoredRecord]:
    store = SqliteMonitoringStore(data_dir / "monitoring.db")
    try:
        return stored_records(store, model)
    finally:
        store.close()


def dropped(server: InferenceServer, model: str, reason: str) -> float:
    return server.registry.get_sample_value(DROPPED, {"model": model, "reason": reason}) or 0.0


def inputs(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def test_every_acknowledged_prediction_is_logged_once(repository, tmp_path):
    store_dir = tmp_path / "monitoring"
    with (
        monitoring_server(store_dir) as address,
        serving(repository, monitoring=address, prediction_log_interval_ms=20) as (_, stub),
    ):
        sent: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for i in range(30):
            rows = 3 if i % 5 == 0 else 1
            x = inputs(rows, i)
            request_id = f"client-{i}" if i % 2 else ""  # half without an id
            response = stub.ModelInfer(fp32_request("light", x, request_id), timeout=10)
            if request_id:
                assert response.id == request_id
            else:  # one was made up, to join labels later
                assert len(response.id) == 32 and int(response.id, 16) >= 0
            for row in range(rows):
                sent[(response.id, row)] = (x[row], output(response)[row])
        stream = [fp32_request("light", inputs(1, 100 + i), f"stream-{i}") for i in range(10)]
        for request, answer in zip(
            stream, stub.ModelStreamInfer(iter(stream), timeout=10), strict=True
        ):
            assert not answer.error_message
            x = np.frombuffer(request.raw_input_contents[0], np.float32)
            sent[(answer.infer_response.id, 0)] = (x, output(answer.infer_response)[0])
        # A request that fails is not logged.
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(fp32_request("light", np.ones((1, 3), np.float32), "bad"), timeout=10)

        wait_until(lambda: len(records(store_dir, "light")) >= len(sent))
        with MonitoringClient(address, timeout=10) as client:
            summary = client.summary("light")
    logged = records(store_dir, "light")
    assert len(logged) == len(sent) == 52  # 6 requests of 3 rows, 24 of 1, 10 streamed
    assert {(r.request_id, r.row_index) for r in logged} == set(sent)
    for record in logged:
        x, y = sent[(record.request_id, record.row_index)]
        assert (record.model_name, record.model_version, record.route) == ("light", "1", "")
        np.testing.assert_array_equal(record.outputs["output"], y)
        assert list(record.features) == [f"input[{j}]" for j in range(FEATURES)]
        np.testing.assert_array_equal(list(record.features.values()), x)
        assert record.latency_ms > 0
    assert summary.count == 52
    assert [(c.model_version, c.route, c.count) for c in summary.by_version_route] == [
        ("1", "", 52)
    ]


def test_with_monitoring_stopped_inference_serves_and_counts_what_it_drops(repository, tmp_path):
    store_dir = tmp_path / "monitoring"
    stack = contextlib.ExitStack()
    address = stack.enter_context(monitoring_server(store_dir))
    settings = {"prediction_log_interval_ms": 20, "prediction_log_timeout_s": 0.3}
    with stack, serving(repository, monitoring=address, **settings) as (server, stub):
        for i in range(5):
            stub.ModelInfer(fp32_request("light", inputs(1, i), f"before-{i}"), timeout=10)
        wait_until(lambda: len(records(store_dir, "light")) == 5)
        stack.close()  # monitoring stops

        for i in range(50):  # no request fails
            response = stub.ModelInfer(
                fp32_request("light", inputs(1, i), f"after-{i}"), timeout=10
            )
            assert output(response).shape == (1, 8)
        wait_until(
            lambda: (
                dropped(server, "light", "unavailable") + dropped(server, "light", "deadline") == 50
            )
        )
    assert len(records(store_dir, "light")) == 5


def test_a_full_buffer_drops_and_counts(repository, tmp_path):
    # Nothing listens there, and the sender would not send within the test anyway.
    settings = {
        "monitoring": "127.0.0.1:1",
        "prediction_log_buffer_rows": 5,
        "prediction_log_interval_ms": 600_000,
    }
    with serving(repository, **settings) as (server, stub):
        for i in range(10):
            stub.ModelInfer(fp32_request("light", inputs(1, i)), timeout=10)
        assert dropped(server, "light", "buffer_full") == 5
        queued = server.registry.get_sample_value("modelplane_inference_prediction_log_queued_rows")
        assert queued == 5


def test_sampling_zero_logs_nothing_of_that_model(repository, tmp_path):
    store_dir = tmp_path / "monitoring"
    with (
        monitoring_server(store_dir) as address,
        serving(
            repository,
            monitoring=address,
            prediction_log_interval_ms=20,
            prediction_log_sample=["light=0"],
        ) as (_, stub),
    ):
        for i in range(20):
            stub.ModelInfer(fp32_request("light", inputs(1, i), f"light-{i}"), timeout=10)
        index = np.array([[1]], np.int64)  # an INT64 input is logged as float32
        lookup = pb.ModelInferRequest(
            model_name="lookup",
            id="after",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="index", datatype="INT64", shape=[1, 1])
            ],
            raw_input_contents=[index.tobytes()],
        )
        stub.ModelInfer(lookup, timeout=10)
        # Records leave the buffer in order: once the later one arrived, so would have
        # any of the earlier ones.
        wait_until(lambda: len(records(store_dir, "lookup")) == 1)
    assert records(store_dir, "light") == []
    (looked_up,) = records(store_dir, "lookup")
    assert looked_up.features == {"index": 1.0}
    assert looked_up.outputs == {"value": (20.0,)}


def test_without_monitoring_there_is_no_prediction_log(repository):
    with serving(repository) as (server, stub):
        response = stub.ModelInfer(fp32_request("light", inputs(1, 0)), timeout=10)
        assert response.id == ""  # nothing is logged, so no id is made up
        assert (
            server.registry.get_sample_value("modelplane_inference_prediction_log_queued_rows")
            is None
        )


def test_served_from_the_registry_records_carry_the_version_and_route(tmp_path):
    registry = Registry(
        RegistrySettings(
            data_dir=tmp_path / "registry", port=0, log_json=False, log_level="WARNING"
        )  # type: ignore[call-arg]
    )
    store_dir = tmp_path / "monitoring"
    try:
        registry.client.create_model(MODEL)
        path = tmp_path / "fraud.onnx"
        onnx.save(mlp(LIGHT_MLP, seed=1, name=MODEL), path)
        registry.promote(registry.register(path))
        with (
            monitoring_server(store_dir) as address,
            inference(
                registry.address,
                tmp_path / "inference",
                monitoring=address,
                prediction_log_interval_ms=20,
            ) as (_, stub),
        ):
            for i in range(3):
                response = stub.ModelInfer(fp32_request(MODEL, inputs(1, i), f"r{i}"), timeout=10)
                assert response.parameters["route"].string_param == "production"
            wait_until(lambda: len(records(store_dir, MODEL)) == 3)
    finally:
        registry.stop()
    assert {(r.model_version, r.route) for r in records(store_dir, MODEL)} == {("1", "production")}


def test_failures_and_requests_reach_monitoring_as_running_totals(repository, tmp_path):
    """What the ERROR_RATE and LOG_DROPS alert rules read: inference's running totals of
    requests and failures per model, sent along with its records."""
    settings = MonitoringSettings(
        port=0, data_dir=tmp_path / "monitoring", log_json=False, log_level="WARNING"
    )
    monitoring = build_monitoring(settings)
    with (
        running_aio_in_thread(monitoring) as address,
        serving(repository, monitoring=address, prediction_log_interval_ms=20) as (_, stub),
    ):
        for i in range(3):
            stub.ModelInfer(fp32_request("light", inputs(1, i), f"ok-{i}"), timeout=10)
        for i in range(2):  # the wrong width: refused by the model
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(fp32_request("light", inputs(1, i)[:, :3]), timeout=10)

        def totals() -> tuple[int, int]:
            service = monitoring.monitoring
            service.ingestor.flush()
            now = ceil_minute(time.time_ns() // 1000)
            window = merged_range(service.store, "light", "", now - DAY_US, now)
            return window.requests, window.failed_requests

        wait_until(lambda: totals() == (5, 2))
