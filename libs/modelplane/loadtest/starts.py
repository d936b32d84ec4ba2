"""Two inference bench scenarios about processes (`make bench` runs them after the
standard ones, see scenarios.py):

- **stability**: the heavy MLP with the server's default settings (no config.pbtxt),
  started N times (`--starts`, or MODELPLANE_BENCH_STARTS; default 5), each start loaded
  at c=1 and c=64; prints each start's figures and their spread (max/min and coefficient
  of variation) of throughput, server CPU per request and c=1 p50. A figure that a start
  decides shows as spread here, not within one run.
- **workers**: the same model at c=64 served by `--workers 1` and `--workers 2`.

The machine is shared, so each start also prints what else happened while it was
measured: the CPU other processes in this machine took (its busy time minus this
bench's and the server's), the time the hypervisor gave this machine's CPUs to someone
else (steal), and a ruler: ONNX Runtime's CPU per row for a batch of 32 rows on one
thread, timed in this process just before the start. A start that ran beside other work,
or while the ruler ran slow (caches and memory shared with other machines), is slow for
that reason, not its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from modelplane.examples.models import HEAVY_MLP, mlp, write_model
from modelplane.loadtest.server_cpu import read_cpu_seconds
from modelplane.loadtest.stats import LevelResult
from modelplane.loadtest.sweep import LevelPlan

MODEL = "heavy"
STARTS_ENV = "MODELPLANE_BENCH_STARTS"
# Connections the generator opens for the workers scenario: SO_REUSEPORT hands each
# connection to one worker, so one connection would load one worker only.
WORKER_CHANNELS = 16


def default_starts() -> int:
    return int(os.environ.get(STARTS_ENV, "5"))


def write_default_repository(root: Path) -> Path:
    """The heavy MLP with no config.pbtxt: what the server does by default (written once:
    the stability and workers scenarios share it)."""
    if not (root / MODEL).is_dir():
        write_model(mlp(HEAVY_MLP, seed=1, name=MODEL), root, MODEL)
    return root


def generator_channels(workers: int, concurrency: int) -> int:
    """Connections the generator opens: one, or WORKER_CHANNELS to load several workers
    (the kernel hands each connection to one) at more than one caller."""
    return WORKER_CHANNELS if workers > 1 and concurrency > 1 else 1


def _cpu_seconds() -> tuple[float, float]:
    """(busy, stolen): CPU time this machine's CPUs spent running something (user,
    nice, system, irq, softirq), and time its hypervisor gave them to another machine."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]] + [0] * 8
    tick = os.sysconf("SC_CLK_TCK")
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / tick, fields[7] / tick


