"""`modelplane monitor` (summary, report, alerts, labels, config) against a real monitoring
service on port 0."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from modelplane.cli.main import main
from modelplane.cli.monitor import UsageError, parse_since
from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring.main import Settings, build
from tests.support import running_aio_in_thread, wait_until


@pytest.fixture
def address(tmp_path):
    server = build(
        Settings(
            port=0,
            data_dir=tmp_path,
            log_json=False,
            log_level="WARNING",
            evaluate_interval_s=0.1,  # alert rules see closed windows at once
            grace_s=0.0,
        )  # type: ignore[call-arg]
    )
    with running_aio_in_thread(server) as address:
        now_us = time.time_ns() // 1000
        hour_us = 3600 * 1_000_000
        batches = [
            # two records two hours ago, three now; versions 1 and 2
            prediction_batch(
                "fraud", "1", ["old-1", "old-2"], [1.0, 3.0], np.zeros((2, 0)), [],
                {"score": np.zeros((2, 1))}, route="production",
                time_unix_us=[now_us - 2 * hour_us] * 2,
            ),
            prediction_batch(
                "fraud", "1", ["new-1", "new-2"], [2.0, 2.0], np.zeros((2, 0)), [],
                {"score": np.zeros((2, 1))}, route="production", time_unix_us=[now_us] * 2,
            ),
            prediction_batch(
                "fraud", "2", ["new-3"], [10.0], np.zeros((1, 0)), [],
                {"score": np.zeros((1, 1))}, route="canary", time_unix_us=[now_us],
            ),
        ]  # fmt: skip
        with MonitoringClient(address) as client:
            assert client.log_predictions(batches).stored == 5
        yield address


def test_summary_in_a_table(address, capsys):
    assert main(["monitor", "summary", "fraud", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "records   5" in out
    assert "p50 2.000 ms" in out and "p99 10.000 ms" in out
    lines = out.splitlines()
    table = lines[lines.index("") + 1 :]
    assert [line.split() for line in table] == [
        ["VERSION", "ROUTE", "RECORDS"],
        ["1", "production", "4"],
        ["2", "canary", "1"],
    ]


def test_summary_since_and_of_one_version_as_json(address, capsys):
    argv = ["monitor", "summary", "fraud", "--address", address, "--since", "1h", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["count"] == 3
    assert data["latency_ms"]["mean"] == pytest.approx(14 / 3)
    assert data["first_time"].endswith("Z")
    assert [c["count"] for c in data["by_version_route"]] == [2, 1]

    assert main([*argv, "--version", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["count"], data["version"]) == (1, "2")


def test_unknown_model_and_bad_flags(address, capsys):
    assert main(["monitor", "summary", "nothing", "--address", address]) == 0
    assert "records   0" in capsys.readouterr().out
    assert main(["monitor", "summary", "fraud", "--address", address, "--since", "soon"]) == 2
    assert "--since takes a duration" in capsys.readouterr().err


def test_nothing_listening_is_one_line(capsys):
    argv = ["monitor", "summary", "fraud", "--address", "127.0.0.1:1", "--connect-timeout", "0.5"]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("error: cannot connect to 127.0.0.1:1")


def test_since_takes_durations_and_times():
    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-01-01T12:00:00Z") == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert parse_since("2026-01-01T12:00:00") == datetime(2026, 1, 1, 12, tzinfo=UTC)
    with pytest.raises(UsageError):
        parse_since("yesterday")


def write_labels(path, rows: list[tuple[str, str]]):
    path.write_text("request_id,label\n" + "".join(f"{i},{v}\n" for i, v in rows))
    return path


QUALITY_CONFIG = """\
task: TASK_TYPE_BINARY_CLASSIFICATION
rules:
  - name: accuracy
    kind: ALERT_KIND_QUALITY
    metric: accuracy
    threshold: 0.9
    window_seconds: 60
    min_samples: 1
