"""Fuzzing every RPC of the registry (see tests/fuzz/harness.py for the property)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from modelplane.client.registry import RegistryClient
from modelplane.examples.models import mlp
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.services.registry.main import Settings, build
from tests.fuzz import harness
from tests.support import running_aio_in_thread

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]
MODEL = "fuzz-model"
KNOWN = [MODEL, "production", "staging", "canary", "onnx", "1", "alice"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.FuzzTarget]:
    data = tmp_path_factory.mktemp("registry-fuzz")
    server = build(
        Settings(port=0, data_dir=data, tracing_enabled=False, log_json=False, log_level="ERROR")
    )
    with running_aio_in_thread(server) as address:
        model_file = data / "model.onnx"
        onnx.save(mlp((4, 8, 2), seed=1), model_file)
        _seed(address, model_file)
        yield from harness.open_target(address, KNOWN)


def _seed(address: str, model_file: Path) -> None:
    """A model with two versions and an alias, so fuzzed calls reach past NOT_FOUND."""
    with RegistryClient(address, actor="alice", timeout=30) as client:
        client.create_model(MODEL, owner="fuzz")
        for _ in range(2):
            client.upload_file(model_file, pb.UploadMetadata(model=MODEL))
        client.set_alias(MODEL, "staging", 1, expected_version=0)


test_every_answer_is_a_proper_status = harness.proper_status_test(SERVICE)


def test_the_server_still_serves_after_fuzzing(target: harness.FuzzTarget) -> None:
    print(harness.tally_report(SERVICE))
    harness.assert_healthy(target.channel)
    get_model = target.channel.unary_unary(
        f"/{SERVICE.full_name}/GetModel",
        request_serializer=pb.GetModelRequest.SerializeToString,
        response_deserializer=pb.GetModelResponse.FromString,
    )
    assert get_model(pb.GetModelRequest(name=MODEL), timeout=10).model.name == MODEL
    growth = harness.rss_bytes() - target.rss_at_start
    assert growth < harness.MAX_RSS_GROWTH_BYTES, f"RSS grew by {growth / 2**20:.0f} MiB"
