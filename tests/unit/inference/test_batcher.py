"""DynamicBatcher: rows not requests, no idle delay, bounded queue, drops, isolation.

A gated runner holds the single runtime instance busy, so what is queued behind it is
known exactly when the gate opens: no sleeps, no timing assertions. The batcher lives
on the test's event loop; the gate blocks an instance thread, never the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from modelplane.kernel.errors import Cancelled, DeadlineExceeded, Overloaded
from modelplane.services.inference import batcher as batcher_module
from modelplane.services.inference.batcher import (
    BatchingPolicy,
    DynamicBatcher,
    ExecutionFailed,
    NullObserver,
    PendingRequest,
    Tensors,
    running_alone,
)

WAIT = 10.0  # generous bound on waits that succeed at once unless something is broken


class GatedRunner:
    """Doubles its input; the first call blocks until `open()`; records batch sizes and
    whether each batch ran alone."""

    def __init__(self, fail_when: Callable[[np.ndarray], bool] | None = None) -> None:
        self.entered = threading.Event()
        self._gate = threading.Event()
        self.batches: list[int] = []
        self.alone: list[bool] = []
        self._first = True
        self._fail_when = fail_when

    def open(self) -> None:
        self._gate.set()

    def rearm(self) -> None:
        """The next call blocks again until `open()`."""
        self._gate.clear()
        self.entered.clear()
        self._first = True

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT)

    def __call__(self, feeds: Tensors) -> dict[str, np.ndarray]:
        x = feeds["x"]
        if self._first:
            self._first = False
            self.entered.set()
            assert self._gate.wait(WAIT)
        if self._fail_when is not None and self._fail_when(x):
            raise RuntimeError("Status Message: value out of range")
        self.batches.append(len(x))
        self.alone.append(running_alone())
        return {"y": x * 2}


def request(*values: float, **kwargs: object) -> PendingRequest:
    x = np.array([[v] for v in values], dtype=np.float32)
    return PendingRequest({"x": x}, len(values), **kwargs)  # type: ignore[arg-type]


async def result(pending: PendingRequest) -> dict[str, np.ndarray]:
    assert pending.future is not None
    return await asyncio.wait_for(pending.future, WAIT)


async def settle(*pendings: PendingRequest) -> None:
    """Waits until every request finished, whether it succeeded or failed."""
    futures = [p.future for p in pendings]
    assert all(f is not None for f in futures)
    await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)  # type: ignore[arg-type]


async def start_busy(
    policy: BatchingPolicy, runner: GatedRunner | None = None
) -> tuple[DynamicBatcher, GatedRunner, PendingRequest]:
    """A batcher whose only instance is running (blocked in) a first request."""
    runner = runner or GatedRunner()
    batcher = DynamicBatcher("m", [runner], policy)
    first = request(0.0)
    batcher.submit(first)
    await runner.wait_entered()
    return batcher, runner, first


async def test_a_lone_request_runs_at_once_despite_a_long_queue_delay():
    runner = GatedRunner()
    runner.open()
    batcher = DynamicBatcher(
        "m", [runner], BatchingPolicy(max_queue_delay_s=3600, preferred_batch_sizes=(8,))
    )
    pending = request(1.0)
    batcher.submit(pending)
    # An idle instance must not wait for the batch to fill.
    np.testing.assert_array_equal((await result(pending))["y"], [[2.0]])
    await batcher.close()


async def test_batches_count_rows_and_split_outputs_back_per_request():
    batcher, runner, first = await start_busy(BatchingPolicy(max_batch_size=8))
    five, three, one = request(1, 2, 3, 4, 5), request(6, 7, 8), request(9)
    for pending in (five, three, one):
        batcher.submit(pending)
    assert batcher.queued_rows == 9
    runner.open()
    await settle(first, five, three, one)
    # 5 + 3 rows fill the 8-row batch; the 9th row waits for the next one.
    assert runner.batches == [1, 8, 1]
    np.testing.assert_array_equal((await result(five))["y"].ravel(), [2, 4, 6, 8, 10])
    np.testing.assert_array_equal((await result(three))["y"].ravel(), [12, 14, 16])
    np.testing.assert_array_equal((await result(one))["y"].ravel(), [18])
    assert five.batch_id == three.batch_id != one.batch_id
    await batcher.close()


async def test_the_largest_preferred_size_caps_a_batch():
    batcher, runner, _first = await start_busy(
        BatchingPolicy(max_batch_size=64, preferred_batch_sizes=(2, 4))
    )
    pendings = [request(float(i)) for i in range(6)]
    for pending in pendings:
        batcher.submit(pending)
    runner.open()
    await settle(*pendings)
    assert runner.batches == [1, 4, 2]
    await batcher.close()


async def test_a_full_queue_rejects_at_once_counting_rows():
    batcher, runner, _first = await start_busy(BatchingPolicy(max_queue_rows=4))
    batcher.submit(request(1, 2, 3))
    with pytest.raises(Overloaded, match="Exceeds maximum queue size"):
        batcher.submit(request(4, 5))
    batcher.submit(request(6))  # one row still fits
    assert batcher.queued_rows == 4
    runner.open()
    await batcher.close()


async def test_expired_and_withdrawn_requests_are_dropped_before_they_run():
    batcher, runner, _first = await start_busy(BatchingPolicy())
    expired = request(1.0, deadline=time.monotonic() - 1)
    cancelled = request(2.0)
    live = request(3.0)
    for pending in (expired, cancelled, live):
        batcher.submit(pending)
    batcher.withdraw(cancelled)  # the caller went away
    assert batcher.queued_rows == 2
    runner.open()
    await settle(expired, live)
    with pytest.raises(DeadlineExceeded):
        await result(expired)
    assert isinstance(cancelled.error, Cancelled)
    np.testing.assert_array_equal((await result(live))["y"], [[6.0]])
    assert runner.batches == [1, 1], "only the first and the live request ran"
    await batcher.close()


async def test_a_cancelled_caller_withdraws_its_queued_request():
    batcher, runner, first = await start_busy(BatchingPolicy())
    waiting = asyncio.ensure_future(batcher.infer(request(1.0)))
    await asyncio.sleep(0)  # ok-sleep: one loop turn, so the request is queued
    assert batcher.queued_rows == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert batcher.queued_rows == 0
    runner.open()
    await result(first)
    await batcher.close()
    assert runner.batches == [1]


async def test_requests_with_different_variable_dims_never_share_a_batch():
    batcher, runner, _first = await start_busy(BatchingPolicy())
    a1, b1, a2 = (
        request(1.0, shape_key=(3,)),
        request(2.0, shape_key=(5,)),
        request(3.0, shape_key=(3,)),
    )
    for pending in (a1, b1, a2):
        batcher.submit(pending)
    runner.open()
    await settle(a1, b1, a2)
    assert a1.batch_id == a2.batch_id != b1.batch_id
    assert runner.batches == [1, 2, 1]
    await batcher.close()


async def test_a_request_that_fails_in_the_runtime_fails_alone():
    runner = GatedRunner(fail_when=lambda x: bool((x < 0).any()))
    batcher, runner, _first = await start_busy(BatchingPolicy(), runner)
    good1, bad, good2 = request(1.0), request(-1.0), request(2.0)
    for pending in (good1, bad, good2):
        batcher.submit(pending)
    runner.open()
    await settle(good1, bad, good2)
    np.testing.assert_array_equal((await result(good1))["y"], [[2.0]])
    np.testing.assert_array_equal((await result(good2))["y"], [[4.0]])
    with pytest.raises(ExecutionFailed, match="value out of range"):
        await result(bad)
    await batcher.close()


async def test_with_batching_off_every_request_runs_alone():
    batcher, runner, _first = await start_busy(BatchingPolicy(enabled=False))
    pendings = [request(1.0), request(2.0, 3.0), request(4.0)]
    for pending in pendings:
        batcher.submit(pending)
    runner.open()
    await settle(*pendings)
    assert runner.batches == [1, 1, 2, 1]
    await batcher.close()


async def test_under_load_a_short_batch_waits_for_its_preferred_size():
    policy = BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_s=3600)
    batcher, runner, first = await start_busy(policy)
    early = [request(float(v)) for v in range(1, 6)]  # 6 rows in flight at the peak
    for pending in early:
        batcher.submit(pending)
    runner.open()
    await settle(first, *early[:4])
    # The instance came free with one request waiting and fewer than the peak in
    # flight: it holds it until three more make a preferred batch.
    await asyncio.sleep(0)  # ok-sleep: one loop turn; a wrongly started batch would run
    late = [request(6.0), request(7.0)]
    for pending in late:
        batcher.submit(pending)
    await asyncio.sleep(0)  # ok-sleep: one loop turn, as above
    assert batcher.queued_rows == 3
    last = request(8.0)
    batcher.submit(last)
    await settle(early[4], *late, last)
    assert runner.batches == [1, 4, 4]
    await batcher.close()


async def test_a_held_batch_goes_once_every_caller_is_waiting_on_it():
    policy = BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(8,), max_queue_delay_s=3600)
    batcher, runner, first = await start_busy(policy)
    early = [request(1.0), request(2.0)]  # 3 rows in flight at the peak
    for pending in early:
        batcher.submit(pending)
    runner.open()
    await result(first)
    await asyncio.sleep(0)  # ok-sleep: one loop turn; the two are held for more
    assert batcher.queued_rows == 2
    # The caller whose request just finished sends its next one: now all three callers
    # are waiting, no more rows can come, and the batch goes short of its size.
    again = request(3.0)
    batcher.submit(again)
    await settle(*early, again)
    assert runner.batches == [1, 3]
    await batcher.close()


async def test_a_hold_forgets_callers_that_have_gone():
    window = 0.05
    policy = BatchingPolicy(
        max_batch_size=8,
        preferred_batch_sizes=(8,),
        max_queue_delay_s=3600,
        peak_window_s=window,
    )
    # Three callers: a held batch goes when the third is back.
    batcher, runner, first = await start_busy(policy)
    early = [request(1.0), request(2.0)]
    for pending in early:
        batcher.submit(pending)
    runner.open()
    await result(first)
    again = request(3.0)
    batcher.submit(again)
    await settle(*early, again)
    # One caller leaves. Once two windows have passed, the batcher expects two callers,
    # not three, and no longer waits (an hour) for the one that left.
    await asyncio.sleep(3 * window)  # ok-sleep: let the remembered peak expire
    runner.rearm()
    running = request(4.0)
    batcher.submit(running)
    await runner.wait_entered()
    waiting = request(5.0)
    batcher.submit(waiting)
    runner.open()
    await result(running)
    back = request(6.0)
    batcher.submit(back)
    await settle(waiting, back)
    assert runner.batches == [1, 3, 1, 2]
    await batcher.close()


async def test_a_held_batch_goes_when_its_oldest_request_has_waited_long_enough():
    policy = BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_s=0.05)
    batcher, runner, first = await start_busy(policy)
    early = [request(1.0), request(2.0)]
    for pending in early:
        batcher.submit(pending)
    runner.open()
    await settle(first, *early)  # no more rows come: the delay, not a full batch, ends it
    assert runner.batches == [1, 2]
    await batcher.close()


async def test_close_runs_what_is_queued_then_refuses_new_requests():
    batcher, runner, _first = await start_busy(BatchingPolicy())
    queued = request(1.0)
    batcher.submit(queued)
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)  # ok-sleep: one loop turn, so close() is waiting for the queue
    with pytest.raises(Exception, match="unloading"):
        batcher.submit(request(2.0))
    runner.open()
    await asyncio.wait_for(closing, WAIT)
    np.testing.assert_array_equal((await result(queued))["y"], [[2.0]])


async def test_several_instances_run_batches_in_parallel():
    gates = [GatedRunner(), GatedRunner()]
    batcher = DynamicBatcher("m", gates, BatchingPolicy(enabled=False))
    a, b = request(1.0), request(2.0)
    batcher.submit(a)
    batcher.submit(b)
    # Both instances are inside the runtime at the same time.
    await gates[0].wait_entered()
    await gates[1].wait_entered()
    for gate in gates:
        gate.open()
    await settle(a, b)
    await batcher.close()


async def test_a_failing_observer_never_strands_a_waiter():
    class BrokenObserver(NullObserver):
        def batch_done(self, *args: object) -> None:
            raise RuntimeError("metrics backend exploded")

    runner = GatedRunner()
    runner.open()
    batcher = DynamicBatcher("m", [runner], BatchingPolicy(), BrokenObserver())
    pending = request(1.0)
    batcher.submit(pending)
    np.testing.assert_array_equal((await result(pending))["y"], [[2.0]])
    await batcher.close()


async def test_a_batch_of_a_preferred_size_runs_without_waiting_for_the_largest():
    policy = BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(2, 8), max_queue_delay_s=3600)
    batcher, runner, first = await start_busy(policy)
    waiting = [request(1.0), request(2.0), request(3.0)]
    for pending in waiting:
        batcher.submit(pending)
    runner.open()
    # Three rows can form the preferred size 2: no hour-long wait for 8.
    await settle(first, *waiting)
    assert runner.batches == [1, 3]
    await batcher.close()


@pytest.fixture
def usual_is_the_last_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual rows in flight follow each arrival at once, so a test sets them exactly."""
    monkeypatch.setattr(batcher_module, "USUAL_GAIN", 1.0)


@pytest.mark.usefixtures("usual_is_the_last_arrival")
async def test_only_a_batch_with_nothing_beside_or_behind_it_runs_alone():
    batcher, runner, first = await start_busy(BatchingPolicy(max_batch_size=4))
    queued = [request(1.0), request(2.0)]  # 3 rows in flight: not one caller at a time
    for pending in queued:
        batcher.submit(pending)
    runner.open()
    await settle(first, *queued)
    lone = request(3.0)  # one row in flight again
    batcher.submit(lone)
    await result(lone)
    assert runner.alone == [True, False, True]
    # A batch starting while another batcher's batch runs is not alone either.
    other_runner = GatedRunner()
    other = DynamicBatcher("other", [other_runner], BatchingPolicy())
    busy = request(4.0)
    other.submit(busy)
    await other_runner.wait_entered()
    beside = request(5.0)
    batcher.submit(beside)
    await result(beside)
    other_runner.open()
    await result(busy)
    assert runner.alone == [True, False, True, False]
    assert other_runner.alone == [True]
    await batcher.close()
    await other.close()
