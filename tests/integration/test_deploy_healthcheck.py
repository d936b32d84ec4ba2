"""deploy/healthcheck.py, run as compose's healthchecks run it (`python <script> ADDRESS`,
the script's folder first on sys.path), against a real server on port 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2

from modelplane.services.feature.main import SERVICE_NAME, Settings, build
from tests.support import running_sync

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_serving_draining_and_gone(tmp_path):
    server = build(Settings(port=0, data_dir=tmp_path))
    with running_sync(server) as address:
        assert check(address).returncode == 0
        assert check(address, SERVICE_NAME).returncode == 0
        unknown = check(address, "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr

        # Draining after SIGTERM, health says NOT_SERVING before the port closes.
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        draining = check(address)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stderr
    gone = check(address)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_usage():
    assert check().returncode == 2
