"""A version's feature input over gRPC against a real server on port 0: kept with the
version wherever it is returned, checked at upload against the model's real ONNX
signature, and refused (INVALID_ARGUMENT naming the field) before any byte is kept."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import onnx
import pytest
from onnx import TensorProto, helper

from modelplane.client.registry import RegistryClient
from modelplane.examples.models import IR_VERSION, OPSET, mlp
from modelplane.registry.v1 import registry_pb2 as pb
from tests.integration.registry.conftest import ThreadedServer

Dim = int | str


def _identities(path: Path, *inputs: tuple[str, int, Sequence[Dim]]) -> Path:
    """A model whose every input is passed through to an output of its own."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs],
        "identities",
        [helper.make_tensor_value_info(name, dtype, list(shape)) for name, dtype, shape in inputs],
        [
            helper.make_tensor_value_info(f"{name}_out", dtype, list(shape))
            for name, dtype, shape in inputs
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, path)
    return path


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(mlp((6, 8, 2), seed=5), path)  # input "input" FP32 [batch, 6]
    return path


@pytest.fixture
def client(registry: ThreadedServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address, actor="alice", timeout=30) as c:
        c.create_model("fraud")
        yield c


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_the_feature_input_is_kept_and_returned_wherever_the_version_is(
    client: RegistryClient, model_file: Path
) -> None:
    stream = client.watch("fraud", timeout=30)
    try:
        assert next(stream).WhichOneof("event") == "snapshot"
        uploaded = client.upload_file(
            model_file,
            pb.UploadMetadata(model="fraud"),
            feature_input=pb.FeatureInput(bundle="customer_scorer"),
        )
        announced = next(stream).version_created.version.feature_input
    finally:
        stream.cancel()
    # Stored as it will be served: the only input named, UNSPECIFIED as REJECT.
    stored = pb.FeatureInput(
        bundle="customer_scorer",
        input="input",
        missing_policy=pb.MISSING_FEATURE_POLICY_REJECT,
    )
    assert uploaded.feature_input == announced == stored
    fill = pb.FeatureInput(
        bundle="customer_scorer", input="input", missing_policy=pb.MISSING_FEATURE_POLICY_FILL
    )
    client.upload_file(model_file, pb.UploadMetadata(model="fraud", feature_input=fill))
    plain = client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
    assert not plain.HasField("feature_input")
    assert client.get_version("fraud", 1).feature_input == stored
    assert client.get_version("fraud", 2).feature_input == fill
    assert not client.get_version("fraud", 3).HasField("feature_input")
    listed = {v.version: v for v in client.list_versions("fraud")}
    assert listed[1].feature_input == stored and listed[2].feature_input == fill
    assert not listed[3].HasField("feature_input")
    client.set_alias("fraud", "production", 2, 0)
    assert client.get_version("fraud", alias="production").feature_input == fill
    details = {e.target: json.loads(e.details_json) for e in client.audit(action="version.create")}
    assert details["fraud/v1"]["feature_input"] == {
        "bundle": "customer_scorer",
        "input": "input",
        "missing_policy": "reject",
    }
    assert details["fraud/v2"]["feature_input"]["missing_policy"] == "fill"
    assert details["fraud/v3"]["feature_input"] is None


def test_a_named_input_of_a_two_input_model_is_accepted(
    client: RegistryClient, tmp_path: Path
) -> None:
    path = _identities(
        tmp_path / "two.onnx",
        ("ids", TensorProto.INT64, ["batch", 1]),
        ("dense", TensorProto.FLOAT, ["batch", 12]),
    )
    version = client.upload_file(
        path,
        pb.UploadMetadata(model="fraud"),
        feature_input=pb.FeatureInput(bundle="scorer", input="dense"),
    )
    assert (version.feature_input.input, version.feature_input.missing_policy) == (
        "dense",
        pb.MISSING_FEATURE_POLICY_REJECT,
    )


BATCH_6 = ("x", TensorProto.FLOAT, ["batch", 6])


@pytest.mark.parametrize(
    ("inputs", "feature_input", "fragment"),
    [
        ((BATCH_6,), pb.FeatureInput(bundle="scorer", input="y"), "'y' is not an input"),
        (
            (BATCH_6, ("z", TensorProto.FLOAT, ["batch", 6])),
            pb.FeatureInput(bundle="scorer"),
            "feature_input.input is required: the model has 2 inputs ('x', 'z')",
        ),
        (
            (("x", TensorProto.INT64, ["batch", 6]),),
            pb.FeatureInput(bundle="scorer"),
            "feature_input.input 'x' is INT64[-1, 6]",
        ),
        (
            (("x", TensorProto.FLOAT, ["batch", 6, 2]),),
            pb.FeatureInput(bundle="scorer", input="x"),
            "feature_input.input 'x' is FP32[-1, 6, 2]",
        ),
        (
            (("x", TensorProto.FLOAT, ["batch", "width"]),),
            pb.FeatureInput(bundle="scorer"),
            "fixed width",
        ),
        ((BATCH_6,), pb.FeatureInput(bundle="Scorer"), "feature_input.bundle 'Scorer'"),
        ((BATCH_6,), pb.FeatureInput(input="x"), "feature_input.bundle is required"),
        (
            (BATCH_6,),
            pb.FeatureInput(bundle="scorer", missing_policy=7),  # type: ignore[arg-type]
            "feature_input.missing_policy 7",
        ),
    ],
)
def test_a_bad_feature_input_is_refused_before_any_byte_is_kept(
    registry: ThreadedServer,
    client: RegistryClient,
    tmp_path: Path,
    inputs: Sequence[tuple[str, int, Sequence[Dim]]],
    feature_input: pb.FeatureInput,
    fragment: str,
) -> None:
    path = _identities(tmp_path / "m.onnx", *inputs)
    code, details = _code(
        lambda: client.upload_file(
            path, pb.UploadMetadata(model="fraud"), feature_input=feature_input
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details
    assert client.get_model("fraud").latest_version == 0
    artifacts = registry.settings.data_dir / "artifacts"
    assert [p for p in artifacts.rglob("*") if p.is_file()] == []
    assert os.listdir(artifacts / "tmp") == []
    (refused,) = client.audit(action="version.create")
    assert json.loads(refused.details_json)["outcome"] == "refused"
