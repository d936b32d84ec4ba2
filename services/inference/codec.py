"""KServe v2 tensors ↔ numpy, checked against a loaded model version.

Everything a request can get wrong is caught here, before it reaches the batcher, with a
message naming the tensor and what was expected; a malformed request therefore never
reaches ONNX Runtime nor shares a batch. Raw contents become numpy views without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np

from inference import grpc_service_pb2 as pb
from modelplane.kernel.errors import InvalidArgument
from modelplane.kserve_types import CONTENTS_FIELD
from modelplane.services.inference.datatypes import (
    BY_WIRE,
    decode_bytes,
    encode_bytes,
    to_bytes_elements,
)
from modelplane.services.inference.repository import ModelVersion, TensorSpec


def _dims_text(dims: tuple[int | None, ...] | list[int]) -> str:
    return "[" + ",".join("-1" if d is None else str(d) for d in dims) + "]"


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], model: ModelVersion) -> None:
    dims = spec.dims
    batched = model.max_batch_size > 0
    expected_rank = len(dims) + (1 if batched else 0)
    if len(shape) == expected_rank and all(d >= 0 for d in shape):
        body = shape[1:] if batched else shape
        if all(want is None or want == got for want, got in zip(dims, body, strict=True)):
            if not batched:
                return
            if 1 <= shape[0] <= model.max_batch_size:
                return
            raise InvalidArgument(
                f"input '{spec.name}': batch size {shape[0]} is outside 1..{model.max_batch_size} "
                f"(max_batch_size of model '{model.name}')"
            )
    expected = _dims_text(dims)
    if batched:
        expected = f"[-1{',' if dims else ''}{expected[1:]}"
    raise InvalidArgument(
        f"input '{spec.name}': shape {_dims_text(list(shape))} does not match the model's "
        f"{expected}"
    )


def decode_inputs(
    request: pb.ModelInferRequest, model: ModelVersion
) -> tuple[dict[str, np.ndarray], int, Hashable]:
    """The request's inputs as arrays, its row count and its batching shape key."""
    specs = model.inputs
    tensors = request.inputs
    binding = model.feature_input
    if binding is not None and all(tensor.name != binding.input for tensor in tensors):
        return _decode_entity_keys(request, model, binding.input)
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs"
        )
    feeds: dict[str, np.ndarray] = {}
    rows = 1
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected inference input '{name}' for model '{model.name}'; "
                f"it takes {', '.join(repr(n) for n in specs)}"
            )
        if name in feeds:
            raise InvalidArgument(f"input '{name}' appears more than once")
        datatype = spec.datatype
        if tensor.datatype != datatype.wire:
            raise InvalidArgument(
                f"input '{name}': datatype {tensor.datatype or '(empty)'} but model "
                f"'{model.name}' expects {datatype.wire}"
            )
        shape = tuple(tensor.shape)
        _check_shape(spec, shape, model)
        feeds[name] = _array(tensor, raw[index] if raw else None, spec, shape)
        if model.max_batch_size > 0:
            if index == 0:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidArgument(
                    f"input '{name}': batch size {shape[0]} differs from the {rows} rows of "
                    "the other inputs"
                )
    if len(feeds) != len(specs):
        missing = [n for n in specs if n not in feeds]
        raise InvalidArgument(
            f"model '{model.name}' expects {len(specs)} inputs but got {len(feeds)}; "
            f"missing {', '.join(repr(n) for n in missing)}"
        )
    _check_outputs(request, model)
    key: Hashable = None
    if model.variable_dims:
        key = tuple(feeds[n].shape[1:] for n in specs)
    return feeds, rows, key


def _check_outputs(request: pb.ModelInferRequest, model: ModelVersion) -> None:
    for output in request.outputs:
        if output.name not in model.outputs:
            raise InvalidArgument(
                f"unexpected inference output '{output.name}' for model '{model.name}'; "
                f"it has {', '.join(repr(n) for n in model.outputs)}"
            )


KEY_DATATYPES = ("INT64", "BYTES")


