"""A typed, synchronous client of the monitoring service, used by the inference service's
prediction log, the CLI and any Python caller.

Every call has a deadline (`timeout`) that covers its retries. Both calls are safe to
repeat: `log_predictions` is idempotent by record key (model, request id, row), so a
batch sent twice is stored once, and `summary` only reads; both retry UNAVAILABLE with
exponential backoff and full jitter inside the deadline.

`prediction_batch` builds the columnar batch from numpy arrays: feature and output
matrices travel as raw little-endian float32 bytes, row-major.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.client.channel import (  # noqa: F401 - re-exported
    CONNECT_TIMEOUT_S,
    CannotConnect,
    ServiceClient,
)
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.monitoring.v1 import monitoring_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50053"
MAX_RECORDS_PER_CALL = 65_536
"""The most records one LogPredictions call may carry (the contract's bound)."""
# gRPC waits up to 120 s between reconnection attempts by default; a monitoring service
# back from a restart should see records again within seconds.
MAX_RECONNECT_BACKOFF_MS = 5_000

FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True)
class LogResult:
    stored: int
    duplicates: int


def _float32_matrix(values: np.ndarray, rows: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[0] != rows:
        raise ValueError(f"{what}: expected a [{rows}, width] matrix, got shape {array.shape}")
    return array.astype(FLOAT32, copy=False)


def prediction_batch(
    model_name: str,
    model_version: str,
    request_ids: Sequence[str],
    latency_ms: Sequence[float] | np.ndarray,
    features: np.ndarray,
    feature_names: Sequence[str],
    outputs: Mapping[str, np.ndarray],
    route: str = "",
    row_indices: Sequence[int] | np.ndarray | None = None,
    time_unix_us: Sequence[int] | np.ndarray | None = None,
    slices: Mapping[str, Sequence[str]] | None = None,
) -> pb.PredictionBatch:
    """One model version's records: `features` is [rows, len(feature_names)], each
    output [rows, width]; values are cast to float32."""
    rows = len(request_ids)
    feature_matrix = _float32_matrix(features, rows, "features")
    if feature_matrix.shape[1] != len(feature_names):
        raise ValueError(
            f"features: {feature_matrix.shape[1]} columns for {len(feature_names)} names"
        )
    matrices = [_float32_matrix(v, rows, f"output '{name}'") for name, v in outputs.items()]
    columns = [
        pb.OutputColumn(name=name, width=m.shape[1])
        for name, m in zip(outputs, matrices, strict=True)
    ]
    # Row-major across outputs: each row holds every output's values, in order.
    if not matrices:
        output_bytes = b""
    elif len(matrices) == 1:
        output_bytes = np.ascontiguousarray(matrices[0]).tobytes()
    else:
        output_bytes = np.concatenate(matrices, axis=1).tobytes()
    return pb.PredictionBatch(
        model_name=model_name,
        model_version=model_version,
        route=route,
        request_ids=request_ids,
        row_indices=_as_list(row_indices),
        time_unix_us=_as_list(time_unix_us),
        latency_ms=_as_list(latency_ms),
        feature_names=feature_names,
        feature_values=np.ascontiguousarray(feature_matrix).tobytes(),
        outputs=columns,
        output_values=output_bytes,
        slices=[
            pb.SliceColumn(name=name, values=values) for name, values in (slices or {}).items()
        ],
    )


def _as_list(values: Sequence[Any] | np.ndarray | None) -> list[Any]:
    if values is None:
        return []
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


class MonitoringClient(ServiceClient):
    """The monitoring service's client (see ServiceClient for deadlines, connection and
    retries; every call here is idempotent: records are keyed by request id)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = 30.0,
        connect_timeout: float | None = CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__(
            address,
            timeout,
            connect_timeout,
            options=[("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)],
        )
        self.stub = pb_grpc.MonitoringServiceStub(self._channel)

    def log_predictions(
        self, batches: Sequence[pb.PredictionBatch], timeout: float | None = None
    ) -> LogResult:
        """Stores the batches (all or none); records already stored count as duplicates.
        `timeout` overrides the client's deadline for this call."""
        request = pb.LogPredictionsRequest(batches=batches)
        response: pb.LogPredictionsResponse = self._idempotent(
            self.stub.LogPredictions, request, timeout
        )
        return LogResult(stored=response.stored, duplicates=response.duplicates)

    def summary(
        self,
        model: str,
        version: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> pb.GetPredictionSummaryResponse:
        """Count, first/last time, latency mean/p50/p99 and counts per version and route
        of a model's records in [start, end)."""
        request = pb.GetPredictionSummaryRequest(
            model_name=model,
            model_version=version,
            start_time=_timestamp(start),
            end_time=_timestamp(end),
        )
        response: pb.GetPredictionSummaryResponse = self._idempotent(
            self.stub.GetPredictionSummary, request
        )
        return response
