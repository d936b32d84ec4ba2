"""KServe v2 details tritonclient.grpc never sends: typed `contents` (it always sends raw
bytes), malformed raw data, missing inputs, FP16 without raw bytes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from tests.integration.inference.conftest import fp32_request, serving
from tests.integration.inference.models import NUMPY

TYPED_VALUES = {
    "BOOL": ("bool_contents", [True, False]),
    "UINT8": ("uint_contents", [3, 250]),
    "UINT16": ("uint_contents", [3, 65000]),
    "UINT32": ("uint_contents", [3, 2**32 - 1]),
    "UINT64": ("uint64_contents", [2**40, 7]),
    "INT8": ("int_contents", [-3, 100]),
    "INT16": ("int_contents", [-3, 30000]),
    "INT32": ("int_contents", [-(2**31), 7]),
    "INT64": ("int64_contents", [-(2**40), 7]),
    "FP32": ("fp32_contents", [1.5, -2.0]),
    "FP64": ("fp64_contents", [1.5, -2.0]),
    "BYTES": ("bytes_contents", [b"ab", "é".encode()]),
}


def typed_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="typed")
    for wire, (field, values) in TYPED_VALUES.items():
        tensor = request.inputs.add(name=f"in_{wire}", datatype=wire, shape=[1, 2])
        getattr(tensor.contents, field).extend(values)
    return request


def test_typed_contents_in_typed_contents_out(repository):
    with serving(repository) as (_, stub):
        response = stub.ModelInfer(typed_request("echo_typed"))
    assert response.id == "typed"
    assert not response.raw_output_contents
    outputs = {t.name: t for t in response.outputs}
    assert set(outputs) == {f"out_{wire}" for wire in TYPED_VALUES}
    for wire, (field, values) in TYPED_VALUES.items():
        tensor = outputs[f"out_{wire}"]
        assert tensor.datatype == wire
        assert list(tensor.shape) == [1, 2]
        assert list(getattr(tensor.contents, field)) == values, wire


def test_fp16_needs_raw_bytes_and_the_error_says_so(repository):
    request = typed_request("echo")
    request.inputs.add(name="in_FP16", datatype="FP16", shape=[1, 2])
    with serving(repository) as (_, stub), pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'in_FP16'" in refused.value.details()
    assert "raw_input_contents" in refused.value.details()


def test_requested_outputs_only_are_returned(repository):
    request = typed_request("echo_typed")
    request.outputs.add(name="out_INT8")
    request.outputs.add(name="out_BYTES")
    with serving(repository) as (_, stub):
        response = stub.ModelInfer(request)
    assert [t.name for t in response.outputs] == ["out_INT8", "out_BYTES"]


def malformed_requests() -> list[tuple[str, pb.ModelInferRequest, str]]:
    x = np.zeros((2, 64), np.float32)
    short = fp32_request("light", x)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    missing = fp32_request("light", x)
    del missing.inputs[:]
    del missing.raw_input_contents[:]
    twice = fp32_request("light", x)
    twice.inputs.append(twice.inputs[0])
    twice.raw_input_contents.append(twice.raw_input_contents[0])
    extra_raw = fp32_request("light", x)
    extra_raw.raw_input_contents.append(b"")
    few_values = typed_request("echo_typed")
    del few_values.inputs[0].contents.bool_contents[1:]
    overflow = typed_request("echo_typed")
    overflow.inputs[5].contents.int_contents[1] = 1000  # INT8
    control = pb.ModelInferRequest(
        model_name="echo_typed",
        inputs=[*typed_request("echo_typed").inputs],
    )
    return [
        ("511 bytes", short, "'input'"),
        ("missing", missing, "'input'"),
        ("twice", twice, "'input'"),
        ("raw count", extra_raw, "raw_input_contents"),
        ("too few values", few_values, "'in_BOOL'"),
        ("overflow", overflow, "'in_INT8'"),
        ("control", control, ""),
    ]


def test_malformed_requests_are_invalid_arguments_naming_the_tensor(repository):
    with serving(repository) as (_, stub):
        for label, request, named in malformed_requests():
            if not named:
                stub.ModelInfer(request)  # the control case is accepted
                continue
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
            assert named in refused.value.details(), (label, refused.value.details())
        statistics = stub.ModelStatistics(pb.ModelStatisticsRequest(name="light"))
    assert statistics.model_stats[0].inference_stats.fail.count == 4
    assert statistics.model_stats[0].inference_count == 0


def test_bytes_with_a_bad_length_prefix_are_refused(repository):
    request = pb.ModelInferRequest(model_name="echo")
    raw = []
    for wire, dtype in NUMPY.items():
        request.inputs.add(name=f"in_{wire}", datatype=wire, shape=[1, 2])
        if wire == "BYTES":
            raw.append((5).to_bytes(4, "little") + b"abc")  # claims 5 bytes, has 3
        else:
            raw.append(np.zeros((1, 2), dtype).tobytes())
    request.raw_input_contents.extend(raw)
    with serving(repository) as (_, stub), pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'in_BYTES'" in refused.value.details()
