"""Models, versions, aliases, reviews and their rules, free of gRPC and SQL.

Stores call the rule functions inside their transactions, so a rule is checked
against the same state the write then changes.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from google.protobuf import text_format

from inference import model_config_pb2
from modelplane.kernel.errors import (
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)

ANONYMOUS = "anonymous"
MAX_NAME_LENGTH = 128
MAX_TEXT_LENGTH = 64 * 1024
MAX_SERVING_CONFIG_BYTES = 64 * 1024
# Error messages quote at most this much of a bad value: a whole 10,000-character name
# would overflow gRPC's status metadata and reach the caller as another error.
MAX_QUOTED_CHARS = 64
MAX_PERCENT = 100
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
ARTIFACT_FORMAT = "onnx"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# `v3` reads like a version number: an alias of that name would make `model@v3`
# ambiguous, so such names are reserved.
_VERSION_LIKE = re.compile(r"^[vV][0-9]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bundle names follow the feature service's rule for definition names (its
# NAME_PATTERN and reserved names), restated here: services never import each other.
MAX_BUNDLE_NAME_LENGTH = 63
_BUNDLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_RESERVED_BUNDLE_NAMES = frozenset({"_ts", "entity_key", "event_us"})
FEATURE_INPUT_DATATYPE = "FP32"


class VersionStatus(enum.StrEnum):
    REGISTERED = "registered"
    APPROVED = "approved"
    DEPRECATED = "deprecated"
    ARCHIVED = "archived"


class ReviewDecision(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"


class MissingFeaturePolicy(enum.StrEnum):
    """What inference does with bundle values that are not PRESENT."""

    REJECT = "reject"  # fail the row's request, naming the entity and feature
    FILL = "fill"  # use the bundle's fill values


@dataclass(frozen=True)
class ApprovalPolicy:
    required_approvals: int = 0
    protected_aliases: tuple[str, ...] = ()
    # Off by default: an approval is a second pair of eyes. Small teams may turn it on.
    allow_self_approval: bool = False

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
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureInput:
    """A model input filled from a feature-service bundle, so callers may send entity
    ids instead of the tensor. `input` empty: the model's only input (resolved to its
    name when the version is created)."""

    bundle: str
    input: str = ""
    missing_policy: MissingFeaturePolicy = MissingFeaturePolicy.REJECT

    def details(self) -> dict[str, object]:
        """What the audit log (and the store's JSON column) keeps of it."""
        return {
            "bundle": self.bundle,
            "input": self.input,
            "missing_policy": self.missing_policy.value,
        }


@dataclass(frozen=True)
class VersionMetadata:
    """What the uploader says about a version, besides its bytes."""

    description: str = ""
    lineage: Lineage = Lineage()
    card: ModelCard = ModelCard()
    feature_statistics: tuple[FeatureStatistics, ...] = ()
    # A Triton config.pbtxt (inference.ModelConfig as protobuf text); empty: defaults.
    serving_config: str = ""
    # Where callers' entity ids get their tensor from; None: callers send tensors.
    feature_input: FeatureInput | None = None


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
    event_id: int = 0  # the AliasEvent.id of the move that put it there


@dataclass(frozen=True)
class AliasEvent:
    model: str
    alias: str
    from_version: int  # 0: the alias was unset
    to_version: int  # 0: the alias was deleted
    actor: str
    time: datetime
    reason: str
    id: int = 0  # increasing in commit order (per model, whatever the database)


@dataclass(frozen=True)
class RouteWeight:
    alias: str
    weight: int  # percent of the model's requests, 1..100


@dataclass(frozen=True)
class ShadowRoute:
    alias: str = ""
    percent: int = 0  # 0: no shadow traffic

    @property
    def active(self) -> bool:
        return self.percent > 0


@dataclass(frozen=True)
class RolloutPolicy:
    """How a model's requests split between aliases, and what share is mirrored to a
    shadow alias. Revision 0 is the policy of a model that never had one: no routes."""

    model: str
    routes: tuple[RouteWeight, ...] = ()
    shadow: ShadowRoute = ShadowRoute()
    revision: int = 0
    updated_at: datetime | None = None
    updated_by: str = ""
    reason: str = ""

    @property
    def routed_aliases(self) -> frozenset[str]:
        return frozenset(route.alias for route in self.routes)

    @property
    def active(self) -> bool:
        return bool(self.routes) or self.shadow.active

    def details(self) -> dict[str, object]:
        """What the audit log keeps of it."""
        return {
            "routes": [{"alias": r.alias, "weight": r.weight} for r in self.routes],
            "shadow": {"alias": self.shadow.alias, "percent": self.shadow.percent},
            "revision": self.revision,
            "reason": self.reason,
        }


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


def quote(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`value` for an error message: quoted, and cut to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def validate_model_name(name: str) -> None:
    if not name:
        raise InvalidArgument("model name is required")
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        raise InvalidArgument(
            f"model name {quote(name)} must be 1-{MAX_NAME_LENGTH} letters, digits, '.', '_'"
            " or '-', starting with a letter or digit"
        )


def validate_alias_name(alias: str, what: str = "alias") -> None:
    if not alias:
        raise InvalidArgument(f"{what} is required")
    if len(alias) > MAX_NAME_LENGTH or not _NAME.match(alias):
        raise InvalidArgument(
            f"{what} {quote(alias)} must be 1-{MAX_NAME_LENGTH} letters, digits, '.', '_' or '-'"
        )
    if _VERSION_LIKE.match(alias):
        raise InvalidArgument(
            f"{what} {quote(alias)} is reserved: names like v<number> mean versions"
        )


def validate_version_number(version: int) -> None:
    if version <= 0:
        raise InvalidArgument(f"version must be a positive number, got {version}")


def validate_sha256(digest: str) -> None:
    if not _SHA256.match(digest):
        raise InvalidArgument("sha256 must be 64 lowercase hex characters")


def validate_text(what: str, text: str) -> None:
    if len(text) > MAX_TEXT_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_TEXT_LENGTH} characters")


def validate_labels(what: str, labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        if not key:
            raise InvalidArgument(f"{what} keys must not be empty")
        if len(key) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"{what} key {quote(key, 32)} is too long")
        validate_text(f"{what} {quote(key)}", value)


def validate_serving_config(text: str) -> None:
    """A version's serving config must parse as Triton's `config.pbtxt` (protobuf text of
    inference.ModelConfig), so no inference server meets a broken one at load."""
    size = len(text.encode())
    if size > MAX_SERVING_CONFIG_BYTES:
        raise InvalidArgument(
            f"serving_config is {size} bytes; at most {MAX_SERVING_CONFIG_BYTES} are accepted"
        )
    if not text.strip():
        return
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        # The parser's message quotes the offending line, which may be long.
        raise InvalidArgument(
            f"serving_config is not a valid config.pbtxt (inference.ModelConfig): "
            f"{quote(str(exc), 200)}"
        ) from exc


def validate_feature_input(feature_input: FeatureInput | None) -> None:
    """What can be checked without the model: the bundle's name. The input is checked
    against the signature (`resolve_feature_input`), the bundle's width by the inference
    service against the feature service when it loads the version."""
    if feature_input is None:
        return
    bundle = feature_input.bundle
    if not bundle:
        raise InvalidArgument("feature_input.bundle is required")
    if (
        len(bundle) > MAX_BUNDLE_NAME_LENGTH
        or not _BUNDLE_NAME.match(bundle)
        or bundle in _RESERVED_BUNDLE_NAMES
    ):
        raise InvalidArgument(
            f"feature_input.bundle {quote(bundle)} must be 1-{MAX_BUNDLE_NAME_LENGTH}"
            " lowercase letters, digits or '_', not starting with a digit, and not one of "
            + ", ".join(sorted(_RESERVED_BUNDLE_NAMES))
        )


def _spec_text(spec: TensorSpec) -> str:
    return f"{spec.datatype}[{', '.join(str(d) for d in spec.shape)}]"


def resolve_feature_input(
    feature_input: FeatureInput | None, signature: Signature
) -> FeatureInput | None:
    """The feature input as stored: its input named (the model's only one when the
    uploader named none), after checking that input can take a bundle's tensor, FP32
    [batch, width] with a fixed width."""
    if feature_input is None:
        return None
    validate_feature_input(feature_input)
    inputs = signature.inputs
    names = ", ".join(quote(s.name) for s in inputs[:16]) or "none"
    if len(inputs) > 16:
        names += f", ... ({len(inputs)} inputs)"
    if not feature_input.input:
        if len(inputs) != 1:
            raise InvalidArgument(
                f"feature_input.input is required: the model has {len(inputs)} inputs"
                f" ({names}); name the one bundle {quote(feature_input.bundle)} feeds"
            )
        spec = inputs[0]
    else:
        found = next((s for s in inputs if s.name == feature_input.input), None)
        if found is None:
            raise InvalidArgument(
                f"feature_input.input {quote(feature_input.input)} is not an input of the"
                f" model; its inputs: {names}"
            )
        spec = found
    shape = spec.shape
    if spec.datatype != FEATURE_INPUT_DATATYPE or len(shape) != 2 or shape[1] < 1:
        raise InvalidArgument(
            f"feature_input.input {quote(spec.name)} is {_spec_text(spec)}; a bundle feeds"
            f" {FEATURE_INPUT_DATATYPE} [batch, width] with a fixed width"
        )
    return FeatureInput(feature_input.bundle, spec.name, feature_input.missing_policy)


def validate_policy(policy: ApprovalPolicy) -> None:
    if policy.required_approvals < 0:
        raise InvalidArgument("required_approvals must not be negative")
    for alias in policy.protected_aliases:
        validate_alias_name(alias)
    if policy.required_approvals > 0 and not policy.protected_aliases:
        raise InvalidArgument("a policy requiring approvals must name the aliases it protects")


def validate_new_model(model: NewModel) -> None:
    validate_model_name(model.name)
    validate_text("description", model.description)
    validate_text("owner", model.owner)
    validate_labels("tag", model.tags)
    validate_policy(model.approval_policy)


def validate_feature_statistics(stats: Sequence[FeatureStatistics]) -> None:
    seen: set[str] = set()
    for stat in stats:
        if not stat.name:
            raise InvalidArgument("feature statistics need a feature name")
        name = quote(stat.name)
        if stat.name in seen:
            raise InvalidArgument(f"feature statistics for {name} given twice")
        seen.add(stat.name)
        if any(count < 0 for count in stat.counts):
            raise InvalidArgument(f"feature {name}: counts must not be negative")
        if stat.categories:
            _validate_categories(name, stat)
            continue
        edges = stat.bin_edges
        if len(edges) < 2:
            raise InvalidArgument(f"feature {name}: at least two bin edges are needed")
        if not all(math.isfinite(edge) for edge in edges):
            raise InvalidArgument(f"feature {name}: bin edges must be finite")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise InvalidArgument(f"feature {name}: bin edges must strictly increase")
        if len(stat.counts) != len(edges) - 1:
            raise InvalidArgument(
                f"feature {name}: {len(edges)} bin edges need {len(edges) - 1} counts,"
                f" got {len(stat.counts)}"
            )


def _validate_categories(name: str, stat: FeatureStatistics) -> None:
    if stat.bin_edges:
        raise InvalidArgument(f"feature {name}: bin edges or categories, not both")
    if len(stat.counts) != len(stat.categories):
        raise InvalidArgument(
            f"feature {name}: {len(stat.categories)} categories need as many counts,"
            f" got {len(stat.counts)}"
        )
    if len(set(stat.categories)) != len(stat.categories) or not all(stat.categories):
        raise InvalidArgument(f"feature {name}: categories must be distinct and non-empty")


def validate_metadata(metadata: VersionMetadata) -> None:
    validate_text("description", metadata.description)
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
        validate_text(what, text)
    validate_labels("param", lineage.params)
    for metric in lineage.metrics:
        if not metric.name:
            raise InvalidArgument("metrics need a name")
        if not math.isfinite(metric.value):
            raise InvalidArgument(f"metric {quote(metric.name)} must be a finite number")
        validate_labels(f"metric {quote(metric.name)} slice", metric.slice)
    validate_feature_statistics(metadata.feature_statistics)
    validate_serving_config(metadata.serving_config)
    validate_feature_input(metadata.feature_input)


def checked_version(new: NewVersion) -> NewVersion:
    """`new` as it may be stored: its metadata valid, its feature input resolved against
    its signature."""
    validate_metadata(new.metadata)
    metadata = new.metadata
    resolved = resolve_feature_input(metadata.feature_input, new.signature)
    if resolved == metadata.feature_input:
        return new
    return dataclasses.replace(new, metadata=dataclasses.replace(metadata, feature_input=resolved))


# ListModels' query is a substring of a name or a description: longer than any name and
# than a search anyone types, it is refused (SQLite also refuses LIKE patterns over 50 KB).
MAX_QUERY_LENGTH = 256


def validate_query(query: str) -> None:
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidArgument(
            f"query of {len(query)} characters: at most {MAX_QUERY_LENGTH} are allowed"
        )


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


def check_not_own_upload(
    model: str,
    version: int,
    created_by: str,
    reviewer: str,
    decision: ReviewDecision,
    policy: ApprovalPolicy,
) -> None:
    """An approval is a second pair of eyes: the uploader's own does not count unless the
    model's policy allows it. Applied only to authenticated actors (a self-declared name
    proves nothing either way)."""
    if policy.allow_self_approval:
        return
    if decision is ReviewDecision.APPROVE and reviewer == created_by:
        raise PermissionDenied(
            f"{model} v{version} was uploaded by {quote(reviewer)}, who cannot approve it"
        )


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
    routed: frozenset[str] = frozenset(),
) -> None:
    """`routed`: aliases the model's rollout policy sends requests to. While it does, such
    an alias is guarded like a protected one: otherwise moving a canary would put an
    unapproved version in front of users."""
    if status in (VersionStatus.ARCHIVED, VersionStatus.DEPRECATED):
        raise FailedPrecondition(f"{model} v{version} is {status.value}; aliases cannot move to it")
    needed = policy.required_approvals
    if needed <= 0 or approvals >= needed:
        return
    if policy.guards(alias):
        raise FailedPrecondition(
            f"alias {alias!r} of {model} requires {needed} approval(s); v{version} has {approvals}"
        )
    if alias in routed:
        raise FailedPrecondition(
            f"alias {alias!r} of {model} receives traffic under its rollout policy, so it"
            f" requires {needed} approval(s); v{version} has {approvals}"
        )


