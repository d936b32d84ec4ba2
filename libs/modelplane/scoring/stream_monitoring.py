"""Stream predictions to the monitoring service, off the scoring path: a bounded queue
drained by one thread (full or failing: dropped and counted, never blocking).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np

from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.scoring.stream_config import StreamMetrics

log = logging.getLogger("modelplane.scoring.stream")

# --- monitoring ---------------------------------------------------------------------------


@dataclass
class _Logged:
    model: str
    version: int
    ids: list[str]
    lag_ms: list[float]
    features: np.ndarray
    feature_names: list[str]
    outputs: dict[str, np.ndarray]


class MonitoringLog:
    """Predictions to the monitoring service off the scoring path: a sample of each
    micro-batch goes into a bounded queue (full: dropped and counted), drained by one
    thread with a deadline on each call."""

    def __init__(
        self, address: str, sample: float, bound: int, metrics: StreamMetrics, producer: str
    ) -> None:
        self._client = MonitoringClient(address, timeout=5.0, connect_timeout=None)
        self._sample = sample
        self._queue: queue.Queue[_Logged | None] = queue.Queue(bound)
        self._metrics = metrics
        self._producer = producer
        self._rng = np.random.default_rng()
        self._thread = threading.Thread(target=self._run, name="monitoring-log", daemon=True)
        self._thread.start()

    def offer(self, item: _Logged) -> None:
        rows = len(item.ids)
        if self._sample < 1.0:
            keep = np.flatnonzero(self._rng.random(rows) < self._sample)
            if not len(keep):
                return
            item = _Logged(
                item.model,
                item.version,
                [item.ids[i] for i in keep],
                [item.lag_ms[i] for i in keep],
                item.features[keep],
                item.feature_names,
                {k: v[keep] for k, v in item.outputs.items()},
            )
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._metrics.monitoring_dropped.labels("queue_full").inc(len(item.ids))
        self._metrics.monitoring_queue.set(self._queue.qsize())

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._metrics.monitoring_queue.set(self._queue.qsize())
            outputs = {k: v.reshape(len(item.ids), -1) for k, v in item.outputs.items()}
            batch = prediction_batch(
                item.model,
                str(item.version),
                item.ids,
                item.lag_ms,
                item.features,
                item.feature_names,
                outputs,
                route="stream",
            )
            try:
                self._client.log_predictions([batch], producer_id=self._producer)
            except Exception as exc:  # never the scorer's problem: counted and dropped
                log.debug("monitoring log failed: %s", exc)
                self._metrics.monitoring_dropped.labels("failed").inc(len(item.ids))

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=5)
        self._thread.join(10)
        self._client.close()
