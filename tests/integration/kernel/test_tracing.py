"""One span per RPC, none for health checks (probes would drown real traces)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelplane.kernel.settings import ServiceSettings
from modelplane.kernel.telemetry import tracer_provider
from tests.integration.kernel import echo_service
from tests.support import running_aio


async def test_rpcs_are_traced_and_health_checks_are_not(tmp_path):
    exporter = InMemorySpanExporter()
    tracer_provider("echo", None).add_span_processor(SimpleSpanProcessor(exporter))
    settings = ServiceSettings(port=0, data_dir=tmp_path, tracing_enabled=True)
    server = echo_service.aio_server(settings)
    async with running_aio(server) as address, grpc.aio.insecure_channel(address) as channel:
        exporter.clear()
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        await channel.unary_unary(echo_service.METHOD)(b"echo:traced", timeout=10)
    names = [span.name for span in exporter.get_finished_spans()]
    assert names.count(echo_service.METHOD.lstrip("/")) + names.count(echo_service.METHOD) == 1
    assert not any("Health" in name for name in names)


def test_spans_are_made_by_default_only_when_something_exports_them(tmp_path):
    # A dropped span still costs CPU on every RPC, so the default follows the exporter.
    assert not ServiceSettings(data_dir=tmp_path).spans_enabled
    assert ServiceSettings(data_dir=tmp_path, otlp_endpoint="collector:4317").spans_enabled
    assert not ServiceSettings(
        data_dir=tmp_path, otlp_endpoint="collector:4317", tracing_enabled=False
    ).spans_enabled
    assert ServiceSettings(data_dir=tmp_path, tracing_enabled=True).spans_enabled
