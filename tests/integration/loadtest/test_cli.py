"""`modelplane loadtest` end to end against the test KServe v2 server."""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import pytest

from modelplane.cli import loadtest
from modelplane.cli.main import COMMAND_MODULES
from modelplane.loadtest.report import load_report
from tests.integration.loadtest.kserve_server import MODEL, rowsum_server


def _run(argv: list[str]) -> int:
    # Only this command's parser, so the test does not depend on the other commands.
    parser = argparse.ArgumentParser(prog="modelplane")
    loadtest.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["loadtest", *argv])
    return int(args.handler(args))


def test_the_command_is_registered() -> None:
    assert "modelplane.cli.loadtest" in COMMAND_MODULES


def test_sweep_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    with rowsum_server() as server:
        code = _run(
            [
                "-u", server.address, "-m", MODEL,
                "--concurrency", "1,4", "--requests", "40", "--warmup", "0",
                "--batch-rows", "2", "--metrics-url", server.metrics_url,
                "--json", str(out),
            ]
        )  # fmt: skip
        assert code == 0
        printed = capsys.readouterr().out
        assert f"model {MODEL}" in printed and "input[2, 4]" in printed
        table = [line.split() for line in printed.splitlines() if line.strip().startswith("c=")]
        assert [row[0] for row in table] == ["c=1", "c=4"]
        report = load_report(out)
        assert report.model == MODEL and report.batch_rows == 2
        assert [level.ok for level in report.levels] == [40, 40]
        assert all(level.server_cpu_s is not None for level in report.levels)
        raw = json.loads(out.read_text())
        assert raw["levels"][0]["throughput_rps"] > 0

        code = _run(
            ["-u", server.address, "-m", MODEL, "-c", "4", "-n", "20", "--compare", str(out)]
        )
        assert code == 0
        compared = capsys.readouterr().out
        assert "compared with" in compared
        assert "c=4" in compared.split("compared with")[1]


def test_open_loop_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "open.json"
    with rowsum_server() as server:
        code = _run(
            [
                "-u", server.address, "-m", MODEL, "--rate", "300",
                "--arrivals", "uniform", "--duration", "0.5", "--warmup", "0",
                "--json", str(out), "--quiet",
            ]
        )  # fmt: skip
    assert code == 0
    (level,) = load_report(out).levels
    assert level.mode == "open" and level.rate == 300 and level.scheduled == 150
    assert "rate=300/s" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with rowsum_server() as server:
        code = _run(["-u", server.address, "-m", "nope", "-n", "5"])
        assert code == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert server.servicer.received == 0


def test_nothing_listening_is_reported_within_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    # A bound socket that never listens: connections are refused, the port stays ours.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        code = _run(["-u", address, "-m", MODEL, "-n", "5"])
        assert time.monotonic() - start < 15.0
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot connect to {address}")
    assert "DEADLINE_EXCEEDED" not in err


def test_bad_flags_are_refused() -> None:
    with pytest.raises(SystemExit):
        _run(["-m", MODEL, "--batch-rows", "0"])
    with pytest.raises(SystemExit):
        _run(["-m", MODEL, "--concurrency", "1,x"])
    with pytest.raises(SystemExit):
        _run(["-m", MODEL, "--concurrency", "4", "--rate", "10"])
    with pytest.raises(SystemExit):
        _run(["-m", MODEL, "--shape", "input"])
