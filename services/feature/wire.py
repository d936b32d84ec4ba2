"""Proto ↔ domain conversion for the columnar messages.

Large numeric columns are written straight into protobuf wire format (a packed
repeated field is the little-endian array behind a tag and a length), then
merged into the response in C: the read path never makes a Python object per
value.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from google.protobuf.duration_pb2 import Duration

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.kernel.errors import InvalidArgument
from modelplane.services.feature.codec import Column
from modelplane.services.feature.domain import (
    Definition,
    Entity,
    FeatureBundle,
    FeatureView,
    ValueType,
    check_entity_count,
    shown,
)
from modelplane.services.feature.online import FeatureResult, SingleEntityRead

_LENGTH_DELIMITED = 2
# Block bytes (numpy's native order) are sliced into packed fields without conversion.
assert sys.byteorder == "little", "the feature wire encoding assumes a little-endian host"
_TYPE_NAMES = {t: t.name.lower() for t in ValueType}


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Tags of length-delimited fields 1..15 (one byte each).
_TAG = [bytes((number << 3 | _LENGTH_DELIMITED,)) for number in range(16)]


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (sub-message, string, bytes or packed array)."""
    return _TAG[number] + _varint(len(payload)) + payload


def _packed(number: int, payload: bytes) -> bytes:
    # proto3 omits empty repeated fields.
    return _TAG[number] + _varint(len(payload)) + payload if payload else b""


_TYPE_FIELD = {t: b"\x08" + _varint(int(t)) for t in ValueType}
_NUMERIC: dict[ValueType, tuple[int, np.dtype]] = {
    ValueType.DOUBLE: (2, np.dtype("<f8")),
    ValueType.INT64: (3, np.dtype("<i8")),
    ValueType.BOOL: (4, np.dtype(np.uint8)),
}


def values_bytes(column: Column) -> bytes:
    """A serialized `Values` message (null slots already blanked by the caller)."""
    numeric = _NUMERIC.get(column.type)
    if numeric is not None:
        number, dtype = numeric
        raw = np.ascontiguousarray(column.values, dtype).tobytes()
        return _TYPE_FIELD[column.type] + _packed(number, raw)
    return _TYPE_FIELD[column.type] + b"".join(
        _field(5, str(v).encode()) for v in column.values.tolist()
    )


@functools.lru_cache(maxsize=4096)
def _ref_field(ref: str) -> bytes:
    encoded = ref.encode()
    return _TAG[1] + _varint(len(encoded)) + encoded


@functools.lru_cache(maxsize=4096)
def _numeric_column_frame(
    ref: str, value_type: ValueType, count: int
) -> tuple[bytes, bytes, bytes, int]:
    """Everything but the data of a numeric `OnlineFeatureColumn` of `count` values:
    the column's own tag and length, its ref, the `values` sub-message header (up to
    its data), the statuses header and the event times header; and the value width.
    Constant for a given ref, type and entity count, so a read only adds the data."""
    number, dtype = _NUMERIC[value_type]
    size = count * dtype.itemsize
    data_header = _TAG[number] + _varint(size) if count else b""
    values_body = len(_TYPE_FIELD[value_type]) + len(data_header) + size
    values = _TAG[2] + _varint(values_body) + _TYPE_FIELD[value_type] + data_header
    statuses = _TAG[3] + _varint(count) if count else b""
    times = _TAG[4] + _varint(count * 8) if count else b""
    ref_field = _ref_field(ref)
    body = len(ref_field) + len(values) + size + len(statuses) + count + len(times) + count * 8
    head = _TAG[3] + _varint(body) + ref_field + values
    return head, statuses, times, dtype.itemsize


def online_response(
    count: int, as_of_us: int, results: Iterable[FeatureResult]
) -> pb.GetOnlineFeaturesResponse:
    """Each feature is a serialized `OnlineFeatureColumn` (field 3) and the response
    is one join of their pieces, merged in C. Status numbers (1..4) are one-byte
    varints, so the packed statuses are the uint8 array itself; int64 and double
    columns are their little-endian bytes, sliced from bytes made once per block."""
    parts: list[bytes] = []
    for result in results:
        block, j = result.block, result.index
        n = block.count
        all_values, all_statuses, all_times = block.raw()
        statuses = all_statuses[j * n : (j + 1) * n]
        times = all_times[j * n * 8 : (j + 1) * n * 8]
        if block.value_type.numeric:
            head, statuses_header, times_header, width = _numeric_column_frame(
                result.ref, block.value_type, n
            )
            values = all_values[j * n * width : (j + 1) * n * width]
            parts += (head, values, statuses_header, statuses, times_header, times)
        else:
            body = b"".join(
                (
                    _ref_field(result.ref),
                    _field(2, values_bytes(result.column)),
                    _packed(3, statuses),
                    _packed(4, times),
                )
            )
            parts += (_TAG[3], _varint(len(body)), body)
    response = pb.GetOnlineFeaturesResponse(entity_count=count, as_of_unix_us=as_of_us)
    response.MergeFromString(b"".join(parts))
    return response


def single_entity_response(read: SingleEntityRead) -> pb.GetOnlineFeaturesResponse:
    """The bytes `online_response` writes for one entity, from values already in
    wire form: a value's little-endian bytes, its status byte, its event time."""
    parts: list[bytes] = []
    for ref, value_type, value, status, event_us in read.features:
        head, statuses_header, times_header, _ = _numeric_column_frame(ref, value_type, 1)
        parts += (
            head,
            value,
            statuses_header,
            _STATUS_BYTE[status],
            times_header,
            event_us.to_bytes(8, "little", signed=True),
        )
    response = pb.GetOnlineFeaturesResponse(entity_count=1, as_of_unix_us=read.as_of_us)
    response.MergeFromString(b"".join(parts))
    return response


