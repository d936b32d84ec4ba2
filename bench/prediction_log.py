"""Prediction logging on vs off: the light MLP (batched, as bench/inference.py serves
it) behind two `modelplane serve inference` processes, one logging every prediction to a
`modelplane serve monitoring` process (`--monitoring`), one not; the same closed-loop
load on each, in alternation (the machine is shared: drift between runs a minute apart
is larger than the difference looked for). Prints per round and as medians: c=64
throughput and server CPU per request, c=1 p50/p99; the on/off throughput ratio
against the issue's target (>= 0.95x); and what the log did (records sent, dropped,
stored by monitoring). `make bench` runs it; it prints, never asserts.

The servers share this machine's cores with the load generator, and in production
monitoring runs elsewhere: so the comparison runs twice, against the real monitoring
service (the whole system on this machine, its storage included) and against a sink
that parses each LogPredictions call and acknowledges it without storing anything
(what logging costs inference itself). Server CPU per request is the steadier figure.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from modelplane.client.monitoring import MonitoringClient  # noqa: E402
from modelplane.kernel.server import AioServiceServer  # noqa: E402
from modelplane.loadtest import LevelPlan, LevelResult  # noqa: E402
from modelplane.loadtest.scenarios import (  # noqa: E402
    Served,
    inference_command,
    measure,
    model_specs,
    serving,
    write_repository,
)
from modelplane.loadtest.stats import percentile  # noqa: E402
from modelplane.monitoring.v1 import monitoring_pb2 as mpb  # noqa: E402
from modelplane.monitoring.v1 import monitoring_pb2_grpc as mpb_grpc  # noqa: E402
from modelplane.services.monitoring.main import Settings as MonitoringSettings  # noqa: E402

MODEL = "light_batched"


class SinkServicer(mpb_grpc.MonitoringServiceServicer):
    """Acknowledges every record as new, storing nothing."""

    async def LogPredictions(
        self, request: mpb.LogPredictionsRequest, context: grpc.aio.ServicerContext
    ) -> mpb.LogPredictionsResponse:
        return mpb.LogPredictionsResponse(stored=sum(len(b.request_ids) for b in request.batches))


def serve_sink() -> int:
    """The sink as a process: the kernel's server, port 0, a `serving` line on stdout."""
    settings = MonitoringSettings(port=0, metrics_port=0, log_level="WARNING")
    server = AioServiceServer(
        settings,
        "monitoring-sink",
        [mpb.DESCRIPTOR.services_by_name["MonitoringService"].full_name],
        lambda s: mpb_grpc.add_MonitoringServiceServicer_to_server(SinkServicer(), s),
    )
    server.run()
    return 0


def sink_command() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve-sink"]


def monitoring_command(data: Path) -> list[str]:
    return [
        sys.executable, "-m", "modelplane.cli.main", "serve", "monitoring", "--port", "0",
        "--metrics-port", "0", "--data-dir", str(data), "--log-level", "WARNING",
    ]  # fmt: skip


def metric_total(served: Served, name: str, **labels: str) -> float:
    """Sum of a metric's samples (matching `labels`) on a server's /metrics."""
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@dataclass
class Comparison:
    """Medians of the alternated rounds, and what the log did."""

    median: dict[str, dict[str, float]]
    sent: float
    dropped: float
    stored: int | None
    monitoring_cpu_us: float
    """The monitoring side's CPU (all of it, idle time included) per record sent."""


