from __future__ import annotations

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as pb_grpc
from modelplane.services.monitoring.main import Settings, build
from tests.support import running_aio


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


async def test_logged_predictions_are_summarised_per_version(tmp_path):
    server = build(Settings(port=0, data_dir=tmp_path))
    async with running_aio(server) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        records = [
            pb.PredictionRecord(
                model_name="fraud",
                model_version=v,
                request_id=f"r{i}",
                time=ts(1_000 + i),
                features=[0.1, 0.2],
                outputs=[0.9],
                latency_ms=float(i),
            )
            for i, v in enumerate(["1", "1", "1", "2"], start=1)
        ]
        assert (await stub.LogPredictions(pb.LogPredictionsRequest(records=records))).stored == 4

        v1 = await stub.GetPredictionSummary(
            pb.GetPredictionSummaryRequest(model_name="fraud", model_version="1")
        )
        assert v1.count == 3
        assert v1.mean_latency_ms == pytest.approx(2.0)
        assert v1.first_time.seconds == 1_001 and v1.last_time.seconds == 1_003

        windowed = await stub.GetPredictionSummary(
            pb.GetPredictionSummaryRequest(
                model_name="fraud", start_time=ts(1_002), end_time=ts(1_004)
            )
        )
        assert windowed.count == 2


async def test_a_malformed_batch_stores_nothing(tmp_path):
    server = build(Settings(port=0, data_dir=tmp_path))
    async with running_aio(server) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.MonitoringServiceStub(channel)
        good = pb.PredictionRecord(model_name="fraud", model_version="1", latency_ms=1.0)
        bad = pb.PredictionRecord(model_name="", model_version="1", latency_ms=1.0)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.LogPredictions(pb.LogPredictionsRequest(records=[good, bad]))
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "records[1].model_name" in error.value.details()
        summary = await stub.GetPredictionSummary(
            pb.GetPredictionSummaryRequest(model_name="fraud")
        )
        assert summary.count == 0


async def test_records_survive_a_restart(tmp_path):
    for expected in (1, 2):
        server = build(Settings(port=0, data_dir=tmp_path))
        async with running_aio(server) as address, grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.MonitoringServiceStub(ch)
            await stub.LogPredictions(
                pb.LogPredictionsRequest(
                    records=[pb.PredictionRecord(model_name="m", latency_ms=1.0)]
                )
            )
            summary = await stub.GetPredictionSummary(
                pb.GetPredictionSummaryRequest(model_name="m")
            )
            assert summary.count == expected
