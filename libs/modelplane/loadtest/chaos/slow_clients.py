"""Scenario 2: slow clients on every service.

`slow_clients` calls that send their headers and never a body (a stream_unary call to
a unary method that never writes, half-closes or finishes: on the wire the same as a
unary client stuck after its headers), and as many idle client streams where the
service has a client-streaming method (registry UploadVersion, inference
ModelStreamInfer), spread over `slow_connections` connections and held for
`slow_hold_s`. Meanwhile a normal client on a connection of its own keeps calling, and
at the end a client on a fresh connection makes one call: were others served? What the
slow calls got back (if anything) is counted by code; the ones still open are then
cancelled by the harness, and the time until the normal client is served again is the
row's recovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from modelplane.loadtest.chaos.calls import OK, Call, Tally, channel, format_codes, latency_ms
from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.drivers import probe_until_normal, timed
from modelplane.loadtest.chaos.overload import inference_process
from modelplane.loadtest.chaos.processes import ServiceProcess
from modelplane.loadtest.chaos.table import ScenarioRow, verdict
from modelplane.loadtest.chaos.workloads import Workload, workload

NORMAL_TIMEOUT_S = 2.0


@dataclass
class HeldCalls:
    """Slow calls of one kind: what came back while they were held."""

    kind: str
    opened: int = 0
    answered: list[Call] = field(default_factory=list)
    still_open: int = 0
    frozen: bool = False
    """Set when the hold ends: what ends after that is the harness's own cancel."""

    def describe(self) -> str:
        codes = Tally.of(self.answered).codes
        ended = (
            f"answered {len(self.answered)} ({format_codes(codes)}; after "
            f"p50 {latency_ms(self.answered, 50) / 1e3:.2f} s, "
            f"max {latency_ms(self.answered, 100) / 1e3:.2f} s)"
            if self.answered
            else "none answered"
        )
        return (
            f"{self.kind}: {self.opened} opened, {ended}, {self.still_open} still open at the end"
        )


def service_process(name: str, root: Path, env: dict[str, str] | None = None) -> ServiceProcess:
    data = root / f"{name}-data"
    if name == "inference":
        return inference_process(root, data, env)
    return ServiceProcess(name, data, env=env)


async def run_slow_clients(root: Path, name: str, config: ChaosConfig) -> ScenarioRow:
    prefix = f"MODELPLANE_{name.upper()}_"
    env = {
        f"{prefix}REQUEST_BODY_TIMEOUT_S": str(config.slow_timeout_s),
        f"{prefix}STREAM_IDLE_TIMEOUT_S": str(config.slow_timeout_s),
    }
    service = service_process(name, root / f"slow-{name}", env)
    service.start()
    try:
        return await _drive(service, workload(name), config)
    finally:
        service.stop()


async def _drive(service: ServiceProcess, work: Workload, config: ChaosConfig) -> ScenarioRow:
    normal = channel(service.address, 0)
    slow_channels = [channel(service.address, 1 + i) for i in range(config.slow_connections)]
    try:
        await work.prepare(normal)
        await work.probe(normal, 10.0)  # connected, warm
        rss_before = service.rss_mb()
        held: list[tuple[HeldCalls, list[grpc.aio.Call]]] = []

        def opener(method: str, bidi: bool) -> Callable[[grpc.aio.Channel], grpc.aio.Call]:
            def open_call(ch: grpc.aio.Channel) -> grpc.aio.Call:
                if bidi:
                    return ch.stream_stream(method)()
                return ch.stream_unary(method)()

            return open_call

        kinds = [("headers, no body", opener(work.slow.unary, False))]
        if work.slow.client_stream:
            kinds.append(("idle streams", opener(work.slow.client_stream, work.slow.bidi)))
        stop = asyncio.Event()
        normal_calls: list[Call] = []
        normal_task = asyncio.create_task(_keep_calling(work, normal, normal_calls, stop))
        waiters: list[asyncio.Task[None]] = []
        opened_at = time.monotonic()
        for kind, open_call in kinds:
            record = HeldCalls(kind)
            calls = []
            for index in range(config.slow_clients):
                call = open_call(slow_channels[index % len(slow_channels)])
                calls.append(call)
                record.opened += 1
                waiters.append(asyncio.create_task(_wait_answer(call, record, time.monotonic())))
            held.append((record, calls))
        await asyncio.sleep(max(0.0, opened_at + config.slow_hold_s - time.monotonic()))
        fresh = channel(service.address, 10_000)
        fresh_call = await timed(lambda: work.probe(fresh, NORMAL_TIMEOUT_S))
        await fresh.close()
        rss_after = service.rss_mb()
        stop.set()
        await normal_task
        released = time.monotonic()
        for record, calls in held:
            record.frozen = True
            record.still_open = record.opened - len(record.answered)
            for call in calls:
                call.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        recover_s, _ = await probe_until_normal(
            lambda timeout: work.probe(normal, timeout), released, 30.0
        )
    finally:
        await normal.close()
        for ch in slow_channels:
            await ch.close()

    tally = Tally.of(normal_calls)
    ok = [c for c in normal_calls if c.code == OK]
    served = tally.sent > 0 and tally.accepted == tally.sent and fresh_call.code == OK
    notes = [
        f"normal client (1 call at a time, deadline {NORMAL_TIMEOUT_S:g} s): "
        f"{tally.accepted}/{tally.sent} OK, p50 {latency_ms(ok, 50):.1f} ms, "
        f"p99 {latency_ms(ok, 99):.1f} ms; a new connection at the end: {fresh_call.code} "
        f"in {fresh_call.latency_s * 1e3:.0f} ms; others served throughout  {verdict(served)}",
        *(record.describe() for record, _ in held),
        f"held {config.slow_hold_s:g} s over {config.slow_connections} connections "
        f"(the service's body and idle timeouts: {config.slow_timeout_s:g} s); "
        f"recover = after the harness cancels the slow calls",
    ]
    return ScenarioRow.from_tally(
        f"slow clients: {work.service}",
        tally,
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
        recover_s=recover_s,
        notes=notes,
    )


async def _keep_calling(
    work: Workload, ch: grpc.aio.Channel, calls: list[Call], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        call = await timed(lambda: work.probe(ch, NORMAL_TIMEOUT_S))
        calls.append(call)
        if call.code != OK:
            await asyncio.sleep(0.01)


async def _wait_answer(call: grpc.aio.Call, record: HeldCalls, opened: float) -> None:
    """Records the status the service ended the call with (not the harness's cancel)."""
    try:
        code = await call.code()
    except asyncio.CancelledError:
        return
    if not record.frozen:
        record.answered.append(Call(opened, time.monotonic(), code.name))
