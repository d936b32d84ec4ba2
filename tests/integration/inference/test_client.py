"""modelplane.client.InferenceClient against a real inference server over generated
models: what it returns is what ONNX Runtime itself computes on the same inputs."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelplane.client import CannotConnect, InferenceClient
from tests.integration.inference.models import NUMPY
from tests.integration.inference.served_models import BROKEN, onnx_runtime, served


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[InferenceClient]:
    with served(root) as address, InferenceClient(address, timeout=20.0) as client:
        yield client


def test_the_mlp_computes_what_onnx_runtime_computes(client: InferenceClient, root: Path) -> None:
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    prediction = client.predict("light", {"input": x}, request_id="r-1")
    expected = onnx_runtime(root, "light", {"input": x})
    assert prediction.model_name == "light" and prediction.model_version == "1"
    assert prediction.id == "r-1"
    assert prediction.route == ""  # a plain repository names no route
    assert list(prediction.outputs) == ["output"]
    np.testing.assert_allclose(
        prediction.outputs["output"], expected["output"], rtol=1e-5, atol=1e-6
    )


def _echo_inputs(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    inputs: dict[str, np.ndarray] = {}
    for wire, dtype in NUMPY.items():
        if wire == "BYTES":
            inputs[f"in_{wire}"] = np.array([[f"r{r}é", ""] for r in range(rows)], dtype=object)
        elif wire == "BOOL":
            inputs[f"in_{wire}"] = rng.integers(0, 2, (rows, 2)).astype(bool)
        elif np.dtype(dtype).kind == "f":
            inputs[f"in_{wire}"] = rng.standard_normal((rows, 2)).astype(dtype)
        else:
            info = np.iinfo(dtype)
            inputs[f"in_{wire}"] = np.array([[info.min, info.max]] * rows, dtype=dtype)
    return inputs


def test_every_datatype_matches_onnx_runtime(client: InferenceClient, root: Path) -> None:
    inputs = _echo_inputs(rows=3)
    prediction = client.predict("echo", inputs)
    # ONNX Runtime takes and returns string tensors as str; the client returns bytes.
    feeds = {name: a.astype(str) if a.dtype == object else a for name, a in inputs.items()}
    expected = onnx_runtime(root, "echo", feeds)
    assert set(prediction.outputs) == set(expected)
    for name, want in expected.items():
        got = prediction.outputs[name]
        wire = name.removeprefix("out_")
        assert prediction.datatypes[name] == wire
        if wire == "BYTES":
            assert [[v.decode() for v in row] for row in got.tolist()] == want.tolist()
        else:
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want)


def test_int64_in_fp32_out_and_only_the_outputs_asked_for(
    client: InferenceClient, root: Path
) -> None:
    index = np.array([[2], [0], [1]], dtype=np.int64)
    prediction = client.predict("lookup", {"index": index}, outputs=["value"])
    np.testing.assert_array_equal(
        prediction.outputs["value"], onnx_runtime(root, "lookup", {"index": index})["value"]
    )
    echo = client.predict("echo", _echo_inputs(rows=1), outputs=["out_INT64", "out_BYTES"])
    assert list(echo.outputs) == ["out_INT64", "out_BYTES"]


def test_a_routing_key_and_a_version_are_accepted(client: InferenceClient) -> None:
    x = np.ones((1, 4), np.float32)
    prediction = client.predict("row_sum", {"x": x}, version="1", routing_key="customer-7")
    assert prediction.model_version == "1"
    assert prediction.outputs["sum"].tolist() == [[4.0]]


def test_metadata_config_index_and_readiness(client: InferenceClient) -> None:
    metadata = client.metadata("lookup")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("index", "INT64", [-1, 1])
    ]
    config = client.config("light", "1")
    assert config.name == "light"
    index = {(m.name, m.version): m for m in client.index()}
    assert index[("light", "1")].state == "READY"
    broken = next(m for m in index.values() if m.name == BROKEN)
    assert broken.state == "UNAVAILABLE" and broken.reason
    assert {m.name for m in client.index(ready_only=True)} == {"echo", "light", "lookup", "row_sum"}
    assert client.ready("light") and client.ready("light", "1")
    assert not client.ready(BROKEN) and not client.ready("nope")


def test_the_servers_errors_come_back_as_they_are(client: InferenceClient) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        client.predict("nope", {"x": np.zeros((1, 1), np.float32)})
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in unknown.value.details()
    with pytest.raises(grpc.RpcError) as wrong_type:
        client.predict("lookup", {"index": np.zeros((1, 1), np.float32)})
    assert wrong_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INT64" in wrong_type.value.details()
    with pytest.raises(grpc.RpcError) as metadata:
        client.metadata("nope")
    assert metadata.value.code() == grpc.StatusCode.NOT_FOUND


def test_nothing_listening_fails_fast_with_cannot_connect() -> None:
    # A bound socket that never listens: connections to it are refused, and no other
    # process can take the port meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with InferenceClient(address, timeout=60.0, connect_timeout=1.0) as client:
            with pytest.raises(CannotConnect, match=f"cannot connect to {address}"):
                client.metadata("light")
            with pytest.raises(CannotConnect):
                client.predict("light", {"input": np.zeros((1, 64), np.float32)})
        assert time.monotonic() - start < 15.0
