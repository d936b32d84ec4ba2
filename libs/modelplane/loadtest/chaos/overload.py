"""Scenario 1: the inference service at several times its capacity.

Capacity is measured first: closed-loop throughput of an MLP (`overload_layers`; one row a
request) at a moderate concurrency, with its p99 ("at-capacity p99"). Then calls
arrive open-loop at `overload_factor` times that rate for `overload_s`, each with a
deadline, so the service must shed what it cannot serve. What a well-behaved service
does: rejects quickly (RESOURCE_EXHAUSTED or UNAVAILABLE within 10 ms p99), keeps the
calls it accepts within 2x of the at-capacity p99, never answers CANCELLED by itself,
holds its memory, and serves normally within 1 s once the overload stops (a probe call
with latency near the idle one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modelplane.examples.models import HEAVY_MLP, mlp, write_model
from modelplane.loadtest.chaos.calls import (
    OK,
    REJECTION_CODES,
    Tally,
    channel,
    failure_details,
    latency_ms,
)
from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.drivers import (
    closed_loop_for,
    probe_until_normal,
    timed,
)
from modelplane.loadtest.chaos.processes import ServiceProcess
from modelplane.loadtest.chaos.sender import SenderPool
from modelplane.loadtest.chaos.table import ScenarioRow, verdict
from modelplane.loadtest.chaos.workloads import HEAVY_MODEL, INFER, infer_request_bytes, raw_unary

REJECT_P99_TARGET_MS = 10.0
ACCEPTED_P99_RATIO_TARGET = 2.0
RECOVERY_TARGET_S = 1.0
RSS_GROWTH_BOUND_MB = 100.0


def write_heavy_repository(root: Path, layers: tuple[int, ...] = HEAVY_MLP) -> Path:
    """An MLP (the heavy demo's by default) with no config.pbtxt: the service's defaults."""
    write_model(mlp(layers, seed=1, name=HEAVY_MODEL), root, HEAVY_MODEL)
    return root


def inference_process(
    root: Path,
    data: Path,
    env: dict[str, str] | None = None,
    cpus: str = "",
    layers: tuple[int, ...] = HEAVY_MLP,
) -> ServiceProcess:
    repository = root / "models"
    if not (repository / HEAVY_MODEL).is_dir():
        write_heavy_repository(repository, layers)
    args = ["--model-repository", str(repository), *(["--cpus", cpus] if cpus else [])]
    return ServiceProcess("inference", data, args, env=env)


@dataclass(frozen=True)
class OverloadTarget:
    """A server the overload drives: where it listens, how to read its memory, and two
    phrases for the notes (where it runs; how it is set up to shed load)."""

    address: str
    rss_mb: Callable[[], float]
    placement: str
    setup: str


async def run_overload(root: Path, config: ChaosConfig) -> ScenarioRow:
    server_cpu, harness_cpus = split_cpus(config)
    env = {
        "MODELPLANE_INFERENCE_MAX_QUEUE_WAIT_US": str(config.queue_wait_ms * 1000),
        "MODELPLANE_INFERENCE_RUNTIME_THREAD_NICE": str(config.runtime_nice),
        "MODELPLANE_INFERENCE_SHED_LOOP_LAG_US": str(config.shed_lag_us),
        "MODELPLANE_INFERENCE_GC_THRESHOLD": str(config.gc_threshold),
    }
    service = inference_process(
        root,
        root / "overload-inference",
        env=env,
        cpus="" if server_cpu is None else str(server_cpu),
        layers=overload_layers(config),
    )
    target = OverloadTarget(
        service.address,
        service.rss_mb,
        placement(server_cpu, harness_cpus),
        f"the service's queue-wait bound {config.queue_wait_ms} ms, load shedding past "
        f"{config.shed_lag_us} µs of loop lag, runtime threads at nice {config.runtime_nice}, "
        f"GC threshold {config.gc_threshold}",
    )
    service.start()
    try:
        return await drive_overload(target, config, harness_cpus, "inference")
    finally:
        service.stop()


def split_cpus(config: ChaosConfig) -> tuple[int | None, frozenset[int]]:
    """The CPU the overloaded server runs on (the last; None: not pinned) and the
    harness's (the others; empty: any)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not config.pin or len(cpus) < 2:
        return None, frozenset()
    return cpus[-1], frozenset(cpus[:-1])


def overload_layers(config: ChaosConfig) -> tuple[int, ...]:
    layers = tuple(int(width) for width in config.overload_layers.split(","))
    if layers[0] != HEAVY_MLP[0]:
        raise ValueError("overload_layers must take the heavy demo's 512 inputs")
    return layers


def placement(server_cpu: int | None, harness_cpus: frozenset[int], who: str = "service") -> str:
    if server_cpu is None:
        return f"{who} and harness share every CPU"
    return (
        f"the {who} on CPU {server_cpu}, the harness on CPUs "
        f"{','.join(map(str, sorted(harness_cpus)))}"
    )


@contextlib.contextmanager
def pinned_to(cpus: frozenset[int]) -> Iterator[None]:
    """This process (its calling thread and the threads it starts) on `cpus` inside."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def drive_overload(
    target: OverloadTarget, config: ChaosConfig, harness_cpus: frozenset[int], label: str
) -> ScenarioRow:
    """Capacity, then `config.overload_factor` times it open-loop, then recovery, against
    a server already serving the overload MLP as `heavy`; the harness on `harness_cpus`
    (empty: wherever it runs)."""
    if harness_cpus:
        with pinned_to(harness_cpus):
            return await _drive(target, config, harness_cpus, label)
    return await _drive(target, config, harness_cpus, label)


async def _drive(
    target: OverloadTarget, config: ChaosConfig, harness_cpus: frozenset[int], label: str
) -> ScenarioRow:
    request = infer_request_bytes()
    load = channel(target.address, 1)
    probe_channel = channel(target.address, 2)
    try:
        infer = raw_unary(load, INFER)
        probe_infer = raw_unary(probe_channel, INFER)

        async def send() -> object:
            return await infer(request, timeout=config.deadline_s)

        async def probe(timeout: float) -> None:
            await probe_infer(request, timeout=timeout)

        await closed_loop_for(send, 8, 1.0)  # warm-up: sessions, arenas, connections
        idle = [await timed(lambda: probe(1.0)) for _ in range(50)]
        idle_ok = [c for c in idle if c.code == OK]
        idle_p50, idle_p99 = latency_ms(idle_ok, 50), latency_ms(idle_ok, 99)
        capacity_calls, elapsed = await closed_loop_for(
            send, config.capacity_concurrency, config.capacity_s
        )
        at_capacity = [c for c in capacity_calls if c.code == OK]
        capacity = len(at_capacity) / elapsed
        capacity_p99 = latency_ms(at_capacity, 99)
        rate = capacity * config.overload_factor

        senders = SenderPool(config.overload_senders)
        try:
            await asyncio.to_thread(senders.warm)
            rss_before = target.rss_mb()
            peak = [rss_before]
            sampling = asyncio.create_task(_sample_rss(target, peak))
            start_at = time.monotonic() + 1.0
            sending = asyncio.create_task(
                senders.run(
                    target.address,
                    request,
                    rate,
                    config.overload_s,
                    config.deadline_s,
                    start_at,
                    harness_cpus,
                )
            )
            # Recovery: from the end of the overload window (the calls still waiting
            # finish meanwhile) until a probe is answered within a normal latency.
            ended = start_at + config.overload_s
            await asyncio.sleep(max(0.0, ended - time.monotonic()))
            # Normal latency: the at-capacity p99 (thousands of calls; a p99 of 50 idle
            # probes is one unlucky call on a shared machine).
            normal_s = max(capacity_p99, idle_p50 + 2.0) / 1e3
            recover_s, probes = await probe_until_normal(probe, ended, 10.0, normal_s)
            run, calls = await sending
        finally:
            senders.close()
        await asyncio.sleep(1.0)
        sampling.cancel()
        rss_after = target.rss_mb()
    finally:
        await load.close()
        await probe_channel.close()

    tally = Tally.of(calls)
    accepted = [c for c in calls if c.code == OK]
    rejected = [c for c in calls if c.code in REJECTION_CODES]
    reject_p50, reject_p99 = latency_ms(rejected, 50), latency_ms(rejected, 99)
    accepted_p99 = latency_ms(accepted, 99)
    ratio = accepted_p99 / capacity_p99 if capacity_p99 > 0 else math.nan
    cancelled = tally.failed.get("CANCELLED", 0)
    growth = rss_after - rss_before
    notes = [
        f"idle (1 caller): p50 {idle_p50:.2f} ms, p99 {idle_p99:.2f} ms; capacity at "
        f"c={config.capacity_concurrency}: {capacity:.0f} req/s, p99 {capacity_p99:.1f} ms",
        f"offered {config.overload_factor:g}x = {rate:.0f} req/s for {config.overload_s:g} s "
        f"from {config.overload_senders} processes "
        f"(deadline {config.deadline_s:g} s; {target.setup}); "
        f"sent {run.sent} = "
        f"{run.sent / config.overload_s:.0f} req/s, sender at most "
        f"{run.max_lag_s * 1e3:.0f} ms behind schedule"
        + (f", {run.skipped} due but not sent (sender behind)" if run.skipped else "")
        + f"; the service saw {run.sent / config.overload_s / capacity:.1f}x its capacity",
        target.placement,
        *(
            [
                "the sender fell behind its schedule: the latencies and deadline misses "
                "below include time calls waited in the harness's own process, and the "
                f"service saw {run.sent / config.overload_s / capacity:.1f}x, not "
                f"{config.overload_factor:g}x"
            ]
            if run.max_lag_s > 0.1
            else []
        ),
        f"accepted {tally.accepted} = {tally.accepted / config.overload_s:.0f} req/s, "
        f"p50 {latency_ms(accepted, 50):.1f} ms, p99 {accepted_p99:.1f} ms",
        f"rejection latency p50 {reject_p50:.2f} ms, p99 {reject_p99:.2f} ms "
        f"(target <= {REJECT_P99_TARGET_MS:g} ms)  "
        + (verdict(reject_p99 <= REJECT_P99_TARGET_MS) if rejected else "n/a: none rejected"),
        f"accepted p99 / at-capacity p99: {ratio:.2f}x (target <= "
        f"{ACCEPTED_P99_RATIO_TARGET:g}x)  {verdict(ratio <= ACCEPTED_P99_RATIO_TARGET)}",
        f"CANCELLED answers: {cancelled} (target 0)  {verdict(cancelled == 0)}",
        *([f"failures: {details}"] if (details := failure_details(calls)) else []),
        f"RSS {rss_before:.0f} -> peak {max(peak):.0f} -> {rss_after:.0f} MiB after "
        f"(growth {growth:+.0f} MiB, bound {RSS_GROWTH_BOUND_MB:g})  "
        f"{verdict(growth <= RSS_GROWTH_BOUND_MB)}",
        f"recovery: a probe answered within {normal_s * 1e3:.1f} ms "
        f"{_seconds(recover_s)} after the overload stopped ({len(probes)} probes; "
        f"target <= {RECOVERY_TARGET_S:g} s)  {verdict(recover_s <= RECOVERY_TARGET_S)}",
    ]
    return ScenarioRow.from_tally(
        f"overload {config.overload_factor:g}x: {label}",
        tally,
        rss_before_mb=rss_before,
        rss_after_mb=rss_after,
        recover_s=recover_s,
        notes=notes,
    )


def _seconds(value: float) -> str:
    return "never" if math.isinf(value) else f"{value * 1e3:.0f} ms"


async def _sample_rss(target: OverloadTarget, peak: list[float]) -> None:
    while True:
        value = target.rss_mb()
        if not math.isnan(value):
            peak.append(value)
        await asyncio.sleep(0.25)
