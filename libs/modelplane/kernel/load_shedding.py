"""Refusal at the door: new calls to the guarded methods refused at their headers, before
anything else is spent on them, in two cases. The service says it would refuse any call
now (a `Door`: the inference service's, while every loaded model's queue is past its
bound), and then every call is refused; or the event loop falls behind (a
`LoopLagShedder`, opt-in), and then a share of them is.

Why: a grpc.aio server takes calls from gRPC core one at a time, as fast as its event
loop turns. The service's own admission control (the batcher's queue bounds) runs after
the call's body was read, parsed and decoded; a call refused here costs only gRPC's own
per-call work (~220 µs of server CPU on this machine for a call that does nothing). At
5x the inference service's capacity, before the door, 25,491 of ~25,600 refusals came
after the body and the model got ~13% of the one CPU (20-99 requests a second served);
with it, nearly all came here and it served ~200 (README, Overload).

The shedder's signal: every `TICK_S`, a probe yields once to the event loop and times how
long the loop takes to come back to it (everything it had ready runs first): about how
long work that arrives now waits. The share of calls let through follows it (additive
increase, multiplicative decrease): cut by a quarter on each probe that waited more than
`lag_bound_s`, raised by a twentieth on each that waited under `ON_TIME_S`. Calls are
refused at random, so every client sees the same share, with UNAVAILABLE and a retry
hint (the clients we ship retry idempotent calls after it, within their deadline).

What it cannot see are the calls still inside core: it measures how busy the loop is,
not core's queue. Measured (`make chaos`, one CPU, an MLP twice the heavy demo's width at 3x
its capacity): 1,537 requests a second served instead of 997, refusals in p99 31 ms
instead of 59.
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


BUSY_MESSAGE = (
    "overloaded: every queue that could take this call is past its bound; retry after {} ms"
)

Door = Callable[[], int | None]
"""Asked as each guarded call arrives: a retry hint (ms) when the service would refuse any
call now (the inference service: every loaded model's queue past its bound), else None."""


def _refusal(message: str, retry_after_ms: int) -> grpc.RpcMethodHandler:
    trailers = ((RETRY_PUSHBACK_KEY, str(retry_after_ms)),)

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        # A request-streaming handler: the refused call's message is never read or parsed.
        # The status is set, not raised with context.abort(): in a bare server refusing
        # 2,500 calls a second, raising cost ~7% more CPU a refusal and put the
        # refusals' p99 at 6.3 ms against 4.2 (an exception and traceback each, and the
        # collections that find them).
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(message)
        context.set_trailing_metadata(trailers)

    return grpc.stream_unary_rpc_method_handler(refuse)


_SHED = _refusal(SHED_MESSAGE.format(RETRY_AFTER_MS), RETRY_AFTER_MS)


class AioLoadShedInterceptor(grpc.aio.ServerInterceptor):
    """Refuses new calls to `methods` at their headers, before any other interceptor or
    the handler runs (only authentication goes first): every one while `door` gives a
    retry hint, and a share of them when `shedder` says so (see the module's docstring)."""

    def __init__(
        self,
        methods: Collection[str],
        shedder: LoopLagShedder | None = None,
        door: Door | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._shedder = shedder
        self._door = door
        self._methods = frozenset(methods)
        self._busy = Counter(
            "modelplane_grpc_calls_refused_at_door",
            "Calls refused at their headers because the service would refuse any call now",
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method in self._methods:
            if self._door is not None and (retry_ms := self._door()) is not None:
                self._busy.inc()
                return _refusal(BUSY_MESSAGE.format(retry_ms), retry_ms)
            if self._shedder is not None and not self._shedder.admit():
                return _SHED
        return await continuation(handler_call_details)
