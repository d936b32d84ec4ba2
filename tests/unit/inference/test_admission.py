"""Admission control in the batcher: a request is refused at once when the queue has no
room for its rows, when the work ahead of it would take longer than the queue-wait bound,
or could not be done before its deadline, at the rate recent batches ran at; every
refusal carries a retry hint and is counted by reason.

The service rate is set by hand (`ServiceRate.add`) where a test needs a known one, and
a gated runner holds the only instance busy, so what is ahead of a request is known
exactly: no sleeps, no timing assertions (deadlines are seconds away from the estimate).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelplane.kernel.errors import Overloaded, trailers_for
from modelplane.services.inference.batcher import (
    DEFAULT_RETRY_AFTER_MS,
    BatchingPolicy,
    DynamicBatcher,
    PendingRequest,
    Rejected,
    ServiceRate,
    Tensors,
)
from modelplane.services.inference.stats import InferenceMetrics, VersionStats
from tests.unit.inference.test_batcher import GatedRunner, request, settle, start_busy

SECOND_NS = 1_000_000_000


def test_the_rate_is_rows_over_instance_time_of_recent_batches():
    rate = ServiceRate()
    assert rate.rows_per_s is None
    rate.add(64, 32_000_000)  # 64 rows in 32 ms
    assert rate.rows_per_s == pytest.approx(2000)
    rate.add(0, 5_000_000)  # nothing ran: no sample
    assert rate.rows_per_s == pytest.approx(2000)
    for _ in range(30):  # the batches got twice as slow; the past fades
        rate.add(64, 64_000_000)
    assert rate.rows_per_s == pytest.approx(1000, rel=0.01)


async def test_finished_batches_set_the_rate_of_all_instances():
    runners = [GatedRunner(), GatedRunner()]
    for runner in runners:
        runner.open()
    batcher = DynamicBatcher("m", runners, BatchingPolicy())
    assert batcher.rows_per_s is None
    pending = request(1.0, 2.0)
    batcher.submit(pending)
    await settle(pending)
    measured = batcher.rate.rows_per_s
    assert measured is not None and measured > 0
    assert batcher.rows_per_s == pytest.approx(2 * measured)
    await batcher.close()


async def busy_with_known_rate(
    rows_per_s: float, queued: int, max_queue_wait_s: float = 0.0
) -> tuple[DynamicBatcher, GatedRunner, list[PendingRequest]]:
    """One instance blocked in a 1-row batch, `queued` rows waiting, a known rate (one
    batch of `rows_per_s` rows in a second); no queue-wait bound unless asked."""
    policy = BatchingPolicy(max_queue_rows=64, max_queue_wait_s=max_queue_wait_s)
    batcher, runner, first = await start_busy(policy)
    batcher.rate.add(int(rows_per_s), SECOND_NS)
    waiting = [request(float(i)) for i in range(queued)]
    for pending in waiting:
        batcher.submit(pending)
    return batcher, runner, [first, *waiting]


async def test_a_request_whose_deadline_comes_before_the_work_ahead_is_rejected():
    # 1 row running and 5 queued at 10 rows/s: 0.6 s ahead, 0.7 s with its own row.
    batcher, runner, admitted = await busy_with_known_rate(10, queued=5)
    hurried = request(9.0, deadline=time.monotonic() + 0.2)
    with pytest.raises(Rejected) as rejected:
        batcher.submit(hurried)
    assert isinstance(rejected.value, Overloaded)  # UNAVAILABLE to the caller
    assert rejected.value.reason == "deadline"
    assert rejected.value.retry_after_ms == 601  # the 6 rows ahead, rounded up
    assert trailers_for(rejected.value) == (("grpc-retry-pushback-ms", "601"),)
    assert "retry after 601 ms" in rejected.value.message
    assert hurried.future is None and batcher.queued_rows == 5  # never queued

    patient = request(9.0, deadline=time.monotonic() + 60)
    batcher.submit(patient)  # a minute is enough
    runner.open()
    await settle(*admitted, patient)
    await batcher.close()


async def test_a_request_without_a_deadline_is_refused_only_by_a_full_queue():
    batcher, runner, admitted = await busy_with_known_rate(1, queued=60)  # a minute ahead
    unhurried = request(1.0, 2.0, 3.0, 4.0)
    batcher.submit(unhurried)  # no deadline: it waits as long as it takes
    assert batcher.queued_rows == 64
    with pytest.raises(Rejected) as full:
        batcher.submit(request(5.0))
    assert full.value.reason == "queue_full"
    assert "Exceeds maximum queue size" in full.value.message
    assert full.value.retry_after_ms == 10_000  # 65 s ahead, capped
    runner.open()
    await settle(*admitted, unhurried)
    await batcher.close()


async def test_before_any_batch_finished_only_the_queue_bound_applies():
    batcher, runner, _first = await start_busy(BatchingPolicy(max_queue_rows=2))
    assert batcher.rows_per_s is None
    hurried = request(1.0, deadline=time.monotonic() + 0.001)
    batcher.submit(hurried)  # no rate known: nothing to compare the deadline with
    batcher.submit(request(2.0))
    with pytest.raises(Rejected) as full:
        batcher.submit(request(3.0))
    assert full.value.reason == "queue_full"
    assert full.value.retry_after_ms == DEFAULT_RETRY_AFTER_MS
    runner.open()
    await batcher.close()


async def test_a_request_behind_more_than_the_queue_wait_bound_is_rejected():
    # A slow model: one 40-row batch a second (40 rows/s). The bound asked is 0.2 s, but
    # never below two batches' time: 2 s, that is 80 rows ahead.
    policy = BatchingPolicy(max_queue_rows=1024, max_queue_wait_s=0.2)
    batcher, runner, first = await start_busy(policy)
    batcher.rate.add(40, SECOND_NS)
    assert batcher.rate.batch_s == pytest.approx(1.0)
    admitted = [request(1.0, 2.0) for _ in range(40)]  # 1 + 78 rows ahead of the last
    for pending in admitted:
        batcher.submit(pending)
    with pytest.raises(Rejected) as long_wait:  # 81 rows ahead: 2.025 s
        batcher.submit(request(1.0))
    assert long_wait.value.reason == "queue_wait"
    assert "Queue too long" in long_wait.value.message
    assert long_wait.value.retry_after_ms == 2026
    runner.open()
    await settle(first, *admitted)
    await batcher.close()


async def test_the_queue_wait_bound_keeps_to_the_recent_rate():
    # Fast batches (100 rows in 10 ms: 10,000 rows/s), bound 0.1 s: 1,000 rows ahead would
    # be refused; 63 rows ahead (6 ms) are not.
    policy = BatchingPolicy(max_queue_rows=64, max_queue_wait_s=0.1)
    batcher, runner, first = await start_busy(policy)
    batcher.rate.add(100, SECOND_NS // 100)
    waiting = [request(float(i)) for i in range(63)]
    for pending in waiting:
        batcher.submit(pending)
    runner.open()
    await settle(first, *waiting)
    await batcher.close()


def test_rejections_are_counted_by_reason():
    registry = CollectorRegistry()
    stats = VersionStats("m", "1", InferenceMetrics(registry))
    stats.request_rejected(request(1.0), "deadline")
    stats.request_rejected(request(1.0), "deadline")
    stats.request_rejected(request(1.0), "queue_full")

    def count(reason: str) -> float | None:
        return registry.get_sample_value(
            "modelplane_inference_requests_total",
            {"model": "m", "version": "1", "outcome": "rejected", "reason": reason},
        )

    assert (count("deadline"), count("queue_full")) == (2, 1)
    snapshot = stats.snapshot()
    assert snapshot.rejected == 3 and snapshot.fail.count == 3


async def test_instance_threads_run_at_the_nice_value_asked():
    class NiceProbe(GatedRunner):
        nice = 0

        def __call__(self, feeds: Tensors) -> dict[str, np.ndarray]:
            self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super().__call__(feeds)

    runner = NiceProbe()
    runner.open()
    before = os.getpriority(os.PRIO_PROCESS, 0)
    batcher = DynamicBatcher("m", [runner], BatchingPolicy(), thread_nice=3)
    pending = request(1.0)
    batcher.submit(pending)
    await settle(pending)
    assert runner.nice == max(before, 3)  # set, never lowered below the process's
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # not ours
    await batcher.close()
