"""What one load level measured, and the percentile definition used for it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at
    or below it. Always an observed latency (no interpolation between samples)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    rank = max(1, math.ceil(q / 100 * data.size))
    return float(np.partition(data, rank - 1)[rank - 1])


@dataclass(frozen=True)
class LatencySummary:
    """Latency of the successful requests of a level, in milliseconds."""

    count: int
    mean_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, latencies_s: Sequence[float] | np.ndarray) -> LatencySummary:
        data = np.asarray(latencies_s, dtype=np.float64) * 1000.0
        if data.size == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=int(data.size),
            mean_ms=float(data.mean()),
            min_ms=float(data.min()),
            max_ms=float(data.max()),
            p50_ms=percentile(data, 50),
            p90_ms=percentile(data, 90),
            p99_ms=percentile(data, 99),
        )


@dataclass(frozen=True)
class LevelResult:
    """One level of a sweep: a concurrency (closed loop) or a rate (open loop)."""

    label: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    elapsed_s: float
    ok: int
    errors: dict[str, int]
    scheduled: int
    rows_per_request: int
    latency: LatencySummary
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0
    # Open loop: how late the generator sent relative to the schedule (a generator
    # that cannot keep up shows here, and its lateness is inside the latencies).
    max_send_lag_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.throughput_rps * self.rows_per_request

    @property
    def server_cpu_us_per_request(self) -> float | None:
        """Server CPU over the level divided by the requests it answered (errors too:
        the server spent CPU on them)."""
        if self.server_cpu_s is None or self.completed == 0:
            return None
        return self.server_cpu_s / self.completed * 1e6

    @property
    def server_cpu_cores(self) -> float | None:
        if self.server_cpu_s is None or self.elapsed_s <= 0:
            return None
        return self.server_cpu_s / self.elapsed_s

    @property
    def client_cpu_us_per_request(self) -> float | None:
        if self.completed == 0:
            return None
        return self.client_cpu_s / self.completed * 1e6

    @property
    def client_cpu_cores(self) -> float:
        return self.client_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = asdict(self.latency)
        data.update(
            completed=self.completed,
            throughput_rps=self.throughput_rps,
            rows_per_s=self.rows_per_s,
            server_cpu_us_per_request=self.server_cpu_us_per_request,
            server_cpu_cores=self.server_cpu_cores,
            client_cpu_us_per_request=self.client_cpu_us_per_request,
            client_cpu_cores=self.client_cpu_cores,
        )
        return _finite(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LevelResult:
        latency = {k: _nan_if_none(v) for k, v in data["latency"].items()}
        return cls(
            label=data["label"],
            mode=data["mode"],
            concurrency=data.get("concurrency"),
            rate=data.get("rate"),
            elapsed_s=float(data["elapsed_s"]),
            ok=int(data["ok"]),
            errors={str(k): int(v) for k, v in data.get("errors", {}).items()},
            scheduled=int(data["scheduled"]),
            rows_per_request=int(data["rows_per_request"]),
            latency=LatencySummary(**latency),
            server_cpu_s=data.get("server_cpu_s"),
            client_cpu_s=float(data.get("client_cpu_s", 0.0)),
            max_send_lag_ms=float(data.get("max_send_lag_ms", 0.0)),
            extra=dict(data.get("extra", {})),
        )


def _finite(value: Any) -> Any:
    """JSON has no NaN: empty levels write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _nan_if_none(value: Any) -> Any:
    return math.nan if value is None else value
