"""The loop-lag shedder's controller: the share of calls let through falls by a quarter on
each tick that finds the event loop late, rises again on each tick that finds it on time,
and calls are refused at random in that share, counted."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from prometheus_client import CollectorRegistry

from modelplane.kernel.load_shedding import (
    DECREASE,
    INCREASE,
    MIN_SHARE,
    ON_TIME_S,
    LoopLagShedder,
)


def test_late_ticks_cut_the_share_and_on_time_ticks_restore_it():
    shedder = LoopLagShedder(0.002)
    shedder.observe(0.001)  # between on time and the bound: unchanged
    assert shedder.share == 1.0
    shedder.observe(0.003)
    assert shedder.share == pytest.approx(DECREASE)
    for _ in range(100):
        shedder.observe(0.050)
    assert shedder.share == MIN_SHARE  # never nothing
    shedder.observe(0.001)
    assert shedder.share == MIN_SHARE
    shedder.observe(ON_TIME_S)
    assert shedder.share == pytest.approx(MIN_SHARE + INCREASE)
    for _ in range(100):
        shedder.observe(0.0)
    assert shedder.share == 1.0
    with pytest.raises(ValueError):
        LoopLagShedder(0.0)


def test_calls_are_refused_at_random_in_the_share_and_counted():
    registry = CollectorRegistry()
    shedder = LoopLagShedder(0.002, registry)
    assert all(shedder.admit() for _ in range(1_000))  # the loop keeps up: all through
    shedder.share = 0.25
    shedder._random = random.Random(7)
    admitted = sum(shedder.admit() for _ in range(10_000))
    assert 2_300 < admitted < 2_700
    assert registry.get_sample_value("modelplane_grpc_calls_shed_total") == 10_000 - admitted
    assert registry.get_sample_value("modelplane_grpc_admitted_share") == 0.25


async def test_a_busy_loop_is_seen_late_and_a_free_one_on_time():
    shedder = LoopLagShedder(0.002)
    shedder.start()
    try:
        loop = asyncio.get_running_loop()
        flood_over = loop.create_future()

        def busy(left: int) -> None:
            # Always one 4 ms callback ready, as when a flood of calls keeps the loop busy:
            # every probe of the loop meanwhile waits behind one.
            time.sleep(0.004)  # ok-sleep: the busy callback itself, holding the loop
            if left:
                loop.call_soon(busy, left - 1)
            else:
                flood_over.set_result(None)

        loop.call_soon(busy, 50)
        await flood_over
        assert shedder.share < 1.0
        for _ in range(1_000):  # then every probe finds the loop free: all back
            if shedder.share == 1.0:
                break
            await asyncio.sleep(0.01)  # ok-sleep: polling the share the probe raises
        assert shedder.share == 1.0
    finally:
        await shedder.stop()
