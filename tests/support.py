"""Helpers for tests that run real servers: port 0, readiness via the health service.

Readiness is asked over `credentials` (default: plaintext, no token): a TLS or mutual-TLS
server needs the CA (and a client certificate) its clients would use. The default is not
read from the environment, so a developer's MODELPLANE_TLS_* cannot change what a test
does."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc
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
    server: SyncServiceServer | AioServiceServer, credentials: ClientCredentials | None = None
) -> Iterator[str]:
    """Starts a synchronous service server (an aio one on a loop in a background thread,
    for tests driving it with blocking clients); yields its address."""
    if isinstance(server, AioServiceServer):
        with running_aio_in_thread(server, credentials) as address:
            yield address
        return
    server.start()
    try:
        wait_serving_sync(server.address, credentials=credentials)
        yield server.address
    finally:
        server.stop(grace=1.0)


# The loop each server of running_aio_in_thread runs on.
_server_loops: weakref.WeakKeyDictionary[AioServiceServer, asyncio.AbstractEventLoop] = (
    weakref.WeakKeyDictionary()
)


def stop_in_thread(server: AioServiceServer, grace: float = 0.0) -> None:
    """Stops a server that running_aio_in_thread (or running_sync) runs, from a test's
    thread."""
    asyncio.run_coroutine_threadsafe(server.stop(grace=grace), _server_loops[server]).result(60)


@contextmanager
def running_aio_in_thread(
    server: AioServiceServer, credentials: ClientCredentials | None = None
) -> Iterator[str]:
    """Runs an aio service server on its own event loop in a background thread, for tests
    that drive it with blocking clients and threads; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    _server_loops[server] = loop
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


def streams_still_writing(
    address: str,
    method: str,
    first: bytes,
    rest: bytes,
    calls: int = 200,
    metadata: tuple[tuple[str, str], ...] = (),
) -> collections.Counter[str]:
    """How `calls` client-streaming calls to `method` ended ("OK" or a code's name) for a
    grpc.aio client that sends `first`, pauses 2 ms, then `rest`, ten at a time: it is
    still writing when a server that refuses the call at once answers."""

    async def run() -> collections.Counter[str]:
        outcomes: collections.Counter[str] = collections.Counter()
        async with grpc.aio.insecure_channel(address) as channel:
            stream = channel.stream_unary(method)

            async def frames() -> AsyncIterator[bytes]:
                yield first
                await asyncio.sleep(0.002)  # ok-sleep: still writing when refused
                yield rest

            async def one() -> None:
                try:
                    await stream(frames(), metadata=metadata, timeout=20)
                    outcomes["OK"] += 1
                except grpc.RpcError as error:
                    outcomes[error.code().name] += 1

            for _ in range(calls // 10):
                await asyncio.gather(*(one() for _ in range(10)))
        return outcomes

    return asyncio.run(run())
