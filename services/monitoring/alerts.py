"""Alert rules: their validation, their conditions on closed windows, and the life of an
alert (pending → firing → resolved). Pure: no I/O, no clock, no gRPC, no SQL.

How it is used: when a tumbling window of a rule's size closes, the service summarises
it for each model version in a `WindowEvaluation` (from merged window statistics),
`condition` turns the rule and the evaluation into one `Finding` per subject (column,
metric, or "" for volume, error rate and drops), and `AlertEngine.step` moves the alert
of each (model, version, rule, subject) one window on. The caller stores the alerts that
changed and notifies those that fired or resolved after firing (`should_notify`).

Decisions worth knowing:
- No evidence is not holding. A window with too few rows for a drift verdict, or too
  few labels for a quality metric, yields a finding that does not hold: a pending alert
  clears and a firing alert resolves, as a Prometheus alert resolves when its series
  disappears. A condition that cannot be checked cannot page anyone.
- A pending alert that clears is kept, as RESOLVED without a fired time, not dropped:
  the history shows near misses, and since it never fired nobody is notified of it.
- Windows are evaluated in order. A window that ends at or before the alert's last
  evaluated window end changes nothing (so a re-evaluated window, e.g. after late
  labels, is not counted twice); this holds for resolved alerts too when the caller
  passes the latest alert of the (rule, subject) whatever its state.
- A resolved alert is never reopened: the next occurrence is a new alert whose id is
  derived from its own first window.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from statistics import median
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring.quality import METRICS_HIGHER_IS_BETTER, validate_metric

DEFAULT_WINDOW_SECONDS = 300
MAX_WINDOW_SECONDS = 86_400
DEFAULT_FOR_WINDOWS = 1
MAX_FOR_WINDOWS = 1_000
DEFAULT_MIN_SAMPLES = 100
DEFAULT_DECISION_THRESHOLD = 0.5
DEFAULT_FAMILY_ALPHA = 0.01
MAX_FAMILY_ALPHA = 0.5
DEFAULT_DRIFT_MIN_SAMPLES = 1_000
DEFAULT_REFERENCE_ROWS = 10_000
MAX_RULES = 100
MAX_RULE_NAME_CHARS = 64
MAX_URL_CHARS = 2_048
MAX_COMMAND_ARGS = 256
# VOLUME compares a window with the median of this many previous windows, and only
# once at least VOLUME_MIN_HISTORY of them exist (a median of one or two is noise).
VOLUME_HISTORY = 12
VOLUME_MIN_HISTORY = 3

_ACTIVE = (pb.ALERT_STATE_PENDING, pb.ALERT_STATE_FIRING)


# --- configuration ------------------------------------------------------------------


def validate_config(config: pb.MonitorConfig) -> pb.MonitorConfig:
    """A copy of `config` with the defaults filled in; raises InvalidArgument naming the
    first wrong field (e.g. "rules[2].window_seconds: ..."). The stored configuration is
    always the validated copy, so the rest of the service never re-applies defaults."""
    out = pb.MonitorConfig()
    out.CopyFrom(config)
    if not out.model_name:
        raise InvalidArgument("model_name: required")
    if out.task not in pb.TaskType.values():
        raise InvalidArgument(f"task: unknown task type {out.task}")
    if out.decision_threshold == 0.0:
        out.decision_threshold = DEFAULT_DECISION_THRESHOLD
    _require_finite("decision_threshold", out.decision_threshold)
    _validate_drift(out.drift)
    if out.webhook_url:
        _validate_url("webhook_url", out.webhook_url)
    if len(out.rules) > MAX_RULES:
        raise InvalidArgument(f"rules: at most {MAX_RULES}, got {len(out.rules)}")
    names: set[str] = set()
    for index, rule in enumerate(out.rules):
        where = f"rules[{index}]"
        _validate_rule(where, rule, out.task)
        if rule.name in names:
            raise InvalidArgument(f"{where}.name: {rule.name!r} is used by an earlier rule")
        names.add(rule.name)
    return out


def _validate_drift(drift: pb.DriftPolicy) -> None:
    if drift.family_alpha == 0.0:
        drift.family_alpha = DEFAULT_FAMILY_ALPHA
    if not 0.0 < drift.family_alpha <= MAX_FAMILY_ALPHA:  # also refuses NaN
        raise InvalidArgument(
            f"drift.family_alpha: must be in (0, {MAX_FAMILY_ALPHA}], got {drift.family_alpha}"
        )
    if drift.min_samples == 0:
        drift.min_samples = DEFAULT_DRIFT_MIN_SAMPLES
    if drift.reference_rows == 0:
        drift.reference_rows = DEFAULT_REFERENCE_ROWS
    for name, threshold in drift.columns.items():
        where = f"drift.columns[{name!r}]"
        if not name:
            raise InvalidArgument("drift.columns: a column name is empty")
        if not (math.isfinite(threshold.min_psi) and threshold.min_psi >= 0.0):
            raise InvalidArgument(f"{where}.min_psi: must be finite and >= 0")
        if not 0.0 <= threshold.min_js_distance <= 1.0:
            raise InvalidArgument(f"{where}.min_js_distance: must be in [0, 1]")


def _validate_rule(where: str, rule: pb.AlertRule, task: int) -> None:
    """Checks one rule and fills its defaults in place."""
    if not rule.name:
        raise InvalidArgument(f"{where}.name: required")
    if len(rule.name) > MAX_RULE_NAME_CHARS:
        raise InvalidArgument(f"{where}.name: at most {MAX_RULE_NAME_CHARS} characters")
    if rule.kind == pb.ALERT_KIND_UNSPECIFIED or rule.kind not in pb.AlertKind.values():
        raise InvalidArgument(f"{where}.kind: required (DRIFT, QUALITY, VOLUME, ...)")
    _fill_rule_defaults(where, rule)
    _require_finite(f"{where}.threshold", rule.threshold)
    _validate_kind_fields(where, rule, task)
    if rule.HasField("retrain"):
        _validate_retrain(f"{where}.retrain", rule.retrain)


def _fill_rule_defaults(where: str, rule: pb.AlertRule) -> None:
    if rule.window_seconds == 0:
        rule.window_seconds = DEFAULT_WINDOW_SECONDS
    if rule.window_seconds % 60 or rule.window_seconds > MAX_WINDOW_SECONDS:
        raise InvalidArgument(
            f"{where}.window_seconds: must be a multiple of 60 and at most "
            f"{MAX_WINDOW_SECONDS}, got {rule.window_seconds}"
        )
    if rule.for_windows == 0:
        rule.for_windows = DEFAULT_FOR_WINDOWS
    if rule.for_windows > MAX_FOR_WINDOWS:
        raise InvalidArgument(f"{where}.for_windows: at most {MAX_FOR_WINDOWS}")
    if rule.min_samples == 0:
        rule.min_samples = DEFAULT_MIN_SAMPLES


def _validate_kind_fields(where: str, rule: pb.AlertRule, task: int) -> None:
    """The fields each kind reads; a field another kind reads is refused, since setting
    it can only be a mistake the caller would otherwise never hear about."""
    kind = rule.kind
    if rule.column and kind != pb.ALERT_KIND_DRIFT:
        raise InvalidArgument(f"{where}.column: only DRIFT rules watch a column")
    if rule.metric and kind != pb.ALERT_KIND_QUALITY:
        raise InvalidArgument(f"{where}.metric: only QUALITY rules watch a metric")
    threshold = rule.threshold
    if kind == pb.ALERT_KIND_QUALITY:
        validate_metric(task, rule.metric, f"{where}.metric")
    elif kind == pb.ALERT_KIND_DRIFT and threshold < 0.0:
        raise InvalidArgument(f"{where}.threshold: a DRIFT rule's minimum PSI must be >= 0")
    elif kind == pb.ALERT_KIND_VOLUME and threshold <= 1.0:
        raise InvalidArgument(f"{where}.threshold: a VOLUME factor must be > 1")
    elif kind == pb.ALERT_KIND_ERROR_RATE and not 0.0 < threshold <= 1.0:
        raise InvalidArgument(f"{where}.threshold: an error rate must be in (0, 1]")
    elif kind == pb.ALERT_KIND_LOG_DROPS and threshold <= 0.0:
        raise InvalidArgument(f"{where}.threshold: dropped records must be > 0")


def _validate_retrain(where: str, retrain: pb.RetrainTrigger) -> None:
    if not retrain.command and not retrain.webhook_url:
        raise InvalidArgument(f"{where}: needs a command, a webhook_url or both")
    if retrain.command:
        if not retrain.command[0]:
            raise InvalidArgument(f"{where}.command[0]: the program is empty")
        if len(retrain.command) > MAX_COMMAND_ARGS:
            raise InvalidArgument(f"{where}.command: at most {MAX_COMMAND_ARGS} arguments")
        for index, arg in enumerate(retrain.command):
            if "\x00" in arg:
                raise InvalidArgument(f"{where}.command[{index}]: contains a NUL character")
    if retrain.webhook_url:
        _validate_url(f"{where}.webhook_url", retrain.webhook_url)


def _validate_url(where: str, url: str) -> None:
    if len(url) > MAX_URL_CHARS or any(c.isspace() for c in url):
        raise InvalidArgument(f"{where}: not a URL (spaces, or over {MAX_URL_CHARS} chars)")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise InvalidArgument(f"{where}: not a URL") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidArgument(f"{where}: must be an http:// or https:// URL with a host")


def _require_finite(where: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{where}: must be finite, got {value}")


# --- conditions ---------------------------------------------------------------------


@dataclass(frozen=True)
class WindowEvaluation:
    """What the service computed for one closed window of one rule's size on one model
    version; `condition` reads only this, so rules are tested without a store."""

    window_start: datetime
    window_end: datetime
    # Prediction records in the window.
    count: int = 0
    # Column → (drifted, PSI); None or empty when there is no verdict (too few rows,
    # no reference yet).
    drift: Mapping[str, tuple[bool, float]] | None = None
    # Metric → value over the window's labelled rows (undefined metrics absent).
    quality: Mapping[str, float] = field(default_factory=dict)
    labelled: int = 0
    # Record counts of the previous windows of the same size, oldest first (up to 12 used).
    previous_counts: Sequence[int] = ()
    dropped_records: int = 0
    failed_requests: int = 0
    requests: int = 0


class Finding(NamedTuple):
    """A rule's condition on one subject in one window."""

    subject: str  # the column or metric; "" for volume, error rate and drops
    holds: bool
    value: float  # what Alert.value shows: PSI, the metric, rows, rate, drops; NaN if none
    summary: str  # a phrase for people, e.g. "amount drifted (PSI 0.31)"


