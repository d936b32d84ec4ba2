"""The load loops with an in-process call in place of the network, to check what the
loops themselves promise: counts, error codes, and that open-loop latency starts at
the scheduled time (a stall is seen by every request scheduled during it)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from modelplane.loadtest.generator import Share, run_closed, run_open


def _share(**changes: object) -> Share:
    start = time.monotonic()
    values: dict[str, object] = dict(start=start, measure=start, end=None, requests=None)
    values.update(changes)
    return Share(**values)  # type: ignore[arg-type]


async def test_closed_loop_counts_and_error_codes() -> None:
    calls = 0

    async def infer(message: bytes, timeout: float) -> bytes:
        nonlocal calls
        calls += 1
        if calls % 4 == 0:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata()
            )
        return b""

    progress = [0]
    samples = await run_closed([infer], b"x", _share(concurrency=3, requests=100), progress)
    assert calls == 100
    assert samples.ok == 75 and samples.errors == {"RESOURCE_EXHAUSTED": 25}
    assert progress == [100]
    assert samples.client_cpu_s >= 0


async def test_users_use_every_channel() -> None:
    used: list[str] = []

    def channel(name: str):  # type: ignore[no-untyped-def]
        async def infer(message: bytes, timeout: float) -> bytes:
            used.append(name)
            await asyncio.sleep(0)  # ok-sleep: a real call always suspends
            return b""

        return infer

    await run_closed([channel("a"), channel("b")], b"x", _share(concurrency=4, requests=40), [0])
    assert used.count("a") == used.count("b") == 20


async def test_open_loop_latency_counts_from_the_scheduled_time() -> None:
    stall_s = 0.3
    calls = 0

    async def infer(message: bytes, timeout: float) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 50:
            time.sleep(stall_s)  # ok-sleep: the whole process stalls, as a GC pause would
        return b""

    rate = 1000.0
    samples = await run_open([infer], b"x", _share(rate=rate, poisson=False, requests=500), [0])
    assert samples.scheduled == samples.ok == 500
    # Requests due during the stall were sent late; their latency includes the wait.
    # A generator that timed from the actual send would report ~0 for all of them.
    late = np.sort(samples.latencies_s)[::-1]
    assert late[0] >= stall_s * 0.9
    due_in_first_half_of_stall = int(rate * stall_s / 2)
    assert (samples.latencies_s >= stall_s / 2 * 0.9).sum() >= due_in_first_half_of_stall * 0.9
    assert samples.max_send_lag_s >= stall_s * 0.9


async def test_open_loop_warm_up_is_sent_but_not_measured() -> None:
    calls = 0

    async def infer(message: bytes, timeout: float) -> bytes:
        nonlocal calls
        calls += 1
        return b""

    start = time.monotonic()
    share = Share(
        start=start, measure=start + 0.1, end=start + 0.3, requests=None, rate=500, poisson=False
    )
    samples = await run_open([infer], b"x", share, [0])
    assert calls == 150  # 0.3 s at 500/s
    assert samples.scheduled == samples.ok == 100  # the 0.2 s after warm-up
