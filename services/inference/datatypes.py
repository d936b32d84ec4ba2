"""Tensor element types under their three names: KServe v2 wire datatype, numpy dtype and
ONNX Runtime type string; plus the BYTES wire encoding (4-byte little-endian length prefix)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from modelplane.kernel.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Datatype:
    """One element type: `wire` is the KServe name, `dtype` the numpy one (object for
    BYTES), `config` the name of Triton's DataType enum value in a model configuration."""

    wire: str
    dtype: np.dtype
    onnx: str
    config: str

    @property
    def is_bytes(self) -> bool:
        return self.wire == "BYTES"


_TYPES = (
    Datatype("BOOL", np.dtype(np.bool_), "tensor(bool)", "TYPE_BOOL"),
    Datatype("UINT8", np.dtype(np.uint8), "tensor(uint8)", "TYPE_UINT8"),
    Datatype("UINT16", np.dtype(np.uint16), "tensor(uint16)", "TYPE_UINT16"),
    Datatype("UINT32", np.dtype(np.uint32), "tensor(uint32)", "TYPE_UINT32"),
    Datatype("UINT64", np.dtype(np.uint64), "tensor(uint64)", "TYPE_UINT64"),
    Datatype("INT8", np.dtype(np.int8), "tensor(int8)", "TYPE_INT8"),
    Datatype("INT16", np.dtype(np.int16), "tensor(int16)", "TYPE_INT16"),
    Datatype("INT32", np.dtype(np.int32), "tensor(int32)", "TYPE_INT32"),
    Datatype("INT64", np.dtype(np.int64), "tensor(int64)", "TYPE_INT64"),
    Datatype("FP16", np.dtype(np.float16), "tensor(float16)", "TYPE_FP16"),
    Datatype("FP32", np.dtype(np.float32), "tensor(float)", "TYPE_FP32"),
    Datatype("FP64", np.dtype(np.float64), "tensor(double)", "TYPE_FP64"),
    Datatype("BYTES", np.dtype(np.object_), "tensor(string)", "TYPE_STRING"),
)

BY_WIRE = {t.wire: t for t in _TYPES}
BY_ONNX = {t.onnx: t for t in _TYPES}

_LENGTH = struct.Struct("<I")


def from_onnx(onnx_type: str, tensor: str) -> Datatype:
    """The datatype of an ONNX Runtime input or output; unsupported types fail the load."""
    try:
        return BY_ONNX[onnx_type]
    except KeyError:
        raise InvalidArgument(
            f"tensor '{tensor}' has type {onnx_type}, which KServe v2 cannot carry"
        ) from None


MAX_ELEMENT_LENGTH_SETTING = "max_bytes_element_length"


def decode_bytes(raw: bytes, count: int, tensor: str, max_length: int | None = None) -> np.ndarray:
    """Parses `count` length-prefixed elements into an object array of str (ONNX string
    tensors hold UTF-8 text; ONNX Runtime would stringify bytes objects as "b'..'").

    `count` comes from a shape the caller declared: it is checked against what `raw` can
    hold (each element has a 4-byte length prefix) before anything is allocated."""
    if count > len(raw) // _LENGTH.size:
        raise InvalidArgument(
            f"input '{tensor}': its shape declares {count} BYTES elements, but its "
            f"{len(raw)} bytes of raw data hold at most {len(raw) // _LENGTH.size} "
            "(each element has a 4-byte length prefix)"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    end = len(raw)
    try:
        for index in range(count):
            if offset + 4 > end:
                raise InvalidArgument(
                    f"input '{tensor}': BYTES data holds fewer than the {count} elements "
                    "its shape implies"
                )
            (length,) = _LENGTH.unpack_from(view, offset)
            offset += 4
            if max_length is not None and length > max_length:
                raise InvalidArgument(
                    f"input '{tensor}': BYTES element {index} has {length} bytes, more than "
                    f"{MAX_ELEMENT_LENGTH_SETTING} ({max_length})"
                )
            if offset + length > end:
                raise InvalidArgument(
                    f"input '{tensor}': BYTES element {index} claims {length} bytes "
                    "beyond the end of the data"
                )
            out[index] = str(view[offset : offset + length], "utf-8")
            offset += length
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"input '{tensor}': BYTES element {index} is not UTF-8 text "
            "(ONNX string tensors hold text)"
        ) from None
    if offset != end:
        raise InvalidArgument(
            f"input '{tensor}': BYTES data holds more than the {count} elements its shape implies"
        )
    return out


def encode_bytes(array: np.ndarray) -> bytes:
    """Serializes an array of str/bytes elements with 4-byte little-endian length prefixes."""
    parts: list[bytes] = []
    for item in array.ravel():
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def to_bytes_elements(
    values: list[bytes] | np.ndarray, tensor: str, max_length: int | None = None
) -> np.ndarray:
    """Typed `bytes_contents` (a list of bytes) as an object array of str."""
    out = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        if max_length is not None and len(value) > max_length:
            raise InvalidArgument(
                f"input '{tensor}': BYTES element {index} has {len(value)} bytes, more than "
                f"{MAX_ELEMENT_LENGTH_SETTING} ({max_length})"
            )
        try:
            out[index] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise InvalidArgument(
                f"input '{tensor}': BYTES element {index} is not UTF-8 text "
                "(ONNX string tensors hold text)"
            ) from None
    return out
