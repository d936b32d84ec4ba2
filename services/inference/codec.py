"""KServe v2 tensors ↔ numpy, checked against a loaded model version.

Everything a request can get wrong is caught here, before it reaches the batcher, with a
message naming the tensor and what was expected; a malformed request therefore never
reaches ONNX Runtime nor shares a batch. Raw contents become numpy views without a copy.

A declared shape is a claim, not a size: before anything is allocated for a tensor, its
element count is checked against the data actually received (raw bytes: elements
times itemsize must equal their length, BYTES: at most one element per 4-byte length prefix;
typed contents: one value per element) and against `InputLimits`, whose setting each
refusal names. Messages echo what the caller sent only clipped (names, shapes), so a
hostile request cannot make a status message larger than gRPC's metadata limit.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inference import grpc_service_pb2 as pb
from modelplane.kernel.errors import InvalidArgument, clip
from modelplane.kserve_types import CONTENTS_FIELD
from modelplane.services.inference.datatypes import (
    BY_WIRE,
    decode_bytes,
    encode_bytes,
    to_bytes_elements,
)
from modelplane.services.inference.repository import ModelVersion, TensorSpec


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Per-request bounds, checked before allocation; the field names are the inference
    Settings' (and appear in the refusals)."""

    max_request_elements: int = 2**24
    max_request_bytes: int = 64 * 2**20
    max_bytes_element_length: int = 2**20
    max_rows_per_request: int = 65_536


DEFAULT_LIMITS = InputLimits()
UNLIMITED = InputLimits(2**62, 2**62, 2**62, 2**62)
MAX_SHOWN_DIMS = 8


class _Budget:
    """What one request's inputs add up to so far, against its limits."""

    __slots__ = ("bytes", "elements", "limits")

    def __init__(self, limits: InputLimits) -> None:
        self.limits = limits
        self.elements = 0
        self.bytes = 0

    def take(self, name: str, elements: int, size: int) -> None:
        limits = self.limits
        self.elements += elements
        self.bytes += size
        if self.elements > limits.max_request_elements:
            raise InvalidArgument(
                f"input '{clip(name)}': the request's inputs hold {self.elements} elements, "
                f"more than max_request_elements ({limits.max_request_elements})"
            )
        if self.bytes > limits.max_request_bytes:
            raise InvalidArgument(
                f"input '{clip(name)}': the request's inputs hold {self.bytes} bytes, "
                f"more than max_request_bytes ({limits.max_request_bytes})"
            )


def _dims_text(dims: Sequence[int | None]) -> str:
    shown = ",".join("-1" if d is None else clip(d, 20) for d in dims[:MAX_SHOWN_DIMS])
    if len(dims) > MAX_SHOWN_DIMS:
        shown += f",…({len(dims)} dims)"
    return "[" + shown + "]"


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
        f"input '{spec.name}': shape {_dims_text(shape)} does not match the model's {expected}"
    )


def _check_contents(request: pb.ModelInferRequest) -> None:
    raw = request.raw_input_contents
    tensors = request.inputs
    if not raw:
        return
    if len(raw) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs"
        )
    for tensor in tensors:
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"input '{clip(tensor.name)}' has typed contents, but the request sends "
                "raw_input_contents: send every input one way or the other"
            )


def _check_rows(name: str, rows: int, limits: InputLimits) -> None:
    if rows > limits.max_rows_per_request:
        raise InvalidArgument(
            f"input '{clip(name)}': {rows} rows, more than max_rows_per_request "
            f"({limits.max_rows_per_request})"
        )


def decode_inputs(
    request: pb.ModelInferRequest, model: ModelVersion, limits: InputLimits = DEFAULT_LIMITS
) -> tuple[dict[str, np.ndarray], int, Hashable]:
    """The request's inputs as arrays, its row count and its batching shape key."""
    specs = model.inputs
    tensors = request.inputs
    binding = model.feature_input
    if binding is not None and all(tensor.name != binding.input for tensor in tensors):
        return _decode_entity_keys(request, model, binding.input, limits)
    _check_contents(request)
    raw = request.raw_input_contents
    budget = _Budget(limits)
    feeds: dict[str, np.ndarray] = {}
    rows = 1
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected inference input '{clip(name)}' for model '{model.name}'; "
                f"it takes {clip(', '.join(repr(n) for n in specs), 200)}"
            )
        if name in feeds:
            raise InvalidArgument(f"input '{name}' appears more than once")
        datatype = spec.datatype
        if tensor.datatype != datatype.wire:
            raise InvalidArgument(
                f"input '{name}': datatype {clip(tensor.datatype) or '(empty)'} but model "
                f"'{model.name}' expects {datatype.wire}"
            )
        shape = tuple(tensor.shape)
        _check_shape(spec, shape, model)
        if model.max_batch_size > 0:
            _check_rows(name, shape[0], limits)
        feeds[name] = _array(tensor, raw[index] if raw else None, spec, shape, budget)
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
            f"missing {clip(', '.join(repr(n) for n in missing), 200)}"
        )
    _check_outputs(request, model)
    key: Hashable = None
    if model.variable_dims:
        key = tuple(feeds[n].shape[1:] for n in specs)
    return feeds, rows, key


