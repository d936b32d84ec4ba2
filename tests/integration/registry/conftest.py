"""Fixtures for the registry: stores on SQLite and on the machine's PostgreSQL (a fresh
schema per test, dropped after), and a registry server on port 0."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelplane.client.credentials import ClientCredentials
from modelplane.kernel.server import AioServiceServer
from modelplane.services.registry.main import Settings, build
from modelplane.services.registry.store import Store
from modelplane.services.registry.store.postgres import PostgresStore
from modelplane.services.registry.store.sqlite import SqliteStore
from tests.postgres import POSTGRES_URL, fresh_schema
from tests.postgres import store_factory as store_factory_of
from tests.support import wait_serving_sync

StoreFactory = Callable[[], Store]


@pytest.fixture
def pg_schema() -> Iterator[str]:
    with fresh_schema("registry") as schema:
        yield schema


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one database; each call is a separate instance (its own
    connections), like separate registry processes."""
    with store_factory_of(
        request.param,
        lambda: SqliteStore(tmp_path / "registry.db"),
        lambda schema: PostgresStore(POSTGRES_URL, schema=schema, max_connections=4),
        "registry",
    ) as factory:
        yield factory


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory()


class ThreadedServer:
    """A registry server on its own event loop thread, so tests can use the blocking
    client (which would otherwise block the loop the server runs on)."""

    def __init__(self, settings: Settings, credentials: ClientCredentials | None = None) -> None:
        """`credentials`: what the readiness check presents (a TLS server needs its CA)."""
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> AioServiceServer:
            server = build(settings)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)
        self.address = self.server.address
        wait_serving_sync(self.address, credentials=credentials)

    def call(self, fn: Callable[[], object]) -> object:
        """Runs `fn` on the server's loop (for objects bound to it, like the watch hub)."""

        async def run() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self, grace: float = 1.0) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=grace), self._loop).result(90)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ThreadedServer]]:
    servers: list[ThreadedServer] = []

    def start(credentials: ClientCredentials | None = None, **overrides: object) -> ThreadedServer:
        settings = Settings(
            data_dir=tmp_path / "data",
            tracing_enabled=False,
            log_json=False,
            log_level="WARNING",
            **overrides,
        )
        server = ThreadedServer(settings, credentials)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def registry(server_factory: Callable[..., ThreadedServer]) -> ThreadedServer:
    return server_factory()
