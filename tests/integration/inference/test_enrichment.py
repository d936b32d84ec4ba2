"""Features in: a registry version that names a feature bundle takes entity ids; the
inference service fetches the bundle's rows from the feature service once per batch.
Real registry, feature and inference servers on port 0, the demo features."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.examples import features
from modelplane.examples.models import ensure_demo_repository
from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.feature.v1 import feature_pb2_grpc as fpb_grpc
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.services.feature.main import build as build_feature
from modelplane.services.inference.main import InferenceServer, Settings, build
from modelplane.services.monitoring.main import Settings as MonitoringSettings
from modelplane.services.monitoring.main import build as build_monitoring
from tests.integration.feature.messages import int_keys
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.integration.inference.conftest import Gate, fp32_request, output
from tests.integration.inference.test_registry_serving import Registry
from tests.integration.registry.conftest import ThreadedServer
from tests.support import running_aio_in_thread, running_sync, stop_in_thread, wait_until

MODEL = features.SCORER
FEATURE_CALLS = "modelplane_inference_feature_calls_total"


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, Path, list]]:
    """The feature service over the materialized demo features; yields its address, the
    scorer model file, and a handle to stop the service early."""
    definitions = features.ensure_demo_features(tmp_path / "features")
    settings = settings_for("sqlite", tmp_path / "feature", unique_prefix()).model_copy(
        update={"definitions_file": str(definitions)}
    )
    ensure_demo_repository(tmp_path / "models")
    model = tmp_path / "models" / MODEL / "1" / "model.onnx"
    server = build_feature(settings)
    with running_sync(server) as address:
        with grpc.insecure_channel(address) as channel:
            fpb_grpc.FeatureServiceStub(channel).Materialize(fpb.MaterializeRequest(), timeout=60)
        yield address, model, [server]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    from modelplane.services.registry.main import Settings as RegistrySettings

    registry = Registry(
        RegistrySettings(
            data_dir=tmp_path / "registry",
            port=0,
            tracing_enabled=False,
            log_json=False,
            log_level="WARNING",
        )  # type: ignore[call-arg]
    )
    try:
        yield registry
    finally:
        registry.stop()


def register(registry: Registry, model: Path, policy: int) -> None:
    registry.client.create_model(MODEL)
    metadata = rpb.UploadMetadata(
        model=MODEL,
        feature_input=rpb.FeatureInput(bundle=features.SCORER, missing_policy=policy),
    )
    version = registry.client.upload_file(model, metadata).version
    registry.client.set_alias(MODEL, "production", version, expected_version=0)


@contextmanager
def inference(
    registry: Registry, feature: str, tmp_path: Path, gate: Gate | None = None
) -> Iterator[tuple[InferenceServer, pb_grpc.GRPCInferenceServiceStub]]:
    config = Settings(
        registry=registry.address,
        load_model=[MODEL],
        feature_service=feature,
        data_dir=tmp_path / "inference",
        port=0,
        log_json=False,
        log_level="WARNING",
    )  # type: ignore[call-arg]
    server = build(config, gate.factory) if gate else build(config)
    with running_aio_in_thread(server) as address, grpc.insecure_channel(address) as channel:
        yield server, pb_grpc.GRPCInferenceServiceStub(channel)


def by_ids(*ids: int, statuses: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="customer_id", datatype="INT64", shape=[len(ids)]
            )
        ],
        raw_input_contents=[np.array(ids, dtype=np.int64).tobytes()],
    )
    if statuses:
        request.parameters["feature_statuses"].bool_param = True
    return request


def expected(feature: str, model: Path, ids: list[int]) -> np.ndarray:
    """What the model computes on the bundle tensor the feature service serves."""
    with grpc.insecure_channel(feature) as channel:
        tensor = fpb_grpc.FeatureServiceStub(channel).GetBundleTensor(
            fpb.GetBundleTensorRequest(
                bundle=features.SCORER, entity_keys=[int_keys("customer_id", ids)]
            ),
            timeout=10,
        )
    values = np.array(tensor.values, np.float32).reshape(tuple(tensor.shape))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": values})[0]


def calls(server: InferenceServer, outcome: str = "ok") -> float:
    value = server.registry.get_sample_value(FEATURE_CALLS, {"model": MODEL, "outcome": outcome})
    return value or 0.0


def test_predicts_by_entity_id_with_one_feature_call_per_batch(demo, registry, tmp_path):
    feature, model, _ = demo
    register(registry, model, rpb.MISSING_FEATURE_POLICY_REJECT)
    gate = Gate()
    with inference(registry, feature, tmp_path, gate) as (server, stub):
        response = stub.ModelInfer(by_ids(1, 2, 3), timeout=10)
        np.testing.assert_allclose(output(response), expected(feature, model, [1, 2, 3]), rtol=1e-5)
        assert response.model_version == "1"
        assert calls(server) == 1

        # Hold the instance busy on one request; twenty more queue meanwhile and run as
        # one batch, for which the service makes one feature call.
        gate.close()
        with ThreadPoolExecutor(21) as pool:
            first = pool.submit(stub.ModelInfer, by_ids(4), timeout=20)
            assert gate.entered.wait(10)
            queued = [pool.submit(stub.ModelInfer, by_ids(10 + n), timeout=20) for n in range(20)]
            _wait_queued(server, 20)
            gate.open()
            answers = [first.result(), *(f.result() for f in queued)]
        assert calls(server) == 3  # the first, the held one, one for the twenty
        for n, answer in enumerate(answers[1:]):
            np.testing.assert_allclose(
                output(answer), expected(feature, model, [10 + n]), rtol=1e-5
            )
        # Tensor requests still work and never call the feature service.
        values = np.random.default_rng(0).standard_normal((2, features.WIDTH)).astype(np.float32)
        tensor_answer = stub.ModelInfer(fp32_request(MODEL, values), timeout=10)
        assert output(tensor_answer).shape == (2, 2)
        assert calls(server) == 3


def test_missing_entities_fail_alone_and_statuses_are_returned_when_asked(demo, registry, tmp_path):
    feature, model, _ = demo
    register(registry, model, rpb.MISSING_FEATURE_POLICY_REJECT)
    with inference(registry, feature, tmp_path) as (_, stub):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(by_ids(5, 999_999), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "customer_id=999999" in refused.value.details()
        assert "NOT_FOUND" in refused.value.details()
        response = stub.ModelInfer(by_ids(5, 6, statuses=True), timeout=10)
        names = [o.name for o in response.outputs]
        statuses = np.frombuffer(
            response.raw_output_contents[names.index("feature_status")], np.int32
        ).reshape(2, features.WIDTH)
        assert (statuses == fpb.FEATURE_STATUS_PRESENT).all()


def test_fill_policy_scores_unknown_entities_with_fill_values(demo, registry, tmp_path):
    feature, model, _ = demo
    register(registry, model, rpb.MISSING_FEATURE_POLICY_FILL)
    with inference(registry, feature, tmp_path) as (_, stub):
        response = stub.ModelInfer(by_ids(999_999, statuses=True), timeout=10)
        names = [o.name for o in response.outputs]
        statuses = np.frombuffer(
            response.raw_output_contents[names.index("feature_status")], np.int32
        )
        assert (statuses == fpb.FEATURE_STATUS_NOT_FOUND).all()


def test_feature_service_down_fails_enriched_requests_fast_only(demo, registry, tmp_path):
    feature, model, servers = demo
    register(registry, model, rpb.MISSING_FEATURE_POLICY_REJECT)
    with inference(registry, feature, tmp_path) as (_, stub):
        assert stub.ModelInfer(by_ids(1), timeout=10).model_version == "1"
        stop_in_thread(servers[0])
        with pytest.raises(grpc.RpcError) as down:
            stub.ModelInfer(by_ids(1), timeout=10)
        assert down.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        values = np.zeros((1, features.WIDTH), np.float32)
        assert output(stub.ModelInfer(fp32_request(MODEL, values), timeout=10)).shape == (1, 2)


def _wait_queued(server: InferenceServer, rows: int) -> None:
    version = server.repository.get(MODEL)
    wait_until(lambda: version.batcher.queued_rows >= rows)


__all__ = ["ThreadedServer", "threading"]


def test_one_trace_spans_the_caller_inference_the_feature_service_and_monitoring(
    demo, registry, tmp_path
):
    from opentelemetry import trace
    from opentelemetry.propagate import inject
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from modelplane.kernel.telemetry import tracer_provider

    _, model, _ = demo
    register(registry, model, rpb.MISSING_FEATURE_POLICY_REJECT)
    exporter = InMemorySpanExporter()
    provider = tracer_provider("test", None)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # A traced feature service of its own (the fixture's is not traced).
    settings = settings_for("sqlite", tmp_path / "traced", unique_prefix()).model_copy(
        update={
            "tracing_enabled": True,
            "definitions_file": str(tmp_path / "features" / "features.yaml"),
        }
    )
    config = Settings(
        registry=registry.address,
        load_model=[MODEL],
        data_dir=tmp_path / "inference",
        port=0,
        log_json=False,
        log_level="WARNING",
        tracing_enabled=True,
    )  # type: ignore[call-arg]
    monitoring_settings = MonitoringSettings(
        port=0, data_dir=tmp_path / "monitoring", log_json=False, tracing_enabled=True
    )  # type: ignore[call-arg]
    with (
        running_sync(build_feature(settings)) as traced_feature,
        running_aio_in_thread(build_monitoring(monitoring_settings)) as monitoring,
    ):
        with grpc.insecure_channel(traced_feature) as channel:
            fpb_grpc.FeatureServiceStub(channel).Materialize(fpb.MaterializeRequest(), timeout=60)
        config = config.model_copy(
            update={
                "feature_service": traced_feature,
                "monitoring": monitoring,
                "prediction_log_interval_ms": 20,
            }
        )
        with (
            running_aio_in_thread(build(config)) as address,
            grpc.insecure_channel(address) as channel,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with provider.get_tracer("test").start_as_current_span("client") as client:
                carrier: dict[str, str] = {}
                inject(carrier)
                stub.ModelInfer(by_ids(1), timeout=10, metadata=tuple(carrier.items()))
            trace_id = client.get_span_context().trace_id

            def logged() -> bool:
                return any(
                    "LogPredictions" in span.name and span.context.trace_id == trace_id
                    for span in exporter.get_finished_spans()
                )

            wait_until(logged)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    in_trace = {name for name, span in spans.items() if span.context.trace_id == trace_id}
    assert {"client", "inference.request", "inference.features"} <= in_trace, in_trace
    assert any("GetBundleTensor" in name for name in in_trace), in_trace
    assert "inference.prediction_log" in in_trace, in_trace
    assert spans["inference.features"].parent.span_id == client.get_span_context().span_id
    assert trace.get_current_span() is trace.INVALID_SPAN
