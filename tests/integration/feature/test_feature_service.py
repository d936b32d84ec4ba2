"""The feature service over gRPC, on SQLite and on Redis: definitions, pushes, online
reads with statuses, bundle tensors, bad input."""

from __future__ import annotations

import math
import socket

import grpc
import pytest

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.services.feature.main import build
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from tests.integration.feature.messages import (
    DEFINITIONS,
    HOUR_US,
    STATUS,
    column,
    customers,
    doubles,
    ints,
    now_us,
    stats_write,
    strings,
)
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.support import running_sync

FEATURES = [
    "customer_stats:trips",
    "customer_stats:city",
    "customer_stats:orders",
    "customer_stats:vip",
]


@pytest.fixture
def defined(stub, tmp_path):
    yaml_text = DEFINITIONS.format(source=tmp_path / "stats.parquet")
    stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text))
    return stub


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=10)
    return caught.value


def test_definitions_are_versioned_and_listed(stub, tmp_path):
    yaml_text = DEFINITIONS.format(source=tmp_path / "stats.parquet")
    first = stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text))
    assert [(c.kind, c.name, c.version, c.change) for c in first.changes] == [
        ("entity", "customer", 1, pb.CHANGE_KIND_CREATED),
        ("feature_view", "customer_stats", 1, pb.CHANGE_KIND_CREATED),
        ("bundle", "fraud_model", 1, pb.CHANGE_KIND_CREATED),
    ]
    again = stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text))
    assert {c.change for c in again.changes} == {pb.CHANGE_KIND_UNCHANGED}

    longer = yaml_text.replace("max_age: 1h", "max_age: 2h")
    dry = stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=longer, dry_run=True))
    assert (dry.changes[1].version, dry.changes[1].change) == (2, pb.CHANGE_KIND_UPDATED)
    listed = stub.ListDefinitions(pb.ListDefinitionsRequest()).definitions
    assert listed.feature_views[0].version == 1  # the dry run stored nothing

    stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=longer))
    view = stub.ListDefinitions(pb.ListDefinitionsRequest()).definitions.feature_views[0]
    assert (view.name, view.version, view.max_age.seconds) == ("customer_stats", 2, 7_200)
    assert [f.name for f in view.features] == ["trips", "rating", "orders", "vip", "city"]

    # The same definitions as messages (what a client in another language sends).
    merchant = pb.Definitions(
        entities=[
            pb.Entity(
                name="merchant",
                join_keys=[pb.JoinKey(name="merchant_id", type=pb.VALUE_TYPE_STRING)],
            )
        ]
    )
    created = stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(definitions=merchant))
    assert created.changes[0].change == pb.CHANGE_KIND_CREATED


def test_incompatible_or_invalid_definitions_are_refused(stub, tmp_path):
    yaml_text = DEFINITIONS.format(source=tmp_path / "stats.parquet")
    stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text))
    retyped = yaml_text.replace("{name: orders, type: int64}", "{name: orders, type: string}")
    error = rpc_error(stub.ApplyDefinitions, pb.ApplyDefinitionsRequest(yaml=retyped))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "customer_stats:orders" in error.details()

    bad_type = yaml_text.replace("type: double}", "type: decimal}", 1)
    error = rpc_error(stub.ApplyDefinitions, pb.ApplyDefinitionsRequest(yaml=bad_type))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "decimal" in error.details()

    orphan = "feature_views:\n  - {name: v, entity: ghost, features: [{name: x, type: double}]}"
    error = rpc_error(stub.ApplyDefinitions, pb.ApplyDefinitionsRequest(yaml=orphan))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ghost" in error.details()

    error = rpc_error(stub.ApplyDefinitions, pb.ApplyDefinitionsRequest(yaml="entities: [: ]"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_online_reads_are_columnar_with_a_status_and_event_time_per_value(defined):
    now = now_us()
    fresh, stale = now - 1_000_000, now - 2 * HOUR_US
    defined.WriteFeatures(
        stats_write(
            [1, 2, 3],
            [fresh, fresh, stale],
            trips=doubles([10.0, 0.0, 30.0], null=[False, True, False]),
        )
    )
    response = defined.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(3, 1, 4, 2), features=FEATURES)
    )
    assert response.entity_count == 4
    assert response.as_of_unix_us >= now
    assert [c.feature for c in response.columns] == FEATURES
    trips = column(response, "customer_stats:trips")
    assert trips.values.type == pb.VALUE_TYPE_DOUBLE
    assert list(trips.statuses) == [STATUS[s] for s in ("STALE", "PRESENT", "NOT_FOUND", "NULL")]
    assert trips.values.double_values[1] == 10.0
    # Slots without a PRESENT value hold no value (NaN for doubles), whatever was stored.
    assert all(math.isnan(trips.values.double_values[i]) for i in (0, 2, 3))
    assert list(trips.event_time_unix_us) == [stale, fresh, 0, fresh]
    city = column(response, "customer_stats:city")
    assert list(city.values.string_values) == ["", "paris", "", "paris"]
    assert list(column(response, "customer_stats:orders").values.int64_values) == [0, 0, 0, 1]
    assert list(column(response, "customer_stats:vip").values.bool_values) == [
        False,
        True,
        False,
        True,
    ]


