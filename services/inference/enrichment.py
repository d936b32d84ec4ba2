"""Feature enrichment: a model whose registry version names a feature bundle (its
`FeatureInput`) takes entity ids in place of its input tensor.

A request then carries the bundle's join keys (e.g. `customer_id`, INT64 or BYTES, one
row per entity) instead of the tensor. Such requests batch together like any others;
the runner below, on the runtime instance's thread, makes **one** `GetBundleTensor`
call to the feature service for the whole batch's rows, with a deadline, then runs
the model on the tensor. So enrichment costs one feature-service round trip per batch,
not per request, and while it is in flight the next requests gather in the queue.

What the caller decides (DESIGN.md): when the feature service is down or slow, enriched
requests fail fast with UNAVAILABLE or DEADLINE_EXCEEDED (the whole batch at once);
requests that send tensors, and other models, never touch the feature service. Values
that are not PRESENT follow the version's policy: REJECT fails the row's request with
FAILED_PRECONDITION naming the entity and feature (the batcher then runs the batch's
requests one by one, so only the request with that row fails), FILL keeps the bundle's
fill values (NaN where it names none).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from modelplane.client.feature import FeatureClient, FeatureDataError, FeatureServiceError
from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.kernel.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from modelplane.services.inference.batcher import Runner, Tensors, running_batch

log = logging.getLogger("modelplane.inference.enrichment")

FEATURE_STATUS = "__feature_status"
"""Key of the statuses ([rows, features] int32, FeatureStatus numbers) in the outputs
of an enriched batch; never a model output, and returned only when asked."""
FEATURE_VALUES = "__feature_values"
"""Key of the tensor the model ran on, for the prediction log."""
PRESENT = fpb.FEATURE_STATUS_PRESENT
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """A registry version's FeatureInput, as the registry stores it."""

    bundle: str
    input: str
    reject_missing: bool


@dataclass(frozen=True, slots=True)
class FeatureBinding:
    """A version's FeatureInput, resolved against the model at load."""

    bundle: str
    input: str
    width: int
    reject_missing: bool
    # The bundle's feature references ("view:feature"), in column order, when the
    # feature service could be asked at load: the names its columns are logged under.
    features: tuple[str, ...] = ()


class EnrichmentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "modelplane_inference_feature_calls",
            "GetBundleTensor calls made for enriched batches, by outcome",
            ["model", "outcome"],
            registry=registry,
        )
        self.rows = Counter(
            "modelplane_inference_feature_rows",
            "Entity rows fetched from the feature service",
            ["model"],
            registry=registry,
        )
        self.seconds = Histogram(
            "modelplane_inference_feature_call_seconds",
            "Time of one GetBundleTensor call (one per enriched batch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class FeatureSource:
    """The feature service as the inference service uses it, through its typed client:
    a deadline on every call and no retries on the serving path (a batch's callers are
    waiting; they may retry). The client sends the current trace context along."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        metrics: EnrichmentMetrics,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.address = address
        self._timeout = timeout_s
        self._metrics = metrics
        self._tracer = tracer
        # No wait for the connection: an unreachable service fails the call at once.
        self._client = FeatureClient(address, timeout=timeout_s, connect_timeout=None)

    def close(self) -> None:
        self._client.close()

    def bundle_features(self, bundle: str) -> tuple[str, ...] | None:
        """The bundle's feature references in column order, or None when the service
        cannot be asked now (the width is then checked on every enriched batch)."""
        try:
            definitions = self._client.list_definitions()
        except FeatureServiceError as exc:
            log.warning(
                "feature service %s did not answer (%s); bundle %s is checked per batch",
                self.address,
                exc.code.name,
                bundle,
            )
            return None
        for definition in definitions.bundles:
            if definition.name == bundle:
                return tuple(feature.ref for feature in definition.features)
        raise FailedPrecondition(f"the feature service has no bundle '{bundle[:128]}'")

    def bundle_tensor(
        self, model: str, bundle: str, keys: Tensors
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The bundle's float32 [rows, features] tensor and statuses for these keys."""
        columns = {
            name: [v.decode("utf-8") if isinstance(v, bytes) else v for v in values.tolist()]
            if values.dtype == object
            else values.reshape(-1)
            for name, values in keys.items()
        }
        metrics = self._metrics
        started = time.perf_counter()
        try:
            with self._span(model, bundle):
                found = self._client.get_bundle_tensor(bundle, columns, retry=False)
        except FeatureServiceError as exc:
            metrics.calls.labels(model, exc.code.name.lower()).inc()
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(
                    f"the feature service did not answer within {self._timeout:g}s"
                ) from None
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(f"the feature service at {self.address} is unavailable") from None
            # The keys themselves are wrong (a name or type the bundle does not take).
            raise FailedPrecondition(
                f"the feature service refused the entity keys: {exc.details[:300]}"
            ) from None
        except FeatureDataError as exc:
            metrics.calls.labels(model, "invalid_keys").inc()
            raise FailedPrecondition(f"entity keys: {str(exc)[:300]}") from None
        metrics.seconds.labels(model).observe(time.perf_counter() - started)
        metrics.calls.labels(model, "ok").inc()
        metrics.rows.labels(model).inc(len(found.values))
        return found.values, found.statuses.astype(np.int32), found.features

    @contextlib.contextmanager
    def _span(self, model: str, bundle: str) -> Iterator[None]:
        """With tracing on, one span per feature call, a child of the first caller's
        trace and linked to the others' (the call serves the whole batch); the client
        sends it as the W3C trace context."""
        if self._tracer is None:
            yield
            return
        callers = [r.tag for r in running_batch() if isinstance(r.tag, trace.SpanContext)]
        parent = trace.set_span_in_context(trace.NonRecordingSpan(callers[0])) if callers else None
        with self._tracer.start_as_current_span(
            "inference.features",
            context=parent,
            links=[trace.Link(context) for context in callers[1:]],
            attributes={"model.name": model, "feature.bundle": bundle},
        ):
            yield


def enriching_runner(
    inner: Runner,
    model: str,
    binding: FeatureBinding,
    model_inputs: frozenset[str],
    source: FeatureSource,
) -> Runner:
    """Wraps a runtime instance: batches of key columns are turned into the bundle's
    tensor first; batches that carry the tensor run as they are."""

    def run(feeds: Tensors) -> dict[str, np.ndarray]:
        if binding.input in feeds:
            return inner(feeds)
        keys = {name: value for name, value in feeds.items() if name not in model_inputs}
        others = {name: value for name, value in feeds.items() if name in model_inputs}
        tensor, statuses, features = source.bundle_tensor(model, binding.bundle, keys)
        if tensor.shape[1] != binding.width:
            raise FailedPrecondition(
                f"bundle '{binding.bundle}' has {tensor.shape[1]} features but model "
                f"'{model}' takes {binding.width} in '{binding.input}'"
            )
        if binding.reject_missing:
            missing = np.argwhere(statuses != PRESENT)
            if len(missing):
                row, column = (int(n) for n in missing[0])
                entity = ", ".join(f"{name}={_key_text(keys[name], row)}" for name in keys)
                status = fpb.FeatureStatus.Name(
                    fpb.FeatureStatus.ValueType(int(statuses[row, column]))
                )
                raise FailedPrecondition(
                    f"entity {entity}: feature {features[column]} is "
                    f"{status.removeprefix('FEATURE_STATUS_')}"
                )
        outputs = inner({**others, binding.input: tensor})
        outputs[FEATURE_STATUS] = statuses
        outputs[FEATURE_VALUES] = tensor
        return outputs

    # The batcher lets a runtime place the thread that runs it; keep that ability.
    prepare = getattr(inner, "prepare_thread", None)
    if prepare is not None:
        setattr(run, "prepare_thread", prepare)  # noqa: B010 - a function's attribute
    return run


def _key_text(values: np.ndarray, row: int) -> str:
    value = values.reshape(-1)[row]
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text[:64]
