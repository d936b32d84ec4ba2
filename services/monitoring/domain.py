"""Prediction records and summaries: the rules, free of gRPC and SQL.

Records arrive in columnar batches of one model version (`PredictionBatch`): one entry
per row in each column, numeric tensors as float32 matrices. A record is one row of one
request, keyed by (model name, request id, row index): the store keeps the first copy
of a key and counts later ones as duplicates, so a retried batch is stored once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.monitoring.statistics import WindowStats

# One LogPredictions call is bounded so one caller cannot hold the store for long.
MAX_RECORDS_PER_CALL = 65_536
# Feature (or output) values per row; a wider batch is refused.
MAX_COLUMNS = 16_384
MAX_REQUEST_ID_CHARS = 256
MAX_NAME_CHARS = 256

FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True)
class PredictionBatch:
    """Records of one model version, validated (see `decode_batch`)."""

    model_name: str
    model_version: str
    route: str
    request_ids: Sequence[str]
    row_indices: np.ndarray  # int64 [rows]
    time_us: np.ndarray  # int64 [rows], microseconds since the epoch
    latency_ms: np.ndarray  # float64 [rows]
    feature_names: tuple[str, ...]
    features: np.ndarray  # float32 [rows, len(feature_names)]
    output_names: tuple[str, ...]
    output_widths: tuple[int, ...]
    outputs: np.ndarray  # float32 [rows, sum(output_widths)]
    slices: Mapping[str, Sequence[str]] = field(default_factory=dict)
    categorical: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.request_ids)

    def finite_rows(self) -> np.ndarray:
        """Rows without an infinite feature or output value (NaN is a missing value)."""
        return ~(np.isinf(self.features).any(axis=1) | np.isinf(self.outputs).any(axis=1))


@dataclass(frozen=True)
class StoredRecord:
    """One stored record, as read back."""

    model_name: str
    model_version: str
    route: str
    request_id: str
    row_index: int
    time: datetime
    latency_ms: float
    features: dict[str, float]
    outputs: dict[str, tuple[float, ...]]
    slices: dict[str, str]


@dataclass(frozen=True)
class VersionRouteCount:
    model_version: str
    route: str
    count: int


@dataclass(frozen=True)
class PredictionSummary:
    count: int
    first_time: datetime | None
    last_time: datetime | None
    mean_latency_ms: float
    p50_latency_ms: float
    p99_latency_ms: float
    by_version_route: tuple[VersionRouteCount, ...] = ()


def _names(where: str, names: Sequence[str]) -> tuple[str, ...]:
    result = tuple(names)
    if len(result) > MAX_COLUMNS:
        raise InvalidArgument(f"{where}: at most {MAX_COLUMNS} names, got {len(result)}")
    seen: set[str] = set()
    for index, name in enumerate(result):
        if not name or len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(f"{where}[{index}]: a name of 1..{MAX_NAME_CHARS} characters")
        if name in seen:
            raise InvalidArgument(f"{where}[{index}]: '{name[:64]}' appears more than once")
        seen.add(name)
    return result


def _matrix(where: str, data: bytes, rows: int, width: int) -> np.ndarray:
    expected = rows * width * FLOAT32.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{where}: {len(data)} bytes, but {rows} rows x {width} float32 values need {expected}"
        )
    return np.frombuffer(data, dtype=FLOAT32).reshape(rows, width)


def decode_batch(
    where: str,
    *,
    model_name: str,
    model_version: str,
    route: str,
    request_ids: Sequence[str],
    row_indices: Sequence[int],
    time_unix_us: Sequence[int],
    latency_ms: Sequence[float],
    feature_names: Sequence[str],
    feature_values: bytes,
    output_names: Sequence[str],
    output_widths: Sequence[int],
    output_values: bytes,
    slices: Mapping[str, Sequence[str]],
    now_us: int,
    categorical: Mapping[str, Sequence[str]] | None = None,
) -> PredictionBatch:
    """One batch's columns, checked: every column has one entry per row, the value
    matrices match their names and widths, latencies are finite and non-negative.
    `where` (e.g. "batches[2]") starts every error message, naming the field."""
    if not model_name:
        raise InvalidArgument(f"{where}.model_name is empty")
    if not model_version:
        raise InvalidArgument(f"{where}.model_version is empty")
    ids = list(request_ids)
    rows = len(ids)
    if rows == 0:
        raise InvalidArgument(f"{where}.request_ids is empty: a batch has at least one row")
    if not all(ids):
        raise InvalidArgument(f"{where}.request_ids[{ids.index('')}] is empty")
    if max(map(len, ids)) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"{where}.request_ids: an id is longer than {MAX_REQUEST_ID_CHARS} characters"
        )

    def column(name: str, values: Sequence[float] | Sequence[int], dtype: type) -> np.ndarray:
        if len(values) != rows:
            raise InvalidArgument(
                f"{where}.{name} has {len(values)} entries for {rows} rows (request_ids)"
            )
        return np.fromiter(values, dtype=dtype, count=rows)

    indices = (
        column("row_indices", row_indices, np.int64)
        if len(row_indices)
        else np.zeros(rows, np.int64)
    )
    times = (
        column("time_unix_us", time_unix_us, np.int64)
        if len(time_unix_us)
        else np.full(rows, now_us, np.int64)
    )
    latencies = column("latency_ms", latency_ms, np.float64)
    if not (np.isfinite(latencies).all() and (latencies >= 0).all()):
        bad = int(np.flatnonzero(~(np.isfinite(latencies) & (latencies >= 0)))[0])
        raise InvalidArgument(
            f"{where}.latency_ms[{bad}] is {latencies[bad]}: it must be a finite number >= 0"
        )
    features_names = _names(f"{where}.feature_names", feature_names)
    features = _matrix(f"{where}.feature_values", feature_values, rows, len(features_names))
    outputs_names = _names(f"{where}.outputs.name", output_names)
    widths = tuple(int(w) for w in output_widths)
    if len(widths) != len(outputs_names):
        raise InvalidArgument(f"{where}.outputs: {len(outputs_names)} names, {len(widths)} widths")
    for index, width in enumerate(widths):
        if width < 1:
            raise InvalidArgument(f"{where}.outputs[{index}].width is 0: at least 1")
    if sum(widths) > MAX_COLUMNS:
        raise InvalidArgument(f"{where}.outputs: at most {MAX_COLUMNS} values per row in all")
    outputs = _matrix(f"{where}.output_values", output_values, rows, sum(widths))
    checked_slices = _string_columns(f"{where}.slices", slices, rows)
    checked_categorical = _string_columns(f"{where}.categorical_features", categorical or {}, rows)
    clash = set(checked_categorical) & {*features_names, *outputs_names}
    if clash:
        raise InvalidArgument(
            f"{where}.categorical_features: '{sorted(clash)[0][:64]}' is also a numeric column"
        )
    return PredictionBatch(
        model_name=model_name,
        model_version=model_version,
        route=route,
        request_ids=ids,
        row_indices=indices,
        time_us=times,
        latency_ms=latencies,
        feature_names=features_names,
        features=features,
        output_names=outputs_names,
        output_widths=widths,
        outputs=outputs,
        slices=checked_slices,
        categorical=checked_categorical,
    )


def _string_columns(
    where: str, columns: Mapping[str, Sequence[str]], rows: int
) -> dict[str, Sequence[str]]:
    checked: dict[str, Sequence[str]] = {}
    for name in _names(f"{where}.name", list(columns)):
        values = columns[name]
        if len(values) != rows:
            raise InvalidArgument(f"{where} '{name[:64]}' has {len(values)} values for {rows} rows")
        checked[name] = list(values)
    return checked


def check_call_size(rows: int) -> None:
    if rows > MAX_RECORDS_PER_CALL:
        raise InvalidArgument(
            f"at most {MAX_RECORDS_PER_CALL} records per call, got {rows}; split the batches"
        )


def summary_of(windows: Mapping[str, WindowStats]) -> PredictionSummary:
    """The summary of a range from its statistics per version. Latency percentiles come
    from the mergeable quantile sketch (within its ~1 % rank error), not from the rows."""
    merged = WindowStats()
    counts: list[VersionRouteCount] = []
    for version, window in windows.items():
        merged.merge(window)
        counts.extend(VersionRouteCount(version, route, n) for route, n in window.routes.items())
    if not merged.count:
        return PredictionSummary(0, None, None, 0.0, 0.0, 0.0)
    p50, p99 = merged.latency.quantiles([0.5, 0.99]).tolist()
    return PredictionSummary(
        count=merged.count,
        first_time=datetime.fromtimestamp(merged.first_us / 1e6, tz=UTC),
        last_time=datetime.fromtimestamp(merged.last_us / 1e6, tz=UTC),
        mean_latency_ms=merged.latency_sum_ms / merged.count,
        p50_latency_ms=p50,
        p99_latency_ms=p99,
        by_version_route=tuple(sorted(counts, key=lambda c: (-c.count, c.model_version, c.route))),
    )
