"""Feature service: online features with freshness statuses, point-in-time training sets."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from modelplane.feature.v1 import feature_pb2, feature_pb2_grpc
from modelplane.kernel.gc_tuning import SERVING_THRESHOLD, tune_gc
from modelplane.kernel.metrics import new_registry
from modelplane.kernel.postgres import PostgresChangeListener
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings
from modelplane.kernel.state_lock import StateLock
from modelplane.services.feature.definition_store import is_postgres_url, open_definition_store
from modelplane.services.feature.definitions import DefinitionRegistry, definitions_from_yaml
from modelplane.services.feature.domain import MAX_ENTITIES_PER_READ, FeatureView
from modelplane.services.feature.files import FileRoots, confine_sources
from modelplane.services.feature.materialize import Materializer
from modelplane.services.feature.online import OnlineFeatures
from modelplane.services.feature.online_store import OnlineStore
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from modelplane.services.feature.online_store.sqlite import SqliteOnlineStore
from modelplane.services.feature.servicer import FeatureServicer

SERVICE_NAME = feature_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_FEATURE_", extra="ignore")

    online_store: str = Field(
        "sqlite",
        description="Online store: 'sqlite' (embedded) or a Redis URL (redis://host:port/db).",
    )
    sqlite_path: str = Field(
        "", description="SQLite online store file; empty means <data_dir>/feature_online.db."
    )
    definitions_db: str = Field(
        "",
        description="Where definition versions live: a SQLite file (empty means "
        "<data_dir>/feature_registry.db), or a postgresql:// URL that replicas share.",
    )
    definitions_schema: str = Field(
        "", description="PostgreSQL schema of the definition tables; empty uses search_path."
    )
    definitions_file: str = Field("", description="YAML definitions applied at startup (optional).")
    files_dir: str = Field(
        "",
        description="The only folder where GetTrainingSet reads entity_path and writes "
        "output_path (relative to it; an existing file is never overwritten); empty means "
        "<data_dir>/files.",
    )
    source_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Folders feature views' Parquet sources must lie in (comma-separated; a "
        "relative source.path is taken from the first); empty means <data_dir>/sources, "
        "<data_dir>/features (the `modelplane up` demo) and <files_dir>/sources.",
    )
    max_entities_per_read: int = Field(
        MAX_ENTITIES_PER_READ,
        ge=1,
        le=1_000_000,
        description="Entities one GetOnlineFeatures or GetBundleTensor call may ask for.",
    )
    redis_key_prefix: str = Field(
        "modelplane:feature:", description="Prefix of every Redis key the service writes."
    )
    redis_socket_timeout_s: float = Field(
        1.0, gt=0, description="Redis read/write timeout; a slower Redis fails the call."
    )
    redis_connect_timeout_s: float = Field(
        0.5, gt=0, description="Redis connect timeout; an unreachable Redis fails fast."
    )
    max_workers: int = Field(
        32,
        ge=1,
        description="Threads running handlers once a request has arrived (more calls wait as "
        "coroutines, up to max_concurrent_rpcs).",
    )
    gc_threshold: int = Field(
        SERVING_THRESHOLD,
        ge=0,
        description="Python GC young-generation threshold for `serve` (0 keeps Python's 700); "
        "see modelplane.kernel.gc_tuning.",
    )

    @field_validator("source_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def files_folder(self) -> Path:
        return Path(self.files_dir) if self.files_dir else self.data_dir / "files"

    def source_folders(self) -> list[Path]:
        if self.source_roots:
            return [Path(root) for root in self.source_roots]
        return [
            self.data_dir / "sources",
            self.data_dir / "features",
            self.files_folder() / "sources",
        ]

    @field_validator("online_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "sqlite" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("online_store must be 'sqlite' or a redis:// URL")
        return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--online-store", help="'sqlite' (default) or a Redis URL such as redis://127.0.0.1:6379/0"
    )
    parser.add_argument("--definitions-file", help="YAML definitions to apply at startup")
    parser.add_argument(
        "--definitions-db",
        help="SQLite file or postgresql:// URL of the definitions (a URL lets replicas share them)",
    )
    parser.add_argument("--max-workers", type=int, help="gRPC handler threads")


def make_store(settings: Settings) -> OnlineStore:
    if settings.online_store == "sqlite":
        path = (
            Path(settings.sqlite_path)
            if settings.sqlite_path
            else settings.data_dir / "feature_online.db"
        )
        return SqliteOnlineStore(path)
    return RedisOnlineStore(
        settings.online_store,
        key_prefix=settings.redis_key_prefix,
        socket_timeout_s=settings.redis_socket_timeout_s,
        connect_timeout_s=settings.redis_connect_timeout_s,
        max_connections=settings.max_workers * 2,
    )


def build(settings: Settings) -> AioServiceServer:
    location = settings.definitions_db or str(settings.data_dir / "feature_registry.db")
    closing: list[Callable[[], None]] = []
    if not is_postgres_url(location):
        # The catalog is cached in memory: a second process on the same SQLite file would
        # serve a stale copy and race this one's versions, so it is refused at start.
        # (Replicas on PostgreSQL hear each other's applies instead.)
        path = Path(location)
        lock = StateLock(path.with_name(path.name + ".lock"), "the feature definitions database")
        closing.append(lock.release)
    return _build(settings, location, closing)


def _build(
    settings: Settings, location: str, closing: list[Callable[[], None]]
) -> AioServiceServer:
    """`closing` runs, in order, when the server stops or if this fails."""
    try:
        definitions = open_definition_store(location, settings.definitions_schema)
        closing.insert(0, definitions.close)
        store = make_store(settings)
        closing.insert(0, store.close)

        def prepare_views(views: Sequence[FeatureView]) -> None:
            for view in views:
                store.ensure_view(view.name, [f.name for f in view.features])

        registry = DefinitionRegistry(definitions, on_views_changed=prepare_views)
        if definitions.change_feed is not None:
            listener = follow_changes(registry, *definitions.change_feed)
            closing.insert(0, listener.stop)
        sources = FileRoots(settings.source_folders(), "source_roots")
        files = FileRoots([settings.files_folder()], "files_dir")
        if settings.definitions_file:
            path = Path(settings.definitions_file)
            startup = definitions_from_yaml(path.read_text(), base_dir=path.resolve().parent)
            confine_sources(startup, sources)
            registry.apply(startup)
        metrics = new_registry()
        online = OnlineFeatures(registry, store, max_entities=settings.max_entities_per_read)
        servicer = FeatureServicer(
            registry,
            online,
            Materializer(registry, store, definitions, roots=sources),
            metrics,
            files,
            sources,
        )
        # grpc.aio, not the synchronous server: grpc's thread pool takes a thread for a call
        # before its request arrives, so clients that send headers and no body held every
        # thread (issue #17). Here a call waits for its request as a coroutine (bounded,
        # see modelplane.kernel.call_bounds) and the synchronous handlers, whose store
        # calls block, run on `max_workers` threads once it has arrived.
        return AioServiceServer(
            settings,
            "feature",
            [SERVICE_NAME],
            lambda server: feature_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server),
            on_stop=[_in_thread(close) for close in closing],
            registry=metrics,
            handler_threads=settings.max_workers,
        )
    except BaseException:
        for close in closing:
            close()
        raise


def _in_thread(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def hook() -> None:
        await asyncio.to_thread(close)

    return hook


def follow_changes(registry: DefinitionRegistry, url: str, channel: str) -> PostgresChangeListener:
    """Reloads the catalog whenever any replica commits an apply, and after a lost
    connection (applies made meanwhile were not heard)."""
    listener = PostgresChangeListener(
        url,
        channel,
        on_change=lambda _change: registry.refresh(),
        on_gap=registry.refresh,
        name="feature-definitions",
    )
    listener.start()
    try:
        registry.refresh()  # what was applied between the first load and LISTEN
    except BaseException:
        listener.stop()
        raise
    return listener


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT."""
    server = build(settings)
    tune_gc(settings.gc_threshold)  # after build: what it made lives as long as the process
    server.run()
