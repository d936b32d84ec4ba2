"""The inference client's tensor encoding, its request and response shapes, and which
calls it retries, without a server."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.client.inference import (
    DATATYPES,
    InferenceClient,
    TensorError,
    datatype_of,
    decode_tensor,
    encode_tensor,
    infer_request,
    prediction_of,
)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, np.inf, 3.25e38]], dtype=np.float32),
    "FP64": np.array([[-1.5, np.nan, 1e308]], dtype=np.float64),
    "BYTES": np.array([[b"ab", b"", "\xe9t\xe9".encode()]], dtype=object),
}


def test_every_supported_datatype_has_a_sample() -> None:
    assert set(SAMPLES) == set(DATATYPES)


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_round_trip(datatype: str) -> None:
    array = SAMPLES[datatype]
    wire, raw = encode_tensor(array)
    assert wire == datatype
    back = decode_tensor(wire, array.shape, raw)
    assert back.shape == array.shape
    if datatype == "BYTES":
        assert back.dtype == object and back.tolist() == array.tolist()
    else:
        assert back.dtype == array.dtype
        np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("datatype", sorted(set(SAMPLES) - {"BYTES", "BOOL"}))
def test_raw_bytes_are_little_endian_whatever_the_array_order(datatype: str) -> None:
    array = SAMPLES[datatype]
    swapped = array.astype(array.dtype.newbyteorder(">"))
    assert encode_tensor(swapped)[1] == array.astype(array.dtype.newbyteorder("<")).tobytes()


def test_bytes_are_length_prefixed_and_text_is_utf8() -> None:
    _, raw = encode_tensor(np.array(["é", "xy"]))
    assert raw == struct.pack("<I", 2) + "é".encode() + struct.pack("<I", 2) + b"xy"
    # str, bytes and object arrays are all BYTES; they decode as bytes, as tritonclient's do.
    assert datatype_of(np.array([b"a"])) == datatype_of(np.array(["a"])) == "BYTES"
    assert decode_tensor("BYTES", [2], raw).tolist() == ["é".encode(), b"xy"]


def test_a_scalar_round_trips() -> None:
    wire, raw = encode_tensor(np.float32(2.5))
    assert decode_tensor(wire, [], raw) == np.float32(2.5)


def test_what_cannot_be_encoded_or_decoded_says_why() -> None:
    with pytest.raises(TensorError, match="complex128"):
        encode_tensor(np.array([1j]))
    with pytest.raises(TensorError, match="str or bytes"):
        encode_tensor(np.array([1, "a"], dtype=object))
    with pytest.raises(TensorError, match="needs 12"):
        decode_tensor("FP32", [3], b"\0" * 8)
    with pytest.raises(TensorError, match="beyond"):
        decode_tensor("BYTES", [1], struct.pack("<I", 5) + b"ab")
    with pytest.raises(TensorError, match="more than 1"):
        decode_tensor("BYTES", [1], struct.pack("<I", 0) + b"extra")
    with pytest.raises(TensorError, match="BF16"):
        decode_tensor("BF16", [1], b"\0\0")


def test_request_carries_inputs_outputs_version_and_routing_key() -> None:
    request = infer_request(
        "m",
        {"x": np.zeros((2, 3), np.float32), "s": np.array([["a"], ["b"]])},
        version="4",
        routing_key="customer-7",
        outputs=["y"],
        request_id="r1",
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "4", "r1")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("x", "FP32", [2, 3]),
        ("s", "BYTES", [2, 1]),
    ]
    assert len(request.raw_input_contents) == 2
    assert [o.name for o in request.outputs] == ["y"]
    assert request.parameters["routing_key"].string_param == "customer-7"
    assert "routing_key" not in infer_request("m", {"x": np.zeros(1)}).parameters


def test_response_raw_or_typed_with_version_and_route() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="3", id="r1")
    response.outputs.add(name="y", datatype="INT64", shape=[2])
    response.raw_output_contents.append(np.array([5, -6], "<i8").tobytes())
    response.parameters["route"].string_param = "canary"
    prediction = prediction_of(response)
    assert prediction.model_version == "3" and prediction.route == "canary"
    assert prediction.id == "r1" and prediction.datatypes == {"y": "INT64"}
    assert prediction.outputs["y"].tolist() == [5, -6]

    typed = pb.ModelInferResponse(model_name="m", model_version="1")
    out = typed.outputs.add(name="s", datatype="BYTES", shape=[1, 2])
    out.contents.bytes_contents.extend([b"a", b"b"])
    out = typed.outputs.add(name="b", datatype="BOOL", shape=[2])
    out.contents.bool_contents.extend([True, False])
    prediction = prediction_of(typed)
    assert prediction.route == ""
    assert prediction.outputs["s"].tolist() == [[b"a", b"b"]]
    assert prediction.outputs["b"].tolist() == [True, False]


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "try again"


class _FlakyStub:
    """Fails each method `failures` times with UNAVAILABLE, then answers; records
    every call's deadline."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, list[float]] = {}

    def _method(self, name: str, answer: object):  # type: ignore[no-untyped-def]
        def call(request: object, timeout: float, metadata: object = ()) -> object:
            calls = self.calls.setdefault(name, [])
            calls.append(timeout)
            if len(calls) <= self.failures:
                raise _Unavailable()
            return answer

        return call

    @property
    def ModelMetadata(self):  # type: ignore[no-untyped-def]
        return self._method("ModelMetadata", pb.ModelMetadataResponse(name="m"))

    @property
    def ModelInfer(self):  # type: ignore[no-untyped-def]
        return self._method("ModelInfer", pb.ModelInferResponse(model_name="m"))


def test_reads_retry_unavailable_within_the_deadline_and_inference_never_retries() -> None:
    with InferenceClient("127.0.0.1:1", timeout=30.0, connect_timeout=None) as client:
        stub = _FlakyStub(failures=2)
        client.stub = stub  # type: ignore[assignment]
        assert client.metadata("m").name == "m"
        deadlines = stub.calls["ModelMetadata"]
        assert len(deadlines) == 3
        # One deadline covers every attempt: each gets what is left of it.
        assert (
            deadlines[0] <= 30.0 and deadlines[1] <= deadlines[0] and deadlines[2] <= deadlines[1]
        )
        with pytest.raises(grpc.RpcError):
            client.predict("m", {"x": np.zeros((1, 1), np.float32)})
        assert len(stub.calls["ModelInfer"]) == 1


def test_a_read_gives_up_when_the_deadline_is_spent() -> None:
    with InferenceClient("127.0.0.1:1", timeout=0.3, connect_timeout=None) as client:
        stub = _FlakyStub(failures=10**6)
        client.stub = stub  # type: ignore[assignment]
        with pytest.raises(grpc.RpcError):
            client.metadata("m")
        assert len(stub.calls["ModelMetadata"]) >= 2  # retried, then out of time
