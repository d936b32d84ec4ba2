"""Models, versions, aliases, reviews and their rules, free of gRPC and SQL.

Stores call the rule functions inside their transactions, so a rule is checked
against the same state the write then changes.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from modelplane.kernel.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
)

ANONYMOUS = "anonymous"
MAX_NAME_LENGTH = 128
MAX_TEXT_LENGTH = 64 * 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
ARTIFACT_FORMAT = "onnx"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# `v3` reads like a version number: an alias of that name would make `model@v3`
# ambiguous, so such names are reserved.
_VERSION_LIKE = re.compile(r"^[vV][0-9]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class VersionStatus(enum.StrEnum):
    REGISTERED = "registered"
    APPROVED = "approved"
    DEPRECATED = "deprecated"
    ARCHIVED = "archived"


class ReviewDecision(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


@dataclass(frozen=True)
class ApprovalPolicy:
    required_approvals: int = 0
    protected_aliases: tuple[str, ...] = ()

    def guards(self, alias: str) -> bool:
        return self.required_approvals > 0 and alias in self.protected_aliases


@dataclass(frozen=True)
class NewModel:
    name: str
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    approval_policy: ApprovalPolicy = ApprovalPolicy()


@dataclass(frozen=True)
class Model:
    name: str
    description: str
    owner: str
    tags: Mapping[str, str]
    approval_policy: ApprovalPolicy
    latest_version: int
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ir_version: int
    opset_version: int


@dataclass(frozen=True)
class Artifact:
    sha256: str
    size_bytes: int
    format: str = ARTIFACT_FORMAT


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    slice: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    training_data_ref: str = ""
    training_data_version: str = ""
    code_revision: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: tuple[Metric, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    intended_use: str = ""
    out_of_scope_uses: str = ""
    limitations: str = ""
    ethical_considerations: str = ""
    evaluation_data: str = ""


@dataclass(frozen=True)
class FeatureStatistics:
    name: str
    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class VersionMetadata:
    """What the uploader says about a version, besides its bytes."""

    description: str = ""
    lineage: Lineage = Lineage()
    card: ModelCard = ModelCard()
    feature_statistics: tuple[FeatureStatistics, ...] = ()


@dataclass(frozen=True)
class NewVersion:
    artifact: Artifact
    signature: Signature
    metadata: VersionMetadata


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: int
    artifact: Artifact
    signature: Signature
    metadata: VersionMetadata
    status: VersionStatus
    created_at: datetime
    created_by: str
    aliases: tuple[str, ...] = ()
    approvals: int = 0


@dataclass(frozen=True)
class Alias:
    model: str
    alias: str
    version: int
    updated_at: datetime
    updated_by: str


@dataclass(frozen=True)
class AliasEvent:
    model: str
    alias: str
    from_version: int  # 0: the alias was unset
    to_version: int  # 0: the alias was deleted
    actor: str
    time: datetime
    reason: str


@dataclass(frozen=True)
class Review:
    model: str
    version: int
    actor: str
    decision: ReviewDecision
    comment: str
    time: datetime


@dataclass(frozen=True)
class AuditEvent:
    id: int
    time: datetime
    actor: str
    action: str
    target: str
    details: Mapping[str, object]


@dataclass(frozen=True)
class AuditFilter:
    actor: str = ""
    target_prefix: str = ""
    action: str = ""
    since: datetime | None = None


# --- validation -------------------------------------------------------------------------


def validate_model_name(name: str) -> None:
    if not name:
        raise InvalidArgument("model name is required")
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        raise InvalidArgument(
            f"model name {name!r} must be 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )


def validate_alias_name(alias: str) -> None:
    if not alias:
        raise InvalidArgument("alias is required")
    if len(alias) > MAX_NAME_LENGTH or not _NAME.match(alias):
        raise InvalidArgument(
            f"alias {alias!r} must be 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-'"
        )
    if _VERSION_LIKE.match(alias):
        raise InvalidArgument(f"alias {alias!r} is reserved: names like v<number> mean versions")


def validate_version_number(version: int) -> None:
    if version <= 0:
        raise InvalidArgument(f"version must be a positive number, got {version}")


def validate_sha256(digest: str) -> None:
    if not _SHA256.match(digest):
        raise InvalidArgument("sha256 must be 64 lowercase hex characters")


def _validate_text(what: str, text: str) -> None:
    if len(text) > MAX_TEXT_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_TEXT_LENGTH} characters")


def validate_labels(what: str, labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if not key:
            raise InvalidArgument(f"{what} keys must not be empty")
        if len(key) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"{what} key {key[:32]!r}... is too long")
        _validate_text(f"{what} {key!r}", value)


def validate_policy(policy: ApprovalPolicy) -> None:
    if policy.required_approvals < 0:
        raise InvalidArgument("required_approvals must not be negative")
    for alias in policy.protected_aliases:
        validate_alias_name(alias)
    if policy.required_approvals > 0 and not policy.protected_aliases:
        raise InvalidArgument("a policy requiring approvals must name the aliases it protects")


def validate_new_model(model: NewModel) -> None:
    validate_model_name(model.name)
    _validate_text("description", model.description)
    _validate_text("owner", model.owner)
    validate_labels("tag", model.tags)
    validate_policy(model.approval_policy)


def validate_feature_statistics(stats: Sequence[FeatureStatistics]) -> None:
    seen: set[str] = set()
    for stat in stats:
        if not stat.name:
            raise InvalidArgument("feature statistics need a feature name")
        if stat.name in seen:
            raise InvalidArgument(f"feature statistics for {stat.name!r} given twice")
        seen.add(stat.name)
        edges = stat.bin_edges
        if len(edges) < 2:
            raise InvalidArgument(f"feature {stat.name!r}: at least two bin edges are needed")
        if not all(math.isfinite(edge) for edge in edges):
            raise InvalidArgument(f"feature {stat.name!r}: bin edges must be finite")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise InvalidArgument(f"feature {stat.name!r}: bin edges must strictly increase")
        if len(stat.counts) != len(edges) - 1:
            raise InvalidArgument(
                f"feature {stat.name!r}: {len(edges)} bin edges need {len(edges) - 1} counts,"
                f" got {len(stat.counts)}"
            )
        if any(count < 0 for count in stat.counts):
            raise InvalidArgument(f"feature {stat.name!r}: counts must not be negative")


def validate_metadata(metadata: VersionMetadata) -> None:
    _validate_text("description", metadata.description)
    lineage = metadata.lineage
    for what, text in (
        ("training_data_ref", lineage.training_data_ref),
        ("training_data_version", lineage.training_data_version),
        ("code_revision", lineage.code_revision),
        ("intended_use", metadata.card.intended_use),
        ("out_of_scope_uses", metadata.card.out_of_scope_uses),
        ("limitations", metadata.card.limitations),
        ("ethical_considerations", metadata.card.ethical_considerations),
        ("evaluation_data", metadata.card.evaluation_data),
    ):
        _validate_text(what, text)
    validate_labels("param", lineage.params)
    for metric in lineage.metrics:
        if not metric.name:
            raise InvalidArgument("metrics need a name")
        if not math.isfinite(metric.value):
            raise InvalidArgument(f"metric {metric.name!r} must be a finite number")
        validate_labels(f"metric {metric.name!r} slice", metric.slice)
    validate_feature_statistics(metadata.feature_statistics)


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


# --- rules ------------------------------------------------------------------------------


def count_approvals(reviews: Iterable[Review]) -> int:
    """Distinct reviewers whose latest word on the version is an approval: a reviewer who
    approved then rejected no longer counts."""
    latest: dict[str, ReviewDecision] = {}
    for review in sorted(reviews, key=lambda r: r.time):
        latest[review.actor] = review.decision
    return sum(1 for decision in latest.values() if decision is ReviewDecision.APPROVE)


def status_after_review(
    status: VersionStatus, approvals: int, policy: ApprovalPolicy
) -> VersionStatus:
    """A version is approved while it has the approvals its model needs (at least one)."""
    if status in (VersionStatus.DEPRECATED, VersionStatus.ARCHIVED):
        return status
    needed = max(1, policy.required_approvals)
    return VersionStatus.APPROVED if approvals >= needed else VersionStatus.REGISTERED


def check_reviewable(model: str, version: int, status: VersionStatus) -> None:
    if status is VersionStatus.ARCHIVED:
        raise FailedPrecondition(f"{model} v{version} is archived and can no longer be reviewed")


def check_status_change(
    model: str,
    version: int,
    current: VersionStatus,
    requested: VersionStatus,
    held_aliases: Sequence[str],
    approvals: int,
    policy: ApprovalPolicy,
) -> VersionStatus:
    """The status the version ends up in, or an error saying why the change is refused."""
    name = f"{model} v{version}"
    if requested is VersionStatus.APPROVED:
        raise InvalidArgument("a version becomes approved through approvals (ReviewVersion)")
    if requested == current:
        return current
    if current is VersionStatus.ARCHIVED:
        raise FailedPrecondition(f"{name} is archived; archived versions stay archived")
    if requested is VersionStatus.ARCHIVED and held_aliases:
        raise FailedPrecondition(
            f"{name} still holds alias(es) {', '.join(sorted(held_aliases))}; move them first"
        )
    if requested is VersionStatus.REGISTERED:
        # Reinstating a deprecated version: its approvals still count.
        return status_after_review(VersionStatus.REGISTERED, approvals, policy)
    return requested


def check_alias_expectation(model: str, alias: str, current: int | None, expected: int) -> None:
    """Compare-and-set: the caller names the version it believes holds the alias (0: none)."""
    held = current or 0
    if held == expected:
        return
    if held == 0:
        raise Conflict(f"alias {alias!r} of {model} is not set (expected v{expected})")
    wanted = f"v{expected}" if expected else "it to be unset"
    raise Conflict(f"alias {alias!r} of {model} is held by v{held} (expected {wanted})")


def check_alias_target(
    model: str,
    alias: str,
    version: int,
    status: VersionStatus,
    approvals: int,
    policy: ApprovalPolicy,
) -> None:
    if status in (VersionStatus.ARCHIVED, VersionStatus.DEPRECATED):
        raise FailedPrecondition(f"{model} v{version} is {status.value}; aliases cannot move to it")
    if policy.guards(alias) and approvals < policy.required_approvals:
        raise FailedPrecondition(
            f"alias {alias!r} of {model} requires {policy.required_approvals} approval(s);"
            f" v{version} has {approvals}"
        )


def details_json(details: Mapping[str, object]) -> str:
    return json.dumps(details, sort_keys=True, default=str)
