from datetime import UTC, datetime, timedelta

import pytest

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.monitoring import domain

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(**overrides):
    fields = dict(
        model_name="fraud",
        model_version="1",
        request_id="r",
        time=T0,
        features=(1.0,),
        outputs=(0.5,),
        latency_ms=2.0,
    )
    fields.update(overrides)
    return domain.PredictionRecord(**fields)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert domain.percentile(values, 50) == 50
    assert domain.percentile(values, 99) == 99
    assert domain.percentile([7.0], 99) == 7.0
    assert domain.percentile([], 50) == 0.0


def test_summary_of_a_window():
    times = [T0 + timedelta(seconds=s) for s in (3, 1, 2)]
    summary = domain.summarize(times, [3.0, 1.0, 2.0])
    assert summary.count == 3
    assert summary.first_time == T0 + timedelta(seconds=1)
    assert summary.last_time == T0 + timedelta(seconds=3)
    assert summary.mean_latency_ms == 2.0
    assert summary.p50_latency_ms == 2.0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (record(model_name=""), "records[1].model_name"),
        (record(latency_ms=-1.0), "records[1].latency_ms"),
        (record(latency_ms=float("nan")), "records[1].latency_ms"),
    ],
)
def test_a_bad_record_rejects_the_batch_naming_it(bad, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        domain.validate_records([record(), bad])
