"""PyTriton beside modelplane's inference service, start after start in the same minutes:
the anchor of the stability issue (#19).

That issue's target (over 5 starts, c=64 throughput, c=64 server CPU per request and c=1
p50 each within max/min 1.10) came with PyTriton's own spread, measured beside ours with
the same generator. This kind of VM changes speed by 1.2-2x for minutes at a time, so a
spread taken alone measures the machine as much as the server. Here each server is
started `--starts` times in pairs (PyTriton then modelplane, then the other way round, so
a drift favours neither), every start loaded like the stability scenario of
`make bench` (heavy MLP, one row a request, c=1 then c=64, the same generator); it prints
both servers' starts and spreads side by side and, pair by pair, ours against PyTriton's
in the same minute.

PyTriton is nvidia-pytriton 0.7.0 (Triton 2.51, the model in ONNX Runtime inside
PyTriton's Python callable, Triton's dynamic batcher, max_batch_size 64, otherwise
defaults: pytriton_server.py). It runs in a venv of its own, made on first use under the
temp directory (it needs PyPI), so nothing of it enters the project's venv. Its server CPU
is that of its whole process tree. Not part of `make bench`.
Usage: .venv/bin/python bench/compare/triton_stability.py [--starts 5] [--duration 5]
       [--workers N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from modelplane.kernel import grpc_defaults
from modelplane.loadtest import starts
from modelplane.loadtest.scenarios import Served, inference_command, measure, serving
from modelplane.loadtest.stats import LevelResult

PACKAGES = ["nvidia-pytriton==0.7.0", "onnxruntime", "numpy<2", "prometheus-client", "psutil"]
VENV = Path(tempfile.gettempdir()) / "modelplane-pytriton-0.7"
SERVER = Path(__file__).with_name("pytriton_server.py")
LEVELS = (1, 64)
Start = dict[str, LevelResult]


def pytriton_python() -> Path:
    """PyTriton's venv (made on first use from this interpreter's base Python)."""
    python = VENV / "bin" / "python"
    done = VENV / ".installed"
    if not done.exists():
        print(f"making PyTriton's venv in {VENV} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
        done.touch()
    return python


def pytriton_env() -> dict[str, str]:
    """Triton's Python backend stub loads libpython3.X.so by name: point it at the one of
    the Python the venv was made from. Found in the system's library path instead, a
    libpython of another patch release meets this Python's standard library and PyTriton's
    model fails to load (multiprocessing's resource tracker: no `_recursion_count`). No
    GRPC_EXPERIMENTS: they are modelplane's settings, not Triton's."""
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    paths = [str(sysconfig.get_config_var("LIBDIR") or ""), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(path for path in paths if path)
    return env


def load(served: Served, args: argparse.Namespace) -> Start:
    """One start's figures: c=1, then c=64 (over 16 connections with --workers)."""
    results: Start = {}
    for concurrency in LEVELS:
        channels = starts.generator_channels(args.workers, concurrency)
        levels, _size = measure(
            served, starts.MODEL, starts.levels(concurrency), args.duration, args, channels
        )
        results[f"c={concurrency}"] = levels[0]
    return results


def start_and_load(
    name: str,
    command: list[str],
    env: dict[str, str] | None,
    tmp: Path,
    index: int,
    args: argparse.Namespace,
) -> Start:
    """One start, loaded; a server that does not come up is started once more (one
    PyTriton start in 15 here did not within 2 minutes)."""
    for attempt in (1, 2):
        try:
            with serving(command, tmp / f"{name}-{index}-{attempt}.log", env) as served:
                return load(served, args)
        except RuntimeError as exc:
            if attempt == 2:
                raise
            print(f"   start {index + 1}: {name} did not start ({exc}); once more", file=sys.stderr)
    raise AssertionError("unreachable")


def generator_us(level: LevelResult) -> float:
    """The load generator's CPU per request: the same work in every start of one server,
    so it tracks the machine's speed in the same seconds. Not between the two servers:
    their replies come in other sizes and rhythms (at c=64 it was ~1.3x as much against
    modelplane, ~2x against two workers over 16 connections)."""
    return level.client_cpu_s / max(level.completed, 1) * 1e6


def print_starts(runs: dict[str, list[Start]]) -> None:
    print(
        f"\n{'start':>5}  {'server':<10}  {'c=1 req/s':>9}  {'c=1 p50':>8}  {'c=1 µs/req':>10}  "
        f"{'c=64 req/s':>10}  {'c=64 p99':>8}  {'c=64 µs/req':>11}  {'generator':>9}"
    )
    for index in range(len(runs["modelplane"])):
        for name, series in runs.items():
            one, many = series[index]["c=1"], series[index]["c=64"]
            print(
                f"{index + 1:>5}  {name:<10}  {one.throughput_rps:>9.0f}  "
                f"{one.latency.p50_ms:>6.2f}ms  {one.server_cpu_us_per_request or 0:>10.0f}  "
                f"{many.throughput_rps:>10.0f}  {many.latency.p99_ms:>6.1f}ms  "
                f"{many.server_cpu_us_per_request or 0:>11.0f}  {generator_us(many):>7.0f}µs"
            )
    print("   (generator: the load generator's CPU per request at c=64, the machine's speed)")


FIGURES = (
    ("c=64 throughput", lambda s: s["c=64"].throughput_rps),
    ("c=64 server CPU/request", lambda s: s["c=64"].server_cpu_us_per_request or 0.0),
    ("c=1 p50", lambda s: s["c=1"].latency.p50_ms),
)


def print_spreads(runs: dict[str, list[Start]]) -> None:
    ours, anchor = runs["modelplane"], runs["pytriton"]
    print("\nspread over starts (max/min, CV) and, pair by pair, modelplane / PyTriton:")
    for label, figure in FIGURES:
        mine = [figure(s) for s in ours]
        theirs = [figure(s) for s in anchor]
        ratios = [a / b for a, b in zip(mine, theirs, strict=True) if b > 0]
        (m_ratio, m_cv), (t_ratio, t_cv) = starts.spread(mine), starts.spread(theirs)
        print(
            f"   {label}: modelplane {m_ratio:.2f} ({m_cv * 100:.1f}%), PyTriton "
            f"{t_ratio:.2f} ({t_cv * 100:.1f}%); modelplane / PyTriton in the same minute "
            f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f}, "
            f"max/min {starts.spread(ratios)[0]:.2f})"
        )
    print(
        "   (the target, <= 1.10 max/min on each, holds against the machine when "
        "modelplane's spread is no wider than PyTriton's in the same minutes)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--starts", type=int, default=5, help="starts of each server")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="modelplane's --workers (c=64 then comes over 16 connections, to both servers)",
    )
    args = parser.parse_args()
    args.processes = 1  # the generator as the stability scenario runs it
    grpc_defaults.apply()
    python = pytriton_python()
    with tempfile.TemporaryDirectory(prefix="modelplane-triton-stability-") as temp:
        tmp = Path(temp)
        repository = starts.write_default_repository(tmp / "models")
        model = repository / starts.MODEL / "1" / "model.onnx"
        commands = {
            "pytriton": ([str(python), str(SERVER), starts.MODEL, str(model)], pytriton_env()),
            "modelplane": (inference_command(repository, args.workers), None),
        }
        print(
            f"== stability beside PyTriton: {args.starts} starts of each, in pairs, the heavy "
            f"MLP at c=1 then c=64, {args.duration:g}s per level, {os.cpu_count()} CPUs"
            + (f"; modelplane with --workers {args.workers}" if args.workers > 1 else "")
        )
        runs: dict[str, list[Start]] = {"pytriton": [], "modelplane": []}
        for index in range(args.starts):
            order = ["pytriton", "modelplane"] if index % 2 == 0 else ["modelplane", "pytriton"]
            for name in order:
                runs[name].append(start_and_load(name, *commands[name], tmp, index, args))
                print(f"   start {index + 1}: {name} done", file=sys.stderr, flush=True)
        print_starts(runs)
        print_spreads(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
