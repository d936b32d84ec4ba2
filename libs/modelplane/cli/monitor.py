"""`modelplane monitor`: what the monitoring service holds about a model's predictions."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from modelplane.client.monitoring import DEFAULT_ADDRESS, CannotConnect, MonitoringClient
from modelplane.monitoring.v1 import monitoring_pb2 as pb

EPILOG = """\
examples:
  modelplane monitor summary fraud                  # every record of every version
  modelplane monitor summary fraud --since 1h       # the last hour (s, m, h, d, w)
  modelplane monitor summary fraud --version 2 --since 2026-11-20T12:00:00Z --json
"""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(ValueError):
    """A flag the caller gave that cannot be used."""


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`1h`, `30m`, `2d` … before now, or an ISO 8601 time (UTC when it names no zone)."""
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since takes a duration such as 30m, 1h or 2d, or an ISO 8601 time; got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "monitor",
        help="prediction records held by the monitoring service",
        description="Talk to a running monitoring service (`modelplane serve monitoring`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")
    summary = sub.add_parser(
        "summary",
        help="count, time span, latency and versions/routes of a model's records",
        description="Summarise a model's prediction records: how many, the first and last, "
        "latency mean/p50/p99 (per record, as the inference server measured it) and how "
        "many each version answered through each route.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    summary.add_argument("model", help="model name")
    summary.add_argument("--version", default="", help="one version (default: every version)")
    summary.add_argument(
        "--since", help="only records from then on: 30m, 1h, 2d… ago, or an ISO 8601 time"
    )
    summary.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"monitoring service (default {DEFAULT_ADDRESS})"
    )
    summary.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    summary.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the connection (default %(default)s)",
    )
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(handler=run_summary)


def _iso(ts: Any, present: bool) -> str | None:
    if not present:
        return None
    moment: datetime = ts.ToDatetime(tzinfo=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summary_json(
    model: str, version: str, since: datetime | None, s: pb.GetPredictionSummaryResponse
) -> dict[str, Any]:
    return {
        "model": model,
        "version": version or None,
        "since": since.isoformat().replace("+00:00", "Z") if since else None,
        "count": s.count,
        "first_time": _iso(s.first_time, s.HasField("first_time")),
        "last_time": _iso(s.last_time, s.HasField("last_time")),
        "latency_ms": {
            "mean": s.mean_latency_ms,
            "p50": s.p50_latency_ms,
            "p99": s.p99_latency_ms,
        },
        "by_version_route": [
            {"model_version": c.model_version, "route": c.route, "count": c.count}
            for c in s.by_version_route
        ],
    }


def summary_lines(data: dict[str, Any]) -> list[str]:
    scope = f"version {data['version']}" if data["version"] else "every version"
    since = f", since {data['since']}" if data["since"] else ""
    lines = [f"model {data['model']}  ({scope}{since})", f"records   {data['count']:,}"]
    if not data["count"]:
        return lines
    latency = data["latency_ms"]
    lines += [
        f"first     {data['first_time']}",
        f"last      {data['last_time']}",
        f"latency   mean {latency['mean']:.3f} ms  p50 {latency['p50']:.3f} ms  "
        f"p99 {latency['p99']:.3f} ms",
        "",
    ]
    table = [("VERSION", "ROUTE", "RECORDS")] + [
        (c["model_version"], c["route"] or "-", f"{c['count']:,}") for c in data["by_version_route"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        lines.append(
            f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2].rjust(widths[2])}"
        )
    return lines


def run_summary(args: argparse.Namespace) -> int:
    try:
        since = parse_since(args.since) if args.since else None
        with MonitoringClient(
            args.address, timeout=args.timeout, connect_timeout=args.connect_timeout
        ) as client:
            response = client.summary(args.model, args.version, start=since)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CannotConnect as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    data = summary_json(args.model, args.version, since, response)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(summary_lines(data)))
    return 0