def condition(
    rule: pb.AlertRule,
    evaluation: WindowEvaluation,
    higher_is_better: Mapping[str, bool] = METRICS_HIGHER_IS_BETTER,
) -> list[Finding]:
    """The rule's findings in the window: one per column for DRIFT (the rule's column,
    or each column with a verdict when empty), one otherwise."""
    kind = rule.kind
    if kind == pb.ALERT_KIND_DRIFT:
        return _drift_findings(rule, evaluation)
    if kind == pb.ALERT_KIND_QUALITY:
        return [_quality_finding(rule, evaluation, higher_is_better)]
    if kind == pb.ALERT_KIND_VOLUME:
        return [_volume_finding(rule, evaluation)]
    if kind == pb.ALERT_KIND_ERROR_RATE:
        return [_error_rate_finding(rule, evaluation)]
    if kind == pb.ALERT_KIND_LOG_DROPS:
        return [_drops_finding(rule, evaluation)]
    return []


def _drift_findings(rule: pb.AlertRule, evaluation: WindowEvaluation) -> list[Finding]:
    """Drifted means the service's verdict says so and, when the rule has a threshold,
    PSI is at least that too (a rule stricter than the model's drift policy)."""
    verdicts = evaluation.drift or {}
    columns = [rule.column] if rule.column else sorted(verdicts)
    findings = []
    for column in columns:
        if column not in verdicts:
            findings.append(Finding(column, False, math.nan, f"{column}: no drift verdict"))
            continue
        drifted, psi = verdicts[column]
        holds = bool(drifted) and psi >= rule.threshold
        phrase = "drifted" if holds else "not drifted"
        findings.append(Finding(column, holds, float(psi), f"{column} {phrase} (PSI {psi:.2f})"))
    return findings


