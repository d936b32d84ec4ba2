"""The transport floor: a KServe v2 endpoint on the inference service's server stack
(the kernel's grpc.aio server on uvloop, its interceptors, health, reflection and GC
tuning) whose ModelInfer does no model work and answers every request with the same
one-row response.

`make bench` loads it exactly as it loads the real service. The server CPU per request
it measures is what gRPC and the server stack alone cost on the machine at hand, the
floor under every inference figure: the issue's CPU targets were set on one machine,
and machines differ by 2x and more, so a figure is read against the floor measured
beside it. Run: `python -m modelplane.loadtest.floor --port 0 --metrics-port 0`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import grpc

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.kernel.gc_tuning import SERVING_THRESHOLD, tune_gc
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL = "floor"


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Model `floor`: FP32 `input` [-1, inputs] → FP32 `output` [-1, outputs] (zeros)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        self._metadata = pb.ModelMetadataResponse(
            name=MODEL,
            versions=["1"],
            platform="none",
            inputs=[pb.ModelMetadataResponse.TensorMetadata(
                name="input", datatype="FP32", shape=[-1, inputs]
            )],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(
                name="output", datatype="FP32", shape=[-1, outputs]
            )],
        )  # fmt: skip
        self._response = pb.ModelInferResponse(
            model_name=MODEL,
            model_version="1",
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name="output", datatype="FP32", shape=[1, outputs]
                )
            ],
            raw_output_contents=[bytes(4 * outputs)],
        )

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self._metadata

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return self._response


def build(settings: ServiceSettings, inputs: int, outputs: int) -> AioServiceServer:
    # The methods it does not define answer UNIMPLEMENTED, as the generated base does.
    servicer = FloorServicer(inputs, outputs)  # type: ignore[abstract]

    def add_servicers(server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

    return AioServiceServer(settings, "floor", [SERVICE_NAME], add_servicers)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0 picks one)")
    parser.add_argument("--metrics-port", type=int, default=0, help="/metrics port")
    parser.add_argument("--inputs", type=int, default=64, help="features per input row")
    parser.add_argument("--outputs", type=int, default=8, help="values per output row")
    args = parser.parse_args(argv)
    settings = ServiceSettings.model_validate(
        {"port": args.port, "metrics_port": args.metrics_port, "log_level": "WARNING"}
    )
    server = build(settings, args.inputs, args.outputs)
    tune_gc(SERVING_THRESHOLD)  # after build, as `modelplane serve` does
    server.run()


if __name__ == "__main__":
    main()
