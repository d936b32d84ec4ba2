"""OpenTelemetry tracing, set up once per process.

Spans are always created when tracing is enabled (so trace context propagates
through the services); they are exported only when an OTLP endpoint is set.
Health checks are excluded: probes every few seconds would drown real traces.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters, server_interceptor
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger("modelplane.telemetry")
_lock = threading.Lock()
_provider: TracerProvider | None = None


def tracer_provider(service: str, otlp_endpoint: str | None) -> TracerProvider:
    """The process-wide provider; the first caller's service name and endpoint win."""
    global _provider
    with _lock:
        if _provider is None:
            provider = TracerProvider(
                resource=Resource.create({"service.name": f"modelplane-{service}"})
            )
            if otlp_endpoint:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(
                    BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
                )
                log.info("exporting spans", extra={"otlp_endpoint": otlp_endpoint})
            trace.set_tracer_provider(provider)
            _provider = provider
        return _provider


def _not_health() -> Any:
    return filters.negate(filters.health_check())


def aio_tracing_interceptor(service: str, otlp_endpoint: str | None) -> Any:
    """A grpc.aio server interceptor that opens a span per RPC (health excluded)."""
    return aio_server_interceptor(
        tracer_provider=tracer_provider(service, otlp_endpoint), filter_=_not_health()
    )


def sync_tracing_interceptor(service: str, otlp_endpoint: str | None) -> Any:
    """The same for a synchronous grpc.server."""
    return server_interceptor(
        tracer_provider=tracer_provider(service, otlp_endpoint), filter_=_not_health()
    )


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current span's W3C trace context as gRPC metadata (empty when there is none),
    so a call made inside a span continues its trace in the service called."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return tuple(carrier.items())
