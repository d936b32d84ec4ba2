"""The registry's rules, without storage or gRPC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from modelplane.kernel.errors import Conflict, FailedPrecondition, InvalidArgument
from modelplane.services.registry import domain
from modelplane.services.registry.domain import (
    ApprovalPolicy,
    Review,
    ReviewDecision,
    VersionStatus,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _review(actor: str, decision: ReviewDecision, minute: int) -> Review:
    return Review("m", 1, actor, decision, "", T0 + timedelta(minutes=minute))


@pytest.mark.parametrize("alias", ["v1", "v0", "V42"])
def test_version_like_aliases_are_reserved(alias: str) -> None:
    with pytest.raises(InvalidArgument, match="reserved"):
        domain.validate_alias_name(alias)


@pytest.mark.parametrize("alias", ["production", "canary", "v1beta", "shadow-2", "vx"])
def test_ordinary_aliases_are_allowed(alias: str) -> None:
    domain.validate_alias_name(alias)


def test_latest_review_per_reviewer_counts() -> None:
    reviews = [
        _review("a", ReviewDecision.APPROVE, 1),
        _review("b", ReviewDecision.APPROVE, 2),
        _review("a", ReviewDecision.APPROVE, 3),
        _review("b", ReviewDecision.REJECT, 4),
        _review("c", ReviewDecision.REJECT, 5),
        _review("c", ReviewDecision.APPROVE, 6),
    ]
    assert domain.count_approvals(reviews) == 2  # a and c


def test_status_follows_approvals() -> None:
    policy = ApprovalPolicy(2, ("production",))
    assert domain.status_after_review(VersionStatus.REGISTERED, 1, policy) is (
        VersionStatus.REGISTERED
    )
    assert domain.status_after_review(VersionStatus.REGISTERED, 2, policy) is (
        VersionStatus.APPROVED
    )
    assert domain.status_after_review(VersionStatus.APPROVED, 1, policy) is (
        VersionStatus.REGISTERED
    )
    # Without a policy one approval approves; deprecated stays deprecated.
    assert domain.status_after_review(VersionStatus.REGISTERED, 1, ApprovalPolicy()) is (
        VersionStatus.APPROVED
    )
    assert domain.status_after_review(VersionStatus.DEPRECATED, 5, policy) is (
        VersionStatus.DEPRECATED
    )


def test_compare_and_set_names_the_holder() -> None:
    domain.check_alias_expectation("m", "prod", None, 0)
    domain.check_alias_expectation("m", "prod", 3, 3)
    with pytest.raises(Conflict, match="held by v3"):
        domain.check_alias_expectation("m", "prod", 3, 2)
    with pytest.raises(Conflict, match="held by v3 \\(expected it to be unset\\)"):
        domain.check_alias_expectation("m", "prod", 3, 0)
    with pytest.raises(Conflict, match="not set"):
        domain.check_alias_expectation("m", "prod", None, 2)


def test_alias_target_rules() -> None:
    policy = ApprovalPolicy(1, ("production",))
    domain.check_alias_target("m", "canary", 1, VersionStatus.REGISTERED, 0, policy)
    domain.check_alias_target("m", "production", 1, VersionStatus.APPROVED, 1, policy)
    with pytest.raises(FailedPrecondition, match="requires 1 approval"):
        domain.check_alias_target("m", "production", 1, VersionStatus.REGISTERED, 0, policy)
    for status in (VersionStatus.DEPRECATED, VersionStatus.ARCHIVED):
        with pytest.raises(FailedPrecondition, match=status.value):
            domain.check_alias_target("m", "canary", 1, status, 9, policy)


def test_status_changes() -> None:
    policy = ApprovalPolicy()
    change = domain.check_status_change
    assert change("m", 1, VersionStatus.REGISTERED, VersionStatus.DEPRECATED, (), 0, policy) is (
        VersionStatus.DEPRECATED
    )
    # Reinstating keeps earned approvals.
    assert change("m", 1, VersionStatus.DEPRECATED, VersionStatus.REGISTERED, (), 1, policy) is (
        VersionStatus.APPROVED
    )
    with pytest.raises(FailedPrecondition, match="canary"):
        change("m", 1, VersionStatus.REGISTERED, VersionStatus.ARCHIVED, ("canary",), 0, policy)
    with pytest.raises(FailedPrecondition, match="stay archived"):
        change("m", 1, VersionStatus.ARCHIVED, VersionStatus.DEPRECATED, (), 0, policy)
    with pytest.raises(InvalidArgument):
        change("m", 1, VersionStatus.REGISTERED, VersionStatus.APPROVED, (), 0, policy)


def test_policy_must_name_what_it_protects() -> None:
    with pytest.raises(InvalidArgument):
        domain.validate_policy(ApprovalPolicy(2, ()))
    with pytest.raises(InvalidArgument):
        domain.validate_policy(ApprovalPolicy(-1, ("production",)))
    domain.validate_policy(ApprovalPolicy(0, ()))


def test_metrics_must_be_finite() -> None:
    lineage = domain.Lineage(metrics=(domain.Metric("auc", float("nan")),))
    with pytest.raises(InvalidArgument, match="finite"):
        domain.validate_metadata(domain.VersionMetadata(lineage=lineage))


def test_page_size_is_bounded() -> None:
    assert domain.page_size(0) == domain.DEFAULT_PAGE_SIZE
    assert domain.page_size(5000) == domain.MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument):
        domain.page_size(-1)
