"""FeatureClient against a real feature service (port 0, both online stores) serving the
demo features: its answers equal the service's own, statuses included, and errors
arrive as exceptions that name the problem."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelplane.client import FeatureClient, FeatureServiceError
from modelplane.client.feature import (
    CannotConnect,
    FeatureNotFound,
    InvalidFeatureRequest,
    Status,
    WriteResult,
)
from modelplane.examples import features
from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.services.feature.main import build
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from tests.integration.feature.messages import int_keys
from tests.integration.feature.servers import REDIS_URL, settings_for, unique_prefix
from tests.support import running_sync

VIEW = "customer_stats"
FEATURES = [
    "trips_7d",
    "trips_30d",
    "avg_fare",
    "avg_rating",
    "cancel_rate",
    "card_on_file",
    "tenure_years",
    "complaints_90d",
]
REFS = [f"{VIEW}:{f}" for f in FEATURES]
UNKNOWN = 10**9  # a customer the demo does not have


@pytest.fixture
def demo(store_kind: str, tmp_path: Path) -> Iterator[str]:
    """A feature service over the demo definitions (not yet materialized)."""
    definitions = features.ensure_demo_features(tmp_path / "features")
    prefix = unique_prefix()
    settings = settings_for(store_kind, tmp_path / "state", prefix).model_copy(
        update={"definitions_file": str(definitions)}
    )
    try:
        with running_sync(build(settings)) as address:
            yield address
    finally:
        if store_kind == "redis":
            cleaner = RedisOnlineStore(REDIS_URL, key_prefix=prefix)
            cleaner.delete_prefix()
            cleaner.close()


@pytest.fixture
def client(demo: str) -> Iterator[FeatureClient]:
    with FeatureClient(demo, timeout=10) as feature_client:
        yield feature_client


@pytest.fixture
def stub(demo: str) -> Iterator[pb_grpc.FeatureServiceStub]:
    with grpc.insecure_channel(demo) as channel:
        yield pb_grpc.FeatureServiceStub(channel)


def raw_values(values: pb.Values) -> list:
    return list(
        {
            pb.VALUE_TYPE_DOUBLE: values.double_values,
            pb.VALUE_TYPE_INT64: values.int64_values,
            pb.VALUE_TYPE_BOOL: values.bool_values,
            pb.VALUE_TYPE_STRING: values.string_values,
        }[values.type]
    )


def test_reads_equal_the_services_own_answers(client, stub):
    (run,) = client.materialize()
    assert (run.view, run.rows_read, run.rows_written, run.rows_ignored) == (
        VIEW,
        features.CUSTOMERS * features.ROWS_PER_CUSTOMER,
        features.CUSTOMERS,
        0,
    )
    assert run.end.tzinfo is not None and run.start < run.end
    ids = [1, 2, UNKNOWN, 500]
    keys = [int_keys("customer_id", ids)]

    for selection, request in [
        (REFS, pb.GetOnlineFeaturesRequest(entity_keys=keys, features=REFS)),
        (features.SCORER, pb.GetOnlineFeaturesRequest(entity_keys=keys, bundle=features.SCORER)),
    ]:
        online = client.get_online(selection, {"customer_id": np.array(ids, np.int32)})
        expected = stub.GetOnlineFeatures(request, timeout=10)
        assert online.entity_count == expected.entity_count == len(ids)
        assert online.features == [c.feature for c in expected.columns] == REFS
        for column in expected.columns:
            ref = column.feature
            np.testing.assert_array_equal(online[ref], np.array(raw_values(column.values)))
            assert online.statuses[ref].tolist() == list(column.statuses)
            assert online.event_time_us[ref].tolist() == list(column.event_time_unix_us)
            assert online.statuses[ref].tolist() == [
                Status.PRESENT,
                Status.PRESENT,
                Status.NOT_FOUND,
                Status.PRESENT,
            ]
        assert online["customer_stats:trips_7d"].dtype == np.int64
        assert online["customer_stats:card_on_file"].dtype == bool
        assert online.keys["customer_id"].tolist() == ids

    for entity_ids in (ids, [7]):  # many entities, and the service's one-entity path
        tensor = client.get_bundle_tensor(features.SCORER, {"customer_id": entity_ids})
        expected_tensor = stub.GetBundleTensor(
            pb.GetBundleTensorRequest(
                bundle=features.SCORER, entity_keys=[int_keys("customer_id", entity_ids)]
            ),
            timeout=10,
        )
        assert tensor.values.dtype == np.float32 and tensor.statuses.dtype == np.uint8
        assert tensor.values.shape == (len(entity_ids), features.WIDTH)
        shape = tuple(expected_tensor.shape)
        np.testing.assert_array_equal(
            tensor.values, np.array(expected_tensor.values, np.float32).reshape(shape)
        )
        np.testing.assert_array_equal(
            tensor.statuses, np.array(expected_tensor.statuses, np.uint8).reshape(shape)
        )
        assert tensor.features == list(expected_tensor.features) == REFS
        assert tensor.bundle_version == expected_tensor.bundle_version == 1
    unknown_row = client.get_bundle_tensor(features.SCORER, {"customer_id": [UNKNOWN]})
    assert (unknown_row.statuses == Status.NOT_FOUND).all()
    assert np.isnan(unknown_row.values[0, :-1]).all() and unknown_row.values[0, -1] == 0.0


def test_write_then_read_back_with_every_status(client):
    now = datetime.now(UTC)
    old = now - timedelta(days=40)  # the demo view's max age is 30 days
    rows = {
        "customer_id": [5001, 5002, 5003],
        "trips_7d": [3, 4, 5],
        "trips_30d": [10, 11, 12],
        "avg_fare": [12.5, 13.5, None],  # customer 5003's fare is null
        "avg_rating": np.array([4.5, 4.6, 4.7]),
        "cancel_rate": [0.1, 0.2, 0.3],
        "card_on_file": [True, False, True],
        "tenure_years": [1, 2, 3],  # ints for a double feature: converted
        "complaints_90d": [0.0, 1.0, 2.0],  # integral floats for an int64 feature: converted
    }
    assert client.write(VIEW, rows, [now, old, now]) == WriteResult(written=3, ignored=0)
    again = client.write(VIEW, {**rows, "event_timestamp": [old] * 3}, "event_timestamp")
    assert (again.written, again.ignored) == (1, 2)  # only 5002's equal time replaces

    online = client.get_online(REFS, {"customer_id": [5001, 5002, 5003, UNKNOWN]})
    assert online.statuses["customer_stats:trips_7d"].tolist() == [
        Status.PRESENT,
        Status.STALE,
        Status.PRESENT,
        Status.NOT_FOUND,
    ]
    assert online.statuses["customer_stats:avg_fare"].tolist() == [
        Status.PRESENT,
        Status.STALE,
        Status.NULL,
        Status.NOT_FOUND,
    ]
    assert online["customer_stats:trips_7d"].tolist() == [3, 0, 5, 0]
    assert online["customer_stats:tenure_years"][0] == 1.0
    assert online["customer_stats:complaints_90d"].tolist() == [0, 0, 2, 0]
    times = online.event_time_us["customer_stats:trips_7d"].tolist()
    assert times[0] == (now - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert times[3] == 0

    table = online.to_arrow().to_pydict()
    assert table["customer_id"] == [5001, 5002, 5003, UNKNOWN]
    assert table["customer_stats__avg_fare"] == [12.5, None, None, None]
    assert table["customer_stats__avg_fare__status"] == ["PRESENT", "STALE", "NULL", "NOT_FOUND"]
    assert table["customer_stats__card_on_file"] == [True, None, True, None]


def test_bad_names_and_values_raise_the_services_error(client):
    client.materialize()
    keys = {"customer_id": [1]}
    with pytest.raises(FeatureNotFound) as error:
        client.get_online(["customer_stats:nope"], keys)
    assert error.value.code is grpc.StatusCode.NOT_FOUND
    assert "customer_stats:nope" in str(error.value) and "GetOnlineFeatures" in str(error.value)
    with pytest.raises(FeatureNotFound, match="ghost"):
        client.get_bundle_tensor("ghost", keys)
    with pytest.raises(FeatureNotFound, match="ghost"):
        client.get_online("ghost", keys)  # a bundle name
    with pytest.raises(FeatureNotFound, match="ghost_view"):
        client.write("ghost_view", {"customer_id": [1]}, datetime.now(UTC))
    with pytest.raises(InvalidFeatureRequest, match="customer_id"):
        client.get_online(REFS, {"customer_id": ["one"]})  # the key is INT64
    with pytest.raises(FeatureServiceError) as apply_error:
        client.apply("feature_views: [{name: v}]\n")
    assert apply_error.value.code is grpc.StatusCode.INVALID_ARGUMENT

    demo_yaml = features.DEFINITIONS.replace(
        "customer_stats.parquet", "elsewhere/customer_stats.parquet"
    )
    changes = client.apply(demo_yaml, dry_run=True)
    assert {(c.kind, c.name) for c in changes} >= {
        ("feature_view", VIEW),
        ("bundle", "customer_scorer"),
    }
    definitions = client.list_definitions()
    assert [v.name for v in definitions.feature_views] == [VIEW]
    assert definitions.feature_views[0].version == 1  # the dry run stored nothing


def test_an_address_where_nothing_listens_fails_within_the_connect_timeout():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with (
        FeatureClient(f"127.0.0.1:{port}", connect_timeout=0.5) as client,
        pytest.raises(CannotConnect, match="cannot connect"),
    ):
        client.get_online(REFS, {"customer_id": [1]})
    assert time.monotonic() - started < 5
