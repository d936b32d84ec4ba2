from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.monitoring import domain
from modelplane.services.monitoring.statistics import WindowStats

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def columns(**overrides):
    rows = 2
    fields = dict(
        model_name="fraud",
        model_version="1",
        route="",
        request_ids=["a", "b"],
        row_indices=[],
        time_unix_us=[],
        latency_ms=[1.0, 2.0],
        feature_names=["x", "y", "z"],
        feature_values=np.arange(rows * 3, dtype="<f4").tobytes(),
        output_names=["score"],
        output_widths=[1],
        output_values=np.zeros(rows, "<f4").tobytes(),
        slices={},
        now_us=123,
    )
    fields.update(overrides)
    return fields


def test_a_batch_decodes_into_matrices_and_defaults():
    batch = domain.decode_batch("batches[0]", **columns())
    assert batch.rows == 2
    assert batch.features.shape == (2, 3) and batch.features[1, 2] == 5.0
    assert batch.outputs.shape == (2, 1)
    assert batch.row_indices.tolist() == [0, 0]
    assert batch.time_us.tolist() == [123, 123]  # received now when the caller sent none


def test_nan_features_are_missing_values_not_errors():
    values = np.array([[np.nan, 1, 2], [3, np.inf, 5]], "<f4").tobytes()
    batch = domain.decode_batch("b", **columns(feature_values=values))
    assert np.isnan(batch.features[0, 0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_name": ""}, "batches[3].model_name is empty"),
        ({"model_version": ""}, "batches[3].model_version is empty"),
        ({"request_ids": []}, "batches[3].request_ids is empty"),
        ({"request_ids": ["a", ""]}, "batches[3].request_ids[1] is empty"),
        ({"request_ids": ["a", "b" * 300]}, "longer than 256"),
        ({"latency_ms": [1.0]}, "batches[3].latency_ms has 1 entries for 2 rows"),
        ({"latency_ms": [1.0, float("nan")]}, "batches[3].latency_ms[1] is nan"),
        ({"latency_ms": [float("-inf"), 1.0]}, "batches[3].latency_ms[0] is -inf"),
        ({"latency_ms": [1.0, -0.5]}, "batches[3].latency_ms[1] is -0.5"),
        ({"row_indices": [0, 1, 2]}, "batches[3].row_indices has 3 entries"),
        ({"time_unix_us": [1]}, "batches[3].time_unix_us has 1 entries"),
        ({"feature_names": ["x", "y"]}, "batches[3].feature_values: 24 bytes, but 2 rows x 2"),
        ({"feature_names": ["x", "x", "z"]}, "batches[3].feature_names[1]: 'x' appears more"),
        ({"feature_names": ["x", "", "z"]}, "batches[3].feature_names[1]: a name"),
        ({"output_widths": [2]}, "batches[3].output_values: 8 bytes, but 2 rows x 2"),
        ({"output_widths": [0]}, "batches[3].outputs[0].width is 0"),
        ({"slices": {"region": ["eu"]}}, "batches[3].slices 'region' has 1 values for 2 rows"),
    ],
)
def test_a_bad_batch_is_refused_naming_the_field(overrides, message):
    with pytest.raises(InvalidArgument) as error:
        domain.decode_batch("batches[3]", **columns(**overrides))
    assert message in error.value.message


def test_a_call_is_bounded():
    domain.check_call_size(domain.MAX_RECORDS_PER_CALL)
    with pytest.raises(InvalidArgument, match="at most"):
        domain.check_call_size(domain.MAX_RECORDS_PER_CALL + 1)


def _window(route: str, times_s: list[int], latencies: list[float]) -> WindowStats:
    window = WindowStats()
    window.count = len(times_s)
    window.latency_sum_ms = sum(latencies)
    window.add_records(
        route,
        np.array([int((T0 + timedelta(seconds=s)).timestamp() * 1e6) for s in times_s]),
        np.array(latencies),
    )
    return window


def test_summary_of_windows_per_version():
    summary = domain.summary_of(
        {"1": _window("production", [3], [3.0]), "2": _window("canary", [1, 2], [1.0, 2.0])}
    )
    assert summary.count == 3
    assert summary.first_time == T0 + timedelta(seconds=1)
    assert summary.last_time == T0 + timedelta(seconds=3)
    assert summary.mean_latency_ms == 2.0
    assert summary.p50_latency_ms == 2.0 and summary.p99_latency_ms == 3.0
    assert [(c.model_version, c.route, c.count) for c in summary.by_version_route] == [
        ("2", "canary", 2),
        ("1", "production", 1),
    ]
    assert domain.summary_of({}).count == 0


def test_categorical_features_are_checked_like_slices():
    batch = domain.decode_batch("b", **columns(), categorical={"merchant": ["m1", ""]})
    assert list(batch.categorical["merchant"]) == ["m1", ""]
    with pytest.raises(InvalidArgument, match="has 1 values for 2 rows"):
        domain.decode_batch("b", **columns(), categorical={"merchant": ["m1"]})
    with pytest.raises(InvalidArgument, match="also a numeric column"):
        domain.decode_batch("b", **columns(), categorical={"x": ["a", "b"]})


def test_rows_with_an_infinite_value_are_found():
    values = np.array([[np.nan, 1, 2], [3, np.inf, 5]], "<f4").tobytes()
    batch = domain.decode_batch("b", **columns(feature_values=values))
    assert batch.finite_rows().tolist() == [True, False]
