"""The request the load generator sends, built once from the model's metadata.

The message is serialized a single time; every call then sends the same bytes, so
the generator spends its CPU on gRPC, not on protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inference import grpc_service_pb2 as pb
from modelplane.kserve_types import RAW_DTYPES

# The numpy dtype of each datatype's raw bytes. bfloat16 has no numpy dtype; random
# 16-bit patterns would include NaNs, so BF16 data is made from FP32 values truncated to
# their top 16 bits.
NUMPY_DTYPES: dict[str, np.dtype] = {**RAW_DTYPES, "BF16": np.dtype("<u2")}


class PayloadError(ValueError):
    """The model's metadata does not allow building a request as asked."""


@dataclass(frozen=True)
class Payload:
    """One serialized ModelInferRequest and what it carries."""

    model_name: str
    model_version: str
    message: bytes
    rows: int
    shapes: dict[str, tuple[int, ...]]

    @property
    def size(self) -> int:
        return len(self.message)


def resolve_shape(
    name: str,
    shape: Sequence[int],
    batch_rows: int,
    override: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """The concrete shape to send: a leading -1 is the batch dimension (`batch_rows`),
    any other -1 becomes 1 unless the caller gave the whole shape."""
    if override is not None:
        if len(override) != len(shape):
            raise PayloadError(
                f"input {name!r}: shape override {list(override)} has {len(override)} "
                f"dimensions, the model declares {len(shape)} ({list(shape)})"
            )
        for declared, given in zip(shape, override, strict=True):
            if given < 0 or (declared >= 0 and given != declared):
                raise PayloadError(
                    f"input {name!r}: shape override {list(override)} does not fit the "
                    f"declared shape {list(shape)}"
                )
        return tuple(int(d) for d in override)
    if not shape:
        if batch_rows != 1:
            raise PayloadError(f"input {name!r} is a scalar; --batch-rows must be 1")
        return ()
    if shape[0] >= 0 and batch_rows != 1:
        raise PayloadError(
            f"input {name!r} has a fixed first dimension ({shape[0]}), so the model does "
            f"not batch; --batch-rows must be 1"
        )
    head = batch_rows if shape[0] < 0 else int(shape[0])
    return (head, *(1 if d < 0 else int(d) for d in shape[1:]))


def random_raw(datatype: str, shape: Sequence[int], rng: np.random.Generator) -> bytes:
    """Random data of a KServe datatype in its raw wire encoding."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        # Each element: 4-byte little-endian length, then the bytes.
        parts = []
        for length in rng.integers(1, 17, size=count):
            parts.append(int(length).to_bytes(4, "little"))
            parts.append(rng.integers(97, 123, size=int(length), dtype=np.uint8).tobytes())
        return b"".join(parts)
    if datatype not in NUMPY_DTYPES:
        raise PayloadError(f"unsupported datatype {datatype!r}")
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        values: np.ndarray = rng.integers(0, 2, size=count).astype(np.bool_)
    elif datatype == "BF16":
        values = (rng.standard_normal(count).astype("<f4").view("<u4") >> 16).astype("<u2")
    elif dtype.kind == "f":
        values = rng.standard_normal(count).astype(dtype)
    else:
        info = np.iinfo(dtype)
        # Small magnitudes: models often use integers as indices or counts.
        values = rng.integers(max(info.min, -100), min(info.max, 100), size=count, dtype=dtype)
    return values.tobytes()


def build_payload(
    metadata: pb.ModelMetadataResponse,
    batch_rows: int = 1,
    model_version: str = "",
    shape_overrides: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> Payload:
    """A ModelInferRequest with random inputs of the declared datatypes and shapes,
    all outputs requested (the server's default), data in raw_input_contents."""
    if batch_rows < 1:
        raise PayloadError("--batch-rows must be at least 1")
    if not metadata.inputs:
        raise PayloadError(f"model {metadata.name!r} declares no inputs")
    overrides = dict(shape_overrides or {})
    unknown = set(overrides) - {tensor.name for tensor in metadata.inputs}
    if unknown:
        raise PayloadError(f"shape given for unknown inputs: {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=metadata.name, model_version=model_version)
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in metadata.inputs:
        shape = resolve_shape(tensor.name, tensor.shape, batch_rows, overrides.get(tensor.name))
        shapes[tensor.name] = shape
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(random_raw(tensor.datatype, shape, rng))
    return Payload(
        model_name=metadata.name,
        model_version=model_version,
        message=request.SerializeToString(),
        rows=batch_rows,
        shapes=shapes,
    )
