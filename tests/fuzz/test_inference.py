"""Fuzzing every RPC of the inference service (see tests/fuzz/harness.py for the property).

Besides the harness's three kinds (random bytes, random fields, mutated messages) for
every RPC of `inference.GRPCInferenceService`, ModelInfer and ModelStreamInfer get a
fourth, `tensors`: requests shaped like real ones for the models served (an FP32 MLP, a
BYTES echo with a variable dimension, an echo of every datatype), with random datatypes,
shapes (huge, negative, zero, many dims), raw contents of random and of matching
lengths, typed contents, parameters, names and requested outputs, so most of them get
past the first check and reach the deeper ones.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference import grpc_service_pb2 as pb
from modelplane.examples.models import mlp, write_model
from tests.fuzz import harness
from tests.integration.inference import models

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MLP, TEXT, ECHO = "mlp", "text", "echo"
MODELS = [MLP, TEXT, ECHO]
INPUTS = ["input", "text", *(f"in_{t}" for t in models.ECHO_TYPES)]
OUTPUTS = ["output", "same", *(f"out_{t}" for t in models.ECHO_TYPES)]
KNOWN = [*MODELS, "1", "2", "", *INPUTS[:2], *OUTPUTS[:2]]
DATATYPES = list(models.ECHO_TYPES)
# model → (input, datatype, width; 0 for a variable one)
SIGNATURES = {MLP: ("input", "FP32", 8), TEXT: ("text", "BYTES", 0)}
INFER_RPCS = [
    rpc for rpc in harness.rpcs(SERVICE) if rpc.name in ("ModelInfer", "ModelStreamInfer")
]
# The `tensors` kind gets as many cases per RPC as the harness gives one RPC over all
# its kinds: it is where the decoding logic lives.
TENSOR_EXAMPLES = harness.examples_per_test(SERVICE) * len(harness.KINDS)

_EDGE_DIMS = [-(2**63), -(2**31), -2, -1, 0, 1, 2, 3, 8, 64, 2**16, 2**24, 2**31 - 1, 2**40]
_EDGE_DIMS += [2**62, 2**63 - 1]
_ITEM_SIZE = {t: np.dtype(n).itemsize for t, n in models.NUMPY.items() if t != "BYTES"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.FuzzTarget]:
    """The server runs as its own process, so its RSS is measured alone: hypothesis in
    the test process keeps hundreds of MiB of generated cases over 12,000 of them."""
    root = tmp_path_factory.mktemp("inference-fuzz") / "models"
    _write_models(root)
    data = tmp_path_factory.mktemp("inference-fuzz-data")
    log = (data / "server.log").open("w+")
    command = [sys.executable, "-m", "modelplane.cli.main", "serve", "inference"]
    command += ["--model-repository", str(root), "--port", "0", "--data-dir", str(data)]
    environment = {**os.environ, "MODELPLANE_INFERENCE_LOG_LEVEL": "ERROR"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=log, text=True, env=environment
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            log.seek(0)
            pytest.fail(f"server did not start: {log.read()[-3000:]}")
        serving = json.loads(line)
        SERVER_PID.append(process.pid)
        for fuzz_target in harness.open_target(serving["address"], KNOWN):
            fuzz_target.rss_at_start = _server_rss(process.pid)
            yield fuzz_target
    finally:
        process.terminate()
        process.wait(30)
        log.close()


SERVER_PID: list[int] = []


def _server_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _write_models(root: Path) -> None:
    write_model(mlp((8, 16, 2), seed=1, name=MLP), root, MLP)
    write_model(models.text_echo(), root, TEXT)
    write_model(models.echo_all_types(), root, ECHO)


# ---- the `tensors` kind -----------------------------------------------------------------


def _shapes() -> st.SearchStrategy[list[int]]:
    dim = st.one_of(
        st.sampled_from(_EDGE_DIMS), st.integers(-3, 9), st.integers(-(2**63), 2**63 - 1)
    )
    usual = st.lists(dim, max_size=4)
    # A shape that fits the models, so the data checks come next.
    fitting = st.tuples(st.integers(1, 4), st.sampled_from([1, 2, 8])).map(list)
    many = st.integers(5, 100_000).flatmap(lambda n: st.just([1] * n) | st.just([2] * n))
    return st.one_of(fitting, fitting, usual, many)


def _bytes_elements(draw: st.DrawFn, count: int, honest: bool = False) -> bytes:
    """`count` BYTES elements in the wire encoding, sometimes with a lying length: a few
    drawn elements repeated (hypothesis remembers every choice of every case, so a case
    draws a few dozen values, not thousands: 12,000 cases otherwise grow RSS by 500 MiB
    in the test process alone)."""
    pattern = []
    for _ in range(draw(st.integers(1, 4))):
        item = draw(st.binary(max_size=16))
        length = len(item)
        if not honest and draw(st.integers(0, 19)) == 0:
            length = draw(st.sampled_from([2**31 - 1, 2**32 - 1, length + 1, 2**20 + 1]))
        pattern.append(struct.pack("<I", length) + item)
    return b"".join(pattern[i % len(pattern)] for i in range(count))


def _tiled(draw: st.DrawFn, size: int) -> bytes:
    """`size` bytes: a short drawn pattern repeated (see _bytes_elements)."""
    pattern = draw(st.binary(min_size=1, max_size=32))
    return (pattern * (size // len(pattern) + 1))[:size]


def _elements(shape: list[int]) -> int:
    elements = 1
    for d in shape:
        elements *= d
    return elements


def _raw(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    elements = _elements(shape)
    matching = 0 <= elements <= 4096 and len(shape) <= 8
    choice = draw(st.integers(0, 3))
    if matching and choice < 2:
        if datatype == "BYTES":
            return _bytes_elements(draw, elements)
        size = elements * _ITEM_SIZE.get(datatype, 4)
        if choice == 0:
            return _tiled(draw, size)
        return bytes(size)
    if choice == 2:
        return draw(st.binary(max_size=256))
    return b"\x00" * draw(st.sampled_from([1, 3, 4, 7, 1023, 2**16 + 1, 2**20]))


def _typed(draw: st.DrawFn, shape: list[int]) -> pb.InferTensorContents:
    contents = pb.InferTensorContents()
    elements = _elements(shape)
    count = elements if 0 <= elements <= 512 else draw(st.integers(0, 16))
    count += draw(st.sampled_from([0, 0, 0, 1, -1])) if count else 0
    field = draw(st.sampled_from(list(pb.InferTensorContents.DESCRIPTOR.fields_by_name)))
    values: st.SearchStrategy[object] = {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": st.integers(-(2**63), 2**63 - 1),
        "uint_contents": st.integers(0, 2**32 - 1),
        "uint64_contents": st.integers(0, 2**64 - 1),
        "fp32_contents": st.floats(width=32),
        "fp64_contents": st.floats(),
        "bytes_contents": st.binary(max_size=8),
    }[field]
    pattern = draw(st.lists(values, min_size=1, max_size=8))
    getattr(contents, field).extend(pattern[i % len(pattern)] for i in range(count))
    return contents


def _parameter(draw: st.DrawFn) -> pb.InferParameter:
    kind = draw(st.sampled_from(list(pb.InferParameter.DESCRIPTOR.fields_by_name)))
    value = {
        "bool_param": st.booleans(),
        "int64_param": st.integers(-(2**63), 2**63 - 1),
        "string_param": harness.names(KNOWN),
        "double_param": st.floats(),
        "uint64_param": st.integers(0, 2**64 - 1),
    }[kind]
    parameter = pb.InferParameter()
    setattr(parameter, kind, draw(value))
    return parameter


_PARAMETER_KEYS = [
    "routing_key",
    "feature_statuses",
    "binary_data",
    "binary_data_size",
    "classification",
    "sequence_id",
    "priority",
    "timeout",
    "",
]


def _parameters(draw: st.DrawFn, target: object) -> None:
    keys = st.one_of(st.sampled_from(_PARAMETER_KEYS), st.text(max_size=8))
    for key in draw(st.lists(keys, max_size=3)):
        target.parameters[key].CopyFrom(_parameter(draw))  # type: ignore[attr-defined]


def _mostly(known: list[str]) -> st.SearchStrategy[str]:
    """A known name three times in four, else any of the harness's hostile names (a
    plain one_of would flatten into the latter's many branches and rarely pick known)."""
    return st.integers(0, 3).flatmap(
        lambda n: st.sampled_from(known) if n else harness.names(KNOWN)
    )


