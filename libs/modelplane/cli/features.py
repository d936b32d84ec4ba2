"""`modelplane features`: apply definitions, materialize, read online, build training sets."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from modelplane.client.feature import (
    DEFAULT_ADDRESS,
    CannotConnect,
    FeatureClient,
    FeatureDataError,
    FeatureServiceError,
)
from modelplane.feature.v1 import feature_pb2 as pb

STATUS_NAMES = {int(v): k.removeprefix("FEATURE_STATUS_") for k, v in pb.FeatureStatus.items()}

EPILOG = """\
examples:
  modelplane features apply features.yaml
  modelplane features materialize                      # every view, since the last run
  modelplane features materialize --view customer_stats --start 2026-01-01T00:00:00Z
  modelplane features get --features customer_stats:trips,customer_stats:rating \\
      --key customer_id=1,2,3
  modelplane features get --bundle fraud_model --key customer_id=1 --tensor
  modelplane features training-set --entities entities.csv --bundle fraud_model \\
      --output train.parquet
"""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "features",
        help="feature definitions, online reads, materialization, training sets",
        description="Talk to a running feature service (`modelplane serve feature`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"feature service (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    # The same flags after the subcommand too (`features get --address ...`); SUPPRESS
    # keeps a subcommand from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=argparse.SUPPRESS, help="feature service address")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per call")
    sub = parser.add_subparsers(dest="features_command", required=True, metavar="COMMAND")

    apply = sub.add_parser(
        "apply",
        parents=[common],
        help="create or update entities, feature views and bundles from a YAML file",
        description="Apply a YAML file of definitions. Relative source paths are resolved "
        "against the file's folder. Each changed definition gets a new version.",
    )
    apply.add_argument("file", type=Path, help="YAML with entities, feature_views, bundles")
    apply.add_argument("--dry-run", action="store_true", help="validate and show the changes")
    apply.set_defaults(handler=apply_definitions)

    show = sub.add_parser("list", parents=[common], help="print the current definitions as YAML")
    show.set_defaults(handler=list_definitions)

    materialize = sub.add_parser(
        "materialize",
        parents=[common],
        help="copy source rows into the online store (incremental by default)",
        description="Materialize feature views from their Parquet sources. Without --start "
        "each view continues from where its previous run stopped.",
    )
    materialize.add_argument(
        "--view", action="append", default=[], help="a view to materialize (repeatable)"
    )
    materialize.add_argument("--start", help="start of the event-time range (ISO 8601)")
    materialize.add_argument("--end", help="end of the event-time range (ISO 8601; default now)")
    materialize.set_defaults(handler=materialize_views, timeout_default=3600.0)

    get = sub.add_parser(
        "get",
        parents=[common],
        help="read online features for some entities",
        description="Read features (or a bundle) for entities given as join key values.",
    )
    _add_selection(get)
    get.add_argument(
        "--key",
        action="append",
        default=[],
        required=True,
        help="join key values, NAME=V1,V2,... (repeat for composite keys)",
    )
    get.add_argument("--tensor", action="store_true", help="read the bundle as a dense tensor")
    get.add_argument("--json", action="store_true", help="print JSON instead of a table")
    get.set_defaults(handler=get_features)

    training = sub.add_parser(
        "training-set",
        parents=[common],
        help="point-in-time-correct feature values for an entity dataframe",
        description="Join feature values as of each row's timestamp (never later) and "
        "write the result as Parquet.",
    )
    _add_selection(training)
    training.add_argument(
        "--entities", type=Path, required=True, help="entity dataframe (.parquet or .csv)"
    )
    training.add_argument("--output", type=Path, required=True, help="Parquet file to write")
    training.add_argument(
        "--timestamp-column", default="event_timestamp", help="timestamp column of the entities"
    )
    training.add_argument(
        "--statuses", action="store_true", help="add a <view>__<feature>__status column each"
    )
    training.set_defaults(handler=training_set, timeout_default=600.0)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--features", help="comma-separated view:feature references")
    group.add_argument("--bundle", help="a feature bundle name")


def _timeout(args: argparse.Namespace) -> float:
    # Long commands get a longer deadline unless --timeout was changed.
    default = getattr(args, "timeout_default", None)
    return default if default is not None and args.timeout == 30.0 else args.timeout


def _with_client(args: argparse.Namespace, action: Callable[[FeatureClient], int]) -> int:
    """Runs `action` with a client (the command's deadline for every call); the service's
    errors end the command with one line on stderr and exit code 1."""
    timeout = _timeout(args)
    try:
        with FeatureClient(args.address, timeout=timeout, long_timeout=timeout) as client:
            return action(client)
    except CannotConnect as exc:
        print(f"error: {exc.details}", file=sys.stderr)
    except FeatureServiceError as exc:
        print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
    except FeatureDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(1)


def apply_definitions(args: argparse.Namespace) -> int:
    def apply(client: FeatureClient) -> int:
        try:
            # The client reads the file; its relative source paths are taken from its folder.
            changes = client.apply(args.file, dry_run=args.dry_run)
        except OSError as exc:
            print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
            return 1
        for change in changes:
            print(f"{change.kind:<13} {change.name:<30} v{change.version:<4} {change.change}")
        if args.dry_run:
            print("(dry run: nothing stored)")
        return 0

    return _with_client(args, apply)


def list_definitions(args: argparse.Namespace) -> int:
    return _with_client(args, lambda client: _print_definitions(client.list_definitions()))


def _print_definitions(d: pb.Definitions) -> int:
    type_name = {v: k.removeprefix("VALUE_TYPE_").lower() for k, v in pb.ValueType.items()}
    document = {
        "entities": [
            {
                "name": e.name,
                "version": e.version,
                "join_keys": [{"name": k.name, "type": type_name[k.type]} for k in e.join_keys],
            }
            for e in d.entities
        ],
        "feature_views": [
            {
                "name": v.name,
                "version": v.version,
                "entity": v.entity,
                "max_age": f"{v.max_age.seconds}s",
                "features": [{"name": f.name, "type": type_name[f.type]} for f in v.features],
                **({"source": {"path": v.source.path}} if v.HasField("source") else {}),
            }
            for v in d.feature_views
        ],
        "bundles": [
            {"name": b.name, "version": b.version, "features": [f.ref for f in b.features]}
            for b in d.bundles
        ],
    }
    print(yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def _moment(text: str | None) -> datetime | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _json_time(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def materialize_views(args: argparse.Namespace) -> int:
    try:
        start, end = _moment(args.start), _moment(args.end)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def materialize(client: FeatureClient) -> int:
        failed = 0
        for run in client.materialize(args.view, start, end):
            if run.error:
                failed += 1
                print(f"{run.view}: not materialized: {run.error}", file=sys.stderr)
                continue
            print(
                f"{run.view}: {_json_time(run.start)} → {_json_time(run.end)}  "
                f"read {run.rows_read}, written {run.rows_written}, ignored {run.rows_ignored}"
            )
        return 1 if failed else 0

    return _with_client(args, materialize)


def key_columns(args: argparse.Namespace, client: FeatureClient) -> dict[str, list[Any]]:
    """Join key values typed as the definitions declare them."""
    declared = {k.name: k.type for e in client.list_definitions().entities for k in e.join_keys}
    columns: dict[str, list[Any]] = {}
    for item in args.key:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"error: --key {item!r} is not NAME=V1,V2,...")
        parts = values.split(",")
        if declared.get(name) == pb.VALUE_TYPE_INT64:
            try:
                columns[name] = [int(p) for p in parts]
            except ValueError:
                raise SystemExit(f"error: join key {name!r} takes integers") from None
        else:
            columns[name] = parts
    return columns


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def get_features(args: argparse.Namespace) -> int:
    if args.tensor and not args.bundle:
        print("error: --tensor needs --bundle", file=sys.stderr)
        return 1
    return _with_client(args, lambda client: _get(args, client))


def _get(args: argparse.Namespace, client: FeatureClient) -> int:
    keys = key_columns(args, client)
    if args.tensor:
        tensor = client.get_bundle_tensor(args.bundle, keys)
        print(
            json.dumps(
                {
                    "features": tensor.features,
                    "shape": list(tensor.values.shape),
                    "values": [[_plain(v) for v in row] for row in tensor.values.tolist()],
                    "statuses": [
                        [STATUS_NAMES[s] for s in row] for row in tensor.statuses.tolist()
                    ],
                    "bundle_version": tensor.bundle_version,
                },
                indent=2,
            )
        )
        return 0
    online = client.get_online(args.features.split(",") if args.features else args.bundle, keys)
    records = []
    for row in range(online.entity_count):
        record: dict[str, Any] = {name: values[row] for name, values in keys.items()}
        for ref in online.features:
            record[ref] = {
                "value": _plain(online[ref][row : row + 1].tolist()[0]),  # a Python value
                "status": STATUS_NAMES[int(online.statuses[ref][row])],
                "event_time": _iso(int(online.event_time_us[ref][row])),
            }
        records.append(record)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for record in records:
        print(" ".join(f"{name}={record[name]}" for name in keys))
        for ref in online.features:
            cell = record[ref]
            print(
                f"  {ref:<40} {cell['value']!s:<20} {cell['status']:<10} "
                f"{cell['event_time'] or '-'}"
            )
    return 0


def _iso(micros: int) -> str | None:
    if not micros:
        return None
    return datetime.fromtimestamp(micros / 1e6, tz=UTC).isoformat().replace("+00:00", "Z")


def training_set(args: argparse.Namespace) -> int:
    if not args.entities.is_file():
        print(f"error: cannot read {args.entities}: no such file", file=sys.stderr)
        return 1

    def build(client: FeatureClient) -> int:
        import pyarrow.parquet as pq

        table = client.training_set(
            args.entities,
            args.features.split(",") if args.features else args.bundle,
            timestamp_column=args.timestamp_column,
            statuses=args.statuses,
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, args.output)
        print(f"{table.num_rows} rows, columns: {', '.join(table.column_names)} → {args.output}")
        return 0

    return _with_client(args, build)
