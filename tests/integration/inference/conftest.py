"""An in-process inference server over a generated repository, with a gate in front of
ONNX Runtime so a test can hold every instance busy and know exactly what is queued.

These tests talk through the service's own generated stubs: tritonclient's stubs use
the same protobuf package (`inference`) and cannot share a process with the server's;
test_tritonclient.py runs the server as a separate process for them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.examples.models import LIGHT_MLP, mlp, write_model
from modelplane.services.inference.batcher import Tensors
from modelplane.services.inference.main import InferenceServer, Settings, build
from modelplane.services.inference.repository import Runtime, ort_runtime
from modelplane.services.inference.runtime import ProviderChoice
from tests.integration.inference import models
from tests.support import running_aio_in_thread

WAIT = 20.0


class Gate:
    """Open by default (warm-up passes); when closed, the next batch to reach the
    runtime blocks inside it until `open()`. Records the rows of every batch run
    since it was first closed."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        self.rows: list[int] = []
        self._lock = threading.Lock()
        self._armed = False

    def close(self) -> None:
        self._armed = True
        self.entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def factory(self, path: Path, providers: ProviderChoice, threads: int) -> Runtime:
        return GatedRuntime(ort_runtime(path, providers, threads), self)


class GatedRuntime:
    def __init__(self, inner: Runtime, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate
        self.provider = inner.provider
        self.inputs = inner.inputs
        self.outputs = inner.outputs

    def __call__(self, feeds: Tensors) -> dict[str, np.ndarray]:
        gate = self._gate
        if not gate._open.is_set():
            gate.entered.set()
            assert gate._open.wait(WAIT)
        if gate._armed:
            with gate._lock:
                gate.rows.append(len(next(iter(feeds.values()))))
        return self._inner(feeds)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(mlp(LIGHT_MLP, seed=3, name="light"), root, "light")
    write_model(models.echo_all_types(), root, "echo")
    # FP16 has no typed `contents` field in KServe v2; this echo takes typed requests.
    write_model(models.echo_all_types(leave_out=("FP16",)), root, "echo_typed")
    write_model(models.row_sum(), root, "row_sum")
    write_model(models.lookup(), root, "lookup")
    return root


@contextmanager
def serving(
    repository: Path, gate: Gate | None = None, **settings: object
) -> Iterator[tuple[InferenceServer, pb_grpc.GRPCInferenceServiceStub]]:
    config = Settings(
        model_repository=repository, port=0, log_json=False, log_level="WARNING", **settings
    )  # type: ignore[arg-type]
    server = build(config, gate.factory if gate else ort_runtime)
    assert isinstance(server, InferenceServer)
    with running_aio_in_thread(server) as address, grpc.insecure_channel(address) as channel:
        yield server, pb_grpc.GRPCInferenceServiceStub(channel)


def fp32_request(model: str, x: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[np.ascontiguousarray(x, dtype=np.float32).tobytes()],
    )


def output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    dtype = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16}[tensor.datatype]
    return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(
        list(tensor.shape)
    )
