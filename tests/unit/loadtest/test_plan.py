import numpy as np
import pytest

from modelplane.loadtest.generator import arrival_gaps
from modelplane.loadtest.sweep import LevelPlan, SweepConfig, plan_shares, split


def _config(**changes: object) -> SweepConfig:
    values: dict[str, object] = dict(target="x:1", levels=[LevelPlan(concurrency=1)])
    values.update(changes)
    return SweepConfig(**values)  # type: ignore[arg-type]


def test_split_is_even_and_complete() -> None:
    assert split(64, 2) == [32, 32]
    assert split(7, 3) == [3, 2, 2]
    assert split(1, 2) == [1, 0]


def test_closed_level_divides_users_and_requests_between_processes() -> None:
    shares = plan_shares(LevelPlan(concurrency=9), _config(duration_s=None, requests=100), 2, 0.0)
    assert [s.concurrency for s in shares] == [5, 4]
    assert [s.requests for s in shares] == [50, 50]
    assert all(s.rate is None for s in shares)


def test_fewer_users_than_processes_leaves_a_process_idle_not_short_of_requests() -> None:
    shares = plan_shares(LevelPlan(concurrency=1), _config(duration_s=None, requests=30), 2, 0.0)
    assert [s.concurrency for s in shares] == [1, 0]
    assert [s.requests for s in shares] == [30, 0]


def test_open_level_divides_the_rate_and_interleaves_uniform_schedules() -> None:
    config = _config(duration_s=5.0, warmup_s=1.0, poisson=False)
    shares = plan_shares(LevelPlan(rate=1000), config, 2, start=10.0)
    assert [s.rate for s in shares] == [500, 500]
    assert [s.phase_s for s in shares] == [0.0, 0.001]
    assert all(s.measure == 11.0 and s.end == 16.0 for s in shares)
    assert len({s.seed for s in shares}) == 2


def test_level_and_config_validation() -> None:
    with pytest.raises(ValueError):
        LevelPlan()
    with pytest.raises(ValueError):
        LevelPlan(concurrency=2, rate=3.0)
    with pytest.raises(ValueError):
        LevelPlan(concurrency=0)
    with pytest.raises(ValueError):
        _config(duration_s=None, requests=None)
    with pytest.raises(ValueError):
        _config(levels=[])
    assert LevelPlan(concurrency=8).label == "c=8"
    assert LevelPlan(rate=250).label == "rate=250/s"


def test_poisson_gaps_have_the_right_mean() -> None:
    gaps = arrival_gaps(1000.0, True, np.random.default_rng(0), 20_000)
    assert gaps.mean() == pytest.approx(0.001, rel=0.03)
    assert gaps.std() == pytest.approx(0.001, rel=0.05)  # exponential: std = mean
    assert (arrival_gaps(200.0, False, np.random.default_rng(0), 5) == 0.005).all()
