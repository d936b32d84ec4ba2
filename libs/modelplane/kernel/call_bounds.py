"""Bounds on how long a call may wait for its client: slow and idle clients cost a
coroutine for a bounded time, never a worker, and never lock others out.

- Request body: a call whose request message has not fully arrived within
  `request_body_timeout_s` of its start is ended with DEADLINE_EXCEEDED, whatever deadline
  the client set (a client's shorter deadline ends it sooner, in gRPC core). gRPC offers no
  server-side bound on that wait: a unary handler is only invoked once the message has
  arrived, and until then the call waits inside grpc without a timeout (a client that sends
  headers and never a body waits forever; core's connection age and idle arguments either
  cut legitimate long streams or do not apply while a call is open). So every method with a
  unary request is served here as one with a request stream (the same bytes on the wire):
  the handler starts at the headers and reads the single message under the bound.
- Client streams: a stream whose client sent no message for `stream_idle_timeout_s`, while
  the server sent nothing either, is ended with DEADLINE_EXCEEDED (a registry upload that
  stalls frees its slot and its partial file). Only waiting for the *client* counts: a
  server-streaming call (a registry or alert watch, waiting for events) is never idle.

Measured with grpcio 1.85 (no-op handler, sequential calls, a busy 2-core machine):
serving a unary method as a request stream plus its timer costs ~20-40 µs of server CPU
per call, beside ~300-450 for the call itself.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.kernel.interceptors import AioWrappingInterceptor

BODY_TIMED_OUT = "the request message did not arrive within {:g}s of the call's start"
STREAM_IDLE = "the client stream sent nothing for {:g}s"
NO_REQUEST = "the call carried no request message"


class _Activity:
    """When the server last sent a response on a streaming call (loop time)."""

    __slots__ = ("last_write",)

    def __init__(self) -> None:
        self.last_write = 0.0


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        timed_out = Counter(
            "modelplane_grpc_calls_timed_out",
            "Calls ended by the server for waiting on their client: 'request_body' (the "
            "request did not arrive in time) or 'stream_idle' (a client stream went quiet)",
            ["reason"],
            registry=registry,
        )
        self.body = timed_out.labels("request_body")
        self.idle = timed_out.labels("stream_idle")
        self.in_flight = 0
        Gauge(
            "modelplane_grpc_calls_in_flight",
            "Calls started and not yet ended, those still waiting for their request "
            "included (bounded by the setting max_concurrent_rpcs)",
            registry=registry,
        ).set_function(lambda: self.in_flight)


async def _bounded(
    awaitable: Awaitable[Any],
    context: grpc.aio.ServicerContext,
    timeout: float,
    message: str,
    counter: Counter,
    activity: _Activity | None = None,
) -> Any:
    """`await awaitable`, aborting the call with DEADLINE_EXCEEDED when it has not
    finished `timeout` seconds after it started (or after the server's last response, with
    `activity`). The wait is cut by cancelling this task, as asyncio.timeout does: cheaper
    than a task per read, and the status is sent from the task that serves the call."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    started = loop.time()
    expired = False
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal expired, timer
        due = max(started, activity.last_write if activity is not None else 0.0) + timeout
        if loop.time() < due:
            timer = loop.call_at(due, check)
            return
        expired = True
        task.cancel()

    timer = loop.call_at(started + timeout, check)
    try:
        return await awaitable
    except asyncio.CancelledError:
        # Cancelled by someone else too (the client went away): that cancellation wins.
        if expired and task.uncancel() == 0:
            counter.inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        raise
    finally:
        assert timer is not None
        timer.cancel()


class AioCallBoundsInterceptor(AioWrappingInterceptor):
    """Serves every method under the two bounds (see the module's docstring)."""

    def __init__(
        self,
        request_body_timeout_s: float,
        stream_idle_timeout_s: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._body_timeout = request_body_timeout_s
        self._idle_timeout = stream_idle_timeout_s
        self._body_message = BODY_TIMED_OUT.format(request_body_timeout_s)
        self._idle_message = STREAM_IDLE.format(stream_idle_timeout_s)
        self._metrics = _Metrics(registry)
        super().__init__(lambda handler, _method: self._wrap(handler))

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.unary_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_request(handler.unary_unary), parse, serialize
            )
        if handler.unary_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._unary_request_stream(handler.unary_stream), parse, serialize
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._request_stream(handler.stream_unary), parse, serialize
            )
        return grpc.stream_stream_rpc_method_handler(
            self._request_stream_stream(handler.stream_stream), parse, serialize
        )

    async def _read_body(self, context: grpc.aio.ServicerContext) -> Any:
        request = await _bounded(
            context.read(), context, self._body_timeout, self._body_message, self._metrics.body
        )
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_REQUEST)
        return request

    def _unary_request(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        metrics = self._metrics

        async def call(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.in_flight += 1
            try:
                return await behavior(await self._read_body(context), context)
            finally:
                metrics.in_flight -= 1

        return call

    def _unary_request_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        metrics = self._metrics
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write()
            return self._unary_request(behavior)

        async def stream(_requests: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.in_flight += 1
            try:
                async for response in behavior(await self._read_body(context), context):
                    yield response
            finally:
                metrics.in_flight -= 1

        return stream

    async def _idle_bounded(
        self,
        requests: AsyncIterable[Any],
        context: grpc.aio.ServicerContext,
        activity: _Activity | None,
    ) -> AsyncIterator[Any]:
        iterator = aiter(requests)
        end = object()
        while True:
            message = await _bounded(
                anext(iterator, end),
                context,
                self._idle_timeout,
                self._idle_message,
                self._metrics.idle,
                activity,
            )
            if message is end:
                return
            yield message

    def _request_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        metrics = self._metrics

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.in_flight += 1
            try:
                return await behavior(self._idle_bounded(requests, context, None), context)
            finally:
                metrics.in_flight -= 1

        return call

    def _request_stream_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        metrics = self._metrics
        if not inspect.isasyncgenfunction(behavior):  # writes with context.write()
            return self._request_stream(behavior)

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.in_flight += 1
            loop = asyncio.get_running_loop()
            activity = _Activity()
            try:
                bounded = self._idle_bounded(requests, context, activity)
                async for response in behavior(bounded, context):
                    activity.last_write = loop.time()
                    yield response
            finally:
                metrics.in_flight -= 1

        return stream
