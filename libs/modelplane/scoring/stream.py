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
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import redis
from prometheus_client import CollectorRegistry, start_http_server

from modelplane.client.feature import FeatureClient, FeatureServiceError
from modelplane.client.registry import RegistryClient
from modelplane.scoring.stream_config import (
    IDLE_POLL_MS,
    LAG_BUCKETS,
    MAX_BATCH_SIZE,
    TRANSIENT_BACKOFF_S,
    StreamConfig,
    StreamMetrics,
)
from modelplane.scoring.stream_consumer import (
    PRESENT,
    PUBLISH_AND_ACK,
    StreamConsumer,
    ensure_group,
)
from modelplane.scoring.stream_events import (
    Entry,
    Outcome,
    Poison,
    event_ms,
    parse_features,
    parse_key,
)
from modelplane.scoring.stream_model import (
    Binding,
    LoadedModel,
    ModelFollower,
    bundle_binding,
    load,
)
from modelplane.scoring.stream_monitoring import MonitoringLog

# The modules stream scoring is made of (stream.py keeps the scorer and the command line):
#   stream_config      StreamConfig and StreamMetrics
#   stream_model       the model, its feeding (bundle enrichment) and its alias follower
#   stream_events      parsing events, poison events and their dead-letter reasons
#   stream_consumer    the consumer loop: claim/read, enrich, score, publish and ack
#   stream_monitoring  predictions to monitoring, off the scoring path
__all__ = [
    "IDLE_POLL_MS",
    "LAG_BUCKETS",
    "MAX_BATCH_SIZE",
    "PRESENT",
    "PUBLISH_AND_ACK",
    "TRANSIENT_BACKOFF_S",
    "Binding",
    "Entry",
    "LoadedModel",
    "ModelFollower",
    "MonitoringLog",
    "Outcome",
    "Poison",
    "StreamConfig",
    "StreamConsumer",
    "StreamMetrics",
    "StreamScorer",
    "add_stream_arguments",
    "bundle_binding",
    "config_from_args",
    "ensure_group",
    "event_ms",
    "load",
    "main",
    "parse_features",
    "parse_key",
    "register_stream",
    "run_stream",
]

log = logging.getLogger("modelplane.scoring.stream")


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
