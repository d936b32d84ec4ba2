"""`modelplane monitor summary` against a real monitoring service on port 0."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from modelplane.cli.main import main
from modelplane.cli.monitor import UsageError, parse_since
from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.services.monitoring.main import Settings, build
from tests.support import running_aio_in_thread


@pytest.fixture
def address(tmp_path):
    server = build(Settings(port=0, data_dir=tmp_path, log_json=False, log_level="WARNING"))
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
