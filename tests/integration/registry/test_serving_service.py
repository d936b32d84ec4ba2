"""What inference servers need from the registry, over gRPC against a real server on port
0: serving configs, alias event ids, rollout policies and their watch events, each
delivered once; and errors that stay within gRPC's limits whatever the request holds."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import onnx
import pytest

from modelplane.client.registry import RegistryClient
from modelplane.examples.models import mlp
from modelplane.kernel.errors import MAX_STATUS_MESSAGE_BYTES
from modelplane.registry.v1 import registry_pb2 as pb
from tests.integration.registry.conftest import ThreadedServer
from tests.integration.registry.helpers import SERVING_CONFIG
from tests.postgres import POSTGRES_URL


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(mlp((4, 8, 2), seed=3), path)
    return path


@pytest.fixture
def client(registry: ThreadedServer) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address, actor="alice", timeout=30) as c:
        yield c


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def _versions(client: RegistryClient, model_file: Path, count: int) -> None:
    client.create_model("fraud")
    for _ in range(count):
        client.upload_file(model_file, pb.UploadMetadata(model="fraud"))


# --- serving config -------------------------------------------------------------------


def test_serving_config_is_kept_with_the_version(client: RegistryClient, model_file: Path) -> None:
    client.create_model("fraud")
    stream = client.watch("fraud", timeout=30)
    try:
        assert next(stream).WhichOneof("event") == "snapshot"
        uploaded = client.upload_file(
            model_file, pb.UploadMetadata(model="fraud"), serving_config=SERVING_CONFIG
        )
        assert next(stream).version_created.version.serving_config == SERVING_CONFIG
    finally:
        stream.cancel()
    plain = client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
    assert uploaded.serving_config == SERVING_CONFIG
    assert client.get_version("fraud", 1).serving_config == SERVING_CONFIG
    assert plain.serving_config == client.get_version("fraud", 2).serving_config == ""
    listed = {v.version: v.serving_config for v in client.list_versions("fraud")}
    assert listed == {1: SERVING_CONFIG, 2: ""}
    client.set_alias("fraud", "production", 1, 0)
    assert client.get_version("fraud", alias="production").serving_config == SERVING_CONFIG


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("max_batch_size: 8\nbatching { }", 'no field named "batching"'),
        ('instance_group [ { count: "two" } ]', "count"),
        ("#" * (64 * 1024 + 1), "at most 65536"),
    ],
)
def test_a_bad_serving_config_is_refused_before_any_byte_is_stored(
    registry: ThreadedServer, client: RegistryClient, model_file: Path, config: str, fragment: str
) -> None:
    client.create_model("fraud")
    code, details = _code(
        lambda: client.upload_file(
            model_file, pb.UploadMetadata(model="fraud", serving_config=config)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "serving_config" in details and fragment in details
    assert client.get_model("fraud").latest_version == 0
    artifacts = registry.settings.data_dir / "artifacts"
    assert [p for p in artifacts.rglob("*") if p.is_file()] == []
    assert os.listdir(artifacts / "tmp") == []
    refused = client.audit(action="version.create")
    assert json.loads(refused[0].details_json)["outcome"] == "refused"


# --- alias event ids ------------------------------------------------------------------


def test_alias_event_ids_everywhere_aliases_are_returned(
    client: RegistryClient, model_file: Path
) -> None:
    _versions(client, model_file, 2)
    first = client.set_alias("fraud", "production", 1, 0)
    stream = client.watch("fraud", timeout=30)
    try:
        snapshot = next(stream).snapshot
        assert [(a.alias, a.event_id) for a in snapshot.aliases] == [("production", first.event_id)]
        moved = client.set_alias("fraud", "production", 2, 1)
        event = next(stream).alias_moved
        assert event.id == moved.event_id > first.event_id > 0
        removed = client.delete_alias("fraud", "production", 2)
        assert next(stream).alias_moved.id == removed.id > moved.event_id
    finally:
        stream.cancel()
    history = client.alias_history("fraud", "production")
    assert [e.id for e in history] == [first.event_id, moved.event_id, removed.id]
    canary = client.set_alias("fraud", "canary", 1, 0)
    assert [(a.alias, a.event_id) for a in client.list_aliases("fraud")] == [
        ("canary", canary.event_id)
    ]


# --- rollout policies -----------------------------------------------------------------


def test_rollout_policy_over_grpc(client: RegistryClient, model_file: Path) -> None:
    _versions(client, model_file, 3)
    for alias, version in (("production", 1), ("canary", 2), ("shadow", 3)):
        client.set_alias("fraud", alias, version, 0)
    never = client.get_rollout("fraud")
    assert (never.model, never.revision, list(never.routes), never.HasField("shadow")) == (
        "fraud",
        0,
        [],
        False,
    )
    policy = client.set_rollout(
        "fraud", {"production": 90, "canary": 10}, "shadow", 5, reason="try v2"
    )
    assert [(r.alias, r.weight) for r in policy.routes] == [("production", 90), ("canary", 10)]
    assert (policy.shadow.alias, policy.shadow.percent) == ("shadow", 5)
    assert (policy.revision, policy.updated_by, policy.reason) == (1, "alice", "try v2")
    assert policy.update_time.seconds > 0
    assert client.get_rollout("fraud") == policy

    code, details = _code(
        lambda: client.set_rollout("fraud", [("production", 100)], expected_revision=0)
    )
    assert code == grpc.StatusCode.ABORTED and "revision 1" in details
    code, details = _code(lambda: client.set_rollout("fraud", {"production": 95, "beta": 5}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "routes[1].alias" in details
    code, details = _code(lambda: client.set_rollout("fraud", {"production": 80}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sum to 100" in details
    code, details = _code(lambda: client.set_rollout("fraud", shadow_alias="s", shadow_percent=200))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shadow.percent" in details
    code, _ = _code(lambda: client.set_rollout("fraud", {}, expected_revision=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _code(lambda: client.delete_alias("fraud", "canary", 2))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: client.get_rollout("ghost"))[0] == grpc.StatusCode.NOT_FOUND

    off = client.set_rollout("fraud", {}, expected_revision=1, reason="done")
    assert (off.revision, list(off.routes), off.HasField("shadow")) == (2, [], False)
    audit = client.audit(action="rollout.set")
    outcomes = [json.loads(e.details_json).get("outcome") for e in audit]
    # The ABORTED and the three INVALID_ARGUMENTs the store refused (a negative revision
    # is refused before, like a negative expected_version of SetAlias).
    assert outcomes.count("refused") == 4 and outcomes[:1] == [None]
    assert json.loads(audit[-1].details_json)["routes"] == [
        {"alias": "production", "weight": 90},
        {"alias": "canary", "weight": 10},
    ]


def test_rollout_needs_approvals_and_guards_its_canary(
    registry: ThreadedServer, model_file: Path
) -> None:
    with (
        RegistryClient(registry.address, actor="owner") as owner,
        RegistryClient(registry.address, actor="rev") as reviewer,
    ):
        owner.create_model("fraud", required_approvals=1, protected_aliases=["production"])
        for _ in range(3):
            owner.upload_file(model_file, pb.UploadMetadata(model="fraud"))
        reviewer.review("fraud", 1, approve=True)
        owner.set_alias("fraud", "production", 1, 0)
        owner.set_alias("fraud", "canary", 2, 0)
        code, details = _code(lambda: owner.set_rollout("fraud", {"production": 90, "canary": 10}))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'canary'" in details
        reviewer.review("fraud", 2, approve=True)
        owner.set_rollout("fraud", {"production": 90, "canary": 10})
        code, details = _code(lambda: owner.set_alias("fraud", "canary", 3, 2))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "rollout policy" in details
        refused = owner.audit(action="alias.set")[0]
        assert json.loads(refused.details_json)["outcome"] == "refused"


def test_watch_snapshot_and_changes_carry_the_rollout(
    client: RegistryClient, model_file: Path
) -> None:
    _versions(client, model_file, 2)
    client.set_alias("fraud", "production", 1, 0)
    client.set_alias("fraud", "canary", 2, 0)
    first = client.set_rollout("fraud", {"production": 50, "canary": 50})
    stream = client.watch("fraud", timeout=30)
    try:
        snapshot = next(stream).snapshot
        assert snapshot.rollout == first
        second = client.set_rollout("fraud", {"canary": 100}, expected_revision=1)
        changed = next(stream)
        assert changed.WhichOneof("event") == "rollout_changed"
        assert changed.rollout_changed == second
        assert changed.rollout_changed.revision == 2
    finally:
        stream.cancel()


# --- PostgreSQL: each change reaches a watcher once -----------------------------------


def test_postgres_watchers_get_each_change_exactly_once(
    server_factory: Callable[..., ThreadedServer], pg_schema: str, model_file: Path
) -> None:
    """Writer and watcher on the same replica: its own changes reach the watcher through
    the LISTEN feed only. The last change is made through another replica, so it too
    arrives through the feed, after every earlier change's notification (PostgreSQL
    delivers them in commit order): once it is seen, any repeat would have been too."""
    server = server_factory(database_url=POSTGRES_URL, database_schema=pg_schema)
    other = server_factory(database_url=POSTGRES_URL, database_schema=pg_schema)
    with RegistryClient(server.address) as client, RegistryClient(other.address) as elsewhere:
        client.create_model("fraud")
        stream = client.watch("fraud", timeout=60)
        try:
            assert next(stream).WhichOneof("event") == "snapshot"
            for _ in range(2):
                client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
            client.set_alias("fraud", "production", 1, 0)
            client.set_alias("fraud", "canary", 2, 0)
            client.set_alias("fraud", "canary", 1, 2)
            client.set_rollout("fraud", {"production": 80, "canary": 20})
            client.set_rollout("fraud", {"production": 100}, "canary", 10)
            elsewhere.set_alias("fraud", "last", 1, 0)
            seen: Counter[tuple[str, int]] = Counter()
            while True:
                response = next(stream)
                kind = response.WhichOneof("event")
                if kind == "alias_moved":
                    if response.alias_moved.alias == "last":
                        break
                    seen[(kind, response.alias_moved.id)] += 1
                elif kind == "version_created":
                    seen[(kind, response.version_created.version.version)] += 1
                else:
                    seen[(str(kind), response.rollout_changed.revision)] += 1
        finally:
            stream.cancel()
    kinds = Counter(kind for kind, _ in seen)
    assert kinds == {"version_created": 2, "alias_moved": 3, "rollout_changed": 2}
    assert set(seen.values()) == {1}
    assert sorted(r for kind, r in seen if kind == "rollout_changed") == [1, 2]


# --- errors stay within gRPC's limits -------------------------------------------------


def test_a_10000_character_name_is_invalid_every_time(client: RegistryClient) -> None:
    """Echoed whole, the message would exceed gRPC's metadata limit and some calls would
    fail with RESOURCE_EXHAUSTED instead."""
    name = "x" * 10_000
    calls: list[Callable[[], object]] = [
        lambda: client.get_model(name),
        lambda: client.create_model(name),
        lambda: client.list_aliases(name + "!"),
        lambda: client.set_rollout(name, {"production": 100}, expected_revision=0),
    ]
    codes: Counter[grpc.StatusCode] = Counter()
    longest = 0
    for index in range(200):
        code, details = _code(calls[index % len(calls)])
        codes[code] += 1
        longest = max(longest, len(details.encode()))
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 200}
    assert longest <= MAX_STATUS_MESSAGE_BYTES
    refused = client.audit(action="model.create", limit=1)[0]
    assert len(refused.target) <= 512
