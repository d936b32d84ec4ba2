"""The prediction log: every successful prediction, sampled per model, sent to the
monitoring service in columnar batches, never in the way of the prediction.

The rule: the request path does one O(1) thing, `record`: it appends references (the
input and output arrays as the model got and gave them, no copy) to a bounded buffer.
A sender thread takes what is queued every `interval_s`, or as soon as `batch_rows`
rows wait, groups the records per model version, route and column layout, builds one
columnar batch per group (one `np.concatenate` per tensor, one `tobytes` per matrix)
and sends them in one `LogPredictions` call with a deadline, through MonitoringClient,
which retries UNAVAILABLE inside it (the call is idempotent by request id and row).

What the caller decides when monitoring is slow or down (DESIGN.md): records are
dropped and counted, never the predictions. A full buffer drops the new record
(`reason="buffer_full"`); a failed call drops its records (`unavailable`, `deadline`,
`rejected`, `error`); records still queued when the service stops after a last flush
are `shutdown`. All in `modelplane_inference_prediction_log_dropped_total{model,reason}`.

Records are rows: a request of 5 rows is 5 records, keyed (request id, row index). A
request without an id gets one (uuid4 hex), returned in the response so labels can be
joined later. Inputs are logged as the numeric tensors the model ran on, each
flattened per row (`input[0]`, `input[1]`, …; a one-value tensor keeps its name);
non-numeric tensors (BYTES) are left out, as are tensors past `MAX_VALUES_PER_ROW`.

Why a thread rather than a task on the server's event loop (measured, CPU per record,
1,000-record calls): building the batch costs ~1.9 µs wherever it runs, sending it
0.34 µs with the synchronous client against 0.50 µs with grpc.aio; on the loop the build
would also stall every request waiting there for as long as it takes (~2 ms per call),
while a thread gives the GIL back at least every switch interval. Served end to end
(bench/prediction_log.py) the two were within the shared machine's noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
import numpy as np
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.monitoring.v1 import monitoring_pb2 as mpb

log = logging.getLogger("modelplane.inference.prediction_log")

MAX_VALUES_PER_ROW = 4096
"""Input (and output) values logged per row at most: tensors past it are left out, so an
image model's pixels do not flood the monitoring service."""
INTERNAL_PREFIX = "__"
MAX_LINKS = 32
"""Keys of a batch's outputs that are not model outputs (enrichment's bookkeeping)."""

Sender = Callable[[Sequence[mpb.PredictionBatch], float], object]
"""Sends batches with a deadline (MonitoringClient.log_predictions); raises grpc.RpcError."""


class Record(NamedTuple):
    """One successful prediction, as queued: references, no copies."""

    model: str
    version: str
    route: str
    request_id: str
    wall_ns: int  # time.time_ns() at receipt
    latency_ns: int
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    rows: int
    trace: object = None
    """The request's trace context (a SpanContext) when tracing is on."""
    input_names: tuple[str, ...] = ()
    """Names of the input columns when the model's input is a feature bundle's tensor
    (its feature references); otherwise the columns are named after the tensors."""


_Layout = tuple[tuple[str, int], ...]

_REASONS = {
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.INVALID_ARGUMENT: "rejected",
}


@dataclass(frozen=True)
class PredictionLogConfig:
    address: str
    """Monitoring service HOST:PORT."""
    buffer_rows: int = 20_000
    batch_rows: int = 1_000
    interval_s: float = 0.2
    timeout_s: float = 2.0
    default_rate: float = 1.0
    rates: Mapping[str, float] = field(default_factory=dict)


class PredictionLogMetrics:
    def __init__(self, registry: CollectorRegistry, limit_rows: int) -> None:
        self.dropped = Counter(
            "modelplane_inference_prediction_log_dropped",
            "Prediction records not logged, by reason: buffer_full, unavailable, deadline, "
            "rejected, error, shutdown (the predictions themselves were answered)",
            ["model", "reason"],
            registry=registry,
        )
        self.sent = Counter(
            "modelplane_inference_prediction_log_sent",
            "Prediction records the monitoring service acknowledged (stored or duplicate)",
            ["model"],
            registry=registry,
        )
        self.queued = Gauge(
            "modelplane_inference_prediction_log_queued_rows",
            "Prediction records waiting in the buffer to be sent",
            registry=registry,
        )
        limit = Gauge(
            "modelplane_inference_prediction_log_buffer_limit_rows",
            "Bound of the prediction log buffer in records",
            registry=registry,
        )
        limit.set(limit_rows)