def _quality_finding(
    rule: pb.AlertRule, evaluation: WindowEvaluation, higher_is_better: Mapping[str, bool]
) -> Finding:
    metric = rule.metric
    needed = rule.min_samples or DEFAULT_MIN_SAMPLES
    value = evaluation.quality.get(metric)
    if evaluation.labelled < needed:
        return Finding(
            metric,
            False,
            math.nan if value is None else value,
            f"{metric}: {evaluation.labelled} labelled rows, fewer than {needed}",
        )
    if value is None or not math.isfinite(value):
        return Finding(metric, False, math.nan, f"{metric}: undefined on the labelled rows")
    higher = higher_is_better.get(metric, True)
    holds = value < rule.threshold if higher else value > rule.threshold
    side = ("below" if higher else "above") if holds else "within"
    return Finding(
        metric,
        holds,
        value,
        f"{metric} {value:.3g} {side} {rule.threshold:.3g} on {evaluation.labelled} labelled rows",
    )


def _volume_finding(rule: pb.AlertRule, evaluation: WindowEvaluation) -> Finding:
    count = evaluation.count
    history = list(evaluation.previous_counts)[-VOLUME_HISTORY:]
    if len(history) < VOLUME_MIN_HISTORY:
        return Finding(
            "",
            False,
            float(count),
            f"{count} records, fewer than {VOLUME_MIN_HISTORY} previous windows to compare",
        )
    typical = float(median(history))
    factor = rule.threshold
    holds = count < typical / factor or count > typical * factor
    side = "outside" if holds else "within"
    return Finding(
        "",
        holds,
        float(count),
        f"{count} records vs median {typical:g} of {len(history)} windows "
        f"({side} [median / {factor:g}, median * {factor:g}])",
    )


