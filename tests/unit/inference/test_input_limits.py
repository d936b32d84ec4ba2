"""Requests are checked against the bytes received and InputLimits before anything of
their declared size is allocated; what the messages echo is clipped (issue #17)."""

from __future__ import annotations

import logging
import time
import tracemalloc
from typing import Any, cast

import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.kernel.errors import InvalidArgument, clip
from modelplane.kernel.logs import RateLimitedLog
from modelplane.services.inference import codec, wire
from modelplane.services.inference.codec import UNLIMITED, InputLimits
from modelplane.services.inference.datatypes import BY_WIRE, decode_bytes, encode_bytes
from modelplane.services.inference.repository import ModelVersion, TensorSpec


def model(inputs: dict[str, tuple[str, tuple[int | None, ...]]], batch: int = 64) -> ModelVersion:
    specs = {n: TensorSpec(n, BY_WIRE[w], dims) for n, (w, dims) in inputs.items()}
    return ModelVersion(
        name="m",
        version="1",
        max_batch_size=batch,
        inputs=specs,
        outputs={"y": TensorSpec("y", BY_WIRE["FP32"], (1,))},
        variable_dims=True,
        raw_only_outputs=False,
        provider="cpu",
        config=cast(Any, None),
        batcher=cast(Any, None),
        stats=cast(Any, None),
    )


TEXT = model({"text": ("BYTES", (None,))})
FLOATS = model({"x": ("FP32", (None,))})


def request(name: str, wire_type: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="m",
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=wire_type, shape=shape)],
        raw_input_contents=[raw],
    )


def refusal(req: pb.ModelInferRequest, m: ModelVersion, limits: InputLimits = UNLIMITED) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument) as refused:
            codec.decode_inputs(req, m, limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated before the refusal"
    return refused.value.message


@pytest.mark.parametrize("shape", [[64, 2**24], [1, 2**40], [64, 2**62]])
def test_bytes_shape_beyond_the_data_is_refused_before_allocation_even_without_limits(shape):
    raw = encode_bytes(np.array(["0123456789abcdef0123456789ab"], dtype=object))
    message = refusal(request("text", "BYTES", shape, raw), TEXT)
    assert "4-byte length prefix" in message
    assert len(message) < 300


def test_decode_bytes_itself_refuses_a_count_its_data_cannot_hold():
    with pytest.raises(InvalidArgument, match="hold at most 1"):
        decode_bytes(b"\x00\x00\x00\x00", 2**40, "t")


def test_fixed_size_shape_beyond_the_data_is_refused_before_allocation():
    message = refusal(request("x", "FP32", [1, 2**40], b"\x00" * 16), FLOATS)
    assert "needs" in message


def test_typed_contents_beyond_the_values_sent_are_refused_before_allocation():
    req = pb.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name="x", datatype="FP32", shape=[1, 2**40])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    assert "values in contents" in refusal(req, FLOATS)


@pytest.mark.parametrize(
    ("limits", "req", "setting"),
    [
        (
            InputLimits(max_request_elements=8),
            request("x", "FP32", [1, 16], b"\x00" * 64),
            "max_request_elements",
        ),
        (
            InputLimits(max_request_bytes=32),
            request("x", "FP32", [1, 16], b"\x00" * 64),
            "max_request_bytes",
        ),
        (
            InputLimits(max_rows_per_request=2),
            request("x", "FP32", [4, 1], b"\x00" * 16),
            "max_rows_per_request",
        ),
        (
            InputLimits(max_bytes_element_length=3),
            request("text", "BYTES", [1, 1], encode_bytes(np.array(["abcd"], dtype=object))),
            "max_bytes_element_length",
        ),
    ],
)
def test_each_limit_is_named_in_its_refusal(limits, req, setting):
    m = TEXT if req.inputs[0].name == "text" else FLOATS
    assert setting in refusal(req, m, limits)


def test_typed_bytes_elements_are_held_to_their_length_limit():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(
        b"x" * 10
    )
    assert "max_bytes_element_length" in refusal(req, TEXT, InputLimits(max_bytes_element_length=4))


def test_requests_within_the_limits_decode():
    feeds, rows, _ = codec.decode_inputs(
        request("x", "FP32", [2, 3], np.ones((2, 3), np.float32).tobytes()), FLOATS
    )
    assert rows == 2 and feeds["x"].shape == (2, 3)
    texts = np.array(["a", "bc"], dtype=object)
    feeds, _, _ = codec.decode_inputs(request("text", "BYTES", [1, 2], encode_bytes(texts)), TEXT)
    assert feeds["text"].tolist() == [["a", "bc"]]


def test_typed_and_raw_contents_together_are_refused():
    req = request("x", "FP32", [1, 1], b"\x00" * 4)
    req.inputs[0].contents.fp32_contents.append(1.0)
    assert "raw_input_contents" in refusal(req, FLOATS)


def test_duplicate_requested_outputs_are_refused():
    req = request("x", "FP32", [1, 1], b"\x00" * 4)
    for _ in range(1000):
        req.outputs.add(name="y")
    assert "more than once" in refusal(req, FLOATS)


def test_huge_shapes_and_names_are_clipped_in_messages():
    req = request("x", "FP32", [1] * 100_000, b"")
    assert len(refusal(req, FLOATS)) < 300
    req = request("n" * 10_000, "FP32", [1, 1], b"\x00" * 4)
    assert len(refusal(req, FLOATS)) < 300


def test_clip_cuts_long_values_and_escapes_control_characters():
    assert clip("short") == "short"
    cut = clip("x" * 10_000)
    assert cut.startswith("x" * 64) and "10000 chars" in cut and len(cut) < 100
    assert clip("a\x00b") == "a\\x00b"
    assert "\n" not in clip("a\nb" * 100)


def test_undecodable_frames_become_markers_not_exceptions(caplog):
    parse = wire._parse(pb.ModelInferRequest)
    good = pb.ModelInferRequest(model_name="m").SerializeToString()
    assert isinstance(parse(good), pb.ModelInferRequest)
    with caplog.at_level(logging.WARNING):
        bad = parse(b"\xff\xff\xff\xff")
    assert isinstance(bad, wire.Undecodable)
    assert "could not be decoded as inference.ModelInferRequest" in bad.message
    assert not any(r.exc_info for r in caplog.records)


def test_bad_input_log_is_rate_limited_and_counts_what_it_left_out(caplog):
    logger = logging.getLogger("test.rate_limited")
    limited = RateLimitedLog(logger, interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="test.rate_limited"):
        for _ in range(100):
            limited.warning("bad %s", "input")
        assert len(caplog.records) == 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(caplog.records) == 1:
            time.sleep(0.06)  # ok-sleep: the limiter is a clock; waiting past its interval
            limited.warning("bad %s", "input")
    assert len(caplog.records) == 2
    assert "99 more left out" in caplog.records[1].getMessage()
