"""A typed, synchronous client of the feature service, used by the CLI and any Python
caller: entity keys and feature columns in as numpy arrays (or lists, or a DataFrame),
numpy arrays out.

Every call has a deadline: `timeout`, or `long_timeout` for materialization and
training sets. Calls that are safe to repeat retry UNAVAILABLE with exponential backoff
and full jitter inside that deadline; the others are sent once:
  - reads (`get_online`, `get_bundle_tensor`, `list_definitions`): retried;
  - `write`: retried. The service keeps a row only if it is at least as new as the
    stored one (idempotent by event time), so a write that landed and is sent again
    leaves the same values. The one difference a retry can make: an equal event time
    replaces (a correction), so a retry can undo another writer's correction of the
    same entity at the same event time that landed between the two attempts. Pass
    `retry_writes=False` where that matters;
  - `apply`, `materialize`, `training_set`: sent once. An apply that landed but whose
    answer was lost would be reported as `unchanged` by a retry, and materialization
    and training sets are long jobs a caller should decide to run again.
The first call waits for the connection at most `connect_timeout` seconds and raises
`CannotConnect` if nothing answers, rather than spending the deadline on an address
where no server listens. The current OpenTelemetry trace context travels with every
call (nothing is added when there is none).

Every error status the service answers is raised as a `FeatureServiceError` carrying
the status code and the service's message (`FeatureNotFound` for unknown names,
`InvalidFeatureRequest` for wrong types or shapes, ...); data this client cannot
convert raises `FeatureDataError` before anything is sent.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.client.channel import CONNECT_TIMEOUT_S, ServiceClient
from modelplane.client.credentials import ClientCredentials
from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_ADDRESS = "127.0.0.1:50052"
# The service's limit per WriteFeatures call; `write` sends larger inputs in parts.
MAX_ROWS_PER_WRITE = 100_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# Join key values: ints or strings, as a list or an array.
KeyValues = Sequence[int] | Sequence[str] | np.ndarray
Keys = Mapping[str, KeyValues]


class Status(IntEnum):
    """Status of a returned value (the numbers of `FeatureStatus`)."""

    PRESENT = pb.FEATURE_STATUS_PRESENT
    NOT_FOUND = pb.FEATURE_STATUS_NOT_FOUND
    NULL = pb.FEATURE_STATUS_NULL
    STALE = pb.FEATURE_STATUS_STALE


# Index = status number; 0 (UNSPECIFIED) is never sent.
_STATUS_NAMES = np.array(["UNSPECIFIED", *(s.name for s in Status)], dtype=object)


# --- errors -------------------------------------------------------------------------------


class FeatureServiceError(Exception):
    """The feature service answered `method` with an error status."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class FeatureNotFound(FeatureServiceError, LookupError):
    """NOT_FOUND: a feature, view, bundle or entity the service does not define."""


class InvalidFeatureRequest(FeatureServiceError, ValueError):
    """INVALID_ARGUMENT: wrong types, lengths or values; nothing was written."""


class FeaturePreconditionFailed(FeatureServiceError):
    """FAILED_PRECONDITION: e.g. a source that cannot be read, a definition change that
    would reinterpret stored values."""


class FeatureServiceUnavailable(FeatureServiceError, ConnectionError):
    """UNAVAILABLE: the service (or its online store) cannot be reached."""


