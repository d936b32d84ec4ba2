"""`make chaos`: runs the scenarios MODELPLANE_CHAOS_SCENARIOS names (config.py) and
prints one table. Each scenario starts its own service processes on 127.0.0.1 with a
temporary data directory and stops them; a scenario that fails outright becomes a row
saying so, and the others still run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from modelplane.kernel import grpc_defaults
from modelplane.loadtest.chaos.config import WRITE_SERVICES, ChaosConfig
from modelplane.loadtest.chaos.crash import run_kill
from modelplane.loadtest.chaos.drain import run_term
from modelplane.loadtest.chaos.overload import run_overload
from modelplane.loadtest.chaos.slow_clients import run_slow_clients
from modelplane.loadtest.chaos.table import ScenarioRow, render_table

LEGEND = (
    "sent/accepted/rejected/failed: the harness's calls (slow clients: the normal "
    "client's); rejected = RESOURCE_EXHAUSTED or UNAVAILABLE, failed = any other "
    "error; ack-lost: acknowledged writes missing afterwards; RSS of the service "
    "before the fault > at the end (kill, term: the restarted process); recover: "
    "overload: until a probe is answered at normal latency; slow: after the slow calls "
    "are cancelled; kill, term: from the restart until a call succeeds"
)


def plan(config: ChaosConfig) -> list[tuple[str, Callable[[Path], Awaitable[ScenarioRow]]]]:
    steps: list[tuple[str, Callable[[Path], Awaitable[ScenarioRow]]]] = []
    services = config.services
    if "overload" in config.scenarios and "inference" in services:
        for factor in (float(f) for f in config.overload_factors.split(",") if f.strip()):
            at = replace(config, overload_factor=factor)
            steps.append((f"overload {factor:g}x: inference", partial(run_overload, config=at)))
    for scenario, runner, names in (
        ("slow", run_slow_clients, services),
        ("kill", run_kill, [s for s in services if s in WRITE_SERVICES]),
        ("term", run_term, services),
    ):
        if scenario not in config.scenarios:
            continue
        for name in names:
            steps.append(
                (f"{scenario}: {name}", lambda root, r=runner, n=name: r(root, n, config))  # type: ignore[misc]
            )
    return steps


async def run(config: ChaosConfig, root: Path, progress: bool = True) -> list[ScenarioRow]:
    rows = []
    for title, step in plan(config):
        started = time.monotonic()
        if progress:
            print(f"-- {title} ...", file=sys.stderr, flush=True)
        try:
            row = await step(root)
        except Exception as exc:  # one broken scenario must not hide the others
            traceback.print_exc(file=sys.stderr)
            row = ScenarioRow(title, notes=[f"scenario failed: {type(exc).__name__}: {exc}"])
        if progress:
            print(f"   {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--keep", type=Path, help="keep data directories, logs and ack ledgers in this folder"
    )
    args = parser.parse_args(argv)
    grpc_defaults.apply()
    config = ChaosConfig.from_env()
    started = time.monotonic()
    print(
        f"== chaos: scenarios {', '.join(config.scenarios)}; services "
        f"{', '.join(config.services)}; {os.cpu_count()} CPUs; every server on 127.0.0.1",
        flush=True,
    )
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = asyncio.run(run(config, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="modelplane-chaos-") as temp:
            rows = asyncio.run(run(config, Path(temp)))
    print()
    print(render_table(rows))
    print(f"\n({LEGEND})")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"(chaos took {time.monotonic() - started:.0f} s; load average at the end {load})")
    return 0
