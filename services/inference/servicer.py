"""GRPCInferenceService (KServe v2) on grpc.aio: proto → repository / batcher → proto.
A request waiting for its batch is a suspended coroutine, not a blocked thread.

For models served from the registry, a request that names no version is routed by the
model's route table (rollout policy); the response's `model_version` is the version that
computed it and its `route` parameter the alias that chose it. A mirrored (shadow) copy
runs beside the request and is compared once both finish; the caller never waits for it
and never sees its failure.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
import numpy as np
from opentelemetry import trace
from opentelemetry.propagate import extract

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane import __version__
from modelplane.kernel.errors import (
    InvalidArgument,
    ModelplaneError,
    clip,
    status_for,
)
from modelplane.services.inference import codec
from modelplane.services.inference.batcher import PendingRequest, Rejected, Unloading
from modelplane.services.inference.enrichment import FEATURE_STATUS, FEATURE_VALUES
from modelplane.services.inference.prediction_log import PredictionLog
from modelplane.services.inference.repository import ModelRepository, ModelVersion
from modelplane.services.inference.routing import Route, Shadow
from modelplane.services.inference.stats import RoutingMetrics, StatsSnapshot
from modelplane.services.inference.wire import Undecodable, bad_input_log

log = logging.getLogger("modelplane.inference.servicer")

EXTENSIONS = ["model_repository", "model_configuration", "statistics", "schedule_policy"]
ROUTING_KEY = "routing_key"
ROUTE = "route"
FEATURE_STATUSES = "feature_statuses"
"""Request parameter (bool): also return the statuses of the features an enriched
request used, as the INT32 [rows, features] output `feature_status` (FeatureStatus
numbers: 1 PRESENT, 2 NOT_FOUND, 3 NULL, 4 STALE)."""
FEATURE_STATUSES_OUTPUT = "feature_status"

Routed = Route[ModelVersion] | None


class ModelSource(Protocol):
    """Where models come from in registry mode (registry_follower.RegistryFollower)."""

    async def follow(self, model: str) -> None: ...

    async def unfollow(self, model: str) -> None: ...


def _routing_key(request: pb.ModelInferRequest) -> str | None:
    """The request's `routing_key` parameter as text (string or integer), if any."""
    parameters = request.parameters
    if ROUTING_KEY not in parameters:
        return None
    value = parameters[ROUTING_KEY]
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else str(getattr(value, kind))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        repository: ModelRepository,
        is_ready: Callable[[], bool],
        trace_requests: bool = False,
        routing_metrics: RoutingMetrics | None = None,
        follower: ModelSource | None = None,
        prediction_log: PredictionLog | None = None,
        limits: codec.InputLimits = codec.DEFAULT_LIMITS,
    ) -> None:
        """`follower`: in registry mode, what RepositoryModelLoad/Unload start and stop
        following (instead of loading from the repository directory). `prediction_log`:
        where successful predictions are recorded for the monitoring service. `limits`:
        per-request bounds checked before anything is allocated for a request."""
        self._repository = repository
        self._limits = limits
        self._is_ready = is_ready
        self._trace = trace_requests
        self._routing = routing_metrics
        self._follower = follower
        self._log = prediction_log
        self._shadow_tasks: set[asyncio.Future[None]] = set()

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
        table = self._repository.table(request.name)
        if table is None:
            return pb.ModelConfigResponse(config=model.config)
        config = type(model.config)()
        config.CopyFrom(model.config)
        aliases = [r.alias for r in table.routes if r.version is model]
        if table.shadow is not None and table.shadow.version is model:
            aliases.append(f"{table.shadow.alias} (shadow)")
        config.parameters["aliases"].string_value = ",".join(aliases)
        return pb.ModelConfigResponse(config=config)

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
        _check_model_name(request.model_name)
        if request.parameters:
            raise InvalidArgument(
                "load parameters (config or file overrides) are not supported; edit the "
                "model's config.pbtxt in the repository"
            )
        if self._follower is not None:
            await self._follower.follow(request.model_name)
        else:
            await self._repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        _check_repository_name(request.repository_name)
        if self._follower is not None:
            await self._follower.unfollow(request.model_name)
        else:
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
            feeds, rows, key = codec.decode_inputs(request, model, self._limits)
        except InvalidArgument as exc:
            model.stats.request_failed(None, "invalid")
            bad_input_log.warning("invalid request to %s: %s", model.name, clip(exc.message, 200))
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

    def _route(self, request: pb.ModelInferRequest) -> tuple[ModelVersion, Routed]:
        return self._repository.route(
            request.model_name, request.model_version, functools.partial(_routing_key, request)
        )

    def _submit(
        self,
        request: pb.ModelInferRequest,
        model: ModelVersion,
        route: Routed,
        pending: PendingRequest,
    ) -> tuple[ModelVersion, Routed]:
        """Queues a request; returns the version that took it (a reload or an alias move
        may swap it) and the route that chose it."""
        try:
            try:
                model.batcher.submit(pending)
            except Unloading:
                # Looked up just before a reload, an alias move or an unload swapped it
                # out: ask again once. Its inputs were checked against the old version; a
                # new version with another signature fails the request in the runtime.
                model, route = self._route(request)
                model.batcher.submit(pending)
        except Rejected as exc:
            model.stats.request_rejected(pending, exc.reason)
            raise
        if route is not None and self._routing is not None:
            self._routing.routed(model.name, route.alias)
        return model, route

    def _respond(
        self,
        request: pb.ModelInferRequest,
        model: ModelVersion,
        route: Routed,
        outputs: dict[str, np.ndarray],
    ) -> pb.ModelInferResponse:
        response = codec.encode_response(request, model, outputs)
        if route is not None:
            response.parameters[ROUTE].string_param = route.alias
        if model.feature_input is not None and FEATURE_STATUS in outputs:
            parameter = request.parameters.get(FEATURE_STATUSES)
            if parameter is not None and parameter.bool_param:
                codec.append_output(response, FEATURE_STATUSES_OUTPUT, outputs[FEATURE_STATUS])
        return response

    def _mirror(
        self, request: pb.ModelInferRequest, model: ModelVersion
    ) -> tuple[Shadow[ModelVersion], PendingRequest] | None:
        """Submits a copy of a request to the shadow version when it is in the mirrored
        share; any problem is counted, never raised."""
        table = self._repository.table(model.name)
        shadow = table.mirror() if table is not None else None
        if shadow is None:
            return None
        metrics = self._routing
        try:
            feeds, rows, key = codec.decode_inputs(request, shadow.version, self._limits)
            copy = PendingRequest(feeds, rows, key)
            shadow.version.batcher.submit(copy)
        except Exception:
            if metrics is not None:
                metrics.shadow(model.name, "dropped")
            return None
        return shadow, copy

    def _compare_later(
        self,
        model: ModelVersion,
        mirrored: tuple[Shadow[ModelVersion], PendingRequest],
        outputs: dict[str, np.ndarray],
    ) -> None:
        task = asyncio.ensure_future(self._compare(model, mirrored, outputs))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare(
        self,
        model: ModelVersion,
        mirrored: tuple[Shadow[ModelVersion], PendingRequest],
        outputs: dict[str, np.ndarray],
    ) -> None:
        shadow, copy = mirrored
        metrics = self._routing
        try:
            theirs = await shadow.version.batcher.outputs(copy)
        except (Exception, asyncio.CancelledError):
            if metrics is not None:
                metrics.shadow(model.name, "failed")
            return
        if metrics is not None:
            metrics.compare(model.name, outputs, theirs)

    def _log_prediction(
        self,
        request: pb.ModelInferRequest,
        response: pb.ModelInferResponse,
        model: ModelVersion,
        route: Routed,
        pending: PendingRequest,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """Hands a successful prediction to the prediction log (an O(1) append); a request
        without an id gets one in its response, the key its record is stored under."""
        assert self._log is not None
        inputs = pending.inputs
        names: tuple[str, ...] = ()
        binding = model.feature_input
        if binding is not None and FEATURE_VALUES in outputs:
            inputs = {binding.input: outputs[FEATURE_VALUES]}  # the tensor the model ran on
            names = binding.features
        try:
            request_id = self._log.record(
                model.name,
                model.version,
                route.alias if route is not None else "",
                request.id,
                pending.received_ns,
                inputs,
                outputs,
                pending.rows,
                pending.tag,
                names,
            )
        except Exception:  # the prediction stands whatever happens to its record
            log.exception("prediction log failed", extra={"model": model.name})
            return
        if not request.id:
            response.id = request_id

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        model, route = self._route(request)
        try:
            pending = self._pending(request, model, context, received)
            model, route = self._submit(request, model, route, pending)
            mirrored = self._mirror(request, model) if route is not None else None
            outputs = await model.batcher.outputs(pending)
        except BaseException:
            if self._log is not None:
                self._log.failed(model.name)
            raise
        if mirrored is not None:
            self._compare_later(model, mirrored, outputs)
        response = self._respond(request, model, route, outputs)
        if self._log is not None:
            self._log_prediction(request, response, model, route, pending, outputs)
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream are batched like any others, so responses come back in
        completion order; clients match them by `id`. A failed request, and a frame that
        cannot be decoded (wire.Undecodable), yields a response with `error_message`; the
        stream itself stays open, and every reply already due is sent."""
        done: asyncio.Queue[
            tuple[pb.ModelInferRequest, tuple[ModelVersion, Routed] | None, object]
        ] = asyncio.Queue()
        in_flight: dict[PendingRequest, ModelVersion] = {}

        def finished(
            request: pb.ModelInferRequest,
            model: ModelVersion,
            route: Routed,
            pending: PendingRequest,
            _: object,
        ) -> None:
            in_flight.pop(pending, None)
            done.put_nowait((request, (model, route), pending))

        async def read() -> None:
            try:
                async for frame in request_iterator:
                    received = time.perf_counter_ns()
                    if isinstance(frame, Undecodable):
                        error = InvalidArgument(frame.message)
                        done.put_nowait((pb.ModelInferRequest(), None, error))
                        continue
                    request = frame
                    try:
                        model, route = self._route(request)
                        pending = self._pending(request, model, context, received)
                        model, route = self._submit(request, model, route, pending)
                        assert pending.future is not None
                        in_flight[pending] = model
                        pending.future.add_done_callback(
                            functools.partial(finished, request, model, route, pending)
                        )
                    except Exception as exc:
                        done.put_nowait((request, None, exc))
            finally:
                done.put_nowait((pb.ModelInferRequest(), None, _END))

        reader = asyncio.ensure_future(read())
        ended = False
        try:
            while not (ended and not in_flight and done.empty()):
                request, routed, outcome = await done.get()
                if outcome is _END:
                    ended = True
                    if reader.done() and not reader.cancelled() and reader.exception():
                        return  # the client went away mid-stream
                    continue
                if isinstance(outcome, PendingRequest):
                    try:
                        assert routed is not None and outcome.future is not None
                        outputs = outcome.future.result()
                        response = self._respond(request, *routed, outputs)
                    except (Exception, asyncio.CancelledError) as exc:
                        yield _stream_error(request, exc)
                        continue
                    if self._log is not None:
                        self._log_prediction(request, response, *routed, outcome, outputs)
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
        # Echoes the request's identity so the client can match the error; a name past
        # MAX_NAME_CHARS is no model's (load refuses it) and is cut like any echo.
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name[:MAX_NAME_CHARS],
            model_version=request.model_version[:MAX_NAME_CHARS],
            id=request.id,
        ),
    )


def _check_repository_name(name: str) -> None:
    # One repository per server; Triton also accepts the empty name for "the" repository.
    if name not in ("", "default"):
        raise InvalidArgument(f"unknown repository '{clip(name)}'; this server has only one")


MAX_NAME_CHARS = 128
"""Longest model name RepositoryModelLoad accepts (a directory name, a registry name)."""


def _check_model_name(name: str) -> None:
    """A model name is one path component of printable characters: no separator, no NUL
    or control character, not `.`/`..`, at most MAX_NAME_CHARS long. Checked before the
    file system or the registry sees it (a NUL or a 300-character name made the path
    lookup itself fail, as INTERNAL)."""
    if not name:
        raise InvalidArgument("model_name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"model name '{clip(name)}' is longer than {MAX_NAME_CHARS} characters"
        )
    if not name.isprintable() or "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArgument(
            f"'{clip(name)}' is not a valid model name (one path component of printable characters)"
        )


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