def check_alias_removable(model: str, alias: str, rollout: RolloutPolicy) -> None:
    if alias in rollout.routed_aliases:
        raise FailedPrecondition(
            f"alias {alias!r} of {model} receives traffic under its rollout policy"
            f" (revision {rollout.revision}); turn the policy off or route elsewhere first"
        )
    if rollout.shadow.active and rollout.shadow.alias == alias:
        raise FailedPrecondition(
            f"alias {alias!r} of {model} is the shadow of its rollout policy"
            f" (revision {rollout.revision}); turn the shadow off first"
        )


def validate_rollout(routes: Sequence[RouteWeight], shadow: ShadowRoute) -> ShadowRoute:
    """Checks what a rollout request says on its own; returns the shadow as stored (a
    percent of 0 means none, whatever alias came with it)."""
    seen: set[str] = set()
    for index, route in enumerate(routes):
        validate_alias_name(route.alias, f"routes[{index}].alias")
        if route.alias in seen:
            raise InvalidArgument(f"routes[{index}].alias {quote(route.alias)} is routed twice")
        seen.add(route.alias)
        if not 1 <= route.weight <= MAX_PERCENT:
            raise InvalidArgument(
                f"routes[{index}].weight of {quote(route.alias)} must be 1..{MAX_PERCENT},"
                f" got {route.weight}"
            )
    total = sum(route.weight for route in routes)
    if routes and total != MAX_PERCENT:
        raise InvalidArgument(f"routes weights must sum to {MAX_PERCENT}, got {total}")
    if not 0 <= shadow.percent <= MAX_PERCENT:
        raise InvalidArgument(f"shadow.percent must be 0..{MAX_PERCENT}, got {shadow.percent}")
    if not shadow.active:
        return ShadowRoute()
    validate_alias_name(shadow.alias, "shadow.alias")
    if shadow.alias in seen:
        raise InvalidArgument(
            f"shadow.alias {quote(shadow.alias)} already answers requests in routes;"
            " a shadow receives copies of requests another alias answers"
        )
    return shadow


