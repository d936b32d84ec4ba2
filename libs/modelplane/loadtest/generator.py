"""The load loops that run inside one process: closed loop (N users, each sending
its next request when the previous answers) and open loop (requests sent on a
schedule whatever the server does).

Cheap per request, because the generator usually shares the machine with the
server: the request is pre-serialized bytes sent through a raw channel method (no
protobuf work per call), responses are not parsed, and only a float per request is
recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableSequence
from dataclasses import dataclass, field

import grpc
import numpy as np

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

# Send raw bytes, receive raw bytes: serializers of None pass bytes through.
RawCall = Callable[..., Awaitable[bytes]]


@dataclass(frozen=True)
class Share:
    """This process's part of one level, with absolute CLOCK_MONOTONIC times (the
    same clock in every process on the machine, so workers start together)."""

    start: float  # warm-up begins
    measure: float  # measurement begins (= start + warm-up)
    end: float | None  # no new requests from here (duration mode)
    requests: int | None  # measured requests to send (count mode)
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop, requests/s for this process
    poisson: bool = True
    phase_s: float = 0.0  # offset of the first arrival (spreads uniform schedules)
    timeout_s: float = 10.0
    max_outstanding: int = 10_000
    seed: int = 0


@dataclass
class Samples:
    """What one process saw during the measurement window of a level."""

    latencies_s: np.ndarray
    errors: dict[str, int] = field(default_factory=dict)
    scheduled: int = 0
    finished: float = 0.0
    client_cpu_s: float = 0.0
    max_send_lag_s: float = 0.0

    @property
    def ok(self) -> int:
        return int(self.latencies_s.size)


def channel_options(index: int) -> list[tuple[str, int]]:
    """Each channel gets its own connection; by default gRPC shares one between
    channels with the same target and arguments."""
    return [
        ("grpc.use_local_subchannel_pool", 1),
        # Every failure is counted as the server gave it, never retried away.
        ("grpc.enable_retries", 0),
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.max_send_message_length", 2**31 - 1),
        ("modelplane.loadtest.channel", index),
    ]


def raw_infer(channel: grpc.aio.Channel) -> RawCall:
    return channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)


class _Recorder:
    """Collects one level's samples; errors are counted by status code name."""

    def __init__(self, measure: float, progress: MutableSequence[int], slot: int) -> None:
        self.measure = measure
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.finished = measure
        self._progress = progress
        self._slot = slot

    async def call(self, infer: RawCall, message: bytes, sent: float, timeout_s: float) -> None:
        """Sends once; latency counts from `sent`, the scheduled time in open loop."""
        code: str | None = None
        try:
            await infer(message, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except (grpc.RpcError, OSError) as exc:
            code = type(exc).__name__
        done = time.monotonic()
        if sent < self.measure:
            return
        if code is None:
            self.latencies.append(done - sent)
        else:
            self.errors[code] = self.errors.get(code, 0) + 1
        self.finished = max(self.finished, done)
        self._progress[self._slot] += 1


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _cpu_at(moment: float) -> float:
    await _sleep_until(moment)
    return time.process_time()


async def run_closed(
    infers: list[RawCall],
    message: bytes,
    share: Share,
    progress: MutableSequence[int],
    slot: int = 0,
) -> Samples:
    """`share.concurrency` users on the channels in turn, each with one request in flight."""
    assert share.concurrency is not None
    recorder = _Recorder(share.measure, progress, slot)
    remaining = share.requests

    async def user(infer: RawCall) -> None:
        nonlocal remaining
        await _sleep_until(share.start)
        while True:
            sent = time.monotonic()
            if share.end is not None and sent >= share.end:
                return
            if remaining is not None and sent >= share.measure:
                if remaining <= 0:
                    return
                remaining -= 1
            await recorder.call(infer, message, sent, share.timeout_s)

    cpu_start = asyncio.ensure_future(_cpu_at(share.measure))
    await asyncio.gather(
        *(user(infers[i % len(infers)]) for i in range(share.concurrency)),
    )
    cpu_used = time.process_time() - await cpu_start
    return Samples(
        latencies_s=np.asarray(recorder.latencies, dtype=np.float64),
        errors=recorder.errors,
        scheduled=len(recorder.latencies) + sum(recorder.errors.values()),
        finished=recorder.finished,
        client_cpu_s=cpu_used,
    )


def arrival_gaps(rate: float, poisson: bool, rng: np.random.Generator, count: int) -> np.ndarray:
    """Gaps between consecutive sends: exponential (Poisson arrivals) or constant."""
    if poisson:
        return rng.exponential(1.0 / rate, size=count)
    return np.full(count, 1.0 / rate)


async def run_open(
    infers: list[RawCall],
    message: bytes,
    share: Share,
    progress: MutableSequence[int],
    slot: int = 0,
) -> Samples:
    """Sends on a schedule of `share.rate` requests/s. A request's latency counts from
    its scheduled time, so a stalled server (or a late generator) cannot hide queueing
    behind fewer sends (coordinated omission)."""
    assert share.rate is not None and share.rate > 0
    recorder = _Recorder(share.measure, progress, slot)
    rng = np.random.default_rng(share.seed)
    outstanding = asyncio.Semaphore(share.max_outstanding)
    tasks: set[asyncio.Task[None]] = set()
    scheduled = 0
    max_lag = 0.0
    gaps = arrival_gaps(share.rate, share.poisson, rng, 4096)
    gap_index = 0
    origin = share.start + share.phase_s
    moment = origin
    cpu_start = asyncio.ensure_future(_cpu_at(share.measure))
    sent_count = 0

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        outstanding.release()

    while True:
        if share.end is not None and moment >= share.end:
            break
        measuring = moment >= share.measure
        if measuring and share.requests is not None and scheduled >= share.requests:
            break
        await _sleep_until(moment)
        # Waiting here for a free slot delays the send, not the latency's start.
        await outstanding.acquire()
        if measuring:
            scheduled += 1
            max_lag = max(max_lag, time.monotonic() - moment)
        task = asyncio.create_task(
            recorder.call(infers[sent_count % len(infers)], message, moment, share.timeout_s)
        )
        sent_count += 1
        tasks.add(task)
        task.add_done_callback(finished)
        if share.poisson:
            gap_index += 1
            if gap_index == gaps.size:
                gaps = arrival_gaps(share.rate, share.poisson, rng, gaps.size)
                gap_index = 0
            moment += float(gaps[gap_index])
        else:
            # Multiplied, not summed, so rounding never drifts the schedule.
            moment = origin + sent_count / share.rate
    if tasks:
        await asyncio.gather(*list(tasks))
    cpu_used = time.process_time() - await cpu_start
    return Samples(
        latencies_s=np.asarray(recorder.latencies, dtype=np.float64),
        errors=recorder.errors,
        scheduled=scheduled,
        finished=recorder.finished,
        client_cpu_s=cpu_used,
        max_send_lag_s=max_lag,
    )


async def run_share(
    infers: list[RawCall],
    message: bytes,
    share: Share,
    progress: MutableSequence[int],
    slot: int = 0,
) -> Samples:
    if share.concurrency is not None:
        return await run_closed(infers, message, share, progress, slot)
    return await run_open(infers, message, share, progress, slot)
