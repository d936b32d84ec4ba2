"""The load loops of the chaos scenarios, all on one asyncio loop in the harness:
closed-loop writers (each sends its next call when the previous one is answered),
an open-loop sender (calls on a schedule whatever the service does), and a prober
that measures the time until a service answers normally again."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from modelplane.loadtest.chaos.calls import OK, REJECTION_CODES, Call, code_of, retry_after_s
from modelplane.loadtest.chaos.ledger import AckLedger
from modelplane.loadtest.chaos.workloads import Workload

# After a failed call a closed-loop writer waits this long before the next one, so a
# service that is down is not hammered by a spinning loop (nor the tally inflated).
PAUSE_AFTER_FAILURE_S = 0.02


async def timed(call: Callable[[], Awaitable[object]]) -> Call:
    """Runs one call and records it (never raises for an RPC error)."""
    sent = time.monotonic()
    detail = ""
    hint = None
    try:
        await call()
        code = OK
    except (grpc.RpcError, OSError, RuntimeError) as exc:
        code = code_of(exc)
        if isinstance(exc, grpc.aio.AioRpcError):
            if code in REJECTION_CODES:
                hint = retry_after_s(exc)
            else:
                detail = (exc.details() or "")[:80]
    return Call(sent, time.monotonic(), code, detail, hint)


class Writers:
    """`concurrency` closed-loop writers over `channels` until `stop()`; every call goes
    to `calls`, every acknowledgement to `ledger`."""

    def __init__(
        self,
        workload: Workload,
        channels: Sequence[grpc.aio.Channel],
        concurrency: int,
        timeout_s: float,
        ledger: AckLedger,
    ) -> None:
        self.workload = workload
        self.channels = list(channels)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.ledger = ledger
        self.calls: list[Call] = []
        self._sequence = itertools.count(1)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._writer(self.channels[index % len(self.channels)]))
            for index in range(self.concurrency)
        ]

    async def _writer(self, channel: grpc.aio.Channel) -> None:
        while not self._stopping.is_set():
            seq = next(self._sequence)
            call = await timed(
                lambda seq=seq: self.workload.write(channel, seq, self.timeout_s, self.ledger)  # type: ignore[misc]
            )
            self.calls.append(call)
            if call.code != OK:
                await asyncio.sleep(PAUSE_AFTER_FAILURE_S)

    async def stop(self) -> None:
        """No new calls; waits for the ones in flight (each bounded by its deadline)."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    async def first_ok_after(self, moment: float, bound_s: float) -> float:
        """Seconds from `moment` until the first call sent after it succeeded; inf when
        none did within `bound_s`."""
        deadline = time.monotonic() + bound_s
        checked = 0
        while time.monotonic() < deadline:
            for call in self.calls[checked:]:
                if call.code == OK and call.sent >= moment:
                    return call.done - moment
            checked = len(self.calls)
            await asyncio.sleep(0.005)
        return math.inf


async def probe_until_normal(
    probe: Callable[[float], Awaitable[None]],
    since: float,
    bound_s: float,
    normal_s: float | None = None,
    timeout_s: float = 1.0,
) -> tuple[float, list[Call]]:
    """Calls `probe` one after another until one succeeds (within `normal_s` when
    given); returns the seconds from `since` to that answer (inf after `bound_s`) and
    every probe made."""
    probes: list[Call] = []
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        call = await timed(lambda: probe(timeout_s))
        probes.append(call)
        if call.code == OK and (normal_s is None or call.latency_s <= normal_s):
            return call.done - since, probes
        if call.code != OK:
            await asyncio.sleep(0.002)
    return math.inf, probes


@dataclass(frozen=True)
class OpenLoopRun:
    scheduled: int
    sent: int
    skipped: int
    """Due but not sent: the sender fell behind its schedule past the window's end, or
    `max_outstanding` calls were already waiting."""
    started: float
    ended: float
    """When the last call was sent (time.monotonic)."""
    max_lag_s: float
    """How far behind its schedule the sender fell at worst."""

    @property
    def sent_rate(self) -> float:
        return self.sent / max(self.ended - self.started, 1e-9)


async def open_loop(
    send: Callable[[], Awaitable[object]],
    rate: float,
    duration_s: float,
    calls: list[Call],
    max_outstanding: int = 20_000,
    tick_s: float = 0.001,
) -> OpenLoopRun:
    """Sends `rate` calls a second for `duration_s` on a fixed schedule: each tick sends
    every call that has fallen due, so a slow service cannot slow the arrivals (it only
    makes calls wait, or be refused). Latency counts from the moment a call is sent."""
    total = int(rate * duration_s)
    pending: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    sent = skipped = 0
    max_lag = 0.0

    async def one() -> None:
        calls.append(await timed(send))

    index = 0
    end = started + duration_s
    while index < total:
        now = time.monotonic()
        if now >= end:  # the window is over: what the sender could not send in it is not sent
            skipped += total - index
            break
        due = min(total, int((now - started) * rate) + 1)
        if index < due:
            max_lag = max(max_lag, now - (started + index / rate))
        while index < due:
            index += 1
            if len(pending) >= max_outstanding:
                skipped += 1
                continue
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(tick_s)
    ended = time.monotonic()
    if pending:
        await asyncio.gather(*list(pending))
    return OpenLoopRun(total, sent, skipped, started, ended, max_lag)


async def closed_loop_for(
    send: Callable[[], Awaitable[object]], concurrency: int, duration_s: float
) -> tuple[list[Call], float]:
    """`concurrency` callers for `duration_s`; returns the calls and the elapsed time.

    The callers behave as the clients we ship: after a rejection they wait for the retry
    hint it carries (after any other failure, PAUSE_AFTER_FAILURE_S). Callers that
    resend at once turn a few rejections into a storm of them that keeps a one-CPU
    service busy refusing: measured on the overload model at 64 callers, in about half
    the runs, 50-70 requests a second served instead of ~500, and "5x capacity" was then
    half of it."""
    calls: list[Call] = []
    started = time.monotonic()
    end = started + duration_s

    async def caller() -> None:
        while time.monotonic() < end:
            call = await timed(send)
            calls.append(call)
            if call.code != OK:
                pause = PAUSE_AFTER_FAILURE_S if call.retry_after_s is None else call.retry_after_s
                await asyncio.sleep(max(0.0, min(pause, end - time.monotonic())))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return calls, time.monotonic() - started
