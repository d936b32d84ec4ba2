"""Stream scoring (`modelplane score stream`): a real registry server in process, the
machine's Redis, small ONNX models made here. Every test uses its own key prefix (its
streams and group) and deletes its keys afterwards."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import redis
from onnx import TensorProto, helper, numpy_helper

from modelplane.client.feature import FeatureClient
from modelplane.client.monitoring import MonitoringClient
from modelplane.client.registry import RegistryClient
from modelplane.examples import features as demo_features
from modelplane.examples.models import IR_VERSION, OPSET, mlp
from modelplane.feature.v1 import feature_pb2 as fpb
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.scoring.stream import (
    StreamConfig,
    StreamScorer,
    config_from_args,
    register_stream,
)
from modelplane.services.feature.main import build as build_feature
from modelplane.services.registry.main import Settings as RegistrySettings
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.integration.registry.conftest import ThreadedServer
from tests.support import running_sync, wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"
WIDTH = 4
LAYERS = (WIDTH, 8, 2)
PRESENT = fpb.FEATURE_STATUS_PRESENT


@dataclass
class Registry:
    address: str
    client: RegistryClient
    root: Path

    def register(self, name: str, model: onnx.ModelProto, tag: str) -> tuple[int, Path]:
        path = self.root / f"{name}-{tag}.onnx"
        onnx.save(model, path)
        version = self.client.upload_file(path, rpb.UploadMetadata(model=name)).version
        return int(version), path

    def promote(self, name: str, version: int, alias: str = "production") -> None:
        current = {a.alias: a.version for a in self.client.list_aliases(name)}.get(alias, 0)
        self.client.set_alias(name, alias, version, expected_version=current)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("stream-registry")
    server = ThreadedServer(
        RegistrySettings(
            data_dir=root / "data",
            port=0,
            tracing_enabled=False,
            log_json=False,
            log_level="WARNING",
        )  # type: ignore[call-arg]
    )
    client = RegistryClient(server.address, actor="test")
    try:
        yield Registry(server.address, client, root)
    finally:
        client.close()
        server.stop()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique key prefix; every key under it is deleted after the test."""
    name = f"test-stream-{uuid.uuid4().hex[:12]}"
    yield name
    with redis.Redis.from_url(REDIS_URL) as r:
        keys = list(r.scan_iter(f"{name}*"))
        if keys:
            r.delete(*keys)


@pytest.fixture
def r() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(REDIS_URL) as client:
        yield client


def model_name() -> str:
    return f"stream_{uuid.uuid4().hex[:8]}"


def registered(registry: Registry, seed: int = 1) -> tuple[str, Path]:
    name = model_name()
    registry.client.create_model(name)
    version, path = registry.register(name, mlp(LAYERS, seed=seed), "v1")
    registry.promote(name, version)
    return name, path


def config(
    registry: Registry, prefix: str, model: str, tmp_path: Path, **overrides: Any
) -> StreamConfig:
    values: dict[str, Any] = {
        "registry": registry.address,
        "model": model,
        "redis_url": REDIS_URL,
        "input": f"{prefix}:events",
        "output": f"{prefix}:predictions",
        "group": "scorers",
        "consumer": "scorer",
        "batch_size": 32,
        "max_wait_ms": 1,
        "cache_dir": tmp_path / "cache",
        "refresh_s": 60.0,
    }
    values.update(overrides)
    return StreamConfig(**values)


def produce(r: redis.Redis, stream: str, rows: np.ndarray) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for row in rows:
        pipe.xadd(stream, {"features": json.dumps(row.tolist())})
    return [i.decode() for i in pipe.execute()]


