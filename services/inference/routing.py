"""Which loaded version answers a request for a model served from the registry.

A model's rollout policy (held in the registry) splits its requests between aliases by
weight, e.g. production 90 / canary 10, and may mirror a share to a shadow alias. A
request that carries a `routing_key` parameter lands on a point fixed by the key's
CRC-32 (the same in every process and worker, unlike Python's salted `hash`), so the
same key always reaches the same route while the policy holds; raising the canary's
weight only moves keys towards the canary, because the primary's range comes first.
Requests without a key draw a random point.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")

POINTS = 10_000
"""Resolution of the split: weights are percents, so 100 points per percent."""


@dataclass(frozen=True, slots=True)
class Route(Generic[V]):
    alias: str
    version: V
    weight: int
    """Percent of requests, 1..100."""


@dataclass(frozen=True, slots=True)
class Shadow(Generic[V]):
    alias: str
    version: V
    percent: int
    """Percent of requests mirrored, 1..100."""


class RouteTable(Generic[V]):
    """Immutable: a policy change builds a new table and swaps it in whole."""

    __slots__ = ("_bounds", "_single", "routes", "shadow")

    def __init__(self, routes: Sequence[Route[V]], shadow: Shadow[V] | None = None) -> None:
        if not routes:
            raise ValueError("a route table needs at least one route")
        if sum(route.weight for route in routes) != 100:
            raise ValueError("route weights must sum to 100")
        self.routes = tuple(routes)
        self.shadow = shadow
        self._single = routes[0] if len(routes) == 1 else None
        bounds: list[tuple[int, Route[V]]] = []
        total = 0
        for route in routes:
            total += route.weight * (POINTS // 100)
            bounds.append((total, route))
        self._bounds = tuple(bounds)

    def pick(self, routing_key: str | None = None) -> Route[V]:
        if self._single is not None:
            return self._single
        point = key_point(routing_key) if routing_key else random.randrange(POINTS)
        for bound, route in self._bounds:
            if point < bound:
                return route
        return self._bounds[-1][1]

    def mirror(self) -> Shadow[V] | None:
        """The shadow route when this request is one of the mirrored share."""
        shadow = self.shadow
        if shadow is None or random.randrange(100) >= shadow.percent:
            return None
        return shadow


def key_point(routing_key: str) -> int:
    return zlib.crc32(routing_key.encode("utf-8")) % POINTS
