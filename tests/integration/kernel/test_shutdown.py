"""SIGTERM: health flips to NOT_SERVING, new calls are refused, in-flight calls finish."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.kernel import echo_service

SCRIPT = Path(echo_service.__file__)


async def _readline(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=30)


async def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        serving = json.loads(await _readline(process))
        address = serving["address"]
        async with grpc.aio.insecure_channel(address) as channel:
            rpc = channel.unary_unary(echo_service.METHOD)
            slow = asyncio.ensure_future(rpc(b"sleep:1.5", timeout=30))
            assert (await _readline(process)).strip() == "in-flight"

            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=echo_service.SERVICE)
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            process.send_signal(signal.SIGTERM)
            update = await watch.read()
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING

            try:
                await rpc(b"echo:late", timeout=5)
                refused = None
            except grpc.aio.AioRpcError as exc:
                refused = exc.code()
            assert refused is grpc.StatusCode.UNAVAILABLE

            assert await slow == b"slept"
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
