"""Writes ONNX files of any size without holding them in memory: the protobuf framing
is encoded by hand around one large initializer whose bytes are streamed to disk.
Used by the large-transfer test and by bench/registry.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from onnx import TensorProto, helper

from modelplane.examples.models import IR_VERSION, OPSET

_CHUNK = 1024 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # length-delimited


def write_large_onnx(path: Path, payload_bytes: int) -> str:
    """A model `output = input + weights` whose weights hold `payload_bytes` (a multiple
    of 4) random bytes; returns the file's SHA-256."""
    count = payload_bytes // 4
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "weights"], ["output"])],
        "large",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", count])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", count])],
    )
    model = helper.make_model(helper.make_graph([], "x", [], []))
    model.ClearField("graph")
    model.ir_version = IR_VERSION
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", OPSET))
    tensor_head = TensorProto(
        name="weights", dims=[count], data_type=TensorProto.FLOAT
    ).SerializeToString()
    raw_len = count * 4
    raw_head = _key(9) + _varint(raw_len)
    tensor_len = len(tensor_head) + len(raw_head) + raw_len
    initializer_head = _key(5) + _varint(tensor_len)
    graph_bytes = graph.SerializeToString()
    graph_len = len(graph_bytes) + len(initializer_head) + tensor_len
    head = (
        model.SerializeToString()
        + _key(7)
        + _varint(graph_len)
        + graph_bytes
        + initializer_head
        + tensor_head
        + raw_head
    )
    digest = hashlib.sha256(head)
    with open(path, "wb") as f:
        f.write(head)
        remaining = raw_len
        block = os.urandom(_CHUNK)
        index = 0
        while remaining:
            # Vary each chunk cheaply so the file is not one repeated block.
            chunk = index.to_bytes(8, "little") + block[8 : min(_CHUNK, remaining)]
            chunk = chunk[: min(_CHUNK, remaining)]
            f.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
            index += 1
    return digest.hexdigest()
