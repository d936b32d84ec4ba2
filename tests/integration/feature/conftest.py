"""Fixtures: online stores of both kinds, a feature server on port 0, a Parquet source.

Redis is the machine's (127.0.0.1:6379); each test gets its own key prefix and
deletes it afterwards, so helpers running at the same time never collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.services.feature.main import build
from modelplane.services.feature.online_store import OnlineStore
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from modelplane.services.feature.online_store.sqlite import SqliteOnlineStore
from tests.integration.feature.servers import REDIS_URL, settings_for, unique_prefix
from tests.support import running_sync

STORES = ["sqlite", "redis"]


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def online_store(store_kind: str, tmp_path: Path) -> Iterator[OnlineStore]:
    if store_kind == "sqlite":
        sqlite_store = SqliteOnlineStore(tmp_path / "online.db")
        yield sqlite_store
        sqlite_store.close()
        return
    redis_store = RedisOnlineStore(REDIS_URL, key_prefix=unique_prefix())
    try:
        yield redis_store
    finally:
        redis_store.delete_prefix()
        redis_store.close()


@pytest.fixture
def feature_server(store_kind: str, tmp_path: Path) -> Iterator[str]:
    """Address of a running feature service on the chosen store."""
    prefix = unique_prefix()
    server = build(settings_for(store_kind, tmp_path / "state", prefix))
    try:
        with running_sync(server) as address:
            yield address
    finally:
        if store_kind == "redis":
            cleaner = RedisOnlineStore(REDIS_URL, key_prefix=prefix)
            cleaner.delete_prefix()
            cleaner.close()


@pytest.fixture
def stub(feature_server: str) -> Iterator[pb_grpc.FeatureServiceStub]:
    with grpc.insecure_channel(feature_server) as channel:
        yield pb_grpc.FeatureServiceStub(channel)