def compare(args: argparse.Namespace, tmp: Path, monitoring: Served, storing: bool) -> Comparison:
    """Alternated rounds of logging off and on against one monitoring endpoint."""
    on_command = [*inference_command(tmp / "models"), "--monitoring", monitoring.address]
    with (
        serving(inference_command(tmp / "models"), tmp / "off.log") as off,
        serving(on_command, tmp / "on.log") as on,
    ):
        servers = {"off": off, "on": on}
        c64: dict[str, list[LevelResult]] = {"off": [], "on": []}
        c1: dict[str, list[LevelResult]] = {"off": [], "on": []}
        monitoring_cpu_s = metric_total(monitoring, "process_cpu_seconds_total")
        print(f"{'round':>5}  {'log':>3}  {'c=64 req/s':>10}  {'cpu µs/req':>10}  "
              f"{'c=1 p50 ms':>10}  {'c=1 p99 ms':>10}")  # fmt: skip
        for round_ in range(1, args.rounds + 1):
            # Alternate which goes first, so neither always follows the other.
            for mode in ["off", "on"] if round_ % 2 else ["on", "off"]:
                (level64,), _ = measure(
                    servers[mode], MODEL, [LevelPlan(concurrency=64)], args.duration, args
                )
                (level1,), _ = measure(
                    servers[mode], MODEL, [LevelPlan(concurrency=1)], args.duration, args
                )
                c64[mode].append(level64)
                c1[mode].append(level1)
                cpu = level64.server_cpu_us_per_request
                print(
                    f"{round_:>5}  {mode:>3}  {level64.throughput_rps:>10.0f}  "
                    f"{cpu if cpu is not None else float('nan'):>10.0f}  "
                    f"{level1.latency.p50_ms:>10.3f}  {level1.latency.p99_ms:>10.3f}",
                    flush=True,
                )
        stored: int | None = None
        # The last records reach monitoring within the log's interval.
        deadline = time.monotonic() + 10
        with MonitoringClient(monitoring.address, timeout=30) as client:
            while True:
                sent = metric_total(on, "modelplane_inference_prediction_log_sent_total")
                dropped = metric_total(on, "modelplane_inference_prediction_log_dropped_total")
                queued = metric_total(on, "modelplane_inference_prediction_log_queued_rows")
                if storing:
                    stored = client.summary(MODEL).count
                if (queued == 0 and stored in (None, sent)) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)  # ok-sleep: polling until the last batch is acknowledged
        monitoring_cpu_s = metric_total(monitoring, "process_cpu_seconds_total") - monitoring_cpu_s
    median = {
        mode: {
            "rps": percentile([lv.throughput_rps for lv in c64[mode]], 50),
            "cpu": percentile([lv.server_cpu_us_per_request or 0.0 for lv in c64[mode]], 50),
            "p50": percentile([lv.latency.p50_ms for lv in c1[mode]], 50),
            "p99": percentile([lv.latency.p99_ms for lv in c1[mode]], 50),
        }
        for mode in ("off", "on")
    }
    return Comparison(median, sent, dropped, stored, monitoring_cpu_s * 1e6 / max(sent, 1))


def report(title: str, result: Comparison) -> None:
    median = result.median
    ratio = median["on"]["rps"] / max(median["off"]["rps"], 1e-9)
    print(f"-- medians, {title}")
    for mode in ("off", "on"):
        m = median[mode]
        print(
            f"   log {mode:>3}: c=64 {m['rps']:.0f} req/s, server CPU {m['cpu']:.0f} µs/req; "
            f"c=1 p50 {m['p50']:.3f} ms, p99 {m['p99']:.3f} ms"
        )
    verdict = "PASS" if ratio >= 0.95 else "MISS"
    print(f"   throughput on/off at c=64: {ratio:.3f}x (target >= 0.95x)  {verdict}")
    print(
        f"   server CPU on-off at c=64: {median['on']['cpu'] - median['off']['cpu']:+.0f} µs/req; "
        f"c=1 p50 on/off {median['on']['p50'] / max(median['off']['p50'], 1e-9):.3f}x, "
        f"p99 on/off {median['on']['p99'] / max(median['off']['p99'], 1e-9):.3f}x"
    )
    stored = "" if result.stored is None else f"; monitoring stored {result.stored:,}"
    print(
        f"   log: {result.sent:,.0f} records sent, {result.dropped:,.0f} dropped{stored}; "
        f"the monitoring side's CPU {result.monitoring_cpu_us:.0f} µs per record"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level")
    parser.add_argument("--rounds", type=int, default=3, help="on/off alternations")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink:
        return serve_sink()
    started = time.monotonic()
    spec = next(s for s in model_specs() if s.name == MODEL)
    print(
        f"== prediction log on vs off: {MODEL}, closed loop, single-row requests, "
        f"{args.duration:g}s per level after {args.warmup:g}s warm-up, {args.rounds} "
        "alternated rounds; log settings: the defaults"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-log-") as tmp_name:
        tmp = Path(tmp_name)
        write_repository(tmp / "models", [spec])
        print("\n-- against the monitoring service (SQLite, on this machine)")
        with serving(monitoring_command(tmp / "monitoring"), tmp / "monitoring.log") as mon:
            results["monitoring"] = compare(args, tmp, mon, storing=True)
        print("\n-- against a sink that acknowledges without storing (inference's own cost)")
        with serving(sink_command(), tmp / "sink.log") as sink:
            results["sink"] = compare(args, tmp, sink, storing=False)
    print()
    report("against the monitoring service", results["monitoring"])
    report("against the sink", results["sink"])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"\n(bench took {time.monotonic() - started:.0f}s on {os.cpu_count()} CPUs; "
        f"load average at the end {load})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
