"""The stability scenario's arithmetic and report (no servers)."""

from __future__ import annotations

import math
import os
import threading
import time

import pytest

from modelplane.loadtest.starts import (
    Batches,
    Measured,
    ThreadTimes,
    print_stability,
    print_workers,
    read_threads,
    spread,
    thread_times,
)
from modelplane.loadtest.stats import LatencySummary, LevelResult


def level(
    label: str, ok: int, p50_ms: float, server_cpu_s: float, client_cpu_s: float = 0.1
) -> LevelResult:
    latency = LatencySummary(ok, p50_ms, p50_ms, p50_ms, p50_ms, p50_ms, p50_ms * 2)
    return LevelResult(
        label=label,
        mode="closed",
        concurrency=int(label[2:]),
        rate=None,
        elapsed_s=1.0,
        ok=ok,
        errors={},
        scheduled=ok,
        rows_per_request=1,
        latency=latency,
        server_cpu_s=server_cpu_s,
        client_cpu_s=client_cpu_s,
    )


def start(rps: int, p50_ms: float, others: float = 0.0) -> Measured:
    return Measured(
        {"c=1": level("c=1", 700, p50_ms, 0.7), "c=64": level("c=64", rps, 20.0, rps * 3e-4)},
        others,
        [Batches(1.0, 450.0), Batches(20.0, 3000.0)],
    )


def test_spread_is_max_over_min_and_the_coefficient_of_variation():
    ratio, cv = spread([2.0, 4.0])
    assert ratio == 2.0 and cv == pytest.approx(1 / 3)
    assert spread([5.0, 5.0, 5.0]) == (1.0, 0.0)
    assert all(math.isnan(value) for value in spread([]))


def test_the_report_gives_each_start_and_the_spread(capsys):
    print_stability(
        [start(4000, 1.0), start(4200, 1.05, others=0.5), start(3900, 1.02)], 400.0, 180.0
    )
    out = capsys.readouterr().out
    assert out.count("\n    ") >= 3  # one row per start
    assert "c=64 throughput: 3900-4200 req/s, max/min 1.08" in out
    assert (
        "c=1 p50" in out
        and "floor at c=64: 180 µs" in out
        and "floor at c=1 (400 µs" in out
        and "one row on its runtime thread (median 450 µs)" in out
    )
    assert "the 2 starts with others + steal under 0.1 CPU" in out


def test_the_workers_report_gives_the_ratio(capsys):
    print_workers(start(3000, 1.0), start(4800, 1.0), 2)
    assert "2 workers / 1 worker throughput: 1.60x" in capsys.readouterr().out


def test_the_spread_in_the_machines_speed_divides_by_the_generators_cpu(capsys):
    # The second start ran on a machine 1.5x slower: the server and the generator alike
    # took 1.5x the CPU per request, throughput fell by as much, and the p50 grew.
    def on(speed: float) -> Measured:
        rps = int(4000 / speed)
        return Measured(
            {
                "c=1": level("c=1", 700, 1.0 * speed, 0.7, client_cpu_s=0.07 * speed),
                "c=64": level("c=64", rps, 20.0, rps * 3e-4 * speed, rps * 1e-4 * speed),
            },
            0.0,
            [Batches(1.0, 450.0), Batches(20.0, 3000.0)],
            threads=[ThreadTimes(0.1, 0.0, 0.6, 70), ThreadTimes(0.6 * speed, 0.1, 0.5, 7000)],
        )

    print_stability([on(1.0), on(1.5)], 400.0, 180.0)
    out = capsys.readouterr().out
    assert "c=64 throughput: 2666-4000 req/s, max/min 1.50" in out
    assert "max/min 1.00 (c=64 throughput), 1.00 (c=64 server CPU/request), 1.00 (c=1 p50)" in out
    assert "generator CPU/request 1.50x at c=64" in out
    # c=64 by thread: the loop's 0.6 s over 4,000 requests, preempted 7,000 times.
    assert "loop  150 (preempted 1.8/request)" in out


def test_a_process_threads_are_read_and_sorted_by_role():
    pid = os.getpid()
    before = read_threads(pid)
    assert pid in before and before[pid][2] == frozenset(os.sched_getaffinity(0))
    spun, done = threading.Event(), threading.Event()
    elsewhere = min(os.sched_getaffinity(0))

    def spin() -> None:  # a thread placed on other CPUs than the main thread's
        os.sched_setaffinity(0, {elsewhere})
        deadline = time.thread_time() + 0.2  # CPU time is counted in ticks: take many
        while time.thread_time() < deadline:
            pass
        spun.set()
        done.wait(10)

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert spun.wait(10)
        times = thread_times(pid, before, read_threads(pid))
    finally:
        done.set()
        worker.join()
    placed_apart = frozenset(os.sched_getaffinity(0)) != frozenset({elsewhere})
    assert (times.compute_s if placed_apart else times.serving_s) >= 0.05
    assert times.loop_s >= 0 and times.loop_preempted >= 0
