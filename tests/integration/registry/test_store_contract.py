"""The Store contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from modelplane.kernel.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from modelplane.services.registry import domain
from modelplane.services.registry.domain import (
    ApprovalPolicy,
    AuditFilter,
    MissingFeaturePolicy,
    NewModel,
    ReviewDecision,
    RouteWeight,
    ShadowRoute,
    VersionStatus,
)
from modelplane.services.registry.store import Store, codec
from modelplane.services.registry.store import sql as sql_store
from modelplane.services.registry.store.codec import to_us
from modelplane.services.registry.store.migrations import LATEST_VERSION, MIGRATIONS
from tests.integration.registry.helpers import SERVING_CONFIG, fake_version, rich_metadata

StoreFactory = Callable[[], Store]


def _model(store: Store, name: str = "fraud", **kwargs: object) -> domain.Model:
    return store.create_model(NewModel(name=name, **kwargs), actor="alice")  # type: ignore[arg-type]


# --- models ---------------------------------------------------------------------------


def test_create_and_get_model(store: Store) -> None:
    created = _model(store, description="card fraud", owner="risk", tags={"team": "risk"})
    got = store.get_model("fraud")
    assert got == created
    assert (got.owner, dict(got.tags), got.latest_version, got.created_by) == (
        "risk",
        {"team": "risk"},
        0,
        "alice",
    )


def test_duplicate_model_is_already_exists(store: Store) -> None:
    _model(store)
    with pytest.raises(AlreadyExists, match="fraud"):
        _model(store)


def test_unknown_model_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_model("nope")
    with pytest.raises(NotFound):
        store.get_version("nope", 1)
    with pytest.raises(NotFound):
        store.create_version("nope", fake_version(), "alice")


@pytest.mark.parametrize("name", ["", "has space", "-leading", "x" * 129, "a/b"])
def test_bad_model_names_are_invalid(store: Store, name: str) -> None:
    with pytest.raises(InvalidArgument):
        _model(store, name)


def test_search_by_name_owner_and_tags(store: Store) -> None:
    _model(store, "fraud-eu", owner="risk", tags={"region": "eu", "tier": "1"})
    _model(store, "fraud-us", owner="risk", tags={"region": "us", "tier": "1"})
    _model(store, "churn", owner="growth", description="Predicts FRAUD-adjacent churn")
    names = lambda models: [m.name for m in models]  # noqa: E731
    assert names(store.list_models()) == ["churn", "fraud-eu", "fraud-us"]
    assert names(store.list_models(query="fraud")) == ["churn", "fraud-eu", "fraud-us"]
    assert names(store.list_models(query="EU")) == ["fraud-eu"]
    assert names(store.list_models(owner="risk")) == ["fraud-eu", "fraud-us"]
    assert names(store.list_models(tags={"tier": "1", "region": "us"})) == ["fraud-us"]
    assert names(store.list_models(tags={"tier": "2"})) == []
    assert names(store.list_models(after="churn", limit=1)) == ["fraud-eu"]


# --- versions -------------------------------------------------------------------------


def test_versions_number_from_one(store: Store) -> None:
    _model(store)
    assert [store.create_version("fraud", fake_version(str(i)), "bob").version for i in range(3)]
    assert store.get_model("fraud").latest_version == 3
    assert [v.version for v in store.list_versions("fraud")] == [3, 2, 1]
    assert [v.version for v in store.list_versions("fraud", before=3, limit=1)] == [2]
    with pytest.raises(NotFound, match="no version 4"):
        store.get_version("fraud", 4)


def test_sixteen_concurrent_creators_get_one_to_sixteen_once(store_factory: StoreFactory) -> None:
    """Each creator has its own store instance (own connections), as separate registry
    processes would; all start at once."""
    _model(store_factory())
    stores = [store_factory() for _ in range(16)]
    start = threading.Barrier(16)

    def create(index: int) -> int:
        start.wait()
        return stores[index].create_version("fraud", fake_version(str(index)), f"w{index}").version

    with ThreadPoolExecutor(16) as pool:
        numbers = list(pool.map(create, range(16)))
    assert sorted(numbers) == list(range(1, 17))
    assert sorted(v.version for v in stores[0].list_versions("fraud")) == list(range(1, 17))


def test_version_metadata_round_trips(store: Store) -> None:
    _model(store)
    new = fake_version("x", **rich_metadata())
    created = store.create_version("fraud", new, "bob")
    got = store.get_version("fraud", 1)
    assert got == created
    assert got.metadata == new.metadata
    assert got.metadata.serving_config == SERVING_CONFIG
    assert store.list_versions("fraud")[0].metadata.serving_config == SERVING_CONFIG
    assert got.signature == new.signature
    assert got.artifact == new.artifact
    assert got.status is VersionStatus.REGISTERED
    assert got.created_by == "bob"


@pytest.mark.parametrize(
    "stats",
    [
        (domain.FeatureStatistics("a", (0.0,), ()),),
        (domain.FeatureStatistics("a", (1.0, 0.0), (3,)),),
        (domain.FeatureStatistics("a", (0.0, 1.0), (3, 4)),),
        (domain.FeatureStatistics("a", (0.0, 1.0), (-1,)),),
    ],
)
def test_malformed_feature_statistics_are_invalid(
    store: Store, stats: tuple[domain.FeatureStatistics, ...]
) -> None:
    _model(store)
    with pytest.raises(InvalidArgument):
        store.create_version("fraud", fake_version(feature_statistics=stats), "bob")
    assert store.get_model("fraud").latest_version == 0


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("max_batch_size: 8 nonsense: 1", 'no field named "nonsense"'),
        ("max_batch_size: lots", "max_batch_size"),
        ("dynamic_batching {", "serving_config"),
        ("# " + "x" * domain.MAX_SERVING_CONFIG_BYTES, "bytes"),
    ],
)
def test_a_bad_serving_config_is_invalid_and_stores_nothing(
    store: Store, config: str, fragment: str
) -> None:
    _model(store)
    with pytest.raises(InvalidArgument, match=fragment) as info:
        store.create_version("fraud", fake_version(serving_config=config), "bob")
    assert len(info.value.message) < 400
    assert store.get_model("fraud").latest_version == 0
    assert store.list_audit(AuditFilter(action="version.create")) == []


def _two_inputs(new: domain.NewVersion) -> domain.NewVersion:
    inputs = (
        domain.TensorSpec("ids", "INT64", (-1, 1)),
        domain.TensorSpec("dense", "FP32", (-1, 6)),
    )
    return dataclasses.replace(new, signature=dataclasses.replace(new.signature, inputs=inputs))


def test_feature_input_round_trips_with_its_input_named(store: Store) -> None:
    _model(store)
    fill = domain.FeatureInput("customer_scorer", "dense", MissingFeaturePolicy.FILL)
    created = store.create_version(
        "fraud", _two_inputs(fake_version("a", feature_input=fill)), "bob"
    )
    # Empty input on a one-input model: stored as that input's name, policy REJECT.
    only = store.create_version(
        "fraud", fake_version("b", feature_input=domain.FeatureInput("customer_scorer")), "bob"
    )
    plain = store.create_version("fraud", fake_version("c"), "bob")
    assert created.metadata.feature_input == fill
    assert store.get_version("fraud", 1) == created
    assert only.metadata.feature_input == domain.FeatureInput(
        "customer_scorer", "input", MissingFeaturePolicy.REJECT
    )
    assert plain.metadata.feature_input is None
    listed = {v.version: v.metadata.feature_input for v in store.list_versions("fraud")}
    assert listed == {1: fill, 2: only.metadata.feature_input, 3: None}
    store.set_alias("fraud", "production", 1, 0, "", "carol")
    assert store.get_version_by_alias("fraud", "production").metadata.feature_input == fill
    audited = {
        e.target: e.details["feature_input"]
        for e in store.list_audit(AuditFilter(action="version.create"))
    }
    assert audited == {
        "fraud/v1": {"bundle": "customer_scorer", "input": "dense", "missing_policy": "fill"},
        "fraud/v2": {"bundle": "customer_scorer", "input": "input", "missing_policy": "reject"},
        "fraud/v3": None,
    }


@pytest.mark.parametrize(
    ("feature_input", "two_inputs", "fragment"),
    [
        (domain.FeatureInput(""), False, "feature_input.bundle is required"),
        (domain.FeatureInput("Customer-Scorer"), False, "feature_input.bundle"),
        (domain.FeatureInput("entity_key"), False, "feature_input.bundle"),
        (domain.FeatureInput("scorer", "nope"), False, "feature_input.input 'nope'"),
        (domain.FeatureInput("scorer"), True, "feature_input.input is required"),
        (domain.FeatureInput("scorer", "ids"), True, "INT64"),
    ],
)
def test_a_bad_feature_input_is_invalid_and_stores_nothing(
    store: Store, feature_input: domain.FeatureInput, two_inputs: bool, fragment: str
) -> None:
    _model(store)
    new = fake_version(feature_input=feature_input)
    with pytest.raises(InvalidArgument, match=fragment):
        store.create_version("fraud", _two_inputs(new) if two_inputs else new, "bob")
    assert store.get_model("fraud").latest_version == 0
    assert store.list_audit(AuditFilter(action="version.create")) == []


# --- aliases --------------------------------------------------------------------------


def _with_versions(store: Store, count: int = 3) -> None:
    _model(store)
    for i in range(count):
        store.create_version("fraud", fake_version(str(i)), "bob")


def test_alias_compare_and_set(store: Store) -> None:
    _with_versions(store)
    alias, event = store.set_alias("fraud", "production", 1, 0, "first launch", "carol")
    assert (alias.version, event.from_version, event.to_version) == (1, 0, 1)
    with pytest.raises(Conflict, match="held by v1"):
        store.set_alias("fraud", "production", 2, 0, "", "dave")
    with pytest.raises(Conflict, match="held by v1"):
        store.set_alias("fraud", "production", 2, 3, "", "dave")
    store.set_alias("fraud", "production", 2, 1, "better auc", "carol")
    assert store.get_version_by_alias("fraud", "production").version == 2
    assert store.get_version("fraud", 2).aliases == ("production",)
    assert store.get_version("fraud", 1).aliases == ()
    with pytest.raises(NotFound):
        store.set_alias("fraud", "canary", 9, 0, "", "carol")
    with pytest.raises(NotFound):
        store.get_version_by_alias("fraud", "canary")


@pytest.mark.parametrize("alias", ["v1", "V12", "", "has space"])
def test_reserved_or_bad_alias_names_are_invalid(store: Store, alias: str) -> None:
    _with_versions(store, 1)
    with pytest.raises(InvalidArgument):
        store.set_alias("fraud", alias, 1, 0, "", "carol")


def test_concurrent_promoters_one_wins(store_factory: StoreFactory) -> None:
    first = store_factory()
    _with_versions(first, 3)
    first.set_alias("fraud", "production", 1, 0, "", "carol")
    stores = [store_factory() for _ in range(8)]
    start = threading.Barrier(8)

    def promote(index: int) -> str:
        start.wait()
        try:
            stores[index].set_alias("fraud", "production", 2 + index % 2, 1, "", f"p{index}")
        except Conflict:
            return "lost"
        return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(promote, range(8)))
    assert outcomes.count("won") == 1
    history = first.alias_history("fraud", "production")
    assert (history[0].from_version, history[0].to_version) == (0, 1)
    assert len(history) == 2 and history[1].from_version == 1
    assert first.get_version_by_alias("fraud", "production").version == history[1].to_version


def test_alias_history_and_time_travel(store: Store) -> None:
    _with_versions(store)
    store.set_alias("fraud", "production", 1, 0, "launch", "carol")
    time.sleep(0.002)  # ok-sleep: distinct microsecond timestamps, not a readiness wait
    between = datetime.now(UTC)
    time.sleep(0.002)  # ok-sleep: as above
    store.set_alias("fraud", "production", 3, 1, "hotfix", "dave")
    store.set_alias("fraud", "canary", 2, 0, "", "erin")
    history = store.alias_history("fraud", "production")
    assert [(e.from_version, e.to_version, e.actor, e.reason) for e in history] == [
        (0, 1, "carol", "launch"),
        (1, 3, "dave", "hotfix"),
    ]
    assert len(store.alias_history("fraud")) == 3
    assert store.alias_at("fraud", "production", to_us(between)).to_version == 1
    assert store.alias_at("fraud", "production", to_us(datetime.now(UTC))).to_version == 3
    with pytest.raises(NotFound):
        store.alias_at("fraud", "production", to_us(between - timedelta(days=1)))
    event = store.delete_alias("fraud", "production", 3, "incident", "dave")
    assert (event.from_version, event.to_version) == (3, 0)
    with pytest.raises(NotFound):
        store.alias_at("fraud", "production", to_us(datetime.now(UTC)))
    assert store.alias_at("fraud", "production", to_us(between)).to_version == 1
    assert [a.alias for a in store.list_aliases("fraud")] == ["canary"]


def test_alias_moves_carry_increasing_ids(store: Store) -> None:
    _with_versions(store, 3)
    first, e1 = store.set_alias("fraud", "production", 1, 0, "", "carol")
    second, e2 = store.set_alias("fraud", "canary", 2, 0, "", "carol")
    third, e3 = store.set_alias("fraud", "production", 3, 1, "", "carol")
    assert 0 < e1.id < e2.id < e3.id
    assert (first.event_id, second.event_id, third.event_id) == (e1.id, e2.id, e3.id)
    listed = {a.alias: a.event_id for a in store.list_aliases("fraud")}
    assert listed == {"canary": e2.id, "production": e3.id}
    assert [e.id for e in store.alias_history("fraud")] == [e1.id, e2.id, e3.id]
    assert [e.id for e in store.alias_history("fraud", "production")] == [e1.id, e3.id]
    assert store.alias_event(e2.id) == e2
    assert store.alias_at("fraud", "production", to_us(datetime.now(UTC))).id == e3.id
    removed = store.delete_alias("fraud", "canary", 2, "", "carol")
    assert removed.id > e3.id
    assert store.alias_history("fraud")[-1] == removed


def test_delete_alias_is_compare_and_set(store: Store) -> None:
    _with_versions(store, 2)
    store.set_alias("fraud", "canary", 2, 0, "", "carol")
    with pytest.raises(Conflict, match="held by v2"):
        store.delete_alias("fraud", "canary", 1, "", "carol")
    with pytest.raises(NotFound):
        store.delete_alias("fraud", "nope", 1, "", "carol")


# --- approvals and status -------------------------------------------------------------


def test_approval_policy_guards_protected_aliases(store: Store) -> None:
    _with_versions(store, 2)
    store.set_approval_policy("fraud", ApprovalPolicy(2, ("production",)), "admin")
    with pytest.raises(FailedPrecondition, match="requires 2 approval"):
        store.set_alias("fraud", "production", 1, 0, "", "carol")
    store.set_alias("fraud", "canary", 1, 0, "", "carol")  # not protected
    store.add_review("fraud", 1, ReviewDecision.APPROVE, "looks good", "rev1")
    _, version = store.add_review("fraud", 1, ReviewDecision.APPROVE, "again", "rev1")
    assert version.approvals == 1  # one reviewer counts once
    assert version.status is VersionStatus.REGISTERED
    with pytest.raises(FailedPrecondition, match="has 1"):
        store.set_alias("fraud", "production", 1, 0, "", "carol")
    review, version = store.add_review("fraud", 1, ReviewDecision.APPROVE, "ok", "rev2")
    assert (review.actor, review.comment, version.approvals) == ("rev2", "ok", 2)
    assert version.status is VersionStatus.APPROVED
    store.set_alias("fraud", "production", 1, 0, "approved", "carol")
    # A rejection withdraws that reviewer's approval.
    _, version = store.add_review("fraud", 1, ReviewDecision.REJECT, "bias found", "rev2")
    assert (version.approvals, version.status) == (1, VersionStatus.REGISTERED)
    reviews = store.list_reviews("fraud", 1)
    assert [(r.actor, r.decision) for r in reviews][-1] == ("rev2", ReviewDecision.REJECT)
    assert len(reviews) == 4


def test_status_rules(store: Store) -> None:
    _with_versions(store, 2)
    store.set_alias("fraud", "production", 1, 0, "", "carol")
    with pytest.raises(FailedPrecondition, match="production"):
        store.set_version_status("fraud", 1, VersionStatus.ARCHIVED, "", "admin")
    with pytest.raises(InvalidArgument):
        store.set_version_status("fraud", 2, VersionStatus.APPROVED, "", "admin")
    deprecated = store.set_version_status("fraud", 2, VersionStatus.DEPRECATED, "old", "admin")
    assert deprecated.status is VersionStatus.DEPRECATED
    with pytest.raises(FailedPrecondition, match="deprecated"):
        store.set_alias("fraud", "production", 2, 1, "", "carol")
    archived = store.set_version_status("fraud", 2, VersionStatus.ARCHIVED, "gone", "admin")
    assert archived.status is VersionStatus.ARCHIVED
    with pytest.raises(FailedPrecondition, match="archived"):
        store.set_version_status("fraud", 2, VersionStatus.REGISTERED, "", "admin")
    with pytest.raises(FailedPrecondition, match="archived"):
        store.add_review("fraud", 2, ReviewDecision.APPROVE, "", "rev1")


# --- rollout policies -----------------------------------------------------------------

CANARY = (RouteWeight("production", 90), RouteWeight("canary", 10))
NO_SHADOW = ShadowRoute()


def _with_rollout_aliases(store: Store) -> None:
    _with_versions(store, 3)
    store.set_alias("fraud", "production", 1, 0, "", "carol")
    store.set_alias("fraud", "canary", 2, 0, "", "carol")
    store.set_alias("fraud", "shadow", 3, 0, "", "carol")


def test_rollout_policy_compare_and_set(store: Store) -> None:
    _with_rollout_aliases(store)
    never = store.get_rollout("fraud")
    assert (never.revision, never.routes, never.shadow.active, never.updated_at) == (
        0,
        (),
        False,
        None,
    )
    first = store.set_rollout("fraud", CANARY, NO_SHADOW, 0, "canary 10%", "carol")
    assert (first.revision, first.routes, first.updated_by, first.reason) == (
        1,
        CANARY,
        "carol",
        "canary 10%",
    )
    assert store.get_rollout("fraud") == first
    with pytest.raises(Conflict, match="at revision 1 \\(expected 0\\)"):
        store.set_rollout("fraud", (), NO_SHADOW, 0, "", "dave")
    second = store.set_rollout("fraud", CANARY, ShadowRoute("shadow", 5), 1, "", "dave")
    assert (second.revision, second.shadow) == (2, ShadowRoute("shadow", 5))
    off = store.set_rollout("fraud", (), ShadowRoute("shadow", 0), 2, "done", "dave")
    assert (off.revision, off.routes, off.shadow) == (3, (), ShadowRoute())
    assert store.get_rollout("fraud") == off
    assert store.get_rollout("fraud", revision=1) == first
    with pytest.raises(NotFound):
        store.get_rollout("fraud", revision=9)
    with pytest.raises(NotFound):
        store.get_rollout("ghost")
    with pytest.raises(NotFound):
        store.set_rollout("ghost", (), NO_SHADOW, 0, "", "dave")


@pytest.mark.parametrize(
    ("routes", "shadow", "fragment"),
    [
        ((RouteWeight("production", 50), RouteWeight("production", 50)), NO_SHADOW, "twice"),
        ((RouteWeight("production", 100), RouteWeight("canary", 0)), NO_SHADOW, "weight"),
        ((RouteWeight("production", 101),), NO_SHADOW, "weight"),
        ((RouteWeight("production", 80), RouteWeight("canary", 10)), NO_SHADOW, "sum to 100"),
        ((RouteWeight("production", 90), RouteWeight("nope", 10)), NO_SHADOW, "routes\\[1\\]"),
        ((RouteWeight("v2", 100),), NO_SHADOW, "routes\\[0\\].alias"),
        ((), ShadowRoute("shadow", 101), "shadow.percent"),
        ((), ShadowRoute("shadow", -1), "shadow.percent"),
        ((), ShadowRoute("nope", 5), "shadow.alias"),
        ((), ShadowRoute("", 5), "shadow.alias"),
        (CANARY, ShadowRoute("canary", 5), "shadow.alias"),
    ],
)
def test_a_bad_rollout_is_invalid_and_stores_nothing(
    store: Store, routes: tuple[RouteWeight, ...], shadow: ShadowRoute, fragment: str
) -> None:
    _with_rollout_aliases(store)
    with pytest.raises(InvalidArgument, match=fragment):
        store.set_rollout("fraud", routes, shadow, 0, "", "carol")
    assert store.get_rollout("fraud").revision == 0
    assert store.list_audit(AuditFilter(action="rollout.set")) == []


def test_concurrent_rollout_setters_one_wins(store_factory: StoreFactory) -> None:
    first = store_factory()
    _with_rollout_aliases(first)
    stores = [store_factory() for _ in range(6)]
    start = threading.Barrier(6)

    def set_policy(index: int) -> str:
        start.wait()
        routes = (RouteWeight("production", 100 - index - 1), RouteWeight("canary", index + 1))
        try:
            stores[index].set_rollout("fraud", routes, NO_SHADOW, 0, "", f"p{index}")
        except Conflict:
            return "lost"
        return "won"

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(set_policy, range(6)))
    assert outcomes.count("won") == 1
    assert first.get_rollout("fraud").revision == 1


def test_routed_aliases_need_approvals_and_are_guarded(store: Store) -> None:
    _with_rollout_aliases(store)
    store.set_approval_policy("fraud", ApprovalPolicy(1, ("production",)), "admin")
    with pytest.raises(FailedPrecondition, match=r"'production'.*v1, which it holds, has 0"):
        store.set_rollout("fraud", CANARY, NO_SHADOW, 0, "", "carol")
    store.add_review("fraud", 1, ReviewDecision.APPROVE, "", "rev1")
    with pytest.raises(FailedPrecondition, match=r"'canary'.*v2, which it holds, has 0"):
        store.set_rollout("fraud", CANARY, NO_SHADOW, 0, "", "carol")
    assert store.get_rollout("fraud").revision == 0
    store.add_review("fraud", 2, ReviewDecision.APPROVE, "", "rev1")
    # The shadow's answers are discarded: v3 needs no approval to receive copies.
    store.set_rollout("fraud", CANARY, ShadowRoute("shadow", 20), 0, "", "carol")
    # While canary carries traffic it is guarded like production: unapproved v3 may not
    # take it; the shadow, carrying none, may move freely.
    with pytest.raises(FailedPrecondition, match=r"rollout policy.*has 0"):
        store.set_alias("fraud", "canary", 3, 2, "", "carol")
    store.set_alias("fraud", "shadow", 2, 3, "", "carol")
    store.add_review("fraud", 3, ReviewDecision.APPROVE, "", "rev1")
    store.set_alias("fraud", "canary", 3, 2, "", "carol")
    # Without the policy's routes the canary is an ordinary alias again.
    store.set_rollout("fraud", (), NO_SHADOW, 1, "", "carol")
    store.add_review("fraud", 1, ReviewDecision.REJECT, "", "rev1")
    store.set_alias("fraud", "canary", 1, 3, "", "carol")


def test_aliases_in_use_by_the_rollout_cannot_be_deleted(store: Store) -> None:
    _with_rollout_aliases(store)
    store.set_rollout("fraud", CANARY, ShadowRoute("shadow", 5), 0, "", "carol")
    with pytest.raises(FailedPrecondition, match=r"'canary'.*turn the policy off"):
        store.delete_alias("fraud", "canary", 2, "", "carol")
    with pytest.raises(FailedPrecondition, match=r"'shadow'.*shadow"):
        store.delete_alias("fraud", "shadow", 3, "", "carol")
    assert len(store.list_aliases("fraud")) == 3
    store.set_rollout("fraud", (), NO_SHADOW, 1, "", "carol")
    store.delete_alias("fraud", "canary", 2, "", "carol")
    store.delete_alias("fraud", "shadow", 3, "", "carol")
    assert [a.alias for a in store.list_aliases("fraud")] == ["production"]


def test_rollout_changes_are_audited_with_the_policy(store: Store) -> None:
    _with_rollout_aliases(store)
    store.set_rollout("fraud", CANARY, ShadowRoute("shadow", 5), 0, "try v2", "carol")
    (event,) = store.list_audit(AuditFilter(action="rollout.set"))
    assert (event.actor, event.target) == ("carol", "fraud")
    assert event.details == {
        "routes": [{"alias": "production", "weight": 90}, {"alias": "canary", "weight": 10}],
        "shadow": {"alias": "shadow", "percent": 5},
        "revision": 1,
        "reason": "try v2",
    }


# --- audit and schema -----------------------------------------------------------------


def test_every_mutation_is_audited(store: Store) -> None:
    _with_versions(store, 2)
    store.set_alias("fraud", "production", 1, 0, "launch", "carol")
    store.add_review("fraud", 2, ReviewDecision.APPROVE, "ok", "rev1")
    store.set_version_status("fraud", 1, VersionStatus.DEPRECATED, "", "admin")
    store.set_approval_policy("fraud", ApprovalPolicy(1, ("production",)), "admin")
    store.record_audit("mallory", "alias.set", "fraud@production", {"outcome": "refused"})
    events = store.list_audit(AuditFilter())
    assert [(e.actor, e.action, e.target) for e in events] == [
        ("mallory", "alias.set", "fraud@production"),
        ("admin", "model.policy.set", "fraud"),
        ("admin", "version.status.set", "fraud/v1"),
        ("rev1", "version.review.approve", "fraud/v2"),
        ("carol", "alias.set", "fraud@production"),
        ("bob", "version.create", "fraud/v2"),
        ("bob", "version.create", "fraud/v1"),
        ("alice", "model.create", "fraud"),
    ]
    assert events[3].details["comment"] == "ok"
    assert [e.action for e in store.list_audit(AuditFilter(actor="bob"))] == ["version.create"] * 2
    assert len(store.list_audit(AuditFilter(target_prefix="fraud@"))) == 2
    assert len(store.list_audit(AuditFilter(action="model.create"))) == 1
    page = store.list_audit(AuditFilter(), before_id=events[1].id, limit=2)
    assert [e.id for e in page] == [events[2].id, events[3].id]
    future = datetime.now(UTC) + timedelta(hours=1)
    assert store.list_audit(AuditFilter(since=future)) == []


def test_a_refused_mutation_changes_nothing(store: Store) -> None:
    _with_versions(store, 1)
    before = store.list_audit(AuditFilter())
    with pytest.raises(NotFound):
        store.set_alias("fraud", "production", 7, 0, "", "carol")
    assert store.list_audit(AuditFilter()) == before
    assert store.alias_history("fraud") == []


def _old_model_row(tx: Any) -> None:
    """Model `fraud` as the first releases wrote it (today's store writes later columns
    too, which an old schema lacks)."""
    tx.execute(
        "INSERT INTO models (name, description, owner, required_approvals,"
        " protected_aliases, latest_version, created_us, created_by)"
        " VALUES ('fraud', '', '', 0, '[]', 0, 1, 'bob')"
    )


def test_a_release_1_database_is_migrated_with_its_aliases(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 1 as the first release left it: migrating adds serving_config (empty),
    fills each alias's event_id from its history, and creates the rollout table."""
    monkeypatch.setattr(sql_store, "MIGRATIONS", MIGRATIONS[:1])
    monkeypatch.setattr(sql_store, "LATEST_VERSION", 1)
    old = store_factory()
    assert old.schema_version() == 1
    digest = "ab" * 32
    with old._transaction(write=True) as tx:  # type: ignore[attr-defined]
        _old_model_row(tx)
        for number in (1, 2):
            tx.execute(
                "INSERT INTO versions (model, version, description, sha256, size_bytes, format,"
                " signature, lineage, card, feature_statistics, status, created_us, created_by)"
                " VALUES (?, ?, '', ?, 1, 'onnx', ?, ?, ?, '[]', 'registered', 1, 'bob')",
                (
                    "fraud",
                    number,
                    digest,
                    '{"inputs": [], "outputs": [], "ir_version": 10, "opset_version": 17}',
                    '{"training_data_ref": "", "training_data_version": "", "code_revision": "",'
                    ' "params": {}, "metrics": []}',
                    '{"intended_use": "", "out_of_scope_uses": "", "limitations": "",'
                    ' "ethical_considerations": "", "evaluation_data": ""}',
                ),
            )
        tx.execute("UPDATE models SET latest_version = 2 WHERE name = 'fraud'")
        for source, target in ((0, 1), (1, 2)):
            tx.execute(
                "INSERT INTO alias_history (model, alias, from_version, to_version, actor,"
                " time_us, reason) VALUES ('fraud', 'production', ?, ?, 'carol', ?, '')",
                (source, target, target),
            )
        tx.execute(
            "INSERT INTO aliases (model, alias, version, updated_us, updated_by)"
            " VALUES ('fraud', 'production', 2, 2, 'carol')"
        )
    monkeypatch.undo()

    new = store_factory()
    assert new.schema_version() == LATEST_VERSION
    history = new.alias_history("fraud", "production")
    (alias,) = new.list_aliases("fraud")
    assert alias.event_id == history[-1].id > history[0].id > 0
    assert new.get_version("fraud", 2).metadata.serving_config == ""
    assert new.get_version("fraud", 2).metadata.feature_input is None
    assert new.get_rollout("fraud").revision == 0
    assert new.get_model("fraud").approval_policy.allow_self_approval is False
    new.set_rollout("fraud", (RouteWeight("production", 100),), NO_SHADOW, 0, "", "carol")
    moved, event = new.set_alias("fraud", "production", 1, 2, "", "carol")
    assert moved.event_id == event.id > alias.event_id