def test_pushes_are_idempotent_by_event_time(defined):
    now = now_us()
    written = defined.WriteFeatures(stats_write([1], [now], trips=doubles([5.0])))
    assert (written.rows_written, written.rows_ignored) == (1, 0)
    late = defined.WriteFeatures(stats_write([1], [now - 10], trips=doubles([1.0])))
    assert (late.rows_written, late.rows_ignored) == (0, 1)
    replay = defined.WriteFeatures(stats_write([1], [now], trips=doubles([5.0])))
    assert replay.rows_written == 1  # same event again: same stored state
    response = defined.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=FEATURES[:1])
    )
    assert list(response.columns[0].values.double_values) == [5.0]
    assert list(response.columns[0].event_time_unix_us) == [now]


def test_a_value_of_the_wrong_type_rejects_the_whole_write(defined):
    request = stats_write([1, 2], [now_us()] * 2, trips=doubles([1.0, 2.0]))
    request.features[2].values.CopyFrom(doubles([1.0, 2.0]))  # orders is INT64
    error = rpc_error(defined.WriteFeatures, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "customer_stats:orders" in error.details() and "INT64" in error.details()
    response = defined.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(1, 2), features=FEATURES[:1])
    )
    assert list(response.columns[0].statuses) == [STATUS["NOT_FOUND"]] * 2

    short = stats_write([1, 2], [now_us()] * 2, trips=doubles([1.0]))
    assert rpc_error(defined.WriteFeatures, short).code() is grpc.StatusCode.INVALID_ARGUMENT
    missing = stats_write([1], [now_us()], trips=doubles([1.0]))
    del missing.features[4]
    error = rpc_error(defined.WriteFeatures, missing)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "city" in error.details()


def test_unknown_names_and_bad_keys_are_reported_by_name(defined):
    def read(features, keys=None, bundle=""):
        request = pb.GetOnlineFeaturesRequest(
            entity_keys=keys or customers(1), features=features, bundle=bundle
        )
        return rpc_error(defined.GetOnlineFeatures, request)

    error = read(["ghost_view:trips"])
    assert error.code() is grpc.StatusCode.NOT_FOUND and "ghost_view" in error.details()
    error = read(["customer_stats:ghost"])
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "customer_stats:ghost" in error.details()
    error = read([], bundle="ghost_bundle")
    assert error.code() is grpc.StatusCode.NOT_FOUND and "ghost_bundle" in error.details()
    error = read(["trips"])
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    string_keys = [pb.EntityKeyColumn(name="customer_id", values=strings(["1"]))]
    error = read(FEATURES, keys=string_keys)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "customer_id" in error.details()
    other_key = [pb.EntityKeyColumn(name="user_id", values=ints([1]))]
    error = read(FEATURES, keys=other_key)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "customer_id" in error.details()

    unknown_view = stats_write([1], [now_us()], trips=doubles([1.0]))
    unknown_view.feature_view = "ghost_view"
    error = rpc_error(defined.WriteFeatures, unknown_view)
    assert error.code() is grpc.StatusCode.NOT_FOUND and "ghost_view" in error.details()
    extra = stats_write([1], [now_us()], trips=doubles([1.0]))
    extra.features.add(name="ghost", values=doubles([1.0]))
    error = rpc_error(defined.WriteFeatures, extra)
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "customer_stats:ghost" in error.details()


