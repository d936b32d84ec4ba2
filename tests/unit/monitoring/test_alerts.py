import json
import math
import re
from datetime import UTC, datetime, timedelta

import pytest

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring import alerts
from modelplane.services.monitoring.alerts import AlertEngine, Finding, WindowEvaluation

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(minutes=5)
BINARY = pb.TASK_TYPE_BINARY_CLASSIFICATION


def window(i, **fields):
    """The i-th five-minute window after T0."""
    return WindowEvaluation(
        window_start=T0 + i * WINDOW, window_end=T0 + (i + 1) * WINDOW, **fields
    )


def drift_rule(**fields):
    fields.setdefault("name", "amount-drift")
    fields.setdefault("kind", pb.ALERT_KIND_DRIFT)
    return pb.AlertRule(**fields)


def config(*rules, **fields):
    fields.setdefault("model_name", "fraud")
    return pb.MonitorConfig(rules=list(rules), **fields)


# --- validate_config ------------------------------------------------------------------


def test_defaults_are_filled_in_a_copy():
    original = config(
        drift_rule(),
        pb.AlertRule(name="f1", kind=pb.ALERT_KIND_QUALITY, metric="f1", threshold=0.8),
        task=BINARY,
    )
    valid = alerts.validate_config(original)
    assert valid.decision_threshold == 0.5
    assert valid.drift.family_alpha == 0.01
    assert valid.drift.min_samples == 1000 and valid.drift.reference_rows == 10_000
    rule = valid.rules[0]
    assert (rule.window_seconds, rule.for_windows, rule.min_samples) == (300, 1, 100)
    assert original.rules[0].window_seconds == 0 and original.drift.family_alpha == 0.0


def test_set_values_are_kept():
    valid = alerts.validate_config(
        config(
            drift_rule(window_seconds=3600, for_windows=3, threshold=0.2),
            decision_threshold=0.7,
            drift=pb.DriftPolicy(family_alpha=0.05, min_samples=50, reference_rows=7),
            webhook_url="https://hooks.example.com/alerts?x=1",
        )
    )
    assert valid.decision_threshold == 0.7 and valid.drift.family_alpha == 0.05
    assert valid.drift.min_samples == 50 and valid.drift.reference_rows == 7
    assert (valid.rules[0].window_seconds, valid.rules[0].for_windows) == (3600, 3)


def bad(field, **rule_fields):
    return pytest.param(rule_fields, field, id=field)


@pytest.mark.parametrize(
    ("rule_fields", "field"),
    [
        bad("rules[0].window_seconds", window_seconds=90),
        bad("rules[0].window_seconds", window_seconds=86_460),
        bad("rules[0].for_windows", for_windows=1001),
        bad("rules[0].name", name=""),
        bad("rules[0].name", name="x" * 65),
        bad("rules[0].kind", kind=pb.ALERT_KIND_UNSPECIFIED),
        bad("rules[0].threshold", threshold=math.nan),
        bad("rules[0].threshold", threshold=-0.1),
        bad("rules[0].metric", metric="f1"),
        bad("rules[0].retrain", retrain=pb.RetrainTrigger()),
        bad("rules[0].retrain.command[0]", retrain=pb.RetrainTrigger(command=["", "x"])),
        bad("rules[0].retrain.webhook_url", retrain=pb.RetrainTrigger(webhook_url="ftp://h/x")),
        bad("rules[0].retrain.webhook_url", retrain=pb.RetrainTrigger(webhook_url="http://")),
        bad(
            "rules[0].retrain.webhook_url",
            retrain=pb.RetrainTrigger(webhook_url="http://h:99999/x"),
        ),
    ],
)
def test_a_bad_drift_rule_is_refused_naming_the_field(rule_fields, field):
    with pytest.raises(InvalidArgument, match="^" + re.escape(field) + ":"):
        alerts.validate_config(config(drift_rule(**rule_fields)))


