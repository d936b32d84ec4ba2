"""`modelplane loadtest`: load any KServe v2 gRPC endpoint and print what it sustains."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc

from modelplane.client.inference import CannotConnect
from modelplane.loadtest.engines import EngineError
from modelplane.loadtest.payload import PayloadError, build_payload
from modelplane.loadtest.report import (
    Report,
    format_comparison,
    format_table,
    load_report,
    write_report,
)
from modelplane.loadtest.server_cpu import MetricsError
from modelplane.loadtest.stats import LevelResult
from modelplane.loadtest.sweep import LevelPlan, SweepConfig, fetch_metadata, run_sweep

DESCRIPTION = """\
Send ModelInfer requests to a KServe v2 gRPC endpoint (modelplane, Triton, MLServer, ...)
and print throughput, p50/p90/p99 latency, errors by status code, and CPU per request.

Closed loop (default): --concurrency 1,8,64 runs one level per value, each with that many
requests in flight. Open loop: --rate 500,1000 sends on a schedule (Poisson or uniform
arrivals) whatever the server does; latency counts from the scheduled send time, so a
server that stalls cannot hide its queueing (no coordinated omission).

The request is built once from the model's metadata (random data of each input's
datatype and shape) and sent as pre-serialized bytes, so the generator stays cheap.
With --metrics-url the server's process_cpu_seconds_total is read before and after each
level to report server CPU per request (summed over every process the endpoint reports,
and over every endpoint of a comma-separated list); the generator's own CPU is reported
too.
"""

EPILOG = """\
examples:
  modelplane loadtest -m demo --concurrency 1,8,64 --duration 10
  modelplane loadtest -u 127.0.0.1:8001 -m demo --rate 1000,2000 --arrivals uniform \\
      --metrics-url 127.0.0.1:8002 --json run.json
  modelplane loadtest -m demo --concurrency 64 --compare run.json
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers, e.g. 1,8,64")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("give positive rates, e.g. 500,1000")
    return values


def _shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.split(",") if d.strip()] if sep else []
    except ValueError:
        shape = []
    if not name or not sep or not shape:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}")
    return name, shape


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    return parse


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "loadtest",
        help="load-test a KServe v2 gRPC endpoint (concurrency sweep or fixed rate)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("target")
    target.add_argument(
        "-u", "--url", default="127.0.0.1:8001", help="gRPC host:port (default %(default)s)"
    )
    target.add_argument("-m", "--model", required=True, help="model name")
    target.add_argument("--model-version", default="", help="version (default: latest ready)")
    target.add_argument(
        "--metrics-url",
        help="server's Prometheus endpoint (host:port or http://host:port/metrics) "
        "for server CPU per request; comma-separated endpoints are summed (one per "
        "server process)",
    )
    load = parser.add_argument_group("load")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument(
        "-c",
        "--concurrency",
        type=_int_list,
        help="closed loop: requests in flight per level, comma-separated (default 1,8,64)",
    )
    levels.add_argument(
        "-r", "--rate", type=_float_list, help="open loop: requests/s per level, comma-separated"
    )
    load.add_argument(
        "--arrivals",
        choices=("poisson", "uniform"),
        default="poisson",
        help="open-loop arrival process (default %(default)s)",
    )
    span = load.add_mutually_exclusive_group()
    span.add_argument(
        "-d", "--duration", type=_positive(float), help="seconds per level (default 10)"
    )
    span.add_argument("-n", "--requests", type=_positive(int), help="requests per level")
    load.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each level (default 1)"
    )
    load.add_argument(
        "--timeout", type=_positive(float), default=10.0, help="per-request deadline in seconds"
    )
    request = parser.add_argument_group("request")
    request.add_argument(
        "-b",
        "--batch-rows",
        type=_positive(int),
        default=1,
        help="rows per request (the leading -1 dimension); default 1",
    )
    request.add_argument(
        "--shape",
        type=_shape,
        action="append",
        default=[],
        metavar="NAME=D1,D2",
        help="full shape of an input with other variable dimensions (repeatable)",
    )
    request.add_argument("--seed", type=int, default=0, help="seed of the random input data")
    generator = parser.add_argument_group("generator")
    generator.add_argument(
        "-p",
        "--processes",
        type=_positive(int),
        default=1,
        help="generator processes; use 2 when one cannot keep the server busy (default 1)",
    )
    generator.add_argument(
        "--channels", type=_positive(int), default=1, help="gRPC connections per process"
    )
    generator.add_argument(
        "--max-outstanding",
        type=_positive(int),
        default=10_000,
        help="open loop: most requests in flight per process (default %(default)s)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    output.add_argument(
        "--compare", type=Path, metavar="FILE", help="print ratios to an earlier --json run"
    )
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    if args.rate:
        plans = [LevelPlan(rate=rate) for rate in args.rate]
    else:
        plans = [LevelPlan(concurrency=c) for c in (args.concurrency or [1, 8, 64])]
    baseline = None
    if args.compare is not None:
        try:
            baseline = load_report(args.compare)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: cannot read {args.compare}: {exc}", file=sys.stderr)
            return 2
    try:
        config = SweepConfig(
            target=args.url,
            levels=plans,
            duration_s=None if args.requests else (args.duration or 10.0),
            requests=args.requests,
            warmup_s=args.warmup,
            poisson=args.arrivals == "poisson",
            timeout_s=args.timeout,
            processes=args.processes,
            channels=args.channels,
            max_outstanding=args.max_outstanding,
            metrics_url=args.metrics_url,
            seed=args.seed,
        )
        metadata = fetch_metadata(args.url, args.model, args.model_version)
        payload = build_payload(
            metadata,
            batch_rows=args.batch_rows,
            model_version=args.model_version,
            shape_overrides=dict(args.shape),
            seed=args.seed,
        )
    except CannotConnect as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: model metadata from {args.url}: {exc.code().name}: {exc.details()}",
              file=sys.stderr)  # fmt: skip
        return 1
    except (PayloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{name}{list(shape)}" for name, shape in payload.shapes.items())
    print(
        f"{args.url} model {metadata.name} ({metadata.platform or 'unknown platform'}): "
        f"{shapes}, {payload.size} bytes per request"
    )
    show_progress = not args.quiet and sys.stderr.isatty()
    levels: list[LevelResult] = []
    try:
        run_sweep(config, payload, progress=show_progress, on_level=levels.append)
    except (EngineError, MetricsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; levels completed so far:", file=sys.stderr)
        print(format_table(levels))
        return 130
    print(format_table(levels))
    if baseline is not None:
        print(format_comparison(levels, baseline))
    if args.json is not None:
        report = Report(
            target=args.url,
            model=metadata.name,
            model_version=args.model_version,
            batch_rows=args.batch_rows,
            request_bytes=payload.size,
            settings={
                "mode": plans[0].mode,
                "duration_s": config.duration_s,
                "requests": config.requests,
                "warmup_s": config.warmup_s,
                "arrivals": args.arrivals,
                "timeout_s": config.timeout_s,
                "processes": config.processes,
                "channels": config.channels,
                "shapes": {name: list(shape) for name, shape in payload.shapes.items()},
            },
            levels=levels,
        )
        write_report(report, args.json)
        print(f"wrote {args.json}")
    return 0
