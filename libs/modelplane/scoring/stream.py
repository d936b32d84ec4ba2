"""Stream scoring: a registered model scores the events of a Redis Stream as they arrive
(`modelplane score stream`).

The rule: **an event is acknowledged only once its prediction is published**. Each
consumer of the group reads at most `batch_size` events (XREADGROUP ... COUNT, so memory
stays bounded however long the backlog), scores them as one micro-batch with in-process
ONNX Runtime, and then, in one Lua script (one round trip, executed atomically by
Redis), XADDs every prediction to the output stream and every poison event to the
dead-letter stream, and only then XACKs them. If an XADD fails (Redis out of memory, a
key of the wrong type) the script stops before the XACK: nothing is acknowledged that
was not published. A crash between the script and the next read loses nothing either;
events not yet acknowledged stay pending and are delivered again. Delivery is therefore
at least once: a prediction can be published twice for one event (a consumer that
published but died before its ack was seen, a claim of a slow consumer's events), and
readers de-duplicate by the `event_id` every prediction carries.

Event format (fields of a stream entry):
  - a model that takes a tensor: `features`, a JSON array of numbers, one row of the
    model's single FP32 input ([batch, width]); e.g. `features=[0.1, 2.5, ...]`;
  - a model whose registry version names a feature bundle (`FeatureInput`): the join
    keys of the bundle's entity, one field each (e.g. `customer_id=42`); the features
    come from the online feature service, one GetBundleTensor call per micro-batch.
Other fields are ignored. The event's time is its stream id (`<ms>-<seq>`, the
producer's XADD `*`), from which the end-to-end lag is measured.

Prediction format (fields of an output stream entry): `event_id` (the input entry's
id), `model`, `version`, `outputs` (a JSON object: output name -> the row's values).
Dead-letter entries: `event_id`, `reason` (a short code: `bad_json`, `bad_features`,
`wrong_width`, `missing_key`, `bad_key`, `missing_feature`, `too_many_deliveries`),
`detail` (a sentence) and `fields` (the event's fields as JSON, strings).

Poison events never block the group: an event that cannot be parsed or fails
validation is dead-lettered (and acknowledged) in the micro-batch that read it. An
event that keeps failing for other reasons (the model raises on it, the feature
service is down) is left pending; XAUTOCLAIM hands it out again after `claim_idle_ms`,
and once it has been delivered more than `max_deliveries` times (XPENDING's count) it
is dead-lettered. The same XAUTOCLAIM takes over the pending events of a consumer that
died.

The model follows its alias the way the inference service does: a background thread
re-resolves `name@alias` every `refresh_s`, downloads and verifies a new version
(`scoring.model.fetch`) while the consumers go on with the old one, and swaps it in;
each micro-batch is scored by the one model it started with, so a promotion takes
over between micro-batches.

Consumers are threads of one process sharing one ONNX Runtime session (ORT releases
the GIL while it runs); more processes, on this machine or others, join the same
group by running the command again with another `--consumer`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from modelplane.client.feature import FeatureClient, FeatureDataError, FeatureServiceError
from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.client.registry import RegistryClient
from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.scoring.model import ModelRef, ScoringModel, fetch, resolve

log = logging.getLogger("modelplane.scoring.stream")

MAX_BATCH_SIZE = 4096  # the ack script unpacks every id of a batch onto Lua's stack
IDLE_POLL_MS = 200  # how long an idle read blocks: the bound on noticing a stop
TRANSIENT_BACKOFF_S = 0.5
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
PRESENT = fpb.FEATURE_STATUS_PRESENT

# KEYS: output, input, dead-letter. ARGV: group, output maxlen (0: none), model,
# version, n predictions, then (event id, outputs json) each, n dead letters, then
# (event id, reason, detail, fields json) each. Every XADD comes before the XACK, and
# an error in one stops the script: nothing unpublished is acknowledged.
PUBLISH_AND_ACK = """
local group, maxlen = ARGV[1], tonumber(ARGV[2])
local model, version = ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local i = 6
local ids = {}
for _ = 1, n do
  if maxlen > 0 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'event_id', ARGV[i],
      'model', model, 'version', version, 'outputs', ARGV[i + 1])
  else
    redis.call('XADD', KEYS[1], '*', 'event_id', ARGV[i], 'model', model,
      'version', version, 'outputs', ARGV[i + 1])
  end
  ids[#ids + 1] = ARGV[i]
  i = i + 2
end
local dead = tonumber(ARGV[i])
i = i + 1
for _ = 1, dead do
  redis.call('XADD', KEYS[3], '*', 'event_id', ARGV[i], 'reason', ARGV[i + 1],
    'detail', ARGV[i + 2], 'fields', ARGV[i + 3])
  ids[#ids + 1] = ARGV[i]
  i = i + 4
end
if #ids == 0 then return 0 end
return redis.call('XACK', KEYS[2], group, unpack(ids))
"""


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    registry: str
    model: str  # NAME@ALIAS or NAME/VERSION
    redis_url: str = "redis://127.0.0.1:6379/0"
    input: str = "events"
    output: str = "predictions"
    group: str = "scorers"
    consumer: str = ""  # default: <host>-<pid>; with consumers > 1, suffixed -0, -1, ...
    consumers: int = 1
    dead_letter: str = ""  # default: <input>.dead
    batch_size: int = 256
    max_wait_ms: int = 2  # after a micro-batch's first event, how long to wait for more
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    refresh_s: float = 10.0
    start: str = "0"  # where a new group starts: "0" the whole stream, "$" new events
    output_maxlen: int = 0
    feature_service: str = ""
    feature_timeout_s: float = 2.0
    monitoring: str = ""
    monitoring_sample: float = 1.0
    monitoring_queue: int = 64  # micro-batches waiting to be logged
    metrics_port: int | None = None
    cache_dir: Path = Path(".modelplane/score-cache")
    threads: int = 1  # ONNX Runtime intra-op threads (micro-batches are small)

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be in 1..{MAX_BATCH_SIZE}")
        if self.consumers < 1 or self.max_deliveries < 1 or self.claim_idle_ms < 1:
            raise ValueError("consumers, max deliveries and claim idle time must be >= 1")
        if self.max_wait_ms < 0 or self.refresh_s <= 0:
            raise ValueError("max wait must be >= 0 and refresh > 0")
        if not 0.0 <= self.monitoring_sample <= 1.0:
            raise ValueError("the monitoring sample is a fraction in 0..1")
        ModelRef.parse(self.model)

    @property
    def dead_letter_stream(self) -> str:
        return self.dead_letter or f"{self.input}.dead"

    def consumer_names(self) -> list[str]:
        base = self.consumer or f"{socket.gethostname()}-{os.getpid()}"
        if self.consumers == 1:
            return [base]
        return [f"{base}-{i}" for i in range(self.consumers)]


# --- metrics ------------------------------------------------------------------------------


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "modelplane_stream_events",
            "Events scored and published (rate() gives events/s)",
            ["model", "version"],
            registry=registry,
        )
        self.lag = Histogram(
            "modelplane_stream_lag_seconds",
            "End-to-end lag: the event's stream id time to its prediction published",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "modelplane_stream_batch_events",
            "Events per micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=registry,
        )
        self.failures = Counter(
            "modelplane_stream_failures",
            "Events that failed, by reason (dead-lettered or left pending for a retry)",
            ["reason"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "modelplane_stream_dead_lettered",
            "Events sent to the dead-letter stream, by reason",
            ["reason"],
            registry=registry,
        )
        self.claimed = Counter(
            "modelplane_stream_claimed",
            "Pending events claimed (XAUTOCLAIM) from idle consumers",
            registry=registry,
        )
        self.monitoring_dropped = Counter(
            "modelplane_stream_monitoring_dropped",
            "Prediction records not logged to monitoring (queue full or monitoring failed)",
            ["reason"],
            registry=registry,
        )
        self.monitoring_queue = Gauge(
            "modelplane_stream_monitoring_queue",
            "Micro-batches waiting to be logged to monitoring",
            registry=registry,
        )
        self.model_version = Gauge(
            "modelplane_stream_model_version",
            "The version being scored",
            ["model"],
            registry=registry,
        )
        self.swaps = Counter(
            "modelplane_stream_model_swaps",
            "Times a newly resolved version replaced the scored one",
            registry=registry,
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


# --- the model and its inputs -------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """A bundle model's input: the join keys events carry, and how to read the tensor."""

    bundle: str
    keys: tuple[tuple[str, int], ...]  # (join key, ValueType)
    reject_missing: bool
    features: tuple[str, ...]


@dataclass(frozen=True)
class LoadedModel:
    model: ScoringModel
    input: str
    width: int | None  # None: the model takes any width
    binding: Binding | None

    @property
    def version(self) -> int:
        return self.model.version

    def feature_names(self, width: int) -> list[str]:
        if self.binding is not None:
            return list(self.binding.features)
        return [f"{self.input}_{i}" for i in range(width)]


def bundle_binding(client: FeatureClient, feature_input: rpb.FeatureInput) -> Binding:
    """The bundle's entity join keys, from the feature service's definitions."""
    definitions = client.list_definitions()
    bundle = next((b for b in definitions.bundles if b.name == feature_input.bundle), None)
    if bundle is None or not bundle.features:
        raise ValueError(f"the feature service has no bundle {feature_input.bundle!r}")
    views = {v.name: v for v in definitions.feature_views}
    entities = {e.name: e for e in definitions.entities}
    view = views.get(bundle.features[0].ref.split(":", 1)[0])
    entity = entities.get(view.entity) if view is not None else None
    if entity is None:
        raise ValueError(f"bundle {bundle.name!r}: its entity is not defined")
    return Binding(
        bundle=bundle.name,
        keys=tuple((k.name, k.type) for k in entity.join_keys),
        reject_missing=feature_input.missing_policy != rpb.MISSING_FEATURE_POLICY_FILL,
        features=tuple(f.ref for f in bundle.features),
    )


def load(
    registry: RegistryClient,
    version: rpb.ModelVersion,
    cache_dir: Path,
    threads: int,
    features: FeatureClient | None,
) -> LoadedModel:
    model = fetch(registry, version, cache_dir, threads=threads)
    inputs = model.session.get_inputs()
    binding = None
    if model.feature_input is not None and model.feature_input.bundle:
        if features is None:
            raise ValueError(
                f"{model.name}/{model.version} takes feature bundle "
                f"{model.feature_input.bundle!r}: give --feature-service"
            )
        binding = bundle_binding(features, model.feature_input)
        name = model.feature_input.input or (inputs[0].name if len(inputs) == 1 else "")
    else:
        name = inputs[0].name if len(inputs) == 1 else ""
    spec = next((i for i in inputs if i.name == name), None)
    if spec is None or len(inputs) != 1:
        raise ValueError(f"{model.name}/{model.version}: stream scoring takes one input tensor")
    if spec.type != "tensor(float)" or len(spec.shape) != 2:
        raise ValueError(f"{model.name}/{model.version}: input {name!r} is not FP32 [batch, width]")
    width = spec.shape[1] if isinstance(spec.shape[1], int) else None
    if binding is not None and width is not None and width != len(binding.features):
        raise ValueError(
            f"{model.name}/{model.version}: input width {width}, bundle "
            f"{binding.bundle!r} has {len(binding.features)} features"
        )
    return LoadedModel(model, name, width, binding)


class ModelFollower:
    """The model the consumers score with, kept on its alias by a background thread."""

    def __init__(
        self,
        config: StreamConfig,
        registry: RegistryClient,
        features: FeatureClient | None,
        metrics: StreamMetrics,
    ) -> None:
        self.ref = ModelRef.parse(config.model)
        self._config = config
        self._registry = registry
        self._features = features
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = self._load(resolve(registry, self.ref))

    def _load(self, version: rpb.ModelVersion) -> LoadedModel:
        c = self._config
        loaded = load(self._registry, version, c.cache_dir, c.threads, self._features)
        self._metrics.model_version.labels(loaded.model.name).set(loaded.version)
        return loaded

    def refresh(self) -> bool:
        """Re-resolves the alias; a new version is fetched, verified and loaded before it
        replaces the current one (consumers take it at their next micro-batch)."""
        if not self.ref.alias:
            return False
        version = resolve(self._registry, self.ref)
        if version.version == self.current.version:
            return False
        loaded = self._load(version)
        previous, self.current = self.current, loaded  # one reference swap: atomic
        self._metrics.swaps.inc()
        log.info("%s: version %d replaces %d", self.ref, loaded.version, previous.version)
        return True

    def start(self) -> None:
        if self.ref.alias:
            self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._config.refresh_s):
            try:
                self.refresh()
            except Exception:  # the registry away, a bad artifact: keep the current model
                log.warning(
                    "%s: refresh failed; scoring with version %d",
                    self.ref,
                    self.current.version,
                    exc_info=True,
                )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


# --- monitoring ---------------------------------------------------------------------------


@dataclass
class _Logged:
    model: str
    version: int
    ids: list[str]
    lag_ms: list[float]
    features: np.ndarray
    feature_names: list[str]
    outputs: dict[str, np.ndarray]


class MonitoringLog:
    """Predictions to the monitoring service off the scoring path: a sample of each
    micro-batch goes into a bounded queue (full: dropped and counted), drained by one
    thread with a deadline on each call."""

    def __init__(
        self, address: str, sample: float, bound: int, metrics: StreamMetrics, producer: str
    ) -> None:
        self._client = MonitoringClient(address, timeout=5.0, connect_timeout=None)
        self._sample = sample
        self._queue: queue.Queue[_Logged | None] = queue.Queue(bound)
        self._metrics = metrics
        self._producer = producer
        self._rng = np.random.default_rng()
        self._thread = threading.Thread(target=self._run, name="monitoring-log", daemon=True)
        self._thread.start()

    def offer(self, item: _Logged) -> None:
        rows = len(item.ids)
        if self._sample < 1.0:
            keep = np.flatnonzero(self._rng.random(rows) < self._sample)
            if not len(keep):
                return
            item = _Logged(
                item.model,
                item.version,
                [item.ids[i] for i in keep],
                [item.lag_ms[i] for i in keep],
                item.features[keep],
                item.feature_names,
                {k: v[keep] for k, v in item.outputs.items()},
            )
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._metrics.monitoring_dropped.labels("queue_full").inc(len(item.ids))
        self._metrics.monitoring_queue.set(self._queue.qsize())

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._metrics.monitoring_queue.set(self._queue.qsize())
            outputs = {k: v.reshape(len(item.ids), -1) for k, v in item.outputs.items()}
            batch = prediction_batch(
                item.model,
                str(item.version),
                item.ids,
                item.lag_ms,
                item.features,
                item.feature_names,
                outputs,
                route="stream",
            )
            try:
                self._client.log_predictions([batch], producer_id=self._producer)
            except Exception as exc:  # never the scorer's problem: counted and dropped
                log.debug("monitoring log failed: %s", exc)
                self._metrics.monitoring_dropped.labels("failed").inc(len(item.ids))

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=5)
        self._thread.join(10)
        self._client.close()