def test_a_bundle_reads_as_a_dense_tensor_with_fill_values(defined):
    now = now_us()
    defined.WriteFeatures(
        stats_write(
            [1, 2], [now, now - 2 * HOUR_US], trips=doubles([3.0, 4.0]), rating=doubles([4.0, 5.0])
        )
    )
    tensor = defined.GetBundleTensor(
        pb.GetBundleTensorRequest(bundle="fraud_model", entity_keys=customers(1, 2, 9))
    )
    assert list(tensor.shape) == [3, 3]
    assert list(tensor.features) == [
        "customer_stats:trips",
        "customer_stats:rating",
        "customer_stats:orders",
    ]
    assert tensor.bundle_version == 1
    values = list(tensor.values)
    assert values[:3] == [3.0, 4.0, 0.0]
    # Stale and missing rows: rating takes its fill value -1, the others NaN.
    for row in (1, 2):
        trips, rating, orders = values[row * 3 : row * 3 + 3]
        assert math.isnan(trips) and rating == -1.0 and math.isnan(orders)
    assert (
        list(tensor.statuses)
        == [STATUS["PRESENT"]] * 3 + [STATUS["STALE"]] * 3 + [STATUS["NOT_FOUND"]] * 3
    )
    by_bundle = defined.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(1), bundle="fraud_model")
    )
    assert [c.feature for c in by_bundle.columns] == list(tensor.features)


def test_definitions_survive_a_restart(store_kind, tmp_path):
    prefix = unique_prefix()
    settings = settings_for(store_kind, tmp_path / "state", prefix)
    yaml_text = DEFINITIONS.format(source=tmp_path / "stats.parquet")
    now = now_us()
    try:
        with running_sync(build(settings)) as address, grpc.insecure_channel(address) as ch:
            stub = pb_grpc.FeatureServiceStub(ch)
            stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text))
            stub.WriteFeatures(stats_write([1], [now], trips=doubles([8.0])))
        with running_sync(build(settings)) as address, grpc.insecure_channel(address) as ch:
            stub = pb_grpc.FeatureServiceStub(ch)
            response = stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=FEATURES[:1])
            )
            assert list(response.columns[0].values.double_values) == [8.0]
    finally:
        if store_kind == "redis":
            cleaner = RedisOnlineStore(settings.online_store, key_prefix=prefix)
            cleaner.delete_prefix()
            cleaner.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("store_kind", ["redis"])
def test_redis_down_fails_fast_with_unavailable(store_kind, tmp_path):
    settings = settings_for("redis", tmp_path, unique_prefix())
    settings.online_store = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with running_sync(build(settings)) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        yaml_text = DEFINITIONS.format(source=tmp_path / "stats.parquet")
        stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=yaml_text))
        request = pb.GetOnlineFeaturesRequest(entity_keys=customers(1), features=FEATURES)
        # A hang would end in DEADLINE_EXCEEDED; the bounded connect timeout answers first.
        error = rpc_error(stub.GetOnlineFeatures, request)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "Redis" in error.details()
        write = stats_write([1], [now_us()], trips=doubles([1.0]))
        assert rpc_error(stub.WriteFeatures, write).code() is grpc.StatusCode.UNAVAILABLE


TWO_ENTITIES = """
entities:
  - {name: customer, join_keys: [customer_id]}
  - {name: route, join_keys: [{name: origin, type: string}, {name: dest, type: string}]}
feature_views:
  - name: customer_stats
    entity: customer
    features: [{name: trips, type: double}]
  - name: route_stats
    entity: route
    max_age: 1d
    features: [{name: delay, type: int64}, {name: busy, type: bool}]
bundles:
  - name: eta_model
    features: [route_stats:delay, customer_stats:trips, route_stats:busy]
"""


