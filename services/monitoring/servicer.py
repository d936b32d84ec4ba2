"""MonitoringService over gRPC: proto → domain → proto, nothing else."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as pb_grpc
from modelplane.services.monitoring import domain
from modelplane.services.monitoring.store import PredictionStore


def _time(ts: Timestamp, default: datetime | None) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else default


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


class MonitoringServicer(pb_grpc.MonitoringServiceServicer):
    def __init__(self, store: PredictionStore, registry: CollectorRegistry) -> None:
        self._store = store
        self._logged = Counter(
            "modelplane_monitoring_predictions_logged",
            "Prediction records stored",
            ["model"],
            registry=registry,
        )

    async def LogPredictions(
        self, request: pb.LogPredictionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogPredictionsResponse:
        now = datetime.now(UTC)
        records = [
            domain.PredictionRecord(
                model_name=r.model_name,
                model_version=r.model_version,
                request_id=r.request_id,
                time=_time(r.time, now) or now,
                features=tuple(r.features),
                outputs=tuple(r.outputs),
                latency_ms=r.latency_ms,
            )
            for r in request.records
        ]
        domain.validate_records(records)
        stored = await asyncio.to_thread(self._store.append, records)
        for record in records:
            self._logged.labels(record.model_name).inc()
        return pb.LogPredictionsResponse(stored=stored)

    async def GetPredictionSummary(
        self, request: pb.GetPredictionSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPredictionSummaryResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        times, latencies = await asyncio.to_thread(
            self._store.window,
            request.model_name,
            request.model_version,
            _time(request.start_time, None),
            _time(request.end_time, None),
        )
        summary = domain.summarize(times, latencies)
        return pb.GetPredictionSummaryResponse(
            count=summary.count,
            first_time=_timestamp(summary.first_time),
            last_time=_timestamp(summary.last_time),
            mean_latency_ms=summary.mean_latency_ms,
            p50_latency_ms=summary.p50_latency_ms,
            p99_latency_ms=summary.p99_latency_ms,
        )
