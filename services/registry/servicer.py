"""RegistryService over gRPC: proto → domain/store call → proto.

Stores and artifact files block, so every call to them runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.kernel.auth import current_principal
from modelplane.kernel.errors import (
    InvalidArgument,
    ModelplaneError,
    Overloaded,
    Unavailable,
)
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.registry.v1 import registry_pb2_grpc as pb_grpc
from modelplane.services.registry import convert, domain
from modelplane.services.registry.artifacts import ArtifactStore, PendingArtifact, check_expected
from modelplane.services.registry.onnx_inspect import read_signature
from modelplane.services.registry.store import Store
from modelplane.services.registry.store.codec import to_us
from modelplane.services.registry.watch import WatchHub

log = logging.getLogger("modelplane.registry")

ACTOR_METADATA_KEY = "x-modelplane-actor"
MAX_ACTOR_LENGTH = 256
MAX_AUDIT_TARGET_LENGTH = 512
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024

T = TypeVar("T")
WatchEvent = domain.AliasEvent | domain.ModelVersion | domain.RolloutPolicy


def actor_of(context: grpc.aio.ServicerContext) -> str:
    """The authenticated principal when auth is on (a self-declared name is ignored);
    otherwise the name the caller declares in `x-modelplane-actor`."""
    principal = current_principal()
    if principal is not None:
        return principal.name
    for key, value in context.invocation_metadata() or ():
        if key == ACTOR_METADATA_KEY and isinstance(value, str) and value.strip():
            return value.strip()[:MAX_ACTOR_LENGTH]
    return domain.ANONYMOUS


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: Store,
        artifacts: ArtifactStore,
        hub: WatchHub[WatchEvent],
        registry: CollectorRegistry,
        max_concurrent_uploads: int,
        local_fanout: bool = True,
    ) -> None:
        """`local_fanout`: publish changes to watchers directly; off when a change feed
        shared by all replicas (PostgreSQL LISTEN/NOTIFY) delivers them instead."""
        self._store = store
        self._local_fanout = local_fanout
        self._artifacts = artifacts
        self._hub = hub
        self._max_uploads = max_concurrent_uploads
        self._uploads_in_flight = 0
        self._uploads = Counter(
            "modelplane_registry_uploads",
            "Artifact uploads by outcome",
            ["outcome"],
            registry=registry,
        )
        self._uploaded_bytes = Counter(
            "modelplane_registry_uploaded_bytes", "Artifact bytes received", registry=registry
        )
        self._downloaded_bytes = Counter(
            "modelplane_registry_downloaded_bytes", "Artifact bytes sent", registry=registry
        )
        self._uploads_gauge = Gauge(
            "modelplane_registry_uploads_in_flight",
            "Uploads being received (bounded by max_concurrent_uploads)",
            registry=registry,
        )

    # --- helpers --------------------------------------------------------------------------

    def _announce(self, model: str, event: WatchEvent) -> None:
        if self._local_fanout:
            self._hub.publish(model, event)

    async def _mutate(
        self,
        context: grpc.aio.ServicerContext,
        action: str,
        target: str,
        call: Callable[..., T],
        *args: Any,
    ) -> T:
        """Runs a store mutation as the caller; a refused one is audited too."""
        actor = actor_of(context)
        try:
            return await asyncio.to_thread(call, *args, actor)
        except ModelplaneError as exc:
            if not isinstance(exc, Unavailable):
                await self._audit_refusal(actor, action, target, exc)
            raise

    async def _audit_refusal(
        self, actor: str, action: str, target: str, exc: ModelplaneError
    ) -> None:
        details = {"outcome": "refused", "code": exc.code.name, "error": exc.message}
        # The target comes from the request as sent: a refused call must not store
        # whatever size the caller chose.
        target = target[:MAX_AUDIT_TARGET_LENGTH]
        try:
            await asyncio.to_thread(self._store.record_audit, actor, action, target, details)
        except ModelplaneError:
            log.warning("could not audit a refused %s on %s", action, target)

    async def _resolve(
        self, model: str, selector: str | None, version: int, alias: str
    ) -> domain.ModelVersion:
        domain.validate_model_name(model)
        if selector == "alias":
            return await asyncio.to_thread(self._store.get_version_by_alias, model, alias)
        if selector == "version":
            domain.validate_version_number(version)
            return await asyncio.to_thread(self._store.get_version, model, version)
        raise InvalidArgument("name a version or an alias")

    # --- models ---------------------------------------------------------------------------

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateModelResponse:
        new = convert.new_model_from_pb(request)
        model = await self._mutate(
            context, "model.create", request.name, self._store.create_model, new
        )
        return pb.CreateModelResponse(model=convert.model_to_pb(model))

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        domain.validate_model_name(request.name)
        model = await asyncio.to_thread(self._store.get_model, request.name)
        return pb.GetModelResponse(model=convert.model_to_pb(model))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        domain.validate_query(request.query)
        limit = domain.page_size(request.page_size)
        models = await asyncio.to_thread(
            self._store.list_models,
            request.query,
            request.owner,
            dict(request.tags),
            convert.decode_token(request.page_token),
            limit + 1,
        )
        more = len(models) > limit
        models = models[:limit]
        return pb.ListModelsResponse(
            models=[convert.model_to_pb(m) for m in models],
            next_page_token=convert.encode_token(models[-1].name) if more else "",
        )

    async def SetApprovalPolicy(
        self, request: pb.SetApprovalPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetApprovalPolicyResponse:
        domain.validate_model_name(request.model)
        policy = convert.policy_from_pb(request.policy)
        model = await self._mutate(
            context,
            "model.policy.set",
            request.model,
            self._store.set_approval_policy,
            request.model,
            policy,
        )
        return pb.SetApprovalPolicyResponse(model=convert.model_to_pb(model))

    # --- versions -------------------------------------------------------------------------

    async def UploadVersion(
        self,
        request_iterator: AsyncIterator[pb.UploadVersionRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadVersionResponse:
        if self._uploads_in_flight >= self._max_uploads:
            raise Overloaded(f"{self._max_uploads} uploads are in progress; retry later")
        self._uploads_in_flight += 1
        self._uploads_gauge.inc()
        actor = actor_of(context)
        target = ""
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("payload") != "metadata":
                raise InvalidArgument("the first message of an upload must carry its metadata")
            meta = first.metadata
            target = meta.model
            version = await self._receive_version(meta, request_iterator, actor)
        except ModelplaneError as exc:
            self._uploads.labels("refused").inc()
            if not isinstance(exc, (Unavailable, Overloaded)):
                await self._audit_refusal(actor, "version.create", target, exc)
            raise
        except BaseException:
            self._uploads.labels("aborted").inc()
            raise
        finally:
            self._uploads_in_flight -= 1
            self._uploads_gauge.dec()
        self._uploads.labels("registered").inc()
        self._announce(version.model, version)
        return pb.UploadVersionResponse(version=convert.version_to_pb(version))

    async def _receive_version(
        self,
        meta: pb.UploadMetadata,
        request_iterator: AsyncIterator[pb.UploadVersionRequest],
        actor: str,
    ) -> domain.ModelVersion:
        domain.validate_model_name(meta.model)
        expected_sha = meta.sha256.lower()
        if expected_sha:
            domain.validate_sha256(expected_sha)
        if meta.size_bytes < 0:
            raise InvalidArgument("size_bytes must not be negative")
        metadata = convert.metadata_from_pb(meta)
        domain.validate_metadata(metadata)
        # Fail before any byte is stored if the model does not exist.
        await asyncio.to_thread(self._store.get_model, meta.model)
        writer = await asyncio.to_thread(self._artifacts.begin)
        pending: PendingArtifact | None = None
        committed = False
        try:
            async for message in request_iterator:
                if message.WhichOneof("payload") == "metadata":
                    raise InvalidArgument("metadata may only be sent in the first message")
                if message.chunk:
                    await asyncio.to_thread(writer.write, message.chunk)
                    self._uploaded_bytes.inc(len(message.chunk))
            pending = await asyncio.to_thread(writer.finish)
            check_expected(pending, expected_sha, meta.size_bytes)
            signature = await asyncio.to_thread(read_signature, pending.path)
            # Checked against the signature before the blob is kept: a refused feature
            # input leaves no artifact behind.
            new = domain.checked_version(
                domain.NewVersion(
                    artifact=domain.Artifact(pending.sha256, pending.size_bytes),
                    signature=signature,
                    metadata=metadata,
                )
            )
            await asyncio.to_thread(self._artifacts.commit, pending)
            committed = True
            return await asyncio.to_thread(self._store.create_version, meta.model, new, actor)
        finally:
            # Also on cancellation (the client went away): unlinking is quick, so it is
            # done right here rather than in a thread that a cancelled task cannot await.
            if pending is None:
                writer.abort()
            elif not committed:
                self._artifacts.discard(pending)

    async def GetVersion(
        self, request: pb.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVersionResponse:
        version = await self._resolve(
            request.model, request.WhichOneof("selector"), request.version, request.alias
        )
        return pb.GetVersionResponse(version=convert.version_to_pb(version))

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVersionsResponse:
        domain.validate_model_name(request.model)
        limit = domain.page_size(request.page_size)
        before = convert.decode_int_token(request.page_token)
        versions = await asyncio.to_thread(
            self._store.list_versions, request.model, before, limit + 1
        )
        more = len(versions) > limit
        versions = versions[:limit]
        token = convert.encode_token(str(versions[-1].version)) if more else ""
        return pb.ListVersionsResponse(
            versions=[convert.version_to_pb(v) for v in versions], next_page_token=token
        )

    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadArtifactResponse]:
        if request.chunk_size < 0 or request.chunk_size > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk_size must be between 0 and {MAX_CHUNK_BYTES}")
        chunk_size = request.chunk_size or DEFAULT_CHUNK_BYTES
        version = await self._resolve(
            request.model, request.WhichOneof("selector"), request.version, request.alias
        )
        artifact = version.artifact
        reader = await asyncio.to_thread(self._artifacts.open, artifact.sha256, artifact.size_bytes)
        try:
            yield pb.DownloadArtifactResponse(
                metadata=pb.DownloadMetadata(
                    model=version.model,
                    version=version.version,
                    artifact=convert.artifact_to_pb(artifact),
                )
            )
            while True:
                chunk = await asyncio.to_thread(reader.read, chunk_size)
                if not chunk:
                    break
                self._downloaded_bytes.inc(len(chunk))
                yield pb.DownloadArtifactResponse(chunk=chunk)
        finally:
            reader.close()

    async def SetVersionStatus(
        self, request: pb.SetVersionStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetVersionStatusResponse:
        domain.validate_model_name(request.model)
        domain.validate_version_number(request.version)
        status = convert.STATUS_FROM_PB.get(request.status)
        if status is None:
            raise InvalidArgument("status is required")
        version = await self._mutate(
            context,
            "version.status.set",
            f"{request.model}/v{request.version}",
            self._store.set_version_status,
            request.model,
            request.version,
            status,
            request.reason,
        )
        return pb.SetVersionStatusResponse(version=convert.version_to_pb(version))

    async def ReviewVersion(
        self, request: pb.ReviewVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReviewVersionResponse:
        domain.validate_model_name(request.model)
        domain.validate_version_number(request.version)
        decision = convert.DECISION_FROM_PB.get(request.decision)
        if decision is None:
            raise InvalidArgument("decision must be APPROVE or REJECT")
        review, version = await self._mutate(
            context,
            f"version.review.{decision.value}",
            f"{request.model}/v{request.version}",
            self._review if current_principal() is not None else self._store.add_review,
            request.model,
            request.version,
            decision,
            request.comment,
        )
        return pb.ReviewVersionResponse(
            review=convert.review_to_pb(review), version=convert.version_to_pb(version)
        )

    def _review(
        self, model: str, version: int, decision: domain.ReviewDecision, comment: str, actor: str
    ) -> tuple[domain.Review, domain.ModelVersion]:
        """A review by an authenticated principal: nobody approves their own upload (a
        version's uploader never changes, so checking before the review's transaction is
        safe)."""
        current = self._store.get_version(model, version)
        policy = self._store.get_model(model).approval_policy
        domain.check_not_own_upload(model, version, current.created_by, actor, decision, policy)
        return self._store.add_review(model, version, decision, comment, actor)

    async def ListReviews(
        self, request: pb.ListReviewsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListReviewsResponse:
        domain.validate_model_name(request.model)
        domain.validate_version_number(request.version)
        reviews = await asyncio.to_thread(self._store.list_reviews, request.model, request.version)
        return pb.ListReviewsResponse(reviews=[convert.review_to_pb(r) for r in reviews])

    # --- aliases --------------------------------------------------------------------------

    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAliasResponse:
        domain.validate_model_name(request.model)
        if request.expected_version < 0:
            raise InvalidArgument("expected_version must not be negative")
        alias, event = await self._mutate(
            context,
            "alias.set",
            f"{request.model}@{request.alias}",
            self._store.set_alias,
            request.model,
            request.alias,
            request.version,
            request.expected_version,
            request.reason,
        )
        self._announce(request.model, event)
        return pb.SetAliasResponse(alias=convert.alias_to_pb(alias))

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAliasResponse:
        domain.validate_model_name(request.model)
        event = await self._mutate(
            context,
            "alias.delete",
            f"{request.model}@{request.alias}",
            self._store.delete_alias,
            request.model,
            request.alias,
            request.expected_version,
            request.reason,
        )
        self._announce(request.model, event)
        return pb.DeleteAliasResponse(event=convert.event_to_pb(event))

    async def ListAliases(
        self, request: pb.ListAliasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAliasesResponse:
        domain.validate_model_name(request.model)
        aliases = await asyncio.to_thread(self._store.list_aliases, request.model)
        return pb.ListAliasesResponse(aliases=[convert.alias_to_pb(a) for a in aliases])

    async def GetAliasHistory(
        self, request: pb.GetAliasHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAliasHistoryResponse:
        domain.validate_model_name(request.model)
        events = await asyncio.to_thread(self._store.alias_history, request.model, request.alias)
        return pb.GetAliasHistoryResponse(events=[convert.event_to_pb(e) for e in events])

    async def GetAliasAt(
        self, request: pb.GetAliasAtRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAliasAtResponse:
        domain.validate_model_name(request.model)
        domain.validate_alias_name(request.alias)
        moment = convert.time_or(request.time, None) or datetime.now(UTC)
        event = await asyncio.to_thread(
            self._store.alias_at, request.model, request.alias, to_us(moment)
        )
        return pb.GetAliasAtResponse(version=event.to_version, event=convert.event_to_pb(event))

    # --- rollout policies -----------------------------------------------------------------

    async def SetRolloutPolicy(
        self, request: pb.SetRolloutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRolloutPolicyResponse:
        domain.validate_model_name(request.model)
        if request.expected_revision < 0:
            raise InvalidArgument("expected_revision must not be negative")
        routes, shadow = convert.rollout_request_from_pb(request)
        policy = await self._mutate(
            context,
            "rollout.set",
            request.model,
            self._store.set_rollout,
            request.model,
            routes,
            shadow,
            request.expected_revision,
            request.reason,
        )
        self._announce(request.model, policy)
        return pb.SetRolloutPolicyResponse(policy=convert.rollout_to_pb(policy))

    async def GetRolloutPolicy(
        self, request: pb.GetRolloutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRolloutPolicyResponse:
        domain.validate_model_name(request.model)
        policy = await asyncio.to_thread(self._store.get_rollout, request.model)
        return pb.GetRolloutPolicyResponse(policy=convert.rollout_to_pb(policy))

    # --- watch and audit ------------------------------------------------------------------

    async def WatchModel(
        self, request: pb.WatchModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchModelResponse]:
        domain.validate_model_name(request.model)
        await asyncio.to_thread(self._store.get_model, request.model)
        # Subscribe before reading the snapshot: a change committed in between is then
        # delivered after it (possibly repeating what the snapshot shows) instead of lost.
        subscription = self._hub.subscribe(request.model)
        try:
            model = await asyncio.to_thread(self._store.get_model, request.model)
            aliases = await asyncio.to_thread(self._store.list_aliases, request.model)
            rollout = await asyncio.to_thread(self._store.get_rollout, request.model)
            yield pb.WatchModelResponse(
                snapshot=pb.AliasSnapshot(
                    aliases=[convert.alias_to_pb(a) for a in aliases],
                    latest_version=model.latest_version,
                    rollout=convert.rollout_to_pb(rollout),
                )
            )
            while True:
                event = await subscription.next()
                if isinstance(event, domain.AliasEvent):
                    yield pb.WatchModelResponse(alias_moved=convert.event_to_pb(event))
                elif isinstance(event, domain.RolloutPolicy):
                    yield pb.WatchModelResponse(rollout_changed=convert.rollout_to_pb(event))
                else:
                    yield pb.WatchModelResponse(
                        version_created=pb.VersionCreated(version=convert.version_to_pb(event))
                    )
        finally:
            self._hub.unsubscribe(subscription)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        limit = domain.page_size(request.page_size)
        filters = domain.AuditFilter(
            actor=request.actor,
            target_prefix=request.target_prefix,
            action=request.action,
            since=convert.time_or(request.since, None),
        )
        events = await asyncio.to_thread(
            self._store.list_audit,
            filters,
            convert.decode_int_token(request.page_token),
            limit + 1,
        )
        more = len(events) > limit
        events = events[:limit]
        return pb.ListAuditEventsResponse(
            events=[convert.audit_to_pb(e) for e in events],
            next_page_token=convert.encode_token(str(events[-1].id)) if more else "",
        )
