"""GRPCInferenceService (KServe v2) on a synchronous grpc.server: proto → repository /
batcher → proto. Handler threads block on their request while a batcher worker runs it.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane import __version__
from modelplane.kernel.errors import InvalidArgument, ModelplaneError, Overloaded, status_for
from modelplane.services.inference import codec
from modelplane.services.inference.batcher import DynamicBatcher, PendingRequest, Unloading
from modelplane.services.inference.repository import ModelRepository, ModelVersion
from modelplane.services.inference.stats import StatsSnapshot

EXTENSIONS = ["model_repository", "model_configuration", "statistics", "schedule_policy"]
# A sync server reports "no deadline" as a deadline centuries away.
_NO_DEADLINE_S = 1e8


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

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.get(request.name, request.version)
        except ModelplaneError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="modelplane", version=__version__, extensions=EXTENSIONS
        )

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
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

    def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self._repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model.config)

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
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

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
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

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        _check_repository_name(request.repository_name)
        if request.parameters:
            raise InvalidArgument(
                "load parameters (config or file overrides) are not supported; edit the "
                "model's config.pbtxt in the repository"
            )
        self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_name(request.repository_name)
        self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference ------------------------------------------------------------------

    def _pending(
        self,
        request: pb.ModelInferRequest,
        model: ModelVersion,
        context: grpc.ServicerContext,
        received: int,
        callback: Callable[[PendingRequest], None] | None = None,
    ) -> PendingRequest:
        try:
            feeds, rows, key = codec.decode_inputs(request, model)
        except InvalidArgument:
            model.stats.request_failed(None, "invalid")
            raise
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining < _NO_DEADLINE_S else None
        parent = None
        if self._trace:
            parent = trace.get_current_span(
                extract(dict(context.invocation_metadata()))
            ).get_span_context()
            parent = parent if parent.is_valid else None
        return PendingRequest(
            feeds,
            rows,
            key,
            deadline=deadline,
            is_active=context.is_active,
            received_ns=received,
            callback=callback,
            tag=parent,
        )

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

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        model = self._repository.get(request.model_name, request.model_version)
        pending = self._pending(request, model, context, received)
        model = self._submit(request, model, pending)
        batcher = model.batcher
        # A cancelled call frees its queue slot at once instead of when a batch forms.
        context.add_callback(functools.partial(_on_call_end, batcher, pending))
        if not pending.wait(
            None if pending.deadline is None else pending.deadline - time.monotonic()
        ):
            batcher.withdraw(pending, "expired")
            pending.wait()
        pending.is_active = None  # drops the request ↔ call context cycle for the GC
        return codec.encode_response(request, model, pending.result())

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Requests of one stream are batched like any others, so responses come back in
        completion order; clients match them by `id`. A failed request yields a response
        with `error_message`; the stream itself stays open."""
        done: queue.SimpleQueue[tuple[pb.ModelInferRequest, ModelVersion | None, object]] = (
            queue.SimpleQueue()
        )
        submitted: list[int] = []

        def read() -> None:
            count = 0
            try:
                for request in request_iterator:
                    received = time.perf_counter_ns()
                    model: ModelVersion | None = None
                    try:
                        model = self._repository.get(request.model_name, request.model_version)
                        pending = self._pending(
                            request,
                            model,
                            context,
                            received,
                            callback=functools.partial(_deliver, done, request, model),
                        )
                        self._submit(request, model, pending)
                        count += 1
                    except Exception as exc:
                        done.put((request, model, exc))
            except Exception:  # the client went away mid-stream
                pass
            finally:
                submitted.append(count)
                done.put((pb.ModelInferRequest(), None, _END))

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        finished = 0
        ended = False
        while not (ended and finished == submitted[0]):
            request, model, outcome = done.get()
            if outcome is _END:
                ended = True
                continue
            if isinstance(outcome, PendingRequest):
                finished += 1
                try:
                    assert model is not None
                    response = codec.encode_response(request, model, outcome.result())
                except Exception as exc:
                    yield _stream_error(request, exc)
                    continue
                yield pb.ModelStreamInferResponse(infer_response=response)
            else:
                assert isinstance(outcome, BaseException)
                yield _stream_error(request, outcome)


_END = object()


def _on_call_end(batcher: DynamicBatcher, pending: PendingRequest) -> None:
    if pending.outputs is None and pending.error is None:
        expired = pending.deadline is not None and time.monotonic() >= pending.deadline
        batcher.withdraw(pending, "expired" if expired else "cancelled")


def _deliver(
    done: queue.SimpleQueue[tuple[pb.ModelInferRequest, ModelVersion | None, object]],
    request: pb.ModelInferRequest,
    model: ModelVersion,
    pending: PendingRequest,
) -> None:
    done.put((request, model, pending))


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