def _check_outputs(request: pb.ModelInferRequest, model: ModelVersion) -> None:
    """Every requested output is the model's, and named once (a repeated name would be
    computed once and copied into the response again and again: refused, not merged, so
    the response has exactly the outputs asked for, in their order)."""
    seen: set[str] = set()
    for output in request.outputs:
        name = output.name
        if name not in model.outputs:
            raise InvalidArgument(
                f"unexpected inference output '{clip(name)}' for model '{model.name}'; "
                f"it has {clip(', '.join(repr(n) for n in model.outputs), 200)}"
            )
        if name in seen:
            raise InvalidArgument(f"output '{name}' is requested more than once")
        seen.add(name)


KEY_DATATYPES = ("INT64", "BYTES")


def _decode_entity_keys(
    request: pb.ModelInferRequest, model: ModelVersion, feature_input: str, limits: InputLimits
) -> tuple[dict[str, np.ndarray], int, Hashable]:
    """A request to an enriched model that sends entity keys in place of the feature
    input: every input that is not one of the model's is a join key column, INT64 or
    BYTES, shaped [rows] or [rows, 1]. Key requests batch only with requests sending
    the same key columns (the shape key), never with tensor requests."""
    tensors = request.inputs
    _check_contents(request)
    raw = request.raw_input_contents
    budget = _Budget(limits)
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
                    f"input '{clip(name)}': model '{model.name}' takes '{feature_input}' or "
                    "the entity keys of its feature bundle (INT64 or BYTES), not "
                    f"{clip(tensor.datatype)}"
                )
            if len(shape) == 2 and shape[1] == 1:
                shape = shape[:1]
            if len(shape) != 1 or not 1 <= shape[0] <= max(model.max_batch_size, 1):
                raise InvalidArgument(
                    f"entity key '{clip(name)}': shape {_dims_text(tensor.shape)} must be "
                    f"[rows] or [rows,1] with 1..{max(model.max_batch_size, 1)} rows"
                )
            spec = TensorSpec(name, BY_WIRE[tensor.datatype], ())
        else:
            _check_shape(spec, shape, model)
        _check_rows(name, shape[0], limits)
        feeds[name] = _array(tensor, raw[index] if raw else None, spec, shape, budget)
        if rows == -1:
            rows = shape[0]
        elif shape[0] != rows:
            raise InvalidArgument(
                f"input '{clip(name)}': {shape[0]} rows differ from the {rows} of the other inputs"
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
    budget: _Budget,
) -> np.ndarray:
    """One input's values as an array of `shape` (raw bytes when `data` is given). The
    declared element count is checked against the data received and the request's limits
    before anything of its size is allocated."""
    name, datatype = spec.name, spec.datatype
    count = math.prod(shape)  # a Python int: no overflow, no allocation
    if data is None:
        return _typed(tensor, datatype.wire, count, shape, name, datatype.dtype, budget)
    max_length = budget.limits.max_bytes_element_length
    if datatype.is_bytes:
        if count > len(data) // 4:
            raise InvalidArgument(
                f"input '{clip(name)}': shape {_dims_text(shape)} declares {count} BYTES "
                f"elements, but its {len(data)} bytes of raw data hold at most "
                f"{len(data) // 4} (each element has a 4-byte length prefix)"
            )
        budget.take(name, count, len(data))
        return decode_bytes(data, count, name, max_length).reshape(shape)
    expected = count * datatype.dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input '{clip(name)}': {len(data)} bytes of raw data, but shape "
            f"{_dims_text(shape)} of {datatype.wire} needs {expected}"
        )
    budget.take(name, count, expected)
    return np.frombuffer(data, dtype=datatype.dtype).reshape(shape)


def _typed(
    tensor: pb.ModelInferRequest.InferInputTensor,
    wire: str,
    count: int,
    shape: tuple[int, ...],
    name: str,
    dtype: np.dtype,
    budget: _Budget,
) -> np.ndarray:
    field = CONTENTS_FIELD.get(wire)
    if field is None:
        raise InvalidArgument(
            f"input '{clip(name)}': {wire} has no typed contents field; send it in "
            "raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{clip(name)}': {len(values)} values in contents.{field}, but shape "
            f"{_dims_text(shape)} needs {count}"
        )
    if wire == "BYTES":
        budget.take(name, count, sum(len(v) for v in values))
        return to_bytes_elements(
            list(values), name, budget.limits.max_bytes_element_length
        ).reshape(shape)
    budget.take(name, count, count * dtype.itemsize)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError):
        raise InvalidArgument(f"input '{clip(name)}': a value does not fit {wire}") from None


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
