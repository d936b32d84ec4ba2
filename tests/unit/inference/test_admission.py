"""Admission control in the batcher: a request is refused at once when the queue has no
room for its rows, when the work ahead of it would take longer than the queue-wait bound,
or could not be done before its deadline, in batches as long as recent ones of their size,
and later if it is still queued past the bound; every refusal carries a retry hint and is
counted by reason.

Batch times are set by hand (`KnownLine`) where a test needs known ones, and
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


def test_a_batch_s_time_is_a_line_in_its_rows_fitted_to_recent_batches():
    rate = ServiceRate()
    assert rate.batch_time(1) is None and rate.drain_s(10, 64, 1) is None
    rate.add(1, 2_000_000)  # 1 row in 2 ms
    rate.add(64, 65_000_000)  # 64 rows in 65 ms: 1 ms a batch and 1 ms a row
    rate.add(0, 5_000_000)  # nothing ran: no sample
    assert rate.batch_time(16) == pytest.approx(0.017)
    # 130 rows: two full batches and one of 2 rows, on one instance and on two.
    assert rate.drain_s(130, 64, 1) == pytest.approx(2 * 0.065 + 0.003)
    assert rate.drain_s(130, 64, 2) == pytest.approx((2 * 0.065 + 0.003) / 2)
    for _ in range(60):  # the batches got twice as slow; the past fades
        rate.add(1, 4_000_000)
        rate.add(64, 130_000_000)
    assert rate.batch_time(16) == pytest.approx(0.034, rel=0.01)


def test_after_batches_of_one_size_a_larger_batch_takes_at_most_proportionally_longer():
    """Whatever the line is (neither term negative), a batch of 16 rows after 1-row
    batches of 8 ms takes at most 16 x 8 ms and a smaller one at most 8 ms. A 100 ms
    bound still admits a batch of 12 (96 ms), and once one larger batch ran the line is
    fitted: a rows-per-second rate for every size had kept the batches at one row for
    good. Taking any batch as long as recent ones had, at 5x overload, admitted 64 rows
    after batches of 21 as 100 ms of work; they took 215."""
    rate = ServiceRate()
    for _ in range(5):
        rate.add(1, 8_000_000)
    assert rate.batch_time(1) == pytest.approx(0.008)
    assert rate.batch_time(16) == pytest.approx(0.128)
    assert rate.drain_s(12, 64, 1) == pytest.approx(0.096)
    assert rate.drain_s(130, 64, 1) == pytest.approx(130 * 0.008)
    rate.add(12, 9_000_000)  # the 12 rows were one 9 ms batch
    assert rate.batch_time(16) < 0.012
    assert rate.drain_s(64, 64, 1) < 0.1
    rate = ServiceRate()
    for _ in range(5):
        rate.add(21, 100_000_000)  # batches of 21 rows lately
    assert rate.batch_time(4) == pytest.approx(0.1)
    assert rate.batch_time(64) == pytest.approx(0.1 * 64 / 21)


def test_a_line_through_noise_never_gives_a_batch_less_than_nothing():
    rate = ServiceRate()
    rate.add(10, 1_000_000)
    rate.add(60, 60_000_000)  # fitted: -11 ms a batch; taken as proportional instead
    assert rate.batch_time(1) is not None and rate.batch_time(1) > 0
    rate = ServiceRate()
    rate.add(10, 50_000_000)
    rate.add(60, 40_000_000)  # larger batches faster: no line, as after batches of one size
    assert rate.batch_time(1) == pytest.approx(rate.batch_time(30))  # up to their size
    mean_rows, mean_s = (0.9 * 10 + 60) / 1.9, (0.9 * 0.05 + 0.04) / 1.9
    assert rate.batch_time(64) == pytest.approx(mean_s * 64 / mean_rows)  # then in proportion


async def test_finished_batches_set_the_time_of_all_instances():
    runners = [GatedRunner(), GatedRunner()]
    for runner in runners:
        runner.open()
    batcher = DynamicBatcher("m", runners, BatchingPolicy())
    assert batcher.drain_s(10) is None
    pending = request(1.0, 2.0)
    batcher.submit(pending)
    await settle(pending)
    one = batcher.rate.batch_time(64)
    assert one is not None and one > 0
    assert batcher.drain_s(128) == pytest.approx(2 * one / 2)  # two batches, two instances
    await batcher.close()


class KnownLine(ServiceRate):
    """A service whose batches take exactly `fixed_s + per_row_s x rows`."""

    def __init__(self, fixed_s: float, per_row_s: float) -> None:
        super().__init__()
        self.fixed_s, self.per_row_s = fixed_s, per_row_s

    def batch_time(self, rows: int) -> float | None:
        return self.fixed_s + self.per_row_s * rows

    def add(self, rows: int, ns: int) -> None:
        pass  # the test's line holds, whatever runs


async def busy_with_known_line(
    fixed_s: float,
    per_row_s: float,
    queued: int,
    max_queue_wait_s: float = 0.0,
    max_queue_rows: int = 64,
) -> tuple[DynamicBatcher, GatedRunner, list[PendingRequest]]:
    """One instance blocked in a 1-row batch, `queued` rows waiting, batches of a known
    time; no queue-wait bound unless asked."""
    policy = BatchingPolicy(max_queue_rows=max_queue_rows, max_queue_wait_s=max_queue_wait_s)
    batcher, runner, first = await start_busy(policy)
    batcher.rate = KnownLine(fixed_s, per_row_s)
    waiting = [request(float(i)) for i in range(queued)]
    for pending in waiting:
        batcher.submit(pending)
    return batcher, runner, [first, *waiting]


async def test_a_request_whose_deadline_comes_before_the_work_ahead_is_rejected():
    # 1 row running and 5 queued, batches of 0.1 s + 0.1 s a row: 0.7 s ahead (one batch
    # of 6 rows), 0.8 s with its own row.
    batcher, runner, admitted = await busy_with_known_line(0.1, 0.1, queued=5)
    hurried = request(9.0, deadline=time.monotonic() + 0.2)
    with pytest.raises(Rejected) as rejected:
        batcher.submit(hurried)
    assert isinstance(rejected.value, Overloaded)  # UNAVAILABLE to the caller
    assert rejected.value.reason == "deadline"
    assert rejected.value.retry_after_ms == 701  # the 6 rows ahead, rounded up
    assert trailers_for(rejected.value) == (("grpc-retry-pushback-ms", "701"),)
    assert "retry after 701 ms" in rejected.value.message
    assert hurried.future is None and batcher.queued_rows == 5  # never queued

    patient = request(9.0, deadline=time.monotonic() + 60)
    batcher.submit(patient)  # a minute is enough
    runner.open()
    await settle(*admitted, patient)
    await batcher.close()


async def test_a_request_without_a_deadline_is_refused_only_by_a_full_queue():
    batcher, runner, admitted = await busy_with_known_line(1.0, 1.0, queued=60)  # a minute
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
    assert batcher.drain_s(1) is None
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
    # Batches of 10 ms + 1 ms a row (64 rows: 74 ms), bound 0.2 s: 169 rows ahead are 2
    # full batches and one of 41 rows, 0.199 s, admitted; 171 rows, 0.201 s, refused.
    batcher, runner, admitted = await busy_with_known_line(
        0.010, 0.001, queued=168, max_queue_wait_s=0.2, max_queue_rows=1024
    )
    last_in = request(1.0, 2.0)
    batcher.submit(last_in)  # 169 ahead: 0.148 + 0.051 = 0.199 s
    with pytest.raises(Rejected) as long_wait:
        batcher.submit(request(1.0))  # 171 ahead: 0.148 + 0.053 = 0.201 s
    assert long_wait.value.reason == "queue_wait"
    assert "Queue too long" in long_wait.value.message
    assert long_wait.value.retry_after_ms == 202
    assert batcher.queued_rows == 168 + 2
    runner.open()
    await settle(*admitted, last_in)
    await batcher.close()


async def test_a_slow_models_next_batch_is_never_refused_by_a_short_bound():
    # Batches of 1 s + 10 ms a row (a recent batch: 1.01 s), bound 0.2 s: never below two
    # batches' time, 2.02 s, so a full batch queued behind the running one is admitted.
    batcher, runner, admitted = await busy_with_known_line(
        1.0, 0.010, queued=63, max_queue_wait_s=0.2, max_queue_rows=1024
    )
    full_batch_behind = request(1.0)
    batcher.submit(full_batch_behind)  # 64 rows ahead, one batch: 1.64 s
    with pytest.raises(Rejected) as long_wait:
        batcher.submit(request(1.0))  # 65 ahead: 1.64 + 1.01 = 2.65 s
    assert long_wait.value.reason == "queue_wait"
    runner.open()
    await settle(*admitted, full_batch_behind)
    await batcher.close()


async def test_the_queue_wait_bound_holds_after_long_full_batches():
    # Recent batches: full ones of 64 rows in 257 ms and 1-row ones in 5 ms, the line
    # 1 ms + 4 ms a row. The 0.1 s bound is floored at two 1-row batches (10 ms), not at
    # two recent batches (~0.26 s, under which requests waited ~0.5 s behind full ones).
    batcher, runner, first = await start_busy(BatchingPolicy(max_queue_wait_s=0.1))
    rate = ServiceRate()
    for _ in range(5):
        rate.add(64, 257_000_000)
        rate.add(1, 5_000_000)
    batcher.rate = rate
    waiting = [request(float(i)) for i in range(24)]
    for pending in waiting:
        batcher.submit(pending)  # the last one behind 24 rows: 0.097 s
    hint = batcher.refuses_any()  # 25 rows ahead: 0.101 s
    assert hint is not None and 100 <= hint <= 103
    with pytest.raises(Rejected) as long_wait:
        batcher.submit(request(1.0))
    assert long_wait.value.reason == "queue_wait"
    assert long_wait.value.retry_after_ms == hint
    assert batcher.queued_rows == 24
    runner.open()
    await settle(first, *waiting)
    assert batcher.refuses_any() is None  # nothing ahead any more
    await batcher.close()


async def test_refuses_any_answers_for_a_1_row_request_without_a_deadline():
    batcher, runner, admitted = await busy_with_known_line(1.0, 1.0, queued=60)  # a minute
    assert batcher.refuses_any() is None  # no queue-wait bound, room for 4 more rows
    unhurried = request(1.0, 2.0, 3.0, 4.0)
    batcher.submit(unhurried)
    assert batcher.refuses_any() == 10_000  # the queue is full: the capped hint
    runner.open()
    await settle(*admitted, unhurried)
    assert batcher.refuses_any() is None
    await batcher.close()


async def test_the_queue_wait_bound_keeps_to_the_recent_batches():
    # Fast batches (1 ms + 0.1 ms a row), bound 0.1 s: a full queue is a few ms of work.
    batcher, runner, admitted = await busy_with_known_line(
        0.001, 0.0001, queued=63, max_queue_wait_s=0.1
    )
    runner.open()
    await settle(*admitted)
    await batcher.close()


async def test_a_request_still_queued_past_the_bound_is_refused_not_run():
    """The admission estimate can be short (the first batches of a flood run slower than
    those it was learned from): a request that has waited past the bound when its batch
    forms is refused then, with UNAVAILABLE and a retry hint, counted by reason, and never
    run; one within the bound runs. Time is moved by hand: the late one's queueing is set
    10 s back, against a 5 s bound."""
    registry = CollectorRegistry()
    stats = VersionStats("m", "1", InferenceMetrics(registry))
    runner = GatedRunner()
    policy = BatchingPolicy(max_batch_size=1, max_queue_wait_s=5.0)
    batcher = DynamicBatcher("m", [runner], policy, observer=stats)
    first = request(0.0)
    batcher.submit(first)
    await runner.wait_entered()
    batcher.rate = KnownLine(0.001, 0.001)  # 2 ms a 1-row batch: the bound stays 5 s
    late, in_time = request(1.0), request(2.0)
    batcher.submit(late)
    batcher.submit(in_time)
    late.enqueued_ns -= 10 * SECOND_NS  # it has waited 10 s
    runner.open()
    await settle(first, late, in_time)
    assert late.future is not None and in_time.future is not None
    timed_out = late.future.exception()
    assert isinstance(timed_out, Rejected) and isinstance(timed_out, Overloaded)
    assert timed_out.reason == "queue_timeout"
    assert "Queue timeout" in timed_out.message and "bound (5000 ms)" in timed_out.message
    assert timed_out.retry_after_ms is not None and timed_out.retry_after_ms >= 1
    assert in_time.future.result()["y"][0, 0] == 4.0
    assert runner.batches == [1, 1]  # the first and the one in time: the late one never ran
    assert (
        registry.get_sample_value(
            "modelplane_inference_requests_total",
            {"model": "m", "version": "1", "outcome": "rejected", "reason": "queue_timeout"},
        )
        == 1
    )
    assert stats.snapshot().rejected == 1 and batcher.queued_rows == 0
    await batcher.close()


async def test_without_a_bound_or_within_a_slow_models_floor_a_long_wait_still_runs():
    """No queue-wait bound: a request waits as long as it takes. A slow model's bound is
    never below two 1-row batches' time (here 2.02 s against a 0.2 s bound): a request
    that waited 1 s behind its running batch still runs."""
    for bound_s, line in ((0.0, KnownLine(0.001, 0.001)), (0.2, KnownLine(1.0, 0.01))):
        runner = GatedRunner()
        batcher = DynamicBatcher("m", [runner], BatchingPolicy(max_queue_wait_s=bound_s))
        first = request(0.0)
        batcher.submit(first)
        await runner.wait_entered()
        batcher.rate = line
        waited = request(1.0)
        batcher.submit(waited)
        waited.enqueued_ns -= SECOND_NS
        runner.open()
        await settle(first, waited)
        assert waited.future is not None and waited.future.result()["y"][0, 0] == 2.0
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
