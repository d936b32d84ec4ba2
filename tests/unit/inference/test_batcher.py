"""DynamicBatcher: rows not requests, no idle delay, bounded queue, drops, isolation.

A gated runner holds the single runtime instance busy, so what is queued behind it is
known exactly when the gate opens: no sleeps, no timing assertions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from modelplane.kernel.errors import Cancelled, DeadlineExceeded, Overloaded
from modelplane.services.inference.batcher import (
    BatchingPolicy,
    DynamicBatcher,
    ExecutionFailed,
    NullObserver,
    PendingRequest,
    Tensors,
)

WAIT = 10.0  # generous bound on waits that succeed at once unless something is broken


class GatedRunner:
    """Doubles its input; the first call blocks until `open()`; records batch sizes."""

    def __init__(self, fail_when: Callable[[np.ndarray], bool] | None = None) -> None:
        self.entered = threading.Event()
        self._gate = threading.Event()
        self.batches: list[int] = []
        self._first = True
        self._fail_when = fail_when

    def open(self) -> None:
        self._gate.set()

    def __call__(self, feeds: Tensors) -> dict[str, np.ndarray]:
        x = feeds["x"]
        if self._first:
            self._first = False
            self.entered.set()
            assert self._gate.wait(WAIT)
        if self._fail_when is not None and self._fail_when(x):
            raise RuntimeError("Status Message: value out of range")
        self.batches.append(len(x))
        return {"y": x * 2}


def request(*values: float, **kwargs: object) -> PendingRequest:
    x = np.array([[v] for v in values], dtype=np.float32)
    return PendingRequest({"x": x}, len(values), **kwargs)  # type: ignore[arg-type]


def start_busy(
    policy: BatchingPolicy, runner: GatedRunner | None = None
) -> tuple[DynamicBatcher, GatedRunner, PendingRequest]:
    """A batcher whose only instance is running (blocked in) a first request."""
    runner = runner or GatedRunner()
    batcher = DynamicBatcher("m", [runner], policy)
    first = request(0.0)
    batcher.submit(first)
    assert runner.entered.wait(WAIT)
    return batcher, runner, first


def test_a_lone_request_runs_at_once_despite_a_long_queue_delay():
    runner = GatedRunner()
    runner.open()
    batcher = DynamicBatcher(
        "m", [runner], BatchingPolicy(max_queue_delay_s=3600, preferred_batch_sizes=(8,))
    )
    pending = request(1.0)
    batcher.submit(pending)
    assert pending.wait(WAIT), "an idle instance must not wait for the batch to fill"
    np.testing.assert_array_equal(pending.result()["y"], [[2.0]])
    batcher.close()


def test_batches_count_rows_and_split_outputs_back_per_request():
    batcher, runner, first = start_busy(BatchingPolicy(max_batch_size=8))
    five, three, one = request(1, 2, 3, 4, 5), request(6, 7, 8), request(9)
    for pending in (five, three, one):
        batcher.submit(pending)
    assert batcher.queued_rows == 9
    runner.open()
    for pending in (first, five, three, one):
        assert pending.wait(WAIT)
    # 5 + 3 rows fill the 8-row batch; the 9th row waits for the next one.
    assert runner.batches == [1, 8, 1]
    np.testing.assert_array_equal(five.result()["y"].ravel(), [2, 4, 6, 8, 10])
    np.testing.assert_array_equal(three.result()["y"].ravel(), [12, 14, 16])
    np.testing.assert_array_equal(one.result()["y"].ravel(), [18])
    assert five.batch_id == three.batch_id != one.batch_id
    batcher.close()


def test_the_largest_preferred_size_caps_a_batch():
    batcher, runner, _first = start_busy(
        BatchingPolicy(max_batch_size=64, preferred_batch_sizes=(2, 4))
    )
    pendings = [request(float(i)) for i in range(6)]
    for pending in pendings:
        batcher.submit(pending)
    runner.open()
    assert all(p.wait(WAIT) for p in pendings)
    assert runner.batches == [1, 4, 2]
    batcher.close()


def test_a_full_queue_rejects_at_once_counting_rows():
    batcher, runner, _first = start_busy(BatchingPolicy(max_queue_rows=4))
    batcher.submit(request(1, 2, 3))
    with pytest.raises(Overloaded, match="Exceeds maximum queue size"):
        batcher.submit(request(4, 5))
    batcher.submit(request(6))  # one row still fits
    assert batcher.queued_rows == 4
    runner.open()
    batcher.close()


def test_expired_and_cancelled_requests_are_dropped_before_they_run():
    batcher, runner, _first = start_busy(BatchingPolicy())
    expired = request(1.0, deadline=time.monotonic() - 1)
    cancelled = request(2.0, is_active=lambda: False)
    live = request(3.0)
    for pending in (expired, cancelled, live):
        batcher.submit(pending)
    runner.open()
    assert all(p.wait(WAIT) for p in (expired, cancelled, live))
    with pytest.raises(DeadlineExceeded):
        expired.result()
    with pytest.raises(Cancelled):
        cancelled.result()
    np.testing.assert_array_equal(live.result()["y"], [[6.0]])
    assert runner.batches == [1, 1], "only the first and the live request ran"
    batcher.close()


def test_a_caller_that_gives_up_withdraws_its_queued_request():
    batcher, runner, first = start_busy(BatchingPolicy())
    with pytest.raises(DeadlineExceeded):
        batcher.infer(request(1.0), timeout=0.01)
    assert batcher.queued_rows == 0
    runner.open()
    assert first.wait(WAIT)
    batcher.close()
    assert runner.batches == [1]


def test_requests_with_different_variable_dims_never_share_a_batch():
    batcher, runner, _first = start_busy(BatchingPolicy())
    a1, b1, a2 = (
        request(1.0, shape_key=(3,)),
        request(2.0, shape_key=(5,)),
        request(3.0, shape_key=(3,)),
    )
    for pending in (a1, b1, a2):
        batcher.submit(pending)
    runner.open()
    assert all(p.wait(WAIT) for p in (a1, b1, a2))
    assert a1.batch_id == a2.batch_id != b1.batch_id
    assert runner.batches == [1, 2, 1]
    batcher.close()


def test_a_request_that_fails_in_the_runtime_fails_alone():
    runner = GatedRunner(fail_when=lambda x: bool((x < 0).any()))
    batcher, runner, _first = start_busy(BatchingPolicy(), runner)
    good1, bad, good2 = request(1.0), request(-1.0), request(2.0)
    for pending in (good1, bad, good2):
        batcher.submit(pending)
    runner.open()
    assert all(p.wait(WAIT) for p in (good1, bad, good2))
    np.testing.assert_array_equal(good1.result()["y"], [[2.0]])
    np.testing.assert_array_equal(good2.result()["y"], [[4.0]])
    with pytest.raises(ExecutionFailed, match="value out of range"):
        bad.result()
    batcher.close()


def test_with_batching_off_every_request_runs_alone():
    batcher, runner, _first = start_busy(BatchingPolicy(enabled=False))
    pendings = [request(1.0), request(2.0, 3.0), request(4.0)]
    for pending in pendings:
        batcher.submit(pending)
    runner.open()
    assert all(p.wait(WAIT) for p in pendings)
    assert runner.batches == [1, 1, 2, 1]
    batcher.close()


def test_under_load_a_short_batch_waits_for_its_preferred_size():
    policy = BatchingPolicy(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_s=3600)
    batcher, runner, first = start_busy(policy)
    early = [request(1.0), request(2.0)]
    for pending in early:
        batcher.submit(pending)
    runner.open()
    assert first.wait(WAIT)
    # The instance came free with two requests waiting: it holds them for two more.
    late = [request(3.0), request(4.0)]
    for pending in late:
        batcher.submit(pending)
    assert all(p.wait(WAIT) for p in early + late)
    assert runner.batches == [1, 4]
    batcher.close()


def test_close_runs_what_is_queued_then_refuses_new_requests():
    batcher, runner, _first = start_busy(BatchingPolicy())
    queued = request(1.0)
    batcher.submit(queued)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    runner.open()
    closer.join(WAIT)
    assert queued.wait(0)
    np.testing.assert_array_equal(queued.result()["y"], [[2.0]])
    with pytest.raises(Exception, match="unloading"):
        batcher.submit(request(2.0))


def test_several_instances_run_batches_in_parallel():
    gates = [GatedRunner(), GatedRunner()]
    batcher = DynamicBatcher("m", gates, BatchingPolicy(enabled=False))
    a, b = request(1.0), request(2.0)
    batcher.submit(a)
    batcher.submit(b)
    # Both instances are inside the runtime at the same time.
    assert gates[0].entered.wait(WAIT)
    assert gates[1].entered.wait(WAIT)
    for gate in gates:
        gate.open()
    assert a.wait(WAIT) and b.wait(WAIT)
    batcher.close()


def test_a_failing_observer_never_strands_a_waiter():
    class BrokenObserver(NullObserver):
        def batch_done(self, *args: object) -> None:
            raise RuntimeError("metrics backend exploded")

    runner = GatedRunner()
    runner.open()
    batcher = DynamicBatcher("m", [runner], BatchingPolicy(), BrokenObserver())
    pending = request(1.0)
    batcher.submit(pending)
    assert pending.wait(WAIT)
    batcher.close()
