"""The inference service serving what the registry's aliases say: a real registry
(SQLite and the machine's PostgreSQL) and a real inference server, both on port 0, the
inference server talking to the registry over gRPC only."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.client.registry import RegistryClient
from modelplane.examples.models import LIGHT_MLP, mlp
from modelplane.kernel.startup import StartupError
from modelplane.services.inference.main import InferenceServer, Settings, build
from modelplane.services.registry.main import Settings as RegistrySettings
from tests.integration.inference.conftest import fp32_request, output
from tests.integration.registry.conftest import ThreadedServer
from tests.postgres import POSTGRES_URL, fresh_schema
from tests.support import running_aio_in_thread, wait_until

MODEL = "fraud"
X = np.random.default_rng(0).standard_normal((1, LIGHT_MLP[0])).astype(np.float32)


def ort_output(path: Path, x: np.ndarray = X) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": x})[0]


class Registry:
    """A registry server plus a client, restartable on the same data and port."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.server = ThreadedServer(settings)
        self.address = self.server.address
        self.client = RegistryClient(self.address, actor="test")

    def stop(self) -> None:
        self.client.close()
        self.server.stop()

    def register(self, path: Path, serving_config: str = "") -> int:
        from modelplane.registry.v1 import registry_pb2 as rpb

        metadata = rpb.UploadMetadata(model=MODEL, serving_config=serving_config)
        return int(self.client.upload_file(path, metadata).version)

    def promote(self, version: int, alias: str = "production") -> None:
        current = {a.alias: a.version for a in self.client.list_aliases(MODEL)}.get(alias, 0)
        self.client.set_alias(MODEL, alias, version, expected_version=current)


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    overrides: dict[str, object] = {}
    schema_context = fresh_schema("infreg") if request.param == "postgres" else None
    if schema_context is not None:
        overrides = {"database_url": POSTGRES_URL, "database_schema": schema_context.__enter__()}
    registry = Registry(
        RegistrySettings(
            data_dir=tmp_path / "registry",
            port=0,
            tracing_enabled=False,
            log_json=False,
            log_level="WARNING",
            **overrides,
        )  # type: ignore[arg-type]
    )
    registry.client.create_model(MODEL)
    try:
        yield registry
    finally:
        registry.stop()
        if schema_context is not None:
            schema_context.__exit__(None, None, None)


@pytest.fixture
def versions(tmp_path: Path) -> dict[int, Path]:
    """Three different models of the same signature, as files."""
    paths = {}
    for seed in (1, 2, 3):
        path = tmp_path / "artifacts" / f"v{seed}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(mlp(LIGHT_MLP, seed=seed, name=MODEL), path)
        paths[seed] = path
    return paths


@contextmanager
def inference(
    registry_address: str, data_dir: Path, **settings: object
) -> Iterator[tuple[InferenceServer, pb_grpc.GRPCInferenceServiceStub]]:
    config = Settings(
        registry=registry_address,
        load_model=[MODEL],
        data_dir=data_dir,
        port=0,
        log_json=False,
        log_level="WARNING",
        registry_timeout_s=2.0,
        **settings,
    )  # type: ignore[arg-type]
    server = build(config)
    with running_aio_in_thread(server) as address, grpc.insecure_channel(address) as channel:
        yield server, pb_grpc.GRPCInferenceServiceStub(channel)


def served_version(stub: pb_grpc.GRPCInferenceServiceStub) -> str:
    return str(stub.ModelInfer(fp32_request(MODEL, X), timeout=10).model_version)


def wait_for_version(stub: pb_grpc.GRPCInferenceServiceStub, version: int) -> None:
    wait_until(lambda: served_version(stub) == str(version), timeout=30)


def test_serves_the_production_version_with_its_number(registry, versions, tmp_path):
    v1 = registry.register(versions[1])
    registry.promote(v1)
    with inference(registry.address, tmp_path / "inference") as (_, stub):
        response = stub.ModelInfer(fp32_request(MODEL, X), timeout=10)
        assert response.model_version == "1"
        assert response.parameters["route"].string_param == "production"
        np.testing.assert_allclose(output(response), ort_output(versions[1]), rtol=1e-5)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL), timeout=10).config
        assert (
            config.parameters["sha256"].string_value
            == registry.client.get_version(MODEL, 1).artifact.sha256
        )
        assert config.parameters["aliases"].string_value == "production"