def test_a_bundle_across_entities_with_composite_string_keys(stub):
    stub.ApplyDefinitions(pb.ApplyDefinitionsRequest(yaml=TWO_ENTITIES))
    now = now_us()

    def route_keys(*pairs):
        return [
            pb.EntityKeyColumn(name="origin", values=strings([o for o, _ in pairs])),
            pb.EntityKeyColumn(name="dest", values=strings([d for _, d in pairs])),
        ]

    stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="route_stats",
            entity_keys=route_keys(("AMS", "CDG"), ("CDG", "AMS")),
            event_time_unix_us=[now, now],
            features=[
                pb.FeatureColumn(name="delay", values=ints([7, 9])),
                pb.FeatureColumn(
                    name="busy",
                    values=pb.Values(type=pb.VALUE_TYPE_BOOL, bool_values=[True, False]),
                ),
            ],
        )
    )
    stub.WriteFeatures(
        pb.WriteFeaturesRequest(
            feature_view="customer_stats",
            entity_keys=customers(5),
            event_time_unix_us=[now],
            features=[pb.FeatureColumn(name="trips", values=doubles([2.0]))],
        )
    )
    keys = [*route_keys(("CDG", "AMS"), ("AMS", "LHR")), *customers(5, 6)]
    tensor = stub.GetBundleTensor(pb.GetBundleTensorRequest(bundle="eta_model", entity_keys=keys))
    assert list(tensor.shape) == [2, 3]
    first, second = list(tensor.values[:3]), list(tensor.values[3:])
    assert first == [9.0, 2.0, 0.0]  # (CDG, AMS) is not (AMS, CDG); customer 5
    assert all(math.isnan(v) for v in second)
    assert list(tensor.statuses[3:]) == [STATUS["NOT_FOUND"]] * 3

    empty = stub.GetOnlineFeatures(
        pb.GetOnlineFeaturesRequest(entity_keys=customers(), features=["customer_stats:trips"])
    )
    assert empty.entity_count == 0 and len(empty.columns[0].statuses) == 0


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_definitions_file_is_applied_at_startup_relative_to_itself(store_kind, tmp_path):
    (tmp_path / "conf").mkdir()
    definitions_file = tmp_path / "conf" / "features.yaml"
    definitions_file.write_text(DEFINITIONS.format(source="data/stats.parquet"))
    settings = settings_for(store_kind, tmp_path / "state", unique_prefix())
    settings.definitions_file = str(definitions_file)
    with running_sync(build(settings)) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        view = stub.ListDefinitions(pb.ListDefinitionsRequest()).definitions.feature_views[0]
        assert view.source.path == str(tmp_path / "conf" / "data" / "stats.parquet")


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_metrics_count_values_by_status(store_kind, tmp_path):
    import urllib.request

    settings = settings_for(store_kind, tmp_path, unique_prefix())
    settings.metrics_port = 0
    server = build(settings)
    with running_sync(server) as address, grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        stub.ApplyDefinitions(
            pb.ApplyDefinitionsRequest(yaml=DEFINITIONS.format(source=tmp_path / "s.parquet"))
        )
        stub.WriteFeatures(stats_write([1], [now_us()], trips=doubles([1.0])))
        stub.GetOnlineFeatures(
            pb.GetOnlineFeaturesRequest(entity_keys=customers(1, 2), features=FEATURES)
        )
        # One entity of numbers only: the read path without arrays counts the same way
        # (a feature named twice is one value read).
        numbers = ["customer_stats:trips", "customer_stats:trips", "customer_stats:orders"]
        for customer in (1, 3):
            stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(entity_keys=customers(customer), features=numbers)
            )
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'modelplane_feature_values_served_total{status="PRESENT"} 6.0' in text
    assert 'modelplane_feature_values_served_total{status="NOT_FOUND"} 6.0' in text
    assert "modelplane_feature_entities_per_read_count 3.0" in text
    assert "process_cpu_seconds_total" in text