"""


def test_labels_from_a_csv_file(address, tmp_path, capsys):
    labels = write_labels(
        tmp_path / "labels.csv", [("old-1", "1"), ("old-2", "1"), ("nobody", "0")]
    )
    argv = ["monitor", "labels", "fraud", "--address", address, "--file", str(labels)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == "matched 2, updated 0, unmatched 1"
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"matched": 0, "updated": 2, "unmatched": 1}

    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,label\nold-1,yes\n")
    assert main(["monitor", "labels", "fraud", "--address", address, "--file", str(bad)]) == 2
    assert f"{bad}:2: label must be a number" in capsys.readouterr().err
    no_header = write_labels(tmp_path / "x.csv", [])
    no_header.write_text("id,value\n")
    assert main(["monitor", "labels", "fraud", "--address", address, "--file", str(no_header)]) == 2
    assert "the header must name label, request_id" in capsys.readouterr().err


def test_config_shown_set_and_refused(address, tmp_path, capsys):
    assert main(["monitor", "config", "fraud", "--address", address]) == 0
    defaults = json.loads(capsys.readouterr().out)
    assert (defaults["model_name"], defaults["revision"]) == ("fraud", "0")

    wanted = tmp_path / "fraud.yaml"
    wanted.write_text(QUALITY_CONFIG)
    argv = ["monitor", "config", "fraud", "--address", address, "--set", str(wanted)]
    assert main(argv) == 0
    stored = json.loads(capsys.readouterr().out)
    assert (stored["revision"], stored["task"]) == ("1", "TASK_TYPE_BINARY_CLASSIFICATION")
    assert stored["rules"][0]["for_windows"] == 1  # defaults filled in

    # The same file again is an edit of revision 0, which is gone.
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("error: ABORTED: ")

    # Edited from what `config` printed (JSON, revision 1), with a bad rule.
    stored["rules"][0]["window_seconds"] = 90
    edited = tmp_path / "fraud.json"
    edited.write_text(json.dumps(stored))
    assert main([*argv[:-1], str(edited)]) == 1
    assert capsys.readouterr().err.startswith(
        "error: INVALID_ARGUMENT: rules[0].window_seconds: must be a multiple of 60"
    )
    other = tmp_path / "other.yaml"
    other.write_text("model_name: other\n")
    assert main([*argv[:-1], str(other)]) == 2
    assert "configures 'other', not 'fraud'" in capsys.readouterr().err

    assert main(["monitor", "config", "fraud", "--address", address]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == "1"


def test_report_alerts_and_html(address, tmp_path, capsys):
    labels = write_labels(tmp_path / "labels.csv", [("old-1", "1"), ("old-2", "1")])
    assert main(["monitor", "labels", "fraud", "--address", address, "--file", str(labels)]) == 0
    assert main(["monitor", "alerts", "fraud", "--address", address]) == 0
    assert capsys.readouterr().out.strip().endswith("no alerts")
    config = tmp_path / "fraud.yaml"
    config.write_text(QUALITY_CONFIG)
    argv = ["monitor", "config", "fraud", "--address", address, "--set", str(config)]
    assert main(argv) == 0
    capsys.readouterr()

    # The scores (0) miss both labels (1): the labelled window fires, and the next
    # (no labels, no evidence) resolves it.
    with MonitoringClient(address) as client:
        wait_until(lambda: client.list_alerts("fraud", [pb.ALERT_STATE_RESOLVED]), timeout=30)

    assert main(["monitor", "alerts", "fraud", "--address", address]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["STATE", "MODEL", "RULE", "SUBJECT", "VALUE"]
    assert row.split()[:5] == ["resolved", "fraud/1", "accuracy", "accuracy", "0"]
    argv = ["monitor", "alerts", "--address", address]
    assert main([*argv, "--state", "firing", "--state", "pending"]) == 0
    assert capsys.readouterr().out.strip() == "no alerts"
    assert main([*argv, "--state", "resolved", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    alert = json.loads(line)
    assert (alert["state"], alert["rule"], alert["model_name"]) == (
        "ALERT_STATE_RESOLVED",
        "accuracy",
        "fraud",
    )
    assert "fired_time" in alert

    page = tmp_path / "report.html"
    argv = ["monitor", "report", "fraud", "--address", address, "--since", "3h"]
    assert main([*argv, "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "fraud" in out and out.strip().endswith(f"wrote {page}")
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model_version"], report["count"]) == ("1", "4")
    (whole,) = [q for q in report["quality"] if "start_time" not in q and not q.get("slice_key")]
    assert (whole["labelled"], whole["metrics"]["accuracy"]) == ("2", 0.0)
    assert [a["state"] for a in report["alerts"]] == ["ALERT_STATE_RESOLVED"]
    assert main([*argv, "--buckets", "-1"]) == 2
    assert "--buckets must be 0" in capsys.readouterr().err
