"""`modelplane monitor`: what the monitoring service holds about a model's predictions,
its drift and quality report, its alerts, its labels and its configuration."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from modelplane.cli.report_render import report_html, report_lines
from modelplane.client.monitoring import (
    DEFAULT_ADDRESS,
    MAX_RECORDS_PER_CALL,
    CannotConnect,
    MonitoringClient,
)
from modelplane.monitoring.v1 import monitoring_pb2 as pb

EPILOG = """\
examples:
  modelplane monitor summary fraud                  # every record of every version
  modelplane monitor summary fraud --since 1h       # the last hour (s, m, h, d, w)
  modelplane monitor summary fraud --version 2 --since 2026-11-20T12:00:00Z --json
  modelplane monitor report fraud --since 7d --buckets 28 --html fraud.html
  modelplane monitor alerts fraud --state firing --state pending
  modelplane monitor alerts --watch                 # every model's alert changes, until Ctrl-C
  modelplane monitor labels fraud --file labels.csv # request_id,label[,row_index]
  modelplane monitor config fraud > fraud.json      # edit, then:
  modelplane monitor config fraud --set fraud.json
"""
STATES = {
    "pending": pb.ALERT_STATE_PENDING,
    "firing": pb.ALERT_STATE_FIRING,
    "resolved": pb.ALERT_STATE_RESOLVED,
}

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(ValueError):
    """A flag the caller gave that cannot be used."""


def parse_since(text: str, now: datetime | None = None, flag: str = "--since") -> datetime:
    """`1h`, `30m`, `2d` … before now, or an ISO 8601 time (UTC when it names no zone).
    `flag` names the option in the error, since --until takes the same forms."""
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{flag} takes a duration such as 30m, 1h or 2d, or an ISO 8601 time; got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "monitor",
        help="predictions, drift, quality and alerts held by the monitoring service",
        description="Talk to a running monitoring service (`modelplane serve monitoring`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")
    for add in (_add_summary, _add_report, _add_alerts, _add_labels, _add_config):
        add(sub)


def _command(sub: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with the connection flags every one of them takes."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"monitoring service (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the connection (default %(default)s)",
    )
    return parser


def _add_summary(sub: Any) -> None:
    summary = _command(
        sub,
        "summary",
        help="count, time span, latency and versions/routes of a model's records",
        description="Summarise a model's prediction records: how many, the first and last, "
        "latency mean/p50/p99 (per record, as the inference server measured it) and how "
        "many each version answered through each route.",
    )
    summary.add_argument("model", help="model name")
    summary.add_argument("--version", default="", help="one version (default: every version)")
    summary.add_argument(
        "--since", help="only records from then on: 30m, 1h, 2d… ago, or an ISO 8601 time"
    )
    summary.add_argument("--json", action="store_true", help="print JSON")
    summary.set_defaults(handler=run_summary)


def _add_report(sub: Any) -> None:
    report = _command(
        sub,
        "report",
        help="drift, distributions, quality and alerts of a model version",
        description="Report one model version over a time range: per column the drift "
        "verdict, PSI, JS distance and test against the reference, with the reference and "
        "current distributions; drift and quality over time; the alerts. --html writes the "
        "same as one self-contained page of charts.",
    )
    report.add_argument("model", help="model name")
    report.add_argument(
        "--version", default="", help="one version (default: the one with most rows in range)"
    )
    report.add_argument(
        "--since", help="start: 30m, 1h, 2d… ago, or an ISO 8601 time (default: 24h before end)"
    )
    report.add_argument("--until", help="end, in the same forms as --since (default: now)")
    report.add_argument(
        "--buckets", type=int, default=0, help="buckets of drift and quality over time (default 24)"
    )
    report.add_argument("--html", type=Path, metavar="FILE", help="also write the HTML report")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(handler=run_report)


def _add_alerts(sub: Any) -> None:
    alerts = _command(
        sub,
        "alerts",
        help="list a model's (or every model's) alerts, or watch them change",
        description="List alerts newest first, or with --watch print the active alerts and "
        "then every change as it happens, until Ctrl-C.",
    )
    alerts.add_argument("model", nargs="?", default="", help="model name (default: every model)")
    alerts.add_argument(
        "--state",
        action="append",
        choices=sorted(STATES),
        default=[],
        help="only alerts in this state (repeat for several; default: every state)",
    )
    alerts.add_argument("--limit", type=int, default=0, help="at most this many (default 100)")
    alerts.add_argument("--watch", action="store_true", help="follow changes until Ctrl-C")
    alerts.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    alerts.set_defaults(handler=run_alerts)


def _add_labels(sub: Any) -> None:
    labels = _command(
        sub,
        "labels",
        help="send ground truth for logged predictions from a CSV file",
        description="Send labels from a CSV file with a header naming the columns "
        "request_id, label and optionally row_index (default 0). A label sent again "
        "replaces the earlier one.",
    )
    labels.add_argument("model", help="model name")
    labels.add_argument("--file", type=Path, required=True, help="CSV file of labels")
    labels.add_argument("--json", action="store_true", help="print JSON")
    labels.set_defaults(handler=run_labels)


def _add_config(sub: Any) -> None:
    config = _command(
        sub,
        "config",
        help="show or set a model's monitoring configuration",
        description="Print a model's monitoring configuration as JSON (the defaults, at "
        "revision 0, when none was set), or with --set replace it from a JSON or YAML "
        "file. The file's revision must be the stored one, so an edit of a configuration "
        "someone changed meanwhile fails instead of undoing their change.",
    )
    config.add_argument("model", help="model name")
    config.add_argument("--set", type=Path, metavar="FILE", help="JSON or YAML file to store")
    config.set_defaults(handler=run_config)


def _client(args: argparse.Namespace) -> MonitoringClient:
    return MonitoringClient(
        args.address, timeout=args.timeout, connect_timeout=args.connect_timeout
    )


def _guarded(action: Callable[[], int]) -> int:
    """Runs a command; what went wrong becomes one line on stderr and an exit status
    (2: the flags, 1: the service), never a traceback."""
    try:
        return action()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CannotConnect as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1


def _to_json(message: Message, defaults: bool = False) -> str:
    return json_format.MessageToJson(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=defaults,
    )


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
    return _guarded(lambda: _summary(args))


def _summary(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    with _client(args) as client:
        response = client.summary(args.model, args.version, start=since)
    data = summary_json(args.model, args.version, since, response)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(summary_lines(data)))
    return 0


# --- report -----------------------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    return _guarded(lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    start = parse_since(args.since) if args.since else None
    end = parse_since(args.until, flag="--until") if args.until else None
    if args.buckets < 0:
        raise UsageError(f"--buckets must be 0 (the default) or more; got {args.buckets}")
    with _client(args) as client:
        report = client.report(args.model, args.version, start, end, args.buckets)
    print(_to_json(report) if args.json else "\n".join(report_lines(report)))
    if args.html:
        args.html.write_text(report_html(report), encoding="utf-8")
        # With --json, stdout is the JSON document alone.
        print(f"wrote {args.html}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --- alerts -----------------------------------------------------------------------------


def _alert_json(alert: pb.Alert) -> str:
    return json_format.MessageToJson(alert, preserving_proto_field_name=True, indent=None)


def _alert_row(alert: pb.Alert) -> tuple[str, ...]:
    since = _iso(alert.start_time, alert.HasField("start_time")) or "-"
    return (
        pb.AlertState.Name(alert.state).removeprefix("ALERT_STATE_").lower(),
        f"{alert.model_name}/{alert.model_version}",
        alert.rule,
        alert.subject or "-",
        f"{alert.value:.4g}",
        since,
        alert.summary,
    )


def alert_table(alerts: Iterable[pb.Alert]) -> list[str]:
    """Alerts as aligned columns; the summary, last, is left unpadded."""
    rows: list[tuple[str, ...]] = [
        ("STATE", "MODEL", "RULE", "SUBJECT", "VALUE", "SINCE", "SUMMARY")
    ]
    rows += [_alert_row(a) for a in alerts]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def run_alerts(args: argparse.Namespace) -> int:
    return _guarded(lambda: _watch_alerts(args) if args.watch else _list_alerts(args))


def _list_alerts(args: argparse.Namespace) -> int:
    states = [STATES[s] for s in args.state]
    with _client(args) as client:
        alerts = client.list_alerts(args.model, states, args.limit)
    if args.json:
        for alert in alerts:
            print(_alert_json(alert))
    elif alerts:
        print("\n".join(alert_table(alerts)))
    else:
        print("no alerts")
    return 0


def _watch_alerts(args: argparse.Namespace) -> int:
    """Prints each change as it arrives (flushed: the output is often piped)."""
    wanted = {STATES[s] for s in args.state}
    with _client(args) as client:
        try:
            for alert in client.watch_alerts(args.model):
                if wanted and alert.state not in wanted:
                    continue
                line = _alert_json(alert) if args.json else "  ".join(_alert_row(alert))
                print(line, flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


# --- labels -----------------------------------------------------------------------------


def read_labels(path: Path) -> Iterator[tuple[str, float, int]]:
    """(request id, label, row index) per CSV row; UsageError names the line at fault."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"request_id", "label"} - set(reader.fieldnames or ())
            if missing:
                raise UsageError(f"{path}: the header must name {', '.join(sorted(missing))}")
            for row in reader:
                yield _label_row(row, f"{path}:{reader.line_num}")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _label_row(row: dict[str, str], where: str) -> tuple[str, float, int]:
    try:
        label = float(row["label"])
        index = int(row.get("row_index") or 0)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: label must be a number and row_index an integer") from None
    if not row["request_id"]:
        raise UsageError(f"{where}: empty request_id")
    return row["request_id"], label, index