def ruler_us_per_row(model: Path, seconds: float = 0.5, rows: int = 32) -> float:
    """ONNX Runtime's CPU per row for `model` (one thread, `rows` rows a call), in this
    process: how fast the machine computes at the moment."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    width = int(session.get_inputs()[0].shape[1])
    feeds = {name: np.zeros((rows, width), np.float32)}
    for _ in range(3):
        session.run(None, feeds)
    calls = 0
    cpu = time.thread_time()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        session.run(None, feeds)
        calls += 1
    return (time.thread_time() - cpu) / (calls * rows) * 1e6


@dataclass(frozen=True)
class Batches:
    """The batches one run formed (the server's batch_size and compute_seconds metrics)."""

    mean_rows: float
    mean_compute_us: float
    """Wall time of one batch on its runtime thread: stack, run the model, split."""


@dataclass(frozen=True)
class ThreadTimes:
    """Where a server process's CPU went during one run, by thread (from /proc)."""

    loop_s: float
    """The main thread: the event loop."""
    serving_s: float
    """The other threads on the event loop's CPUs (gRPC's poller and the like)."""
    compute_s: float
    """The threads placed on other CPUs: the batch threads and ONNX Runtime's pools."""
    loop_preempted: int
    """Times the event loop was switched out while it could have run on."""


_Thread = tuple[float, int, frozenset[int]]


def read_threads(pid: int) -> dict[int, _Thread]:
    """Each thread of `pid`: (CPU seconds, involuntary context switches, CPUs allowed);
    threads that end meanwhile are left out."""
    tick = os.sysconf("SC_CLK_TCK")
    threads: dict[int, _Thread] = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                text = status.read()
            switched = int(text.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            cpus = frozenset(os.sched_getaffinity(tid))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        threads[tid] = ((int(fields[11]) + int(fields[12])) / tick, switched, cpus)
    return threads


def thread_times(pid: int, before: dict[int, _Thread], after: dict[int, _Thread]) -> ThreadTimes:
    loop_cpus = after[pid][2] if pid in after else frozenset()
    loop = serving = compute = 0.0
    preempted = 0
    for tid, (cpu, switched, cpus) in after.items():
        first_cpu, first_switched, _ = before.get(tid, (0.0, 0, cpus))
        spent = cpu - first_cpu
        if tid == pid:
            loop, preempted = spent, switched - first_switched
        elif cpus == loop_cpus:
            serving += spent
        else:
            compute += spent
    return ThreadTimes(loop, serving, compute, preempted)


@dataclass(frozen=True)
class Measured:
    levels: dict[str, LevelResult]
    others_cores: float
    """CPU other processes took meanwhile (busy CPU minus the bench's and the server's)."""
    batches: list[Batches]
    """Per run, in order."""
    steal_cores: float = 0.0
    """CPU time the hypervisor gave to other machines meanwhile."""
    ruler_us: float | None = None
    """`ruler_us_per_row` just before."""
    threads: list[ThreadTimes] | None = None
    """Per run, in order (when the server's pid was given)."""

    @property
    def one_row_us(self) -> float:
        """The model's time for a batch of one row in the first run (c=1)."""
        return self.batches[0].mean_compute_us if self.batches else 0.0

    @property
    def disturbed(self) -> float:
        return self.others_cores + self.steal_cores

    @property
    def mean_batch(self) -> float:
        return self.batches[-1].mean_rows if self.batches else 0.0


_BATCH_METRICS = (
    "modelplane_inference_batch_size_count",
    "modelplane_inference_batch_size_sum",
    "modelplane_inference_compute_seconds_sum",
)


def _batch_counters(metrics_url: str) -> list[float]:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in _BATCH_METRICS
    ]
    return [sum(s.value for s in samples if s.name == name) for name in _BATCH_METRICS]


def measure_with_noise(
    metrics_url: str, runs: Sequence[Callable[[], list[LevelResult]]], pid: int = 0
) -> Measured:
    """Runs `runs` one after another against one server, noting each run's batches and,
    given the server's `pid`, its threads' CPU."""
    (busy, stolen), own = _cpu_seconds(), time.process_time()
    server = read_cpu_seconds(metrics_url)
    started = time.monotonic()
    results: list[LevelResult] = []
    batches: list[Batches] = []
    threads: list[ThreadTimes] = []
    for run in runs:
        before = _batch_counters(metrics_url)
        first_threads = read_threads(pid) if pid else {}
        results += run()
        if pid:
            threads.append(thread_times(pid, first_threads, read_threads(pid)))
        count, rows, compute_s = (
            after - first for after, first in zip(_batch_counters(metrics_url), before, strict=True)
        )
        batches.append(
            Batches(rows / count if count else 0.0, compute_s / count * 1e6 if count else 0.0)
        )
    wall = time.monotonic() - started
    server = read_cpu_seconds(metrics_url) - server
    busy_after, stolen_after = _cpu_seconds()
    others = (busy_after - busy - (time.process_time() - own) - server) / wall
    return Measured(
        {level.label: level for level in results},
        max(others, 0.0),
        batches,
        steal_cores=(stolen_after - stolen) / wall,
        threads=threads if pid else None,
    )


def spread(values: Sequence[float]) -> tuple[float, float]:
    """max/min and the coefficient of variation (population standard deviation / mean)."""
    if not values or min(values) <= 0:
        return float("nan"), float("nan")
    return max(values) / min(values), statistics.pstdev(values) / statistics.fmean(values)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_stability(
    starts: Sequence[Measured], floor_c1: float | None = None, floor_c64: float | None = None
) -> None:
    """Each start's figures, then the spread of the ones issue 19 sets targets for, with
    the transport floor's CPU per request at both levels when given."""
    print(
        f"\n{'start':>5}  {'c=1 req/s':>9}  {'c=1 p50':>8}  {'c=1 µs/req':>10}  "
        f"{'c=64 req/s':>10}  {'c=64 p99':>8}  {'c=64 µs/req':>11}  {'batch':>5}  "
        f"{'1 row':>5}  {'others':>6}  {'steal':>5}  {'ruler':>5}"
    )
    for index, start in enumerate(starts, 1):
        one, many = start.levels["c=1"], start.levels["c=64"]
        print(
            f"{index:>5}  {one.throughput_rps:>9.0f}  {one.latency.p50_ms:>6.2f}ms  "
            f"{one.server_cpu_us_per_request or 0:>10.0f}  {many.throughput_rps:>10.0f}  "
            f"{many.latency.p99_ms:>6.1f}ms  {many.server_cpu_us_per_request or 0:>11.0f}  "
            f"{start.mean_batch:>5.1f}  {start.one_row_us:>5.0f}  "
            f"{start.others_cores:>6.2f}  {start.steal_cores:>5.2f}  "
            f"{start.ruler_us or 0:>5.0f}"
        )
    print(
        "   (batch: mean rows per batch at c=64; 1 row: µs the model took for one row at "
        "c=1, on the server's runtime thread; others, steal: CPUs' worth of time other "
        "processes here, and other machines, took while the start was measured; ruler: "
        "µs of CPU per row of the model in this process, batches of 32, one thread)"
    )
    rps = [s.levels["c=64"].throughput_rps for s in starts]
    cpu = [s.levels["c=64"].server_cpu_us_per_request or 0.0 for s in starts]
    p50 = [s.levels["c=1"].latency.p50_ms for s in starts]
    cpu1 = [s.levels["c=1"].server_cpu_us_per_request or 0.0 for s in starts]
    for label, values, unit in (
        ("c=64 throughput", rps, "req/s"),
        ("c=64 server CPU/request", cpu, "µs"),
        ("c=1 p50", p50, "ms"),
        ("c=1 server CPU/request", cpu1, "µs"),
    ):
        ratio, cv = spread(values)
        target = "" if "c=1 server" in label else f" (target <= 1.10)  {_verdict(ratio <= 1.10)}"
        print(
            f"   {label}: {min(values):.4g}-{max(values):.4g} {unit}, max/min {ratio:.2f}, "
            f"CV {cv * 100:.1f}%{target}"
        )
    print_adjusted(starts)
    floor = f" (this machine's floor at c=64: {floor_c64:.0f} µs)" if floor_c64 is not None else ""
    print(
        f"   at or above the issue's best start: c=64 >= 2400 req/s in every start "
        f"{_verdict(min(rps) >= 2400)}, <= 500 µs/request {_verdict(max(cpu) <= 500)}"
        f"{floor}, c=1 p50 <= 1.45 ms {_verdict(max(p50) <= 1.45)}"
    )
    if floor_c1 is not None:
        one_row = statistics.median(s.one_row_us for s in starts)
        rest = statistics.median(cpu1) - floor_c1 - one_row
        print(
            f"   c=1 server CPU/request (median {statistics.median(cpu1):.0f} µs) = the floor "
            f"at c=1 ({floor_c1:.0f} µs: a ModelInfer doing no work, each request waking "
            f"the server's threads alone) + a batch of one row on its runtime thread "
            f"(median {one_row:.0f} µs) + the rest ({rest:.0f} µs: decoding, the batcher, "
            "the hand-offs to the runtime thread and back)"
        )
    quiet = [s for s in starts if s.disturbed < 0.1]
    if 1 < len(quiet) < len(starts):
        q_rps = [s.levels["c=64"].throughput_rps for s in quiet]
        q_cpu = [s.levels["c=64"].server_cpu_us_per_request or 0.0 for s in quiet]
        q_p50 = [s.levels["c=1"].latency.p50_ms for s in quiet]
        print(
            f"   the {len(quiet)} starts with others + steal under 0.1 CPU: max/min "
            f"{spread(q_rps)[0]:.2f} (c=64 throughput), {spread(q_cpu)[0]:.2f} (c=64 CPU/request), "
            f"{spread(q_p50)[0]:.2f} (c=1 p50)"
        )
    print_threads(starts)
    rulers = [s.ruler_us for s in starts if s.ruler_us]
    one_rows = [s.one_row_us for s in starts if s.one_row_us]
    if len(rulers) > 1 and len(one_rows) > 1:
        print(
            f"   the machine's own speed moved too: the ruler {spread(rulers)[0]:.2f}x and the "
            f"model's one-row time in the server {spread(one_rows)[0]:.2f}x (max/min) between "
            "starts"
        )


def print_adjusted(starts: Sequence[Measured]) -> None:
    """The spreads again, each start's figures divided by the machine's speed in the same
    seconds, read from the load generator: its CPU per request is the same work in every
    start, and on a shared VM it moved as much as the server's did (issue 19)."""

    def generator_us(start: Measured, label: str) -> float:
        return start.levels[label].client_cpu_us_per_request or 0.0

    if not all(generator_us(s, "c=64") > 0 and generator_us(s, "c=1") > 0 for s in starts):
        return
    work = [s.levels["c=64"].throughput_rps * generator_us(s, "c=64") for s in starts]
    cpu = [
        (s.levels["c=64"].server_cpu_us_per_request or 0.0) / generator_us(s, "c=64")
        for s in starts
    ]
    p50 = [s.levels["c=1"].latency.p50_ms / generator_us(s, "c=1") for s in starts]
    print(
        "   in the machine's speed at each start (the load generator's CPU per request, the "
        "same work every start, as the unit): max/min "
        f"{spread(work)[0]:.2f} (c=64 throughput), {spread(cpu)[0]:.2f} (c=64 server CPU/"
        f"request), {spread(p50)[0]:.2f} (c=1 p50); generator CPU/request "
        f"{spread([generator_us(s, 'c=64') for s in starts])[0]:.2f}x at c=64"
    )


def print_threads(starts: Sequence[Measured]) -> None:
    """Each start's c=64 CPU per request by thread: what differs between a fast start and
    a slow one (issue 19)."""
    if not all(s.threads and len(s.threads) == len(s.batches) for s in starts):
        return
    print(
        "   c=64 CPU per request by thread (µs): the event loop (and how often it was "
        "preempted), the other threads on its CPU, the batch and ONNX Runtime threads, the "
        "load generator"
    )
    for index, start in enumerate(starts, 1):
        level, threads = start.levels["c=64"], start.threads[-1]  # type: ignore[index]
        done = max(level.completed, 1)
        print(
            f"{index:>8}  loop {threads.loop_s / done * 1e6:>4.0f} "
            f"(preempted {threads.loop_preempted / done:.1f}/request)  "
            f"beside it {threads.serving_s / done * 1e6:>3.0f}  "
            f"compute {threads.compute_s / done * 1e6:>4.0f}  "
            f"generator {level.client_cpu_us_per_request or 0:>4.0f}"
        )


def print_workers(one: Measured, two: Measured, cpus: int) -> None:
    a, b = one.levels["c=64"], two.levels["c=64"]
    ratio = b.throughput_rps / max(a.throughput_rps, 1e-9)
    print(f"\n{'workers':>7}  {'req/s':>7}  {'p99':>8}  {'µs/req':>7}  {'batch':>5}  "
          f"{'server':>6}  {'generator':>9}  {'others':>6}  {'steal':>5}   "
          "(the last four in CPUs)")  # fmt: skip
    for count, level, measured in ((1, a, one), (2, b, two)):
        print(
            f"{count:>7}  {level.throughput_rps:>7.0f}  {level.latency.p99_ms:>6.1f}ms  "
            f"{level.server_cpu_us_per_request or 0:>7.0f}  {measured.mean_batch:>5.1f}  "
            f"{level.server_cpu_cores or 0:>6.2f}  {level.client_cpu_cores:>9.2f}  "
            f"{measured.others_cores:>6.2f}  {measured.steal_cores:>5.2f}"
        )
    busy = (a.server_cpu_cores or 0) + a.client_cpu_cores + one.disturbed
    print(
        f"   2 workers / 1 worker throughput: {ratio:.2f}x (target >= 1.6x)  "
        f"{_verdict(ratio >= 1.6)}; one worker, the generator, other processes and steal "
        f"already took {busy:.2f} of the machine's {cpus} CPUs"
    )


def stability_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--starts",
        type=int,
        default=default_starts(),
        help=f"starts of the stability scenario (default 5, or ${STARTS_ENV})",
    )
    parser.add_argument(
        "--stability-duration", type=float, default=5.0, help="seconds per level per start"
    )
    parser.add_argument(
        "--stability-workers",
        type=int,
        default=1,
        help="start the service with --workers N in the stability scenario (default 1); "
        f"with more, c=64 comes over {WORKER_CHANNELS} connections",
    )


def levels(*concurrency: int) -> list[LevelPlan]:
    return [LevelPlan(concurrency=c) for c in concurrency]
