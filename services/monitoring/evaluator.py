"""Evaluates every model's alert rules on each closed tumbling window of the rule's size.

A window [s, s + W) is closed once the clock passes its end plus a grace period (late
records still land in it). Each rule keeps a cursor (the end of the last window it
evaluated), stored with the alerts it changed in one transaction, so a restart goes on
where it stopped, never evaluates a window twice and never skips one. A rule set on a
model that already has data starts at the model's oldest stored window.

DRIFT and QUALITY rules are evaluated per model version; VOLUME, ERROR_RATE and
LOG_DROPS per model (version ""), since traffic, failures and drops belong to the model
whatever version served them.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring import drift, quality
from modelplane.services.monitoring.alerts import (
    AlertEngine,
    Transition,
    WindowEvaluation,
    retrain_payload,
)
from modelplane.services.monitoring.references import References
from modelplane.services.monitoring.statistics import WindowStats
from modelplane.services.monitoring.store import DAY_US, MINUTE_US, AlertRow, MonitoringStore
from modelplane.services.monitoring.windows import merged_by, merged_range, read_range

log = logging.getLogger("modelplane.monitoring.alerts")

MODEL_LEVEL = (pb.ALERT_KIND_VOLUME, pb.ALERT_KIND_ERROR_RATE, pb.ALERT_KIND_LOG_DROPS)
VOLUME_HISTORY = 12
# Windows one rule evaluates per pass at most, so a rule set over months of data
# catches up over several passes instead of holding the store for minutes.
MAX_WINDOWS_PER_PASS = 500


@dataclass(frozen=True)
class Change:
    """An alert that changed, with what notifying it needs."""

    transition: Transition
    rule: pb.AlertRule
    webhook_url: str
    retrain: dict[str, object] | None  # the retrain payload when the change fired it


def _us(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _moment(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


class AlertEvaluator:
    """Blocking (store reads); one pass at a time, off the event loop."""

    def __init__(
        self,
        store: MonitoringStore,
        references: References,
        configs: Callable[[], Iterable[pb.MonitorConfig]],
        *,
        grace_s: float = 10.0,
        engine: AlertEngine | None = None,
    ) -> None:
        self._store = store
        self._references = references
        self._configs = configs
        self._grace_us = int(grace_s * 1_000_000)
        self._engine = engine or AlertEngine()
        # (model, version, rule) → subject → the latest alert; loaded lazily per model.
        self._latest: dict[tuple[str, str, str], dict[str, pb.Alert]] = defaultdict(dict)
        self._loaded: set[str] = set()
        self._counts: dict[tuple[str, str], deque[int]] = {}
        self._held: dict[tuple[str, str, str], deque[WindowEvaluation]] = {}

    def forget(self) -> None:
        """Drops what is held in memory; the next pass reads alerts from the store."""
        self._latest.clear()
        self._loaded.clear()
        self._counts.clear()
        self._held.clear()

    def latest(self) -> dict[tuple[str, str, str], dict[str, pb.Alert]]:
        """(model, version, rule) → subject → its latest alert (for metrics)."""
        return self._latest

    def run_once(self, now: datetime) -> list[Change]:
        changes: list[Change] = []
        rows: list[AlertRow] = []
        cursors: dict[tuple[str, str], int] = {}
        now_us = _us(now)
        for config in self._configs():
            model = config.model_name
            self._load(model)
            for rule in config.rules:
                end = self._evaluate_rule(config, rule, now_us, now, changes, rows)
                if end:
                    cursors[(model, rule.name)] = end
        if rows or cursors:
            self._store.save_alerts(rows, cursors)
        return changes

    def _load(self, model: str) -> None:
        if model in self._loaded:
            return
        for row in reversed(self._store.alerts(model, (), 10_000)):  # oldest first
            alert = pb.Alert.FromString(row.payload)
            self._latest[(model, alert.model_version, alert.rule)][alert.subject] = alert
        self._loaded.add(model)

    def _evaluate_rule(
        self,
        config: pb.MonitorConfig,
        rule: pb.AlertRule,
        now_us: int,
        now: datetime,
        changes: list[Change],
        rows: list[AlertRow],
    ) -> int:
        """Evaluates the rule's closed windows not yet evaluated; the new cursor (0: none)."""
        model = config.model_name
        size = rule.window_seconds * 1_000_000
        cursor = self._store.cursor(model, rule.name) or self._first_window(model, size)
        if cursor is None:
            return 0
        closed_until = (now_us - self._grace_us) // size * size
        start = cursor
        evaluated = 0
        while start + size <= closed_until and evaluated < MAX_WINDOWS_PER_PASS:
            self._evaluate_window(config, rule, start, start + size, now, changes, rows)
            start += size
            evaluated += 1
        return start if evaluated else 0

    def _first_window(self, model: str, size: int) -> int | None:
        """The start of the rule-size window holding the model's oldest stored data: its
        oldest day, then its oldest minute in that day (the day's start when its minutes
        were pruned). Not the day's start alone: the windows before the data are not
        the model's history (a VOLUME rule would compare its first rows with them)."""
        days = self._store.read_windows(model, "", DAY_US, 0, 2**62)
        if not days:
            return None
        day = min(key.start_us for key, _ in days)
        minutes = self._store.read_windows(model, "", MINUTE_US, day, day + DAY_US)
        oldest = min((key.start_us for key, _ in minutes), default=day)
        return oldest // size * size

    def _evaluate_window(
        self,
        config: pb.MonitorConfig,
        rule: pb.AlertRule,
        start: int,
        end: int,
        now: datetime,
        changes: list[Change],
        rows: list[AlertRow],
    ) -> None:
        model = config.model_name
        if rule.kind in MODEL_LEVEL:
            evaluations = {"": self._model_evaluation(model, rule, start, end)}
        else:
            per_version = merged_by(read_range(self._store, model, "", start, end))
            evaluations = {
                name[0]: self._version_evaluation(config, rule, name[0], window, start, end)
                for name, window in per_version.items()
                if name[0]
            }
            # A version with an active alert but no rows now: no evidence, so it resolves.
            for (m, version, rule_name), subjects in self._latest.items():
                active = any(a.state != pb.ALERT_STATE_RESOLVED for a in subjects.values())
                if m == model and rule_name == rule.name and version not in evaluations and active:
                    evaluations[version] = WindowEvaluation(_moment(start), _moment(end))
        for version, evaluation in sorted(evaluations.items()):
            held = self._held.setdefault(
                (model, version, rule.name), deque(maxlen=max(1, rule.for_windows))
            )
            held.append(evaluation)
            latest = self._latest[(model, version, rule.name)]
            for transition in self._engine.evaluate(rule, model, version, evaluation, latest, now):
                alert = transition.after
                latest[alert.subject] = alert
                rows.append(
                    AlertRow(
                        alert.id,
                        model,
                        version,
                        rule.name,
                        alert.subject,
                        alert.state,
                        _us(now),
                        alert.SerializeToString(),
                    )
                )
                payload = (
                    retrain_payload(alert, rule, list(held))
                    if transition.fired and rule.HasField("retrain")
                    else None
                )
                changes.append(Change(transition, rule, config.webhook_url, payload))

    def _model_evaluation(
        self, model: str, rule: pb.AlertRule, start: int, end: int
    ) -> WindowEvaluation:
        counters = merged_range(self._store, model, "", start, end)
        total = sum(
            w.count for w in merged_by(read_range(self._store, model, "", start, end)).values()
        )
        history = self._counts.get((model, rule.name))
        if history is None:
            size = end - start
            oldest = self._first_window(model, size)
            first = start if oldest is None else oldest
            history = deque(
                (
                    sum(
                        w.count
                        for w in merged_by(
                            read_range(self._store, model, "", start - i * size, end - i * size)
                        ).values()
                    )
                    for i in range(VOLUME_HISTORY, 0, -1)
                    if start - i * size >= first  # before the model's data: no history
                ),
                maxlen=VOLUME_HISTORY,
            )
            self._counts[(model, rule.name)] = history
        evaluation = WindowEvaluation(
            _moment(start),
            _moment(end),
            count=total,
            previous_counts=list(history),
            dropped_records=counters.dropped_records,
            failed_requests=counters.failed_requests,
            requests=counters.requests,
        )
        history.append(total)
        return evaluation

    def _version_evaluation(
        self,
        config: pb.MonitorConfig,
        rule: pb.AlertRule,
        version: str,
        window: WindowStats,
        start: int,
        end: int,
    ) -> WindowEvaluation:
        model = config.model_name
        verdicts: dict[str, tuple[bool, float]] = {}
        quality_values: Mapping[str, float] = {}
        labelled = 0
        if rule.kind == pb.ALERT_KIND_DRIFT:
            reference = self._references.get(model, version)
            if reference is not None:
                for column in drift.drift_reports(reference, window.columns, config.drift):
                    if column.test and not np.isnan(column.adjusted_p_value):
                        verdicts[column.name] = (column.drifted, column.psi)
        elif rule.kind == pb.ALERT_KIND_QUALITY and config.task:
            labels = self._store.labels(model, version, start, end)
            scores = np.array([r.prediction for r in labels], dtype=np.float64)
            truth = np.array([r.label for r in labels], dtype=np.float64)
            keep = np.isfinite(scores)
            if config.task == pb.TASK_TYPE_BINARY_CLASSIFICATION:
                keep &= (truth == 0) | (truth == 1)
            labelled = int(keep.sum())
            quality_values = quality.quality_metrics(
                config.task, scores[keep], truth[keep], config.decision_threshold or 0.5
            )
        return WindowEvaluation(
            _moment(start),
            _moment(end),
            count=window.count,
            drift=verdicts,
            quality=quality_values,
            labelled=labelled,
        )