_STATUS_BYTE = [bytes((n,)) for n in range(256)]


def tensor_payload(values: np.ndarray, statuses: np.ndarray) -> bytes:
    """The `values` (packed float) and `statuses` fields of GetBundleTensorResponse."""
    return _packed(2, np.ascontiguousarray(values, "<f4").tobytes()) + _packed(
        3, np.ascontiguousarray(statuses, np.uint8).tobytes()
    )


def column_of(values: pb.Values, where: str) -> Column:
    """A request column; its length is checked against the row count by the caller."""
    if values.type == pb.VALUE_TYPE_UNSPECIFIED or values.type not in ValueType._value2member_map_:
        raise InvalidArgument(f"{where}: values.type is not set")
    kind = ValueType(values.type)
    data: np.ndarray
    if kind is ValueType.DOUBLE:
        data = np.array(values.double_values, dtype=np.float64)
    elif kind is ValueType.INT64:
        data = np.array(values.int64_values, dtype=np.int64)
    elif kind is ValueType.BOOL:
        data = np.array(values.bool_values, dtype=bool)
    else:
        data = np.array(list(values.string_values), dtype=object)
    if values.null_mask:
        if len(values.null_mask) != len(data):
            raise InvalidArgument(
                f"{where}: null_mask has {len(values.null_mask)} entries for {len(data)} values"
            )
        null = np.array(values.null_mask, dtype=bool)
    else:
        null = np.zeros(len(data), dtype=bool)
    return Column(kind, data, null)


def key_columns(
    columns: Sequence[pb.EntityKeyColumn], max_entities: int | None = None
) -> dict[str, np.ndarray | list]:
    """The join key columns as arrays; with `max_entities`, more entities than that are
    refused from the message's lengths, before any array is made."""
    if max_entities is not None:
        for column in columns:
            values = column.values
            count = max(len(values.int64_values), len(values.string_values))
            check_entity_count(count, max_entities)
    keys: dict[str, np.ndarray | list] = {}
    for column in columns:
        if column.name in keys:
            raise InvalidArgument(f"join key {shown(column.name)} is given twice")
        kind = column.values.type
        if kind == pb.VALUE_TYPE_INT64:
            ints = column.values.int64_values
            keys[column.name] = np.fromiter(ints, np.int64, len(ints))
        elif kind == pb.VALUE_TYPE_STRING:
            keys[column.name] = list(column.values.string_values)
        else:
            raise InvalidArgument(f"join key {shown(column.name)} must be INT64 or STRING values")
    return keys


def _duration(micros: int) -> Duration:
    return Duration(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1_000)


def definitions_document(message: pb.Definitions) -> dict:
    """The YAML-shaped document of proto definitions, so both go through one parser."""
    return {
        "entities": [
            {
                "name": e.name,
                "join_keys": [
                    {"name": k.name, "type": _type_name(k.type, f"entity {e.name}.{k.name}")}
                    for k in e.join_keys
                ],
                "description": e.description,
            }
            for e in message.entities
        ],
        "feature_views": [
            {
                "name": v.name,
                "entity": v.entity,
                "features": [
                    {
                        "name": f.name,
                        "type": _type_name(f.type, f"{v.name}:{f.name}"),
                        "description": f.description,
                    }
                    for f in v.features
                ],
                "max_age": f"{v.max_age.seconds * 1_000_000 + v.max_age.nanos // 1_000}us",
                "description": v.description,
                **(
                    {
                        "source": {
                            "path": v.source.path,
                            "timestamp_field": v.source.timestamp_field or "event_timestamp",
                        }
                    }
                    if v.HasField("source")
                    else {}
                ),
            }
            for v in message.feature_views
        ],
        "bundles": [
            {
                "name": b.name,
                "features": [
                    {"ref": f.ref, "fill_value": f.fill_value if f.HasField("fill_value") else None}
                    for f in b.features
                ],
                "description": b.description,
            }
            for b in message.bundles
        ],
    }


def _type_name(value: int, where: str) -> str:
    if value not in ValueType._value2member_map_:
        raise InvalidArgument(f"{where}: type is not set")
    return _TYPE_NAMES[ValueType(value)]


def _proto_type(value_type: ValueType) -> pb.ValueType.ValueType:
    return pb.ValueType.Value(f"VALUE_TYPE_{value_type.name}")


def definitions_message(definitions: Iterable[Definition]) -> pb.Definitions:
    message = pb.Definitions()
    for d in definitions:
        if isinstance(d, Entity):
            message.entities.append(
                pb.Entity(
                    name=d.name,
                    join_keys=[
                        pb.JoinKey(name=k.name, type=_proto_type(k.type)) for k in d.join_keys
                    ],
                    description=d.description,
                    version=d.version,
                )
            )
        elif isinstance(d, FeatureView):
            view = pb.FeatureView(
                name=d.name,
                entity=d.entity,
                features=[
                    pb.Feature(name=f.name, type=_proto_type(f.type), description=f.description)
                    for f in d.features
                ],
                max_age=_duration(d.max_age_us),
                description=d.description,
                version=d.version,
            )
            if d.source is not None:
                view.source.path = d.source.path
                view.source.timestamp_field = d.source.timestamp_field
            message.feature_views.append(view)
        elif isinstance(d, FeatureBundle):
            message.bundles.append(
                pb.FeatureBundle(
                    name=d.name,
                    features=[
                        pb.BundleFeature(ref=f.ref, fill_value=f.fill_value)
                        if f.fill_value is not None
                        else pb.BundleFeature(ref=f.ref)
                        for f in d.features
                    ],
                    description=d.description,
                    version=d.version,
                )
            )
    return message
