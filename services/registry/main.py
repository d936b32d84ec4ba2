"""Registry: immutable ONNX model versions, aliases, lineage, approvals and audit."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplane.kernel.metrics import new_registry
from modelplane.kernel.postgres import PostgresChangeListener
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings
from modelplane.registry.v1 import registry_pb2, registry_pb2_grpc
from modelplane.services.registry.artifacts import LocalArtifactStore
from modelplane.services.registry.denials import DenialAuditor
from modelplane.services.registry.servicer import RegistryServicer, WatchEvent
from modelplane.services.registry.store import Store, open_store
from modelplane.services.registry.store.postgres import PostgresStore
from modelplane.services.registry.watch import WatchHub

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_REGISTRY_", extra="ignore")

    database_url: str = Field(
        "",
        description="Metadata database: empty means SQLite at <data_dir>/registry.db; a path"
        " or sqlite:///path selects SQLite; postgresql://... selects PostgreSQL.",
    )
    database_schema: str = Field(
        "", description="PostgreSQL schema for the registry's tables; empty uses search_path."
    )
    artifact_dir: Path | None = Field(
        None, description="Directory of artifact blobs; unset means <data_dir>/artifacts."
    )
    max_artifact_bytes: int = Field(
        2**31 - 1,
        gt=0,
        description="Largest artifact an upload may carry, in bytes (protobuf caps a"
        " single-file ONNX model at 2 GiB - 1).",
    )
    database_pool_size: int = Field(
        10, gt=0, description="Most PostgreSQL connections this process opens."
    )
    orphan_blob_age_s: float = Field(
        3600.0,
        gt=0,
        description="At start, artifact blobs no version refers to and older than this are"
        " deleted (left by a crash between storing a blob and registering it).",
    )
    max_concurrent_uploads: int = Field(
        8, gt=0, description="Uploads received at once; more are refused with UNAVAILABLE."
    )
    # The registry's only client streams are uploads, whose clients send chunks back to
    # back: one quiet for a minute has stalled, and its slot goes to another.
    stream_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds an upload may send nothing; then DEADLINE_EXCEEDED, its slot "
        "and partial file freed (watches are never idle).",
    )
    watch_queue_size: int = Field(
        256,
        gt=0,
        description="Events buffered per WatchModel subscriber before it is cut off.",
    )
    max_watchers: int = Field(
        1024, gt=0, description="WatchModel streams served at once; more are refused."
    )


class RegistryServer(AioServiceServer):
    """Adds the watch plumbing to the standard server: with PostgreSQL, a listener that
    feeds every replica's watchers with every replica's changes; at shutdown, watch
    streams are ended first (they never finish on their own and would otherwise hold
    the server for the whole grace period)."""

    def __init__(
        self,
        hub: WatchHub[WatchEvent],
        store: Store,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._hub = hub
        self._store = store
        self._listener: PostgresChangeListener | None = None

    async def start(self) -> int:
        if isinstance(self._store, PostgresStore):
            loop = asyncio.get_running_loop()
            store = self._store
            hub = self._hub

            def on_change(change: dict[str, object]) -> None:
                # Runs on the listener thread: the lookup blocks, the hub lives on the loop.
                model = str(change["model"])
                event: WatchEvent
                if change["kind"] == "version":
                    event = store.get_version(model, int(str(change["version"])))
                elif change["kind"] == "rollout":
                    event = store.get_rollout(model, int(str(change["revision"])))
                else:
                    event = store.alias_event(int(str(change["id"])))
                loop.call_soon_threadsafe(hub.publish, model, event)

            def on_gap() -> None:
                loop.call_soon_threadsafe(
                    hub.disconnect_all, "the registry missed changes; watch again"
                )

            self._listener = store.listener(on_change, on_gap)
            await asyncio.to_thread(self._listener.start)
        return await super().start()

    async def stop(self, grace: float | None = None) -> None:
        self._hub.close()
        await super().stop(grace)
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url", help="postgresql://... or a SQLite path (default <data_dir>/registry.db)"
    )
    parser.add_argument("--database-schema", help="PostgreSQL schema for the registry tables")
    parser.add_argument("--artifact-dir", type=Path, help="artifact directory")


def build(settings: Settings) -> AioServiceServer:
    registry = new_registry()
    store = open_store(
        settings.database_url,
        settings.data_dir / "registry.db",
        schema=settings.database_schema,
        pool_size=settings.database_pool_size,
    )
    artifacts = LocalArtifactStore(
        settings.artifact_dir or settings.data_dir / "artifacts", settings.max_artifact_bytes
    )
    # Uploads cut off by a crash leave temporary files; they are never versions.
    artifacts.remove_stale_uploads()
    artifacts.remove_unreferenced(store.referenced_digests(), settings.orphan_blob_age_s)
    watchers = Gauge("modelplane_registry_watchers", "WatchModel streams open", registry=registry)
    Gauge(
        "modelplane_registry_watch_queue_limit",
        "Events buffered per watcher before it is cut off",
        registry=registry,
    ).set(settings.watch_queue_size)
    dropped = Counter(
        "modelplane_registry_watchers_dropped",
        "Watchers cut off for falling behind",
        registry=registry,
    )
    hub: WatchHub[WatchEvent] = WatchHub(
        settings.watch_queue_size,
        settings.max_watchers,
        on_change=watchers.set,
        on_overflow=dropped.inc,
    )
    servicer = RegistryServicer(
        store,
        artifacts,
        hub,
        registry,
        settings.max_concurrent_uploads,
        # With PostgreSQL every change, this process's own included, reaches the watchers
        # through the LISTEN feed (RegistryServer.start); publishing it here too would
        # deliver it twice.
        local_fanout=not isinstance(store, PostgresStore),
    )

    denials = DenialAuditor(store)

    async def close_store() -> None:
        await asyncio.to_thread(denials.close)
        await asyncio.to_thread(store.close)

    return RegistryServer(
        hub,
        store,
        settings,
        "registry",
        [SERVICE_NAME],
        lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server),
        on_stop=[close_store],
        registry=registry,
        on_role_denied=denials,
    )


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT."""
    build(settings).run()
