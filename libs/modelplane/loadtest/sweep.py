"""A sweep: levels run one after another against one model, each with a warm-up,
a measurement window, and server CPU read at both ends of the window."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from inference import grpc_service_pb2 as pb
from modelplane.client.inference import CONNECT_TIMEOUT_S, InferenceClient
from modelplane.loadtest.engines import Engine, connect_engine
from modelplane.loadtest.generator import Samples, Share
from modelplane.loadtest.payload import Payload
from modelplane.loadtest.server_cpu import MetricsError, ServerCpuProbe
from modelplane.loadtest.stats import LatencySummary, LevelResult

# Workers get their commands this long before the level starts, so they start together.
PROCESS_START_SLACK_S = 0.1
PROGRESS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class LevelPlan:
    """A closed-loop level (concurrency) or an open-loop level (rate, requests/s)."""

    concurrency: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a level has either a concurrency or a rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"


@dataclass(frozen=True)
class SweepConfig:
    target: str
    levels: Sequence[LevelPlan]
    duration_s: float | None = 10.0  # per level; or `requests` per level
    requests: int | None = None
    warmup_s: float = 1.0
    poisson: bool = True
    timeout_s: float = 10.0
    processes: int = 1
    channels: int = 1
    max_outstanding: int = 10_000
    metrics_url: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give either a duration or a request count per level")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be positive")
        if self.requests is not None and self.requests < 1:
            raise ValueError("request count must be at least 1")
        if self.warmup_s < 0:
            raise ValueError("warm-up must not be negative")
        if not self.levels:
            raise ValueError("no levels to run")


def split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as integers allow."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def plan_shares(plan: LevelPlan, config: SweepConfig, processes: int, start: float) -> list[Share]:
    """One level divided between processes. Open-loop rates add up (the sum of Poisson
    processes is Poisson); uniform schedules are phase-shifted so they interleave."""
    measure = start + config.warmup_s
    end = None if config.duration_s is None else measure + config.duration_s
    # With fewer users than processes some processes sit the level out.
    active = processes if plan.concurrency is None else min(plan.concurrency, processes)
    users = split(plan.concurrency or 0, active) + [0] * (processes - active)
    requests: list[int | None] = [None] * processes
    if config.requests is not None:
        requests = [*split(config.requests, active), *[0] * (processes - active)]
    shares = []
    for index in range(processes):
        base = Share(
            start=start,
            measure=measure,
            end=end,
            requests=requests[index],
            poisson=config.poisson,
            timeout_s=config.timeout_s,
            max_outstanding=config.max_outstanding,
            seed=config.seed * 1000 + index,
        )
        if plan.concurrency is not None:
            shares.append(replace(base, concurrency=users[index]))
        else:
            assert plan.rate is not None
            shares.append(replace(base, rate=plan.rate / processes, phase_s=index / plan.rate))
    return shares


def merge(plan: LevelPlan, samples: Sequence[Samples], measure: float, rows: int) -> LevelResult:
    errors: dict[str, int] = {}
    for part in samples:
        for code, count in part.errors.items():
            errors[code] = errors.get(code, 0) + count
    latencies = np.concatenate([part.latencies_s for part in samples])
    finished = max(part.finished for part in samples)
    return LevelResult(
        label=plan.label,
        mode=plan.mode,
        concurrency=plan.concurrency,
        rate=plan.rate,
        elapsed_s=max(finished - measure, 0.0),
        ok=int(latencies.size),
        errors=dict(sorted(errors.items())),
        scheduled=sum(part.scheduled for part in samples),
        rows_per_request=rows,
        latency=LatencySummary.of(latencies),
        client_cpu_s=sum(part.client_cpu_s for part in samples),
        max_send_lag_ms=max(part.max_send_lag_s for part in samples) * 1000.0,
    )


def fetch_metadata(
    target: str,
    model: str,
    version: str = "",
    timeout_s: float = 30.0,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> pb.ModelMetadataResponse:
    """The model's inputs. Raises CannotConnect when nothing answers at `target` within
    `connect_timeout_s`, rather than waiting out the whole deadline."""
    with InferenceClient(target, timeout=timeout_s, connect_timeout=connect_timeout_s) as client:
        return client.metadata(model, version)


class _Progress:
    """A tqdm bar per level, fed from the engine's counters (it never touches the
    hot path: it polls a few times a second)."""

    def __init__(self, engine: Engine, config: SweepConfig, enabled: bool) -> None:
        self._engine = engine
        self._config = config
        self._enabled = enabled

    async def follow(self, label: str, measure: float) -> None:
        config = self._config
        by_count = config.requests is not None
        bar = tqdm(
            total=config.requests if by_count else config.duration_s,
            desc=f"{label} warm-up" if config.warmup_s else label,
            unit="req" if by_count else "s",
            leave=False,
            file=sys.stderr,
            disable=not self._enabled,
            bar_format="{desc} |{bar}| {percentage:3.0f}%",
        )
        warming = bool(config.warmup_s)
        try:
            while True:
                await asyncio.sleep(PROGRESS_INTERVAL_S)
                now = time.monotonic()
                if warming and now >= measure:
                    warming = False
                done = sum(self._engine.progress)
                elapsed = max(now - measure, 0.0)
                bar.n = done if by_count else min(elapsed, config.duration_s or 0.0)
                rate = done / elapsed if elapsed > 0 else 0.0
                stage = " warm-up" if warming else ""
                bar.set_description_str(
                    f"{label}{stage}: {done} req, {rate:.0f} req/s", refresh=False
                )
                bar.refresh()
        finally:
            bar.close()


async def _read_cpu_at(probe: ServerCpuProbe, moment: float) -> float:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    return await probe.read()


async def sweep(
    config: SweepConfig,
    payload: Payload,
    progress: bool = False,
    on_level: Callable[[LevelResult], None] | None = None,
) -> list[LevelResult]:
    """Runs every level in order; returns one result per level."""
    probe = ServerCpuProbe(config.metrics_url) if config.metrics_url else None
    if probe is not None:
        await probe.read()  # fail before any load if the endpoint is wrong
    engine = await connect_engine(config.target, payload.message, config.processes, config.channels)
    bar = _Progress(engine, config, progress)
    results = []
    try:
        for plan in config.levels:
            slack = PROCESS_START_SLACK_S if engine.processes > 1 else 0.0
            start = time.monotonic() + slack
            shares = plan_shares(plan, config, engine.processes, start)
            measure = shares[0].measure
            cpu_before = asyncio.ensure_future(_read_cpu_at(probe, measure)) if probe else None
            follower = asyncio.ensure_future(bar.follow(plan.label, measure))
            # In process mode this process's own CPU (coordination) counts as client CPU.
            own_cpu = time.process_time()
            try:
                samples = await engine.run(shares)
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            own_cpu = time.process_time() - own_cpu
            result = merge(plan, samples, measure, payload.rows)
            if engine.processes > 1:
                result = replace(result, client_cpu_s=result.client_cpu_s + own_cpu)
            if cpu_before is not None and probe is not None:
                try:
                    server_cpu = await probe.read() - await cpu_before
                    result = replace(result, server_cpu_s=server_cpu)
                except MetricsError as exc:
                    result = replace(result, extra={"metrics_error": str(exc)})
            results.append(result)
            if on_level is not None:
                on_level(result)
    finally:
        await engine.close()
    return results


def run_sweep(
    config: SweepConfig,
    payload: Payload,
    progress: bool = False,
    on_level: Callable[[LevelResult], None] | None = None,
) -> list[LevelResult]:
    return asyncio.run(sweep(config, payload, progress, on_level))