class FeatureDeadlineExceeded(FeatureServiceError, TimeoutError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline (retries included)."""


class CannotConnect(FeatureServiceUnavailable):
    """Nothing answered at the address within the connect timeout."""


class FeatureDataError(ValueError):
    """Input this client cannot convert, or a response that does not decode; raised
    before anything is sent (or after the answer arrived)."""


_ERRORS: dict[grpc.StatusCode, type[FeatureServiceError]] = {
    grpc.StatusCode.NOT_FOUND: FeatureNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidFeatureRequest,
    grpc.StatusCode.FAILED_PRECONDITION: FeaturePreconditionFailed,
    grpc.StatusCode.UNAVAILABLE: FeatureServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: FeatureDeadlineExceeded,
}


def error_of(method: str, error: grpc.RpcError) -> FeatureServiceError:
    """The exception for an error status (`FeatureServiceError` for codes without a
    class of their own)."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    return _ERRORS.get(code, FeatureServiceError)(method, code, details)


# --- values -------------------------------------------------------------------------------


def _is_missing(item: Any) -> bool:
    """None, NaN, and pandas' NA and NaT (matched by type name: pandas is optional)."""
    if item is None:
        return True
    if isinstance(item, float | np.floating):
        return math.isnan(item)
    return type(item).__name__ in ("NAType", "NaTType")


def _array_and_nulls(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D array and where it is null: masked entries, None, NaN, pandas' NA/NaT."""
    null: np.ndarray | None = None
    if isinstance(values, np.ma.MaskedArray):
        null = np.ma.getmaskarray(values)
        values = values.data
    array = np.asarray(values)
    if array.ndim != 1:
        raise FeatureDataError(f"expected one value per row, got shape {array.shape}")
    if null is None:
        null = np.zeros(len(array), dtype=bool)
    if array.dtype.kind == "f":
        null = null | np.isnan(array)
    elif array.dtype.kind == "M":
        null = null | np.isnat(array)
    elif array.dtype.kind == "O":
        null = null | np.fromiter((_is_missing(v) for v in array), bool, len(array))
    return array, null


def _all_of(array: np.ndarray, kinds: tuple[type, ...], skip: np.ndarray) -> bool:
    return all(isinstance(v, kinds) for v, s in zip(array.tolist(), skip, strict=True) if not s)


def values_message(
    value_type: pb.ValueType.ValueType, values: Any, what: str, nullable: bool = True
) -> pb.Values:
    """A column as `Values` of the declared type. Ints are accepted for DOUBLE, and
    integral floats for INT64 (pandas makes an int column with gaps float); None, NaN
    and masked entries are null (where `nullable`)."""
    array, null = _array_and_nulls(values)
    if null.any() and not nullable:
        raise FeatureDataError(f"{what} has null values")
    message = pb.Values(type=value_type)
    kind = array.dtype.kind
    if value_type == pb.VALUE_TYPE_STRING:
        if kind == "U":
            message.string_values.extend(array.tolist())
        elif kind == "O" and _all_of(array, (str,), null):
            message.string_values.extend("" if n else v for v, n in zip(array, null, strict=True))
        else:
            raise FeatureDataError(f"{what} is STRING; got {_described(array, null)} values")
    elif value_type == pb.VALUE_TYPE_BOOL:
        if kind == "b" or (kind == "O" and _all_of(array, (bool, np.bool_), null)):
            filled = np.where(null, False, array).astype(bool)
            message.bool_values.extend(filled.tolist())
        else:
            raise FeatureDataError(f"{what} is BOOL; got {_described(array, null)} values")
    elif value_type in (pb.VALUE_TYPE_DOUBLE, pb.VALUE_TYPE_INT64):
        numbers = _numbers(array, null, what, pb.ValueType.Name(value_type)[11:])
        if value_type == pb.VALUE_TYPE_DOUBLE:
            message.double_values.extend(numbers.astype(np.float64).tolist())
        else:
            if numbers.dtype.kind == "f" and not _integral(numbers):
                raise FeatureDataError(f"{what} is INT64; got values that are not integers")
            message.int64_values.extend(numbers.astype(np.int64).tolist())
    else:
        raise FeatureDataError(f"{what}: value type {value_type} is not supported")
    if null.any():
        message.null_mask.extend(null.tolist())
    return message


def _numbers(array: np.ndarray, null: np.ndarray, what: str, type_name: str) -> np.ndarray:
    """Numeric values with nulls as 0; bools and strings are refused."""
    if array.dtype.kind in "iuf":
        return np.where(null, 0, array)
    if array.dtype.kind == "O" and _all_of(array, (int, float, np.integer, np.floating), null):
        if any(isinstance(v, bool | np.bool_) for v in array.tolist()):  # bool is an int
            raise FeatureDataError(f"{what} is {type_name}; got bool values")
        filled = [0 if n else v for v, n in zip(array.tolist(), null, strict=True)]
        return np.asarray(filled)
    raise FeatureDataError(f"{what} is {type_name}; got {_described(array, null)} values")


def _integral(numbers: np.ndarray) -> bool:
    """Floats that convert to int64 exactly."""
    finite = np.isfinite(numbers).all()
    return bool(
        finite
        and np.array_equal(numbers, np.trunc(numbers))
        and (not len(numbers) or np.abs(numbers).max() < 2.0**63)
    )


def _described(array: np.ndarray, null: np.ndarray) -> str:
    if array.dtype.kind in "US":
        return "str" if array.dtype.kind == "U" else "bytes"
    if array.dtype.kind != "O":
        return str(array.dtype)
    kinds = sorted({type(v).__name__ for v, n in zip(array.tolist(), null, strict=True) if not n})
    return "/".join(kinds) or "null"


def decode_values(values: pb.Values) -> np.ndarray:
    """A `Values` message as an array: float64, int64, bool, or object (str)."""
    if values.type == pb.VALUE_TYPE_DOUBLE:
        return np.fromiter(values.double_values, np.float64, len(values.double_values))
    if values.type == pb.VALUE_TYPE_INT64:
        return np.fromiter(values.int64_values, np.int64, len(values.int64_values))
    if values.type == pb.VALUE_TYPE_BOOL:
        return np.fromiter(values.bool_values, bool, len(values.bool_values))
    if values.type == pb.VALUE_TYPE_STRING:
        array = np.empty(len(values.string_values), dtype=object)
        array[:] = list(values.string_values)
        return array
    raise FeatureDataError(f"values of unknown type {values.type}")


def key_column(name: str, values: KeyValues) -> pb.EntityKeyColumn:
    """One join key column, typed by its values: integers are INT64, strings STRING."""
    array, null = _array_and_nulls(values)
    if null.any():
        raise FeatureDataError(f"join key {name!r} has null values")
    kind = array.dtype.kind
    if kind in "iu" or (len(array) == 0 and kind == "f"):
        key_type = pb.VALUE_TYPE_INT64
    elif kind == "U" or (kind == "O" and _all_of(array, (str,), null)):
        key_type = pb.VALUE_TYPE_STRING
    elif (
        kind == "O"
        and _all_of(array, (int, np.integer), null)
        and not any(isinstance(v, bool | np.bool_) for v in array.tolist())
    ):
        key_type = pb.VALUE_TYPE_INT64
    else:
        raise FeatureDataError(
            f"join key {name!r} takes integers or strings, not {_described(array, null)}"
        )
    return pb.EntityKeyColumn(
        name=name, values=values_message(key_type, array, f"join key {name!r}")
    )


def key_columns(keys: Keys) -> list[pb.EntityKeyColumn]:
    if not keys:
        raise FeatureDataError("give the entities' join key columns, e.g. {'customer_id': [1, 2]}")
    lengths = {name: len(values) if np.ndim(values) else 1 for name, values in keys.items()}
    if len(set(lengths.values())) > 1:
        raise FeatureDataError(f"join key columns differ in length: {lengths}")
    return [key_column(name, values) for name, values in keys.items()]


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


def event_times_us(value: Any, rows: int) -> np.ndarray:
    """Event times as int64 microseconds since the epoch, one per row: from datetimes
    (naive ones are UTC), numpy datetime64, or integers (already microseconds). One
    datetime or integer is used for every row."""
    if isinstance(value, datetime):
        return np.full(rows, _micros(value), dtype=np.int64)
    if isinstance(value, int | np.integer | np.datetime64) and not isinstance(value, bool):
        value = [value] * rows
    array, null = _array_and_nulls(value)
    if null.any():
        raise FeatureDataError("event times must not be null")
    if len(array) != rows:
        raise FeatureDataError(f"{len(array)} event times for {rows} rows")
    kind = array.dtype.kind
    if kind == "M":
        return array.astype("datetime64[us]").astype(np.int64)
    if kind in "iu":
        return array.astype(np.int64)
    if kind == "O":
        out = np.empty(rows, dtype=np.int64)
        for i, item in enumerate(array.tolist()):
            if isinstance(item, datetime):
                out[i] = _micros(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                out[i] = item
            else:
                raise FeatureDataError(f"event time {item!r} is not a datetime or an integer")
        return out
    raise FeatureDataError(
        f"event times must be datetimes or integers, not {_described(array, null)}"
    )


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    ts = Timestamp()
    ts.FromMicroseconds(_micros(moment))
    return ts


def _datetime(ts: Timestamp) -> datetime:
    return _EPOCH + timedelta(microseconds=ts.ToMicroseconds())


def _columns(rows: Any) -> dict[str, Any]:
    """Named columns from a mapping or anything with `items()` (a pandas DataFrame)."""
    items = getattr(rows, "items", None)
    if items is None:
        raise FeatureDataError("rows must map column names to values (a dict or a DataFrame)")
    return {str(name): values for name, values in items()}


def write_requests(
    view: pb.FeatureView,
    entity: pb.Entity,
    rows: Any,
    event_time: Any,
    max_rows: int = MAX_ROWS_PER_WRITE,
) -> list[pb.WriteFeaturesRequest]:
    """`rows` (join key columns and every feature of the view) as WriteFeatures requests
    of at most `max_rows` rows each, every value converted to its declared type first.
    `event_time`: the name of a column of `rows`, or the times themselves."""
    columns = _columns(rows)
    if isinstance(event_time, str):
        if event_time not in columns:
            raise FeatureDataError(f"rows have no event time column {event_time!r}")
        event_time = columns.pop(event_time)
    keys = [k.name for k in entity.join_keys]
    features = {f.name: f for f in view.features}
    missing = [name for name in [*keys, *features] if name not in columns]
    if missing:
        raise FeatureDataError(
            f"a write to {view.name!r} carries its join keys and every feature (None where "
            f"unknown); missing: {', '.join(missing)}"
        )
    extra = [name for name in columns if name not in features and name not in keys]
    if extra:
        raise FeatureDataError(
            f"columns that are not in feature view {view.name!r}: {', '.join(extra)}"
        )
    lengths = set()
    for name, values in columns.items():
        shape = np.shape(values)
        if len(shape) != 1:
            raise FeatureDataError(f"column {name!r} must hold one value per row, not {shape}")
        lengths.add(shape[0])
    if len(lengths) > 1:
        raise FeatureDataError(f"columns differ in length: {sorted(lengths)}")
    count = lengths.pop()
    times = event_times_us(event_time, count)
    key_messages = [
        pb.EntityKeyColumn(
            name=k.name,
            values=values_message(k.type, columns[k.name], f"join key {k.name!r}", nullable=False),
        )
        for k in entity.join_keys
    ]
    feature_messages = [
        pb.FeatureColumn(
            name=name,
            values=values_message(feature.type, columns[name], f"feature {view.name}:{name}"),
        )
        for name, feature in features.items()
    ]
    if count <= max_rows:
        return [
            pb.WriteFeaturesRequest(
                feature_view=view.name,
                entity_keys=key_messages,
                event_time_unix_us=times.tolist(),
                features=feature_messages,
            )
        ]
    return [
        pb.WriteFeaturesRequest(
            feature_view=view.name,
            entity_keys=[_part_of_key(c, start, max_rows) for c in key_messages],
            event_time_unix_us=times[start : start + max_rows].tolist(),
            features=[
                pb.FeatureColumn(name=f.name, values=_part(f.values, start, max_rows))
                for f in feature_messages
            ],
        )
        for start in range(0, count, max_rows)
    ]


def _part(values: pb.Values, start: int, size: int) -> pb.Values:
    stop = start + size
    part = pb.Values(type=values.type)
    for name in ("double_values", "int64_values", "bool_values", "string_values", "null_mask"):
        getattr(part, name).extend(getattr(values, name)[start:stop])
    return part


def _part_of_key(column: pb.EntityKeyColumn, start: int, size: int) -> pb.EntityKeyColumn:
    return pb.EntityKeyColumn(name=column.name, values=_part(column.values, start, size))


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineFeatures:
    """One GetOnlineFeatures answer, by feature reference ("view:feature"), in request
    order: `values` (float64, int64, bool, or object arrays of str; a slot whose status
    is not PRESENT holds NaN, 0, False or ""), `statuses` (uint8 `Status` numbers) and
    `event_time_us` (int64 microseconds since the epoch, 0 when NOT_FOUND), one entry
    per entity. `keys` are the join key columns asked about."""

    keys: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    statuses: dict[str, np.ndarray]
    event_time_us: dict[str, np.ndarray]
    as_of_us: int
    entity_count: int

    @property
    def features(self) -> list[str]:
        return list(self.values)

    def __getitem__(self, ref: str) -> np.ndarray:
        return self.values[ref]

    def present(self, ref: str) -> np.ndarray:
        """Where `ref`'s values are PRESENT."""
        return self.statuses[ref] == Status.PRESENT

    def to_arrow(self, statuses: bool = True) -> pa.Table:
        """The key columns, then per feature a column "<view>__<feature>" that is null
        wherever the value is not PRESENT and, with `statuses`, "<view>__<feature>__status"
        (status names): the layout of a training set (`training_set`), so code that reads
        one reads the other."""
        import pyarrow as pa

        table: dict[str, pa.Array] = {}
        for name, key in self.keys.items():
            table[name] = pa.array(key.tolist() if key.dtype.kind == "O" else key)
        for ref, values in self.values.items():
            column = ref.replace(":", "__", 1)
            absent = ~self.present(ref)
            data = values.tolist() if values.dtype.kind == "O" else values
            table[column] = pa.array(data, mask=absent)
            if statuses:
                table[f"{column}__status"] = pa.array(
                    _STATUS_NAMES[self.statuses[ref]].tolist(), pa.string()
                )
        return pa.table(table)

    def to_pandas(self, statuses: bool = True) -> Any:
        """`to_arrow()` as a pandas DataFrame (needs pandas, which modelplane does not
        install: `pip install pandas`)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError(
                "OnlineFeatures.to_pandas needs pandas (pip install pandas); "
                "to_arrow() gives the same table without it"
            ) from None
        return self.to_arrow(statuses).to_pandas()


def online_features(response: pb.GetOnlineFeaturesResponse, keys: Keys) -> OnlineFeatures:
    values: dict[str, np.ndarray] = {}
    statuses: dict[str, np.ndarray] = {}
    times: dict[str, np.ndarray] = {}
    count = response.entity_count
    for column in response.columns:
        decoded = decode_values(column.values)
        status = np.fromiter(column.statuses, np.uint8, len(column.statuses))
        event = np.fromiter(column.event_time_unix_us, np.int64, len(column.event_time_unix_us))
        if not len(decoded) == len(status) == len(event) == count:
            raise FeatureDataError(
                f"the response's column {column.feature!r} has {len(decoded)} values, "
                f"{len(status)} statuses and {len(event)} event times for {count} entities"
            )
        values[column.feature] = decoded
        statuses[column.feature] = status
        times[column.feature] = event
    key_arrays = {name: np.asarray(v) for name, v in keys.items()}
    return OnlineFeatures(key_arrays, values, statuses, times, response.as_of_unix_us, count)


@dataclass(frozen=True)
class BundleTensor:
    """A bundle's features for some entities, ready for a model: `values` float32
    [entities, features] (the bundle's fill value where a status is not PRESENT),
    `statuses` uint8 [entities, features] (`Status` numbers), `features` the references
    in column order, and the bundle version they were read under."""

    values: np.ndarray
    statuses: np.ndarray
    features: list[str]
    bundle_version: int
    as_of_us: int


def bundle_tensor(response: pb.GetBundleTensorResponse) -> BundleTensor:
    shape = tuple(int(d) for d in response.shape)
    size = math.prod(shape) if len(shape) == 2 else -1
    if size != len(response.values) or size != len(response.statuses):
        raise FeatureDataError(
            f"the response's {len(response.values)} values and {len(response.statuses)} "
            f"statuses do not fill shape {list(shape)}"
        )
    values = np.fromiter(response.values, np.float32, size).reshape(shape)
    statuses = np.fromiter(response.statuses, np.uint8, size).reshape(shape)
    return BundleTensor(
        values, statuses, list(response.features), response.bundle_version, response.as_of_unix_us
    )


@dataclass(frozen=True)
class WriteResult:
    written: int  # rows stored
    ignored: int  # rows older than the stored row of their entity


@dataclass(frozen=True)
class DefinitionChange:
    kind: str  # "entity", "feature_view" or "bundle"
    name: str
    version: int
    change: str  # "created", "updated" or "unchanged"


@dataclass(frozen=True)
class Materialization:
    """One view's run: rows read from the source in [start, end), and entities whose
    newest row was stored (`written`) or not, the store holding a newer one (`ignored`)."""

    view: str
    start: datetime
    end: datetime
    rows_read: int
    rows_written: int
    rows_ignored: int
    error: str = ""
    """Why the view was not materialized (an unfiltered call goes on with the others)."""


_CHANGES = {v: k.removeprefix("CHANGE_KIND_").lower() for k, v in pb.ChangeKind.items()}


def resolve_source_paths(document: Any, base: Path) -> Any:
    """Source paths in a definitions file are relative to the file, not to the server."""
    if isinstance(document, dict):
        for view in document.get("feature_views") or []:
            source = view.get("source") if isinstance(view, dict) else None
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                path = Path(source["path"])
                if not path.is_absolute():
                    source["path"] = str((base / path).resolve())
    return document


def definitions_yaml(definitions: str | Path | Mapping[str, Any]) -> str:
    """YAML for ApplyDefinitions: a file (a `Path`, or a str naming a file; its relative
    source paths resolved against its folder), YAML text, or a parsed document."""
    if isinstance(definitions, Mapping):
        return yaml.safe_dump(dict(definitions), sort_keys=False)
    path: Path | None = None
    if isinstance(definitions, Path):
        path = definitions
    elif "\n" not in definitions and (
        definitions.endswith((".yaml", ".yml")) or Path(definitions).is_file()
    ):
        path = Path(definitions)
    if path is None:
        return str(definitions)
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FeatureDataError(f"{path} is not valid YAML: {exc}") from None
    return yaml.safe_dump(resolve_source_paths(document, path.resolve().parent), sort_keys=False)


# --- the client ---------------------------------------------------------------------------


class FeatureClient(ServiceClient):
    """`timeout` bounds each call, retries included; `long_timeout` bounds materialization
    and training sets; `connect_timeout` bounds the wait for the connection before the
    first call (None: no separate wait). Thread-safe: one client can serve many threads."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = 30.0,
        long_timeout: float = 3600.0,
        connect_timeout: float | None = CONNECT_TIMEOUT_S,
        retry_writes: bool = True,
        credentials: ClientCredentials | None = None,
    ) -> None:
        super().__init__(address, timeout, connect_timeout, credentials=credentials)
        self.stub = pb_grpc.FeatureServiceStub(self._channel)
        self.long_timeout = long_timeout
        self.retry_writes = retry_writes
        # View definitions for writes (their join keys and feature types), fetched when a
        # view is first written and dropped when the service refuses a write to it.
        self._views: dict[str, tuple[pb.FeatureView, pb.Entity]] = {}

    def _cannot_connect(self, message: str) -> Exception:
        return CannotConnect("connect", grpc.StatusCode.UNAVAILABLE, message)

    def _call(self, name: str, request: Any, retry: bool, timeout: float | None = None) -> Any:
        """Calls the RPC `name` within one deadline; with `retry`, UNAVAILABLE is retried
        with exponential backoff and full jitter until that deadline. Errors become this
        client's exception classes."""
        method: Callable[..., Any] = getattr(self.stub, name)
        try:
            if retry:
                return self._idempotent(method, request, timeout)
            return self._once(method, request, timeout)
        except grpc.RpcError as exc:
            raise error_of(name, exc) from exc

    # --- reads ----------------------------------------------------------------------------

    def get_online(self, features: Sequence[str] | str, keys: Keys) -> OnlineFeatures:
        """Fresh values of `features` ("view:feature" references, or a bundle's name)
        for the entities whose join keys are `keys` ({join key: values}, ints or strings,
        one value per entity)."""
        request = pb.GetOnlineFeaturesRequest(entity_keys=key_columns(keys))
        if isinstance(features, str) and ":" not in features:
            request.bundle = features
        else:
            request.features.extend([features] if isinstance(features, str) else features)
        response = self._call("GetOnlineFeatures", request, retry=True)
        return online_features(response, keys)

    def get_bundle_tensor(self, bundle: str, keys: Keys, retry: bool = True) -> BundleTensor:
        """The bundle's features for the entities, as a float32 [entities, features]
        tensor with a status per value. `retry=False` fails at once when the service is
        unavailable (for callers, such as a batch of waiting requests, that would rather
        fail fast than wait out the deadline)."""
        request = pb.GetBundleTensorRequest(bundle=bundle, entity_keys=key_columns(keys))
        return bundle_tensor(self._call("GetBundleTensor", request, retry=retry))

    def list_definitions(self) -> pb.Definitions:
        """The current version of every entity, feature view and bundle."""
        response = self._call("ListDefinitions", pb.ListDefinitionsRequest(), retry=True)
        definitions: pb.Definitions = response.definitions
        return definitions

    # --- writes ---------------------------------------------------------------------------

    def _view(self, name: str) -> tuple[pb.FeatureView, pb.Entity]:
        known = self._views.get(name)
        if known is not None:
            return known
        definitions = self.list_definitions()
        entities = {e.name: e for e in definitions.entities}
        for view in definitions.feature_views:
            if view.entity in entities:
                self._views[view.name] = (view, entities[view.entity])
        if name not in self._views:
            raise FeatureNotFound(
                "WriteFeatures", grpc.StatusCode.NOT_FOUND, f"feature view {name!r} is not defined"
            )
        return self._views[name]

    def write(self, view: str, rows: Any, event_time: Any) -> WriteResult:
        """Pushes rows into the online store: `rows` maps the view's join keys and every
        feature of the view to one value per row (a dict of lists or arrays, or a
        DataFrame; None, NaN and masked entries are null); `event_time` is the name of a
        column of `rows`, the times themselves (datetimes, datetime64, or integer
        microseconds since the epoch) or one time for every row. A row older than the
        stored one of its entity is ignored. Values are converted to the view's declared
        types first (its definition is fetched once and kept); more than
        MAX_ROWS_PER_WRITE rows go in several calls, each applied whole or not at all."""
        definition, entity = self._view(view)
        requests = write_requests(definition, entity, rows, event_time)
        written = ignored = 0
        for request in requests:
            try:
                response = self._call("WriteFeatures", request, retry=self.retry_writes)
            except (FeatureNotFound, InvalidFeatureRequest):
                self._views.pop(view, None)  # perhaps redefined: read it again next time
                raise
            written += response.rows_written
            ignored += response.rows_ignored
        return WriteResult(written, ignored)

    def apply(
        self, definitions: str | Path | Mapping[str, Any], dry_run: bool = False
    ) -> list[DefinitionChange]:
        """Creates or updates definitions from a YAML file (a `Path`, or a str naming an
        existing file), YAML text, or a parsed document; each changed definition gets a
        new version. With `dry_run` nothing is stored. Sent once."""
        request = pb.ApplyDefinitionsRequest(yaml=definitions_yaml(definitions), dry_run=dry_run)
        response = self._call("ApplyDefinitions", request, retry=False)
        if not dry_run:
            self._views.clear()
        return [
            DefinitionChange(c.kind, c.name, c.version, _CHANGES.get(c.change, "unspecified"))
            for c in response.changes
        ]

    def materialize(
        self,
        views: Iterable[str] = (),
        start: datetime | None = None,
        end: datetime | None = None,
        timeout: float | None = None,
    ) -> list[Materialization]:
        """Copies each view's newest source row per entity in [start, end) into the online
        store (default: every view with a source, from where its last run stopped, until
        now). Sent once, with `long_timeout` unless `timeout` is given."""
        request = pb.MaterializeRequest(
            feature_views=list(views), start_time=_timestamp(start), end_time=_timestamp(end)
        )
        response = self._call(
            "Materialize", request, retry=False, timeout=timeout or self.long_timeout
        )
        return [
            Materialization(
                v.feature_view,
                _datetime(v.start_time),
                _datetime(v.end_time),
                v.rows_read,
                v.rows_written,
                v.rows_ignored,
                v.error,
            )
            for v in response.views
        ]

    def training_set(
        self,
        entities: Path | bytes | pa.Table,
        features: Sequence[str] | str,
        timestamp_column: str = "event_timestamp",
        statuses: bool = False,
        timeout: float | None = None,
    ) -> pa.Table:
        """Each entity row (join keys and a timestamp column) with every feature's value
        as of its timestamp, never later: `entities` is a Parquet or CSV file (by its
        suffix), Parquet bytes or an Arrow table; `features` references or a bundle's
        name, as in `get_online`. Sent once, with `long_timeout` unless `timeout` is given."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        request = pb.GetTrainingSetRequest(
            timestamp_column=timestamp_column, include_statuses=statuses
        )
        if isinstance(features, str) and ":" not in features:
            request.bundle = features
        else:
            request.features.extend([features] if isinstance(features, str) else features)
        if isinstance(entities, Path):
            data = entities.read_bytes()
            if entities.suffix.lower() == ".csv":
                request.entity_csv = data
            else:
                request.entity_parquet = data
        elif isinstance(entities, bytes):
            request.entity_parquet = entities
        else:
            sink = io.BytesIO()
            pq.write_table(entities, sink)
            request.entity_parquet = sink.getvalue()
        response = self._call(
            "GetTrainingSet", request, retry=False, timeout=timeout or self.long_timeout
        )
        table: pa.Table = pq.read_table(pa.BufferReader(response.parquet))
        return table
