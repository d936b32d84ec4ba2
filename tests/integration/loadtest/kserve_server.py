"""A small but real KServe v2 server for testing the load generator: it implements
ModelMetadata and ModelInfer with numpy (row sums), validates what it receives, and
can reject, delay or burn CPU on purpose."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import numpy as np

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.kernel.errors import InvalidArgument, NotFound, Overloaded
from modelplane.kernel.server import SyncServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.support import running_sync

MODEL = "rowsum"
FEATURES = 4
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass
class Behaviour:
    reject_every: int = 0  # every n-th request fails with UNAVAILABLE
    delay_s: float = 0.0  # sleep before answering (for deadline tests)
    burn_cpu_s: float = 0.0  # CPU each request spends (for CPU accounting tests)


class RowSumServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.received = 0
        self.rows = 0
        self._lock = threading.Lock()

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        if request.name != MODEL:
            raise NotFound(f"unknown model {request.name!r}")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL,
            versions=["1"],
            platform="numpy",
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, FEATURES])],
            outputs=[tensor(name="output", datatype="FP32", shape=[-1, 1])],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        with self._lock:
            self.received += 1
            number = self.received
        every = self.behaviour.reject_every
        if every and number % every == 0:
            raise Overloaded("Exceeds maximum queue size")
        if request.model_name != MODEL:
            raise NotFound(f"unknown model {request.model_name!r}")
        if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
            raise InvalidArgument("expected one input in raw_input_contents")
        tensor = request.inputs[0]
        raw = request.raw_input_contents[0]
        if tensor.name != "input" or tensor.datatype != "FP32":
            raise InvalidArgument(f"expected FP32 'input', got {tensor.datatype} {tensor.name!r}")
        if len(tensor.shape) != 2 or tensor.shape[1] != FEATURES:
            raise InvalidArgument(f"'input' shape {list(tensor.shape)}, expected [-1, {FEATURES}]")
        rows = tensor.shape[0]
        if len(raw) != rows * FEATURES * 4:
            raise InvalidArgument(f"'input' has {len(raw)} bytes, expected {rows * FEATURES * 4}")
        values = np.frombuffer(raw, dtype="<f4").reshape(rows, FEATURES)
        if self.behaviour.burn_cpu_s:
            started = time.thread_time()
            while time.thread_time() - started < self.behaviour.burn_cpu_s:
                pass
        if self.behaviour.delay_s:
            time.sleep(self.behaviour.delay_s)  # ok-sleep: simulated model latency
        with self._lock:
            self.rows += rows
        out = values.sum(axis=1, keepdims=True, dtype=np.float32)
        return pb.ModelInferResponse(
            model_name=MODEL,
            model_version="1",
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name="output", datatype="FP32", shape=[rows, 1]
                )
            ],
            raw_output_contents=[out.tobytes()],
        )


@dataclass
class RunningServer:
    address: str
    metrics_url: str
    servicer: RowSumServicer


@contextmanager
def rowsum_server(behaviour: Behaviour | None = None) -> Iterator[RunningServer]:
    """Serves on port 0 with a Prometheus endpoint (the kernel's MetricsServer)."""
    servicer = RowSumServicer(behaviour or Behaviour())
    settings = ServiceSettings(
        port=0, metrics_port=0, tracing_enabled=False, log_json=False, log_level="WARNING"
    )
    server = SyncServiceServer(
        settings,
        "rowsum",
        [SERVICE_NAME],
        lambda s: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, s),
        max_workers=16,
    )
    with running_sync(server) as address:
        yield RunningServer(
            address=address,
            metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics",
            servicer=servicer,
        )