def test_follows_alias_moves_and_uses_the_versions_serving_config(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    v2 = registry.register(
        versions[2],
        serving_config="max_batch_size: 16\ndynamic_batching { preferred_batch_size: [8] }\n",
    )
    with inference(registry.address, tmp_path / "inference") as (_, stub):
        assert served_version(stub) == "1"
        registry.promote(v2)
        wait_for_version(stub, 2)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL), timeout=10).config
        assert config.max_batch_size == 16
        assert list(config.dynamic_batching.preferred_batch_size) == [8]
        np.testing.assert_allclose(
            output(stub.ModelInfer(fp32_request(MODEL, X), timeout=10)),
            ort_output(versions[2]),
            rtol=1e-5,
        )
        # The old version was drained and unloaded: only v2 is served.
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
        assert [(m.name, m.version) for m in index.models] == [(MODEL, "2")]


def test_no_failed_request_while_aliases_move_under_load(registry, versions, tmp_path):
    expected = {str(n): ort_output(versions[n]) for n in (1, 2)}
    registry.promote(registry.register(versions[1]))
    v2 = registry.register(versions[2])
    with inference(registry.address, tmp_path / "inference") as (_, stub):
        stop = threading.Event()
        seen: list[str] = []
        failures: list[BaseException] = []
        lock = threading.Lock()

        def client() -> None:
            while not stop.is_set():
                try:
                    response = stub.ModelInfer(fp32_request(MODEL, X), timeout=10)
                    got = output(response)
                    # Every response is wholly one version's: its outputs are that one's.
                    np.testing.assert_allclose(got, expected[response.model_version], rtol=1e-5)
                    with lock:
                        seen.append(response.model_version)
                except BaseException as exc:  # any failure fails the test
                    with lock:
                        failures.append(exc)

        threads = [threading.Thread(target=client) for _ in range(32)]
        for thread in threads:
            thread.start()
        try:
            for version in (v2, 1, v2):
                count = len(seen)
                registry.promote(version)
                wait_until(lambda v=version, c=count: seen[-1:] == [str(v)] and len(seen) > c + 50)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not failures, failures[:3]
        assert {"1", "2"} <= set(seen)
        assert seen[-1] == "2"


