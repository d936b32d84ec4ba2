"""deploy/healthcheck.py, run as compose's healthchecks run it (`python <script> ADDRESS`,
the script's folder first on sys.path), against a real server on port 0."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2

from modelplane.services.feature.main import SERVICE_NAME, Settings, build
from tests.support import running_aio

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


async def test_serving_draining_and_gone(tmp_path):
    server = build(Settings(port=0, data_dir=tmp_path))
    async with running_aio(server) as address:
        assert (await asyncio.to_thread(check, address)).returncode == 0
        assert (await asyncio.to_thread(check, address, SERVICE_NAME)).returncode == 0
        unknown = await asyncio.to_thread(check, address, "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr

        # Draining after SIGTERM, health says NOT_SERVING before the port closes.
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        draining = await asyncio.to_thread(check, address)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stderr
    gone = check(address)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_usage():
    assert check().returncode == 2
