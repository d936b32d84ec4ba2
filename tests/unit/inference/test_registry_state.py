"""What a registry-served model's watch events do: newer events apply, repeated and older
ones change nothing; the plan a server serves from a state; routing by weight and key;
the artifact cache's verification."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.services.inference.artifact_cache import ArtifactCache, CacheCorrupted
from modelplane.services.inference.registry_follower import Target, parse_target
from modelplane.services.inference.registry_state import ModelState, Plan, PlannedRoute
from modelplane.services.inference.routing import Route, RouteTable, Shadow, key_point


def snapshot(aliases: dict[str, tuple[int, int]], **rollout: object) -> pb.AliasSnapshot:
    message = pb.AliasSnapshot(
        aliases=[
            pb.Alias(model="m", alias=a, version=v, event_id=i) for a, (v, i) in aliases.items()
        ]
    )
    if rollout:
        message.rollout.CopyFrom(policy(**rollout))  # type: ignore[arg-type]
    return message


def policy(
    routes: dict[str, int] | None = None, shadow: tuple[str, int] = ("", 0), revision: int = 1
) -> pb.RolloutPolicy:
    return pb.RolloutPolicy(
        model="m",
        routes=[pb.RouteWeight(alias=a, weight=w) for a, w in (routes or {}).items()],
        shadow=pb.ShadowRoute(alias=shadow[0], percent=shadow[1]),
        revision=revision,
    )


def moved(alias: str, to: int, event_id: int) -> pb.AliasEvent:
    return pb.AliasEvent(model="m", alias=alias, to_version=to, id=event_id)


def test_a_newer_move_applies_and_a_repeated_or_older_one_changes_nothing():
    state = ModelState.from_snapshot("m", snapshot({"production": (1, 5)}))
    assert state.apply_alias_event(moved("production", 2, 6))
    assert state.plan("production") == Plan((PlannedRoute("production", 2, 100),))
    before = state.plan("production")
    assert not state.apply_alias_event(moved("production", 2, 6))  # delivered twice
    assert not state.apply_alias_event(moved("production", 1, 4))  # older, arriving late
    assert not state.apply_alias_event(moved("production", 1, 5))  # what the snapshot showed
    assert state.plan("production") == before


def test_a_deleted_alias_cannot_be_revived_by_an_older_move():
    state = ModelState.from_snapshot("m", snapshot({"production": (1, 5)}))
    assert state.apply_alias_event(moved("production", 0, 7))
    assert state.plan("production") is None
    assert not state.apply_alias_event(moved("production", 3, 6))
    assert state.plan("production") is None


def test_rollout_revisions_only_move_forward():
    state = ModelState.from_snapshot(
        "m", snapshot({"production": (1, 1), "canary": (2, 2)}, routes=None, revision=3)
    )
    assert not state.apply_rollout(policy({"production": 90, "canary": 10}, revision=3))
    assert state.apply_rollout(policy({"production": 90, "canary": 10}, revision=4))
    assert not state.apply_rollout(policy({}, revision=2))
    assert state.plan("production") == Plan(
        (PlannedRoute("production", 1, 90), PlannedRoute("canary", 2, 10))
    )


def test_the_policy_applies_only_to_servers_following_a_routed_alias():
    state = ModelState.from_snapshot(
        "m",
        snapshot(
            {"production": (1, 1), "canary": (2, 2), "staging": (3, 3), "shadow": (4, 4)},
            routes={"canary": 20, "production": 80},
            shadow=("shadow", 5),
        ),
    )
    plan = state.plan("production")
    assert plan is not None
    assert plan.routes[0] == PlannedRoute("production", 1, 80)  # the followed alias first
    assert plan.shadow == PlannedRoute("shadow", 4, 5)
    assert plan.versions == {1, 2, 4}
    assert state.plan("staging") == Plan((PlannedRoute("staging", 3, 100),))


def test_a_routed_alias_that_is_gone_gives_its_weight_to_the_followed_one():
    state = ModelState.from_snapshot(
        "m", snapshot({"production": (1, 1)}, routes={"production": 70, "canary": 30})
    )
    assert state.plan("production") == Plan((PlannedRoute("production", 1, 100),))


def test_state_round_trips_through_the_cache_json():
    state = ModelState.from_snapshot(
        "m",
        snapshot(
            {"production": (1, 1), "canary": (2, 2)},
            routes={"production": 90, "canary": 10},
            shadow=("canary", 3),
            revision=9,
        ),
    )
    again = ModelState.from_json("m", state.to_json())
    assert again == state


def test_targets():
    assert parse_target("fraud", "production") == Target("fraud", "production")
    assert parse_target("fraud@canary", "production") == Target("fraud", "canary")
    for bad in ("", "@x", "fraud@"):
        with pytest.raises(ValueError):
            parse_target(bad, "production")


def test_weights_split_requests_and_keys_stick():
    table = RouteTable([Route("production", "v1", 90), Route("canary", "v2", 10)])
    counts = Counter(table.pick().alias for _ in range(20_000))
    assert 1_700 <= counts["canary"] <= 2_300  # 10% ± 7 standard deviations
    for key in (f"user-{n}" for n in range(500)):
        assert len({table.pick(key).alias for _ in range(3)}) == 1
    # Raising the canary's share only moves keys towards it.
    wider = RouteTable([Route("production", "v1", 80), Route("canary", "v2", 20)])
    for key in (f"user-{n}" for n in range(2_000)):
        if table.pick(key).alias == "canary":
            assert wider.pick(key).alias == "canary"
    assert key_point("user-1") == key_point("user-1")


def test_a_single_route_and_the_shadow_share():
    table = RouteTable([Route("production", "v1", 100)], Shadow("shadow", "v9", 25))
    assert {table.pick(str(n)).version for n in range(100)} == {"v1"}
    mirrored = sum(table.mirror() is not None for _ in range(20_000))
    assert 4_400 <= mirrored <= 5_600
    with pytest.raises(ValueError):
        RouteTable([Route("production", "v1", 90)])


def test_cache_fetches_verifies_and_replaces_corrupted_blobs(tmp_path: Path):
    corrupted: list[str] = []
    cache = ArtifactCache(tmp_path, on_corrupted=corrupted.append)
    data = b"onnx bytes"
    digest = hashlib.sha256(data).hexdigest()
    downloads = []

    def download(path: Path) -> None:
        downloads.append(path)
        path.write_bytes(data)

    path = cache.fetch(digest, download)
    assert path.read_bytes() == data and len(downloads) == 1
    assert cache.fetch(digest, download) == path and len(downloads) == 1  # cached
    path.write_bytes(b"tampered!!")
    assert cache.fetch(digest, download).read_bytes() == data
    assert len(downloads) == 2 and corrupted == [digest]
    # Bytes that do not match the registered digest are never kept.
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(CacheCorrupted):
        cache.fetch(other, download)
    assert cache.verified(other) is None
    assert list(tmp_path.rglob("*.part")) == []


def test_cache_state_per_model(tmp_path: Path):
    cache = ArtifactCache(tmp_path)
    cache.save_state("fraud", {"alias": "production", "state": {}})
    cache.save_state("../evil", {"alias": "production"})
    assert cache.load_state("fraud") == {"model": "fraud", "alias": "production", "state": {}}
    assert sorted(cache.cached_models()) == ["../evil", "fraud"]
    assert all(p.parent == tmp_path / "models" for p in tmp_path.rglob("*.json"))
    assert cache.load_state("absent") is None
