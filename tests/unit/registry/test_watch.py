"""The watch fan-out: bounded queues, slow subscribers cut off, not buffered."""

from __future__ import annotations

import pytest

from modelplane.kernel.errors import Overloaded, ResourceExhausted, Unavailable
from modelplane.services.registry.watch import WatchHub


async def test_events_reach_subscribers_of_their_model_only() -> None:
    hub: WatchHub[str] = WatchHub(queue_size=4, max_subscribers=10)
    fraud = hub.subscribe("fraud")
    churn = hub.subscribe("churn")
    hub.publish("fraud", "moved")
    assert await fraud.next() == "moved"
    assert churn.pending == 0


async def test_a_subscriber_that_falls_behind_is_cut_off() -> None:
    dropped: list[int] = []
    hub: WatchHub[int] = WatchHub(
        queue_size=3, max_subscribers=10, on_overflow=lambda: dropped.append(1)
    )
    slow = hub.subscribe("fraud")
    fast = hub.subscribe("fraud")
    for event in range(3):
        hub.publish("fraud", event)
    assert [await fast.next() for _ in range(3)] == [0, 1, 2]
    hub.publish("fraud", 3)  # slow has 3 queued: no room
    assert slow.pending == 1  # its backlog was dropped, only the cut-off notice remains
    with pytest.raises(ResourceExhausted, match="fell more than 3 events behind"):
        await slow.next()
    assert dropped == [1]
    assert hub.subscribers == 1
    assert await fast.next() == 3
    for event in range(100):  # the cut-off subscriber no longer accumulates anything
        hub.publish("fraud", event)
        await fast.next()
    assert slow.pending == 0


async def test_subscriber_limit_and_close() -> None:
    counts: list[int] = []
    hub: WatchHub[str] = WatchHub(queue_size=2, max_subscribers=1, on_change=counts.append)
    only = hub.subscribe("fraud")
    with pytest.raises(Overloaded):
        hub.subscribe("fraud")
    hub.publish("fraud", "a")
    hub.publish("fraud", "b")
    hub.close()  # even with a full queue, the close notice fits
    assert [await only.next(), await only.next()] == ["a", "b"]
    with pytest.raises(Unavailable, match="shutting down"):
        await only.next()
    with pytest.raises(Overloaded):
        hub.subscribe("churn")
    hub.unsubscribe(only)
    assert counts == [1, 0]
