"""A real registry (SQLite, port 0) holding small MLPs, for bundle models a real feature
service on the demo feature definitions (examples.features), and a real monitoring
service for the predictions jobs log."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelplane.client.feature import FeatureClient
from modelplane.client.monitoring import MonitoringClient
from modelplane.client.registry import RegistryClient
from modelplane.examples import features
from modelplane.examples.models import mlp
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.services.feature.main import build as build_feature
from modelplane.services.monitoring.main import Settings as MonitoringSettings
from modelplane.services.monitoring.main import build as build_monitoring
from modelplane.services.registry.main import Settings as RegistrySettings
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.integration.registry.conftest import ThreadedServer
from tests.support import running_aio_in_thread, running_sync

WIDTH = 8
MODEL = "scorer"
BUNDLE_MODEL = "fraud"


@dataclass
class Registry:
    address: str
    client: RegistryClient
    artifacts: Path

    def register(
        self,
        model: str,
        seed: int,
        layers: tuple[int, ...] = (WIDTH, 16, 3),
        feature_input: rpb.FeatureInput | None = None,
        alias: str = "production",
    ) -> Path:
        """Registers a new version of an MLP, moves `alias` to it; returns its file."""
        path = self.artifacts / f"{model}-{seed}.onnx"
        onnx.save(mlp(layers, seed=seed, name=model), path)
        metadata = rpb.UploadMetadata(model=model, feature_input=feature_input)
        version = int(self.client.upload_file(path, metadata).version)
        current = {a.alias: a.version for a in self.client.list_aliases(model)}.get(alias, 0)
        self.client.set_alias(model, alias, version, expected_version=current)
        return path


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    server = ThreadedServer(
        RegistrySettings(
            data_dir=tmp_path / "registry",
            port=0,
            tracing_enabled=False,
            log_json=False,
            log_level="WARNING",
        )  # type: ignore[call-arg]
    )
    client = RegistryClient(server.address, actor="test")
    for name in (MODEL, BUNDLE_MODEL):
        client.create_model(name)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    try:
        yield Registry(server.address, client, artifacts)
    finally:
        client.close()
        server.stop()


@pytest.fixture
def feature_service(tmp_path: Path) -> Iterator[tuple[str, FeatureClient]]:
    """A feature service (SQLite online store) with the demo definitions applied."""
    server = build_feature(settings_for("sqlite", tmp_path / "feature-state", unique_prefix()))
    definitions = features.ensure_demo_features(tmp_path / "features")
    with running_sync(server) as address, FeatureClient(address) as client:
        client.apply(definitions)
        yield address, client


@pytest.fixture
def monitoring(tmp_path: Path) -> Iterator[tuple[str, MonitoringClient]]:
    """A monitoring service (SQLite); yields its address and a client."""
    server = build_monitoring(
        MonitoringSettings(
            port=0, data_dir=tmp_path / "monitoring", log_json=False, log_level="WARNING"
        )  # type: ignore[call-arg]
    )
    with running_aio_in_thread(server) as address, MonitoringClient(address, timeout=10) as c:
        yield address, c


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["output"], {"input": x.astype(np.float32)})[0])


def bundle_job(
    registry: Registry,
    feature_service: tuple[str, FeatureClient],
    tmp_path: Path,
    *,
    seed: int,
    hidden: int,
    events_seed: int,
) -> tuple[list[str], pa.Table]:
    """A version of BUNDLE_MODEL fed by the demo bundle (missing features rejected), the
    features materialized, and 400 events of 40 customers over the last four days in
    tmp_path/events.parquet; returns `score batch`'s arguments for them (input, timestamp,
    feature service, 100-row chunks) and the events."""
    address, client = feature_service
    registry.register(
        BUNDLE_MODEL,
        seed=seed,
        layers=(features.WIDTH, hidden, 2),
        feature_input=rpb.FeatureInput(
            bundle=features.SCORER, missing_policy=rpb.MISSING_FEATURE_POLICY_REJECT
        ),
    )
    client.materialize()
    now = client.get_bundle_tensor(features.SCORER, {"customer_id": [1]}).as_of_us
    rng = np.random.default_rng(events_seed)
    events = pa.table(
        {
            "customer_id": pa.array(rng.integers(1, 41, 400), pa.int64()),
            "event_timestamp": pa.array(
                now - rng.integers(0, 4 * features.DAY_US, 400), pa.timestamp("us", tz="UTC")
            ),
        }
    )
    pq.write_table(events, tmp_path / "events.parquet", row_group_size=100)
    arguments = [
        str(tmp_path / "events.parquet"),
        "--timestamp",
        "event_timestamp",
        "--feature-service",
        address,
        "--chunk-rows",
        "100",
    ]
    return arguments, events
