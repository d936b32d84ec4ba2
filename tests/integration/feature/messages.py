"""Builders for the columnar request messages, so tests read like the data they send."""

from __future__ import annotations

import time
from collections.abc import Sequence

from modelplane.feature.v1 import feature_pb2 as pb

DEFINITIONS = """
entities:
  - name: customer
    join_keys: [customer_id]
feature_views:
  - name: customer_stats
    entity: customer
    max_age: 1h
    source: {{path: "{source}", timestamp_field: event_timestamp}}
    features:
      - {{name: trips, type: double}}
      - {{name: rating, type: double}}
      - {{name: orders, type: int64}}
      - {{name: vip, type: bool}}
      - {{name: city, type: string}}
bundles:
  - name: fraud_model
    features:
      - customer_stats:trips
      - {{ref: customer_stats:rating, fill_value: -1}}
      - customer_stats:orders
"""
HOUR_US = 3_600_000_000


def now_us() -> int:
    return time.time_ns() // 1_000


def int_keys(name: str, values: Sequence[int]) -> pb.EntityKeyColumn:
    return pb.EntityKeyColumn(
        name=name, values=pb.Values(type=pb.VALUE_TYPE_INT64, int64_values=values)
    )


def customers(*ids: int) -> list[pb.EntityKeyColumn]:
    return [int_keys("customer_id", ids)]


def doubles(values: Sequence[float], null: Sequence[bool] = ()) -> pb.Values:
    return pb.Values(type=pb.VALUE_TYPE_DOUBLE, double_values=values, null_mask=null)


def ints(values: Sequence[int]) -> pb.Values:
    return pb.Values(type=pb.VALUE_TYPE_INT64, int64_values=values)


def bools(values: Sequence[bool]) -> pb.Values:
    return pb.Values(type=pb.VALUE_TYPE_BOOL, bool_values=values)


def strings(values: Sequence[str]) -> pb.Values:
    return pb.Values(type=pb.VALUE_TYPE_STRING, string_values=values)


def stats_write(
    ids: Sequence[int],
    times: Sequence[int],
    trips: pb.Values,
    rating: pb.Values | None = None,
) -> pb.WriteFeaturesRequest:
    """A customer_stats write; features not given are derived from `trips`' length."""
    n = len(ids)
    return pb.WriteFeaturesRequest(
        feature_view="customer_stats",
        entity_keys=customers(*ids),
        event_time_unix_us=times,
        features=[
            pb.FeatureColumn(name="trips", values=trips),
            pb.FeatureColumn(name="rating", values=rating or doubles([4.5] * n)),
            pb.FeatureColumn(name="orders", values=ints(list(range(n)))),
            pb.FeatureColumn(name="vip", values=bools([True] * n)),
            pb.FeatureColumn(name="city", values=strings(["paris"] * n)),
        ],
    )


def column(response: pb.GetOnlineFeaturesResponse, ref: str) -> pb.OnlineFeatureColumn:
    for candidate in response.columns:
        if candidate.feature == ref:
            return candidate
    raise KeyError(ref)


STATUS = {
    "PRESENT": pb.FEATURE_STATUS_PRESENT,
    "NOT_FOUND": pb.FEATURE_STATUS_NOT_FOUND,
    "NULL": pb.FEATURE_STATUS_NULL,
    "STALE": pb.FEATURE_STATUS_STALE,
}