@pytest.mark.parametrize(
    ("rule", "task", "field"),
    [
        (pb.AlertRule(kind=pb.ALERT_KIND_QUALITY, metric="f1"), 0, "task"),
        (pb.AlertRule(kind=pb.ALERT_KIND_QUALITY, metric="rmse"), BINARY, "rmse"),
        (pb.AlertRule(kind=pb.ALERT_KIND_QUALITY, metric=""), BINARY, "metric"),
        (pb.AlertRule(kind=pb.ALERT_KIND_VOLUME, threshold=1.0), 0, "VOLUME"),
        (pb.AlertRule(kind=pb.ALERT_KIND_ERROR_RATE, threshold=0.0), 0, "error rate"),
        (pb.AlertRule(kind=pb.ALERT_KIND_ERROR_RATE, threshold=1.5), 0, "error rate"),
        (pb.AlertRule(kind=pb.ALERT_KIND_LOG_DROPS, threshold=0.0), 0, "dropped"),
        (pb.AlertRule(kind=pb.ALERT_KIND_LOG_DROPS, threshold=5, column="x"), 0, "column"),
    ],
)
def test_kind_specific_fields_are_checked(rule, task, field):
    rule.name = "r"
    with pytest.raises(InvalidArgument, match=rf"^rules\[1\]\..*{field}"):
        alerts.validate_config(config(drift_rule(), rule, task=task))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model_name": ""}, "model_name"),
        ({"drift": pb.DriftPolicy(family_alpha=0.6)}, "drift.family_alpha"),
        ({"drift": pb.DriftPolicy(family_alpha=-0.1)}, "drift.family_alpha"),
        ({"webhook_url": "not a url"}, "webhook_url"),
        ({"webhook_url": "file:///etc/passwd"}, "webhook_url"),
        ({"decision_threshold": math.inf}, "decision_threshold"),
    ],
)
def test_bad_config_fields_are_refused(fields, field):
    with pytest.raises(InvalidArgument, match=f"^{field}:"):
        alerts.validate_config(config(**fields))


def test_rule_names_are_unique():
    with pytest.raises(InvalidArgument, match=r"^rules\[1\]\.name: 'a' is used"):
        alerts.validate_config(config(drift_rule(name="a"), drift_rule(name="a")))


def test_a_retrain_trigger_with_a_command_and_a_webhook_is_valid():
    trigger = pb.RetrainTrigger(command=["retrain", "--model", "fraud"], webhook_url="http://h/r")
    valid = alerts.validate_config(config(drift_rule(for_windows=3, retrain=trigger)))
    assert list(valid.rules[0].retrain.command) == ["retrain", "--model", "fraud"]


# --- conditions -----------------------------------------------------------------------


def test_drift_gives_a_finding_per_column_or_for_the_rules_column():
    evaluation = window(0, count=5000, drift={"amount": (True, 0.31), "age": (False, 0.02)})
    every = alerts.condition(drift_rule(), evaluation)
    assert [(f.subject, f.holds) for f in every] == [("age", False), ("amount", True)]
    assert every[1].value == 0.31 and every[1].summary == "amount drifted (PSI 0.31)"
    one = alerts.condition(drift_rule(column="amount"), evaluation)
    assert [(f.subject, f.holds) for f in one] == [("amount", True)]
    # A rule threshold is a minimum PSI on top of the service's verdict.
    assert not alerts.condition(drift_rule(column="amount", threshold=0.5), evaluation)[0].holds


def test_drift_without_a_verdict_is_not_holding():
    (finding,) = alerts.condition(drift_rule(column="amount"), window(0, count=10))
    assert finding.subject == "amount" and not finding.holds and math.isnan(finding.value)
    assert alerts.condition(drift_rule(), window(0, count=10, drift={})) == []


def quality_rule(metric="f1", threshold=0.8, **fields):
    return pb.AlertRule(
        name="q", kind=pb.ALERT_KIND_QUALITY, metric=metric, threshold=threshold, **fields
    )


def test_quality_crosses_below_for_scores_and_above_for_losses():
    evaluation = window(0, quality={"f1": 0.6, "log_loss": 0.9}, labelled=500)
    (f1,) = alerts.condition(quality_rule(), evaluation)
    assert (f1.subject, f1.holds, f1.value) == ("f1", True, 0.6)
    assert "below" in f1.summary
    (loss,) = alerts.condition(quality_rule("log_loss", 0.5), evaluation)
    assert loss.holds
    (fine,) = alerts.condition(quality_rule("log_loss", 1.0), evaluation)
    assert not fine.holds


def test_quality_with_too_few_labels_is_no_evidence():
    evaluation = window(0, quality={"f1": 0.1}, labelled=99)
    (finding,) = alerts.condition(quality_rule(min_samples=100), evaluation)
    assert not finding.holds and "fewer than 100" in finding.summary
    (absent,) = alerts.condition(quality_rule("roc_auc"), window(0, labelled=500))
    assert not absent.holds


def volume_rule(factor=3.0):
    return pb.AlertRule(name="v", kind=pb.ALERT_KIND_VOLUME, threshold=factor)


@pytest.mark.parametrize(
    ("count", "previous", "holds"),
    [
        (100, [100, 110, 90], False),
        (301, [100, 110, 90], True),  # above median * 3
        (33, [100, 110, 90, 1000], True),  # below median / 3 (median 105)
        (10_000, [100, 110], False),  # too little history to judge
        (300, [1] * 20 + [100, 100, 100, 100, 100, 100, 100], False),  # only the last 12 count
    ],
)
def test_volume(count, previous, holds):
    (finding,) = alerts.condition(volume_rule(), window(0, count=count, previous_counts=previous))
    assert finding.subject == "" and finding.holds is holds and finding.value == count


