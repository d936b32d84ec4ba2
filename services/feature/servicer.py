"""FeatureService over gRPC: proto → domain call → proto, nothing else.

Synchronous handlers: their store calls block, so the kernel's aio server runs them on
its handler threads once a request has arrived (see main.build for why not the
synchronous server).
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.kernel.errors import InvalidArgument, ModelplaneError, bounded_message
from modelplane.services.feature import offline, wire
from modelplane.services.feature.definitions import (
    DefinitionRegistry,
    definitions_from_document,
    definitions_from_yaml,
)
from modelplane.services.feature.domain import Status, check_lookup_name
from modelplane.services.feature.files import FileRoots, confine_sources, named_file
from modelplane.services.feature.materialize import Materializer, failure_of_call
from modelplane.services.feature.online import OnlineFeatures

_log = logging.getLogger(__name__)
# Bound on a failed view's reason in MaterializeResponse.
_FAILED_VIEW_BYTES = 256

_CHANGE_KINDS = {
    "created": pb.CHANGE_KIND_CREATED,
    "updated": pb.CHANGE_KIND_UPDATED,
    "unchanged": pb.CHANGE_KIND_UNCHANGED,
}


def _micros(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1_000


def _timestamp(micros: int) -> Timestamp:
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1_000)


class FeatureServicer(pb_grpc.FeatureServiceServicer):
    def __init__(
        self,
        registry: DefinitionRegistry,
        online: OnlineFeatures,
        materializer: Materializer,
        metrics: CollectorRegistry,
        files: FileRoots,
        sources: FileRoots,
    ) -> None:
        self._files = files
        self._sources = sources
        self._registry = registry
        self._online = online
        self._materializer = materializer
        served = Counter(
            "modelplane_feature_values_served",
            "Feature values returned by online reads, by status",
            ["status"],
            registry=metrics,
        )
        self._served = {int(s): served.labels(s.name) for s in Status}
        self._rows = Counter(
            "modelplane_feature_rows_written",
            "Rows written to the online store (pushes and materialization)",
            ["feature_view", "outcome"],
            registry=metrics,
        )
        # Freshness at a glance: alert when a view's materialization falls behind.
        self._watermark = Gauge(
            "modelplane_feature_materialized_until_seconds",
            "End of the last event-time range materialized, per view (Unix seconds)",
            ["feature_view"],
            registry=metrics,
        )
        self._entities_per_read = Histogram(
            "modelplane_feature_entities_per_read",
            f"Entities per online read (at most {online.max_entities})",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
            registry=metrics,
        )

        self._materialize_failures = Counter(
            "modelplane_feature_materialize_failures",
            "Views whose materialization failed (in a run that went on with the others)",
            ["feature_view"],
            registry=metrics,
        )

    def _count_served(self, statuses: np.ndarray) -> None:
        counts = np.bincount(statuses.ravel(), minlength=5).tolist()
        for status, child in self._served.items():
            if counts[status]:
                child.inc(counts[status])

    def ApplyDefinitions(
        self, request: pb.ApplyDefinitionsRequest, context: grpc.ServicerContext
    ) -> pb.ApplyDefinitionsResponse:
        source = request.WhichOneof("source")
        if source == "yaml":
            definitions = definitions_from_yaml(request.yaml)
        elif source == "definitions":
            definitions = definitions_from_document(wire.definitions_document(request.definitions))
        else:
            raise InvalidArgument("give definitions or yaml")
        confine_sources(definitions, self._sources)
        changes = self._registry.apply(definitions, dry_run=request.dry_run)
        return pb.ApplyDefinitionsResponse(
            changes=[
                pb.DefinitionChange(
                    kind=c.kind, name=c.name, version=c.version, change=_CHANGE_KINDS[c.change]
                )
                for c in changes
            ]
        )

    def ListDefinitions(
        self, request: pb.ListDefinitionsRequest, context: grpc.ServicerContext
    ) -> pb.ListDefinitionsResponse:
        catalog = self._registry.catalog
        return pb.ListDefinitionsResponse(
            definitions=wire.definitions_message(
                [*catalog.entities.values(), *catalog.views.values(), *catalog.bundles.values()]
            )
        )

    def WriteFeatures(
        self, request: pb.WriteFeaturesRequest, context: grpc.ServicerContext
    ) -> pb.WriteFeaturesResponse:
        columns = {}
        for column in request.features:
            if column.name in columns:
                raise InvalidArgument(f"feature {column.name!r} is given twice")
            columns[column.name] = wire.column_of(
                column.values, f"feature {request.feature_view}:{column.name}"
            )
        outcome = self._online.write(
            request.feature_view,
            wire.key_columns(request.entity_keys),
            np.array(request.event_time_unix_us, dtype=np.int64),
            columns,
        )
        self._rows.labels(request.feature_view, "written").inc(outcome.written)
        self._rows.labels(request.feature_view, "ignored").inc(outcome.ignored)
        return pb.WriteFeaturesResponse(rows_written=outcome.written, rows_ignored=outcome.ignored)

    def GetOnlineFeatures(
        self, request: pb.GetOnlineFeaturesRequest, context: grpc.ServicerContext
    ) -> pb.GetOnlineFeaturesResponse:
        key_columns = wire.key_columns(request.entity_keys, self._online.max_entities)
        single = self._online.read_single(key_columns, request.features, request.bundle)
        if single is not None:
            self._entities_per_read.observe(1)
            for status, child in self._served.items():  # few statuses: no array for them
                count = single.statuses.count(status)
                if count:
                    child.inc(count)
            return wire.single_entity_response(single)
        result = self._online.read(key_columns, request.features, request.bundle)
        self._entities_per_read.observe(result.count)
        # Counted per value read (a feature asked for twice is read once).
        blocks = {id(f.block): f.block for f in result.features}
        for block in blocks.values():
            self._count_served(block.statuses)
        return wire.online_response(result.count, result.as_of_us, result.features)

    def GetBundleTensor(
        self, request: pb.GetBundleTensorRequest, context: grpc.ServicerContext
    ) -> pb.GetBundleTensorResponse:
        check_lookup_name("bundle", request.bundle)
        key_columns = wire.key_columns(request.entity_keys, self._online.max_entities)
        tensor = self._online.bundle_tensor_single(request.bundle, key_columns)
        if tensor is None:
            tensor = self._online.bundle_tensor(request.bundle, key_columns)
        self._entities_per_read.observe(len(tensor.values))
        self._count_served(tensor.statuses)
        response = pb.GetBundleTensorResponse(
            shape=list(tensor.values.shape),
            features=tensor.refs,
            bundle_version=tensor.bundle_version,
            as_of_unix_us=tensor.as_of_us,
        )
        response.MergeFromString(wire.tensor_payload(tensor.values, tensor.statuses))
        return response

    def Materialize(
        self, request: pb.MaterializeRequest, context: grpc.ServicerContext
    ) -> pb.MaterializeResponse:
        for name in request.feature_views:
            check_lookup_name("feature view", name)
        results = self._materializer.run(
            list(request.feature_views),
            _micros(request.start_time) if request.HasField("start_time") else None,
            _micros(request.end_time) if request.HasField("end_time") else None,
        )
        failure = failure_of_call(results, named=bool(request.feature_views))
        if failure is not None:
            raise failure
        failed = [r for r in results if r.error is not None]
        for r in failed:
            self._materialize_failures.labels(r.view).inc()
            _log.warning("materializing feature view %s failed: %s", r.view, _reason(r.error))
        for r in results:
            if r.error is None:
                self._rows.labels(r.view, "written").inc(r.rows_written)
                self._rows.labels(r.view, "ignored").inc(r.rows_ignored)
                self._watermark.labels(r.view).set(max(r.end_us / 1e6, 0.0))
        return pb.MaterializeResponse(
            views=[
                pb.ViewMaterialization(
                    feature_view=r.view,
                    start_time=_timestamp(r.start_us) if r.error is None else None,
                    end_time=_timestamp(r.end_us) if r.error is None else None,
                    rows_read=r.rows_read,
                    rows_written=r.rows_written,
                    rows_ignored=r.rows_ignored,
                    error=_reason(r.error) if r.error is not None else "",
                )
                for r in results
            ]
        )

    def GetTrainingSet(
        self, request: pb.GetTrainingSetRequest, context: grpc.ServicerContext
    ) -> pb.GetTrainingSetResponse:
        entity_path = (
            str(named_file(self._files, request.entity_path, "entity_path"))
            if request.entity_path
            else ""
        )
        # Checked before the work, so a refused path costs nothing.
        output = (
            named_file(self._files, request.output_path, "output_path")
            if request.output_path
            else None
        )
        entities = offline.read_entity_table(
            parquet=request.entity_parquet, csv=request.entity_csv, path=entity_path
        )
        catalog = self._registry.catalog
        table = offline.training_set(
            catalog,
            entities,
            catalog.refs_of_request(list(request.features), request.bundle),
            request.timestamp_column or "event_timestamp",
            request.include_statuses,
            roots=self._sources,
        )
        response = pb.GetTrainingSetResponse(rows=table.num_rows, columns=table.column_names)
        if output is not None:
            offline.write_new_parquet(table, output, overwrite=request.overwrite)
            response.output_path = str(output)
        else:
            response.parquet = offline.to_parquet_bytes(table)
        return response


def _reason(error: Exception | None) -> str:
    """What a client may read of a view's failure: a domain error's bounded message; an
    unexpected one stays in the log."""
    if isinstance(error, ModelplaneError):
        return bounded_message(str(error), _FAILED_VIEW_BYTES)
    return "internal error (see the service's log)"
