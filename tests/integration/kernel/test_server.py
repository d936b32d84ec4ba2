"""The kernel's server bootstrap, against a raw-bytes test service."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelplane.kernel.settings import ServiceSettings
from tests.integration.kernel import echo_service
from tests.support import running_aio, running_sync


def settings(tmp_path) -> ServiceSettings:
    return ServiceSettings(port=0, metrics_port=0, data_dir=tmp_path, log_json=True)


async def call(address: str, command: str) -> bytes:
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        return await channel.unary_unary(echo_service.METHOD)(command.encode(), timeout=10)


async def test_aio_server_maps_domain_errors_and_hides_internals(tmp_path):
    async with running_aio(echo_service.aio_server(settings(tmp_path))) as address:
        assert await call(address, "echo:hi") == b"hi"

        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await call(address, "notfound")
        assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
        assert not_found.value.details() == "model 'ghost' not found"

        with pytest.raises(grpc.aio.AioRpcError) as crash:
            await call(address, "crash")
        assert crash.value.code() is grpc.StatusCode.INTERNAL
        assert "hunter2" not in crash.value.details()
        assert "Traceback" not in crash.value.details()


async def test_aio_server_accepts_messages_above_grpc_default_limit(tmp_path):
    async with running_aio(echo_service.aio_server(settings(tmp_path))) as address:
        # gRPC's default cap is 4 MiB; the kernel raises it (Triton-like 2 GiB - 1).
        assert len(await call(address, "big:6000000")) == 6_000_000


async def test_reflection_lists_the_service_and_health(tmp_path):
    async with (
        running_aio(echo_service.aio_server(settings(tmp_path))) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for response in responses:
            names |= {s.name for s in response.list_services_response.service}
        assert {"test.Echo", "grpc.health.v1.Health"} <= names


async def test_metrics_endpoint_serves_process_cpu(tmp_path):
    server = echo_service.aio_server(settings(tmp_path))
    async with running_aio(server):
        assert server.metrics_port
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert "process_cpu_seconds_total" in body


def test_sync_server_maps_errors_the_same_way(tmp_path):
    with (
        running_sync(echo_service.sync_server(settings(tmp_path))) as address,
        grpc.insecure_channel(address) as channel,
    ):
        rpc = channel.unary_unary(echo_service.METHOD)
        assert rpc(b"echo:sync", timeout=10) == b"sync"
        with pytest.raises(grpc.RpcError) as not_found:
            rpc(b"notfound", timeout=10)
        assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
        assert not_found.value.details() == "model 'ghost' not found"
        with pytest.raises(grpc.RpcError) as crash:
            rpc(b"crash", timeout=10)
        assert crash.value.code() is grpc.StatusCode.INTERNAL
        assert "hunter2" not in crash.value.details()


def test_two_servers_never_share_a_port(tmp_path):
    first = echo_service.sync_server(settings(tmp_path))
    with running_sync(first):
        taken = ServiceSettings(port=first.port, data_dir=tmp_path)
        with pytest.raises(OSError, match="cannot bind"):
            echo_service.sync_server(taken).start()
