"""Server bootstrap shared by every service.

A service hands over its settings, its gRPC service names and a function that
adds its servicers; the bootstrap adds the standard health service, server
reflection, bounded message sizes (settings.max_message_bytes, 64 MiB), the
error-mapping and tracing interceptors and a Prometheus /metrics endpoint, and shuts
down gracefully: from the start of stop() new calls get UNAVAILABLE at once, health
flips to NOT_SERVING, and in-flight calls get the grace period to finish before gRPC
itself stops (see `_Drain`).

`AioServiceServer` (grpc.aio) serves every service: a call still waiting for its client
(a slow request body, an idle client stream) costs a coroutine for a bounded time
(`modelplane.kernel.call_bounds`), never a worker thread, so slow clients cannot starve
the others. Synchronous handlers (the feature service's) run on its `handler_threads`
once their request has arrived. `SyncServiceServer` (grpc.server with a thread pool)
costs a little less CPU per request for short handlers, but grpc takes a worker thread
for each call before its request arrives and waits for it without bound: a few clients
that send headers and no body hold every thread. No service uses it; it serves tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge

from modelplane.kernel.auth import RoleDenied, aio_auth_interceptors, sync_auth_interceptors
from modelplane.kernel.call_bounds import AioCallBoundsInterceptor
from modelplane.kernel.interceptors import (
    AioErrorInterceptor,
    AioWrappingInterceptor,
    SyncErrorInterceptor,
    WrappedHandlers,
    read_out,
    rewrap,
)
from modelplane.kernel.load_shedding import AioLoadShedInterceptor, Door, LoopLagShedder
from modelplane.kernel.logs import configure_logging
from modelplane.kernel.metrics import MetricsServer, new_registry
from modelplane.kernel.settings import ServiceSettings
from modelplane.kernel.telemetry import aio_tracing_interceptor, sync_tracing_interceptor
from modelplane.kernel.tls import server_credentials

log = logging.getLogger("modelplane.server")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
QUIET_S = 0.01
"""stop(): the pause in arrivals awaited before grpc's own stop (see _Drain): longer than
Python's thread switch interval (5 ms), which may keep a sync server's thread from taking
calls that long; shorter than the pause clients make between retries."""
QUIET_WAIT_S = 1.0
"""stop(): the longest wait for that pause (never past the grace period)."""
QUIET_POLL_S = 0.001
SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class _Drain:
    """What stop() drains. Once `begin()` runs, a call that arrives is answered
    UNAVAILABLE at once by the drain interceptors below (clients retry that elsewhere),
    while the listener stays open and the calls already running finish; only when
    they have (or the grace period ran out) does stop() hand over to grpc's own stop.
    Stopping grpc at once instead closes the listener while calls still arrive: one
    that reaches grpc core in that instant is CANCELLED by core (seen under load), which
    clients treat as final and services never count. Health checks are never refused
    (they answer NOT_SERVING), so load balancers watching them see the drain.

    Running calls are counted by a wrapper per method (one frame, one lock per call).

    Nor does grpc's stop wait for calls core holds that the server has not yet taken:
    it answers them CANCELLED. The server takes calls from core one at a time, so when
    callers send together (closed-loop clients resend together after a refusal) the rest
    of a burst waits in core meanwhile; `make chaos` saw 2-12 CANCELLED per SIGTERM of
    the inference service. So once the running calls finished, stop() also waits for a
    pause in arrivals (QUIET_S without a new call, at most QUIET_WAIT_S) before grpc's
    stop: callers that keep sending without pause can still meet it."""

    def __init__(self) -> None:
        self.started = False
        self._running = 0
        self._idle = threading.Condition()
        self._last_arrival = 0.0

    def begin(self) -> None:
        self._last_arrival = time.monotonic()
        self.started = True

    def refused(self) -> None:
        """A call arrived once the drain began (and is refused)."""
        self._last_arrival = time.monotonic()

    def _quiet_left(self, quiet_s: float) -> float:
        return self._last_arrival + quiet_s - time.monotonic()

    def _quiet_from_now(self) -> None:
        # A burst may be in core already, not yet taken: the pause counts from now.
        self._last_arrival = max(self._last_arrival, time.monotonic())

    def wait_quiet(self, quiet_s: float, timeout: float) -> bool:
        """Blocks until no call arrived for `quiet_s` (from now on) or `timeout` passed."""
        self._quiet_from_now()
        deadline = time.monotonic() + timeout
        while (left := self._quiet_left(quiet_s)) > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(left, QUIET_POLL_S))
        return True

    async def wait_quiet_async(self, quiet_s: float, timeout: float) -> bool:
        """wait_quiet for an event loop, which must keep taking (and refusing) calls."""
        self._quiet_from_now()
        deadline = time.monotonic() + timeout
        while (left := self._quiet_left(quiet_s)) > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(left, QUIET_POLL_S))
        return True

    def enter(self) -> None:
        with self._idle:
            self._running += 1

    def leave(self) -> None:
        with self._idle:
            self._running -= 1
            if self._running <= 0:
                self._idle.notify_all()

    @property
    def running(self) -> int:
        return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Blocks until no counted call runs or `timeout` passed; True when idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running <= 0, timeout)

    async def wait_idle_async(self, timeout: float) -> bool:
        """wait_idle for an event loop, which must keep running the calls it waits for."""
        deadline = time.monotonic() + timeout
        while self._running > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.005, left))
        return True


class AioDrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts running calls; once the server drains, answers UNAVAILABLE to every new
    call but health checks."""

    def __init__(self, drain: _Drain) -> None:
        self._drain = drain
        self._counted = WrappedHandlers(
            lambda handler, _method: rewrap(handler, lambda behavior, *_: self._count(behavior))
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _is_health(method):
            return handler
        if self._drain.started:
            self._drain.refused()
            return rewrap(handler, _refusal_aio)
        return self._counted.get(handler, method)

    def _count(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        drain = self._drain
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                drain.enter()
                try:
                    async for reply in behavior(request, context):
                        yield reply
                finally:
                    drain.leave()

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            drain.enter()
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                drain.leave()

        return call


def _refusal_aio(
    _behavior: Callable[..., Any], client_streaming: bool, _streaming: bool
) -> Callable[..., Any]:
    return _refuse_stream_aio if client_streaming else _refuse_aio


async def _refuse_aio(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


async def _refuse_stream_aio(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await read_out(requests)  # else its client may read INTERNAL, not UNAVAILABLE
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


class SyncDrainInterceptor(grpc.ServerInterceptor):
    """The synchronous server's AioDrainInterceptor."""

    def __init__(self, drain: _Drain) -> None:
        self._drain = drain
        self._counted = WrappedHandlers(lambda handler, _method: self._wrap(handler))

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _is_health(method):
            return handler
        if self._drain.started:
            self._drain.refused()
            return rewrap(handler, lambda *_: _refuse_sync)
        return self._counted.get(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        drain = self._drain

        def count(
            behavior: Callable[..., Any], _client_streaming: bool, streaming: bool
        ) -> Callable[..., Any]:
            if streaming:

                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    drain.enter()
                    try:
                        yield from behavior(request, context)
                    finally:
                        drain.leave()

                return stream

            def call(request: Any, context: grpc.ServicerContext) -> Any:
                drain.enter()
                try:
                    return behavior(request, context)
                finally:
                    drain.leave()

            return call

        return rewrap(handler, count)


def _refuse_sync(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


class _ThreadAbort(Exception):
    """context.abort() called by a synchronous handler in a thread: the call is aborted
    from the event loop, where grpc.aio's context lives."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class _ThreadContext:
    """What a synchronous handler running in a thread sees of its grpc.aio call: abort()
    raises (as the synchronous server's does); anything else is the call's own context,
    whose coroutine methods (read, write) a synchronous handler must not use."""

    __slots__ = ("_context",)

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise _ThreadAbort(code, details, trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _settle(future: asyncio.Future[Any], ok: bool, outcome: Any) -> None:
    if future.done():  # cancelled meanwhile: the client went away
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)


class HandlerThreads:
    """Threads that run synchronous handlers for an event loop. Lighter than
    loop.run_in_executor (no concurrent.futures.Future, no wrapping): the feature
    service's 1-entity read at 16 concurrent callers cost ~470 µs of server CPU per call
    this way against ~540 µs through a ThreadPoolExecutor (one CPU; inline on the loop,
    which blocking store calls must not be, ~455 µs). The queue holds at most the calls in
    flight (settings.max_concurrent_rpcs); its length is the metric
    modelplane_grpc_handler_queue."""

    _STOP = None

    def __init__(self, count: int, name: str, registry: CollectorRegistry | None) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()
        Gauge(
            "modelplane_grpc_handler_queue",
            "Calls whose request arrived, waiting for a handler thread",
            registry=registry,
        ).set_function(self._queue.qsize)

    def _work(self) -> None:
        while (job := self._queue.get()) is not self._STOP:
            loop, future, run, behavior, request, context = job
            try:
                outcome, ok = run(behavior, request, context), True
            except BaseException as exc:  # handed to the awaiting coroutine
                outcome, ok = exc, False
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_settle, future, ok, outcome)

    async def run(self, behavior: Callable[..., Any], request: Any, context: Any) -> Any:
        """behavior(request, context) on a thread, in a copy of the caller's context
        variables (principal, trace)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        run = contextvars.copy_context().run
        self._queue.put((loop, future, run, behavior, request, context))
        return await future

    def stop(self) -> None:
        """Lets each thread finish what it runs, then end."""
        for _ in self._threads:
            self._queue.put(self._STOP)


class AioThreadedHandlers(AioWrappingInterceptor):
    """Runs synchronous unary-unary handlers on HandlerThreads, once their request has
    arrived (the innermost interceptor: every other one sees a coroutine)."""

    def __init__(self, threads: HandlerThreads) -> None:
        self._threads = threads
        super().__init__(lambda handler, _method: rewrap(handler, self._wrap))

    def _wrap(
        self, behavior: Callable[..., Any], client_streaming: bool, server_streaming: bool
    ) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            return behavior
        if client_streaming or server_streaming:
            raise TypeError("only unary-unary handlers may be synchronous on AioServiceServer")
        threads = self._threads

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await threads.run(behavior, request, _ThreadContext(context))
            except _ThreadAbort as abort:
                await context.abort(abort.code, abort.details, abort.trailing_metadata)

        return call


def _is_health(method: str) -> bool:
    return method.startswith(f"/{HEALTH_SERVICE}/")


def grpc_options(settings: ServiceSettings, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """Channel options every server uses: the message-size bound, no port sharing unless
    asked."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Two servers must never silently share a port (SO_REUSEPORT); only the worker
        # processes of one supervisor do, which reserved the port for them.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Long-lived streams (registry watches) are kept alive by their clients' pings
        # (every 10 s from the inference service); accept them rather than answer with
        # GOAWAY, as grpc does by default for pings more often than every 5 minutes.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Overload (issue #17): see MAX_PENDING_CALLS.
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ]


MAX_PENDING_CALLS = 10_000
"""Calls grpc core may hold before the server asks for them. A grpc.aio server asks for
one call at a time, as fast as its event loop turns; past grpc's default of 1,000 held
calls core cancels new ones at random (all of them past 3,000): CANCELLED, never seen by
the service, so never counted, and rarely retried by clients. With 2,000 single-row
calls in flight on the inference service's heavy model, 1-10% ended so (measured). Above
this many, core still drops at random, then all calls past twice as many: the last guard
on memory; below it, overload is the services' to refuse (counted, with a retry hint)."""


def aio_server(
    settings: ServiceSettings,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """A grpc.aio server bounded in calls in flight (settings.max_concurrent_rpcs)."""
    return grpc.aio.server(
        interceptors=interceptors,
        options=grpc_options(settings, reuse_port),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )


class _ServiceServerBase:
    """What both server kinds share: identity, metrics, health bookkeeping."""

    def __init__(
        self,
        settings: ServiceSettings,
        name: str,
        service_names: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        configure_logging(name, settings.log_level, settings.log_json)
        self.settings = settings
        self.name = name
        self.service_names = list(service_names)
        self.registry = registry or new_registry()
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics: MetricsServer | None = None
        # True only in the worker processes of one supervisor (SO_REUSEPORT).
        self.reuse_port = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def _bind(self, server: grpc.Server | grpc.aio.Server) -> None:
        """Plaintext, or TLS with tls_cert_file + tls_key_file; with tls_client_ca_file too,
        clients must present a certificate that CA signed (mTLS). Only the gRPC port:
        the /metrics endpoint stays plain HTTP (bind it to a private interface)."""
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                port = server.add_insecure_port(self.settings.address)
            else:
                port = server.add_secure_port(self.settings.address, credentials)
        except RuntimeError as exc:  # grpc raises this when the address is taken
            raise OSError(f"{self.name}: cannot bind {self.settings.address}") from exc
        if port == 0:
            raise OSError(f"{self.name}: cannot bind {self.settings.address}")
        self.port = port

    def _start_metrics(self) -> None:
        if self.settings.metrics_port is not None:
            self._metrics = MetricsServer(
                self.registry, self.settings.host, self.settings.metrics_port
            )
            self.metrics_port = self._metrics.port

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def announce(self) -> None:
        """Prints one JSON line on stdout once serving, for whoever started the process
        (`modelplane up`, benchmarks) to learn the ports chosen for port 0."""
        line = {
            "event": "serving",
            "service": self.name,
            "address": self.address,
            "port": self.port,
            "metrics_port": self.metrics_port,
        }
        print(json.dumps(line), flush=True)

    def _log_started(self) -> None:
        log.info(
            "%s serving on %s",
            self.name,
            self.address,
            extra={"service": self.name, "port": self.port, "metrics_port": self.metrics_port},
        )


class AioServiceServer(_ServiceServerBase):
    """A grpc.aio server with the standard services around a service's servicers."""

    def __init__(
        self,
        settings: ServiceSettings,
        name: str,
        service_names: Sequence[str],
        add_servicers: Callable[[grpc.aio.Server], None],
        on_stop: Sequence[Callable[[], Awaitable[None]]] = (),
        registry: CollectorRegistry | None = None,
        on_role_denied: RoleDenied | None = None,
        handler_threads: int = 0,
        shedder: LoopLagShedder | None = None,
        shed_methods: Collection[str] = (),
        door: Door | None = None,
    ) -> None:
        """`handler_threads`: threads that run synchronous unary handlers (see
        AioThreadedHandlers); 0 when every handler is a coroutine. `shedder`: refuses a
        share of new calls to `shed_methods` while the event loop falls behind; `door`:
        refuses each of them at once while it gives a retry hint (load_shedding.py)."""
        super().__init__(settings, name, service_names, registry)
        self._shedder = shedder
        self._shed_methods = shed_methods
        self._door = door
        self._add_servicers = add_servicers
        self._on_stop = list(on_stop)
        self._on_role_denied = on_role_denied
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._drain = _Drain()
        self._bounds = AioCallBoundsInterceptor(
            settings.request_body_timeout_s, settings.stream_idle_timeout_s, self.registry
        )
        self._handler_threads = handler_threads
        self._threads: HandlerThreads | None = None

    async def start(self) -> int:
        """Binds, starts serving and marks every service SERVING; returns the port."""
        interceptors: list[grpc.aio.ServerInterceptor] = []
        interceptors.extend(
            aio_auth_interceptors(self.settings, self.registry, self._on_role_denied)
        )
        if self._shedder is not None or self._door is not None:
            # First after authentication: a refused call must cost as little as can be.
            interceptors.append(
                AioLoadShedInterceptor(self._shed_methods, self._shedder, self._door, self.registry)
            )
        # After authentication, which refuses a caller at its headers, before its body.
        interceptors.append(self._bounds)
        interceptors.append(AioDrainInterceptor(self._drain))
        if self.settings.spans_enabled:
            interceptors.append(aio_tracing_interceptor(self.name, self.settings.otlp_endpoint))
        interceptors.append(AioErrorInterceptor())
        if self._handler_threads > 0:
            self._threads = HandlerThreads(self._handler_threads, self.name, self.registry)
            interceptors.append(AioThreadedHandlers(self._threads))
        server = aio_server(self.settings, interceptors, self.reuse_port)
        self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server
        )
        self._bind(server)
        await server.start()
        self._server = server
        if self._shedder is not None:
            self._shedder.start()
        for service in ["", *self.service_names]:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._start_metrics()
        self._log_started()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Flips health to NOT_SERVING, refuses new calls, drains in-flight ones."""
        if self._server is None or self._stopped.is_set():
            return
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("%s shutting down (grace %.1fs)", self.name, grace)
        started = time.monotonic()
        self._drain.begin()
        await self.health.enter_graceful_shutdown()
        await self._drain.wait_idle_async(grace)
        left = grace - (time.monotonic() - started)
        await self._drain.wait_quiet_async(QUIET_S, min(QUIET_WAIT_S, left))
        await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self._shedder is not None:
            await self._shedder.stop()
        if self._threads is not None:
            self._threads.stop()
        for hook in self._on_stop:
            await hook()
        self._stop_metrics()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def run(self) -> None:
        """Serves until SIGTERM or SIGINT on uvloop: for the inference service it cost
        ~13% less CPU per request and ~0.1 ms less latency than asyncio's own loop
        (measured at 1 and 64 concurrent clients)."""
        uvloop.run(self.serve_until_signal())

    async def serve_until_signal(self) -> None:
        """Starts, then runs until SIGTERM or SIGINT and shuts down gracefully."""
        await self.start()
        self.announce()
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await stop_requested.wait()
        await self.stop()


class SyncServiceServer(_ServiceServerBase):
    """A synchronous grpc.server (thread pool) with the same standard services."""

    def __init__(
        self,
        settings: ServiceSettings,
        name: str,
        service_names: Sequence[str],
        add_servicers: Callable[[grpc.Server], None],
        max_workers: int = 64,
        on_stop: Sequence[Callable[[], None]] = (),
        registry: CollectorRegistry | None = None,
        extra_interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        super().__init__(settings, name, service_names, registry)
        self._add_servicers = add_servicers
        self._max_workers = max_workers
        self._on_stop = list(on_stop)
        self._extra_interceptors = list(extra_interceptors)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._drain = _Drain()

    def start(self) -> int:
        interceptors: list[grpc.ServerInterceptor] = []
        interceptors.extend(sync_auth_interceptors(self.settings, self.registry))
        interceptors.append(SyncDrainInterceptor(self._drain))
        if self.settings.spans_enabled:
            interceptors.append(sync_tracing_interceptor(self.name, self.settings.otlp_endpoint))
        interceptors.append(SyncErrorInterceptor())
        interceptors.extend(self._extra_interceptors)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix=self.name),
            interceptors=interceptors,
            options=grpc_options(self.settings, self.reuse_port),
            # Calls beyond this many in flight are refused at once with RESOURCE_EXHAUSTED.
            maximum_concurrent_rpcs=self._max_workers * 4,
        )
        self._add_servicers(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server
        )
        self._bind(server)
        server.start()
        self._server = server
        for service in ["", *self.service_names]:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._start_metrics()
        self._log_started()
        return self.port

    def stop(self, grace: float | None = None) -> None:
        with self._stop_lock:
            if self._server is None or self._stopped.is_set():
                return
            grace = self.settings.grace_period_s if grace is None else grace
            log.info("%s shutting down (grace %.1fs)", self.name, grace)
            started = time.monotonic()
            self._drain.begin()
            self.health.enter_graceful_shutdown()
            self._drain.wait_idle(grace)
            left = grace - (time.monotonic() - started)
            self._drain.wait_quiet(QUIET_S, min(QUIET_WAIT_S, left))
            self._server.stop(max(0.0, grace - (time.monotonic() - started))).wait()
            for hook in self._on_stop:
                hook()
            self._stop_metrics()
            self._stopped.set()

    def serve_until_signal(self) -> None:
        self.start()
        self.announce()
        stop_requested = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop_requested.set())
        stop_requested.wait()
        self.stop()