# --- one consumer -------------------------------------------------------------------------


class Poison(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def parse_features(raw: bytes | None, width: int | None) -> np.ndarray:
    """One event's `features` field as a float32 row; Poison when it cannot be one."""
    if raw is None:
        raise Poison("bad_features", "the event has no 'features' field")
    try:
        row = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise Poison("bad_json", f"'features' is not JSON: {str(exc)[:200]}") from None
    if not isinstance(row, list) or not row:
        raise Poison("bad_features", "'features' must be a non-empty JSON array of numbers")
    if width is not None and len(row) != width:
        raise Poison("wrong_width", f"'features' has {len(row)} values; the model takes {width}")
    try:
        values = np.array(row, dtype=np.float64)
    except (ValueError, TypeError):
        raise Poison("bad_features", "'features' must hold numbers only") from None
    if values.ndim != 1:
        raise Poison("bad_features", "'features' must be a flat array of numbers")
    values32 = values.astype(np.float32)
    if not np.isfinite(values32).all():
        raise Poison("bad_features", "'features' holds a null or a value out of float32 range")
    return values32


def parse_key(fields: dict[bytes, bytes], name: str, value_type: int) -> int | str:
    raw = fields.get(name.encode())
    if raw is None:
        raise Poison("missing_key", f"the event has no join key field {name!r}")
    try:
        text = raw.decode("utf-8")
        if value_type == fpb.VALUE_TYPE_INT64:
            return int(text)
    except (UnicodeDecodeError, ValueError):
        raise Poison("bad_key", f"join key {name!r} is not an integer") from None
    return text


def event_ms(event_id: str) -> int:
    return int(event_id.split("-", 1)[0])


def _fields_json(fields: dict[bytes, bytes]) -> str:
    return json.dumps(
        {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")[:4096]
            for k, v in fields.items()
        }
    )


@dataclass
class Outcome:
    """What one micro-batch produced."""

    published: list[tuple[str, str]] = field(default_factory=list)  # (event id, outputs)
    dead: list[tuple[str, str, str, str]] = field(default_factory=list)
    pending: int = 0  # left unacknowledged, to be delivered again
    logged: list[_Logged] = field(default_factory=list)  # for monitoring, once published


Entry = tuple[str, dict[bytes, bytes]]


class StreamConsumer:
    """One named consumer of the group: reads, scores, publishes and acknowledges."""

    def __init__(
        self,
        name: str,
        config: StreamConfig,
        follower: ModelFollower,
        features: FeatureClient | None,
        metrics: StreamMetrics,
        monitoring: MonitoringLog | None,
        stop: threading.Event,
    ) -> None:
        self.name = name
        self._config = config
        self._follower = follower
        self._features = features
        self._metrics = metrics
        self._monitoring = monitoring
        self._stop = stop
        self._redis = redis.Redis.from_url(config.redis_url, socket_timeout=30)
        self._publish = self._redis.register_script(PUBLISH_AND_ACK)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self.scored = 0

    # --- the loop ---

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    ensure_group(self._redis, self._config)
                    continue
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("%s: redis unavailable (%s)", self.name, exc)
                self._metrics.failures.labels("redis_unavailable").inc()
                self._stop.wait(TRANSIENT_BACKOFF_S)
        self._redis.close()

    def step(self) -> int:
        """One micro-batch: claimed events first when any are due, else new ones.
        Returns the number of events it handled (0 when nothing was waiting)."""
        entries, deliveries = self._claim()
        if not entries:
            entries = self._read()
            deliveries = {}
        if not entries:
            return 0
        outcome = self.handle(entries, deliveries)
        if outcome.pending:
            self._stop.wait(TRANSIENT_BACKOFF_S)
        return len(entries)

    def _read(self) -> list[Entry]:
        c = self._config
        streams: dict[Any, Any] = {c.input: ">"}
        first = self._redis.xreadgroup(
            c.group, self.name, streams, count=c.batch_size, block=IDLE_POLL_MS
        )
        entries = _entries(first)
        if not entries or c.max_wait_ms == 0 or len(entries) >= c.batch_size:
            return entries
        deadline = time.monotonic() + c.max_wait_ms / 1000
        while len(entries) < c.batch_size:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = self._redis.xreadgroup(
                c.group, self.name, streams, count=c.batch_size - len(entries), block=remaining_ms
            )
            got = _entries(more)
            if not got:
                break
            entries += got
        return entries

    def _claim(self) -> tuple[list[Entry], dict[str, int]]:
        """Pending events idle for `claim_idle_ms` (a dead or stuck consumer's, or our
        own that failed), with how often each has now been delivered."""
        now = time.monotonic()
        if now < self._next_claim:
            return [], {}
        c = self._config
        cursor, claimed, *_ = self._redis.xautoclaim(
            c.input, c.group, self.name, c.claim_idle_ms, self._claim_cursor, count=c.batch_size
        )
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        self._claim_cursor = cursor
        if cursor == "0-0":  # went round the whole pending list: look again later
            self._next_claim = now + max(c.claim_idle_ms / 2000, 0.05)
        entries = [(_id(i), f) for i, f in claimed if f is not None]
        if not entries:
            return [], {}
        self._metrics.claimed.inc(len(entries))
        pending = self._redis.xpending_range(
            c.input,
            c.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 2 + 16,
            consumername=self.name,
        )
        deliveries = {_id(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return entries, deliveries

    # --- one micro-batch ---

    def handle(self, entries: list[Entry], deliveries: dict[str, int]) -> Outcome:
        c = self._config
        model = self._follower.current  # one model for the whole micro-batch
        outcome = Outcome()
        self._metrics.batch_rows.observe(len(entries))

        good: list[Entry] = []
        for event_id, fields in entries:
            if deliveries.get(event_id, 1) > c.max_deliveries:
                outcome.dead.append(
                    (
                        event_id,
                        "too_many_deliveries",
                        f"delivered {deliveries[event_id]} times without being scored",
                        _fields_json(fields),
                    )
                )
            else:
                good.append((event_id, fields))

        rows, ids = self._inputs(model, good, outcome)
        if rows is not None and len(ids):
            self._score(model, rows, ids, outcome)
        self._finish(model, outcome)
        return outcome

    def _inputs(
        self, model: LoadedModel, entries: list[Entry], outcome: Outcome
    ) -> tuple[np.ndarray | None, list[str]]:
        """The rows to score and their event ids; poison events go to `outcome.dead`."""
        ids: list[str] = []
        if model.binding is None:
            vectors: list[np.ndarray] = []
            width = model.width
            for event_id, fields in entries:
                try:
                    row = parse_features(fields.get(b"features"), width)
                except Poison as exc:
                    outcome.dead.append((event_id, exc.reason, exc.detail, _fields_json(fields)))
                    continue
                if width is None:
                    width = len(row)  # a model of any width: the batch's first row decides
                elif len(row) != width:
                    detail = f"'features' has {len(row)} values; this batch has {width}"
                    outcome.dead.append((event_id, "wrong_width", detail, _fields_json(fields)))
                    continue
                vectors.append(row)
                ids.append(event_id)
            return (np.stack(vectors) if vectors else None), ids

        binding = model.binding
        keys: dict[str, Any] = {name: [] for name, _ in binding.keys}
        for event_id, fields in entries:
            try:
                parsed = [parse_key(fields, name, vtype) for name, vtype in binding.keys]
            except Poison as exc:
                outcome.dead.append((event_id, exc.reason, exc.detail, _fields_json(fields)))
                continue
            for (name, _), value in zip(binding.keys, parsed, strict=True):
                keys[name].append(value)
            ids.append(event_id)
        if not ids:
            return None, ids
        assert self._features is not None
        try:
            found = self._features.get_bundle_tensor(binding.bundle, keys, retry=False)
        except (FeatureServiceError, FeatureDataError) as exc:
            # Transient or not, the events stay pending: delivered again after the claim
            # idle time, dead-lettered once they have failed max_deliveries times.
            log.warning("%s: feature service: %s", self.name, str(exc)[:300])
            reason = getattr(getattr(exc, "code", None), "name", "invalid").lower()
            self._metrics.failures.labels(f"feature_{reason}").inc(len(ids))
            outcome.pending += len(ids)
            return None, []
        values = found.values
        if binding.reject_missing:
            missing = (found.statuses != PRESENT).any(axis=1)
            if missing.any():
                keep: list[int] = []
                by_id = dict(entries)
                for i, event_id in enumerate(ids):
                    if not missing[i]:
                        keep.append(i)
                        continue
                    absent = [
                        f
                        for f, s in zip(found.features, found.statuses[i], strict=True)
                        if s != PRESENT
                    ]
                    detail = f"features not present: {', '.join(absent)[:300]}"
                    outcome.dead.append(
                        (event_id, "missing_feature", detail, _fields_json(by_id[event_id]))
                    )
                values = values[keep]
                ids = [ids[i] for i in keep]
        return values, ids

    def _score(
        self, model: LoadedModel, rows: np.ndarray, ids: list[str], outcome: Outcome
    ) -> None:
        try:
            results = [(rows, ids, model.model.run({model.input: rows}))]
        except Exception:
            # One row may be at fault: score them one by one; the rows that fail alone
            # stay pending (dead-lettered after max_deliveries).
            results = []
            for i, event_id in enumerate(ids):
                try:
                    one = model.model.run({model.input: rows[i : i + 1]})
                except Exception as exc:
                    log.warning("%s: event %s: the model failed: %s", self.name, event_id, exc)
                    self._metrics.failures.labels("model_error").inc()
                    outcome.pending += 1
                    continue
                results.append((rows[i : i + 1], [event_id], one))
        for batch_rows, batch_ids, outputs in results:
            flat = {k: np.asarray(v).reshape(len(batch_ids), -1) for k, v in outputs.items()}
            as_lists = {k: v.tolist() for k, v in flat.items()}
            for i, event_id in enumerate(batch_ids):
                payload = json.dumps({k: v[i] for k, v in as_lists.items()})
                outcome.published.append((event_id, payload))
            if self._monitoring is not None:
                outcome.logged.append(
                    _Logged(
                        model.model.name,
                        model.version,
                        list(batch_ids),
                        [],  # the lag, once published
                        batch_rows,
                        model.feature_names(batch_rows.shape[1]),
                        flat,
                    )
                )

    def _finish(self, model: LoadedModel, outcome: Outcome) -> None:
        c = self._config
        if not outcome.published and not outcome.dead:
            return
        args: list[Any] = [
            c.group,
            c.output_maxlen,
            model.model.name,
            model.version,
            len(outcome.published),
        ]
        for event_id, payload in outcome.published:
            args += (event_id, payload)
        args.append(len(outcome.dead))
        for dead in outcome.dead:
            args += dead
        self._publish(keys=[c.output, c.input, c.dead_letter_stream], args=args)
        now_ms = time.time() * 1000
        m = self._metrics
        if outcome.published:
            m.events.labels(model.model.name, str(model.version)).inc(len(outcome.published))
            for event_id, _ in outcome.published:
                m.lag.observe(max(now_ms - event_ms(event_id), 0.0) / 1000)
            self.scored += len(outcome.published)
        if self._monitoring is not None:
            for item in outcome.logged:
                item.lag_ms = [max(now_ms - event_ms(i), 0.0) for i in item.ids]
                self._monitoring.offer(item)
        for _, reason, _, _ in outcome.dead:
            m.failures.labels(reason).inc()
            m.dead_lettered.labels(reason).inc()


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(response: Any) -> list[Entry]:
    if not response:
        return []
    # redis-py answers XREADGROUP as [[stream, [(id, fields), ...]]] (RESP2).
    _, items = response[0]
    return [(_id(i), f) for i, f in items if f is not None]


def ensure_group(client: redis.Redis, config: StreamConfig) -> None:
    """Creates the consumer group (and the stream) unless it exists."""
    try:
        client.xgroup_create(config.input, config.group, id=config.start, mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# --- the scorer: N consumers, one model -----------------------------------------------------


class StreamScorer:
    """The consumers of one process, their model, metrics and monitoring log."""

    def __init__(self, config: StreamConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = StreamMetrics(registry or CollectorRegistry())
        self._stop = threading.Event()
        self._registry = RegistryClient(config.registry, actor="modelplane-score-stream")
        self._features = (
            FeatureClient(
                config.feature_service, timeout=config.feature_timeout_s, connect_timeout=None
            )
            if config.feature_service
            else None
        )
        try:
            self.follower = ModelFollower(config, self._registry, self._features, self.metrics)
        except Exception:
            self._close_clients()
            raise
        names = config.consumer_names()
        self.monitoring = (
            MonitoringLog(
                config.monitoring,
                config.monitoring_sample,
                config.monitoring_queue,
                self.metrics,
                names[0],
            )
            if config.monitoring
            else None
        )
        with redis.Redis.from_url(config.redis_url) as client:
            ensure_group(client, config)
        self.consumers = [
            StreamConsumer(
                name,
                config,
                self.follower,
                self._features,
                self.metrics,
                self.monitoring,
                self._stop,
            )
            for name in names
        ]
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> None:
        if self.config.metrics_port is not None:
            start_http_server(self.config.metrics_port, "127.0.0.1", self.metrics.registry)
        self.follower.start()
        for consumer in self.consumers:
            thread = threading.Thread(
                target=self._guarded, args=(consumer.run,), name=consumer.name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _guarded(self, run: Callable[[], None]) -> None:
        try:
            run()
        except BaseException as exc:  # a consumer that dies stops the scorer, loudly
            log.exception("consumer failed")
            self.errors.append(exc)
            self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until stopped (True) or `timeout` passes (False)."""
        return self._stop.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self.follower.stop()
        if self.monitoring is not None:
            self.monitoring.close()
        self._close_clients()

    def _close_clients(self) -> None:
        self._registry.close()
        if self._features is not None:
            self._features.close()

    def __enter__(self) -> StreamScorer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# --- command line -------------------------------------------------------------------------

EPILOG = """\
events (fields of an entry of the input stream):
  features=[0.1, 2.5, ...]    a JSON array, one row of the model's FP32 input
  customer_id=42              for a model that names a feature bundle: its join keys
predictions (output stream): event_id, model, version, outputs={"<output>": [...]}
dead letters: event_id, reason, detail, fields
delivery is at least once: de-duplicate predictions by event_id.
example:
  modelplane score stream --registry 127.0.0.1:50051 --model fraud@production \\
      --redis redis://127.0.0.1:6379/0 --input events --output predictions --group scorers
"""


def register_stream(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `stream` to the `score` command group's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "stream",
        help="score the events of a Redis Stream with a registered model",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_stream_arguments(parser)
    parser.set_defaults(handler=run_stream)
    return parser


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    d = StreamConfig(registry="", model="m")
    a = parser.add_argument
    a("--registry", required=True, help="registry host:port")
    a("--model", required=True, help="NAME@ALIAS (followed) or NAME/VERSION")
    a("--redis", default=d.redis_url, help="Redis URL (default %(default)s)")
    a("--input", default=d.input, help="input stream (default %(default)s)")
    a("--output", default=d.output, help="prediction stream (default %(default)s)")
    a("--group", default=d.group, help="consumer group (default %(default)s)")
    a("--consumer", default="", help="consumer name (default HOST-PID)")
    a("--consumers", type=int, default=1, help="consumers (threads) in this process")
    a("--dead-letter", default="", help="dead-letter stream (default INPUT.dead)")
    a("--batch-size", type=int, default=d.batch_size, help="events per micro-batch, at most")
    a(
        "--max-wait-ms",
        type=int,
        default=d.max_wait_ms,
        help="wait for more events after a micro-batch's first (default %(default)s)",
    )
    a(
        "--claim-idle-ms",
        type=int,
        default=d.claim_idle_ms,
        help="claim events pending this long on another consumer (default %(default)s)",
    )
    a(
        "--max-deliveries",
        type=int,
        default=d.max_deliveries,
        help="dead-letter an event delivered more often (default %(default)s)",
    )
    a("--refresh-s", type=float, default=d.refresh_s, help="re-resolve the alias this often")
    a(
        "--from",
        dest="start",
        choices=("start", "new"),
        default="start",
        help="where a new group begins: the whole stream or new events (default %(default)s)",
    )
    a("--output-maxlen", type=int, default=0, help="trim the output stream to about this")
    a("--feature-service", default="", help="feature service host:port (bundle models)")
    a("--feature-timeout", type=float, default=d.feature_timeout_s, help="seconds per call")
    a("--monitoring", default="", help="monitoring host:port: log predictions there")
    a("--monitoring-sample", type=float, default=1.0, help="fraction of events logged")
    a("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1")
    a("--cache-dir", type=Path, default=d.cache_dir, help="verified model artifacts")
    a("--threads", type=int, default=d.threads, help="ONNX Runtime intra-op threads")


def config_from_args(args: argparse.Namespace) -> StreamConfig:
    return StreamConfig(
        registry=args.registry,
        model=args.model,
        redis_url=args.redis,
        input=args.input,
        output=args.output,
        group=args.group,
        consumer=args.consumer,
        consumers=args.consumers,
        dead_letter=args.dead_letter,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        claim_idle_ms=args.claim_idle_ms,
        max_deliveries=args.max_deliveries,
        refresh_s=args.refresh_s,
        start="$" if args.start == "new" else "0",
        output_maxlen=args.output_maxlen,
        feature_service=args.feature_service,
        feature_timeout_s=args.feature_timeout,
        monitoring=args.monitoring,
        monitoring_sample=args.monitoring_sample,
        metrics_port=args.metrics_port,
        cache_dir=args.cache_dir,
        threads=args.threads,
    )


def run_stream(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
        scorer = StreamScorer(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        print(f"error: registry: {code.name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (redis.exceptions.ConnectionError, FeatureServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        scorer._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    scorer.start()
    model = scorer.follower.current
    print(
        json.dumps(
            {
                "event": "scoring",
                "model": model.model.name,
                "version": model.version,
                "consumers": config.consumer_names(),
            }
        ),
        flush=True,
    )
    try:
        last, last_t = 0, time.monotonic()
        while not scorer.wait(10.0):
            done = sum(c.scored for c in scorer.consumers)
            now = time.monotonic()
            dead = sum(
                s.value
                for metric in scorer.metrics.registry.collect()
                if metric.name == "modelplane_stream_dead_lettered"
                for s in metric.samples
                if s.name.endswith("_total")
            )
            log.info(
                "%.0f events/s, %d scored, %d dead-lettered, version %d",
                (done - last) / (now - last_t),
                done,
                dead,
                scorer.follower.current.version,
            )
            last, last_t = done, now
    finally:
        scorer.stop()
    return 1 if scorer.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modelplane.scoring.stream ...`: the same as `modelplane score stream`."""
    parser = argparse.ArgumentParser(
        prog="modelplane score stream",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_stream_arguments(parser)
    return run_stream(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
