"""The chaos harness end to end on one service with tiny counts: the SIGTERM scenario
against the real feature service as a process (start, write load, SIGTERM, restart on
the same data, read every acknowledged write back), and the table it makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.drain import run_term
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
