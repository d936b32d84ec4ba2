"""The bench's plumbing against the real inference service and the transport-floor
server: started as processes the way `make bench` starts them, their ports read from
their JSON line, loaded, stopped."""

from __future__ import annotations

from pathlib import Path

from modelplane.loadtest import LevelPlan, SweepConfig, build_payload, run_sweep
from modelplane.loadtest.scenarios import (
    ModelSpec,
    floor_command,
    inference_command,
    serving,
    write_repository,
)
from modelplane.loadtest.sweep import fetch_metadata

SPECS = [
    ModelSpec("tiny_batched", (8, 16, 2), True, (4, 8), 500, instances=1),
    ModelSpec("tiny_unbatched", (8, 16, 2), False, (), 0, instances=1),
]


def test_load_the_real_service_in_its_own_process(tmp_path: Path) -> None:
    write_repository(tmp_path / "models", SPECS)
    with serving(inference_command(tmp_path / "models"), tmp_path / "server.log") as served:
        for spec in SPECS:
            metadata = fetch_metadata(served.address, spec.name, timeout_s=30)
            assert [tuple(t.shape) for t in metadata.inputs] == [(-1, 8)]
            payload = build_payload(metadata, batch_rows=3)
            config = SweepConfig(
                target=served.address,
                levels=[LevelPlan(concurrency=1), LevelPlan(concurrency=16), LevelPlan(rate=200)],
                duration_s=None,
                requests=60,
                warmup_s=0.0,
                metrics_url=served.metrics_url,
            )
            results = run_sweep(config, payload)
            assert [(r.ok, r.errors) for r in results] == [(60, {})] * 3
            assert all(r.rows_per_s == r.throughput_rps * 3 for r in results)
            # process_cpu_seconds_total moves in 10 ms ticks: one short level may see
            # none; the three together span several.
            cpu = [r.server_cpu_s for r in results]
            assert None not in cpu and sum(s or 0.0 for s in cpu) > 0


def test_load_the_transport_floor_server(tmp_path: Path) -> None:
    with serving(floor_command(features=8, outputs=3), tmp_path / "floor.log") as served:
        metadata = fetch_metadata(served.address, "floor", timeout_s=30)
        assert [(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs] == [
            ("input", "FP32", (-1, 8))
        ]
        config = SweepConfig(
            target=served.address,
            levels=[LevelPlan(concurrency=8)],
            duration_s=None,
            # Enough requests for several 10 ms ticks of process_cpu_seconds_total
            # (a no-op request costs ~0.2-0.5 ms of server CPU).
            requests=400,
            warmup_s=0.0,
            metrics_url=served.metrics_url,
        )
        (result,) = run_sweep(config, build_payload(metadata, batch_rows=1))
        assert (result.ok, result.errors) == (400, {})
        assert result.server_cpu_s is not None and result.server_cpu_s > 0
