"""FeatureClient without a server: conversions both ways, errors, and which calls retry."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from modelplane.client.feature import (
    FeatureClient,
    FeatureDataError,
    FeatureDeadlineExceeded,
    FeatureNotFound,
    FeatureServiceError,
    FeatureServiceUnavailable,
    InvalidFeatureRequest,
    Status,
    bundle_tensor,
    decode_values,
    definitions_yaml,
    event_times_us,
    key_columns,
    online_features,
    values_message,
    write_requests,
)
from modelplane.feature.v1 import feature_pb2 as pb

VIEW = pb.FeatureView(
    name="stats",
    entity="customer",
    features=[
        pb.Feature(name="x", type=pb.VALUE_TYPE_DOUBLE),
        pb.Feature(name="n", type=pb.VALUE_TYPE_INT64),
        pb.Feature(name="ok", type=pb.VALUE_TYPE_BOOL),
        pb.Feature(name="city", type=pb.VALUE_TYPE_STRING),
    ],
)
ENTITY = pb.Entity(
    name="customer", join_keys=[pb.JoinKey(name="customer_id", type=pb.VALUE_TYPE_INT64)]
)


# --- keys and values ------------------------------------------------------------------------


def test_key_columns_are_typed_by_their_values():
    (ints,) = key_columns({"customer_id": np.array([1, 2], np.int32)})
    assert ints.values.type == pb.VALUE_TYPE_INT64 and list(ints.values.int64_values) == [1, 2]
    (listed,) = key_columns({"customer_id": [3, np.int64(4)]})
    assert list(listed.values.int64_values) == [3, 4]
    (strings,) = key_columns({"account": ["a", "b"]})
    assert strings.values.type == pb.VALUE_TYPE_STRING
    assert list(strings.values.string_values) == ["a", "b"]
    (empty,) = key_columns({"customer_id": []})
    assert empty.values.type == pb.VALUE_TYPE_INT64 and not empty.values.int64_values
    two = key_columns({"bank": [1], "account": np.array(["x"])})
    assert [c.name for c in two] == ["bank", "account"]

    for bad, message in [
        ({"customer_id": [1.5]}, "integers or strings"),
        ({"customer_id": [True]}, "integers or strings"),
        ({"customer_id": [1, None]}, "null"),
        ({"a": [1], "b": [1, 2]}, "differ in length"),
        ({}, "join key columns"),
    ]:
        with pytest.raises(FeatureDataError, match=message):
            key_columns(bad)


def test_values_take_the_declared_type_with_nulls():
    doubles = values_message(pb.VALUE_TYPE_DOUBLE, [1, 2.5, None, float("nan")], "x")
    assert list(doubles.double_values)[:2] == [1.0, 2.5]
    assert list(doubles.null_mask) == [False, False, True, True]
    ints = values_message(pb.VALUE_TYPE_INT64, np.array([1.0, np.nan, 3.0]), "n")
    assert list(ints.int64_values) == [1, 0, 3] and list(ints.null_mask) == [False, True, False]
    masked = values_message(pb.VALUE_TYPE_INT64, np.ma.array([5, 6], mask=[True, False]), "n")
    assert list(masked.int64_values) == [0, 6] and list(masked.null_mask) == [True, False]
    bools = values_message(pb.VALUE_TYPE_BOOL, [True, None, False], "ok")
    assert list(bools.bool_values) == [True, False, False] and list(bools.null_mask)[1]
    strings = values_message(pb.VALUE_TYPE_STRING, np.array(["a", None], dtype=object), "c")
    assert list(strings.string_values) == ["a", ""] and list(strings.null_mask) == [False, True]
    plain = values_message(pb.VALUE_TYPE_DOUBLE, [1.0], "x")
    assert not plain.null_mask  # no nulls: no mask on the wire

    for value_type, values, message in [
        (pb.VALUE_TYPE_INT64, [1.5], "not integers"),
        (pb.VALUE_TYPE_INT64, [True], "bool"),
        (pb.VALUE_TYPE_DOUBLE, ["1.0"], "str"),
        (pb.VALUE_TYPE_BOOL, [1, 0], "int64"),
        (pb.VALUE_TYPE_STRING, [1, 2], "int64"),
        (pb.VALUE_TYPE_DOUBLE, [[1.0]], "one value per row"),
    ]:
        with pytest.raises(FeatureDataError, match=message):
            values_message(value_type, values, "feature stats:f")


def test_decoded_values_have_numpy_types():
    assert decode_values(pb.Values(type=pb.VALUE_TYPE_DOUBLE, double_values=[1.5])).dtype == float
    assert decode_values(pb.Values(type=pb.VALUE_TYPE_INT64, int64_values=[1])).dtype == np.int64
    assert decode_values(pb.Values(type=pb.VALUE_TYPE_BOOL, bool_values=[True])).dtype == bool
    strings = decode_values(pb.Values(type=pb.VALUE_TYPE_STRING, string_values=["a", "b"]))
    assert strings.dtype == object and strings.tolist() == ["a", "b"]
    with pytest.raises(FeatureDataError):
        decode_values(pb.Values())


def test_event_times_from_every_kind_of_time():
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    micros = 1_767_323_045_678_901
    assert event_times_us(moment, 2).tolist() == [micros, micros]
    assert event_times_us(moment.replace(tzinfo=None), 1).tolist() == [micros]  # naive: UTC
    paris = moment.astimezone(timezone(timedelta(hours=1)))
    assert event_times_us([paris], 1).tolist() == [micros]
    assert event_times_us(np.array([micros], "datetime64[us]"), 1).tolist() == [micros]
    assert event_times_us(np.array([micros * 1000], "datetime64[ns]"), 1).tolist() == [micros]
    assert event_times_us([micros, micros + 1], 2).tolist() == [micros, micros + 1]
    assert event_times_us(micros, 3).tolist() == [micros] * 3
    for bad, message in [
        ([moment, None], "null"),
        (np.array(["2026-01-01", "NaT"], "datetime64[us]"), "null"),
        ([moment], "1 event times for 2 rows"),
        (["2026-01-01", "x"], "not str"),
        (np.array([1, "x"], dtype=object), "'x' is not a datetime"),
        ([1.5, 2.5], "float64"),
    ]:
        with pytest.raises(FeatureDataError, match=message):
            event_times_us(bad, 2)


def rows(count: int) -> dict[str, Any]:
    return {
        "customer_id": list(range(count)),
        "x": [0.5] * count,
        "n": [1] * count,
        "ok": [True] * count,
        "city": ["a"] * count,
    }


def test_write_requests_carry_keys_features_and_times_in_parts():
    (request,) = write_requests(VIEW, ENTITY, {**rows(2), "t": [7, 8]}, "t")
    assert request.feature_view == "stats"
    assert [c.name for c in request.entity_keys] == ["customer_id"]
    assert [c.name for c in request.features] == ["x", "n", "ok", "city"]
    assert list(request.event_time_unix_us) == [7, 8]

    parts = write_requests(VIEW, ENTITY, rows(5), list(range(1, 6)), max_rows=2)
    assert [len(p.event_time_unix_us) for p in parts] == [2, 2, 1]
    assert list(parts[2].entity_keys[0].values.int64_values) == [4]
    assert list(parts[1].features[3].values.string_values) == ["a", "a"]
    nulls = {**rows(3), "x": [None, 1.0, None]}
    split = write_requests(VIEW, ENTITY, nulls, 5, max_rows=2)
    assert [list(p.features[0].values.null_mask) for p in split] == [[True, False], [True]]

    class Frame:  # what write_requests needs of a DataFrame: items()
        def items(self):
            return iter(rows(1).items())

    assert len(write_requests(VIEW, ENTITY, Frame(), 5)) == 1

    for bad, message in [
        ({k: v for k, v in rows(1).items() if k != "city"}, "missing: city"),
        ({**rows(1), "label": [1]}, "not in feature view 'stats': label"),
        ({**rows(1), "x": [0.5, 0.5]}, "differ in length"),
        ({**rows(1), "x": 0.5}, "column 'x' must hold one value per row"),
        ({**rows(1), "customer_id": [None]}, "join key 'customer_id' has null values"),
        ({**rows(1), "n": ["1"]}, "feature stats:n is INT64; got str"),
        ([1, 2], "dict or a DataFrame"),
    ]:
        with pytest.raises(FeatureDataError, match=message):
            write_requests(VIEW, ENTITY, bad, 5)
    with pytest.raises(FeatureDataError, match="no event time column 'ts'"):
        write_requests(VIEW, ENTITY, rows(1), "ts")


# --- responses ------------------------------------------------------------------------------


def online_response() -> pb.GetOnlineFeaturesResponse:
    return pb.GetOnlineFeaturesResponse(
        entity_count=3,
        as_of_unix_us=99,
        columns=[
            pb.OnlineFeatureColumn(
                feature="stats:x",
                values=pb.Values(type=pb.VALUE_TYPE_DOUBLE, double_values=[1.5, np.nan, 0.0]),
                statuses=[Status.PRESENT, Status.STALE, Status.NOT_FOUND],
                event_time_unix_us=[10, 11, 0],
            ),
            pb.OnlineFeatureColumn(
                feature="stats:city",
                values=pb.Values(type=pb.VALUE_TYPE_STRING, string_values=["a", "", ""]),
                statuses=[Status.PRESENT, Status.NULL, Status.NOT_FOUND],
                event_time_unix_us=[10, 11, 0],
            ),
        ],
    )


def test_online_features_decode_columns_statuses_and_times():
    online = online_features(online_response(), {"customer_id": [1, 2, 3]})
    assert online.features == ["stats:x", "stats:city"]
    assert online.entity_count == 3 and online.as_of_us == 99
    assert online["stats:x"][0] == 1.5 and online["stats:city"].tolist() == ["a", "", ""]
    assert online.statuses["stats:x"].dtype == np.uint8
    assert online.present("stats:city").tolist() == [True, False, False]
    assert online.event_time_us["stats:x"].tolist() == [10, 11, 0]

    table = online.to_arrow().to_pydict()
    assert list(table) == [
        "customer_id",
        "stats__x",
        "stats__x__status",
        "stats__city",
        "stats__city__status",
    ]
    assert table["stats__x"] == [1.5, None, None]
    assert table["stats__city"] == ["a", None, None]
    assert table["stats__x__status"] == ["PRESENT", "STALE", "NOT_FOUND"]
    assert list(online.to_arrow(statuses=False).column_names) == [
        "customer_id",
        "stats__x",
        "stats__city",
    ]

    broken = online_response()
    broken.columns[0].statuses.append(Status.PRESENT)
    with pytest.raises(FeatureDataError, match="'stats:x' has 3 values, 4 statuses"):
        online_features(broken, {"customer_id": [1, 2, 3]})


def test_to_pandas_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    online = online_features(online_response(), {"customer_id": [1, 2, 3]})
    with pytest.raises(ImportError, match="pip install pandas"):
        online.to_pandas()


def test_bundle_tensors_are_float32_matrices():
    response = pb.GetBundleTensorResponse(
        shape=[2, 3],
        values=[1, 2, 3, 4, 5, 6],
        statuses=[1, 1, 2, 1, 4, 1],
        features=["a:x", "a:y", "a:z"],
        bundle_version=3,
    )
    tensor = bundle_tensor(response)
    assert tensor.values.dtype == np.float32 and tensor.values.shape == (2, 3)
    assert tensor.values[1].tolist() == [4, 5, 6]
    assert tensor.statuses[:, 1].tolist() == [Status.PRESENT, Status.STALE]
    assert tensor.features == ["a:x", "a:y", "a:z"] and tensor.bundle_version == 3
    empty = bundle_tensor(pb.GetBundleTensorResponse(shape=[0, 3]))
    assert empty.values.shape == (0, 3)
    response.values.append(7)
    with pytest.raises(FeatureDataError, match="do not fill shape"):
        bundle_tensor(response)


def test_definitions_from_a_file_resolve_source_paths_against_it(tmp_path: Path):
    folder = tmp_path / "defs"
    folder.mkdir()
    path = folder / "features.yaml"
    path.write_text(
        "feature_views:\n  - {name: v, source: {path: data/v.parquet}}\n"
        "  - {name: w, source: {path: /abs/w.parquet}}\n"
    )
    for given in (path, str(path)):
        text = definitions_yaml(given)
        assert str(folder / "data" / "v.parquet") in text and "/abs/w.parquet" in text
    assert definitions_yaml("entities: []\n") == "entities: []\n"  # YAML text as it is
    assert "entities: []" in definitions_yaml({"entities": []})
    with pytest.raises(FileNotFoundError):
        definitions_yaml("missing.yaml")
    path.write_text("feature_views: [")
    with pytest.raises(FeatureDataError, match="not valid YAML"):
        definitions_yaml(path)


# --- errors and retries ---------------------------------------------------------------------


class RpcFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Method:
    """A stub method that fails with the given codes, then answers `response`."""

    def __init__(self, failures: list[grpc.StatusCode], response: Any = None) -> None:
        self.failures = list(failures)
        self.response = response
        self.timeouts: list[float] = []

    def __call__(self, request: Any, timeout: float, metadata: Any = None) -> Any:
        self.timeouts.append(timeout)
        if self.failures:
            raise RpcFailure(self.failures.pop(0), "the details")
        return self.response


class Stub:
    def __init__(self, **methods: Method) -> None:
        self.__dict__.update(methods)


def offline_client(timeout: float = 5.0, **options: Any) -> FeatureClient:
    client = FeatureClient("127.0.0.1:1", timeout=timeout, connect_timeout=None, **options)
    return client


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_reads_and_writes_retry_unavailable_within_the_deadline():
    client = offline_client()
    tensor = pb.GetBundleTensorResponse(shape=[1, 1], values=[1.0], statuses=[1])
    read = Method([UNAVAILABLE, UNAVAILABLE], tensor)
    listing = Method([UNAVAILABLE], pb.ListDefinitionsResponse())
    written = Method([UNAVAILABLE], pb.WriteFeaturesResponse(rows_written=1))
    client.stub = Stub(GetBundleTensor=read, ListDefinitions=listing, WriteFeatures=written)
    assert client.get_bundle_tensor("b", {"k": [1]}).values.tolist() == [[1.0]]
    assert len(read.timeouts) == 3
    assert all(0 < t <= 5.0 for t in read.timeouts)
    assert read.timeouts == sorted(read.timeouts, reverse=True)  # one deadline for all
    client.list_definitions()
    assert len(listing.timeouts) == 2
    client._views["stats"] = (VIEW, ENTITY)
    assert client.write("stats", rows(1), 5).written == 1
    assert len(written.timeouts) == 2
    client.close()


def test_apply_materialize_and_writes_without_retries_are_sent_once():
    client = offline_client(retry_writes=False)
    apply = Method([UNAVAILABLE])
    materialize = Method([UNAVAILABLE])
    write = Method([UNAVAILABLE])
    client.stub = Stub(ApplyDefinitions=apply, Materialize=materialize, WriteFeatures=write)
    client._views["stats"] = (VIEW, ENTITY)
    with pytest.raises(FeatureServiceUnavailable, match="ApplyDefinitions: UNAVAILABLE"):
        client.apply("entities: []\n")
    with pytest.raises(FeatureServiceUnavailable):
        client.materialize()
    with pytest.raises(FeatureServiceUnavailable):
        client.write("stats", rows(1), 5)
    assert len(apply.timeouts) == len(materialize.timeouts) == len(write.timeouts) == 1
    assert materialize.timeouts[0] > 5.0  # the long deadline
    client.close()


def test_error_statuses_become_exceptions_that_keep_code_and_details():
    client = offline_client()
    for code, kind in [
        (grpc.StatusCode.NOT_FOUND, FeatureNotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidFeatureRequest),
        (grpc.StatusCode.DEADLINE_EXCEEDED, FeatureDeadlineExceeded),
        (grpc.StatusCode.INTERNAL, FeatureServiceError),
    ]:
        method = Method([code])
        client.stub = Stub(GetOnlineFeatures=method)
        with pytest.raises(kind) as error:
            client.get_online(["v:f"], {"k": [1]})
        assert error.value.code is code and error.value.details == "the details"
        assert str(error.value) == f"GetOnlineFeatures: {code.name}: the details"
        assert len(method.timeouts) == 1  # only UNAVAILABLE is retried
    assert issubclass(FeatureNotFound, LookupError)
    assert issubclass(FeatureServiceUnavailable, ConnectionError)
    client.close()


def test_a_write_refused_for_its_view_reads_the_definition_again_next_time():
    client = offline_client()
    client._views["stats"] = (VIEW, ENTITY)
    client.stub = Stub(WriteFeatures=Method([grpc.StatusCode.INVALID_ARGUMENT]))
    with pytest.raises(InvalidFeatureRequest):
        client.write("stats", rows(1), 5)
    assert "stats" not in client._views
    client.close()


def test_retries_stop_at_the_deadline():
    client = offline_client(timeout=0.3)
    method = Method([UNAVAILABLE] * 1000)
    client.stub = Stub(GetOnlineFeatures=method)
    started = time.monotonic()
    with pytest.raises(FeatureServiceUnavailable):
        client.get_online(["v:f"], {"k": [1]})
    assert time.monotonic() - started < 0.6
    assert len(method.timeouts) > 1
    client.close()
