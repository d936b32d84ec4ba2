"""MonitoringService over gRPC: proto → Monitoring call → proto, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.kernel.errors import InvalidArgument
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as pb_grpc
from modelplane.services.monitoring.service import Monitoring


def _time(ts: Timestamp) -> datetime | None:
    """The moment a request names (None when unset); INVALID_ARGUMENT when `ts` is not a
    valid timestamp (nanos outside 0..999,999,999, seconds outside years 1..9999)."""
    if not (ts.seconds or ts.nanos):
        return None
    if not (0 <= ts.seconds <= _LAST_SECOND and 0 <= ts.nanos <= 999_999_999):
        raise InvalidArgument(
            f"invalid timestamp (seconds={ts.seconds}, nanos={ts.nanos}): monitoring "
            "accepts 1970-01-01 to 9999-12-30"
        )
    return ts.ToDatetime(tzinfo=UTC)


# Prediction times are Unix microseconds; a day short of datetime's end leaves room for the
# windows and buckets computed around a requested time.
_LAST_SECOND = 253_402_214_400 - 86_400


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


class MonitoringServicer(pb_grpc.MonitoringServiceServicer):
    def __init__(self, monitoring: Monitoring) -> None:
        self._monitoring = monitoring

    async def LogPredictions(
        self, request: pb.LogPredictionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogPredictionsResponse:
        result = await self._monitoring.log_predictions(request)
        return pb.LogPredictionsResponse(
            stored=result.stored,
            duplicates=result.duplicates,
            rejected=result.rejected,
            errors=result.errors,
        )

    async def LogLabels(
        self, request: pb.LogLabelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogLabelsResponse:
        result = await self._monitoring.log_labels(request)
        return pb.LogLabelsResponse(
            matched=result.matched, updated=result.updated, unmatched=result.unmatched
        )

    async def GetPredictionSummary(
        self, request: pb.GetPredictionSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPredictionSummaryResponse:
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        summary = await self._monitoring.summary(
            request.model_name,
            request.model_version,
            _time(request.start_time),
            _time(request.end_time),
        )
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

    async def SetMonitorConfig(
        self, request: pb.SetMonitorConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetMonitorConfigResponse:
        return pb.SetMonitorConfigResponse(config=await self._monitoring.set_config(request.config))

    async def GetMonitorConfig(
        self, request: pb.GetMonitorConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMonitorConfigResponse:
        return pb.GetMonitorConfigResponse(config=self._monitoring.config(request.model_name))

    async def GetReport(
        self, request: pb.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetReportResponse:
        return await self._monitoring.report(
            request.model_name,
            request.model_version,
            _time(request.start_time),
            _time(request.end_time),
            request.buckets,
        )

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        alerts = await self._monitoring.list_alerts(
            request.model_name, list(request.states), request.limit
        )
        return pb.ListAlertsResponse(alerts=alerts)

    async def WatchAlerts(
        self, request: pb.WatchAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchAlertsResponse]:
        async for alert in self._monitoring.watch_alerts(request.model_name):
            yield pb.WatchAlertsResponse(alert=alert)