def check_rollout(
    model: str,
    routes: Sequence[RouteWeight],
    shadow: ShadowRoute,
    holders: Mapping[str, int],
    approvals: Mapping[int, int],
    policy: ApprovalPolicy,
) -> None:
    """Checks a rollout against the model's state: `holders` maps each alias to the version
    holding it, `approvals` each of those versions to its approvals. An alias given weight
    needs the approvals a protected alias needs; a shadow's answers are discarded, so it
    needs none."""
    for index, route in enumerate(routes):
        if route.alias not in holders:
            raise InvalidArgument(
                f"routes[{index}].alias: {model} has no alias {quote(route.alias)}"
            )
    if shadow.active and shadow.alias not in holders:
        raise InvalidArgument(f"shadow.alias: {model} has no alias {quote(shadow.alias)}")
    needed = policy.required_approvals
    if needed <= 0:
        return
    for route in routes:
        version = holders[route.alias]
        have = approvals.get(version, 0)
        if have < needed:
            raise FailedPrecondition(
                f"routing to alias {route.alias!r} of {model} requires {needed} approval(s);"
                f" v{version}, which it holds, has {have}"
            )


def check_rollout_revision(model: str, current: int, expected: int) -> None:
    """Compare-and-set on the policy's revision (0: never set)."""
    if current != expected:
        raise Conflict(
            f"the rollout policy of {model} is at revision {current} (expected {expected})"
        )


def details_json(details: Mapping[str, object]) -> str:
    return json.dumps(details, sort_keys=True, default=str)
