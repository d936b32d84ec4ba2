"""The hand-written wire encoding equals what protobuf itself produces."""

from __future__ import annotations

import numpy as np
import pytest

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.services.feature import wire
from modelplane.services.feature.domain import ValueType
from modelplane.services.feature.online import Block, FeatureResult


def result(kind: ValueType, values: list, ref: str = "view:feature") -> FeatureResult:
    """A feature alone in its block."""
    n = len(values)
    dtype = {ValueType.DOUBLE: np.float64, ValueType.INT64: np.int64, ValueType.BOOL: bool}
    array = np.array(values, dtype=dtype.get(kind, object)).reshape(1, n)
    statuses = (np.arange(n, dtype=np.uint8) % 4 + 1).reshape(1, n)
    times = (np.arange(n, dtype=np.int64) * 1_700_000_000_000_000).reshape(1, n)
    return FeatureResult(ref, Block(kind, array, np.zeros((1, n), bool), statuses, times), 0)


def expected_column(r: FeatureResult) -> pb.OnlineFeatureColumn:
    values = pb.Values(type=int(r.column.type))
    field = {
        ValueType.DOUBLE: values.double_values,
        ValueType.INT64: values.int64_values,
        ValueType.BOOL: values.bool_values,
        ValueType.STRING: values.string_values,
    }[r.column.type]
    field.extend(r.column.values.tolist())
    return pb.OnlineFeatureColumn(
        feature=r.ref,
        values=values,
        statuses=r.statuses.tolist(),
        event_time_unix_us=r.event_us.tolist(),
    )


@pytest.mark.parametrize("count", [0, 1, 17, 300, 2_100])
def test_online_response_equals_the_protobuf_encoding(count):
    rng = np.random.default_rng(count)
    results = [
        result(ValueType.DOUBLE, rng.random(count).tolist(), "a:x" * 50),
        result(ValueType.INT64, rng.integers(-(2**62), 2**62, count).tolist(), "a:y"),
        result(ValueType.BOOL, (rng.random(count) < 0.5).tolist(), "b:z"),
        result(ValueType.STRING, [f"s{i}é" for i in range(count)], "b:w"),
    ]
    response = wire.online_response(count, 1_700_000_000_123_456, results)
    expected = pb.GetOnlineFeaturesResponse(
        entity_count=count,
        as_of_unix_us=1_700_000_000_123_456,
        columns=[expected_column(r) for r in results],
    )
    assert response == expected
    assert response.SerializeToString() == expected.SerializeToString()


def test_tensor_payload_equals_the_protobuf_encoding():
    values = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    statuses = np.array([[1, 2, 3], [4, 1, 1]], dtype=np.uint8)
    response = pb.GetBundleTensorResponse()
    response.MergeFromString(wire.tensor_payload(values, statuses))
    assert list(response.values) == values.ravel().tolist()
    assert list(response.statuses) == statuses.ravel().tolist()


def test_values_of_the_wrong_list_or_an_unset_type_are_invalid():
    from modelplane.kernel.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="type"):
        wire.column_of(pb.Values(double_values=[1.0]), "f")
    with pytest.raises(InvalidArgument, match="null_mask"):
        wire.column_of(
            pb.Values(type=pb.VALUE_TYPE_DOUBLE, double_values=[1.0], null_mask=[True, False]), "f"
        )
    column = wire.column_of(pb.Values(type=pb.VALUE_TYPE_INT64, double_values=[1.0]), "f")
    assert len(column) == 0  # the caller's row-count check then rejects it


@pytest.mark.parametrize("count", [0, 1, 130])
def test_features_sliced_from_one_block_encode_like_features_alone(count):
    rng = np.random.default_rng(count)
    values = rng.random((3, count))
    statuses = (np.arange(3 * count, dtype=np.uint8) % 4 + 1).reshape(3, count)
    times = rng.integers(0, 2**60, (3, count))
    block = Block(ValueType.DOUBLE, values, np.zeros((3, count), bool), statuses, times)
    shared = [FeatureResult(f"v:f{j}", block, j) for j in range(3)]
    alone = [
        FeatureResult(
            f"v:f{j}",
            Block(ValueType.DOUBLE, values[j : j + 1], np.zeros((1, count), bool),
                  statuses[j : j + 1], times[j : j + 1]),
            0,
        )
        for j in range(3)
    ]  # fmt: skip
    response = wire.online_response(count, 5, shared)
    assert response == wire.online_response(count, 5, alone)
    assert response == pb.GetOnlineFeaturesResponse(
        entity_count=count, as_of_unix_us=5, columns=[expected_column(r) for r in alone]
    )
