"""Stream scoring's configuration (one frozen dataclass, the command line's options) and
its Prometheus metrics. See stream.py for the design.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelplane.scoring.model import ModelRef

MAX_BATCH_SIZE = 4096  # the ack script unpacks every id of a batch onto Lua's stack
IDLE_POLL_MS = 200  # how long an idle read blocks: the bound on noticing a stop
TRANSIENT_BACKOFF_S = 0.5
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    registry: str
    model: str  # NAME@ALIAS or NAME/VERSION
    redis_url: str = "redis://127.0.0.1:6379/0"
    input: str = "events"
    output: str = "predictions"
    group: str = "scorers"
    consumer: str = ""  # default: <host>-<pid>; with consumers > 1, suffixed -0, -1, ...
    consumers: int = 1
    dead_letter: str = ""  # default: <input>.dead
    batch_size: int = 256
    max_wait_ms: int = 2  # after a micro-batch's first event, how long to wait for more
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    refresh_s: float = 10.0
    start: str = "0"  # where a new group starts: "0" the whole stream, "$" new events
    output_maxlen: int = 0
    feature_service: str = ""
    feature_timeout_s: float = 2.0
    monitoring: str = ""
    monitoring_sample: float = 1.0
    monitoring_queue: int = 64  # micro-batches waiting to be logged
    metrics_port: int | None = None
    cache_dir: Path = Path(".modelplane/score-cache")
    threads: int = 1  # ONNX Runtime intra-op threads (micro-batches are small)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be in 1..{MAX_BATCH_SIZE}")
        if self.consumers < 1 or self.max_deliveries < 1 or self.claim_idle_ms < 1:
            raise ValueError("consumers, max deliveries and claim idle time must be >= 1")
        if self.max_wait_ms < 0 or self.refresh_s <= 0:
            raise ValueError("max wait must be >= 0 and refresh > 0")
        if not 0.0 <= self.monitoring_sample <= 1.0:
            raise ValueError("the monitoring sample is a fraction in 0..1")
        ModelRef.parse(self.model)

    @property
    def dead_letter_stream(self) -> str:
        return self.dead_letter or f"{self.input}.dead"

    def consumer_names(self) -> list[str]:
        base = self.consumer or f"{socket.gethostname()}-{os.getpid()}"
        if self.consumers == 1:
            return [base]
        return [f"{base}-{i}" for i in range(self.consumers)]


# --- metrics ------------------------------------------------------------------------------


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "modelplane_stream_events",
            "Events scored and published (rate() gives events/s)",
            ["model", "version"],
            registry=registry,
        )
        self.lag = Histogram(
            "modelplane_stream_lag_seconds",
            "End-to-end lag: the event's stream id time to its prediction published",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "modelplane_stream_batch_events",
            "Events per micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=registry,
        )
        self.failures = Counter(
            "modelplane_stream_failures",
            "Events that failed, by reason (dead-lettered or left pending for a retry)",
            ["reason"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "modelplane_stream_dead_lettered",
            "Events sent to the dead-letter stream, by reason",
            ["reason"],
            registry=registry,
        )
        self.claimed = Counter(
            "modelplane_stream_claimed",
            "Pending events claimed (XAUTOCLAIM) from idle consumers",
            registry=registry,
        )
        self.monitoring_dropped = Counter(
            "modelplane_stream_monitoring_dropped",
            "Prediction records not logged to monitoring (queue full or monitoring failed)",
            ["reason"],
            registry=registry,
        )
        self.monitoring_queue = Gauge(
            "modelplane_stream_monitoring_queue",
            "Micro-batches waiting to be logged to monitoring",
            registry=registry,
        )
        self.model_version = Gauge(
            "modelplane_stream_model_version",
            "The version being scored",
            ["model"],
            registry=registry,
        )
        self.swaps = Counter(
            "modelplane_stream_model_swaps",
            "Times a newly resolved version replaced the scored one",
            registry=registry,
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0