def _decode_entity_keys(
    request: pb.ModelInferRequest, model: ModelVersion, feature_input: str
) -> tuple[dict[str, np.ndarray], int, Hashable]:
    """A request to an enriched model that sends entity keys in place of the feature
    input: every input that is not one of the model's is a join key column, INT64 or
    BYTES, shaped [rows] or [rows, 1]. Key requests batch only with requests sending
    the same key columns (the shape key), never with tensor requests."""
    tensors = request.inputs
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs"
        )
    feeds: dict[str, np.ndarray] = {}
    rows = -1
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if name in feeds:
            raise InvalidArgument(f"input '{name}' appears more than once")
        spec = model.inputs.get(name)
        shape = tuple(tensor.shape)
        if spec is None:
            if tensor.datatype not in KEY_DATATYPES:
                raise InvalidArgument(
                    f"input '{name}': model '{model.name}' takes '{feature_input}' or the "
                    f"entity keys of its feature bundle (INT64 or BYTES), not {tensor.datatype}"
                )
            if len(shape) == 2 and shape[1] == 1:
                shape = shape[:1]
            if len(shape) != 1 or not 1 <= shape[0] <= max(model.max_batch_size, 1):
                raise InvalidArgument(
                    f"entity key '{name}': shape {_dims_text(list(tensor.shape))} must be "
                    f"[rows] or [rows,1] with 1..{max(model.max_batch_size, 1)} rows"
                )
            spec = TensorSpec(name, BY_WIRE[tensor.datatype], ())
        else:
            _check_shape(spec, shape, model)
        feeds[name] = _array(tensor, raw[index] if raw else None, spec, shape)
        if rows == -1:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidArgument(
                f"input '{name}': {shape[0]} rows differ from the {rows} of the other inputs"
            )
    others = [n for n in model.inputs if n != feature_input and n not in feeds]
    if others or not any(n not in model.inputs for n in feeds):
        raise InvalidArgument(
            f"model '{model.name}' expects '{feature_input}' or its entity keys"
            + (f", and {', '.join(repr(n) for n in others)}" if others else "")
        )
    _check_outputs(request, model)
    return feeds, rows, ("entity keys", tuple(feeds))


def _array(
    tensor: pb.ModelInferRequest.InferInputTensor,
    data: bytes | None,
    spec: TensorSpec,
    shape: tuple[int, ...],
) -> np.ndarray:
    """One input's values as an array of `shape` (raw bytes when `data` is given)."""
    name, datatype = spec.name, spec.datatype
    count = math.prod(shape)
    if data is None:
        return _typed(tensor, datatype.wire, count, shape, name, datatype.dtype)
    if datatype.is_bytes:
        return decode_bytes(data, count, name).reshape(shape)
    expected = count * datatype.dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input '{name}': {len(data)} bytes of raw data, but shape "
            f"{_dims_text(list(shape))} of {datatype.wire} needs {expected}"
        )
    return np.frombuffer(data, dtype=datatype.dtype).reshape(shape)


def _typed(
    tensor: pb.ModelInferRequest.InferInputTensor,
    wire: str,
    count: int,
    shape: tuple[int, ...],
    name: str,
    dtype: np.dtype,
) -> np.ndarray:
    field = CONTENTS_FIELD.get(wire)
    if field is None:
        raise InvalidArgument(
            f"input '{name}': {wire} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': {len(values)} values in contents.{field}, but shape "
            f"{_dims_text(list(shape))} needs {count}"
        )
    if wire == "BYTES":
        return to_bytes_elements(list(values), name).reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError):
        raise InvalidArgument(f"input '{name}': a value does not fit {wire}") from None


def encode_response(
    request: pb.ModelInferRequest,
    model: ModelVersion,
    outputs: Mapping[str, np.ndarray],
) -> pb.ModelInferResponse:
    """The outputs the request asked for (all when it named none): raw bytes when it sent
    raw inputs or an output has no typed field (FP16), typed contents otherwise."""
    names = [o.name for o in request.outputs] or list(model.outputs)
    raw = bool(request.raw_input_contents) or model.raw_only_outputs or not request.inputs
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=model.version, id=request.id
    )
    tensors = response.outputs
    for name in names:
        value = outputs[name]
        datatype = model.outputs[name].datatype
        tensor = tensors.add(name=name, datatype=datatype.wire, shape=value.shape)
        if raw:
            response.raw_output_contents.append(
                encode_bytes(value) if datatype.is_bytes else value.tobytes()
            )
        elif datatype.is_bytes:
            tensor.contents.bytes_contents.extend(
                v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value.ravel()
            )
        else:
            getattr(tensor.contents, CONTENTS_FIELD[datatype.wire]).extend(value.ravel().tolist())
    return response


def append_output(response: pb.ModelInferResponse, name: str, value: np.ndarray) -> None:
    """Adds a numeric tensor the model does not declare (e.g. feature statuses) in the
    form the response's other outputs took: raw bytes or typed contents."""
    datatype = {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}[value.dtype]
    tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
    if response.raw_output_contents:
        response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(value.ravel().tolist())
