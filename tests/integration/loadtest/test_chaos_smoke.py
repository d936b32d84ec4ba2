"""The chaos harness end to end on one service with tiny counts: the SIGTERM scenario
against the real feature service as a process (start, write load, SIGTERM, restart on
the same data, read every acknowledged write back), the overload scenario against the
real inference service, and the table they make."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.drain import run_term
from modelplane.loadtest.chaos.overload import run_overload
from modelplane.loadtest.chaos.table import render_table

pytestmark = pytest.mark.e2e


async def test_sigterm_of_the_feature_service_loses_no_acknowledged_write(tmp_path: Path) -> None:
    config = ChaosConfig(writers=2, load_s=0.3, grace_s=1.0)
    row = await run_term(tmp_path, "feature", config)
    assert not any("scenario failed" in note for note in row.notes)
    assert row.accepted > 0 and row.sent >= row.accepted
    assert row.lost == 0
    assert row.recover_s is not None
    table = render_table([row])
    assert table.splitlines()[2].startswith("SIGTERM: feature")


async def test_the_overload_scenario_measures_capacity_then_overloads_and_recovers(
    tmp_path: Path,
) -> None:
    # A small MLP for a second at twice what 8 callers get: the scenario's own steps
    # (capacity, open-loop overload from a worker process, recovery probes) run through.
    config = ChaosConfig(
        overload_layers="512,64,16",
        overload_factor=2.0,
        capacity_concurrency=8,
        capacity_s=0.5,
        overload_s=1.0,
        pin=0,
    )
    row = await run_overload(tmp_path, config)
    assert row.scenario == "overload 2x: inference"
    assert row.sent > 0 and row.accepted > 0
    assert row.sent == row.accepted + sum(row.rejected.values()) + sum(row.failed.values())
    assert any(note.startswith("offered 2x = ") for note in row.notes)
    assert any(note == "service and harness share every CPU" for note in row.notes)
    assert row.recover_s is not None
