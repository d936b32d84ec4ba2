"""In-process fan-out of model changes to WatchModel subscribers.

Each subscriber owns a bounded queue. Publishing never waits: a subscriber whose
queue is full has fallen behind, so its pending events are dropped and it is told
to reconnect (it then gets a fresh snapshot), instead of letting one slow reader
grow the server's memory or hold back the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from modelplane.kernel.errors import Overloaded, ResourceExhausted, Unavailable

Event = TypeVar("Event")


class _Closed:
    def __init__(self, message: str) -> None:
        self.message = message


_OVERFLOWED = object()


class Subscription(Generic[Event]):
    def __init__(self, model: str, queue_size: int) -> None:
        self.model = model
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=queue_size + 1)
        self._capacity = queue_size
        self.overflowed = False

    def offer(self, event: Event) -> bool:
        """Queues an event; False (and the subscriber is cut off) if it had no room."""
        if self.overflowed:
            return False
        if self._queue.qsize() >= self._capacity:
            self.overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_OVERFLOWED)
            return False
        self._queue.put_nowait(event)
        return True

    def close(self, message: str) -> None:
        if not self.overflowed and self._queue.qsize() <= self._capacity:
            self._queue.put_nowait(_Closed(message))

    async def next(self) -> Event:
        """The next event; Unavailable once the hub closed, ResourceExhausted if cut off
        (either way the watcher should watch again, elsewhere or later)."""
        item = await self._queue.get()
        if isinstance(item, _Closed):
            raise Unavailable(item.message)
        if item is _OVERFLOWED:
            raise ResourceExhausted(
                f"watch of {self.model} fell more than {self._capacity} events behind;"
                " watch again to get a fresh snapshot"
            )
        return item  # type: ignore[return-value]

    @property
    def pending(self) -> int:
        return self._queue.qsize()


class WatchHub(Generic[Event]):
    """Must be used from one event loop thread (publishers and subscribers alike)."""

    def __init__(
        self,
        queue_size: int,
        max_subscribers: int,
        on_change: Callable[[int], None] = lambda _: None,
        on_overflow: Callable[[], None] = lambda: None,
    ) -> None:
        self._queue_size = queue_size
        self._max_subscribers = max_subscribers
        self._subscribers: dict[str, set[Subscription[Event]]] = {}
        self._count = 0
        self._on_change = on_change
        self._on_overflow = on_overflow
        self._closed = False

    @property
    def subscribers(self) -> int:
        return self._count

    def subscribe(self, model: str) -> Subscription[Event]:
        if self._closed:
            raise Overloaded("the registry is shutting down")
        if self._count >= self._max_subscribers:
            raise Overloaded(f"the registry already serves {self._max_subscribers} watches")
        subscription: Subscription[Event] = Subscription(model, self._queue_size)
        self._subscribers.setdefault(model, set()).add(subscription)
        self._count += 1
        self._on_change(self._count)
        return subscription

    def unsubscribe(self, subscription: Subscription[Event]) -> None:
        group = self._subscribers.get(subscription.model)
        if group is None or subscription not in group:
            return
        group.discard(subscription)
        if not group:
            del self._subscribers[subscription.model]
        self._count -= 1
        self._on_change(self._count)

    def publish(self, model: str, event: Event) -> None:
        for subscription in list(self._subscribers.get(model, ())):
            if not subscription.offer(event):
                self._on_overflow()
                self.unsubscribe(subscription)

    def disconnect_all(self, message: str) -> None:
        """Ends every watch; each sees Unavailable(message) after its queued events."""
        for group in list(self._subscribers.values()):
            for subscription in list(group):
                subscription.close(message)
                self.unsubscribe(subscription)

    def close(self) -> None:
        self._closed = True
        self.disconnect_all("the registry is shutting down; watch again")
