"""One consumer of the group, the loop of stream scoring: claim or read a micro-batch,
parse and enrich it, score it, then publish every prediction and dead letter and
acknowledge the events in one Lua script (nothing unpublished is acknowledged).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np
import redis

from modelplane.client.feature import FeatureClient, FeatureDataError, FeatureServiceError
from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.scoring.stream_config import (
    IDLE_POLL_MS,
    TRANSIENT_BACKOFF_S,
    StreamConfig,
    StreamMetrics,
)
from modelplane.scoring.stream_events import (
    Entry,
    Outcome,
    Poison,
    _fields_json,
    event_ms,
    parse_features,
    parse_key,
)
from modelplane.scoring.stream_model import LoadedModel, ModelFollower
from modelplane.scoring.stream_monitoring import MonitoringLog, _Logged

log = logging.getLogger("modelplane.scoring.stream")

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