def test_refuses_a_version_whose_bytes_do_not_match_and_keeps_serving(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    v2 = registry.register(versions[2])
    digest = registry.client.get_version(MODEL, v2).artifact.sha256
    blob = next((tmp_path / "registry").rglob(f"*{digest}*"))
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")  # corrupted on the registry
    with inference(registry.address, tmp_path / "inference") as (server, stub):
        registry.promote(v2)

        def refused() -> bool:
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
            return any(m.version == "2" and m.state == "UNAVAILABLE" for m in index.models)

        wait_until(refused)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        reason = next(m.reason for m in index.models if m.version == "2")
        assert "registry call failed" in reason or "verification" in reason
        assert served_version(stub) == "1"
        metrics = server.registry.get_sample_value(
            "modelplane_inference_registry_versions_refused_total",
            {"model": MODEL, "reason": "registry_error"},
        ) or server.registry.get_sample_value(
            "modelplane_inference_registry_versions_refused_total",
            {"model": MODEL, "reason": "digest_mismatch"},
        )
        assert metrics and metrics >= 1


def test_a_corrupted_cache_is_fetched_again_never_loaded(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    data = tmp_path / "inference"
    with inference(registry.address, data) as (_, stub):
        assert served_version(stub) == "1"
    (blob,) = (data / "inference-cache" / "blobs").glob("*.onnx")
    original = blob.read_bytes()
    blob.write_bytes(original[:-4] + b"\0\0\0\0")
    with inference(registry.address, data) as (server, stub):
        np.testing.assert_allclose(
            output(stub.ModelInfer(fp32_request(MODEL, X), timeout=10)),
            ort_output(versions[1]),
            rtol=1e-5,
        )
        assert server.registry.get_sample_value(
            "modelplane_inference_artifact_cache_corrupted_total"
        ) == pytest.approx(1)
    assert blob.read_bytes() == original


def test_restart_with_the_registry_down_serves_the_cached_version(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    v2 = registry.register(versions[2])
    data = tmp_path / "inference"
    with inference(registry.address, data) as (_, stub):
        registry.promote(v2)
        wait_for_version(stub, 2)
    address = registry.address
    registry.stop()
    with inference(address, data) as (_, stub):
        response = stub.ModelInfer(fp32_request(MODEL, X), timeout=10)
        assert response.model_version == "2"
        np.testing.assert_allclose(output(response), ort_output(versions[2]), rtol=1e-5)


def test_an_unknown_model_is_a_clear_error_at_start(registry, tmp_path):
    config = Settings(
        registry=registry.address,
        load_model=["nope@production"],
        data_dir=tmp_path,
        port=0,
        log_json=False,
    )  # type: ignore[arg-type]
    server = build(config)
    with pytest.raises(StartupError, match="no model 'nope'"):
        server._add_servicers(None)  # type: ignore[arg-type]


def test_an_unset_alias_serves_nothing_until_it_is_set(registry, versions, tmp_path):
    v1 = registry.register(versions[1])
    with inference(registry.address, tmp_path / "inference") as (_, stub):
        with pytest.raises(grpc.RpcError) as caught:
            served_version(stub)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        registry.promote(v1)
        wait_until(lambda: _ready(stub))
        assert served_version(stub) == "1"


def _ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    return bool(stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=10).ready)


Promote = Callable[[int], None]


def failing_model() -> onnx.ModelProto:
    """Same signature as the MLPs; runs on all-zero rows (so it passes the warm-up) and
    fails in the runtime on any other input, in a batch of any size: each row's 64 values
    are reshaped to 3 groups (64 is not a multiple of 3) unless every value is 0, when
    they are reshaped to 1."""
    from onnx import TensorProto, helper

    from modelplane.examples.models import IR_VERSION, OPSET

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [
        helper.make_node("Abs", ["input"], ["abs"]),
        helper.make_node("ReduceMax", ["abs"], ["max"], keepdims=1),
        helper.make_node("Equal", ["max", "zero_f"], ["is_zero"]),
        helper.make_node("Cast", ["is_zero"], ["zero_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["zero_i", "two"], ["twice"]),
        helper.make_node("Sub", ["three", "twice"], ["width"]),
        helper.make_node("Reshape", ["width", "one"], ["width1"]),
        # [rows, width, -1]: the batch dimension kept (0), so no batch size makes it fit.
        helper.make_node("Concat", ["keep", "width1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["input", "shape"], ["groups"]),
        helper.make_node("ReduceSum", ["groups", "axis2"], ["output"], keepdims=0),
    ]
    initializers = [
        helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
        const("two", [2]),
        const("three", [3]),
        const("one", [1]),
        const("minus_one", [-1]),
        const("keep", [0]),
        const("axis2", [2]),
    ]
    graph = helper.make_graph(
        nodes,
        MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", LIGHT_MLP[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def routed_request(key: str | None = None) -> pb.ModelInferRequest:
    request = fp32_request(MODEL, X)
    if key is not None:
        request.parameters["routing_key"].string_param = key
    return request


def test_canary_share_sticky_keys_and_rollback(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    registry.promote(registry.register(versions[2]), alias="canary")
    with inference(registry.address, tmp_path / "inference") as (server, stub):
        policy = registry.client.set_rollout(MODEL, {"production": 90, "canary": 10})
        wait_until(lambda: _routes(server) == {"production": 1, "canary": 2})
        routes = {"production": 0, "canary": 0}
        for _ in range(5000):
            response = stub.ModelInfer(routed_request(), timeout=10)
            route = response.parameters["route"].string_param
            assert response.model_version == {"production": "1", "canary": "2"}[route]
            routes[route] += 1
        # 10% of 5,000: mean 500, standard deviation ~21; 5 deviations either side.
        assert 394 <= routes["canary"] <= 606, routes
        for key in (f"customer-{n}" for n in range(100)):
            answers = {
                stub.ModelInfer(routed_request(key), timeout=10).model_version for _ in range(5)
            }
            assert len(answers) == 1, key
        # Rollback: the policy back to production alone, applied within a watch round-trip.
        registry.client.set_rollout(MODEL, {}, expected_revision=policy.revision)
        wait_until(lambda: _routes(server) == {"production": 1})
        assert {served_version(stub) for _ in range(200)} == {"1"}


def test_shadow_never_reaches_or_fails_the_caller(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    broken = tmp_path / "broken.onnx"
    onnx.save(failing_model(), broken)
    registry.promote(registry.register(broken), alias="shadow")
    twin = registry.register(versions[1])  # the same bytes as production's, a new version
    registry.promote(twin, alias="twin")
    with inference(registry.address, tmp_path / "inference") as (server, stub):
        registry.client.set_rollout(MODEL, {}, shadow_alias="shadow", shadow_percent=100)
        wait_until(lambda: _shadow_version(stub) == "2")
        for _ in range(200):
            response = stub.ModelInfer(routed_request(), timeout=10)
            assert response.model_version == "1"
            assert response.parameters["route"].string_param == "production"
        wait_until(lambda: _shadow(server, "failed") >= 150)
        # A shadow computing the same outputs is counted as matching.
        registry.client.set_rollout(MODEL, {}, shadow_alias="twin", shadow_percent=100)
        wait_until(lambda: _shadow_version(stub) == str(twin))
        for _ in range(50):
            assert served_version(stub) == "1"
        wait_until(lambda: _shadow(server, "matched") >= 40)
        assert _shadow(server, "differed") == 0


def _routes(server: InferenceServer) -> dict[str, int]:
    table = server.repository.table(MODEL)
    if table is None:
        return {}
    return {r.alias: int(r.version.version) for r in table.routes}


def _shadow(server: InferenceServer, outcome: str) -> float:
    value = server.registry.get_sample_value(
        "modelplane_inference_shadow_requests_total", {"model": MODEL, "outcome": outcome}
    )
    return value or 0.0


def _shadow_version(stub: pb_grpc.GRPCInferenceServiceStub) -> str:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
    versions = sorted((m.version for m in index.models), key=int)
    return versions[-1]


def test_repository_load_and_unload_follow_and_unfollow(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    registry.client.create_model("other")
    with inference(registry.address, tmp_path / "inference") as (_, stub):
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=10)
        assert not _ready(stub)
        assert [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models] == []
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
        assert served_version(stub) == "1"
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # A model without the alias is followed, and served once the alias is set.
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="other"), timeout=30)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        other = next(m for m in index.models if m.name == "other")
        assert other.state == "UNAVAILABLE" and "not set" in other.reason


def test_registry_control_mode_serves_every_model_with_the_alias(registry, versions, tmp_path):
    registry.promote(registry.register(versions[1]))
    config = Settings(
        registry=registry.address,
        model_control_mode="registry",
        registry_discovery_s=0.2,
        data_dir=tmp_path / "inference",
        port=0,
        log_json=False,
        log_level="WARNING",
    )  # type: ignore[arg-type]
    with (
        running_aio_in_thread(build(config)) as address,
        grpc.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert served_version(stub) == "1"
        registry.client.create_model("late")
        from modelplane.registry.v1 import registry_pb2 as rpb

        registry.client.upload_file(versions[2], rpb.UploadMetadata(model="late"))
        registry.client.set_alias("late", "production", 1, expected_version=0)
        wait_until(lambda: stub.ModelReady(pb.ModelReadyRequest(name="late"), timeout=10).ready)
        response = stub.ModelInfer(fp32_request("late", X), timeout=10)
        np.testing.assert_allclose(output(response), ort_output(versions[2]), rtol=1e-5)


def test_restart_keeps_the_cached_version_when_the_new_one_fails_verification(
    registry, versions, tmp_path
):
    registry.promote(registry.register(versions[1]))
    v2 = registry.register(versions[2])
    data = tmp_path / "inference"
    with inference(registry.address, data) as (_, stub):
        assert served_version(stub) == "1"
    digest = registry.client.get_version(MODEL, v2).artifact.sha256
    blob = next((tmp_path / "registry").rglob(f"*{digest}*"))
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    registry.promote(v2)
    with inference(registry.address, data) as (_, stub):
        assert served_version(stub) == "1"
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        assert ("2", "UNAVAILABLE") in {(m.version, m.state) for m in index.models}
