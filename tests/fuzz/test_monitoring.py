"""Fuzzing every RPC of the monitoring service (see tests/fuzz/harness.py for the
property)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as pb_grpc
from modelplane.services.monitoring.main import Settings, build
from tests.fuzz import harness
from tests.support import running_aio_in_thread

SERVICE = pb.DESCRIPTOR.services_by_name["MonitoringService"]
MODEL = "fraud"
KNOWN = [MODEL, "1", "2", "production", "amount", "age", "score", "region", "eu", "r-0", "auc"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.FuzzTarget]:
    data = tmp_path_factory.mktemp("monitoring-fuzz")
    server = build(
        Settings(port=0, data_dir=data, tracing_enabled=False, log_json=False, log_level="ERROR")
    )
    with running_aio_in_thread(server) as address:
        _seed(address)
        yield from harness.open_target(address, KNOWN)


def _seed(address: str) -> None:
    """A few predictions of a known model, so fuzzed calls reach past NOT_FOUND."""
    rows = 4
    with MonitoringClient(address, timeout=10) as client:
        client.log_predictions(
            [
                prediction_batch(
                    MODEL,
                    "1",
                    [f"r-{i}" for i in range(rows)],
                    latency_ms=[1.0] * rows,
                    features=np.arange(rows * 2, dtype=np.float32).reshape(rows, 2),
                    feature_names=["amount", "age"],
                    outputs={"score": np.full((rows, 1), 0.5, np.float32)},
                    route="production",
                    time_unix_us=[(1_000 + i) * 1_000_000 for i in range(rows)],
                    slices={"region": ["eu"] * rows},
                )
            ]
        )


test_every_answer_is_a_proper_status = harness.proper_status_test(SERVICE)


def test_the_server_still_serves_after_fuzzing(target: harness.FuzzTarget) -> None:
    print(harness.tally_report(SERVICE))
    harness.assert_healthy(target.channel)
    stub = pb_grpc.MonitoringServiceStub(target.channel)
    summary = stub.GetPredictionSummary(
        pb.GetPredictionSummaryRequest(model_name=MODEL), timeout=10
    )
    assert summary.ByteSize() > 0
    growth = harness.rss_bytes() - target.rss_at_start
    assert growth < harness.MAX_RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.0f} MiB"
