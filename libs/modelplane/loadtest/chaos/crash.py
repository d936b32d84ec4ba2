"""Scenario 3: SIGKILL under write load, and a restart on the same data and port.

Writers keep making acknowledged writes; every acknowledgement is logged (ledger.py).
The service is SIGKILLed mid-load (no drain, no flush, no shutdown hooks) and started
again at once on the same data directory and port, while the writers go on (their
calls fail while it is down; a failed write is not acknowledged, so it may or may not
have been stored). After the restart and more load, every acknowledged write is read
back: any missing is acknowledged-but-lost, which must be 0. Recovery is the time from
the restart until the first write sent after it is acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from modelplane.loadtest.chaos.calls import OK, Tally, channel, format_codes
from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.drivers import Writers
from modelplane.loadtest.chaos.ledger import AckLedger
from modelplane.loadtest.chaos.slow_clients import service_process
from modelplane.loadtest.chaos.table import ScenarioRow, verdict
from modelplane.loadtest.chaos.workloads import workload

RECOVERY_BOUND_S = 60.0


async def run_kill(root: Path, name: str, config: ChaosConfig) -> ScenarioRow:
    service = service_process(name, root / f"kill-{name}")
    work = workload(name)
    service.start()
    ledger = AckLedger(root / f"kill-{name}.acks.jsonl")
    channels = [channel(service.address, i) for i in range(2)]
    try:
        await work.prepare(channels[0])
        writers = Writers(work, channels, config.writers, config.write_timeout_s, ledger)
        writers.start()
        await asyncio.sleep(config.load_s)
        rss_before = service.rss_mb()
        acked_at_kill = len(ledger)
        killed = time.monotonic()
        service.kill()
        restarted = time.monotonic()
        service.spawn()
        await asyncio.to_thread(service.wait_serving)
        serving_s = time.monotonic() - restarted
        recover_s = await writers.first_ok_after(restarted, RECOVERY_BOUND_S)
        await asyncio.sleep(config.load_s)
        await writers.stop()
        lost = await work.lost(channels[0], ledger.entries)
        rss_after = service.rss_mb()
    finally:
        ledger.close()
        for ch in channels:
            await ch.close()
        service.stop()

    tally = Tally.of(writers.calls)
    down = Tally.of(c for c in writers.calls if c.code != OK and c.done >= killed)
    notes = [
        f"{config.writers} writers; SIGKILL after {acked_at_kill} acknowledged writes, "
        f"{len(ledger)} in all; restarted at once: serving line and health SERVING after "
        f"{serving_s:.2f} s, first acknowledged write {recover_s:.2f} s after the restart",
        f"calls failing from the kill on: {format_codes(down.codes)} (not acknowledged: "
        "each may or may not be stored)",
        f"acknowledged writes read back after the restart: {len(ledger) - lost} of "
        f"{len(ledger)}; lost {lost} (target 0)  {verdict(lost == 0)}",
    ]
    return ScenarioRow.from_tally(
        f"SIGKILL+restart: {name}",
        tally,
        lost=lost,
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
        recover_s=recover_s,
        notes=notes,
    )