_VERSION_MASK = 0xF000 << 64
_VERSION_4 = 0x4000 << 64
_VARIANT_MASK = 0xC000 << 48
_VARIANT_RFC_4122 = 0x8000 << 48


def new_request_id() -> str:
    """A random UUID version 4 as 32 hex digits, like `uuid.uuid4().hex` at a fifth of
    its cost (~0.6 µs instead of 2.6: no system call, no UUID object). The bits come from
    `random`, not the OS: an id must be unique, not unguessable."""
    bits = random.getrandbits(128) & ~_VERSION_MASK & ~_VARIANT_MASK
    return f"{bits | _VERSION_4 | _VARIANT_RFC_4122:032x}"


def _layout(tensors: Mapping[str, np.ndarray], rows: int, outputs: bool) -> _Layout:
    """(name, values per row) of the tensors logged, in order."""
    layout = []
    total = 0
    for name, array in tensors.items():
        if outputs and name.startswith(INTERNAL_PREFIX):
            continue
        if array.dtype.kind not in "biuf" or array.size % rows:
            continue
        width = array.size // rows
        if total + width > MAX_VALUES_PER_ROW:
            continue
        total += width
        layout.append((name, width))
    return tuple(layout)


@functools.lru_cache(maxsize=256)
def feature_names(layout: _Layout) -> tuple[str, ...]:
    names: list[str] = []
    for name, width in layout:
        names.extend([name] if width == 1 else [f"{name}[{j}]" for j in range(width)])
    return tuple(names)


def _matrix(
    tensors: Sequence[Mapping[str, np.ndarray]], rows: Sequence[int], name: str, width: int
) -> np.ndarray:
    """One tensor of every record, [rows, width] each, stacked."""
    if len(tensors) == 1:
        return tensors[0][name].reshape(rows[0], width)
    return np.concatenate([t[name].reshape(n, width) for t, n in zip(tensors, rows, strict=True)])


