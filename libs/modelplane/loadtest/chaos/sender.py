"""The open-loop overload sent from worker processes.

One asyncio loop in Python sends and answers a few thousand gRPC calls a second at
most; past that, calls wait in the harness's own loop and their latencies measure the
harness, not the service (seen at 5x the heavy model's capacity: "accepted" calls that
took 5 s against a 1 s deadline). So the overload is split over `processes` worker
processes, each sending its share of the rate on its own connection, all starting at
the same CLOCK_MONOTONIC instant (one clock for every process on the machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from modelplane.loadtest.chaos.calls import Call, channel
from modelplane.loadtest.chaos.drivers import OpenLoopRun, open_loop
from modelplane.loadtest.chaos.workloads import INFER, raw_unary


@dataclass(frozen=True)
class SenderShare:
    address: str
    request: bytes
    rate: float
    duration_s: float
    deadline_s: float
    start_at: float
    """time.monotonic() value at which every worker starts sending."""
    index: int
    cpus: frozenset[int] = frozenset()
    """CPUs the worker runs on (empty: any)."""


def send_share(share: SenderShare) -> tuple[OpenLoopRun, list[Call]]:
    """Runs in a worker process: one share of the open-loop overload."""
    if share.cpus:
        os.sched_setaffinity(0, share.cpus)
    return asyncio.run(_send(share))


async def _send(share: SenderShare) -> tuple[OpenLoopRun, list[Call]]:
    ch = channel(share.address, 100 + share.index)
    try:
        infer = raw_unary(ch, INFER)
        # Connected before the start, so the first calls do not pay for the handshake.
        await asyncio.wait_for(ch.channel_ready(), 30)
        delay = share.start_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        calls: list[Call] = []

        async def send() -> object:
            return await infer(share.request, timeout=share.deadline_s)

        with collector_paused():
            run = await open_loop(send, share.rate, share.duration_s, calls)
        return run, calls
    finally:
        await ch.close()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection in the sender while it sends: a full collection over the
    calls it keeps took 10-40 ms, every answer arriving meanwhile was timed late, and the
    service's p99 carried the harness's pauses. The run is bounded, so what it leaves
    for the collector is too (collected after; the sender peaked at ~110 MiB at 5x)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class SenderPool:
    """Worker processes started (spawned: a fork would copy the harness's grpc state)
    and warmed before the overload, so their start-up is not part of it."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn")
        )

    def warm(self) -> None:
        # Each worker imports this module (grpc, the stubs) on its first task.
        list(self._pool.map(_warm_import, range(self.processes * 2)))

    async def run(
        self,
        address: str,
        request: bytes,
        rate: float,
        duration_s: float,
        deadline_s: float,
        start_at: float,
        cpus: frozenset[int] = frozenset(),
    ) -> tuple[OpenLoopRun, list[Call]]:
        """Sends `rate` calls a second in all from `start_at` (time.monotonic()) for
        `duration_s`; returns the combined run and every call."""
        loop = asyncio.get_running_loop()
        shares = [
            SenderShare(
                address,
                request,
                rate / self.processes,
                duration_s,
                deadline_s,
                start_at,
                index,
                cpus,
            )
            for index in range(self.processes)
        ]
        results = await asyncio.gather(
            *(loop.run_in_executor(self._pool, send_share, share) for share in shares)
        )
        calls = [call for _, part in results for call in part]
        runs = [run for run, _ in results]
        combined = OpenLoopRun(
            scheduled=sum(r.scheduled for r in runs),
            sent=sum(r.sent for r in runs),
            skipped=sum(r.skipped for r in runs),
            started=min(r.started for r in runs),
            ended=max(r.ended for r in runs),
            max_lag_s=max(r.max_lag_s for r in runs),
        )
        return combined, calls

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _warm_import(_: int) -> bool:
    time.sleep(0.2)  # ok-sleep: keeps one worker from taking every warm-up task
    return True