@st.composite
def valid_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A request the MLP or the BYTES echo answers, with random parameters, ids and
    requested outputs (the model's own, perhaps repeated)."""
    model = draw(st.sampled_from(sorted(SIGNATURES)))
    name, datatype, width = SIGNATURES[model]
    shape = [draw(st.integers(1, 4)), width or draw(st.integers(1, 6))]
    request = pb.ModelInferRequest(model_name=model, id=draw(st.text(max_size=16)))
    _parameters(draw, request)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    elements = _elements(shape)
    if datatype == "BYTES":
        request.raw_input_contents.append(_bytes_elements(draw, elements, honest=True))
    else:
        request.raw_input_contents.append(_tiled(draw, elements * _ITEM_SIZE[datatype]))
    _parameters(draw, tensor)
    output = OUTPUTS[0] if model == MLP else OUTPUTS[1]
    for _ in range(draw(st.integers(0, 3))):
        _parameters(draw, request.outputs.add(name=output))
    return request


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    if draw(st.integers(0, 3)) == 0:
        return draw(valid_requests())
    request = pb.ModelInferRequest(
        model_name=draw(_mostly(MODELS)),
        model_version=draw(st.sampled_from(["", "", "", "1", "1", "2", "-1", "x" * 300, "\x00"])),
        id=draw(st.one_of(st.text(max_size=16), st.integers(0, 50_000).map(lambda n: "i" * n))),
    )
    _parameters(draw, request)
    raw = draw(st.integers(0, 3)) > 0
    odd_types = st.sampled_from(["", "fp32", "STRING", "FP8", "\U0001f600"])
    signature = SIGNATURES.get(request.model_name)
    for _ in range(draw(st.integers(0, 3))):
        datatype = draw(st.one_of(st.sampled_from(DATATYPES), odd_types))
        if request.model_name == ECHO and draw(st.booleans()):
            name = f"in_{datatype}"
        else:
            name = draw(_mostly(INPUTS))
        shape = draw(_shapes())
        if signature is not None and draw(st.booleans()):
            # The model's own input, so checks past the first pass and some calls succeed.
            name, datatype, width = signature
            shape = [draw(st.integers(1, 4)), width or draw(st.integers(1, 6))]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        _parameters(draw, tensor)
        if raw:
            request.raw_input_contents.append(_raw(draw, datatype, shape))
        elif draw(st.integers(0, 4)):
            tensor.contents.CopyFrom(_typed(draw, shape))
    if draw(st.integers(0, 9)) == 0:  # both ways at once, or raw entries not matching inputs
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
        if request.inputs:
            request.inputs[0].contents.fp32_contents.append(1.0)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(_mostly(OUTPUTS))
        output = request.outputs.add(name=name)
        _parameters(draw, output)
    if request.outputs and draw(st.integers(0, 9)) == 0:
        request.outputs.extend([request.outputs[0]] * draw(st.integers(2, 2_000)))
    return request


def tensor_frames(rpc: harness.Rpc) -> st.SearchStrategy[list[bytes]]:
    frame = infer_requests().map(lambda m: m.SerializeToString())
    mixed = st.one_of(frame, frame, frame, st.binary(max_size=64))
    if rpc.method.client_streaming:
        return st.lists(mixed, max_size=5)
    return frame.map(lambda f: [f])


# ---- the tests --------------------------------------------------------------------------


test_every_answer_is_a_proper_status = harness.proper_status_test(SERVICE)


@pytest.fixture(scope="module")
def loaded(target: harness.FuzzTarget) -> harness.FuzzTarget:
    """The target with every model loaded again: the harness's cases, which run first,
    send RepositoryModelUnload too."""
    load = target.channel.unary_unary(
        f"/{SERVICE.full_name}/RepositoryModelLoad",
        request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
        response_deserializer=pb.RepositoryModelLoadResponse.FromString,
    )
    for model in MODELS:
        load(pb.RepositoryModelLoadRequest(model_name=model), timeout=60)
    return target


@pytest.mark.parametrize("rpc", INFER_RPCS, ids=lambda rpc: f"{rpc.name}-tensors")
@settings(harness.fuzz_settings(SERVICE), max_examples=TENSOR_EXAMPLES)
@given(data=st.data())
def test_every_tensor_request_gets_a_proper_status(
    loaded: harness.FuzzTarget, rpc: harness.Rpc, data: st.DataObject
) -> None:
    frames = data.draw(tensor_frames(rpc), label="frames")
    answer = harness.call_raw(loaded.channel, rpc, frames)
    harness.check_answer(rpc, answer)
    if rpc.method.client_streaming and answer.code == grpc.StatusCode.OK:
        # Every frame is answered, an undecodable or invalid one with an error reply.
        assert answer.replies == min(len(frames), harness.STREAM_REPLIES_READ)


def test_the_server_still_serves_after_fuzzing(target: harness.FuzzTarget) -> None:
    print(harness.tally_report(SERVICE))
    harness.assert_healthy(target.channel)
    channel = target.channel
    load = channel.unary_unary(
        f"/{SERVICE.full_name}/RepositoryModelLoad",
        request_serializer=pb.RepositoryModelLoadRequest.SerializeToString,
        response_deserializer=pb.RepositoryModelLoadResponse.FromString,
    )
    infer = channel.unary_unary(
        f"/{SERVICE.full_name}/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    # The fuzzer may have unloaded the model (RepositoryModelUnload is an RPC like any).
    load(pb.RepositoryModelLoadRequest(model_name=MLP), timeout=60)
    x = np.ones((2, 8), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 8])
    request = pb.ModelInferRequest(
        model_name=MLP, inputs=[tensor], raw_input_contents=[x.tobytes()]
    )
    reply = infer(request, timeout=30)
    assert list(reply.outputs[0].shape) == [2, 2]
    growth = _server_rss(SERVER_PID[-1]) - target.rss_at_start
    assert growth < harness.MAX_RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.0f} MiB"
