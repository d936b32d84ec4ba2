"""The `modelplane serve` process. `--cpus`: the service process and every thread it
starts run on the CPUs given; a CPU the process may not use stops it before it serves,
with a message. A second feature service on the same data directory is refused, naming
the first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _serve_feature(data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "modelplane.cli.main", "serve", "feature",
        "--port", "0", "--data-dir", str(data_dir), "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _allowed_cpus_of_each_thread(pid: int) -> dict[str, str]:
    allowed = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
        allowed[task] = line.split(":", 1)[1].strip()
    return allowed


def test_every_thread_of_the_serving_process_runs_on_the_cpu_given(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    process = _serve_feature(tmp_path, "--cpus", str(cpu))
    try:
        assert process.stdout is not None
        serving = json.loads(process.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        allowed = _allowed_cpus_of_each_thread(process.pid)
        assert len(allowed) > 3  # the gRPC server's threads, not just the main one
        assert set(allowed.values()) == {str(cpu)}
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_a_cpu_the_machine_lacks_stops_the_service_with_a_message(tmp_path):
    absent = max(os.sched_getaffinity(0)) + 1000
    process = _serve_feature(tmp_path, "--cpus", str(absent))
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert out == ""  # it never announced serving
    assert f"CPU {absent} is not available to this process" in err
    assert "Traceback" not in err


def test_a_malformed_cpu_list_names_the_setting(tmp_path):
    process = _serve_feature(tmp_path, "--cpus", "3-1")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "cpus" in err and "runs backwards" in err


def test_a_second_feature_service_on_the_same_data_dir_is_refused(tmp_path):
    first = _serve_feature(tmp_path)
    try:
        assert first.stdout is not None
        json.loads(first.stdout.readline())  # serving
        second = _serve_feature(tmp_path)
        try:
            out, err = second.communicate(timeout=60)
        finally:
            if second.poll() is None:  # it served after all: the test fails, nothing lingers
                second.kill()
                second.communicate()
        assert second.returncode == 2
        assert out == ""
        assert f"the feature definitions database is in use by pid {first.pid}" in err
        assert "Traceback" not in err
    finally:
        first.terminate()
        first.communicate(timeout=30)
    again = _serve_feature(tmp_path)  # the first one's exit freed the data dir
    try:
        assert again.stdout is not None
        assert "port" in json.loads(again.stdout.readline())
    finally:
        again.terminate()
        again.communicate(timeout=30)
