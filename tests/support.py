"""Helpers for tests that run real servers: port 0, readiness via the health service.

Readiness is asked over `credentials` (default: plaintext, no token): a TLS or mutual-TLS
server needs the CA (and a client certificate) its clients would use. The default is not
read from the environment, so a developer's MODELPLANE_TLS_* cannot change what a test
does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.client.credentials import ClientCredentials
from modelplane.kernel.server import AioServiceServer, SyncServiceServer

PLAINTEXT = ClientCredentials()


async def wait_serving(
    address: str,
    service: str = "",
    timeout: float = 15.0,
    credentials: ClientCredentials | None = None,
) -> None:
    """Blocks until the server at `address` reports SERVING (no sleeps: the health
    RPC itself waits for the channel to be ready)."""
    async with (credentials or PLAINTEXT).aio_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving_sync(
    address: str,
    service: str = "",
    timeout: float = 15.0,
    credentials: ClientCredentials | None = None,
) -> None:
    with (credentials or PLAINTEXT).channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@asynccontextmanager
async def running_aio(
    server: AioServiceServer, credentials: ClientCredentials | None = None
) -> AsyncIterator[str]:
    """Starts an aio service server on its (port 0) settings; yields its address."""
    await server.start()
    try:
        await wait_serving(server.address, credentials=credentials)
        yield server.address
    finally:
        await server.stop(grace=1.0)


@contextmanager
def running_sync(
    server: SyncServiceServer, credentials: ClientCredentials | None = None
) -> Iterator[str]:
    """Starts a synchronous service server; yields its address."""
    server.start()
    try:
        wait_serving_sync(server.address, credentials=credentials)
        yield server.address
    finally:
        server.stop(grace=1.0)


@contextmanager
def running_aio_in_thread(
    server: AioServiceServer, credentials: ClientCredentials | None = None
) -> Iterator[str]:
    """Runs an aio service server on its own event loop in a background thread, for tests
    that drive it with blocking clients and threads; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
        wait_serving_sync(server.address, credentials=credentials)
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def wait_until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    """Polls a condition the server has no RPC to report (e.g. a file it writes);
    raises TimeoutError when it is still false after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)  # ok-sleep: polling interval; nothing to wait on instead
