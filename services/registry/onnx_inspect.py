"""Reads an ONNX file's signature without loading its weights.

`onnx.load` would hold the whole file in memory, and a registry accepting multi-GB
models must not. The file is walked at the protobuf wire level instead: every field
is bounds-checked, tensor payloads (initializer data) are skipped with seeks after
their sizes are checked against their shapes, and what remains, the graph's
structure, is parsed by onnx and run through the ONNX checker. Initializers are
stood in for by graph inputs of the same type, so the checker still sees every name
defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.registry.domain import Signature, TensorSpec

MAX_PROTOBUF_BYTES = 2**31 - 1
# Largest single field kept in memory (a node, a function, a tensor's metadata).
MAX_KEPT_FIELD_BYTES = 64 * 1024 * 1024

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
# TensorProto payload fields: float_data, int32_data, string_data, int64_data,
# raw_data, double_data, uint64_data.
_TENSOR_DATA_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})
_TENSOR_RAW_DATA = 9

_KSERVE_TYPES: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "BYTES",
}


def _invalid(reason: str) -> InvalidArgument:
    return InvalidArgument(f"not a valid ONNX model: {reason}")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_exact(f: BinaryIO, size: int, end: int) -> bytes:
    if f.tell() + size > end:
        raise _invalid("truncated field")
    data = f.read(size)
    if len(data) != size:
        raise _invalid("file ends inside a field")
    return data


def _read_varint(f: BinaryIO, end: int) -> int:
    result = 0
    for shift in range(0, 70, 7):
        byte = _read_exact(f, 1, end)[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
    raise _invalid("malformed varint")


# A handler gets the file positioned at a length-delimited field's payload and the
# payload's end; it consumes the payload and returns bytes to keep (or None to drop).
Handler = Callable[[BinaryIO, int], bytes | None]


def _scan(
    f: BinaryIO,
    end: int,
    handlers: dict[int, Handler],
    dropped: frozenset[int] = frozenset(),
) -> bytes:
    """Re-encodes a message's fields, letting handlers replace or drop some."""
    kept = bytearray()
    while f.tell() < end:
        key = _read_varint(f, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _invalid("field number 0")
        if wire == 0:
            value = _encode_varint(_read_varint(f, end))
        elif wire == 1:
            value = _read_exact(f, 8, end)
        elif wire == 5:
            value = _read_exact(f, 4, end)
        elif wire == 2:
            length = _read_varint(f, end)
            stop = f.tell() + length
            if stop > end:
                raise _invalid("a field runs past its message")
            handler = handlers.get(number)
            if handler is not None:
                payload = handler(f, stop)
                if f.tell() != stop:
                    raise _invalid("a nested message does not end where announced")
                if payload is not None:
                    kept += _encode_varint(key) + _encode_varint(len(payload)) + payload
                continue
            if number in dropped:
                f.seek(stop)
                continue
            if length > MAX_KEPT_FIELD_BYTES:
                raise InvalidArgument(
                    f"ONNX field {number} is {length} bytes; at most {MAX_KEPT_FIELD_BYTES}"
                    " are inspected (store large weights as initializers)"
                )
            value = _encode_varint(length) + _read_exact(f, length, end)
        else:
            raise _invalid(f"unsupported protobuf wire type {wire}")
        if number not in dropped:
            kept += _encode_varint(key) + value
    if f.tell() != end:
        raise _invalid("a message does not end where announced")
    return bytes(kept)


class _GraphReader:
    """Collects initializer metadata while their payloads are skipped."""

    def __init__(self) -> None:
        self.initializers: list[TensorProto] = []

    def graph(self, f: BinaryIO, end: int) -> bytes:
        return _scan(f, end, {_GRAPH_INITIALIZER: self.initializer})

    def initializer(self, f: BinaryIO, end: int) -> None:
        raw_bytes: list[int] = []

        def skip_raw(f: BinaryIO, stop: int) -> None:
            raw_bytes.append(stop - f.tell())
            f.seek(stop)

        handlers: dict[int, Handler] = {_TENSOR_RAW_DATA: skip_raw}
        meta = _scan(f, end, handlers, dropped=_TENSOR_DATA_FIELDS)
        try:
            tensor = TensorProto.FromString(meta)
        except DecodeError as exc:
            raise _invalid("an initializer is malformed") from exc
        if raw_bytes:
            _check_raw_size(tensor, raw_bytes[-1])
        self.initializers.append(tensor)
        return None


def _check_raw_size(tensor: TensorProto, actual: int) -> None:
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return  # packed sub-byte or unknown types: the checker has the last word
    if tensor.data_type in (TensorProto.STRING,) or itemsize == 0:
        return
    expected = math.prod(tensor.dims) * itemsize
    if expected != actual:
        raise _invalid(
            f"initializer {tensor.name!r} holds {actual} bytes, its shape"
            f" {list(tensor.dims)} needs {expected}"
        )


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorSpec(value.name, (kind or "unknown").upper(), ())
    tensor = value.type.tensor_type
    datatype = _KSERVE_TYPES.get(tensor.elem_type, TensorProto.DataType.Name(tensor.elem_type))
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim)
    return TensorSpec(value.name, datatype, shape)


def read_signature(path: Path) -> Signature:
    """The inputs and outputs of the ONNX model at `path`; InvalidArgument if it is not one."""
    size = path.stat().st_size
    if size == 0:
        raise InvalidArgument("the artifact is empty")
    if size > MAX_PROTOBUF_BYTES:
        # Protobuf (and so ONNX Runtime) cannot parse a message this large: such a model
        # could be registered but never loaded.
        raise InvalidArgument(
            f"a single-file ONNX model is limited to {MAX_PROTOBUF_BYTES} bytes by protobuf;"
            f" this one has {size}"
        )
    reader = _GraphReader()
    with open(path, "rb", buffering=1024 * 1024) as f:
        skeleton = _scan(f, size, {_MODEL_GRAPH: reader.graph})
    try:
        model = onnx.ModelProto.FromString(skeleton)
    except DecodeError as exc:
        raise _invalid("the file is not an ONNX protobuf") from exc
    if not model.HasField("graph") or model.ir_version <= 0:
        raise _invalid("no graph or IR version")
    graph_inputs = {value.name for value in model.graph.input}
    for tensor in reader.initializers:
        if tensor.name not in graph_inputs:
            model.graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise _invalid(str(exc).splitlines()[0][:300]) from exc
    weights = {tensor.name for tensor in reader.initializers}
    opset = next(
        (entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0
    )
    return Signature(
        inputs=tuple(_spec(v) for v in model.graph.input if v.name not in weights),
        outputs=tuple(_spec(v) for v in model.graph.output),
        ir_version=model.ir_version,
        opset_version=opset,
    )
