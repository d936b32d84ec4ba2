"""Small ONNX models made in code for the inference tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelplane.examples.models import IR_VERSION, OPSET

# KServe datatype → ONNX element type, for a model that echoes every type.
ECHO_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def echo_all_types(leave_out: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Inputs in_<TYPE> [batch, 2] → outputs out_<TYPE>, one pair per KServe datatype."""
    nodes, inputs, outputs = [], [], []
    for wire, elem in ECHO_TYPES.items():
        if wire in leave_out:
            continue
        nodes.append(helper.make_node("Identity", [f"in_{wire}"], [f"out_{wire}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{wire}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{wire}", elem, ["batch", 2]))
    return _finish(helper.make_graph(nodes, "echo", inputs, outputs))


def row_sum() -> onnx.ModelProto:
    """x [batch, length] FP32 (length variable) → sum [batch, 1]."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1)],
        "row_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 1])],
        [axes],
    )
    return _finish(graph)


def lookup() -> onnx.ModelProto:
    """index [batch, 1] INT64 → value [batch, 1] FP32 from a 3-entry table: an index
    outside 0..2 passes every protocol check but fails inside ONNX Runtime."""
    table = numpy_helper.from_array(np.array([10.0, 20.0, 30.0], dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
        [table],
    )
    return _finish(graph)


def text_echo() -> onnx.ModelProto:
    """text [batch, length] STRING (length variable) → same [batch, length]: a BYTES input
    whose non-batch dimension the request declares."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "text_echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", "length"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch", "length"])],
    )
    return _finish(graph)
