"""The bench's plumbing against the real inference service: started as a process
the way `make bench` starts it, its ports read from its JSON line, loaded, stopped."""

from __future__ import annotations

from pathlib import Path

from modelplane.loadtest import LevelPlan, SweepConfig, build_payload, run_sweep
from modelplane.loadtest.scenarios import ModelSpec, serving, write_repository
from modelplane.loadtest.sweep import fetch_metadata

SPECS = [
    ModelSpec("tiny_batched", (8, 16, 2), True, (4, 8), 500, instances=1),
    ModelSpec("tiny_unbatched", (8, 16, 2), False, (), 0, instances=1),
]


def test_load_the_real_service_in_its_own_process(tmp_path: Path) -> None:
    write_repository(tmp_path / "models", SPECS)
    with serving(tmp_path / "models", tmp_path / "server.log") as served:
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
            assert all(r.server_cpu_s is not None and r.server_cpu_s > 0 for r in results)
