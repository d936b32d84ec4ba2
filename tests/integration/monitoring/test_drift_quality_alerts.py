"""Drift, labels → quality and alerts through the real monitoring service and client.

The servers run on their own event loop thread with the alert evaluator's background
pass parked (an hour apart): each test moves a fake clock to just past a window's end
and runs one pass on the server's loop (`Monitor.evaluate_at`), then waits for the
notifier and retrain runner to finish, so every state is asserted after a known set of
windows closed and never after a sleep. Records carry times on a minute grid starting
at T0, the start of the day before yesterday (UTC): in the past, inside the retention.

Drift verdicts on first-rows references depend on KLL sketches, which are randomised;
with the seeds here the unshifted columns' adjusted p-values stay above 0.1 run after
run (the family alpha is 0.01), and the shifted ones below 1e-10."""

from __future__ import annotations

import asyncio
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sklearn import metrics as skm

from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.client.registry import RegistryClient
from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.services.monitoring.evaluator import Change
from modelplane.services.monitoring.ingest import Ingestor
from modelplane.services.monitoring.main import MonitoringServer, Settings, build
from modelplane.services.monitoring.references import References
from modelplane.services.monitoring.statistics import NumericColumn, WindowStats
from modelplane.services.monitoring.store import MINUTE_US, MonitoringStore, WindowKey
from modelplane.services.monitoring.store.sqlite import SqliteMonitoringStore
from modelplane.services.registry.main import Settings as RegistrySettings
from tests.integration.registry.conftest import ThreadedServer
from tests.postgres import POSTGRES_URL, fresh_schema
from tests.support import wait_serving_sync

T = TypeVar("T")