def _error_rate_finding(rule: pb.AlertRule, evaluation: WindowEvaluation) -> Finding:
    failed, requests = evaluation.failed_requests, evaluation.requests
    if requests <= 0:
        return Finding("", False, 0.0, "no requests reported")
    rate = failed / requests
    holds = rate >= rule.threshold
    return Finding(
        "",
        holds,
        rate,
        f"error rate {rate:.1%} ({failed} of {requests} requests, threshold {rule.threshold:.1%})",
    )


def _drops_finding(rule: pb.AlertRule, evaluation: WindowEvaluation) -> Finding:
    dropped = evaluation.dropped_records
    holds = dropped >= rule.threshold
    return Finding(
        "",
        holds,
        float(dropped),
        f"{dropped} prediction records dropped (threshold {rule.threshold:g})",
    )


# --- the state machine --------------------------------------------------------------


def alert_id(model: str, version: str, rule: str, subject: str, start: datetime) -> str:
    """Deterministic, so re-evaluating after a restart finds the same alert; hashed,
    since names may hold any character (a '/' in a plain id would be ambiguous)."""
    key = "\x1f".join((model, version, rule, subject, str(int(start.timestamp()))))
    return "al-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def fires(before: pb.Alert | None, after: pb.Alert | None) -> bool:
    """Whether a step made the alert fire: the moment notifications and retraining run."""
    if after is None or after.state != pb.ALERT_STATE_FIRING:
        return False
    return before is None or before.state != pb.ALERT_STATE_FIRING


def should_notify(before: pb.Alert | None, after: pb.Alert | None) -> bool:
    """Fired, or resolved after having fired; a pending alert that cleared stays quiet."""
    if fires(before, after):
        return True
    return (
        after is not None
        and after.state == pb.ALERT_STATE_RESOLVED
        and before is not None
        and before.state == pb.ALERT_STATE_FIRING
    )


@dataclass(frozen=True)
class Transition:
    """One alert changed by a step: what it was (None when new) and what it is."""

    before: pb.Alert | None
    after: pb.Alert

    @property
    def fired(self) -> bool:
        return fires(self.before, self.after)

    @property
    def notify(self) -> bool:
        return should_notify(self.before, self.after)