def predictions(r: redis.Redis, stream: str) -> list[dict[str, str]]:
    entries: Any = r.xrange(stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def by_event(entries: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """De-duplicated by event id, as a reader of the output stream does."""
    return {e["event_id"]: e for e in entries}


def expected(path: Path, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": rows.astype(np.float32)})[0]


def pending(r: redis.Redis, stream: str, group: str = "scorers") -> int:
    return int(r.xpending(stream, group)["pending"])


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, WIDTH)).astype(np.float32)


# --- 1: scored as ONNX Runtime scores them, each with its event id ------------------------


def test_events_are_scored_like_onnx_runtime_with_their_event_ids(
    registry: Registry, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    name, path = registered(registry)
    c = config(registry, prefix, f"{name}@production", tmp_path)
    data = rows(100)
    ids = produce(r, c.input, data)
    with StreamScorer(c) as scorer:
        wait_until(lambda: r.xlen(c.output) >= len(ids), timeout=10)
        # Counted just after the publish-and-ack script returns: wait for the count too.
        wait_until(lambda: scorer.metrics.value("modelplane_stream_lag_seconds_count") >= 100)
        assert (
            scorer.metrics.value("modelplane_stream_events_total", {"model": name, "version": "1"})
            == 100
        )
        assert scorer.metrics.value("modelplane_stream_lag_seconds_count") == 100
    out = predictions(r, c.output)
    assert [e["event_id"] for e in out] == ids  # one consumer: in stream order
    assert {(e["model"], e["version"]) for e in out} == {(name, "1")}
    got = np.array([json.loads(e["outputs"])["output"] for e in out], dtype=np.float32)
    np.testing.assert_array_equal(got, expected(path, data))
    assert pending(r, c.input) == 0


# --- 2: two consumers, every event exactly once after de-duplication ---------------------


def test_two_consumers_share_the_group_and_every_event_is_scored_once(
    registry: Registry, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    name, path = registered(registry)
    c = config(registry, prefix, f"{name}@production", tmp_path, consumers=2, batch_size=4)
    data = rows(600, seed=2)
    ids = produce(r, c.input, data)
    with StreamScorer(c) as scorer:
        wait_until(lambda: r.xlen(c.output) >= len(ids), timeout=15)
        # Counted just after the publish-and-ack script returns: wait for the counts too.
        wait_until(lambda: sum(consumer.scored for consumer in scorer.consumers) >= len(ids))
        counts = [consumer.scored for consumer in scorer.consumers]
    out = by_event(predictions(r, c.output))
    assert set(out) == set(ids)
    assert r.xlen(c.output) == len(ids)  # nothing failed, so nothing was published twice
    assert sum(counts) == len(ids) and all(counts), counts
    got = np.array([json.loads(out[i]["outputs"])["output"] for i in ids], dtype=np.float32)
    np.testing.assert_array_equal(got, expected(path, data))
    consumers = {x["name"].decode() for x in r.xinfo_consumers(c.input, c.group)}
    assert consumers == {"scorer-0", "scorer-1"}
    assert pending(r, c.input) == 0


# --- 3: a consumer that died holding events: claimed and scored by another ------------------


def test_a_dead_consumers_pending_events_are_claimed_and_scored(
    registry: Registry, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    name, path = registered(registry)
    c = config(registry, prefix, f"{name}@production", tmp_path, claim_idle_ms=200)
    r.xgroup_create(c.input, c.group, id="0", mkstream=True)
    data = rows(60, seed=3)
    first = produce(r, c.input, data[:30])
    # "ghost" reads 30 events and dies without acknowledging them.
    held: Any = r.xreadgroup(c.group, "ghost", {c.input: ">"}, count=30)
    assert len(held[0][1]) == 30
    second = produce(r, c.input, data[30:])
    with StreamScorer(c) as scorer:
        wait_until(lambda: len(by_event(predictions(r, c.output))) >= 60, timeout=10)
        claimed = scorer.metrics.value("modelplane_stream_claimed_total")
    out = by_event(predictions(r, c.output))
    assert set(out) == set(first + second)
    assert claimed >= 30
    got = np.array([json.loads(out[i]["outputs"])["output"] for i in first], dtype=np.float32)
    np.testing.assert_array_equal(got, expected(path, data[:30]))
    assert pending(r, c.input) == 0


# --- 4: poison events are dead-lettered with their reason; the group goes on -------------


def failing_model() -> onnx.ModelProto:
    """x [batch, 4] FP32 → y [batch, 1]: x[:, 0] indexes a 3-entry table, so an event
    whose first value is 7 fails inside ONNX Runtime (and only that event)."""
    table = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "table")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),
        helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["output"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        "failing",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        [table, starts, ends, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def test_poison_events_go_to_the_dead_letter_stream_and_do_not_block_the_group(
    registry: Registry, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    name = model_name()
    registry.client.create_model(name)
    version, path = registry.register(name, failing_model(), "v1")
    registry.promote(name, version)
    c = config(
        registry, prefix, f"{name}@production", tmp_path, claim_idle_ms=100, max_deliveries=2
    )
    r.xgroup_create(c.input, c.group, id="0", mkstream=True)

    # Delivered max_deliveries times already by a consumer that kept failing on it.
    [worn] = produce(r, c.input, np.array([[0, 0, 0, 0]], np.float32))
    r.xreadgroup(c.group, "ghost", {c.input: ">"}, count=1)
    r.xclaim(c.input, c.group, "ghost", min_idle_time=0, message_ids=[worn], retrycount=2)

    good = np.array([[0, 1, 1, 1], [1, 0, 0, 0], [2, 5, 5, 5]], np.float32)
    poison = {
        "bad_json": {"features": "[1, 2"},
        "wrong_width": {"features": "[1, 2]"},
        "bad_features": {"features": '["a", 1, 2, 3]'},
        "null": {"features": "[null, 1, 2, 3]"},
        "absent": {"other": "1"},
        "fails_in_model": {"features": "[7, 0, 0, 0]"},
    }
    ids: dict[str, str] = {}
    good_ids = produce(r, c.input, good[:1])
    for label, fields in poison.items():
        added: Any = r.xadd(c.input, fields)  # type: ignore[arg-type]
        ids[label] = added.decode()
    good_ids += produce(r, c.input, good[1:])

    with StreamScorer(c) as scorer:
        wait_until(lambda: r.xlen(c.dead_letter_stream) >= len(poison) + 1, timeout=15)
        wait_until(lambda: pending(r, c.input) == 0, timeout=5)
        # Counted just after the publish-and-ack script returns: wait for the count too.
        wait_until(
            lambda: (
                scorer.metrics.value(
                    "modelplane_stream_dead_lettered_total", {"reason": "too_many_deliveries"}
                )
                >= 2
            ),
            timeout=5,
        )
        dead_count = scorer.metrics.value(
            "modelplane_stream_dead_lettered_total", {"reason": "too_many_deliveries"}
        )

    dead = {e["event_id"]: e for e in predictions(r, c.dead_letter_stream)}
    reasons = {label: dead[event_id]["reason"] for label, event_id in ids.items()}
    assert reasons == {
        "bad_json": "bad_json",
        "wrong_width": "wrong_width",
        "bad_features": "bad_features",
        "null": "bad_features",
        "absent": "bad_features",
        "fails_in_model": "too_many_deliveries",
    }
    assert dead[worn]["reason"] == "too_many_deliveries"
    assert json.loads(dead[ids["bad_json"]]["fields"]) == {"features": "[1, 2"}
    assert "takes 4" in dead[ids["wrong_width"]]["detail"]
    assert dead_count == 2
    out = by_event(predictions(r, c.output))
    assert set(out) == set(good_ids)  # the good events around the poison ones were scored
    got = np.array([json.loads(out[i]["outputs"])["output"] for i in good_ids], np.float32)
    np.testing.assert_array_equal(got, expected(path, good))


# --- 5: a promoted version takes over between micro-batches -------------------------------


def test_a_promoted_version_takes_over_between_micro_batches(
    registry: Registry, prefix: str, r: redis.Redis, tmp_path: Path
) -> None:
    name, path1 = registered(registry, seed=1)
    c = config(registry, prefix, f"{name}@production", tmp_path, refresh_s=0.05)
    before = rows(20, seed=5)
    after = rows(20, seed=6)
    with StreamScorer(c) as scorer:
        first = produce(r, c.input, before)
        wait_until(lambda: r.xlen(c.output) >= 20, timeout=10)
        version2, path2 = registry.register(name, mlp(LAYERS, seed=2), "v2")
        registry.promote(name, version2)
        wait_until(lambda: scorer.follower.current.version == version2, timeout=10)
        second = produce(r, c.input, after)
        wait_until(lambda: r.xlen(c.output) >= 40, timeout=10)
        assert scorer.metrics.value("modelplane_stream_model_swaps_total") == 1
    out = by_event(predictions(r, c.output))
    assert {out[i]["version"] for i in first} == {"1"}
    assert {out[i]["version"] for i in second} == {str(version2)}
    got1 = np.array([json.loads(out[i]["outputs"])["output"] for i in first], np.float32)
    got2 = np.array([json.loads(out[i]["outputs"])["output"] for i in second], np.float32)
    np.testing.assert_array_equal(got1, expected(path1, before))
    np.testing.assert_array_equal(got2, expected(path2, after))
    assert not np.array_equal(expected(path1, after), got2)


# --- the command line -----------------------------------------------------------------------


def test_the_command_line_builds_the_configuration() -> None:
    parser = argparse.ArgumentParser()
    register_stream(parser.add_subparsers(dest="mode"))
    args = parser.parse_args(
        [
            "stream",
            "--registry",
            "127.0.0.1:1",
            "--model",
            "fraud@production",
            "--redis",
            REDIS_URL,
            "--input",
            "events",
            "--output",
            "predictions",
            "--group",
            "scorers",
            "--consumers",
            "3",
            "--consumer",
            "c",
            "--batch-size",
            "64",
            "--from",
            "new",
        ]
    )
    c = config_from_args(args)
    assert (c.model, c.input, c.output, c.group, c.batch_size, c.start) == (
        "fraud@production",
        "events",
        "predictions",
        "scorers",
        64,
        "$",
    )
    assert c.consumer_names() == ["c-0", "c-1", "c-2"]
    assert c.dead_letter_stream == "events.dead"
    with pytest.raises(ValueError):
        config_from_args(
            parser.parse_args(["stream", "--registry", "x", "--model", "m", "--batch-size", "0"])
        )


# --- 7: a model fed by a feature bundle, with its predictions logged to monitoring -------


@pytest.fixture
def feature_service(tmp_path: Path) -> Iterator[tuple[str, FeatureClient]]:
    """A real feature service (SQLite online store) with the demo features materialized."""
    server = build_feature(settings_for("sqlite", tmp_path / "feature-state", unique_prefix()))
    definitions = demo_features.ensure_demo_features(tmp_path / "features")
    with running_sync(server) as address, FeatureClient(address) as client:
        client.apply(definitions)
        client.materialize()
        yield address, client


def test_bundle_events_are_enriched_from_the_feature_service_and_logged_to_monitoring(
    registry: Registry,
    prefix: str,
    r: redis.Redis,
    tmp_path: Path,
    feature_service: tuple[str, FeatureClient],
    monitoring: tuple[str, MonitoringClient],
) -> None:
    feature_address, features = feature_service
    monitoring_address, monitor = monitoring
    name = model_name()
    registry.client.create_model(name)
    path = registry.root / f"{name}-bundle.onnx"
    onnx.save(mlp((demo_features.WIDTH, 8, 2), seed=5), path)
    feature_input = rpb.FeatureInput(
        bundle=demo_features.SCORER, missing_policy=rpb.MISSING_FEATURE_POLICY_REJECT
    )
    uploaded = registry.client.upload_file(
        path, rpb.UploadMetadata(model=name, feature_input=feature_input)
    )
    registry.promote(name, int(uploaded.version))
    known = list(range(1, 31))
    unknown = [900_001, 900_002]  # no features: rejected by the REJECT policy
    customers = known[:15] + unknown + known[15:]
    pipe = r.pipeline(transaction=False)
    for customer in customers:
        pipe.xadd(f"{prefix}:events", {"customer_id": str(customer)})
    ids = [i.decode() for i in pipe.execute()]
    by_customer = dict(zip(customers, ids, strict=True))
    # What the inference service would feed the model for these customers now.
    online = features.get_bundle_tensor(demo_features.SCORER, {"customer_id": known})
    assert (online.statuses == PRESENT).all()

    c = config(
        registry,
        prefix,
        f"{name}@production",
        tmp_path,
        feature_service=feature_address,
        monitoring=monitoring_address,
        monitoring_sample=1.0,
        batch_size=8,
    )
    with StreamScorer(c):
        wait_until(
            lambda: r.xlen(c.output) >= len(known) and r.xlen(c.dead_letter_stream) >= 2,
            timeout=15,
        )
        # Logged off the scoring path: wait for the monitoring service to hold them all.
        wait_until(lambda: monitor.summary(name).count >= len(known), timeout=15)
    out = by_event(predictions(r, c.output))
    assert set(out) == {by_customer[k] for k in known}
    got = np.array(
        [json.loads(out[by_customer[k]]["outputs"])["output"] for k in known], dtype=np.float32
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got, session.run(None, {"input": online.values})[0])

    dead = predictions(r, c.dead_letter_stream)
    assert sorted(e["event_id"] for e in dead) == sorted(by_customer[u] for u in unknown)
    assert {e["reason"] for e in dead} == {"missing_feature"}
    assert pending(r, c.input) == 0

    summary = monitor.summary(name)
    assert summary.count == len(known)  # every scored event, once; no rejected one
    assert [(v.model_version, v.route, v.count) for v in summary.by_version_route] == [
        ("1", "stream", len(known))
    ]
