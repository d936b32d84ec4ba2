"""MonitoringService over gRPC: proto → domain → proto, nothing else."""

from __future__ import annotations

import asyncio
import time
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
        self._duplicates = Counter(
            "modelplane_monitoring_prediction_duplicates",
            "Prediction records received again (a retried batch) and not stored twice",
            ["model"],
            registry=registry,
        )

    async def LogPredictions(
        self, request: pb.LogPredictionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogPredictionsResponse:
        now_us = time.time_ns() // 1000
        domain.check_call_size(sum(len(b.request_ids) for b in request.batches))
        batches = [
            domain.decode_batch(
                f"batches[{index}]",
                model_name=b.model_name,
                model_version=b.model_version,
                route=b.route,
                request_ids=b.request_ids,
                row_indices=b.row_indices,
                time_unix_us=b.time_unix_us,
                latency_ms=b.latency_ms,
                feature_names=b.feature_names,
                feature_values=b.feature_values,
                output_names=[o.name for o in b.outputs],
                output_widths=[o.width for o in b.outputs],
                output_values=b.output_values,
                slices={s.name: s.values for s in b.slices},
                now_us=now_us,
            )
            for index, b in enumerate(request.batches)
        ]
        stored = await asyncio.to_thread(self._store.append, batches)
        for batch, new in zip(batches, stored, strict=True):
            if new:
                self._logged.labels(batch.model_name).inc(new)
            if batch.rows - new:
                self._duplicates.labels(batch.model_name).inc(batch.rows - new)
        total = sum(stored)
        return pb.LogPredictionsResponse(
            stored=total, duplicates=sum(b.rows for b in batches) - total
        )

    async def GetPredictionSummary(
        self, request: pb.GetPredictionSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPredictionSummaryResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        window = (
            request.model_name,
            request.model_version,
            _time(request.start_time, None),
            _time(request.end_time, None),
        )
        times, latencies, counts = await asyncio.to_thread(self._store.window, *window)
        summary = domain.summarize(times, latencies, counts)
        return pb.GetPredictionSummaryResponse(
            count=summary.count,
            first_time=_timestamp(summary.first_time),
            last_time=_timestamp(summary.last_time),
            mean_latency_ms=summary.mean_latency_ms,
            p50_latency_ms=summary.p50_latency_ms,
            p99_latency_ms=summary.p99_latency_ms,
            by_version_route=[
                pb.VersionRouteCount(model_version=c.model_version, route=c.route, count=c.count)
                for c in summary.by_version_route
            ],
        )
