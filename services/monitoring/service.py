"""The monitoring service's work, apart from gRPC: ingest, labels, reports, configs and
alerts, and the background loops that flush statistics, evaluate alert rules, notify
and prune. The servicer only converts protos and calls this.

Blocking work (the store, statistics) runs in threads; the loops never block the event
loop. Alert changes reach WatchAlerts subscribers through bounded queues: a subscriber
that does not keep up is dropped (its stream ends with RESOURCE_EXHAUSTED) rather than
holding memory for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.kernel.errors import InvalidArgument, ResourceExhausted
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring import alerts, domain, drift
from modelplane.services.monitoring.evaluator import AlertEvaluator, Change
from modelplane.services.monitoring.ingest import Ingestor, IngestResult, LabelResult
from modelplane.services.monitoring.notify import RetrainRunner, WebhookNotifier, alert_payload
from modelplane.services.monitoring.references import References
from modelplane.services.monitoring.report import build_report, choose_version
from modelplane.services.monitoring.store import MonitoringStore
from modelplane.services.monitoring.windows import ceil_minute, floor_minute, merged_by, read_range

log = logging.getLogger("modelplane.monitoring")

WATCH_QUEUE = 1_000
MAX_ALERTS_LISTED = 1_000
# Drift gauges per model: at most this many columns, so /metrics stays bounded.
MAX_GAUGE_COLUMNS = 64


@dataclass(frozen=True)
class Intervals:
    flush_s: float = 1.0
    evaluate_s: float = 10.0
    grace_s: float = 10.0
    retention_days: float = 30.0


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


class Monitoring:
    def __init__(
        self,
        store: MonitoringStore,
        references: References,
        ingestor: Ingestor,
        registry: CollectorRegistry,
        intervals: Intervals = Intervals(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.references = references
        self.ingestor = ingestor
        self._intervals = intervals
        self._clock = clock
        self._configs: dict[str, pb.MonitorConfig] = {}
        self.evaluator = AlertEvaluator(
            store, references, lambda: list(self._configs.values()), grace_s=intervals.grace_s
        )
        self.notifier = WebhookNotifier(registry)
        self.retrain = RetrainRunner(self.notifier, registry)
        self._watchers: set[tuple[str, asyncio.Queue[pb.Alert | None]]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        # Ingest is serial (batch sequence = commit order): one thread runs every call
        # in turn. A pool would only have its threads queue on the ingest lock, and
        # their hand-offs of the lock and the GIL cost more CPU than the ingest itself
        # (measured: a quarter of the service's CPU in sem_post with 3 callers).
        self._ingest_thread = ThreadPoolExecutor(1, thread_name_prefix="monitoring-ingest")
        self._leading = False
        self._metrics(registry)

    def _metrics(self, registry: CollectorRegistry) -> None:
        self.logged = Counter(
            "modelplane_monitoring_predictions_logged",
            "Prediction records stored",
            ["model"],
            registry=registry,
        )
        self.duplicates = Counter(
            "modelplane_monitoring_prediction_duplicates",
            "Prediction records received again (a retried batch) and not stored twice",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "modelplane_monitoring_predictions_rejected",
            "Prediction records not stored, by reason (invalid_batch, non_finite)",
            ["reason"],
            registry=registry,
        )
        self.labels_logged = Counter(
            "modelplane_monitoring_labels",
            "Labels received, by outcome (matched, updated, unmatched)",
            ["outcome"],
            registry=registry,
        )
        self.drift_psi = Gauge(
            "modelplane_monitoring_drift_psi",
            "PSI of each column over the last hour against the reference, for the model's "
            "busiest version (at most 64 columns per model)",
            ["model", "column"],
            registry=registry,
        )
        self.drifted = Gauge(
            "modelplane_monitoring_drifted",
            "1 when the column's drift verdict over the last hour is drifted",
            ["model", "column"],
            registry=registry,
        )
        self.alerts_active = Gauge(
            "modelplane_monitoring_alerts_firing", "Alerts firing now", registry=registry
        )
        self.alerts_active.set_function(
            lambda: sum(
                1
                for subjects in self.evaluator.latest().values()
                for a in subjects.values()
                if a.state == pb.ALERT_STATE_FIRING
            )
        )
        Gauge(
            "modelplane_monitoring_watchers", "WatchAlerts streams open", registry=registry
        ).set_function(lambda: len(self._watchers))

    @property
    def leading(self) -> bool:
        """Whether this replica held the alert lease at its last pass."""
        return self._leading

    # -- life
    async def start(self) -> None:
        await asyncio.to_thread(self._load_configs)
        await asyncio.to_thread(self.ingestor.recover)
        self.notifier.start()
        self._tasks = [
            asyncio.create_task(self._every(self._intervals.flush_s, self._flush)),
            asyncio.create_task(self._every(self._intervals.evaluate_s, self.evaluate)),
            asyncio.create_task(self._every(3600.0, self._prune)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, queue in list(self._watchers):
            queue.put_nowait(None)
        await asyncio.to_thread(self.ingestor.flush)
        await self.notifier.stop()
        self._ingest_thread.shutdown(wait=True)

    async def _every(self, seconds: float, work: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                result = work()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # a failing pass must not stop the loop
                log.exception("background pass failed; retrying in %.0fs", seconds)

    async def _flush(self) -> None:
        await asyncio.to_thread(self.ingestor.flush)

    async def _prune(self) -> None:
        cutoff = _us(datetime.now(UTC)) - int(self._intervals.retention_days * 86_400e6)
        deleted = await asyncio.to_thread(self.store.prune, cutoff)
        if deleted:
            log.info("pruned %d prediction batches older than the retention", deleted)

    # -- predictions and labels
    async def log_predictions(self, request: pb.LogPredictionsRequest) -> IngestResult:
        result = await asyncio.get_running_loop().run_in_executor(
            self._ingest_thread,
            self.ingestor.ingest,
            request.batches,
            request.producer_id,
            request.counters,
        )
        for model, stored in result.stored_by_model.items():
            self.logged.labels(model).inc(stored)
        for model, duplicates in result.duplicates_by_model.items():
            self.duplicates.labels(model).inc(duplicates)
        for reason, count in result.rejected.items():
            self.rejected.labels(reason).inc(count)
        return result

    async def log_labels(self, request: pb.LogLabelsRequest) -> LabelResult:
        result = await asyncio.to_thread(
            self.ingestor.log_labels, request.batches, self._prediction_of
        )
        for outcome in ("matched", "updated", "unmatched"):
            if value := getattr(result, outcome):
                self.labels_logged.labels(outcome).inc(value)
        return result

    def _prediction_of(self, model: str) -> tuple[str, int]:
        config = self.config(model)
        return config.prediction_output, config.prediction_column

    # -- configuration
    def _load_configs(self) -> None:
        """Takes every stored configuration newer than the one held: with a shared
        database another replica may have set it (read again on each alert pass)."""
        for model, data in self.store.configs():
            stored = pb.MonitorConfig.FromString(data)
            known = self._configs.get(model)
            if known is None or stored.revision > known.revision:
                self._configs[model] = stored

    def config(self, model: str) -> pb.MonitorConfig:
        if not model:
            raise InvalidArgument("model_name is required")
        known = self._configs.get(model)
        if known is not None:
            return known
        return alerts.validate_config(pb.MonitorConfig(model_name=model))

    async def set_config(self, config: pb.MonitorConfig) -> pb.MonitorConfig:
        checked = alerts.validate_config(config)
        if not 0 <= config.revision < 2**63 - 1:
            raise InvalidArgument(f"revision {config.revision} is out of range")
        stored = pb.MonitorConfig()
        stored.CopyFrom(checked)
        stored.revision = config.revision + 1
        await asyncio.to_thread(
            self.store.save_config, config.model_name, config.revision, stored.SerializeToString()
        )
        self._configs[config.model_name] = stored
        return stored

    # -- reads
    async def summary(
        self, model: str, version: str, start: datetime | None, end: datetime | None
    ) -> domain.PredictionSummary:
        await asyncio.to_thread(self.ingestor.flush)
        end_us = ceil_minute(_us(end) if end else int(self._clock() * 1e6) + 1)
        start_us = floor_minute(_us(start)) if start else 0
        return await asyncio.to_thread(self._summary, model, version, start_us, end_us)

    def _summary(
        self, model: str, version: str, start_us: int, end_us: int
    ) -> domain.PredictionSummary:
        if start_us == 0:
            oldest = self.store.read_windows(model, version, 86_400_000_000, 0, end_us)
            start_us = min((k.start_us for k, _ in oldest), default=end_us)
        windows = merged_by(read_range(self.store, model, version, start_us, end_us))
        return domain.summary_of(
            {
                name[0]: w
                for name, w in windows.items()
                if name[0] and (not version or name[0] == version)
            }
        )

    async def report(
        self, model: str, version: str, start: datetime | None, end: datetime | None, buckets: int
    ) -> pb.GetReportResponse:
        if not model:
            raise InvalidArgument("model_name is required")
        await asyncio.to_thread(self.ingestor.flush)
        end_us = _us(end) if end else int(self._clock() * 1e6)
        start_us = _us(start) if start else None
        if start_us is not None and start_us >= end_us:
            raise InvalidArgument("start_time must be before end_time")
        return await asyncio.to_thread(
            build_report,
            self.store,
            self.references,
            self.config(model),
            model,
            version,
            start_us,
            end_us,
            buckets,
        )

    async def list_alerts(self, model: str, states: Sequence[int], limit: int) -> list[pb.Alert]:
        limit = min(limit or 100, MAX_ALERTS_LISTED)
        rows = await asyncio.to_thread(self.store.alerts, model, list(states), limit)
        return [pb.Alert.FromString(row.payload) for row in rows]

    # -- alerts
    async def evaluate(self) -> list[Change]:
        """One pass of every rule over the windows closed since the last pass; notifies.
        Replicas sharing a store take turns by lease: one evaluates, so an alert is
        opened, fired and notified once. A replica that takes the lease over forgets
        what it held in memory and reads the alerts back from the store."""
        await asyncio.to_thread(self._load_configs)
        await asyncio.to_thread(self.ingestor.flush)
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        await asyncio.to_thread(self._update_drift_gauges, now)
        ttl_us = int(max(3 * self._intervals.evaluate_s, 30.0) * 1e6)
        leading = await asyncio.to_thread(
            self.store.lease, "alerts", self.ingestor.replica, _us(now), ttl_us
        )
        if not leading or not self._leading:
            self.evaluator.forget()
        self._leading = leading
        if not leading:
            return []
        changes = await asyncio.to_thread(self.evaluator.run_once, now)
        for change in changes:
            alert = change.transition.after
            self._publish(alert)
            if change.transition.notify and change.webhook_url:
                self.notifier.submit(change.webhook_url, alert_payload(alert))
            if change.retrain is not None:
                self.retrain.submit(change.rule.retrain, change.retrain)
        return changes

    def _publish(self, alert: pb.Alert) -> None:
        for watcher in list(self._watchers):
            model, queue = watcher
            if model and model != alert.model_name:
                continue
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self._watchers.discard(watcher)
                queue.get_nowait()
                queue.put_nowait(None)  # ends the stream: it fell behind

    async def watch_alerts(self, model: str) -> AsyncIterator[pb.Alert]:
        queue: asyncio.Queue[pb.Alert | None] = asyncio.Queue(WATCH_QUEUE)
        watcher = (model, queue)
        self._watchers.add(watcher)
        try:
            active = await self.list_alerts(
                model, [pb.ALERT_STATE_PENDING, pb.ALERT_STATE_FIRING], MAX_ALERTS_LISTED
            )
            for current in reversed(active):
                yield current
            while True:
                change = await queue.get()
                if change is None:
                    if watcher not in self._watchers:
                        raise ResourceExhausted(
                            "alert watcher fell behind by 1000 changes; watch again"
                        )
                    return
                yield change
        finally:
            self._watchers.discard(watcher)

    def _update_drift_gauges(self, now: datetime) -> None:
        end_us = floor_minute(_us(now))
        start_us = end_us - 3_600_000_000
        for model in self.store.models():
            version = choose_version(self.store, model, start_us, end_us)
            reference = self.references.get(model, version) if version else None
            if reference is None:
                continue
            windows = merged_by(read_range(self.store, model, version, start_us, end_us))
            window = windows.get((version,))
            if window is None:
                continue
            reports = drift.drift_reports(reference, window.columns, self.config(model).drift)
            for column in reports[:MAX_GAUGE_COLUMNS]:
                if column.test:
                    self.drift_psi.labels(model, column.name).set(column.psi)
                    self.drifted.labels(model, column.name).set(1 if column.drifted else 0)
