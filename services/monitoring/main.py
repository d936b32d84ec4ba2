"""Composition root of the monitoring service."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplane.client.registry import RegistryClient
from modelplane.kernel.errors import Unavailable
from modelplane.kernel.metrics import new_registry
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings
from modelplane.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from modelplane.registry.v1 import registry_pb2
from modelplane.services.monitoring.drift import DEFAULT_REFERENCE_ROWS
from modelplane.services.monitoring.ingest import Ingestor
from modelplane.services.monitoring.references import References, RegistryLookup
from modelplane.services.monitoring.service import Intervals, Monitoring
from modelplane.services.monitoring.servicer import MonitoringServicer
from modelplane.services.monitoring.store import open_store

SERVICE_NAME = monitoring_pb2.DESCRIPTOR.services_by_name["MonitoringService"].full_name


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_MONITORING_", extra="ignore")

    database: str = Field(
        "",
        description="SQLite file, or a postgresql:// URL shared by replicas; empty means "
        "<data_dir>/monitoring.db.",
    )
    database_schema: str = Field("", description="PostgreSQL schema (empty: search_path).")
    replica_id: str = Field(
        "",
        description="This replica's name in a shared database (its statistics rows and "
        "checkpoint); empty means host:pid-independent 'host name', fine for one replica "
        "per host.",
    )
    registry: str | None = Field(
        None,
        description="Registry address HOST:PORT: each version's reference distribution is "
        "its registry feature_statistics; unset, the first rows of a version become it.",
    )
    registry_timeout_s: float = Field(2.0, gt=0, description="Deadline of each registry call.")
    flush_interval_s: float = Field(
        1.0, gt=0, description="How often statistics are merged into the stored windows."
    )
    evaluate_interval_s: float = Field(
        10.0, gt=0, description="How often alert rules are evaluated on closed windows."
    )
    grace_s: float = Field(
        10.0, ge=0, description="A window is evaluated this long after it ends (late records)."
    )
    retention_days: float = Field(
        30.0, gt=0, description="Prediction batches, minute windows and labels kept this long."
    )
    dedup_keys: int = Field(
        2_000_000,
        ge=1000,
        description="Record keys per model remembered for idempotency: at least half of "
        "them, the newest, always are (16-32 bytes each).",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", help="SQLite file (default <data-dir>/monitoring.db) or postgresql:// URL"
    )
    parser.add_argument("--database-schema", help="PostgreSQL schema")
    parser.add_argument("--replica-id", help="this replica's name in a shared database")
    parser.add_argument(
        "--registry", metavar="HOST:PORT", help="take each version's reference from the registry"
    )
    parser.add_argument(
        "--evaluate-interval-s", type=float, help="how often alert rules are evaluated"
    )
    parser.add_argument("--grace-s", type=float, help="wait after a window ends before judging it")
    parser.add_argument("--retention-days", type=float, help="how long records are kept")


def registry_lookup(address: str, timeout_s: float) -> RegistryLookup:
    client = RegistryClient(address, timeout=timeout_s)

    def lookup(model: str, version: str) -> Sequence[registry_pb2.FeatureStatistics] | None:
        if not version.isdigit():
            return None  # not a registry version number
        try:
            return list(client.get_version(model, int(version)).feature_statistics)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise Unavailable(f"registry at {address}: {exc.code().name}") from exc

    return lookup


class MonitoringServer(AioServiceServer):
    """Starts the background loops (flush, alert evaluation, pruning) with the server."""

    def __init__(self, monitoring: Monitoring, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.monitoring = monitoring

    async def start(self) -> int:
        await self.monitoring.start()
        return await super().start()


def build(settings: Settings) -> MonitoringServer:
    location = settings.database or str(settings.data_dir / "monitoring.db")
    store = open_store(location, settings.database_schema)
    replica = settings.replica_id or socket.gethostname()
    lookup = (
        registry_lookup(settings.registry, settings.registry_timeout_s)
        if settings.registry
        else None
    )
    monitoring_ref: list[Monitoring] = []

    def reference_rows(model: str) -> int:
        rows = monitoring_ref[0].config(model).drift.reference_rows if monitoring_ref else 0
        return rows or DEFAULT_REFERENCE_ROWS

    references = References(store, lookup, reference_rows)
    ingestor = Ingestor(store, references, replica, index_capacity=settings.dedup_keys)
    registry = new_registry()
    monitoring = Monitoring(
        store,
        references,
        ingestor,
        registry,
        Intervals(
            flush_s=settings.flush_interval_s,
            evaluate_s=settings.evaluate_interval_s,
            grace_s=settings.grace_s,
            retention_days=settings.retention_days,
        ),
    )
    monitoring_ref.append(monitoring)
    servicer = MonitoringServicer(monitoring)

    async def stop_monitoring() -> None:
        await monitoring.stop()
        store.close()

    return MonitoringServer(
        monitoring,
        settings,
        "monitoring",
        [SERVICE_NAME],
        lambda server: monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server(
            servicer, server
        ),
        on_stop=[stop_monitoring],
        registry=registry,
    )


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT."""
    build(settings).run()