def test_error_rate_and_log_drops():
    rate = pb.AlertRule(name="e", kind=pb.ALERT_KIND_ERROR_RATE, threshold=0.05)
    (high,) = alerts.condition(rate, window(0, failed_requests=5, requests=100))
    assert high.holds and high.value == 0.05
    (low,) = alerts.condition(rate, window(0, failed_requests=4, requests=100))
    assert not low.holds
    (idle,) = alerts.condition(rate, window(0))
    assert not idle.holds
    drops = pb.AlertRule(name="d", kind=pb.ALERT_KIND_LOG_DROPS, threshold=100)
    assert alerts.condition(drops, window(0, dropped_records=100))[0].holds
    assert not alerts.condition(drops, window(0, dropped_records=99))[0].holds


# --- the state machine ----------------------------------------------------------------

HOLDS = Finding("amount", True, 0.31, "amount drifted (PSI 0.31)")
CLEAR = Finding("amount", False, 0.02, "amount not drifted (PSI 0.02)")


def run(engine, rule, finding, i, active):
    start = T0 + i * WINDOW
    now = start + WINDOW + timedelta(seconds=7)
    return engine.step(rule, "fraud", "2", finding, start, start + WINDOW, active, now)


def test_pending_until_for_windows_then_firing():
    engine, rule = AlertEngine(), drift_rule(for_windows=3)
    alert, changed = run(engine, rule, HOLDS, 0, None)
    assert changed and alert.state == pb.ALERT_STATE_PENDING and alert.windows == 1
    assert not alert.HasField("fired_time")
    assert alert.summary == "fraud v2: amount drifted (PSI 0.31) for 1 of 3 windows"
    alert, changed = run(engine, rule, HOLDS, 1, alert)
    assert changed and alert.state == pb.ALERT_STATE_PENDING and alert.windows == 2
    first_id = alert.id
    alert, changed = run(engine, rule, HOLDS, 2, alert)
    assert changed and alert.state == pb.ALERT_STATE_FIRING and alert.windows == 3
    assert alert.fired_time.ToDatetime(tzinfo=UTC) == T0 + 3 * WINDOW + timedelta(seconds=7)
    assert alert.start_time.ToDatetime(tzinfo=UTC) == T0
    assert alert.last_window_end.ToDatetime(tzinfo=UTC) == T0 + 3 * WINDOW
    assert alert.id == first_id and alert.threshold == rule.threshold
    assert alert.kind == pb.ALERT_KIND_DRIFT and alert.subject == "amount"
    assert alert.summary == "fraud v2: amount drifted (PSI 0.31) for 3 windows"


def test_for_windows_of_one_fires_at_once():
    alert, _ = run(AlertEngine(), drift_rule(), HOLDS, 0, None)
    assert alert.state == pb.ALERT_STATE_FIRING and alert.HasField("fired_time")


def test_nothing_happens_without_an_alert_or_a_condition():
    assert run(AlertEngine(), drift_rule(), CLEAR, 0, None) == (None, False)


def test_a_window_evaluated_twice_changes_nothing():
    engine, rule = AlertEngine(), drift_rule(for_windows=3)
    alert, _ = run(engine, rule, HOLDS, 0, None)
    alert, _ = run(engine, rule, HOLDS, 1, alert)
    again, changed = run(engine, rule, HOLDS, 1, alert)
    assert not changed and again is alert and again.windows == 2
    older, changed = run(engine, rule, CLEAR, 0, alert)
    assert not changed and older.state == pb.ALERT_STATE_PENDING


def test_the_engine_never_mutates_its_input():
    engine, rule = AlertEngine(), drift_rule(for_windows=2)
    pending, _ = run(engine, rule, HOLDS, 0, None)
    snapshot = pending.SerializeToString()
    run(engine, rule, HOLDS, 1, pending)
    run(engine, rule, CLEAR, 1, pending)
    assert pending.SerializeToString() == snapshot


def test_a_firing_alert_resolves():
    engine, rule = AlertEngine(), drift_rule()
    firing, _ = run(engine, rule, HOLDS, 0, None)
    resolved, changed = run(engine, rule, CLEAR, 1, firing)
    assert changed and resolved.state == pb.ALERT_STATE_RESOLVED
    assert resolved.HasField("fired_time") and resolved.HasField("resolved_time")
    assert resolved.value == 0.02 and resolved.id == firing.id
    assert resolved.summary == "fraud v2: resolved, amount not drifted (PSI 0.02)"
    assert alerts.should_notify(firing, resolved)


def test_a_pending_alert_that_clears_is_resolved_quietly():
    engine, rule = AlertEngine(), drift_rule(for_windows=3)
    pending, _ = run(engine, rule, HOLDS, 0, None)
    cleared, changed = run(engine, rule, CLEAR, 1, pending)
    assert changed and cleared.state == pb.ALERT_STATE_RESOLVED
    assert not cleared.HasField("fired_time") and "cleared before firing" in cleared.summary
    assert not alerts.should_notify(pending, cleared) and not alerts.fires(pending, cleared)


