"""Scenario 4: SIGTERM under load.

Writers keep calling (acknowledged writes; for inference, ModelInfer); the service is
sent SIGTERM and the writers go on until it has exited. Calls are then sorted by when
they were sent: those already in flight at the signal must finish (OK), those that
arrive while it drains should be refused with UNAVAILABLE (the kernel's drain), those
after it exited fail to connect (UNAVAILABLE). The service is then started again on
the same data to read every acknowledged write back (none may be lost); recovery is
the time from that restart until a normal call succeeds.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from modelplane.loadtest.chaos.calls import OK, Tally, channel, failure_details, format_codes
from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.drivers import Writers, probe_until_normal
from modelplane.loadtest.chaos.ledger import AckLedger
from modelplane.loadtest.chaos.slow_clients import service_process
from modelplane.loadtest.chaos.table import ScenarioRow, verdict
from modelplane.loadtest.chaos.workloads import workload

AFTER_EXIT_S = 0.5


async def run_term(root: Path, name: str, config: ChaosConfig) -> ScenarioRow:
    env = {f"MODELPLANE_{name.upper()}_GRACE_PERIOD_S": str(config.grace_s)}
    service = service_process(name, root / f"term-{name}", env)
    work = workload(name)
    service.start()
    ledger = AckLedger(root / f"term-{name}.acks.jsonl")
    channels = [channel(service.address, i) for i in range(2)]
    try:
        await work.prepare(channels[0])
        # Inference calls are short: more callers keep some in flight at the signal.
        concurrency = config.writers * (2 if name == "inference" else 1)
        writers = Writers(work, channels, concurrency, config.write_timeout_s, ledger)
        writers.start()
        await asyncio.sleep(config.load_s)
        rss_before = service.rss_mb()
        termed = time.monotonic()
        service.terminate()
        exit_code = await asyncio.to_thread(service.wait_exit, config.grace_s + 15.0)
        exited = time.monotonic()
        if exit_code is None:
            service.kill()
        await asyncio.sleep(AFTER_EXIT_S)
        await writers.stop()
        restarted = time.monotonic()
        await asyncio.to_thread(service.start)
        recover_s, _ = await probe_until_normal(
            lambda timeout: work.probe(channels[0], timeout), restarted, 30.0
        )
        lost = await work.lost(channels[0], ledger.entries) if work.writes else None
        rss_after = service.rss_mb()
    finally:
        ledger.close()
        for ch in channels:
            await ch.close()
        service.stop()

    calls = writers.calls
    # Sent before the signal and answered after it. A call's bytes may still reach the
    # service after the signal (the sent time is taken before the client sends), so
    # UNAVAILABLE is a correct answer here too.
    in_flight = Tally.of(c for c in calls if c.sent < termed < c.done)
    draining = [c for c in calls if termed <= c.sent < exited]
    during = Tally.of(draining)
    after = Tally.of(c for c in calls if c.sent >= exited)
    unexpected = {k: v for k, v in during.codes.items() if k not in (OK, "UNAVAILABLE")}
    exit_text = "did not exit (killed)" if exit_code is None else f"exit code {exit_code}"
    notes = [
        f"{concurrency} callers; SIGTERM -> {exit_text} after {exited - termed:.2f} s "
        f"(grace {config.grace_s:g} s)  {verdict(exit_code == 0)}",
        f"in flight at SIGTERM: {in_flight.sent} ({format_codes(in_flight.codes)}); each "
        "finishes OK, or is refused UNAVAILABLE when it reached the service after the "
        f"signal, never another error  {verdict(not in_flight.failed)}",
        f"sent while draining: {during.sent} ({format_codes(during.codes)}); only "
        f"UNAVAILABLE (or OK)  {verdict(not unexpected)}"
        + (f"; {details}" if (details := failure_details(draining)) else ""),
        f"sent after exit (within {AFTER_EXIT_S:g} s): {after.sent} ({format_codes(after.codes)})",
    ]
    if lost is not None:
        notes.append(
            f"acknowledged writes read back after a restart: {len(ledger) - lost} of "
            f"{len(ledger)}; lost {lost} (target 0)  {verdict(lost == 0)}"
        )
    return ScenarioRow.from_tally(
        f"SIGTERM: {name}",
        Tally.of(calls),
        lost=lost,
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
        recover_s=None if math.isnan(recover_s) else recover_s,
        notes=notes,
    )
