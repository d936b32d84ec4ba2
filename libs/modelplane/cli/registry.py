"""`modelplane registry ...`: register, inspect, promote, approve and download models."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from modelplane.client.registry import DEFAULT_ADDRESS, DigestMismatch, RegistryClient
from modelplane.registry.v1 import registry_pb2 as pb

STATUSES = {
    "registered": pb.VERSION_STATUS_REGISTERED,
    "deprecated": pb.VERSION_STATUS_DEPRECATED,
    "archived": pb.VERSION_STATUS_ARCHIVED,
}


class InputError(Exception):
    """Bad input on the command line or in a file it names: exit 2, no traceback."""


class CommandError(Exception):
    """The command cannot do what was asked in the registry's current state: exit 1."""


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"{what} must look like key=value, got {item!r}")
        pairs[key] = value
    return pairs


def _time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _metric(text: str) -> dict[str, Any]:
    """`auc=0.91` or `auc=0.87@region=eu,segment=new`."""
    head, _, slice_text = text.partition("@")
    name, sep, value = head.partition("=")
    if not sep or not name:
        raise InputError(f"--metric must look like name=value[@k=v,...], got {text!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise InputError(f"metric {name!r} value {value!r} is not a number") from exc
    return {
        "name": name,
        "value": number,
        "slice": _pairs(slice_text.split(",") if slice_text else [], "metric slice"),
    }


# --- the --metadata file --------------------------------------------------------------------
# Read field by field (not handed to protobuf's JSON parser), so a mistake is reported
# with the path of the field that holds it.

_LINEAGE_TEXT = ("training_data_ref", "training_data_version", "code_revision")
_CARD_FIELDS = (
    "intended_use",
    "out_of_scope_uses",
    "limitations",
    "ethical_considerations",
    "evaluation_data",
)
_FILE_FIELDS = (
    "description",
    "lineage",
    "card",
    "feature_statistics",
    "serving_config",
    "feature_input",
)
_FEATURE_INPUT_FIELDS = ("bundle", "input", "missing_policy")
MISSING_POLICIES = {
    "reject": pb.MISSING_FEATURE_POLICY_REJECT,
    "fill": pb.MISSING_FEATURE_POLICY_FILL,
}


def _kind(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _text(value: object, field: str) -> str:
    if value is None:
        return ""
    # YAML reads `2026-11-20` as a date and `6` as a number; both are meant as text here.
    if isinstance(value, (str, int, float, date)):
        return str(value)
    raise InputError(f"{field} must be text, got {_kind(value)}")


def _mapping(value: object, field: str, known: Sequence[str] = ()) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{field} must be a mapping (key: value), got {_kind(value)}")
    for key in value:
        if known and key not in known:
            raise InputError(
                f"{field + '.' if field else ''}{key} is not a field here; known: "
                + ", ".join(known)
            )
    return value


def _items(value: object, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{field} must be a list, got {_kind(value)}")
    return value


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{field} must be a number, got {_kind(value)}")
    try:
        return float(value)
    except ValueError as exc:
        raise InputError(f"{field} must be a number, got {value!r}") from exc


def _count(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{field} must be a whole number >= 0, got {_kind(value)}")
    return value


def _labels(value: object, field: str) -> dict[str, str]:
    return {str(k): _text(v, f"{field}.{k}") for k, v in _mapping(value, field).items()}


def _slice(value: object, field: str) -> dict[str, str]:
    """A mapping, or the `--metric` flag's form: `region=eu` or `region=eu,segment=new`."""
    if isinstance(value, str):
        pairs = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return _pairs(pairs, field)
        except InputError as exc:
            raise InputError(
                f"{field} must be a mapping or key=value[,key=value...], got {value!r}"
            ) from exc
    return _labels(value, field)


def _missing_policy(value: object, field: str) -> pb.MissingFeaturePolicy.ValueType:
    text = _text(value, field).strip().lower()
    if text not in MISSING_POLICIES:
        raise InputError(f"{field} must be one of {', '.join(MISSING_POLICIES)}, got {value!r}")
    return MISSING_POLICIES[text]


def _feature_input(value: object, field: str) -> pb.FeatureInput | None:
    """`{bundle, input, missing_policy}`; None when the file has none."""
    if value is None:
        return None
    raw = _mapping(value, field, _FEATURE_INPUT_FIELDS)
    bundle = _text(raw.get("bundle"), f"{field}.bundle")
    if not bundle:
        raise InputError(f"{field}.bundle is required")
    message = pb.FeatureInput(bundle=bundle, input=_text(raw.get("input"), f"{field}.input"))
    if raw.get("missing_policy") is not None:
        message.missing_policy = _missing_policy(raw["missing_policy"], f"{field}.missing_policy")
    return message


def metadata_from_file(path: Path) -> pb.UploadMetadata:
    """The upload metadata a `--metadata` YAML file describes (see the README's schema)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text") from exc
    try:
        return _metadata_from_mapping(raw)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc


def _metadata_from_mapping(raw: object) -> pb.UploadMetadata:
    if raw is not None and not isinstance(raw, Mapping):
        raise InputError(f"the file must hold a mapping of {', '.join(_FILE_FIELDS)}")
    top = _mapping(raw, "", _FILE_FIELDS)
    metadata = pb.UploadMetadata(
        description=_text(top.get("description"), "description"),
        serving_config=_text(top.get("serving_config"), "serving_config"),
    )
    raw_lineage = _mapping(top.get("lineage"), "lineage", (*_LINEAGE_TEXT, "params", "metrics"))
    lineage = metadata.lineage
    for name in _LINEAGE_TEXT:
        setattr(lineage, name, _text(raw_lineage.get(name), f"lineage.{name}"))
    lineage.params.update(_labels(raw_lineage.get("params"), "lineage.params"))
    for index, item in enumerate(_items(raw_lineage.get("metrics"), "lineage.metrics")):
        field = f"lineage.metrics[{index}]"
        raw_metric = _mapping(item, field, ("name", "value", "slice"))
        name = _text(raw_metric.get("name"), f"{field}.name")
        if not name:
            raise InputError(f"{field}.name is required")
        if "value" not in raw_metric:
            raise InputError(f"{field}.value is required")
        lineage.metrics.add(
            name=name,
            value=_number(raw_metric["value"], f"{field}.value"),
            slice=_slice(raw_metric.get("slice"), f"{field}.slice"),
        )
    raw_card = _mapping(top.get("card"), "card", _CARD_FIELDS)
    for name in _CARD_FIELDS:
        setattr(metadata.card, name, _text(raw_card.get(name), f"card.{name}"))
    for index, item in enumerate(_items(top.get("feature_statistics"), "feature_statistics")):
        field = f"feature_statistics[{index}]"
        raw_stat = _mapping(item, field, ("name", "bin_edges", "counts", "categories"))
        metadata.feature_statistics.add(
            name=_text(raw_stat.get("name"), f"{field}.name"),
            bin_edges=[
                _number(edge, f"{field}.bin_edges[{i}]")
                for i, edge in enumerate(_items(raw_stat.get("bin_edges"), f"{field}.bin_edges"))
            ],
            counts=[
                _count(count, f"{field}.counts[{i}]")
                for i, count in enumerate(_items(raw_stat.get("counts"), f"{field}.counts"))
            ],
            categories=[
                _text(category, f"{field}.categories[{i}]")
                for i, category in enumerate(
                    _items(raw_stat.get("categories"), f"{field}.categories")
                )
            ],
        )
    feature_input = _feature_input(top.get("feature_input"), "feature_input")
    if feature_input is not None:
        metadata.feature_input.CopyFrom(feature_input)
    return metadata


def upload_metadata(args: argparse.Namespace) -> pb.UploadMetadata:
    """Metadata from the YAML file (if any), then flags on top: a flag replaces that field
    of the file; `--metric` replaces the file's whole metrics list, `--param KEY=VALUE`
    the file's value of KEY, `--feature-bundle`/`--feature-input`/`--missing-features`
    the file's feature_input.bundle/input/missing_policy."""
    metadata = metadata_from_file(Path(args.metadata)) if args.metadata else pb.UploadMetadata()
    metadata.model = args.model
    if args.description:
        metadata.description = args.description
    lineage = metadata.lineage
    for flag in _LINEAGE_TEXT:
        if getattr(args, flag):
            setattr(lineage, flag, getattr(args, flag))
    lineage.params.update(_pairs(args.param, "--param"))
    if args.metric:
        del lineage.metrics[:]
        for text in args.metric:
            json_format.ParseDict(_metric(text), lineage.metrics.add())
    for flag in _CARD_FIELDS:
        if getattr(args, flag):
            setattr(metadata.card, flag, getattr(args, flag))
    if args.serving_config:
        try:
            metadata.serving_config = Path(args.serving_config).read_text()
        except UnicodeDecodeError as exc:
            raise InputError(f"{args.serving_config} is not UTF-8 text") from exc
    _feature_flags(args, metadata)
    return metadata


def _feature_flags(args: argparse.Namespace, metadata: pb.UploadMetadata) -> None:
    feature_input = metadata.feature_input
    if args.feature_bundle:
        feature_input.bundle = args.feature_bundle
    if not feature_input.bundle and (args.feature_input or args.missing_features):
        raise InputError(
            "--feature-input and --missing-features need --feature-bundle"
            " (or feature_input.bundle in the --metadata file)"
        )
    if args.feature_input:
        feature_input.input = args.feature_input
    if args.missing_features:
        feature_input.missing_policy = MISSING_POLICIES[args.missing_features]


# --- output -------------------------------------------------------------------------------


_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Protobuf's JSON mapping writes 64-bit integers as strings (for JavaScript's sake);
    ours are versions, revisions and ids, far below 2**53, so they are plain numbers."""
    for name, value in data.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        if field.type in _INT64_TYPES:
            data[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
            continue
        nested = field.message_type
        if nested is None or nested.full_name.startswith("google.protobuf."):
            continue  # well-known types (Timestamp) have JSON forms of their own
        if nested.GetOptions().map_entry:
            value_field = nested.fields_by_name["value"]
            if value_field.type in _INT64_TYPES:
                data[name] = {k: int(v) for k, v in value.items()}
            elif value_field.message_type is not None:
                for item in value.values():
                    _int64_as_numbers(value_field.message_type, item)
            continue
        for item in value if isinstance(value, list) else [value]:
            _int64_as_numbers(nested, item)
    return data


def as_dict(message: Message) -> dict[str, Any]:
    """The one JSON form of every command's output, `watch` included: field names as in
    the .proto (snake_case), 64-bit integers as numbers."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _int64_as_numbers(message.DESCRIPTOR, data)


def _json(message: Message) -> str:
    return json.dumps(as_dict(message), indent=2)


def _emit(args: argparse.Namespace, message: Message, text: str) -> None:
    print(_json(message) if args.json else text)


def _when(ts: Any) -> str:
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds") if ts.seconds else "-"


def _status(value: int) -> str:
    return pb.VersionStatus.Name(value).removeprefix("VERSION_STATUS_").lower()  # type: ignore[arg-type]


def _spec(spec: pb.TensorSpec) -> str:
    return f"{spec.name} {spec.datatype}[{', '.join(str(d) for d in spec.shape)}]"


def _feature_input_text(feature_input: pb.FeatureInput) -> str:
    policy = pb.MissingFeaturePolicy.Name(feature_input.missing_policy)
    missing = policy.removeprefix("MISSING_FEATURE_POLICY_").lower()
    if missing == "unspecified":
        missing = "reject"
    return (
        f"bundle {feature_input.bundle} -> input {feature_input.input or '(the only one)'},"
        f" missing values: {missing}"
    )


def print_version(version: pb.ModelVersion) -> None:
    print(f"{version.model} v{version.version}  ({_status(version.status)})")
    aliases = ", ".join(version.aliases) or "-"
    print(f"  aliases:     {aliases}")
    print(f"  approvals:   {version.approvals}")
    print(f"  created:     {_when(version.create_time)} by {version.created_by}")
    print(f"  sha256:      {version.artifact.sha256}")
    print(f"  size:        {version.artifact.size_bytes} bytes ({version.artifact.format})")
    sig = version.signature
    print(f"  onnx:        IR {sig.ir_version}, opset {sig.opset_version}")
    for spec in sig.inputs:
        print(f"  input:       {_spec(spec)}")
    for spec in sig.outputs:
        print(f"  output:      {_spec(spec)}")
    if version.HasField("feature_input"):
        print(f"  features:    {_feature_input_text(version.feature_input)}")
    if version.description:
        print(f"  description: {version.description}")
    lineage = version.lineage
    print("lineage:")
    data_version = lineage.training_data_version or "-"
    print(f"  training data: {lineage.training_data_ref or '-'} @ {data_version}")
    print(f"  code revision: {lineage.code_revision or '-'}")
    for key, value in sorted(lineage.params.items()):
        print(f"  param {key} = {value}")
    for metric in lineage.metrics:
        where = ",".join(f"{k}={v}" for k, v in sorted(metric.slice.items())) or "overall"
        print(f"  metric {metric.name} = {metric.value:g} [{where}]")
    print("model card:")
    card = version.card
    for label, text in (
        ("intended use", card.intended_use),
        ("out-of-scope uses", card.out_of_scope_uses),
        ("limitations", card.limitations),
        ("ethical considerations", card.ethical_considerations),
        ("evaluation data", card.evaluation_data),
    ):
        print(f"  {label}: {text or '-'}")
    for stat in version.feature_statistics:
        kind = "categories" if stat.categories else "bins"
        print(f"  reference stats {stat.name}: {len(stat.counts)} {kind}, {sum(stat.counts)} rows")


# --- commands -----------------------------------------------------------------------------


SELF_APPROVAL_HELP = "let an uploader's own approval count toward their version (default: not)"


def _client(args: argparse.Namespace) -> RegistryClient:
    return RegistryClient(args.address, actor=args.actor, timeout=args.timeout)


def cmd_create(args: argparse.Namespace, client: RegistryClient) -> None:
    model = client.create_model(
        args.name,
        description=args.description or "",
        owner=args.owner or "",
        tags=_pairs(args.tag, "--tag"),
        required_approvals=args.required_approvals,
        protected_aliases=args.protect or [],
        allow_self_approval=args.allow_self_approval,
    )
    _emit(args, model, f"created model {model.name}")


def cmd_register(args: argparse.Namespace, client: RegistryClient) -> None:
    metadata = upload_metadata(args)
    if args.create:
        try:
            client.create_model(args.model)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                raise
    version = client.upload_file(Path(args.file), metadata)
    if args.json:
        print(_json(version))
    else:
        print(f"registered {version.model} v{version.version} sha256:{version.artifact.sha256}")


def cmd_list(args: argparse.Namespace, client: RegistryClient) -> None:
    models = client.list_models(args.query or "", args.owner or "", _pairs(args.tag, "--tag"))
    if args.json:
        print(json.dumps([as_dict(m) for m in models], indent=2))
        return
    print(f"{'MODEL':<32} {'LATEST':>6}  {'OWNER':<16} TAGS")
    for model in models:
        tags = ",".join(f"{k}={v}" for k, v in sorted(model.tags.items()))
        print(f"{model.name:<32} {model.latest_version:>6}  {model.owner:<16} {tags}")


def cmd_show(args: argparse.Namespace, client: RegistryClient) -> None:
    if args.version or args.alias:
        version = client.get_version(args.model, version=args.version or 0, alias=args.alias or "")
        if args.json:
            print(_json(version))
        else:
            print_version(version)
        return
    model = client.get_model(args.model)
    versions = client.list_versions(args.model)
    if args.json:
        print(
            json.dumps(
                {
                    "model": as_dict(model),
                    "versions": [as_dict(v) for v in versions],
                },
                indent=2,
            )
        )
        return
    policy = model.approval_policy
    print(f"{model.name}: {model.description or '-'}")
    print(
        f"  owner: {model.owner or '-'}   created {_when(model.create_time)} by {model.created_by}"
    )
    if model.tags:
        print("  tags: " + ", ".join(f"{k}={v}" for k, v in sorted(model.tags.items())))
    if policy.required_approvals:
        print(
            f"  policy: {policy.required_approvals} approval(s) before "
            + ", ".join(policy.protected_aliases)
            + ("; an uploader's own approval counts" if policy.allow_self_approval else "")
        )
    print(f"  {'VERSION':>7}  {'STATUS':<11} {'APPROVALS':>9}  {'ALIASES':<24} SHA256")
    for version in versions:
        print(
            f"  {version.version:>7}  {_status(version.status):<11} {version.approvals:>9}  "
            f"{','.join(version.aliases) or '-':<24} {version.artifact.sha256[:16]}"
        )


def cmd_promote(args: argparse.Namespace, client: RegistryClient) -> None:
    expected = args.expect
    if expected is None:
        # Compare-and-set on what we just read: a promoter racing us makes this fail
        # with ABORTED rather than being silently overwritten.
        current = {a.alias: a.version for a in client.list_aliases(args.model)}
        expected = current.get(args.alias, 0)
    alias = client.set_alias(args.model, args.alias, args.version, expected, args.reason or "")
    was = f"v{expected}" if expected else "unset"
    _emit(args, alias, f"{alias.model}@{alias.alias} -> v{alias.version} (was {was})")


def cmd_unset(args: argparse.Namespace, client: RegistryClient) -> None:
    event = client.delete_alias(args.model, args.alias, args.expect, args.reason or "")
    print(
        _json(event)
        if args.json
        else f"removed {event.model}@{event.alias} (was v{event.from_version})"
    )


def cmd_review(args: argparse.Namespace, client: RegistryClient) -> None:
    response = client.review(args.model, args.version, args.approve, args.comment or "")
    if args.json:
        print(_json(response))
        return
    verb = "approved" if args.approve else "rejected"
    version = response.version
    print(
        f"{verb} {version.model} v{version.version}: {version.approvals} approval(s),"
        f" status {_status(version.status)}"
    )


def cmd_status(args: argparse.Namespace, client: RegistryClient) -> None:
    version = client.set_status(args.model, args.version, STATUSES[args.status], args.reason or "")
    print(
        _json(version)
        if args.json
        else f"{version.model} v{version.version} is now {_status(version.status)}"
    )


def cmd_policy(args: argparse.Namespace, client: RegistryClient) -> None:
    model = client.set_approval_policy(
        args.model, args.required_approvals, args.protect or [], args.allow_self_approval
    )
    guarded = ", ".join(args.protect or []) or "-"
    own = " (an uploader's own approval counts)" if args.allow_self_approval else ""
    _emit(args, model, f"{model.name}: {args.required_approvals} approval(s) before {guarded}{own}")


def cmd_download(args: argparse.Namespace, client: RegistryClient) -> None:
    output = Path(args.output)
    meta = client.download(args.model, output, version=args.version or 0, alias=args.alias or "")
    _emit(
        args,
        meta,
        f"downloaded {meta.model} v{meta.version} to {output}"
        f" (sha256 verified: {meta.artifact.sha256})",
    )


def cmd_history(args: argparse.Namespace, client: RegistryClient) -> None:
    if args.at:
        if not args.alias:
            raise SystemExit("error: --at needs --alias")
        version = client.alias_at(args.model, args.alias, _time(args.at))
        print(f"{args.model}@{args.alias} at {args.at}: v{version}")
        return
    events = client.alias_history(args.model, args.alias or "")
    if args.json:
        print(json.dumps([as_dict(e) for e in events], indent=2))
        return
    for event in events:
        before = f"v{event.from_version}" if event.from_version else "unset"
        after = f"v{event.to_version}" if event.to_version else "unset"
        print(
            f"{_when(event.time)}  {event.alias:<16} {before:>6} -> {after:<6} by {event.actor}"
            f"{': ' + event.reason if event.reason else ''}"
        )


def cmd_audit(args: argparse.Namespace, client: RegistryClient) -> None:
    events = client.audit(
        actor=args.by or "",
        target_prefix=args.target or "",
        action=args.action or "",
        since=_time(args.since) if args.since else None,
        limit=args.limit,
    )
    if args.json:
        print(json.dumps([as_dict(e) for e in events], indent=2))
        return
    for event in events:
        print(
            f"{_when(event.time)}  {event.actor:<16} {event.action:<24} {event.target}"
            f"  {event.details_json}"
        )


def _routes_text(policy: pb.RolloutPolicy) -> str:
    return ", ".join(f"{r.alias} {r.weight}%" for r in policy.routes) or "none"


def _shadow_text(policy: pb.RolloutPolicy) -> str:
    shadow = policy.shadow
    return f"{shadow.alias} {shadow.percent}%" if shadow.percent else "none"


def print_rollout(policy: pb.RolloutPolicy) -> None:
    if not policy.revision:
        print(f"{policy.model}: no rollout policy (each server answers from the alias it follows)")
        return
    print(f"{policy.model} rollout policy, revision {policy.revision}")
    routes = _routes_text(policy)
    if not policy.routes:
        routes += " (each server answers from the alias it follows)"
    print(f"  routes:  {routes}")
    print(f"  shadow:  {_shadow_text(policy)}")
    reason = f": {policy.reason}" if policy.reason else ""
    print(f"  changed: {_when(policy.update_time)} by {policy.updated_by}{reason}")


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole percent") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 100")
    return value


def cmd_rollout(args: argparse.Namespace, client: RegistryClient) -> None:
    changes = args.canary is not None or args.shadow is not None
    if args.off and changes:
        raise InputError("--off turns everything off; it does not go with --canary or --shadow")
    current = client.get_rollout(args.model)
    if not (changes or args.off):
        if args.json:
            print(_json(current))
        else:
            print_rollout(current)
        return
    routes = {r.alias: r.weight for r in current.routes}
    shadow_alias, shadow_percent = current.shadow.alias, current.shadow.percent
    if args.off:
        routes, shadow_alias, shadow_percent = {}, "", 0
    if args.canary is not None:
        if args.canary_alias == args.primary:
            raise InputError("--canary-alias and --primary must be different aliases")
        split = {args.primary: 100 - args.canary, args.canary_alias: args.canary}
        routes = {alias: weight for alias, weight in split.items() if weight > 0}
    if args.shadow is not None:
        shadow_alias, shadow_percent = (args.shadow_alias, args.shadow) if args.shadow else ("", 0)
    expected = current.revision if args.expect is None else args.expect
    policy = client.set_rollout(
        args.model, routes, shadow_alias, shadow_percent, expected, args.reason or ""
    )
    _emit(
        args,
        policy,
        f"{policy.model} rollout revision {policy.revision}: routes {_routes_text(policy)};"
        f" shadow {_shadow_text(policy)}",
    )


def cmd_rollback(args: argparse.Namespace, client: RegistryClient) -> None:
    """Undoes the latest kind of change: an active rollout policy is turned off; without
    one, the alias goes back to the version that held it before its last move."""
    current = client.get_rollout(args.model)
    if current.routes or current.shadow.percent:
        policy = client.set_rollout(
            args.model, {}, "", 0, current.revision, args.reason or "rollback"
        )
        text = (
            f"turned off the rollout policy of {args.model} (revision {policy.revision});"
            f" it routed {_routes_text(current)}, shadow {_shadow_text(current)}"
        )
        if args.json:
            print(json.dumps({"rollout_off": as_dict(policy)}, indent=2))
        else:
            print(text)
        return
    history = client.alias_history(args.model, args.alias)
    if not history:
        raise CommandError(f"{args.model}@{args.alias} was never set; nothing to roll back")
    last = history[-1]
    if not last.to_version:
        raise CommandError(
            f"{args.model}@{args.alias} is not set (removed from v{last.from_version});"
            " nothing to roll back"
        )
    if not last.from_version:
        raise CommandError(
            f"{args.model}@{args.alias} was unset before v{last.to_version}; no earlier version"
            " to roll back to"
        )
    alias = client.set_alias(
        args.model,
        args.alias,
        last.from_version,
        expected_version=last.to_version,
        reason=args.reason or f"rollback from v{last.to_version}",
    )
    if args.json:
        print(json.dumps({"alias_moved": as_dict(alias)}, indent=2))
    else:
        print(
            f"{alias.model}@{alias.alias} -> v{alias.version} (rolled back from v{last.to_version})"
        )


def cmd_watch(args: argparse.Namespace, client: RegistryClient) -> None:
    stream = client.watch(args.model)
    try:
        for event in stream:
            print(json.dumps(as_dict(event)), flush=True)
    except KeyboardInterrupt:
        stream.cancel()  # type: ignore[attr-defined]


# --- parser -------------------------------------------------------------------------------


def _with_version_selector(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--version", type=int, help="version number")
    group.add_argument("--alias", help="alias, e.g. production")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "registry",
        help="register, inspect, promote, approve and download models",
        description="Talk to a registry service. The caller's identity for history and audit "
        "is --actor (sent as x-modelplane-actor).",
    )
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="registry host:port")
    parser.add_argument("--actor", default=None, help="who you are, for history and audit")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print protobuf JSON")
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, handler: Callable[..., None]) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=run, registry_handler=handler)
        return command

    create = add("create", "create a registered model", cmd_create)
    create.add_argument("name", help="model name")
    create.add_argument("--description", help="free text")
    create.add_argument("--owner", help="team or person responsible")
    create.add_argument("--tag", action="append", help="key=value label (repeatable)")
    create.add_argument(
        "--required-approvals",
        type=int,
        default=0,
        help="approvals a version needs before a protected alias",
    )
    create.add_argument("--protect", action="append", help="alias the approvals guard (repeatable)")
    create.add_argument("--allow-self-approval", action="store_true", help=SELF_APPROVAL_HELP)

    reg = add("register", "upload an ONNX file as the model's next version", cmd_register)
    reg.add_argument("model", help="model name")
    reg.add_argument("file", help="ONNX file")
    reg.add_argument("--create", action="store_true", help="create the model if it is missing")
    reg.add_argument(
        "--metadata",
        help="YAML file with description, lineage, card, feature_statistics, serving_config,"
        " feature_input (schema in the README); a flag replaces that field of the file"
        " (--metric the whole metrics list, --param that key)",
    )
    reg.add_argument(
        "--serving-config",
        metavar="CONFIG_PBTXT",
        help="Triton config.pbtxt the inference server uses for this version",
    )
    reg.add_argument(
        "--feature-bundle",
        metavar="NAME",
        help="feature-service bundle whose tensor feeds the model, so callers may send"
        " entity ids instead of it",
    )
    reg.add_argument(
        "--feature-input",
        metavar="INPUT",
        help="the model input the bundle feeds (FP32 [batch, width]); default: the only one",
    )
    reg.add_argument(
        "--missing-features",
        choices=tuple(MISSING_POLICIES),
        help="bundle values that are not PRESENT: reject the request (default) or fill them",
    )
    reg.add_argument("--description", help="version description")
    reg.add_argument("--training-data-ref", help="training data URI or name")
    reg.add_argument("--training-data-version", help="training data version or snapshot")
    reg.add_argument("--code-revision", help="code revision (e.g. git commit)")
    reg.add_argument("--param", action="append", help="training parameter key=value (repeatable)")
    reg.add_argument(
        "--metric",
        action="append",
        help="metric name=value or name=value@slicekey=v,... (repeatable)",
    )
    reg.add_argument("--intended-use", help="model card: intended use")
    reg.add_argument("--out-of-scope-uses", help="model card: out-of-scope uses")
    reg.add_argument("--limitations", help="model card: limitations")
    reg.add_argument("--ethical-considerations", help="model card: ethical considerations")
    reg.add_argument("--evaluation-data", help="model card: evaluation data")

    ls = add("list", "list or search models", cmd_list)
    ls.add_argument("--query", help="substring of name or description")
    ls.add_argument("--owner", help="exact owner")
    ls.add_argument("--tag", action="append", help="key=value the model must carry (repeatable)")

    show = add(
        "show", "show a model and its versions, or one version with its model card", cmd_show
    )
    show.add_argument("model", help="model name")
    _with_version_selector(show, required=False)

    promote = add("promote", "point an alias at a version (compare-and-set)", cmd_promote)
    promote.add_argument("model", help="model name")
    promote.add_argument("alias", help="alias, e.g. production")
    promote.add_argument("version", type=int, help="version to point it at")
    promote.add_argument(
        "--expect",
        type=int,
        default=None,
        help="version expected to hold it now (0: unset); default: as read",
    )
    promote.add_argument("--reason", help="why, kept in the alias history")

    unset = add("unset", "remove an alias (compare-and-set)", cmd_unset)
    unset.add_argument("model", help="model name")
    unset.add_argument("alias", help="alias to remove")
    unset.add_argument("--expect", type=int, required=True, help="version holding it now")
    unset.add_argument("--reason", help="why, kept in the alias history")

    for name, approve in (("approve", True), ("reject", False)):
        review = add(name, f"{name} a version, with a comment", cmd_review)
        review.add_argument("model", help="model name")
        review.add_argument("version", type=int, help="version number")
        review.add_argument("--comment", help="reviewer's comment")
        review.set_defaults(approve=approve)

    status = add("status", "deprecate, archive or reinstate a version", cmd_status)
    status.add_argument("model", help="model name")
    status.add_argument("version", type=int, help="version number")
    status.add_argument("status", choices=sorted(STATUSES), help="new status")
    status.add_argument("--reason", help="why, for the audit log")

    policy = add("policy", "set how many approvals protected aliases need", cmd_policy)
    policy.add_argument("model", help="model name")
    policy.add_argument("--required-approvals", type=int, required=True, help="0 disables")
    policy.add_argument("--protect", action="append", help="alias the approvals guard (repeatable)")
    policy.add_argument("--allow-self-approval", action="store_true", help=SELF_APPROVAL_HELP)

    download = add("download", "download a version's ONNX file, verifying its digest", cmd_download)
    download.add_argument("model", help="model name")
    _with_version_selector(download, required=True)
    download.add_argument("-o", "--output", required=True, help="file to write")

    history = add("history", "alias history, or which version held an alias at a time", cmd_history)
    history.add_argument("model", help="model name")
    history.add_argument("--alias", help="only this alias")
    history.add_argument("--at", help="ISO time: print the version that held --alias then")

    audit = add("audit", "list audit events, newest first", cmd_audit)
    audit.add_argument("--by", help="only this actor")
    audit.add_argument("--target", help="only targets starting with this (model, model@alias)")
    audit.add_argument("--action", help="only this action, e.g. alias.set")
    audit.add_argument("--since", help="ISO time")
    audit.add_argument("--limit", type=int, default=50, help="most events to print")

    rollout = add(
        "rollout",
        "show a model's rollout policy, or change it: split traffic with a canary alias,"
        " mirror a share to a shadow alias, or turn both off (compare-and-set)",
        cmd_rollout,
    )
    rollout.add_argument("model", help="model name")
    rollout.add_argument(
        "--canary",
        type=_percent,
        metavar="PCT",
        help="route PCT%% of requests to --canary-alias, the rest to --primary (keeps the shadow)",
    )
    rollout.add_argument("--canary-alias", default="canary", help="default: canary")
    rollout.add_argument("--primary", default="production", help="default: production")
    rollout.add_argument(
        "--shadow",
        type=_percent,
        metavar="PCT",
        help="mirror PCT%% of requests to --shadow-alias, 0 for none (keeps the routes)",
    )
    rollout.add_argument("--shadow-alias", default="shadow", help="default: shadow")
    rollout.add_argument("--off", action="store_true", help="no routes, no shadow")
    rollout.add_argument(
        "--expect",
        type=int,
        default=None,
        help="revision expected now; default: as read",
    )
    rollout.add_argument("--reason", help="why, for the audit log")

    rollback = add(
        "rollback",
        "turn an active rollout policy off; without one, move the alias back to the version"
        " that held it before its last move (compare-and-set)",
        cmd_rollback,
    )
    rollback.add_argument("model", help="model name")
    rollback.add_argument("--alias", default="production", help="default: production")
    rollback.add_argument("--reason", help="why, kept in the history and audit log")

    watch = add(
        "watch",
        "print a model's aliases and rollout policy, then changes, as JSON lines",
        cmd_watch,
    )
    watch.add_argument("model", help="model name")


def run(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            args.registry_handler(args, client)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CommandError, DigestMismatch, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