FEATURES = [f"f{i}" for i in range(10)]
CATEGORIES = ("card", "bank", "wallet")
CATEGORY_SHARES = (0.5, 0.3, 0.2)
BATCH_ROWS = 1_000
DAY_S = 86_400
T0 = (int(time.time()) // DAY_S - 2) * DAY_S  # a day start two days ago, UTC


def minute(k: float) -> datetime:
    return datetime.fromtimestamp(T0 + k * 60, UTC)


# --- records --------------------------------------------------------------------------


def records(
    model: str,
    version: str,
    request_ids: Sequence[str],
    at_minute: int,
    rng: np.random.Generator,
    *,
    shift: float = 0.0,
    category_shares: Sequence[float] = CATEGORY_SHARES,
    regions: Sequence[str] | None = None,
    missing: float = 0.0,
) -> list[pb.PredictionBatch]:
    """Rows of N(0, 1) features (f3 moved by `shift` sd), one categorical feature and a
    score independent of the features, spread over one minute, in 1000-row batches."""
    batches = []
    for first in range(0, len(request_ids), BATCH_ROWS):
        chunk = list(request_ids[first : first + BATCH_ROWS])
        rows = len(chunk)
        x = rng.standard_normal((rows, len(FEATURES)))
        x[:, 3] += shift
        if missing:
            x[rng.random(x.shape) < missing] = np.nan
        offsets = (np.arange(first, first + rows) * 59_000_000) // len(request_ids)
        batches.append(
            prediction_batch(
                model,
                version,
                chunk,
                latency_ms=rng.uniform(1.0, 5.0, rows),
                features=x,
                feature_names=FEATURES,
                outputs={"score": rng.random((rows, 1))},
                time_unix_us=(T0 + at_minute * 60) * 1_000_000 + offsets,
                categorical={"channel": rng.choice(CATEGORIES, rows, p=category_shares).tolist()},
                slices=None if regions is None else {"region": list(regions[first : first + rows])},
            )
        )
    return batches


def ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


def log(client: MonitoringClient, batches: Sequence[pb.PredictionBatch]) -> int:
    stored = 0
    for batch in batches:
        result = client.log_predictions([batch])
        assert not result.rejected, result.errors
        stored += result.stored
    return stored


def report(
    client: MonitoringClient, model: str, start: float, end: float, version: str = "1", **kw: Any
) -> pb.GetReportResponse:
    return client.report(model, version, minute(start), minute(end), **kw)


def drifted(response: pb.GetReportResponse) -> dict[str, str]:
    return {c.name: c.test for c in response.columns if c.drifted}


def column(response: pb.GetReportResponse, name: str) -> pb.ColumnReport:
    return next(c for c in response.columns if c.name == name)


# --- a monitoring server whose alert passes the test drives ------------------------------


class Clock:
    """The service's clock: the real time until a test sets `now`."""

    def __init__(self) -> None:
        self.now: float | None = None

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now


@dataclass
class Monitor:
    server: MonitoringServer
    loop: asyncio.AbstractEventLoop
    client: MonitoringClient
    clock: Clock
    address: str

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def evaluate_at(self, moment: datetime) -> list[Change]:
        """One alert pass with the clock at `moment`; returns once its webhooks were
        delivered (or given up on) and its retrain commands exited."""
        self.clock.now = moment.timestamp()
        return self.run(self._evaluate())

    async def _evaluate(self) -> list[Change]:
        monitoring = self.server.monitoring
        changes = await monitoring.evaluate()
        await monitoring.notifier.join()
        await monitoring.retrain.join()
        return changes


@contextmanager
def monitor(data_dir: Path, clock: Clock | None = None, **settings: Any) -> Iterator[Monitor]:
    clock = clock or Clock()
    server = build(
        Settings(
            port=0,
            data_dir=data_dir,
            log_json=False,
            log_level="WARNING",
            evaluate_interval_s=3600.0,  # passes run when the test says (evaluate_at)
            flush_interval_s=3600.0,  # reports flush first
            grace_s=0.0,
            **settings,
        )
    )
    # Monitoring and Ingestor take a clock for tests; build() wires the real one.
    server.monitoring._clock = clock
    server.monitoring.ingestor._clock = clock
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="monitoring-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
        wait_serving_sync(server.address)
        with MonitoringClient(server.address, timeout=30) as client:
            yield Monitor(server, loop, client, clock, server.address)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def set_config(client: MonitoringClient, config: pb.MonitorConfig) -> pb.MonitorConfig:
    config.revision = client.get_config(config.model_name).revision
    return client.set_config(config)


# --- a registry holding a version with feature statistics ----------------------------


REGISTRY_MODEL = "churn"
REFERENCE_ROWS = 100_000


@dataclass(frozen=True)
class RegistryVersion:
    address: str
    model: str
    version: str
    statistics: list[rpb.FeatureStatistics]


def identity_model(width: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def decile_statistics(rng: np.random.Generator) -> list[rpb.FeatureStatistics]:
    """What a training job registers: decile edges and counts of 100k N(0, 1) rows per
    feature (as libs/modelplane/examples/fraud.py does)."""
    statistics = []
    for name in FEATURES:
        values = rng.standard_normal(REFERENCE_ROWS)
        edges = np.quantile(values, np.linspace(0.0, 1.0, 11))
        counts, _ = np.histogram(values, bins=edges)
        statistics.append(
            rpb.FeatureStatistics(name=name, bin_edges=edges.tolist(), counts=counts.tolist())
        )
    return statistics


@pytest.fixture(scope="module")
def registry_version(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryVersion]:
    root = tmp_path_factory.mktemp("registry")
    server = ThreadedServer(
        RegistrySettings(
            data_dir=root / "data",
            port=0,
            tracing_enabled=False,
            log_json=False,
            log_level="WARNING",
        )  # type: ignore[call-arg]
    )
    try:
        path = root / "identity.onnx"
        onnx.save(identity_model(len(FEATURES)), path)
        statistics = decile_statistics(np.random.default_rng(100))
        with RegistryClient(server.address, actor="test") as registry:
            registry.create_model(REGISTRY_MODEL)
            version = registry.upload_file(
                path, rpb.UploadMetadata(model=REGISTRY_MODEL, feature_statistics=statistics)
            )
        yield RegistryVersion(server.address, REGISTRY_MODEL, str(version.version), statistics)
    finally:
        server.stop()


# --- 1, 2: drift ----------------------------------------------------------------------


def test_drift_against_the_first_rows_of_a_version(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with monitor(tmp_path) as m:
        config = pb.MonitorConfig(
            model_name="fraud", drift=pb.DriftPolicy(reference_rows=5_000, min_samples=1_000)
        )
        set_config(m.client, config)
        reference = records("fraud", "1", ids("ref", 5_000), 0, rng)
        log(m.client, reference[:4])
        waiting = report(m.client, "fraud", 0, 1)
        assert (waiting.count, waiting.reference_source) == (4_000, pb.REFERENCE_SOURCE_UNSPECIFIED)
        assert column(waiting, "f3").reason == "no reference for this column"
        log(m.client, reference[4:])

        log(m.client, records("fraud", "1", ids("same", 10_000), 1, rng))
        log(m.client, records("fraud", "1", ids("shifted", 10_000), 2, rng, shift=0.5))
        log(
            m.client,
            records("fraud", "1", ids("cat", 10_000), 3, rng, category_shares=(0.35, 0.35, 0.3)),
        )

        same = report(m.client, "fraud", 1, 2)
        assert (same.count, same.reference_source) == (10_000, pb.REFERENCE_SOURCE_FIRST_ROWS)
        assert same.reference_count == 5_000
        assert drifted(same) == {}
        tests = {c.name: c.test for c in same.columns}
        assert tests == {**dict.fromkeys(FEATURES, "ks"), "channel": "chi2", "score": "ks"}
        assert all(not math.isnan(c.adjusted_p_value) for c in same.columns)

        shifted = report(m.client, "fraud", 2, 3)
        assert drifted(shifted) == {"f3": "ks"}
        f3 = column(shifted, "f3")
        assert not f3.is_output and not f3.categorical
        assert f3.adjusted_p_value < 0.01 and f3.psi > 0.1
        assert f3.mean == pytest.approx(0.5, abs=0.05)
        assert len(f3.bin_edges) == len(f3.reference_counts) + 1
        assert sum(f3.reference_counts) == 5_000 and sum(f3.current_counts) == 10_000
        assert column(shifted, "score").is_output

        categorical = report(m.client, "fraud", 3, 4)
        assert drifted(categorical) == {"channel": "chi2"}
        channel = column(categorical, "channel")
        assert channel.categorical and set(channel.categories) == set(CATEGORIES)
        assert sum(channel.current_counts) == 10_000

        # Drift over time: one bucket per minute.
        over_time = report(m.client, "fraud", 1, 4, buckets=3)
        assert [list(p.drifted) for p in over_time.drift_over_time] == [[], ["f3"], ["channel"]]
        assert [p.count for p in over_time.drift_over_time] == [10_000] * 3


def test_drift_against_the_registry_reference(
    tmp_path: Path, registry_version: RegistryVersion
) -> None:
    rng = np.random.default_rng(2)
    model, version = registry_version.model, registry_version.version
    with monitor(tmp_path, registry=registry_version.address) as m:
        log(m.client, records(model, version, ids("same", 5_000), 1, rng))
        log(m.client, records(model, version, ids("shifted", 5_000), 2, rng, shift=0.5))

        same = report(m.client, model, 1, 2, version=version)
        assert same.reference_source == pb.REFERENCE_SOURCE_REGISTRY
        assert same.reference_count == REFERENCE_ROWS
        assert drifted(same) == {}
        f0 = column(same, "f0")
        assert f0.test == "ks" and list(f0.bin_edges) == list(
            registry_version.statistics[0].bin_edges
        )
        assert list(f0.reference_counts) == list(registry_version.statistics[0].counts)
        # Columns the registry has no statistics of are reported, not judged.
        for name in ("channel", "score"):
            assert (column(same, name).test, column(same, name).reason) == (
                "",
                "no reference for this column",
            )

        shifted = report(m.client, model, 2, 3, version=version)
        assert drifted(shifted) == {"f3": "ks"}
        assert sum(column(shifted, "f3").current_counts) == 5_000

        # A version the registry does not know falls back to its first rows.
        log(m.client, records(model, "99", ids("unknown", 100), 1, rng))
        unknown = report(m.client, model, 1, 2, version="99")
        assert (unknown.count, unknown.reference_source) == (100, pb.REFERENCE_SOURCE_UNSPECIFIED)


# --- 3: quality -----------------------------------------------------------------------


def sklearn_binary(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predicted = (scores >= 0.5).astype(int)
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "precision": skm.precision_score(labels, predicted, zero_division=0),
        "recall": skm.recall_score(labels, predicted, zero_division=0),
        "f1": skm.f1_score(labels, predicted, zero_division=0),
        "roc_auc": skm.roc_auc_score(labels, scores),
        "log_loss": skm.log_loss(labels, scores, labels=[0, 1]),
    }


def assert_metrics(point: pb.QualityPoint, expected: dict[str, float]) -> None:
    assert set(point.metrics) == set(expected)
    for name, value in expected.items():
        assert point.metrics[name] == pytest.approx(value, rel=0, abs=1e-9), name


def whole_range(response: pb.GetReportResponse, key: str = "", value: str = "") -> pb.QualityPoint:
    return next(
        p
        for p in response.quality
        if not p.HasField("start_time") and (p.slice_key, p.slice_value) == (key, value)
    )


def test_quality_equals_scikit_learn(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 2_000
    request_ids = ids("p", n)
    scores = rng.random(n).astype(np.float32)
    regions = rng.choice(["eu", "us"], n).tolist()
    at_minute = np.where(np.arange(n) < n // 2, 5, 125)  # an old window and a recent one
    batches = [
        prediction_batch(
            "scorer",
            "3",
            request_ids[first : first + 500],
            latency_ms=np.ones(500),
            features=rng.standard_normal((500, 2)),
            feature_names=["a", "b"],
            # The prediction is the second output: the config must pick it.
            outputs={
                "logit": rng.standard_normal((500, 1)),
                "score": scores[first : first + 500, None],
            },
            time_unix_us=(T0 + at_minute[first : first + 500] * 60) * 1_000_000,
            slices={"region": regions[first : first + 500]},
        )
        for first in range(0, n, 500)
    ]
    with monitor(tmp_path) as m:
        set_config(
            m.client,
            pb.MonitorConfig(
                model_name="scorer",
                task=pb.TASK_TYPE_BINARY_CLASSIFICATION,
                prediction_output="score",
            ),
        )
        log(m.client, batches)
        labels = rng.integers(0, 2, n).astype(np.float64)
        old = at_minute == 5
        # Every recent prediction and half of the old ones are labelled now: 1500.
        labelled = ~old | (np.arange(n) % 2 == 0)
        chosen = np.flatnonzero(labelled)
        assert len(chosen) == 1_500
        result = m.client.log_labels("scorer", [request_ids[i] for i in chosen], labels[chosen])
        assert (result.matched, result.updated, result.unmatched) == (1_500, 0, 0)
        changed = chosen[:10]
        labels[changed] = 1 - labels[changed]
        result = m.client.log_labels("scorer", [request_ids[i] for i in changed], labels[changed])
        assert (result.matched, result.updated, result.unmatched) == (0, 10, 0)
        result = m.client.log_labels("scorer", ["nobody", "p-99999"], [1.0, 0.0])
        assert (result.matched, result.updated, result.unmatched) == (0, 0, 2)

        full = report(m.client, "scorer", 0, 180, version="3", buckets=3)
        everything = whole_range(full)
        assert everything.labelled == 1_500
        s = scores.astype(np.float64)
        assert_metrics(everything, sklearn_binary(s[labelled], labels[labelled]))
        for region in ("eu", "us"):
            rows = labelled & (np.asarray(regions) == region)
            point = whole_range(full, "region", region)
            assert point.labelled == rows.sum()
            assert_metrics(point, sklearn_binary(s[rows], labels[rows]))

        def old_bucket(response: pb.GetReportResponse) -> pb.QualityPoint:
            return next(
                p
                for p in response.quality
                if p.slice_key == "" and p.start_time.ToDatetime(UTC) == minute(0)
            )

        assert old_bucket(full).labelled == 500
        assert_metrics(old_bucket(full), sklearn_binary(s[old & labelled], labels[old & labelled]))
        # Labels for the old window's other predictions arrive late: its quality moves.
        late = np.flatnonzero(old & ~labelled)
        result = m.client.log_labels("scorer", [request_ids[i] for i in late], labels[late])
        assert result.matched == 500
        again = report(m.client, "scorer", 0, 180, version="3", buckets=3)
        assert old_bucket(again).labelled == 1_000
        assert_metrics(old_bucket(again), sklearn_binary(s[old], labels[old]))
        assert whole_range(again).labelled == 2_000

        # Regression, on another model.
        targets = rng.normal(10.0, 3.0, 500)
        predicted = (targets + rng.normal(0.0, 1.0, 500)).astype(np.float32)
        set_config(
            m.client,
            pb.MonitorConfig(model_name="price", task=pb.TASK_TYPE_REGRESSION),
        )
        log(
            m.client,
            [
                prediction_batch(
                    "price",
                    "1",
                    ids("q", 500),
                    np.ones(500),
                    rng.standard_normal((500, 1)),
                    ["size"],
                    {"value": predicted[:, None]},
                    time_unix_us=np.full(500, (T0 + 10 * 60) * 1_000_000),
                )
            ],
        )
        assert m.client.log_labels("price", ids("q", 500), targets).matched == 500
        regression = whole_range(report(m.client, "price", 0, 60))
        y_pred = predicted.astype(np.float64)
        assert_metrics(
            regression,
            {
                "mae": skm.mean_absolute_error(targets, y_pred),
                "rmse": skm.root_mean_squared_error(targets, y_pred),
                "r2": skm.r2_score(targets, y_pred),
            },
        )


# --- 4: alerts ------------------------------------------------------------------------


@dataclass
class Webhook:
    url: str
    received: queue.Queue[tuple[str, dict[str, Any]]] = field(default_factory=queue.Queue)

    def take(self, path: str) -> list[dict[str, Any]]:
        """What was POSTed to `path` so far (the others are put back)."""
        taken, others = [], []
        while not self.received.empty():
            at, body = self.received.get_nowait()
            if at == path:
                taken.append(body)
            else:
                others.append((at, body))
        for other in others:
            self.received.put(other)
        return taken


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.received.put((self.path, json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


RETRAIN_SCRIPT = """\
import sys
with open(sys.argv[1], "a", encoding="utf-8") as out:
    out.write(sys.stdin.read())
"""


def watch(client: MonitoringClient, model: str, into: queue.Queue[pb.Alert]) -> threading.Thread:
    """Follows the model's alerts in a thread until the client is closed."""

    def follow() -> None:
        for alert in client.watch_alerts(model, timeout=60):
            into.put(alert)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def test_drift_alert_pends_fires_notifies_retrains_and_resolves(
    tmp_path: Path, webhook: Webhook
) -> None:
    rng = np.random.default_rng(4)
    script = tmp_path / "retrain.py"
    script.write_text(RETRAIN_SCRIPT)
    ran = tmp_path / "retrain.jsonl"
    rule = pb.AlertRule(
        name="inputs-drift",
        kind=pb.ALERT_KIND_DRIFT,
        window_seconds=60,
        for_windows=2,
        retrain=pb.RetrainTrigger(
            command=[sys.executable, str(script), str(ran)], webhook_url=f"{webhook.url}/retrain"
        ),
    )
    config = pb.MonitorConfig(
        model_name="fraud",
        drift=pb.DriftPolicy(reference_rows=5_000),
        rules=[rule],
        webhook_url=f"{webhook.url}/alerts",
    )
    with monitor(tmp_path / "monitoring") as m:
        set_config(m.client, config)
        log(m.client, records("fraud", "1", ids("ref", 5_000), 0, rng))
        log(m.client, records("fraud", "1", ids("w1", 2_000), 1, rng, shift=0.5))
        seen: queue.Queue[pb.Alert] = queue.Queue()
        watcher_client = MonitoringClient(m.address)
        watcher = watch(watcher_client, "fraud", seen)
        try:
            # Windows 0 (the reference rows) and 1 close.
            changes = m.evaluate_at(minute(2))
            assert [(c.transition.after.subject, c.transition.after.state) for c in changes] == [
                ("f3", pb.ALERT_STATE_PENDING)
            ]
            (pending,) = m.client.list_alerts("fraud")
            assert (pending.state, pending.windows, pending.rule) == (
                pb.ALERT_STATE_PENDING,
                1,
                "inputs-drift",
            )
            assert pending.start_time.ToDatetime(UTC) == minute(1)
            assert not pending.HasField("fired_time")
            assert m.client.list_alerts("fraud", [pb.ALERT_STATE_FIRING]) == []
            assert webhook.received.empty() and not ran.exists()
            # The first message proves the watch is subscribed (it may come from the
            # active alerts listed first, or as the change itself, or both).
            assert seen.get(timeout=10).state == pb.ALERT_STATE_PENDING

            log(m.client, records("fraud", "1", ids("w2", 2_000), 2, rng, shift=0.5))
            m.evaluate_at(minute(3))
            (firing,) = m.client.list_alerts("fraud")
            assert (firing.id, firing.state, firing.windows) == (
                pending.id,
                pb.ALERT_STATE_FIRING,
                2,
            )
            assert firing.HasField("fired_time") and firing.value > 0.1
            active = m.client.list_alerts("fraud", [pb.ALERT_STATE_PENDING, pb.ALERT_STATE_FIRING])
            assert [a.id for a in active] == [firing.id]
            assert m.client.list_alerts("fraud", [pb.ALERT_STATE_RESOLVED]) == []
            (notified,) = webhook.take("/alerts")
            assert (notified["id"], notified["state"]) == (firing.id, "ALERT_STATE_FIRING")
            assert notified["subject"] == "f3"
            (payload,) = [json.loads(line) for line in ran.read_text().splitlines()]
            assert webhook.take("/retrain") == [payload]
            assert (payload["model"], payload["version"], payload["subject"]) == (
                "fraud",
                "1",
                "f3",
            )
            assert [c["column"] for c in payload["drifted_columns"]] == ["f3"]
            assert [w["start"] for w in payload["windows"]] == [
                minute(1).isoformat(),
                minute(2).isoformat(),
            ]
            assert [list(w["drifted"]) for w in payload["windows"]] == [["f3"], ["f3"]]

            log(m.client, records("fraud", "1", ids("w3", 2_000), 3, rng))
            m.evaluate_at(minute(4))
            (resolved,) = m.client.list_alerts("fraud")
            assert (resolved.id, resolved.state) == (firing.id, pb.ALERT_STATE_RESOLVED)
            assert resolved.last_window_end.ToDatetime(UTC) == minute(4)
            (notified,) = webhook.take("/alerts")
            assert (notified["id"], notified["state"]) == (firing.id, "ALERT_STATE_RESOLVED")
            assert len(ran.read_text().splitlines()) == 1  # retrained once

            # Another pass over the same closed windows changes nothing.
            assert m.evaluate_at(minute(4) + timedelta(seconds=30)) == []
            assert [a.id for a in m.client.list_alerts("fraud")] == [firing.id]
            assert webhook.received.empty()

            by_state = {
                state: [a.id for a in m.client.list_alerts("fraud", [state])]
                for state in (pb.ALERT_STATE_PENDING, pb.ALERT_STATE_FIRING)
            }
            assert by_state == {pb.ALERT_STATE_PENDING: [], pb.ALERT_STATE_FIRING: []}
            assert [a.id for a in m.client.list_alerts("", [pb.ALERT_STATE_RESOLVED])] == [
                firing.id
            ]
            assert m.client.list_alerts("other") == []
            assert [a.id for a in report(m.client, "fraud", 0, 5).alerts] == [firing.id]

            watched = [seen.get(timeout=10)]
            while watched[-1].state != pb.ALERT_STATE_RESOLVED:
                watched.append(seen.get(timeout=10))
            assert {a.id for a in watched} == {firing.id}
            assert [a.state for a in watched if a.state != pb.ALERT_STATE_PENDING] == [
                pb.ALERT_STATE_FIRING,
                pb.ALERT_STATE_RESOLVED,
            ]
            last = watched[-1]
            assert (last.id, last.state) == (firing.id, pb.ALERT_STATE_RESOLVED)
        finally:
            watcher_client.close()
            watcher.join(10)
        assert seen.empty()


def test_log_drops_rule_counts_running_totals_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    clock = Clock()
    rule = pb.AlertRule(name="drops", kind=pb.ALERT_KIND_LOG_DROPS, threshold=10, window_seconds=60)
    with monitor(tmp_path, clock) as m:
        set_config(m.client, pb.MonitorConfig(model_name="ranker", rules=[rule]))

        def report_totals(producer: str, dropped: int, at: float, batch_ids: list[str]) -> None:
            clock.now = minute(at).timestamp()
            counters = [pb.ProducerCounters(model_name="ranker", dropped_records=dropped)]
            batches = records("ranker", "1", batch_ids, int(at), rng)
            result = m.client.log_predictions(batches, producer_id=producer, counters=counters)
            assert result.stored + result.duplicates == len(batch_ids)

        report_totals("inf-1", 4, 1.1, ids("a", 5))
        report_totals("inf-1", 9, 1.5, ids("b", 5))
        report_totals("inf-1", 9, 1.6, ids("b", 5))  # a retried call: the same totals
        report_totals("inf-1", 15, 2.2, ids("c", 5))
        report_totals("inf-2", 5, 2.3, ids("d", 5))  # another producer's first totals
        changes = m.evaluate_at(minute(3))
        assert [(c.transition.after.state, c.transition.after.value) for c in changes] == [
            (pb.ALERT_STATE_FIRING, 11.0)
        ]
        (alert,) = m.client.list_alerts("ranker")
        assert alert.start_time.ToDatetime(UTC) == minute(2)  # window 1 had 9 drops, not 18
        assert (alert.kind, alert.subject, alert.model_version) == (pb.ALERT_KIND_LOG_DROPS, "", "")

        # Counters without a producer are refused, and the call stores nothing.
        with pytest.raises(grpc.RpcError) as error:
            m.client.log_predictions(
                records("ranker", "1", ids("e", 5), 3, rng),
                counters=[pb.ProducerCounters(model_name="ranker", dropped_records=1)],
            )
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "producer_id" in error.value.details()
        assert m.client.log_predictions(records("ranker", "1", ids("e", 5), 3, rng)).stored == 5


def test_quality_rule_fires_on_a_window_of_bad_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    rule = pb.AlertRule(
        name="accuracy",
        kind=pb.ALERT_KIND_QUALITY,
        metric="accuracy",
        threshold=0.8,
        window_seconds=60,
        min_samples=100,
    )
    with monitor(tmp_path) as m:
        set_config(
            m.client,
            pb.MonitorConfig(
                model_name="fraud", task=pb.TASK_TYPE_BINARY_CLASSIFICATION, rules=[rule]
            ),
        )
        for at, prefix in ((1, "good"), (2, "bad")):
            batch = records("fraud", "1", ids(prefix, 300), at, rng)
            log(m.client, batch)
            scores = np.frombuffer(batch[0].output_values, "<f4").astype(np.float64)
            truth = (scores >= 0.5).astype(np.float64)
            wrong = rng.random(300) < (0.05 if prefix == "good" else 0.5)
            truth[wrong] = 1 - truth[wrong]
            assert m.client.log_labels("fraud", ids(prefix, 300), truth).matched == 300
        m.evaluate_at(minute(3))
        (alert,) = m.client.list_alerts("fraud")
        assert (alert.state, alert.subject) == (pb.ALERT_STATE_FIRING, "accuracy")
        assert alert.start_time.ToDatetime(UTC) == minute(2)
        assert alert.value < 0.8


# --- 5: restarts and crashes ----------------------------------------------------------


def test_a_restart_keeps_everything_acknowledged(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    clock = Clock()
    config = pb.MonitorConfig(
        model_name="fraud",
        task=pb.TASK_TYPE_BINARY_CLASSIFICATION,
        prediction_output="score",
        drift=pb.DriftPolicy(reference_rows=5_000),
        rules=[pb.AlertRule(name="f3", kind=pb.ALERT_KIND_DRIFT, column="f3", window_seconds=60)],
    )
    regions = rng.choice(["eu", "us"], 7_000).tolist()
    batches = records("fraud", "1", ids("ref", 5_000), 0, rng, regions=regions[:5_000])
    batches += records("fraud", "1", ids("w1", 2_000), 1, rng, shift=0.5, regions=regions[5_000:])
    labelled = ids("w1", 2_000)[:1_000]
    truth = rng.integers(0, 2, 1_000).astype(np.float64)
    with monitor(tmp_path, clock) as m:
        set_config(m.client, config)
        log(m.client, batches)
        assert m.client.log_labels("fraud", labelled, truth).matched == 1_000
        assert [c.transition.after.state for c in m.evaluate_at(minute(2))] == [
            pb.ALERT_STATE_FIRING
        ]
        before = report(m.client, "fraud", 0, 3)
        alerts_before = m.client.list_alerts("fraud")
        config_before = m.client.get_config("fraud")
    assert before.count == 7_000 and drifted(before) == {"f3": "ks"}
    assert whole_range(before).labelled == 1_000 and len(before.alerts) == 1

    with monitor(tmp_path, clock) as m:
        after = report(m.client, "fraud", 0, 3)
        assert without_quantiles(after) == without_quantiles(before)
        assert m.client.list_alerts("fraud") == alerts_before
        assert m.client.get_config("fraud") == config_before
        # Idempotency survives: the batches and labels are known.
        again = m.client.log_predictions(batches[-1:])
        assert (again.stored, again.duplicates) == (0, 1_000)
        relabel = m.client.log_labels("fraud", labelled[:10], truth[:10])
        assert (relabel.matched, relabel.updated) == (0, 10)
        # The evaluator goes on where it stopped: no window is evaluated twice.
        assert m.evaluate_at(minute(2) + timedelta(seconds=30)) == []
        assert without_quantiles(report(m.client, "fraud", 0, 3)) == without_quantiles(before)


def without_quantiles(response: pb.GetReportResponse) -> pb.GetReportResponse:
    """The report less its quantiles: merging KLL sketches is randomised, so two
    reports merging the same stored windows may differ there (within the sketch's
    rank error) and nowhere else."""
    copy = pb.GetReportResponse()
    copy.CopyFrom(response)
    for c in copy.columns:
        del c.quantiles[:]
    return copy


def snapshot(store: MonitoringStore, model: str) -> dict[WindowKey, dict[str, Any]]:
    """Every stored window of a model, as comparable values (the quantile sketches are
    randomised, so their counts, not their bytes, are compared)."""
    found = {}
    for granularity in (MINUTE_US, 60 * MINUTE_US, 24 * 60 * MINUTE_US):
        for key, data in store.read_windows(model, "", granularity, 0, 2**62, None):
            window = WindowStats.from_bytes(data)
            columns: dict[str, tuple[Any, ...]] = {}
            for name, col in window.columns.items():
                if isinstance(col, NumericColumn):
                    columns[name] = (
                        col.count,
                        col.missing,
                        round(col.mean, 9),
                        round(col.m2, 6),
                        col.min,
                        col.max,
                        col.to_proto().bin_counts,
                        col.to_proto().bin_edges,
                    )
                else:
                    columns[name] = (col.count, col.missing, dict(col.counts))
            found[key] = {"count": window.count, "columns": columns, "routes": dict(window.routes)}
    return found


def ingestor(
    path: Path, statistics: list[rpb.FeatureStatistics]
) -> tuple[MonitoringStore, Ingestor]:
    store = SqliteMonitoringStore(path)
    references = References(store, lambda model, version: statistics, lambda model: 10_000)
    return store, Ingestor(store, references, "replica-1")


def test_recover_replays_what_was_not_flushed_exactly_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    statistics = decile_statistics(rng)
    regions = rng.choice(["eu", "us"], 3_000).tolist()
    first = records("fraud", "1", ids("a", 3_000), 1, rng, regions=regions, missing=0.01)
    second = records("fraud", "1", ids("b", 2_000), 65, rng, shift=0.5, regions=regions[:2_000])

    # What a flush of everything stores.
    store, flushed = ingestor(tmp_path / "flushed.db", statistics)
    flushed.ingest(first + second)
    flushed.flush()
    expected = snapshot(store, "fraud")
    store.close()
    assert expected and all(w["count"] for w in expected.values())

    # Nothing flushed, then a crash (the store closed under the ingestor).
    store, crashed = ingestor(tmp_path / "crashed.db", statistics)
    crashed.ingest(first)
    crashed.ingest(second)
    assert snapshot(store, "fraud") == {}
    store.close()
    store, recovered = ingestor(tmp_path / "crashed.db", statistics)
    assert recovered.recover() == len(first + second)
    assert snapshot(store, "fraud") == expected
    assert recovered.recover() == 0  # a second start replays nothing
    store.close()

    # Half flushed: only the batches after the checkpoint are replayed.
    store, half = ingestor(tmp_path / "half.db", statistics)
    half.ingest(first)
    half.flush()
    half.ingest(second)
    store.close()
    store, recovered = ingestor(tmp_path / "half.db", statistics)
    assert recovered.recover() == len(second)
    assert snapshot(store, "fraud") == expected
    # And the replayed records are still known: a retry is a duplicate.
    retry = recovered.ingest(second)
    assert (retry.stored, retry.duplicates) == (0, 2_000)
    recovered.flush()
    assert snapshot(store, "fraud") == expected
    store.close()


# --- 6: replicas on PostgreSQL --------------------------------------------------------


def comparable(response: pb.GetReportResponse) -> dict[str, Any]:
    columns = {}
    for c in response.columns:
        columns[c.name] = {
            "count": c.count,
            "missing": c.missing,
            "min": c.min,
            "max": c.max,
            "bin_edges": list(c.bin_edges),
            "categories": list(c.categories),
            "reference_counts": list(c.reference_counts),
            "current_counts": list(c.current_counts),
            "test": c.test,
            "drifted": c.drifted,
        }
    return {
        "count": response.count,
        "reference": (response.reference_source, response.reference_count),
        "columns": columns,
        "drift_over_time": [(p.count, list(p.drifted)) for p in response.drift_over_time],
        "quality": [
            (p.slice_key, p.slice_value, p.labelled, dict(p.metrics)) for p in response.quality
        ],
    }


def test_two_replicas_on_postgresql_merge_exactly(
    tmp_path: Path, registry_version: RegistryVersion
) -> None:
    rng = np.random.default_rng(9)
    model, version = registry_version.model, registry_version.version
    config = pb.MonitorConfig(model_name=model, task=pb.TASK_TYPE_BINARY_CLASSIFICATION)
    regions = rng.choice(["eu", "us", "apac"], 6_000).tolist()
    batches = records(model, version, ids("a", 3_000), 1, rng, regions=regions, missing=0.02)
    batches += records(
        model, version, ids("b", 3_000), 2, rng, shift=0.3, regions=regions[3_000:], missing=0.02
    )
    labelled = ids("a", 3_000)[::2] + ids("b", 3_000)[::3]
    truth = rng.integers(0, 2, len(labelled)).astype(np.float64)
    registry = registry_version.address
    with fresh_schema("monitoring_replicas") as schema:
        shared: dict[str, Any] = {
            "database": POSTGRES_URL,
            "database_schema": schema,
            "registry": registry,
        }
        with (
            monitor(tmp_path / "a", replica_id="a", **shared) as a,
            monitor(tmp_path / "b", replica_id="b", **shared) as b,
            monitor(tmp_path / "one", registry=registry) as one,
        ):
            set_config(a.client, config)
            set_config(one.client, config)
            # Replica b takes the configuration a stored on its next alert pass.
            b.run(b.server.monitoring.evaluate())
            assert b.client.get_config(model).task == pb.TASK_TYPE_BINARY_CLASSIFICATION
            for index, batch in enumerate(batches):
                assert (a if index % 2 else b).client.log_predictions([batch]).stored == 1_000
            log(one.client, batches)
            # Labels sent to one replica find the predictions stored by either.
            assert a.client.log_labels(model, labelled, truth).matched == len(labelled)
            assert one.client.log_labels(model, labelled, truth).matched == len(labelled)

            expected = report(one.client, model, 0, 3, version=version, buckets=3)
            assert expected.count == 6_000 and "f3" in drifted(expected)
            for replica in (a, b):  # a report flushes the replica's own statistics
                report(replica.client, model, 0, 3, version=version)
            for replica in (a, b):
                merged = report(replica.client, model, 0, 3, version=version, buckets=3)
                assert comparable(merged) == comparable(expected)
                for got, want in zip(merged.columns, expected.columns, strict=True):
                    assert got.mean == pytest.approx(want.mean, rel=0, abs=1e-9)
                    assert got.stddev == pytest.approx(want.stddev, rel=1e-9, abs=1e-12)
                    assert got.psi == pytest.approx(want.psi, rel=1e-9, abs=1e-12)
                summary = replica.client.summary(model, version)
                assert summary.count == 6_000
                assert summary.mean_latency_ms == pytest.approx(
                    one.client.summary(model, version).mean_latency_ms, rel=1e-12
                )
            # One replica evaluates alert rules at a time (a lease in the shared store).
            for replica in (a, b):
                replica.run(replica.server.monitoring.evaluate())
            assert [a.server.monitoring.leading, b.server.monitoring.leading] in (
                [True, False],
                [False, True],
            )


# --- 7: input errors ------------------------------------------------------------------


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


INVALID_RULES = {
    "rules[0].window_seconds": pb.AlertRule(name="r", kind=pb.ALERT_KIND_DRIFT, window_seconds=90),
    "rules[0].kind": pb.AlertRule(name="r"),
    "rules[0].metric": pb.AlertRule(name="r", kind=pb.ALERT_KIND_QUALITY, metric="auc"),
    "rules[0].threshold": pb.AlertRule(name="r", kind=pb.ALERT_KIND_VOLUME, threshold=0.5),
    "rules[0].retrain": pb.AlertRule(
        name="r", kind=pb.ALERT_KIND_DRIFT, retrain=pb.RetrainTrigger()
    ),
    "rules[0].retrain.webhook_url": pb.AlertRule(
        name="r", kind=pb.ALERT_KIND_DRIFT, retrain=pb.RetrainTrigger(webhook_url="ftp://x")
    ),
}


def test_input_errors(tmp_path: Path) -> None:
    with monitor(tmp_path) as m:
        client = m.client
        error = rpc_error(lambda: client.report(""))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "model_name" in error.details()
        error = rpc_error(lambda: client.report("fraud", start=minute(10), end=minute(5)))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "start_time" in error.details()
        empty = client.report("nothing", start=minute(0), end=minute(60))
        assert (empty.count, empty.model_version, len(empty.columns)) == (0, "", 0)
        assert empty.reference_source == pb.REFERENCE_SOURCE_UNSPECIFIED

        first = client.set_config(pb.MonitorConfig(model_name="fraud"))
        assert first.revision == 1
        for stale in (0, 5):
            error = rpc_error(
                lambda stale=stale: client.set_config(
                    pb.MonitorConfig(model_name="fraud", revision=stale)
                )
            )
            assert error.code() is grpc.StatusCode.ABORTED
        assert client.get_config("fraud").revision == 1

        for where, rule in INVALID_RULES.items():
            config = pb.MonitorConfig(
                model_name="fraud",
                revision=1,
                task=pb.TASK_TYPE_BINARY_CLASSIFICATION,
                rules=[rule],
            )
            error = rpc_error(lambda config=config: client.set_config(config))
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, where
            assert error.details().startswith(f"{where}:"), (where, error.details())
        assert client.get_config("fraud") == first

        error = rpc_error(lambda: client.log_labels("fraud", ["a", "b"], [1.0, math.nan]))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "values[1]" in error.details()


def test_volume_rule_fires_on_a_surge_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    rule = pb.AlertRule(name="volume", kind=pb.ALERT_KIND_VOLUME, threshold=3, window_seconds=60)
    with monitor(tmp_path) as m:
        set_config(m.client, pb.MonitorConfig(model_name="fraud", rules=[rule]))
        # Traffic begins at 10:00: the empty windows before it are not its history.
        for at in range(600, 606):
            log(m.client, records("fraud", "1", ids(f"m{at}", 100), at, rng))
        log(m.client, records("fraud", "1", ids("surge", 1_000), 606, rng))
        m.evaluate_at(minute(607))
        alerts = m.client.list_alerts("fraud")
        assert [(a.state, a.start_time.ToDatetime(UTC), a.value) for a in alerts] == [
            (pb.ALERT_STATE_FIRING, minute(606), 1_000.0)
        ]
        # Traffic stops: an empty window after the data began is a volume change too.
        m.evaluate_at(minute(608))
        (alert,) = m.client.list_alerts("fraud")
        assert (alert.state, alert.windows, alert.value) == (pb.ALERT_STATE_FIRING, 2, 0.0)


def test_labels_find_their_predictions_whatever_ids_share_their_batches(tmp_path: Path) -> None:
    """Ids of mixed lengths and scripts: each label, sent in a batch of its own, finds
    the prediction logged beside longer or shorter ids (the key is the record's alone)."""
    rng = np.random.default_rng(11)
    request_ids = ["a", "b" * 40, "café-7", "\U0001dbcc", "a-medium-id-01"]
    batches = records("fraud", "1", request_ids, at_minute=5, rng=rng)
    with monitor(tmp_path) as m:
        log(m.client, batches)
        for request_id in request_ids:
            assert m.client.log_labels("fraud", [request_id], [1.0]).matched == 1, request_id
        # Logged again (a retry, regrouped): recognised, nothing stored twice.
        assert log(m.client, records("fraud", "1", request_ids[::-1], 5, rng)) == 0
