"""Prediction records and summaries: the rules, free of gRPC and SQL."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from modelplane.kernel.errors import InvalidArgument

# A single LogPredictions call is bounded so one caller cannot hold the store.
MAX_RECORDS_PER_CALL = 10_000


@dataclass(frozen=True)
class PredictionRecord:
    model_name: str
    model_version: str
    request_id: str
    time: datetime
    features: tuple[float, ...]
    outputs: tuple[float, ...]
    latency_ms: float


@dataclass(frozen=True)
class PredictionSummary:
    count: int
    first_time: datetime | None
    last_time: datetime | None
    mean_latency_ms: float
    p50_latency_ms: float
    p99_latency_ms: float


def validate_records(records: Sequence[PredictionRecord]) -> None:
    """Rejects the whole batch if any record is malformed, naming the first bad one."""
    if len(records) > MAX_RECORDS_PER_CALL:
        raise InvalidArgument(
            f"at most {MAX_RECORDS_PER_CALL} records per call, got {len(records)}"
        )
    for index, record in enumerate(records):
        if not record.model_name:
            raise InvalidArgument(f"records[{index}].model_name is empty")
        if not math.isfinite(record.latency_ms) or record.latency_ms < 0:
            raise InvalidArgument(
                f"records[{index}].latency_ms must be a finite non-negative number"
            )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def summarize(times: Sequence[datetime], latencies: Sequence[float]) -> PredictionSummary:
    if not latencies:
        return PredictionSummary(0, None, None, 0.0, 0.0, 0.0)
    ordered = sorted(latencies)
    return PredictionSummary(
        count=len(latencies),
        first_time=min(times),
        last_time=max(times),
        mean_latency_ms=sum(ordered) / len(ordered),
        p50_latency_ms=percentile(ordered, 50),
        p99_latency_ms=percentile(ordered, 99),
    )
