"""Reading an ONNX signature without loading the weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from modelplane.examples.models import mlp
from modelplane.kernel.errors import InvalidArgument
from modelplane.services.registry.onnx_inspect import read_signature
from tests.integration.registry.large_onnx import write_large_onnx


def test_reads_inputs_outputs_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp((5, 7, 2)), path)
    signature = read_signature(path)
    assert [(s.name, s.datatype, s.shape) for s in signature.inputs] == [("input", "FP32", (-1, 5))]
    assert [(s.name, s.datatype, s.shape) for s in signature.outputs] == [
        ("output", "FP32", (-1, 2))
    ]
    assert (signature.ir_version, signature.opset_version) == (10, 17)


def test_initializers_listed_as_inputs_are_not_signature_inputs(tmp_path: Path) -> None:
    # Old exporters (IR < 4) list every initializer among the graph inputs.
    model = mlp((3, 2))
    for tensor in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert [s.name for s in read_signature(path).inputs] == ["input"]


def test_truncated_file_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp((64, 64, 2)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        read_signature(path)


def test_initializer_too_short_for_its_shape_is_invalid(tmp_path: Path) -> None:
    model = mlp((4, 2))
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidArgument, match="holds 28 bytes"):
        read_signature(path)


def test_graph_the_checker_rejects_is_invalid(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        read_signature(path)


def test_protobuf_without_graph_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=10).SerializeToString())
    with pytest.raises(InvalidArgument, match="no graph"):
        read_signature(path)


def test_weights_are_not_loaded(tmp_path: Path) -> None:
    """Measured in a fresh process: this one's peak RSS may already be high."""
    path = tmp_path / "big.onnx"
    write_large_onnx(path, 128 * 1024 * 1024)
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from modelplane.services.registry.onnx_inspect import read_signature\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "signature = read_signature(Path(sys.argv[1]))\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(grown, signature.inputs[0].shape[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    grown_kib, width = (int(field) for field in result.stdout.split())
    assert width == 32 * 1024 * 1024
    assert grown_kib < 32 * 1024  # far below the 128 MiB of weights


def test_files_beyond_the_protobuf_limit_are_invalid(tmp_path: Path) -> None:
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: takes no disk space
    with pytest.raises(InvalidArgument, match="limited to"):
        read_signature(path)
