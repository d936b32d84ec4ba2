"""GetReport: drift, statistics and quality of one model version over a range, built
from stored window statistics (never by re-reading records), so its cost depends on
the range's windows, not on how many rows they hold."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring import drift, quality
from modelplane.services.monitoring.references import References
from modelplane.services.monitoring.statistics import WindowStats
from modelplane.services.monitoring.store import HOUR_US, LabelRow, MonitoringStore
from modelplane.services.monitoring.windows import (
    ceil_minute,
    floor_minute,
    merged_by,
    merged_range,
    read_range,
)

DEFAULT_BUCKETS = 24
MAX_BUCKETS = 500
DEFAULT_RANGE_US = 24 * HOUR_US


def timestamp(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


def bucket_edges(start_us: int, end_us: int, buckets: int) -> list[int]:
    """Bucket boundaries on whole minutes; fewer buckets when the range has fewer minutes."""
    minutes = (end_us - start_us) // 60_000_000
    count = max(1, min(buckets, minutes))
    edges = np.linspace(start_us, end_us, count + 1)
    aligned = sorted({floor_minute(int(e)) for e in edges[:-1]} | {end_us})
    return aligned


def choose_version(store: MonitoringStore, model: str, start_us: int, end_us: int) -> str:
    """The version with the most rows in the range ("" when none has any)."""
    per_version = merged_by(read_range(store, model, "", start_us, end_us))
    counts = {name[0]: w.count for name, w in per_version.items() if name[0]}
    return max(counts, key=lambda v: (counts[v], v)) if counts else ""


def build_report(
    store: MonitoringStore,
    references: References,
    config: pb.MonitorConfig,
    model: str,
    version: str,
    start_us: int | None,
    end_us: int,
    buckets: int,
) -> pb.GetReportResponse:
    end_us = ceil_minute(end_us)
    start_us = floor_minute(start_us if start_us is not None else end_us - DEFAULT_RANGE_US)
    version = version or choose_version(store, model, start_us, end_us)
    window = merged_range(store, model, version, start_us, end_us) if version else WindowStats()
    model_level = merged_range(store, model, "", start_us, end_us)
    reference = references.get(model, version) if version else None
    response = pb.GetReportResponse(
        model_name=model,
        model_version=version,
        count=window.count,
        reference_source=pb.ReferenceSource.ValueType(reference.source if reference else 0),
        reference_count=reference.count if reference else 0,
        columns=drift.drift_reports(
            reference, window.columns, config.drift, output_names=window.outputs
        ),
        config=config,
        rejected=[
            pb.RejectedCount(reason=reason, count=count)
            for reason, count in sorted(model_level.rejected.items())
        ],
    )
    response.start_time.FromDatetime(timestamp(start_us))
    response.end_time.FromDatetime(timestamp(end_us))
    edges = bucket_edges(start_us, end_us, min(buckets or DEFAULT_BUCKETS, MAX_BUCKETS))
    if version:
        response.drift_over_time.extend(
            _drift_points(store, reference, config.drift, model, version, edges)
        )
        labels = store.labels(model, version, start_us, end_us)
        response.quality.extend(quality_points(config, labels, edges))
    response.alerts.extend(_alerts(store, model, start_us, end_us))
    return response


def _drift_points(
    store: MonitoringStore,
    reference: drift.Reference | None,
    policy: pb.DriftPolicy,
    model: str,
    version: str,
    edges: Sequence[int],
) -> list[pb.DriftPoint]:
    points = []
    for start, end in itertools.pairwise(edges):
        window = merged_range(store, model, version, start, end)
        point = pb.DriftPoint(count=window.count)
        point.start_time.FromDatetime(timestamp(start))
        point.end_time.FromDatetime(timestamp(end))
        if reference is not None and window.count:
            for column in drift.drift_reports(reference, window.columns, policy):
                if column.test:
                    point.psi[column.name] = column.psi
                if column.drifted:
                    point.drifted.append(column.name)
        points.append(point)
    return points


def quality_points(
    config: pb.MonitorConfig, labels: Sequence[LabelRow], edges: Sequence[int]
) -> list[pb.QualityPoint]:
    """Quality per bucket and slice value, then over the whole range (unset times); all
    rows under the empty slice. Late labels count in the bucket of their prediction."""
    if not config.task or not labels:
        return []
    threshold = config.decision_threshold or 0.5
    times = np.array([row.time_us for row in labels], dtype=np.int64)
    scores = np.array([row.prediction for row in labels], dtype=np.float64)
    truth = np.array([row.label for row in labels], dtype=np.float64)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, row in enumerate(labels):
        groups[("", "")].append(index)
        for key, value in row.slices.items():
            groups[(key, value)].append(index)
    bucket_of = np.searchsorted(np.asarray(edges[1:]), times, side="right")
    points = []
    for (key, value), members in sorted(groups.items()):
        rows = np.asarray(members)
        for bucket, (start, end) in enumerate(itertools.pairwise(edges)):
            picked = rows[bucket_of[rows] == bucket]
            if len(picked):
                point = _quality(config.task, scores[picked], truth[picked], threshold, key, value)
                point.start_time.FromDatetime(timestamp(start))
                point.end_time.FromDatetime(timestamp(end))
                points.append(point)
        points.append(_quality(config.task, scores[rows], truth[rows], threshold, key, value))
    return points


def _quality(
    task: int, scores: np.ndarray, truth: np.ndarray, threshold: float, key: str, value: str
) -> pb.QualityPoint:
    present = np.isfinite(scores)
    if task == pb.TASK_TYPE_BINARY_CLASSIFICATION:
        present &= (truth == 0) | (truth == 1)  # other labels cannot be judged here
    return pb.QualityPoint(
        slice_key=key,
        slice_value=value,
        labelled=int(present.sum()),
        metrics=quality.quality_metrics(task, scores[present], truth[present], threshold),
    )


def _alerts(store: MonitoringStore, model: str, start_us: int, end_us: int) -> list[pb.Alert]:
    """The model's alerts that were active at some time in the range."""
    found = []
    for row in store.alerts(model, (), 1000):
        alert = pb.Alert.FromString(row.payload)
        started = alert.start_time.ToMicroseconds()
        ended = alert.resolved_time.ToMicroseconds() if alert.HasField("resolved_time") else None
        if started < end_us and (ended is None or ended >= start_us):
            found.append(alert)
    return found
