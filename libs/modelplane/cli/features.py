"""`modelplane features`: apply definitions, materialize, read online, build training sets."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50052"
STATUS_NAMES = {v: k.removeprefix("FEATURE_STATUS_") for k, v in pb.FeatureStatus.items()}
CHANGE_NAMES = {v: k.removeprefix("CHANGE_KIND_").lower() for k, v in pb.ChangeKind.items()}

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


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, pb_grpc.FeatureServiceStub]:
    channel = grpc.insecure_channel(args.address)
    return channel, pb_grpc.FeatureServiceStub(channel)


def _timeout(args: argparse.Namespace) -> float:
    # Long commands get a longer deadline unless --timeout was changed.
    default = getattr(args, "timeout_default", None)
    return default if default is not None and args.timeout == 30.0 else args.timeout


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    channel, stub = _stub(args)
    try:
        return getattr(stub, method)(request, timeout=_timeout(args))
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        channel.close()


def resolve_source_paths(document: Any, base: Path) -> Any:
    """Source paths in the YAML are relative to the YAML file, not to the server."""
    if isinstance(document, dict):
        for view in document.get("feature_views") or []:
            source = view.get("source") if isinstance(view, dict) else None
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                path = Path(source["path"])
                if not path.is_absolute():
                    source["path"] = str((base / path).resolve())
    return document


def apply_definitions(args: argparse.Namespace) -> int:
    try:
        document = yaml.safe_load(args.file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    document = resolve_source_paths(document, args.file.resolve().parent)
    request = pb.ApplyDefinitionsRequest(yaml=yaml.safe_dump(document), dry_run=args.dry_run)
    response = _call(args, "ApplyDefinitions", request)
    for change in response.changes:
        print(
            f"{change.kind:<13} {change.name:<30} v{change.version:<4} "
            f"{CHANGE_NAMES[change.change]}"
        )
    if args.dry_run:
        print("(dry run: nothing stored)")
    return 0


def _definitions(args: argparse.Namespace) -> pb.Definitions:
    return _call(args, "ListDefinitions", pb.ListDefinitionsRequest()).definitions


def list_definitions(args: argparse.Namespace) -> int:
    d = _definitions(args)
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


def _timestamp(text: str | None) -> Timestamp | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def materialize_views(args: argparse.Namespace) -> int:
    try:
        start, end = _timestamp(args.start), _timestamp(args.end)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    request = pb.MaterializeRequest(feature_views=args.view, start_time=start, end_time=end)
    response = _call(args, "Materialize", request)
    for view in response.views:
        print(
            f"{view.feature_view}: {view.start_time.ToJsonString()} → "
            f"{view.end_time.ToJsonString()}  read {view.rows_read}, "
            f"written {view.rows_written}, ignored {view.rows_ignored}"
        )
    return 0


def key_columns(args: argparse.Namespace) -> list[pb.EntityKeyColumn]:
    """Join key columns typed as the definitions declare them."""
    declared = {k.name: k.type for e in _definitions(args).entities for k in e.join_keys}
    columns = []
    for item in args.key:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"error: --key {item!r} is not NAME=V1,V2,...")
        parts = values.split(",")
        if declared.get(name) == pb.VALUE_TYPE_INT64:
            try:
                typed = pb.Values(type=pb.VALUE_TYPE_INT64, int64_values=[int(p) for p in parts])
            except ValueError:
                raise SystemExit(f"error: join key {name!r} takes integers") from None
        else:
            typed = pb.Values(type=pb.VALUE_TYPE_STRING, string_values=parts)
        columns.append(pb.EntityKeyColumn(name=name, values=typed))
    return columns


def _column_values(column: pb.OnlineFeatureColumn) -> list[Any]:
    kind = column.values.type
    if kind == pb.VALUE_TYPE_DOUBLE:
        return list(column.values.double_values)
    if kind == pb.VALUE_TYPE_INT64:
        return list(column.values.int64_values)
    if kind == pb.VALUE_TYPE_BOOL:
        return list(column.values.bool_values)
    return list(column.values.string_values)


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def get_features(args: argparse.Namespace) -> int:
    keys = key_columns(args)
    if args.tensor:
        if not args.bundle:
            print("error: --tensor needs --bundle", file=sys.stderr)
            return 1
        tensor = _call(
            args, "GetBundleTensor", pb.GetBundleTensorRequest(bundle=args.bundle, entity_keys=keys)
        )
        rows, width = tensor.shape
        values = [_plain(v) for v in tensor.values]
        statuses = [STATUS_NAMES[s] for s in tensor.statuses]
        print(
            json.dumps(
                {
                    "features": list(tensor.features),
                    "shape": [rows, width],
                    "values": [values[r * width : (r + 1) * width] for r in range(rows)],
                    "statuses": [statuses[r * width : (r + 1) * width] for r in range(rows)],
                    "bundle_version": tensor.bundle_version,
                },
                indent=2,
            )
        )
        return 0
    request = pb.GetOnlineFeaturesRequest(
        entity_keys=keys,
        features=args.features.split(",") if args.features else [],
        bundle=args.bundle or "",
    )
    response = _call(args, "GetOnlineFeatures", request)
    records = []
    for row in range(response.entity_count):
        record: dict[str, Any] = {}
        for key in keys:
            typed: Any = key.values.int64_values or key.values.string_values
            record[key.name] = typed[row]
        for column in response.columns:
            record[column.feature] = {
                "value": _plain(_column_values(column)[row]),
                "status": STATUS_NAMES[column.statuses[row]],
                "event_time": _iso(column.event_time_unix_us[row]),
            }
        records.append(record)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for record in records:
        key_text = " ".join(f"{k.name}={record[k.name]}" for k in keys)
        print(key_text)
        for column in response.columns:
            cell = record[column.feature]
            print(
                f"  {column.feature:<40} {cell['value']!s:<20} {cell['status']:<10} "
                f"{cell['event_time'] or '-'}"
            )
    return 0


def _iso(micros: int) -> str | None:
    if not micros:
        return None
    return datetime.fromtimestamp(micros / 1e6, tz=UTC).isoformat().replace("+00:00", "Z")


def training_set(args: argparse.Namespace) -> int:
    try:
        data = args.entities.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {args.entities}: {exc}", file=sys.stderr)
        return 1
    request = pb.GetTrainingSetRequest(
        features=args.features.split(",") if args.features else [],
        bundle=args.bundle or "",
        timestamp_column=args.timestamp_column,
        include_statuses=args.statuses,
    )
    if args.entities.suffix.lower() == ".csv":
        request.entity_csv = data
    else:
        request.entity_parquet = data
    response = _call(args, "GetTrainingSet", request)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(response.parquet)
    print(f"{response.rows} rows, columns: {', '.join(response.columns)} → {args.output}")
    return 0
