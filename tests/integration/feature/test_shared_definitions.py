"""Feature replicas that share their definitions in PostgreSQL and their features in
Redis: what is applied through one replica is served by every other."""

from __future__ import annotations

from pathlib import Path

import grpc

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.services.feature.main import build
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from tests.integration.feature.messages import (
    DEFINITIONS,
    customers,
    doubles,
    now_us,
    stats_write,
)
from tests.integration.feature.servers import REDIS_URL, settings_for, unique_prefix
from tests.postgres import POSTGRES_URL, fresh_schema
from tests.support import running_sync, wait_until


def views(stub: pb_grpc.FeatureServiceStub) -> list[tuple[str, int]]:
    listed = stub.ListDefinitions(pb.ListDefinitionsRequest(), timeout=10).definitions
    return [(v.name, v.version) for v in listed.feature_views]


def test_replicas_on_postgres_serve_each_others_applies(tmp_path: Path) -> None:
    prefix = unique_prefix()
    yaml_text = DEFINITIONS.format(source=tmp_path / "stats.parquet")
    with fresh_schema("feature") as schema:
        # One data directory for both: shared definitions take no per-directory lock.
        settings = settings_for("redis", tmp_path / "state", prefix).model_copy(
            update={"definitions_db": POSTGRES_URL, "definitions_schema": schema}
        )
        try:
            with (
                running_sync(build(settings)) as first,
                running_sync(build(settings)) as second,
                grpc.insecure_channel(first) as first_channel,
                grpc.insecure_channel(second) as second_channel,
            ):
                a = pb_grpc.FeatureServiceStub(first_channel)
                b = pb_grpc.FeatureServiceStub(second_channel)
                a.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text), timeout=10)
                wait_until(lambda: views(b) == [("customer_stats", 1)])

                a.WriteFeatures(stats_write([7], [now_us() - 1_000_000], trips=doubles([3.5])))
                response = b.GetOnlineFeatures(
                    pb.GetOnlineFeaturesRequest(
                        entity_keys=customers(7), features=["customer_stats:trips"]
                    ),
                    timeout=10,
                )
                (trips,) = response.columns
                assert list(trips.statuses) == [pb.FEATURE_STATUS_PRESENT]
                assert list(trips.values.double_values) == [3.5]

                # b plans its apply against what a stored, and a hears of it in turn.
                longer = yaml_text.replace("max_age: 1h", "max_age: 2h")
                changes = b.ApplyDefinitions(
                    pb.ApplyDefinitionsRequest(yaml=longer), timeout=10
                ).changes
                assert [(c.name, c.version, c.change) for c in changes] == [
                    ("customer", 1, pb.CHANGE_KIND_UNCHANGED),
                    ("customer_stats", 2, pb.CHANGE_KIND_UPDATED),
                    ("fraud_model", 1, pb.CHANGE_KIND_UNCHANGED),
                ]
                wait_until(lambda: views(a) == [("customer_stats", 2)])
        finally:
            cleaner = RedisOnlineStore(REDIS_URL, key_prefix=prefix)
            cleaner.delete_prefix()
            cleaner.close()
