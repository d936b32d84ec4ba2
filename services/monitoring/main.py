"""Composition root of the monitoring service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from modelplane.kernel.metrics import new_registry
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings
from modelplane.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from modelplane.services.monitoring.servicer import MonitoringServicer
from modelplane.services.monitoring.store import SqlitePredictionStore

SERVICE_NAME = monitoring_pb2.DESCRIPTOR.services_by_name["MonitoringService"].full_name


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_MONITORING_", extra="ignore")

    database: str = Field(
        "", description="SQLite file for prediction logs; empty means <data_dir>/monitoring.db."
    )


def build(settings: Settings) -> AioServiceServer:
    store = SqlitePredictionStore(
        Path(settings.database) if settings.database else settings.data_dir / "monitoring.db"
    )
    registry = new_registry()
    servicer = MonitoringServicer(store, registry)

    async def close_store() -> None:
        await asyncio.to_thread(store.close)

    return AioServiceServer(
        settings,
        "monitoring",
        [SERVICE_NAME],
        lambda server: monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server(
            servicer, server
        ),
        on_stop=[close_store],
        registry=registry,
    )


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT."""
    build(settings).run()
