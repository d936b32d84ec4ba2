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


# --- serving config -----------------------------------------------------------------------


def test_serving_config_must_parse_as_a_triton_model_config() -> None:
    domain.validate_serving_config("")
    domain.validate_serving_config(
        "max_batch_size: 16\n"
        "dynamic_batching { preferred_batch_size: [4, 16] max_queue_delay_microseconds: 100 }\n"
        'parameters { key: "execution_provider" value: { string_value: "cpu" } }\n'
    )
    with pytest.raises(InvalidArgument, match='no field named "max_batch"'):
        domain.validate_serving_config("max_batch: 16")
    with pytest.raises(InvalidArgument, match="KIND_TPU"):
        domain.validate_serving_config("instance_group [ { kind: KIND_TPU } ]")
    # The parser quotes the offending line; a long one is not echoed whole.
    with pytest.raises(InvalidArgument) as info:
        domain.validate_serving_config("max_batch_size: " + "9" * 5000 + "x")
    assert len(info.value.message) < 400


def test_serving_config_size_is_bounded() -> None:
    limit = domain.MAX_SERVING_CONFIG_BYTES
    domain.validate_serving_config("#" * (limit - 1) + "\n")
    with pytest.raises(InvalidArgument, match=f"at most {limit}"):
        domain.validate_serving_config("#" * limit + "\n")
    # Bytes, not characters: a comment of two-byte characters counts twice.
    with pytest.raises(InvalidArgument, match="bytes"):
        domain.validate_serving_config("# " + "é" * (limit // 2))


# --- bounded echoes -------------------------------------------------------------------------


def test_errors_quote_at_most_a_bounded_part_of_a_bad_value() -> None:
    huge = "x" * 10_000
    for check in (
        lambda: domain.validate_model_name(huge),
        lambda: domain.validate_model_name(huge + " "),
        lambda: domain.validate_alias_name(huge),
        lambda: domain.validate_labels("tag", {huge: "v"}),
        lambda: domain.validate_metadata(
            domain.VersionMetadata(
                lineage=domain.Lineage(metrics=(domain.Metric(huge, float("inf")),))
            )
        ),
        lambda: domain.validate_feature_statistics((domain.FeatureStatistics(huge, (0.0,), ()),)),
    ):
        with pytest.raises(InvalidArgument) as info:
            check()
        assert "x" * 32 in info.value.message
        assert len(info.value.message) < 300, info.value.message
    assert domain.quote("short") == "'short'"
    assert domain.quote("y" * 100) == repr("y" * 64) + "... (100 characters)"


# --- rollout policies -----------------------------------------------------------------------

R = domain.RouteWeight
S = domain.ShadowRoute
HOLDERS = {"production": 1, "canary": 2, "shadow": 3}


def test_rollout_routes_must_be_distinct_weights_summing_to_100() -> None:
    assert domain.validate_rollout((), S()) == S()
    assert domain.validate_rollout((R("production", 100),), S()) == S()
    assert domain.validate_rollout((R("a", 1), R("b", 99)), S("c", 100)) == S("c", 100)
    for routes, fragment in (
        ((R("a", 50), R("a", 50)), "routes\\[1\\].alias 'a' is routed twice"),
        ((R("a", 0), R("b", 100)), "routes\\[0\\].weight of 'a' must be 1..100, got 0"),
        ((R("a", 101),), "routes\\[0\\].weight"),
        ((R("a", -5), R("b", 105)), "routes\\[0\\].weight"),
        ((R("a", 60), R("b", 30)), "sum to 100, got 90"),
        ((R("a", 60), R("b", 50)), "sum to 100, got 110"),
        ((R("", 100),), "routes\\[0\\].alias is required"),
        ((R("v3", 100),), "routes\\[0\\].alias 'v3' is reserved"),
    ):
        with pytest.raises(InvalidArgument, match=fragment):
            domain.validate_rollout(routes, S())


def test_rollout_shadow_rules() -> None:
    # Percent 0 is no shadow, whatever alias came with it.
    assert domain.validate_rollout((), S("anything at all", 0)) == S()
    for shadow, fragment in (
        (S("shadow", 101), "shadow.percent must be 0..100, got 101"),
        (S("shadow", -1), "shadow.percent"),
        (S("", 5), "shadow.alias is required"),
        (S("bad name", 5), "shadow.alias 'bad name'"),
    ):
        with pytest.raises(InvalidArgument, match=fragment):
            domain.validate_rollout((), shadow)
    with pytest.raises(InvalidArgument, match=r"shadow.alias 'b' already answers"):
        domain.validate_rollout((R("a", 50), R("b", 50)), S("b", 10))


def test_rollout_names_existing_aliases() -> None:
    check = domain.check_rollout
    none = ApprovalPolicy()
    check("m", (R("production", 90), R("canary", 10)), S("shadow", 5), HOLDERS, {}, none)
    with pytest.raises(InvalidArgument, match=r"routes\[1\].alias: m has no alias 'beta'"):
        check("m", (R("production", 90), R("beta", 10)), S(), HOLDERS, {}, none)
    with pytest.raises(InvalidArgument, match=r"shadow.alias: m has no alias 'mirror'"):
        check("m", (), S("mirror", 5), HOLDERS, {}, none)
    check("m", (), S("mirror", 0), HOLDERS, {}, none)


def test_routed_aliases_need_the_required_approvals() -> None:
    policy = ApprovalPolicy(2, ("production",))
    routes = (R("production", 90), R("canary", 10))
    with pytest.raises(FailedPrecondition, match=r"'canary' of m requires 2.*v2.*has 1"):
        domain.check_rollout("m", routes, S(), HOLDERS, {1: 2, 2: 1}, policy)
    # The shadow answers no one: its version needs no approval.
    domain.check_rollout("m", routes, S("shadow", 50), HOLDERS, {1: 2, 2: 2}, policy)
    # Without required approvals anything existing may be routed.
    domain.check_rollout("m", routes, S(), HOLDERS, {}, ApprovalPolicy())


def test_a_routed_alias_is_guarded_like_a_protected_one() -> None:
    policy = ApprovalPolicy(1, ("production",))
    target = domain.check_alias_target
    target("m", "canary", 2, VersionStatus.REGISTERED, 0, policy)
    with pytest.raises(FailedPrecondition, match="rollout policy"):
        target("m", "canary", 2, VersionStatus.REGISTERED, 0, policy, frozenset({"canary"}))
    target("m", "canary", 2, VersionStatus.APPROVED, 1, policy, frozenset({"canary"}))
    # No approvals required: routing guards nothing either.
    target("m", "canary", 2, VersionStatus.REGISTERED, 0, ApprovalPolicy(), frozenset({"canary"}))


def test_aliases_the_policy_uses_cannot_be_removed() -> None:
    policy = domain.RolloutPolicy("m", (R("production", 90), R("canary", 10)), S("shadow", 5), 4)
    for alias, fragment in (("canary", "receives traffic"), ("shadow", "is the shadow")):
        with pytest.raises(FailedPrecondition, match=fragment):
            domain.check_alias_removable("m", alias, policy)
    domain.check_alias_removable("m", "other", policy)
    domain.check_alias_removable("m", "shadow", domain.RolloutPolicy("m", shadow=S("shadow", 0)))


def test_rollout_revision_compare_and_set() -> None:
    domain.check_rollout_revision("m", 0, 0)
    domain.check_rollout_revision("m", 3, 3)
    with pytest.raises(Conflict, match="at revision 3 \\(expected 2\\)"):
        domain.check_rollout_revision("m", 3, 2)


# --- feature input --------------------------------------------------------------------


def _signature(*inputs: tuple[str, str, tuple[int, ...]]) -> domain.Signature:
    return domain.Signature(
        inputs=tuple(domain.TensorSpec(name, dtype, shape) for name, dtype, shape in inputs),
        outputs=(domain.TensorSpec("out", "FP32", (-1, 1)),),
        ir_version=10,
        opset_version=17,
    )


ONE_INPUT = _signature(("x", "FP32", (-1, 4)))


@pytest.mark.parametrize(
    "bundle",
    ["customer_scorer", "_private", "b", "a" * 63, "scorer_v2"],
)
def test_bundle_names_the_feature_service_accepts_are_accepted(bundle: str) -> None:
    domain.validate_feature_input(domain.FeatureInput(bundle))


@pytest.mark.parametrize(
    ("bundle", "fragment"),
    [
        ("", "feature_input.bundle is required"),
        ("Customer", "feature_input.bundle 'Customer'"),
        ("2fast", "lowercase"),
        ("customer-scorer", "lowercase"),
        ("customer.scorer", "lowercase"),
        ("a" * 64, "1-63"),
        ("entity_key", "not one of"),
        ("_ts", "not one of"),
    ],
)
def test_bad_bundle_names_are_refused_naming_the_field(bundle: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=r"feature_input\.bundle") as info:
        domain.validate_feature_input(domain.FeatureInput(bundle))
    assert fragment in info.value.message


def test_an_empty_input_resolves_to_the_only_one_with_reject_kept() -> None:
    resolved = domain.resolve_feature_input(domain.FeatureInput("scorer"), ONE_INPUT)
    assert resolved == domain.FeatureInput("scorer", "x", domain.MissingFeaturePolicy.REJECT)
    assert domain.resolve_feature_input(None, ONE_INPUT) is None


def test_a_named_input_of_a_two_input_model_is_kept_with_its_policy() -> None:
    signature = _signature(("ids", "INT64", (-1, 1)), ("dense", "FP32", (-1, 7)))
    wanted = domain.FeatureInput("scorer", "dense", domain.MissingFeaturePolicy.FILL)
    assert domain.resolve_feature_input(wanted, signature) == wanted


@pytest.mark.parametrize(
    ("signature", "input_name", "fragment"),
    [
        (ONE_INPUT, "y", "feature_input.input 'y' is not an input of the model; its inputs: 'x'"),
        (
            _signature(("a", "FP32", (-1, 3)), ("b", "FP32", (-1, 3))),
            "",
            "feature_input.input is required: the model has 2 inputs ('a', 'b')",
        ),
        (_signature(), "", "the model has 0 inputs"),
        (_signature(("x", "INT64", (-1, 4))), "x", "is INT64[-1, 4]"),
        (_signature(("x", "FP64", (-1, 4))), "", "is FP64[-1, 4]"),
        (_signature(("x", "FP32", (-1, 4, 2))), "", "is FP32[-1, 4, 2]"),
        (_signature(("x", "FP32", (-1,))), "", "is FP32[-1]"),
        (_signature(("x", "FP32", (-1, -1))), "", "fixed width"),
    ],
)
def test_an_input_that_cannot_take_a_bundle_is_refused(
    signature: domain.Signature, input_name: str, fragment: str
) -> None:
    with pytest.raises(InvalidArgument, match=r"feature_input\.input") as info:
        domain.resolve_feature_input(domain.FeatureInput("scorer", input_name), signature)
    assert fragment in info.value.message


def test_a_long_unknown_input_name_is_quoted_short() -> None:
    with pytest.raises(InvalidArgument) as info:
        domain.resolve_feature_input(domain.FeatureInput("scorer", "z" * 5000), ONE_INPUT)
    assert len(info.value.message) < 300


def test_checked_version_resolves_the_input_and_validates_the_rest() -> None:
    new = domain.NewVersion(
        artifact=domain.Artifact("ab" * 32, 1),
        signature=ONE_INPUT,
        metadata=domain.VersionMetadata(feature_input=domain.FeatureInput("scorer")),
    )
    checked = domain.checked_version(new)
    assert checked.metadata.feature_input == domain.FeatureInput("scorer", "x")
    assert domain.checked_version(checked) == checked
    plain = domain.NewVersion(new.artifact, ONE_INPUT, domain.VersionMetadata())
    assert domain.checked_version(plain) is plain


def test_feature_statistics_are_bins_or_categories():
    stats = domain.FeatureStatistics
    domain.validate_feature_statistics(
        (stats("amount", (0.0, 1.0, 2.0), (3, 4)), stats("merchant", (), (5, 1), ("a", "b")))
    )
    for bad, message in (
        (stats("m", (), (5,), ("a", "b")), "2 categories need as many counts"),
        (stats("m", (), (1, 1), ("a", "a")), "distinct and non-empty"),
        (stats("m", (), (1, 1), ("a", "")), "distinct and non-empty"),
        (stats("m", (0.0, 1.0), (1, 1), ("a", "b")), "bin edges or categories, not both"),
        (stats("m", (), (1, -1), ("a", "b")), "must not be negative"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            domain.validate_feature_statistics((bad,))
