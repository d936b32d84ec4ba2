"""Fuzzing every RPC of the feature service (see tests/fuzz/harness.py for the property).
The synchronous server on the embedded SQLite online store."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.services.feature.main import build
from tests.fuzz import harness
from tests.integration.feature.messages import DEFINITIONS, doubles, now_us, stats_write
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.support import running_sync

SERVICE = pb.DESCRIPTOR.services_by_name["FeatureService"]
KNOWN = [
    "customer",
    "customer_id",
    "customer_stats",
    "customer_stats:trips",
    "customer_stats:city",
    "customer_stats:nope",
    "trips",
    "city",
    "fraud_model",
    "stats.parquet",
    "entities.parquet",
    "out.parquet",
    "1h",
    DEFINITIONS.format(source="stats.parquet"),
]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.FuzzTarget]:
    data = tmp_path_factory.mktemp("feature-fuzz")
    settings = settings_for("sqlite", data / "state", unique_prefix())
    settings.log_level = "ERROR"
    with running_sync(build(settings)) as address:
        _seed(address, str(data / "stats.parquet"))
        yield from harness.open_target(address, KNOWN)


def _seed(address: str, source: str) -> None:
    """Definitions and a few rows, so fuzzed calls reach past NOT_FOUND."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        stub.ApplyDefinitions(
            pb.ApplyDefinitionsRequest(yaml=DEFINITIONS.format(source=source)), timeout=10
        )
        stub.WriteFeatures(stats_write([1, 2, 3], [now_us()] * 3, doubles([1.0, 2.0, 3.0])))


test_every_answer_is_a_proper_status = harness.proper_status_test(SERVICE)


def test_the_server_still_serves_after_fuzzing(target: harness.FuzzTarget) -> None:
    print(harness.tally_report(SERVICE))
    harness.assert_healthy(target.channel)
    stub = pb_grpc.FeatureServiceStub(target.channel)
    listed = stub.ListDefinitions(pb.ListDefinitionsRequest(), timeout=10)
    assert "customer_stats" in str(listed)
    growth = harness.rss_bytes() - target.rss_at_start
    assert growth < harness.MAX_RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.0f} MiB"
