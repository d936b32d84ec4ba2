"""The Store contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

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
    NewModel,
    ReviewDecision,
    VersionStatus,
)
from modelplane.services.registry.store import Store
from modelplane.services.registry.store.codec import to_us
from modelplane.services.registry.store.migrations import LATEST_VERSION
from tests.integration.registry.helpers import fake_version, rich_metadata

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


def test_migrations_are_applied_once(store_factory: StoreFactory) -> None:
    first = store_factory()
    _model(first)
    second = store_factory()  # opening again re-runs migrate(): nothing to apply
    assert second.schema_version() == LATEST_VERSION
    assert second.get_model("fraud").name == "fraud"
