"""PyTriton beside modelplane's inference service under the chaos overload, in the same
minutes: an anchor for the overload targets of the hardening issue (#17).

`make chaos` holds the inference service to targets at 2x and 5x its capacity (refusals
within 10 ms p99, accepted calls within 2x the at-capacity p99, no CANCELLED, recovery
within 1 s) on one CPU of this machine, the harness on the other. Whether one CPU can
refuse 4 calls for every one it serves depends on what a call costs the server, so here
Triton takes the same test: the same MLP (`MODELPLANE_CHAOS_OVERLOAD_LAYERS`), the same
harness and deadlines, each server at the factors of its own measured capacity, its
whole process tree on the same one CPU. Triton is set up for overload as an operator
would: its dynamic batcher (max_batch_size 64) with a queue policy refusing past
`--max-queue-size` requests (default one batch) or, if set, `--queue-timeout-us` in the
queue, ONNX Runtime on one thread. The pairs alternate which
server goes first, so a drift of the machine favours neither.

PyTriton is nvidia-pytriton 0.7.0 in a venv of its own (triton_stability.py makes it on
first use; it needs PyPI). Not part of `make bench` or `make chaos`.
Usage: .venv/bin/python bench/compare/triton_overload.py [--factors 2,5] [--pairs 1]
       [--servers pytriton,modelplane] [--max-queue-size 64] [--queue-timeout-us 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from triton_stability import SERVER, pytriton_env, pytriton_python

from modelplane.kernel import grpc_defaults
from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.overload import (
    OverloadTarget,
    drive_overload,
    overload_layers,
    placement,
    run_overload,
    split_cpus,
    write_heavy_repository,
)
from modelplane.loadtest.chaos.processes import rss_mb
from modelplane.loadtest.chaos.table import ScenarioRow, render_table
from modelplane.loadtest.chaos.workloads import HEAVY_MODEL
from modelplane.loadtest.scenarios import serving


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants (tritonserver, its Python stub)."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += rss_mb(current) if os.path.exists(f"/proc/{current}") else 0.0
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
    return total


@contextlib.contextmanager
def pytriton(
    model: Path, cpu: int | None, args: argparse.Namespace, log: Path
) -> Iterator[tuple[str, int]]:
    """PyTriton serving `model` as `heavy` (on `cpu`, children included); its address."""
    command = [
        str(pytriton_python()), str(SERVER), HEAVY_MODEL, str(model),
        "--max-queue-size", str(args.max_queue_size),
        "--queue-timeout-us", str(args.queue_timeout_us),
        "--threads", "1",
    ]  # fmt: skip
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    with serving(command, log, pytriton_env()) as served:
        yield served.address, served.pid


async def anchor_row(root: Path, config: ChaosConfig, args: argparse.Namespace) -> ScenarioRow:
    server_cpu, harness = split_cpus(config)
    model = root / "models" / HEAVY_MODEL / "1" / "model.onnx"
    with pytriton(model, server_cpu, args, root / "pytriton.log") as (address, pid):
        target = OverloadTarget(
            address,
            lambda: tree_rss_mb(pid),
            placement(server_cpu, harness, "server"),
            f"Triton's queue policy: UNAVAILABLE past {args.max_queue_size} requests queued"
            + (
                f" or {args.queue_timeout_us / 1e3:g} ms in the queue"
                if args.queue_timeout_us
                else ""
            )
            + ", ONNX Runtime on one thread",
        )
        return await drive_overload(target, config, harness, "PyTriton")


async def main_async(args: argparse.Namespace) -> int:
    base = ChaosConfig.from_env()
    factors = [float(part) for part in args.factors.split(",") if part.strip()]
    rows: list[ScenarioRow] = []
    with tempfile.TemporaryDirectory(prefix="modelplane-triton-overload-") as temp:
        root = Path(temp)
        write_heavy_repository(root / "models", overload_layers(base))
        for pair in range(args.pairs):
            for factor in factors:
                config = dataclasses.replace(base, overload_factor=factor)
                order = args.servers if pair % 2 == 0 else args.servers[::-1]
                for name in order:
                    print(f"   pair {pair + 1}, {factor:g}x: {name}", file=sys.stderr, flush=True)
                    if name == "pytriton":
                        rows.append(await anchor_row(root, config, args))
                    else:
                        rows.append(await run_overload(root, config))
    print(
        f"== overload beside PyTriton: the MLP {base.overload_layers}, one row a request, "
        f"factors {args.factors} of each server's own capacity, {args.pairs} pair(s), "
        f"{os.cpu_count()} CPUs"
    )
    print(render_table(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factors", default=ChaosConfig.overload_factors)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument(
        "--servers",
        type=lambda text: tuple(text.split(",")),
        default=("pytriton", "modelplane"),
        help="which to run, in the first pair's order (pytriton,modelplane)",
    )
    parser.add_argument(
        "--max-queue-size",
        type=int,
        default=64,
        help="Triton's queue bound in requests (default one batch: its best here)",
    )
    parser.add_argument(
        "--queue-timeout-us",
        type=int,
        default=0,
        help="Triton's queue timeout (0: none; with 100 ms and 128 queued, its timed-out "
        "refusals waited up to 0.6 s in the queue)",
    )
    args = parser.parse_args()
    grpc_defaults.apply()
    pytriton_python()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