def test_a_new_occurrence_after_resolve_is_a_new_alert():
    engine, rule = AlertEngine(), drift_rule()
    first, _ = run(engine, rule, HOLDS, 0, None)
    resolved, _ = run(engine, rule, CLEAR, 1, first)
    # The resolved alert passed in is not reopened by a re-evaluated old window ...
    same, changed = run(engine, rule, HOLDS, 0, resolved)
    assert not changed and same is resolved
    quiet, changed = run(engine, rule, CLEAR, 2, resolved)
    assert not changed and quiet is resolved
    # ... and a later occurrence starts a new alert with a new id.
    second, changed = run(engine, rule, HOLDS, 3, resolved)
    assert changed and second.id != first.id and second.state == pb.ALERT_STATE_FIRING
    assert second.windows == 1 and resolved.state == pb.ALERT_STATE_RESOLVED


def test_alert_ids_are_deterministic():
    a, _ = run(AlertEngine(), drift_rule(), HOLDS, 4, None)
    b, _ = run(AlertEngine(), drift_rule(), HOLDS, 4, None)
    c, _ = run(AlertEngine(), drift_rule(name="other"), HOLDS, 4, None)
    assert a.id == b.id != c.id


def test_evaluate_steps_every_column_and_resolves_those_without_evidence():
    engine, rule = AlertEngine(), drift_rule()
    drifted = window(0, count=5000, drift={"amount": (True, 0.4), "age": (True, 0.3)})
    transitions = engine.evaluate(rule, "fraud", "2", drifted, {}, T0 + WINDOW)
    assert sorted(t.after.subject for t in transitions) == ["age", "amount"]
    assert all(t.fired and t.notify and t.before is None for t in transitions)
    latest = {t.after.subject: t.after for t in transitions}
    # The next window has too few rows for any verdict: both alerts resolve.
    quiet = engine.evaluate(rule, "fraud", "2", window(1, count=3), latest, T0 + 2 * WINDOW)
    assert sorted(t.after.subject for t in quiet) == ["age", "amount"]
    assert all(t.after.state == pb.ALERT_STATE_RESOLVED and t.notify for t in quiet)
    assert all("no evidence" in t.after.summary for t in quiet)


def test_retrain_fires_only_once_the_alert_fires():
    """The caller's loop: retraining runs on the transition into FIRING, i.e. after
    for_windows windows, not before and not again while it keeps firing."""
    engine = AlertEngine()
    trigger = pb.RetrainTrigger(command=["retrain"])
    rule = alerts.validate_config(
        config(drift_rule(column="amount", for_windows=3, retrain=trigger))
    ).rules[0]
    latest: dict[str, pb.Alert] = {}
    held: list[WindowEvaluation] = []
    payloads = []
    for i in range(5):
        evaluation = window(
            i, count=5000, drift={"amount": (True, 0.3 + i / 100), "age": (True, 1)}
        )
        held.append(evaluation)
        for t in engine.evaluate(rule, "fraud", "2", evaluation, latest, evaluation.window_end):
            latest[t.after.subject] = t.after
            if t.fired:
                payloads.append(
                    (i, alerts.retrain_payload(t.after, rule, held[-t.after.windows :]))
                )
    assert [i for i, _ in payloads] == [2]
    payload = payloads[0][1]
    json.dumps(payload, allow_nan=False)
    assert payload["model"] == "fraud" and payload["version"] == "2"
    assert payload["rule"] == "amount-drift" and payload["kind"] == "drift"
    assert payload["subject"] == "amount" and payload["windows_held"] == 3
    assert payload["drifted_columns"] == [{"column": "amount", "psi": 0.32}]
    assert [w["start"] for w in payload["windows"]] == [
        (T0 + i * WINDOW).isoformat() for i in range(3)
    ]
    assert payload["windows"][0]["drifted"] == {"amount": 0.3}
    assert payload["fired_time"] == (T0 + 3 * WINDOW).isoformat()
    assert latest["amount"].state == pb.ALERT_STATE_FIRING and latest["amount"].windows == 5


def test_retrain_payload_is_strict_json_without_values():
    rule = quality_rule(for_windows=1)
    alert, _ = AlertEngine().step(
        rule, "m", "1", Finding("f1", True, math.nan, "f1 gone"), T0, T0 + WINDOW, None, T0
    )
    payload = alerts.retrain_payload(alert, rule, [window(0, quality={"f1": math.inf})])
    assert payload["value"] is None and payload["windows"][0]["quality"] == {"f1": None}
    json.dumps(payload, allow_nan=False)
