"""A typed, synchronous client of the monitoring service, used by the inference service's
prediction log, the CLI and any Python caller.

Every call has a deadline (`timeout`) that covers its retries. Calls safe to repeat
retry UNAVAILABLE with exponential backoff and full jitter inside the deadline:
`log_predictions` is idempotent by record key (model, request id, row), so a batch sent
twice is stored once; `log_labels` replaces a label with itself; the rest only read.
`set_config` is a compare-and-set at a revision and never retries: a retry of a call
that did land would fail on the revision it had just moved.

`prediction_batch` builds the columnar batch from numpy arrays: feature and output
matrices travel as raw little-endian float32 bytes, row-major.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.client.channel import (  # noqa: F401 - re-exported
    CONNECT_TIMEOUT_S,
    CannotConnect,
    ServiceClient,
)
from modelplane.client.credentials import ClientCredentials
from modelplane.kernel.telemetry import trace_metadata
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
    rejected: Mapping[str, int] = field(default_factory=dict)
    """Records not stored, per reason (a malformed batch, an infinite value)."""
    errors: Sequence[str] = ()
    """What was wrong with each rejected batch, naming the field."""


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
    categorical: Mapping[str, Sequence[str]] | None = None,
) -> pb.PredictionBatch:
    """One model version's records: `features` is [rows, len(feature_names)], each
    output [rows, width]; values are cast to float32. `slices` and `categorical` map a
    column name to one string per row (categorical features travel as strings because
    they have no float32 form; an empty string is a missing value)."""
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
        slices=_string_columns(slices),
        categorical_features=_string_columns(categorical),
    )


def _string_columns(columns: Mapping[str, Sequence[str]] | None) -> list[pb.StringColumn]:
    return [pb.StringColumn(name=name, values=values) for name, values in (columns or {}).items()]


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


def _alerts(call: Any) -> Iterator[pb.Alert]:
    """Unwraps a WatchAlerts stream; a cancelled call (the iterator or the client closed)
    ends the iteration instead of raising, since that is how a watcher stops."""
    try:
        for message in call:
            yield message.alert
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
            raise
    finally:
        call.cancel()


class MonitoringClient(ServiceClient):
    """The monitoring service's client (see ServiceClient for deadlines, connection and
    retries). Every call but `set_config` is idempotent and retried."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = 30.0,
        connect_timeout: float | None = CONNECT_TIMEOUT_S,
        credentials: ClientCredentials | None = None,
    ) -> None:
        super().__init__(
            address,
            timeout,
            connect_timeout,
            options=[("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)],
            credentials=credentials,
        )
        self.stub = pb_grpc.MonitoringServiceStub(self._channel)

    def log_predictions(
        self,
        batches: Sequence[pb.PredictionBatch],
        timeout: float | None = None,
        producer_id: str = "",
        counters: Sequence[pb.ProducerCounters] = (),
    ) -> LogResult:
        """Stores the batches' new records; records already stored count as duplicates,
        a malformed batch or a record with an infinite value is rejected alone (see
        LogResult.rejected and errors).
        `timeout` overrides the client's deadline for this call. `counters` are the
        producer's running totals (drops, failures) under `producer_id`: totals, so a
        retry counts nothing twice."""
        request = pb.LogPredictionsRequest(
            batches=batches, producer_id=producer_id, counters=counters
        )
        response: pb.LogPredictionsResponse = self._idempotent(
            self.stub.LogPredictions, request, timeout
        )
        return LogResult(
            stored=response.stored,
            duplicates=response.duplicates,
            rejected=dict(response.rejected),
            errors=list(response.errors),
        )

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

    def log_labels(
        self,
        model_name: str,
        request_ids: Sequence[str],
        values: Sequence[float] | np.ndarray,
        row_indices: Sequence[int] | np.ndarray | None = None,
        timeout: float | None = None,
    ) -> pb.LogLabelsResponse:
        """Stores ground truth for logged predictions (the class index or the regression
        target per row), at most MAX_RECORDS_PER_CALL of them. Retried: a label sent again
        replaces itself."""
        batch = pb.LabelBatch(
            model_name=model_name,
            request_ids=request_ids,
            row_indices=_as_list(row_indices),
            values=_as_list(values),
        )
        response: pb.LogLabelsResponse = self._idempotent(
            self.stub.LogLabels, pb.LogLabelsRequest(batches=[batch]), timeout
        )
        return response

    def get_config(self, model_name: str) -> pb.MonitorConfig:
        """The model's monitoring configuration; the defaults (revision 0) when none was set."""
        response: pb.GetMonitorConfigResponse = self._idempotent(
            self.stub.GetMonitorConfig, pb.GetMonitorConfigRequest(model_name=model_name)
        )
        return response.config

    def set_config(self, config: pb.MonitorConfig) -> pb.MonitorConfig:
        """Replaces the configuration if `config.revision` is the stored one (ABORTED
        otherwise: read it again and reapply); returns it with its new revision. Never
        retried (see the module's docstring)."""
        response: pb.SetMonitorConfigResponse = self._once(
            self.stub.SetMonitorConfig, pb.SetMonitorConfigRequest(config=config)
        )
        return response.config

    def report(
        self,
        model_name: str,
        model_version: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        buckets: int = 0,
        timeout: float | None = None,
    ) -> pb.GetReportResponse:
        """Drift, statistics, quality and alerts of one version over [start, end)
        (defaults: the version with most rows, the 24 hours before now, 24 buckets).
        `timeout` overrides the client's deadline: a long range reads many windows."""
        request = pb.GetReportRequest(
            model_name=model_name,
            model_version=model_version,
            start_time=_timestamp(start),
            end_time=_timestamp(end),
            buckets=buckets,
        )
        response: pb.GetReportResponse = self._idempotent(self.stub.GetReport, request, timeout)
        return response

    def list_alerts(
        self, model_name: str = "", states: Iterable[pb.AlertState.ValueType] = (), limit: int = 0
    ) -> list[pb.Alert]:
        """Alerts newest first, of one model or all (""), in the given states or all;
        `limit` 0 means the server's default (100)."""
        request = pb.ListAlertsRequest(model_name=model_name, states=list(states), limit=limit)
        response: pb.ListAlertsResponse = self._idempotent(self.stub.ListAlerts, request)
        return list(response.alerts)

    def watch_alerts(
        self, model_name: str = "", timeout: float | None = None
    ) -> Iterator[pb.Alert]:
        """The active alerts, then each alert as it changes, of one model or all ("").

        The stream has no deadline unless `timeout` is given, since a watch is meant to
        last. It ends (the iterator stops, nothing is raised) when it is cancelled:
        close the returned iterator from the thread that consumes it, or close the
        client from any thread. Other failures (the server going away) raise
        grpc.RpcError: the caller decides whether to watch again, and the active
        alerts it then receives first resynchronise it."""
        self.connect()
        call = self.stub.WatchAlerts(
            pb.WatchAlertsRequest(model_name=model_name),
            timeout=timeout,
            metadata=trace_metadata(),
        )
        return _alerts(call)
