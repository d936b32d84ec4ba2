"""What the batcher reports, kept twice: Triton-style statistics per model version (the
ModelStatistics RPC) and Prometheus metrics (histograms aggregate across replicas).
Also opens the OpenTelemetry span of each request, with the id and size of its batch.

Work is done once per batch where it can be: one lock round per batch, not per request.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelplane.services.inference.batcher import REJECT_REASONS, PendingRequest

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class StatsSnapshot:
    """A consistent copy of one version's statistics."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0


class InferenceMetrics:
    """The service's Prometheus metrics, registered once per server registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.requests = Counter(
            "modelplane_inference_requests",
            "Inference requests by outcome (success, invalid, rejected, expired, cancelled, "
            "failed); a rejected one by reason (queue_full: no room in the queue; queue_wait: "
            "the work ahead passes the queue-wait bound; deadline: the work ahead would "
            "outlast its deadline; queue_timeout: still queued past the queue-wait bound, "
            "refused then), others with an empty reason",
            [*labels, "outcome", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "modelplane_inference_request_seconds",
            "End-to-end time of a successful request inside the server",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue = Histogram(
            "modelplane_inference_queue_seconds",
            "Time a request waited in the batcher queue",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute = Histogram(
            "modelplane_inference_compute_seconds",
            "Time one batch took: stacking inputs, running the model, splitting outputs",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "modelplane_inference_batch_size",
            "Rows per executed batch",
            labels,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_rows = Gauge(
            "modelplane_inference_queue_rows",
            "Rows waiting in the batcher queue",
            labels,
            registry=registry,
        )
        self.queue_limit = Gauge(
            "modelplane_inference_queue_limit_rows",
            "Bound of the batcher queue in rows",
            labels,
            registry=registry,
        )
        self.instances = Gauge(
            "modelplane_inference_instances",
            "Runtime instances of a loaded model version",
            [*labels, "provider"],
            registry=registry,
        )

    def forget(self, model: str, version: str, provider: str) -> None:
        """Drops an unloaded version's series."""
        for metric in (
            self.latency,
            self.queue,
            self.compute,
            self.batch_rows,
            self.queue_rows,
            self.queue_limit,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(model, version)
        with contextlib.suppress(KeyError):
            self.instances.remove(model, version, provider)


class VersionStats:
    """Statistics, metrics and spans of one loaded model version (a BatchObserver)."""

    def __init__(
        self,
        model: str,
        version: str,
        metrics: InferenceMetrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self._lock = threading.Lock()
        self._s = StatsSnapshot()
        self._tracer = tracer
        self._metrics = metrics
        self._success = metrics.requests.labels(model, version, "success", "")
        self._outcomes = {
            outcome: metrics.requests.labels(model, version, outcome, "")
            for outcome in ("invalid", "expired", "cancelled", "failed")
        }
        self._rejected = {
            reason: metrics.requests.labels(model, version, "rejected", reason)
            for reason in REJECT_REASONS
        }
        self._latency = metrics.latency.labels(model, version)
        self._queue = metrics.queue.labels(model, version)
        self._compute = metrics.compute.labels(model, version)
        self._batch_rows = metrics.batch_rows.labels(model, version)
        self.queue_rows = metrics.queue_rows.labels(model, version)

    # --- BatchObserver -----------------------------------------------------------------

    def batch_done(
        self,
        batch: Sequence[PendingRequest],
        rows: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        finished = time.perf_counter_ns()
        n = len(batch)
        with self._lock:
            s = self._s
            s.last_inference_ms = time.time_ns() // 1_000_000
            s.inference_count += rows
            s.execution_count += 1
            s.compute_input.add(input_ns * n, n)
            s.compute_infer.add(infer_ns * n, n)
            s.compute_output.add(output_ns * n, n)
            per_size = s.batches.get(rows)
            if per_size is None:
                per_size = s.batches[rows] = BatchSizeStats()
            per_size.compute_input.add(input_ns)
            per_size.compute_infer.add(infer_ns)
            per_size.compute_output.add(output_ns)
            for request in batch:
                s.queue.add(request.started_ns - request.enqueued_ns)
                s.success.add(finished - request.received_ns)
        self._compute.observe((input_ns + infer_ns + output_ns) / 1e9)
        self._batch_rows.observe(rows)
        self._success.inc(n)
        for request in batch:
            self._queue.observe((request.started_ns - request.enqueued_ns) / 1e9)
            self._latency.observe((finished - request.received_ns) / 1e9)
        if self._tracer is not None:
            self._trace(batch, rows, finished, None)

    def request_dropped(self, request: PendingRequest, reason: str) -> None:
        now = time.perf_counter_ns()
        with self._lock:
            self._s.fail.add(now - request.received_ns)
            if reason == "cancelled":
                self._s.cancelled += 1
            else:
                self._s.expired += 1
        self._outcomes[reason].inc()
        if self._tracer is not None:
            self._trace([request], 0, now, reason)

    def request_failed(self, request: PendingRequest | None, reason: str) -> None:
        """A request that failed validation ("invalid") or failed in the runtime
        ("failed"/"execution")."""
        now = time.perf_counter_ns()
        outcome = "failed" if reason == "execution" else reason
        with self._lock:
            if request is not None:
                self._s.fail.add(now - request.received_ns)
            else:
                self._s.fail.add(0)
        self._outcomes[outcome].inc()
        if self._tracer is not None and request is not None:
            self._trace([request], 0, now, outcome)

    def request_rejected(self, request: PendingRequest, reason: str) -> None:
        """A request refused at admission, by batcher.REJECT_REASONS (batcher.Rejected)."""
        now = time.perf_counter_ns()
        with self._lock:
            self._s.fail.add(now - request.received_ns)
            self._s.rejected += 1
        self._rejected[reason].inc()
        if self._tracer is not None:
            self._trace([request], 0, now, f"rejected: {reason}")

    # --- readers -----------------------------------------------------------------------

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            s = self._s
            return StatsSnapshot(
                last_inference_ms=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                success=Duration(s.success.count, s.success.ns),
                fail=Duration(s.fail.count, s.fail.ns),
                queue=Duration(s.queue.count, s.queue.ns),
                compute_input=Duration(s.compute_input.count, s.compute_input.ns),
                compute_infer=Duration(s.compute_infer.count, s.compute_infer.ns),
                compute_output=Duration(s.compute_output.count, s.compute_output.ns),
                batches={
                    size: BatchSizeStats(
                        Duration(b.compute_input.count, b.compute_input.ns),
                        Duration(b.compute_infer.count, b.compute_infer.ns),
                        Duration(b.compute_output.count, b.compute_output.ns),
                    )
                    for size, b in sorted(s.batches.items())
                },
                rejected=s.rejected,
                expired=s.expired,
                cancelled=s.cancelled,
            )

    def _trace(
        self, batch: Sequence[PendingRequest], rows: int, end_ns: int, error: str | None
    ) -> None:
        # perf_counter_ns has no epoch: shift the request's times onto the wall clock.
        assert self._tracer is not None
        shift = time.time_ns() - end_ns
        for request in batch:
            parent = request.tag if isinstance(request.tag, trace.SpanContext) else None
            span = self._tracer.start_span(
                "inference.request",
                context=trace.set_span_in_context(trace.NonRecordingSpan(parent))
                if parent is not None
                else None,
                start_time=request.received_ns + shift,
                attributes={
                    "model.name": self.model,
                    "model.version": self.version,
                    "batch.id": request.batch_id,
                    "batch.rows": rows,
                    "request.rows": request.rows,
                    "queue.ns": max(0, request.started_ns - request.enqueued_ns),
                },
            )
            if error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error))
            span.end(end_time=end_ns + shift)


SHADOW_DIFF_BUCKETS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


class RoutingMetrics:
    """Requests per route and what shadow copies did, for models served from the
    registry. Label children are kept per (model, route): a `labels()` lookup per
    request would cost more than the routing itself."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._routed = Counter(
            "modelplane_inference_route_requests",
            "Requests that named no version, by the route (alias) that answered them",
            ["model", "route"],
            registry=registry,
        )
        self._shadow = Counter(
            "modelplane_inference_shadow_requests",
            "Mirrored requests by outcome: matched or differed (outputs compared with the "
            "primary's), failed (the shadow erred), dropped (not run: full queue, "
            "incompatible inputs)",
            ["model", "outcome"],
            registry=registry,
        )
        self._difference = Histogram(
            "modelplane_inference_shadow_max_abs_difference",
            "Largest absolute difference between a shadow's outputs and the primary's",
            ["model"],
            buckets=SHADOW_DIFF_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str], Counter] = {}

    def routed(self, model: str, route: str) -> None:
        child = self._children.get((model, route))
        if child is None:
            child = self._children[(model, route)] = self._routed.labels(model, route)
        child.inc()

    def shadow(self, model: str, outcome: str) -> None:
        self._shadow.labels(model, outcome).inc()

    def compare(
        self, model: str, primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]
    ) -> None:
        """Counts a shadow's outputs as matched (within float tolerance) or differed."""
        same = primary.keys() == shadow.keys()
        largest = 0.0
        for name in primary.keys() & shadow.keys():
            ours, theirs = np.asarray(primary[name]), np.asarray(shadow[name])
            if ours.shape != theirs.shape:
                same = False
                continue
            if ours.dtype.kind in "fiub" and theirs.dtype.kind in "fiub":
                if ours.size:
                    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs)))
                    largest = max(largest, diff if np.isfinite(diff) else float("inf"))
                same = same and bool(np.allclose(ours, theirs, rtol=1e-5, atol=1e-6))
            else:
                same = same and bool(np.array_equal(ours, theirs))
        self._difference.labels(model).observe(largest)
        self.shadow(model, "matched" if same else "differed")
