"""The load generator against a real KServe v2 server (numpy row sums) on port 0.

Assertions are on counts (requests scheduled, answered, rejected) and on CPU
accounting, never on wall-clock timings.
"""

from __future__ import annotations

import pytest

from modelplane.loadtest import LevelPlan, SweepConfig, build_payload, run_sweep
from modelplane.loadtest.server_cpu import MetricsError
from modelplane.loadtest.sweep import fetch_metadata
from tests.integration.loadtest.kserve_server import MODEL, Behaviour, rowsum_server


def _payload(address: str, rows: int = 1):  # type: ignore[no-untyped-def]
    return build_payload(fetch_metadata(address, MODEL, timeout_s=10), batch_rows=rows)


def test_closed_sweep_runs_every_level_with_exact_request_counts() -> None:
    with rowsum_server() as server:
        payload = _payload(server.address, rows=3)
        config = SweepConfig(
            target=server.address,
            levels=[LevelPlan(concurrency=c) for c in (1, 4, 16)],
            duration_s=None,
            requests=60,
            warmup_s=0.0,
        )
        seen: list[str] = []
        results = run_sweep(config, payload, on_level=lambda level: seen.append(level.label))
        assert [r.label for r in results] == seen == ["c=1", "c=4", "c=16"]
        for result in results:
            assert result.ok == 60 and result.errors == {} and result.scheduled == 60
            assert result.latency.count == 60
            assert result.latency.p50_ms <= result.latency.p90_ms <= result.latency.p99_ms
            assert result.rows_per_s == pytest.approx(result.throughput_rps * 3)
        # The server saw well-formed requests of 3 rows each (it rejects anything else).
        assert server.servicer.received == 180
        assert server.servicer.rows == 540


def test_errors_are_counted_by_status_code() -> None:
    with rowsum_server(Behaviour(reject_every=3)) as server:
        config = SweepConfig(
            target=server.address,
            levels=[LevelPlan(concurrency=2)],
            duration_s=None,
            requests=90,
            warmup_s=0.0,
        )
        (result,) = run_sweep(config, _payload(server.address))
        assert result.errors == {"UNAVAILABLE": 30}
        assert result.ok == 60
        assert result.latency.count == 60  # latencies are of successful requests only


def test_deadlines_show_as_deadline_exceeded() -> None:
    with rowsum_server(Behaviour(delay_s=1.0)) as server:
        config = SweepConfig(
            target=server.address,
            levels=[LevelPlan(concurrency=4)],
            duration_s=None,
            requests=4,
            warmup_s=0.0,
            timeout_s=0.05,
        )
        (result,) = run_sweep(config, _payload(server.address))
        assert result.errors == {"DEADLINE_EXCEEDED": 4}
        assert result.ok == 0 and result.throughput_rps == 0


def test_open_loop_schedules_rate_times_duration() -> None:
    with rowsum_server() as server:
        payload = _payload(server.address)
        uniform = SweepConfig(
            target=server.address,
            levels=[LevelPlan(rate=200), LevelPlan(rate=400)],
            duration_s=0.5,
            warmup_s=0.25,
            poisson=False,
        )
        results = run_sweep(uniform, payload)
        assert [r.scheduled for r in results] == [100, 200]
        assert [r.completed for r in results] == [100, 200]
        assert all(r.mode == "open" and r.errors == {} for r in results)
        # Warm-up sends are made but not measured.
        assert server.servicer.received == 50 + 100 + 100 + 200


def test_open_loop_poisson_rate_and_request_count() -> None:
    with rowsum_server() as server:
        payload = _payload(server.address)
        poisson = SweepConfig(
            target=server.address, levels=[LevelPlan(rate=400)], duration_s=1.0, warmup_s=0.0
        )
        (result,) = run_sweep(poisson, payload)
        # The schedule comes from seeded draws, so the count does not depend on timing.
        assert 400 * 0.8 <= result.scheduled <= 400 * 1.2
        assert result.completed == result.scheduled
        by_count = SweepConfig(
            target=server.address,
            levels=[LevelPlan(rate=500)],
            duration_s=None,
            requests=77,
            warmup_s=0.0,
        )
        (counted,) = run_sweep(by_count, payload)
        assert counted.scheduled == counted.ok == 77


def test_server_cpu_per_request_from_the_metrics_endpoint() -> None:
    burn = 0.004
    with rowsum_server(Behaviour(burn_cpu_s=burn)) as server:
        config = SweepConfig(
            target=server.address,
            levels=[LevelPlan(concurrency=2)],
            duration_s=None,
            requests=50,
            warmup_s=0.0,
            metrics_url=server.metrics_url,
        )
        (result,) = run_sweep(config, _payload(server.address))
        assert result.server_cpu_s is not None
        # Each request burns `burn` seconds of CPU in the server: a floor, not a timing.
        assert result.server_cpu_us_per_request is not None
        assert result.server_cpu_us_per_request >= burn * 1e6
        assert result.client_cpu_s > 0


def test_wrong_metrics_endpoint_fails_before_any_load() -> None:
    with rowsum_server() as server:
        config = SweepConfig(
            target=server.address,
            levels=[LevelPlan(concurrency=1)],
            duration_s=None,
            requests=5,
            metrics_url=f"http://{server.address}/metrics",  # the gRPC port, not HTTP
        )
        with pytest.raises(MetricsError):
            run_sweep(config, _payload(server.address))
        assert server.servicer.received == 0


def test_worker_processes_share_the_load() -> None:
    with rowsum_server(Behaviour(reject_every=5)) as server:
        payload = _payload(server.address, rows=2)
        config = SweepConfig(
            target=server.address,
            levels=[LevelPlan(concurrency=1), LevelPlan(concurrency=6), LevelPlan(rate=300)],
            duration_s=None,
            requests=100,
            warmup_s=0.0,
            processes=2,
            poisson=False,
        )
        results = run_sweep(config, payload)
        assert [r.label for r in results] == ["c=1", "c=6", "rate=300/s"]
        assert [r.completed for r in results] == [100, 100, 100]
        assert sum(r.errors.get("UNAVAILABLE", 0) for r in results) == 60
        assert all(r.client_cpu_s > 0 for r in results)
        assert server.servicer.received == 300
        assert server.servicer.rows == (300 - 60) * 2  # rejected requests carry no rows