def build_batches(records: Sequence[Record]) -> list[tuple[str, int, mpb.PredictionBatch]]:
    """Columnar batches of the records, one per model version, route and column layout;
    each with its model and row count."""
    groups: dict[tuple[str, str, str, _Layout, _Layout, tuple[str, ...]], list[Record]] = {}
    for record in records:
        rows = record.rows
        key = (
            record.model,
            record.version,
            record.route,
            _layout(record.inputs, rows, outputs=False),
            _layout(record.outputs, rows, outputs=True),
            record.input_names,
        )
        group = groups.get(key)
        if group is None:
            groups[key] = [record]
        else:
            group.append(record)
    batches = []
    for (model, version, route, inputs, outputs, input_names), group in groups.items():
        ids: list[str] = []
        times: list[int] = []
        latencies: list[float] = []
        multi_row = False
        for record in group:
            rows = record.rows
            if rows == 1:
                ids.append(record.request_id)
                times.append(record.wall_ns // 1000)
                latencies.append(record.latency_ns / 1e6)
            else:
                multi_row = True
                ids.extend([record.request_id] * rows)
                times.extend([record.wall_ns // 1000] * rows)
                latencies.extend([record.latency_ns / 1e6] * rows)
        row_counts = [r.rows for r in group]
        in_tensors = [r.inputs for r in group]
        out_tensors = [r.outputs for r in group]
        columns = [_matrix(in_tensors, row_counts, name, width) for name, width in inputs]
        if not columns:
            features = np.empty((len(ids), 0), np.float32)
        elif len(columns) == 1:
            features = columns[0]
        else:
            features = np.concatenate([c.astype(np.float32, copy=False) for c in columns], axis=1)
        batch = prediction_batch(
            model,
            version,
            ids,
            latencies,
            features,
            input_names if len(input_names) == features.shape[1] else feature_names(inputs),
            {name: _matrix(out_tensors, row_counts, name, width) for name, width in outputs},
            route=route,
            row_indices=[i for n in row_counts for i in range(n)] if multi_row else None,
            time_unix_us=times,
        )
        batches.append((model, len(ids), batch))
    return batches


class PredictionLog:
    """`record` is called on the serving event loop; everything else on the sender
    thread. The buffer is a deque (appends and pops are atomic); its row count is two
    counters, each written by one thread only, so neither side takes a lock."""

    def __init__(
        self,
        config: PredictionLogConfig,
        registry: CollectorRegistry,
        sender: Sender | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.config = config
        self._tracer = tracer
        self._client: MonitoringClient | None = None
        # Running totals per model (dropped records, failed requests, requests), sent with
        # every call so monitoring can alert on drops and errors; totals, not deltas, so a
        # retried call counts nothing twice.
        self._totals: dict[str, list[int]] = {}
        self._producer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._totals_sent: dict[str, tuple[int, int, int]] = {}
        if sender is None:
            client = self._client = MonitoringClient(
                config.address, timeout=config.timeout_s, connect_timeout=None
            )

            def sender(batches: Sequence[mpb.PredictionBatch], timeout: float) -> object:
                counters = self._counters()
                result = client.log_predictions(
                    batches, timeout, producer_id=self._producer, counters=counters
                )
                self._totals_sent = {
                    c.model_name: (c.dropped_records, c.failed_requests, c.requests)
                    for c in counters
                }
                return result

        self._send_batches = sender
        self._metrics = PredictionLogMetrics(registry, config.buffer_rows)
        self._metrics.queued.set_function(lambda: self.queued_rows)
        self._buffer: deque[Record] = deque()
        self._appended_rows = 0  # written by record() only
        self._taken_rows = 0  # written by the sender only
        self._limit = config.buffer_rows
        self._batch_rows = config.batch_rows
        self._default_rate = config.default_rate
        self._rates = dict(config.rates)
        self._full: dict[str, Counter] = {}
        self._wake = threading.Event()
        self._woken = False
        self._stopping = False
        self._failing = False
        self._thread: threading.Thread | None = None

    @property
    def queued_rows(self) -> int:
        return self._appended_rows - self._taken_rows

    # --- the request path ----------------------------------------------------------------

    def record(
        self,
        model: str,
        version: str,
        route: str,
        request_id: str,
        received_ns: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        rows: int,
        trace_context: object = None,
        input_names: tuple[str, ...] = (),
    ) -> str:
        """Queues one successful prediction (unless sampled out or the buffer is full);
        returns its request id, made up when the request had none. `received_ns` is the
        request's perf_counter_ns at arrival; `input_names` names the input columns
        (see Record)."""
        if not request_id:
            request_id = new_request_id()
        totals = self._totals.get(model) or self._totals.setdefault(model, [0, 0, 0])
        totals[2] += 1
        rate = self._rates.get(model, self._default_rate)
        if rate < 1.0 and (rate <= 0.0 or random.random() >= rate):
            return request_id
        if self._appended_rows - self._taken_rows + rows > self._limit:
            counter = self._full.get(model)
            if counter is None:
                counter = self._full[model] = self._metrics.dropped.labels(model, "buffer_full")
            counter.inc(rows)
            totals[0] += rows
            return request_id
        now = time.perf_counter_ns()
        latency = now - received_ns
        self._buffer.append(
            Record(
                model, version, route, request_id, time.time_ns() - latency, latency, inputs,
                outputs, rows, trace_context, input_names,
            )
        )  # fmt: skip
        self._appended_rows += rows
        if not self._woken and self._appended_rows - self._taken_rows >= self._batch_rows:
            self._woken = True
            self._wake.set()
        return request_id

    def failed(self, model: str) -> None:
        """Counts a request to a served model that failed (for the ERROR_RATE alerts)."""
        totals = self._totals.get(model) or self._totals.setdefault(model, [0, 0, 0])
        totals[1] += 1
        totals[2] += 1

    def _counters(self) -> list[mpb.ProducerCounters]:
        return [
            mpb.ProducerCounters(
                model_name=model, dropped_records=dropped, failed_requests=failed, requests=total
            )
            for model, (dropped, failed, total) in list(self._totals.items())
        ]

    # --- the sender ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="prediction-log-sender", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Sends what is queued (within one deadline per call), then stops; records still
        queued after that are dropped and counted."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout_s * 2 + 5)
        if not self._thread_alive():
            left = self._take(self.queued_rows)
            self._count_dropped(_rows_per_model(left), "shutdown")
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        interval = self.config.interval_s
        next_flush = time.monotonic() + interval
        while True:
            self._wake.wait(max(next_flush - time.monotonic(), 0.0))
            self._wake.clear()
            self._woken = False
            stopping = self._stopping
            try:
                while self.queued_rows >= self._batch_rows:
                    self.send(self._take(self._batch_rows))
                if stopping or time.monotonic() >= next_flush:
                    self.flush_due(stopping)
                    self._send_counters()
                    next_flush = time.monotonic() + interval
            except Exception:  # never let the sender die: the buffer would only fill
                log.exception("prediction log sender failed")
            if stopping:
                return

    def flush_due(self, stopping: bool = False) -> None:
        """Sends what is queued now, not what arrives while it is sent: under a steady
        load that would be a stream of calls of a few records each (measured: calls of
        2-5 records, 40 a second, each a commit in monitoring)."""
        due = self.queued_rows
        while due > 0 and (records := self._take(min(due, self._batch_rows))):
            due -= sum(r.rows for r in records)
            self.send(records)
            if stopping and self._failing:
                break  # one failed call at shutdown: close() counts the rest

    def _take(self, max_rows: int) -> list[Record]:
        taken: list[Record] = []
        rows = 0
        buffer = self._buffer
        while rows < max_rows and buffer:
            record = buffer.popleft()
            taken.append(record)
            rows += record.rows
        self._taken_rows += rows
        return taken

    def send(self, records: Sequence[Record]) -> None:
        """Builds and sends one call's batches; counts its records sent or dropped."""
        if not records:
            return
        try:
            batches = build_batches(records)
        except Exception:
            log.exception("could not build prediction log batches")
            self._count_dropped(_rows_per_model(records), "error")
            return
        try:
            with self._span(records):
                self._send_batches([b for _, _, b in batches], self.config.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            self._count_dropped(_rows_of(batches), _REASONS.get(code, "error"))
            if not self._failing:
                self._failing = True
                log.warning(
                    "monitoring at %s did not take prediction records (%s); dropping and "
                    "counting them until it does",
                    self.config.address,
                    code.name if code is not None else "error",
                    extra={"details": str(exc.details())[:200]},  # type: ignore[attr-defined]
                )
            return
        if self._failing:
            self._failing = False
            log.info("monitoring at %s takes prediction records again", self.config.address)
        for model, rows in _rows_of(batches).items():
            self._metrics.sent.labels(model).inc(rows)

    def _send_counters(self) -> None:
        """A call with no records when only the totals moved (all dropped, or failures)."""
        if self._client is None or self._failing:
            return
        current = {model: tuple(t) for model, t in list(self._totals.items())}
        if current == self._totals_sent:
            return
        with contextlib.suppress(grpc.RpcError):  # the next call carries them again
            self._send_batches([], self.config.timeout_s)

    @contextlib.contextmanager
    def _span(self, records: Sequence[Record]) -> Iterator[None]:
        """With tracing on, the call that carries these records is a span in the first
        traced request's trace, linked to (up to 32 of) the others', and the monitoring
        client sends it along: one trace then reaches from a caller to monitoring."""
        traced = [r.trace for r in records if isinstance(r.trace, trace.SpanContext)]
        if self._tracer is None or not traced:
            yield
            return
        with self._tracer.start_as_current_span(
            "inference.prediction_log",
            context=trace.set_span_in_context(trace.NonRecordingSpan(traced[0])),
            links=[trace.Link(context) for context in traced[1:MAX_LINKS]],
            attributes={"records": len(records)},
        ):
            yield

    def _count_dropped(self, rows_per_model: Mapping[str, int], reason: str) -> None:
        for model, rows in rows_per_model.items():
            self._metrics.dropped.labels(model, reason).inc(rows)
            totals = self._totals.get(model) or self._totals.setdefault(model, [0, 0, 0])
            totals[0] += rows


def _rows_of(batches: Sequence[tuple[str, int, mpb.PredictionBatch]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for model, rows, _ in batches:
        counts[model] = counts.get(model, 0) + rows
    return counts


def _rows_per_model(records: Sequence[Record]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.model] = counts.get(record.model, 0) + record.rows
    return counts


def parse_rates(entries: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    """`MODEL=RATE` entries (or a mapping) as {model: rate}, each rate in 0..1."""
    pairs: list[tuple[str, object]] = []
    if isinstance(entries, Mapping):
        pairs = list(entries.items())
    else:
        for entry in entries:
            model, sep, text = str(entry).partition("=")
            if not sep or not model.strip():
                raise ValueError(f"a sample rate looks like MODEL=RATE, got {entry!r}")
            pairs.append((model.strip(), text))
    rates: dict[str, float] = {}
    for model, rate in pairs:
        try:
            value = float(str(rate))
        except ValueError:
            raise ValueError(f"sample rate of {model!r}: {rate!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"sample rate of {model!r}: {value} is outside 0..1")
        rates[model] = value
    return rates