class AlertEngine:
    """Moves alerts one window at a time. Pure: it is given the current alert and the
    time, returns the next alert, and never mutates what it was given."""

    def __init__(self, higher_is_better: Mapping[str, bool] = METRICS_HIGHER_IS_BETTER) -> None:
        self._higher_is_better = higher_is_better

    def step(
        self,
        rule: pb.AlertRule,
        model: str,
        version: str,
        finding: Finding,
        window_start: datetime,
        window_end: datetime,
        active: pb.Alert | None,
        now: datetime,
    ) -> tuple[pb.Alert | None, bool]:
        """The alert of (rule, finding.subject) after the window, and whether it changed.

        `active` is the alert's latest state (None when there is none; a resolved one
        may be passed too, so a re-evaluated old window is recognised). Unchanged, the
        result is `active` itself. Times are timezone-aware (UTC).
        """
        if active is not None and window_end <= _time(active.last_window_end):
            return active, False  # this window (or a later one) was already counted
        if active is None or active.state not in _ACTIVE:
            if not finding.holds:
                return active, False
            return self._open(rule, model, version, finding, window_start, window_end, now), True
        if finding.holds:
            return self._continue(rule, finding, window_end, active, now), True
        return self._resolve(finding, window_end, active, now), True

    def evaluate(
        self,
        rule: pb.AlertRule,
        model: str,
        version: str,
        evaluation: WindowEvaluation,
        latest: Mapping[str, pb.Alert],
        now: datetime,
    ) -> list[Transition]:
        """Steps every subject of the rule through one window; `latest` maps subject →
        its latest alert of this (model, version, rule), active or not. An active alert
        whose subject has no finding this window (a column that lost its verdict) gets a
        not-holding one: no evidence, no alert."""
        findings = {f.subject: f for f in condition(rule, evaluation, self._higher_is_better)}
        for subject, alert in latest.items():
            if subject not in findings and alert.state in _ACTIVE:
                label = subject or _kind_name(rule.kind)
                findings[subject] = Finding(subject, False, math.nan, f"{label}: no evidence")
        transitions = []
        for subject, finding in sorted(findings.items()):
            before = latest.get(subject)
            after, changed = self.step(
                rule,
                model,
                version,
                finding,
                evaluation.window_start,
                evaluation.window_end,
                before,
                now,
            )
            if changed and after is not None:
                transitions.append(Transition(before, after))
        return transitions

    def _open(
        self,
        rule: pb.AlertRule,
        model: str,
        version: str,
        finding: Finding,
        window_start: datetime,
        window_end: datetime,
        now: datetime,
    ) -> pb.Alert:
        alert = pb.Alert(
            id=alert_id(model, version, rule.name, finding.subject, window_start),
            model_name=model,
            model_version=version,
            rule=rule.name,
            kind=rule.kind,
            subject=finding.subject,
            state=pb.ALERT_STATE_PENDING,
            value=finding.value,
            threshold=rule.threshold,
            windows=1,
        )
        alert.start_time.FromDatetime(window_start)
        alert.last_window_end.FromDatetime(window_end)
        self._fire_if_due(rule, alert, now)
        alert.summary = _summary(rule, alert, finding)
        return alert

    def _continue(
        self,
        rule: pb.AlertRule,
        finding: Finding,
        window_end: datetime,
        active: pb.Alert,
        now: datetime,
    ) -> pb.Alert:
        alert = _copy(active)
        alert.windows += 1
        alert.value = finding.value
        alert.last_window_end.FromDatetime(window_end)
        self._fire_if_due(rule, alert, now)
        alert.summary = _summary(rule, alert, finding)
        return alert

    def _resolve(
        self, finding: Finding, window_end: datetime, active: pb.Alert, now: datetime
    ) -> pb.Alert:
        alert = _copy(active)
        was_firing = alert.state == pb.ALERT_STATE_FIRING
        alert.state = pb.ALERT_STATE_RESOLVED
        if math.isfinite(finding.value):
            alert.value = finding.value
        alert.last_window_end.FromDatetime(window_end)
        alert.resolved_time.FromDatetime(now)
        head = f"{alert.model_name} v{alert.model_version}"
        how = "resolved" if was_firing else "cleared before firing"
        alert.summary = f"{head}: {how}, {finding.summary}"
        return alert

    @staticmethod
    def _fire_if_due(rule: pb.AlertRule, alert: pb.Alert, now: datetime) -> None:
        if alert.state == pb.ALERT_STATE_PENDING and alert.windows >= _for_windows(rule):
            alert.state = pb.ALERT_STATE_FIRING
            alert.fired_time.FromDatetime(now)


