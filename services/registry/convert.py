"""Protobuf messages ⇄ domain objects for the registry servicer."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.kernel.errors import InvalidArgument
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.services.registry import domain

STATUS_TO_PB = {
    domain.VersionStatus.REGISTERED: pb.VERSION_STATUS_REGISTERED,
    domain.VersionStatus.APPROVED: pb.VERSION_STATUS_APPROVED,
    domain.VersionStatus.DEPRECATED: pb.VERSION_STATUS_DEPRECATED,
    domain.VersionStatus.ARCHIVED: pb.VERSION_STATUS_ARCHIVED,
}
STATUS_FROM_PB = {value: key for key, value in STATUS_TO_PB.items()}
DECISION_TO_PB = {
    domain.ReviewDecision.APPROVE: pb.REVIEW_DECISION_APPROVE,
    domain.ReviewDecision.REJECT: pb.REVIEW_DECISION_REJECT,
}
DECISION_FROM_PB = {value: key for key, value in DECISION_TO_PB.items()}
MISSING_POLICY_TO_PB = {
    domain.MissingFeaturePolicy.REJECT: pb.MISSING_FEATURE_POLICY_REJECT,
    domain.MissingFeaturePolicy.FILL: pb.MISSING_FEATURE_POLICY_FILL,
}
MISSING_POLICY_FROM_PB = {
    pb.MISSING_FEATURE_POLICY_UNSPECIFIED: domain.MissingFeaturePolicy.REJECT,
    **{value: key for key, value in MISSING_POLICY_TO_PB.items()},
}


def timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def time_or(ts: Timestamp, default: datetime | None) -> datetime | None:
    """The moment `ts` names (`default` when unset); INVALID_ARGUMENT when it is not a
    valid timestamp (nanos outside 0..999,999,999, seconds outside years 1..9999)."""
    if not (ts.seconds or ts.nanos):
        return default
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(
            f"invalid timestamp (seconds={ts.seconds}, nanos={ts.nanos})"
        ) from exc


def encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode() if key else ""


def decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument("page_token is not one this server issued") from exc


def decode_int_token(token: str) -> int:
    key = decode_token(token)
    if not key:
        return 0
    if not key.isdigit():
        raise InvalidArgument("page_token is not one this server issued")
    return int(key)


def policy_from_pb(policy: pb.ApprovalPolicy) -> domain.ApprovalPolicy:
    return domain.ApprovalPolicy(
        policy.required_approvals, tuple(policy.protected_aliases), policy.allow_self_approval
    )


def model_to_pb(model: domain.Model) -> pb.Model:
    return pb.Model(
        name=model.name,
        description=model.description,
        owner=model.owner,
        tags=dict(model.tags),
        create_time=timestamp(model.created_at),
        latest_version=model.latest_version,
        approval_policy=pb.ApprovalPolicy(
            required_approvals=model.approval_policy.required_approvals,
            protected_aliases=list(model.approval_policy.protected_aliases),
            allow_self_approval=model.approval_policy.allow_self_approval,
        ),
        created_by=model.created_by,
    )


def new_model_from_pb(request: pb.CreateModelRequest) -> domain.NewModel:
    return domain.NewModel(
        name=request.name,
        description=request.description,
        owner=request.owner,
        tags=dict(request.tags),
        approval_policy=policy_from_pb(request.approval_policy),
    )


def feature_input_from_pb(message: pb.FeatureInput) -> domain.FeatureInput | None:
    """None for an unset (or all-default) message; UNSPECIFIED policy means REJECT."""
    if message == pb.FeatureInput():
        return None
    policy = MISSING_POLICY_FROM_PB.get(message.missing_policy)
    if policy is None:
        raise InvalidArgument(
            f"feature_input.missing_policy {message.missing_policy} is not one of"
            " MISSING_FEATURE_POLICY_REJECT, MISSING_FEATURE_POLICY_FILL"
        )
    return domain.FeatureInput(message.bundle, message.input, policy)


def feature_input_to_pb(feature_input: domain.FeatureInput) -> pb.FeatureInput:
    return pb.FeatureInput(
        bundle=feature_input.bundle,
        input=feature_input.input,
        missing_policy=MISSING_POLICY_TO_PB[feature_input.missing_policy],
    )


def metadata_from_pb(upload: pb.UploadMetadata) -> domain.VersionMetadata:
    lineage = upload.lineage
    card = upload.card
    return domain.VersionMetadata(
        description=upload.description,
        lineage=domain.Lineage(
            training_data_ref=lineage.training_data_ref,
            training_data_version=lineage.training_data_version,
            code_revision=lineage.code_revision,
            params=dict(lineage.params),
            metrics=tuple(domain.Metric(m.name, m.value, dict(m.slice)) for m in lineage.metrics),
        ),
        card=domain.ModelCard(
            intended_use=card.intended_use,
            out_of_scope_uses=card.out_of_scope_uses,
            limitations=card.limitations,
            ethical_considerations=card.ethical_considerations,
            evaluation_data=card.evaluation_data,
        ),
        feature_statistics=tuple(
            domain.FeatureStatistics(
                s.name, tuple(s.bin_edges), tuple(s.counts), tuple(s.categories)
            )
            for s in upload.feature_statistics
        ),
        serving_config=upload.serving_config,
        feature_input=feature_input_from_pb(upload.feature_input),
    )


def _spec_to_pb(spec: domain.TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def artifact_to_pb(artifact: domain.Artifact) -> pb.Artifact:
    return pb.Artifact(
        sha256=artifact.sha256, size_bytes=artifact.size_bytes, format=artifact.format
    )


def version_to_pb(version: domain.ModelVersion) -> pb.ModelVersion:
    meta = version.metadata
    lineage = meta.lineage
    card = meta.card
    message = pb.ModelVersion(
        model=version.model,
        version=version.version,
        description=meta.description,
        artifact=artifact_to_pb(version.artifact),
        signature=pb.Signature(
            inputs=[_spec_to_pb(s) for s in version.signature.inputs],
            outputs=[_spec_to_pb(s) for s in version.signature.outputs],
            ir_version=version.signature.ir_version,
            opset_version=version.signature.opset_version,
        ),
        lineage=pb.Lineage(
            training_data_ref=lineage.training_data_ref,
            training_data_version=lineage.training_data_version,
            code_revision=lineage.code_revision,
            params=dict(lineage.params),
            metrics=[
                pb.Metric(name=m.name, value=m.value, slice=dict(m.slice)) for m in lineage.metrics
            ],
        ),
        card=pb.ModelCard(
            intended_use=card.intended_use,
            out_of_scope_uses=card.out_of_scope_uses,
            limitations=card.limitations,
            ethical_considerations=card.ethical_considerations,
            evaluation_data=card.evaluation_data,
        ),
        feature_statistics=[
            pb.FeatureStatistics(
                name=s.name,
                bin_edges=list(s.bin_edges),
                counts=list(s.counts),
                categories=list(s.categories),
            )
            for s in meta.feature_statistics
        ],
        status=STATUS_TO_PB[version.status],
        create_time=timestamp(version.created_at),
        created_by=version.created_by,
        aliases=list(version.aliases),
        approvals=version.approvals,
        serving_config=meta.serving_config,
    )
    if meta.feature_input is not None:
        message.feature_input.CopyFrom(feature_input_to_pb(meta.feature_input))
    return message


def alias_to_pb(alias: domain.Alias) -> pb.Alias:
    return pb.Alias(
        model=alias.model,
        alias=alias.alias,
        version=alias.version,
        update_time=timestamp(alias.updated_at),
        updated_by=alias.updated_by,
        event_id=alias.event_id,
    )


def event_to_pb(event: domain.AliasEvent) -> pb.AliasEvent:
    return pb.AliasEvent(
        model=event.model,
        alias=event.alias,
        from_version=event.from_version,
        to_version=event.to_version,
        actor=event.actor,
        time=timestamp(event.time),
        reason=event.reason,
        id=event.id,
    )


def rollout_request_from_pb(
    request: pb.SetRolloutPolicyRequest,
) -> tuple[tuple[domain.RouteWeight, ...], domain.ShadowRoute]:
    routes = tuple(domain.RouteWeight(r.alias, r.weight) for r in request.routes)
    return routes, domain.ShadowRoute(request.shadow.alias, request.shadow.percent)


def rollout_to_pb(policy: domain.RolloutPolicy) -> pb.RolloutPolicy:
    message = pb.RolloutPolicy(
        model=policy.model,
        routes=[pb.RouteWeight(alias=r.alias, weight=r.weight) for r in policy.routes],
        revision=policy.revision,
        updated_by=policy.updated_by,
        reason=policy.reason,
    )
    if policy.shadow.active:
        message.shadow.CopyFrom(
            pb.ShadowRoute(alias=policy.shadow.alias, percent=policy.shadow.percent)
        )
    if policy.updated_at is not None:
        message.update_time.CopyFrom(timestamp(policy.updated_at))
    return message


def review_to_pb(review: domain.Review) -> pb.Review:
    return pb.Review(
        model=review.model,
        version=review.version,
        actor=review.actor,
        decision=DECISION_TO_PB[review.decision],
        comment=review.comment,
        time=timestamp(review.time),
    )


def audit_to_pb(event: domain.AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=event.id,
        time=timestamp(event.time),
        actor=event.actor,
        action=event.action,
        target=event.target,
        details_json=domain.details_json(event.details),
    )
