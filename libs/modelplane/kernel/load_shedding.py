"""Load shedding at the door: when the event loop falls behind, a share of new calls to the
guarded methods is refused at their headers, before anything else is spent on them.

Why: a grpc.aio server takes calls from gRPC core one at a time, as fast as its event
loop turns. Offered more calls than the loop can take, the rest wait inside core, unseen
by the service: every call then waits, refusals included, and the work done for calls
whose deadline passed meanwhile crowds out the rest. The service's own admission control
(the batcher's queue bounds) runs after the call's body was read, parsed and decoded; a
call refused here costs only gRPC's own per-call work (~90 µs of server CPU on this
machine for a call that does nothing).

The signal: every `TICK_S`, a probe yields once to the event loop and times how long the
loop takes to come back to it (everything it had ready runs first): about how long work
that arrives now waits. The share of calls let through follows it (additive increase,
multiplicative decrease): cut by a quarter on each probe that waited more than
`lag_bound_s`, raised by a twentieth on each that waited under `ON_TIME_S`. Calls are
refused at random, so every client sees the same share, with UNAVAILABLE and a retry
hint (the clients we ship retry idempotent calls after it, within their deadline).

What it cannot see are the calls still inside core: it measures how busy the loop is,
not core's queue. Measured (`make chaos`, one CPU, an MLP twice the heavy demo's width at 3x
its capacity): 1,537 requests a second served instead of 997, refusals in p99 31 ms
instead of 59; far past what the loop can take (5x a capacity of ~1,000 requests a
second) refusals still wait in core (README, Overload).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.kernel.errors import RETRY_PUSHBACK_KEY

TICK_S = 0.002
"""How often the loop is probed: often enough to react within a few milliseconds, rarely
enough to cost nothing measurable (500 timers a second)."""
ON_TIME_S = 0.0005
"""A probe that waited longer than the lag bound cuts the share let through; one that
waited less than this raises it again; in between, it stays."""
MIN_SHARE = 0.02
"""Some calls always get through: a client still sees its service answer now and then, and
the batcher keeps timing batches (its own admission needs them)."""
DECREASE = 0.75
INCREASE = 0.05
RETRY_AFTER_MS = 50
SHED_MESSAGE = "overloaded: the server is refusing a share of new calls; retry after {} ms"


class LoopLagShedder:
    """The share of new calls to let through, from the event loop's lag (see the module's
    docstring). `start()` on the server's loop; `admit()` per call."""

    def __init__(self, lag_bound_s: float, registry: CollectorRegistry | None = None) -> None:
        if lag_bound_s <= 0:
            raise ValueError("lag_bound_s must be positive")
        self.lag_bound_s = lag_bound_s
        self.share = 1.0
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._random = random.Random()
        self._shed = Counter(
            "modelplane_grpc_calls_shed",
            "Calls refused at their headers because the event loop was falling behind",
            registry=registry,
        )
        Gauge(
            "modelplane_grpc_admitted_share",
            "Share of new calls to guarded methods let through (1: the loop keeps up)",
            registry=registry,
        ).set_function(lambda: self.share)
        Gauge(
            "modelplane_grpc_loop_lag_seconds",
            "How late the event loop ran its last lag probe",
            registry=registry,
        ).set_function(lambda: self.lag_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            started = time.perf_counter()
            await asyncio.sleep(0)  # back after everything the loop has ready now
            self.observe(time.perf_counter() - started)

    def observe(self, lag_s: float) -> None:
        """One tick's lag: the share let through follows it."""
        self.lag_s = max(0.0, lag_s)
        if self.lag_s > self.lag_bound_s:
            self.share = max(MIN_SHARE, self.share * DECREASE)
        elif self.lag_s <= ON_TIME_S and self.share < 1.0:
            self.share = min(1.0, self.share + INCREASE)

    def admit(self) -> bool:
        """Whether to let a new call through (always, while the loop keeps up)."""
        if self.share >= 1.0 or self._random.random() < self.share:
            return True
        self._shed.inc()
        return False


async def _refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
    # A request-streaming handler: the refused call's message is never read or parsed.
    await context.abort(
        grpc.StatusCode.UNAVAILABLE,
        SHED_MESSAGE.format(RETRY_AFTER_MS),
        trailing_metadata=((RETRY_PUSHBACK_KEY, str(RETRY_AFTER_MS)),),
    )


_REFUSED = grpc.stream_unary_rpc_method_handler(_refuse)


class AioLoadShedInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a share of new calls to `methods` when `shedder` says so, before any other
    interceptor or the handler runs (only authentication goes first)."""

    def __init__(self, shedder: LoopLagShedder, methods: Collection[str]) -> None:
        self._shedder = shedder
        self._methods = frozenset(methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method in self._methods and not self._shedder.admit():
            return _REFUSED
        return await continuation(handler_call_details)