def _summary(rule: pb.AlertRule, alert: pb.Alert, finding: Finding) -> str:
    """E.g. "fraud v2: amount drifted (PSI 0.31) for 3 windows"."""
    head = f"{alert.model_name} v{alert.model_version}: {finding.summary}"
    if alert.state == pb.ALERT_STATE_PENDING:
        return f"{head} for {alert.windows} of {_for_windows(rule)} windows"
    plural = "window" if alert.windows == 1 else "windows"
    return f"{head} for {alert.windows} {plural}"


def _for_windows(rule: pb.AlertRule) -> int:
    return rule.for_windows or DEFAULT_FOR_WINDOWS


def _copy(alert: pb.Alert) -> pb.Alert:
    out = pb.Alert()
    out.CopyFrom(alert)
    return out


def _time(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


# --- retraining ---------------------------------------------------------------------


def retrain_payload(
    alert: pb.Alert, rule: pb.AlertRule, evaluations: Sequence[WindowEvaluation]
) -> dict[str, Any]:
    """What a retrain command reads on stdin and its webhook receives: JSON-able, about
    the alert and the windows it held in (`evaluations`, the alert's last windows)."""
    windows = sorted(evaluations, key=lambda e: e.window_start)
    return {
        "alert_id": alert.id,
        "model": alert.model_name,
        "version": alert.model_version,
        "rule": rule.name,
        "kind": _kind_name(rule.kind),
        "subject": alert.subject,
        "value": _json_number(alert.value),
        "threshold": _json_number(rule.threshold),
        "windows_held": alert.windows,
        "start_time": _iso(alert.start_time) if alert.HasField("start_time") else None,
        "fired_time": _iso(alert.fired_time) if alert.HasField("fired_time") else None,
        "drifted_columns": _drifted_columns(rule, windows),
        "windows": [_window_json(rule, e) for e in windows],
    }


def _drifted_columns(
    rule: pb.AlertRule, windows: Sequence[WindowEvaluation]
) -> list[dict[str, Any]]:
    """Each column that drifted in any of the windows, with its latest drifted PSI,
    highest first."""
    latest: dict[str, float] = {}
    for evaluation in windows:
        latest.update(_drifted(rule, evaluation))
    ranked = sorted(latest.items(), key=lambda item: (-item[1], item[0]))
    return [{"column": column, "psi": _json_number(psi)} for column, psi in ranked]


def _drifted(rule: pb.AlertRule, evaluation: WindowEvaluation) -> dict[str, float]:
    verdicts = evaluation.drift or {}
    return {
        column: float(psi)
        for column, (drifted, psi) in verdicts.items()
        if drifted and (not rule.column or column == rule.column)
    }


def _window_json(rule: pb.AlertRule, evaluation: WindowEvaluation) -> dict[str, Any]:
    return {
        "start": evaluation.window_start.astimezone(UTC).isoformat(),
        "end": evaluation.window_end.astimezone(UTC).isoformat(),
        "count": evaluation.count,
        "drifted": {c: _json_number(p) for c, p in sorted(_drifted(rule, evaluation).items())},
        "labelled": evaluation.labelled,
        "quality": {m: _json_number(v) for m, v in sorted(evaluation.quality.items())},
        "dropped_records": evaluation.dropped_records,
        "failed_requests": evaluation.failed_requests,
        "requests": evaluation.requests,
    }


def _kind_name(kind: int) -> str:
    name = pb.AlertKind.Name(cast(pb.AlertKind.ValueType, kind))
    return name.removeprefix("ALERT_KIND_").lower()


def _json_number(value: float) -> float | None:
    """Strict JSON has no NaN or infinity."""
    return float(value) if math.isfinite(value) else None


def _iso(ts: Timestamp) -> str:
    return _time(ts).isoformat()
