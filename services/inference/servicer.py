"""GRPCInferenceService (KServe v2) on grpc.aio: proto → repository / batcher → proto.
A request waiting for its batch is a suspended coroutine, not a blocked thread.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane import __version__
from modelplane.kernel.errors import InvalidArgument, ModelplaneError, Overloaded, status_for
from modelplane.services.inference import codec
from modelplane.services.inference.batcher import PendingRequest, Unloading
from modelplane.services.inference.repository import ModelRepository, ModelVersion
from modelplane.services.inference.stats import StatsSnapshot

EXTENSIONS = ["model_repository", "model_configuration", "statistics", "schedule_policy"]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        is_ready: Callable[[], bool],
        trace_requests: bool = False,
    ) -> None:
        self._repository = repository
        self._is_ready = is_ready
        self._trace = trace_requests

    # --- health and metadata ------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except ModelplaneError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="modelplane", version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self._repository.get(request.name, request.version)
        versions = sorted((v.version for v in self._repository.versions(request.name)), key=int)
        batch = [-1] if model.max_batch_size > 0 else []
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform="onnxruntime_onnx",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name,
                    datatype=s.datatype.wire,
                    shape=[*batch, *(d if d is not None else -1 for d in s.dims)],
                )
                for s in model.inputs.values()
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name,
                    datatype=s.datatype.wire,
                    shape=[*batch, *(d if d is not None else -1 for d in s.dims)],
                )
                for s in model.outputs.values()
            ],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            if request.version:
                models = [self._repository.get(request.name, request.version)]
            else:
                models = self._repository.versions(request.name)
        else:
            models = self._repository.loaded()
        return pb.ModelStatisticsResponse(
            model_stats=[_statistics(m.name, m.version, m.stats.snapshot()) for m in models]
        )

    # --- repository ---------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        _check_repository_name(request.repository_name)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in self._repository.index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository_name(request.repository_name)
        if request.parameters:
            raise InvalidArgument(
                "load parameters (config or file overrides) are not supported; edit the "
                "model's config.pbtxt in the repository"
            )
        await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_name(request.repository_name)
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference ------------------------------------------------------------------

    def _pending(
        self,
        request: pb.ModelInferRequest,
        model: ModelVersion,
        context: grpc.aio.ServicerContext,
        received: int,
    ) -> PendingRequest:
        try:
            feeds, rows, key = codec.decode_inputs(request, model)
        except InvalidArgument:
            model.stats.request_failed(None, "invalid")
            raise
        remaining = context.time_remaining()  # None: the call has no deadline
        deadline = None if remaining is None else time.monotonic() + remaining
        parent = None
        if self._trace:
            parent = trace.get_current_span(
                extract(dict(context.invocation_metadata() or ()))
            ).get_span_context()
            parent = parent if parent.is_valid else None
        return PendingRequest(feeds, rows, key, deadline=deadline, received_ns=received, tag=parent)

    def _submit(
        self, request: pb.ModelInferRequest, model: ModelVersion, pending: PendingRequest
    ) -> ModelVersion:
        """Queues a request; returns the version that took it (a reload may swap it)."""
        try:
            model.batcher.submit(pending)
        except Overloaded:
            model.stats.request_failed(pending, "rejected")
            raise
        except Unloading:
            # Looked up just before a reload or unload swapped it out: ask again once.
            model = self._repository.get(request.model_name, request.model_version)
            model.batcher.submit(pending)
        return model

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        model = self._repository.get(request.model_name, request.model_version)
        pending = self._pending(request, model, context, received)
        model = self._submit(request, model, pending)
        outputs = await model.batcher.outputs(pending)
        return codec.encode_response(request, model, outputs)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream are batched like any others, so responses come back in
        completion order; clients match them by `id`. A failed request yields a response
        with `error_message`; the stream itself stays open."""
        done: asyncio.Queue[tuple[pb.ModelInferRequest, ModelVersion | None, object]] = (
            asyncio.Queue()
        )
        in_flight: dict[PendingRequest, ModelVersion] = {}

        def finished(
            request: pb.ModelInferRequest, model: ModelVersion, pending: PendingRequest, _: object
        ) -> None:
            in_flight.pop(pending, None)
            done.put_nowait((request, model, pending))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    received = time.perf_counter_ns()
                    model: ModelVersion | None = None
                    try:
                        model = self._repository.get(request.model_name, request.model_version)
                        pending = self._pending(request, model, context, received)
                        model = self._submit(request, model, pending)
                        assert pending.future is not None
                        in_flight[pending] = model
                        pending.future.add_done_callback(
                            functools.partial(finished, request, model, pending)
                        )
                    except Exception as exc:
                        done.put_nowait((request, model, exc))
            finally:
                done.put_nowait((pb.ModelInferRequest(), None, _END))

        reader = asyncio.ensure_future(read())
        ended = False
        try:
            while not (ended and not in_flight and done.empty()):
                request, model, outcome = await done.get()
                if outcome is _END:
                    ended = True
                    if reader.done() and not reader.cancelled() and reader.exception():
                        return  # the client went away mid-stream
                    continue
                if isinstance(outcome, PendingRequest):
                    try:
                        assert model is not None and outcome.future is not None
                        response = codec.encode_response(request, model, outcome.future.result())
                    except (Exception, asyncio.CancelledError) as exc:
                        yield _stream_error(request, exc)
                        continue
                    yield pb.ModelStreamInferResponse(infer_response=response)
                else:
                    assert isinstance(outcome, BaseException)
                    yield _stream_error(request, outcome)
        finally:
            reader.cancel()
            for pending, model in list(in_flight.items()):
                model.batcher.withdraw(pending)


_END = object()


def _stream_error(request: pb.ModelInferRequest, exc: BaseException) -> pb.ModelStreamInferResponse:
    _, message = status_for(exc, "ModelStreamInfer")
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )


def _check_repository_name(name: str) -> None:
    # One repository per server; Triton also accepts the empty name for "the" repository.
    if name not in ("", "default"):
        raise InvalidArgument(f"unknown repository '{name}'; this server has only one")


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=ns)


def _statistics(name: str, version: str, s: StatsSnapshot) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success.count, s.success.ns),
            fail=_duration(s.fail.count, s.fail.ns),
            queue=_duration(s.queue.count, s.queue.ns),
            compute_input=_duration(s.compute_input.count, s.compute_input.ns),
            compute_infer=_duration(s.compute_infer.count, s.compute_infer.ns),
            compute_output=_duration(s.compute_output.count, s.compute_output.ns),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input.count, b.compute_input.ns),
                compute_infer=_duration(b.compute_infer.count, b.compute_infer.ns),
                compute_output=_duration(b.compute_output.count, b.compute_output.ns),
            )
            for size, b in s.batches.items()
        ],
    )