def _chunks(rows: Iterable[tuple[str, float, int]]) -> Iterator[list[tuple[str, float, int]]]:
    chunk: list[tuple[str, float, int]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == MAX_RECORDS_PER_CALL:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_labels(args: argparse.Namespace) -> int:
    return _guarded(lambda: _labels(args))


def _labels(args: argparse.Namespace) -> int:
    totals = {"matched": 0, "updated": 0, "unmatched": 0}
    with _client(args) as client:
        for chunk in _chunks(read_labels(args.file)):
            ids, values, rows = zip(*chunk, strict=True)
            response = client.log_labels(args.model, ids, values, rows)
            for key in totals:
                totals[key] += getattr(response, key)
    if args.json:
        print(json.dumps(totals))
    else:
        print(", ".join(f"{key} {count:,}" for key, count in totals.items()))
    return 0


# --- config -----------------------------------------------------------------------------


def config_from_file(path: Path, model: str) -> pb.MonitorConfig:
    """A MonitorConfig from JSON or YAML (YAML's parser reads JSON too); its model name
    may be left out but must not name another model."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise UsageError(f"{path} must hold a mapping of MonitorConfig fields")
        config = json_format.ParseDict(raw, pb.MonitorConfig())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except (yaml.YAMLError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not a monitoring configuration: {exc}") from None
    if config.model_name and config.model_name != model:
        raise UsageError(f"{path} configures {config.model_name!r}, not {model!r}")
    config.model_name = model
    return config


def run_config(args: argparse.Namespace) -> int:
    return _guarded(lambda: _config(args))


def _config(args: argparse.Namespace) -> int:
    wanted = config_from_file(args.set, args.model) if args.set else None
    with _client(args) as client:
        config = client.set_config(wanted) if wanted else client.get_config(args.model)
    print(_to_json(config, defaults=True))
    return 0