def test_versions_stored_before_feature_inputs_read_as_none(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 4 (serving configs, no feature inputs): its rows read back with none, and
    new versions beside them keep theirs."""
    monkeypatch.setattr(sql_store, "MIGRATIONS", MIGRATIONS[:4])
    monkeypatch.setattr(sql_store, "LATEST_VERSION", 4)
    old = store_factory()
    assert old.schema_version() == 4
    with old._transaction(write=True) as tx:  # type: ignore[attr-defined]
        _old_model_row(tx)
        tx.execute(
            "INSERT INTO versions (model, version, description, sha256, size_bytes, format,"
            " signature, lineage, card, feature_statistics, status, created_us, created_by,"
            " serving_config)"
            " VALUES ('fraud', 1, '', ?, 1, 'onnx', ?, ?, ?, '[]', 'registered', 1, 'bob', ?)",
            (
                "cd" * 32,
                codec.signature_to_json(fake_version().signature),
                codec.lineage_to_json(domain.Lineage()),
                codec.card_to_json(domain.ModelCard()),
                SERVING_CONFIG,
            ),
        )
        tx.execute("UPDATE models SET latest_version = 1 WHERE name = 'fraud'")
    monkeypatch.undo()

    new = store_factory()
    assert new.schema_version() == LATEST_VERSION == 6
    migrated = new.get_version("fraud", 1)
    assert migrated.metadata.feature_input is None
    assert migrated.metadata.serving_config == SERVING_CONFIG
    wanted = domain.FeatureInput("scorer", "input", MissingFeaturePolicy.FILL)
    new.create_version("fraud", fake_version("d", feature_input=wanted), "bob")
    listed = {v.version: v.metadata.feature_input for v in new.list_versions("fraud")}
    assert listed == {1: None, 2: wanted}


def test_migrations_are_applied_once(store_factory: StoreFactory) -> None:
    first = store_factory()
    _model(first)
    second = store_factory()  # opening again re-runs migrate(): nothing to apply
    assert second.schema_version() == LATEST_VERSION
    assert second.get_model("fraud").name == "fraud"
