"""A typed, synchronous client of the registry service, used by the CLI, benchmarks and
any Python caller. Uploads and downloads stream in chunks, so files of any size pass
through bounded memory; downloads are verified against the digest the server sends
first and land under their final name only once verified."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.client.credentials import ClientCredentials, resolve
from modelplane.kernel.settings import MAX_MESSAGE_BYTES
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.registry.v1 import registry_pb2_grpc as pb_grpc

ACTOR_METADATA_KEY = "x-modelplane-actor"
CHUNK_BYTES = 1024 * 1024
DEFAULT_ADDRESS = "127.0.0.1:50051"


Routes = Mapping[str, int] | Sequence[tuple[str, int]] | Sequence[pb.RouteWeight]


def _route_weights(routes: Routes) -> list[pb.RouteWeight]:
    if isinstance(routes, Mapping):
        return [pb.RouteWeight(alias=alias, weight=weight) for alias, weight in routes.items()]
    return [
        route
        if isinstance(route, pb.RouteWeight)
        else pb.RouteWeight(alias=route[0], weight=route[1])
        for route in routes
    ]


class DigestMismatch(Exception):
    """Downloaded bytes do not hash to the digest the registry announced."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(moment)
    return ts


def _file_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk


class RegistryClient:
    """`timeout` bounds ordinary calls; `transfer_timeout` bounds uploads and downloads."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        actor: str | None = None,
        timeout: float = 30.0,
        transfer_timeout: float = 3600.0,
        keepalive_s: float | None = None,
        credentials: ClientCredentials | None = None,
    ) -> None:
        """`keepalive_s`: ping an idle connection this often, so a long watch learns
        within about twice that when the registry vanished without closing it.
        `credentials`: TLS and token (default: from the environment, see
        modelplane.client.credentials)."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if keepalive_s is not None:
            options += [
                ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        self.credentials = resolve(credentials)
        self._channel = self.credentials.channel(address, options=options)
        self.stub = pb_grpc.RegistryServiceStub(self._channel)
        self._metadata = ((ACTOR_METADATA_KEY, actor),) if actor else ()
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _options(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "metadata": self._metadata}

    # --- models ---------------------------------------------------------------------------

    def create_model(
        self,
        name: str,
        description: str = "",
        owner: str = "",
        tags: Mapping[str, str] | None = None,
        required_approvals: int = 0,
        protected_aliases: Iterable[str] = (),
        allow_self_approval: bool = False,
    ) -> pb.Model:
        request = pb.CreateModelRequest(
            name=name,
            description=description,
            owner=owner,
            tags=dict(tags or {}),
            approval_policy=pb.ApprovalPolicy(
                required_approvals=required_approvals,
                protected_aliases=list(protected_aliases),
                allow_self_approval=allow_self_approval,
            ),
        )
        response: pb.CreateModelResponse = self.stub.CreateModel(request, **self._options())
        return response.model

    def get_model(self, name: str) -> pb.Model:
        response: pb.GetModelResponse = self.stub.GetModel(
            pb.GetModelRequest(name=name), **self._options()
        )
        return response.model

    def list_models(
        self, query: str = "", owner: str = "", tags: Mapping[str, str] | None = None
    ) -> list[pb.Model]:
        models: list[pb.Model] = []
        token = ""
        while True:
            request = pb.ListModelsRequest(
                query=query, owner=owner, tags=dict(tags or {}), page_token=token
            )
            response: pb.ListModelsResponse = self.stub.ListModels(request, **self._options())
            models.extend(response.models)
            token = response.next_page_token
            if not token:
                return models

    def set_approval_policy(
        self,
        model: str,
        required_approvals: int,
        protected_aliases: Iterable[str],
        allow_self_approval: bool = False,
    ) -> pb.Model:
        request = pb.SetApprovalPolicyRequest(
            model=model,
            policy=pb.ApprovalPolicy(
                required_approvals=required_approvals,
                protected_aliases=list(protected_aliases),
                allow_self_approval=allow_self_approval,
            ),
        )
        response: pb.SetApprovalPolicyResponse = self.stub.SetApprovalPolicy(
            request, **self._options()
        )
        return response.model

    # --- versions -------------------------------------------------------------------------

    def upload_chunks(
        self, metadata: pb.UploadMetadata, chunks: Iterable[bytes]
    ) -> pb.ModelVersion:
        """Registers a version from any iterable of byte chunks."""

        def requests() -> Iterator[pb.UploadVersionRequest]:
            yield pb.UploadVersionRequest(metadata=metadata)
            for chunk in chunks:
                yield pb.UploadVersionRequest(chunk=chunk)

        response: pb.UploadVersionResponse = self.stub.UploadVersion(
            requests(), timeout=self.transfer_timeout, metadata=self._metadata
        )
        return response.version

    def upload_file(
        self,
        path: Path,
        metadata: pb.UploadMetadata,
        verify: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
        serving_config: str | None = None,
        feature_input: pb.FeatureInput | None = None,
    ) -> pb.ModelVersion:
        """Uploads `path`; with `verify` the digest is computed first and checked by the
        server, so bytes damaged on the way are refused rather than registered.
        `serving_config` (a Triton config.pbtxt's text) and `feature_input` (the feature
        bundle feeding one model input), when given, replace those in `metadata`."""
        request = pb.UploadMetadata()
        request.CopyFrom(metadata)
        if serving_config is not None:
            request.serving_config = serving_config
        if feature_input is not None:
            request.feature_input.CopyFrom(feature_input)
        if verify and not request.sha256:
            request.sha256 = file_sha256(path)
            request.size_bytes = path.stat().st_size
        return self.upload_chunks(request, _file_chunks(path, chunk_bytes))

    def get_version(self, model: str, version: int = 0, alias: str = "") -> pb.ModelVersion:
        request = (
            pb.GetVersionRequest(model=model, alias=alias)
            if alias
            else pb.GetVersionRequest(model=model, version=version)
        )
        response: pb.GetVersionResponse = self.stub.GetVersion(request, **self._options())
        return response.version

    def list_versions(self, model: str) -> list[pb.ModelVersion]:
        versions: list[pb.ModelVersion] = []
        token = ""
        while True:
            request = pb.ListVersionsRequest(model=model, page_token=token)
            response: pb.ListVersionsResponse = self.stub.ListVersions(request, **self._options())
            versions.extend(response.versions)
            token = response.next_page_token
            if not token:
                return versions

    def download(
        self,
        model: str,
        destination: Path,
        version: int = 0,
        alias: str = "",
        chunk_bytes: int = 0,
    ) -> pb.DownloadMetadata:
        """Writes the artifact to `destination`, verified; returns what was downloaded."""
        request = (
            pb.DownloadArtifactRequest(model=model, alias=alias, chunk_size=chunk_bytes)
            if alias
            else pb.DownloadArtifactRequest(model=model, version=version, chunk_size=chunk_bytes)
        )
        responses = self.stub.DownloadArtifact(
            request, timeout=self.transfer_timeout, metadata=self._metadata
        )
        partial = destination.with_name(f".{destination.name}.{os.getpid()}.part")
        try:
            first = next(responses)
            if first.WhichOneof("payload") != "metadata":
                raise DigestMismatch("the registry did not announce the artifact first")
            meta = first.metadata
            digest = hashlib.sha256()
            size = 0
            with open(partial, "wb") as f:
                for response in responses:
                    f.write(response.chunk)
                    digest.update(response.chunk)
                    size += len(response.chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != meta.artifact.sha256 or size != meta.artifact.size_bytes:
                raise DigestMismatch(
                    f"downloaded {size} bytes hashing to {digest.hexdigest()}, the registry"
                    f" announced {meta.artifact.size_bytes} bytes of {meta.artifact.sha256}"
                )
            os.replace(partial, destination)
            return meta
        finally:
            partial.unlink(missing_ok=True)
            responses.cancel()

    def set_status(
        self, model: str, version: int, status: pb.VersionStatus.ValueType, reason: str = ""
    ) -> pb.ModelVersion:
        request = pb.SetVersionStatusRequest(
            model=model, version=version, status=status, reason=reason
        )
        response: pb.SetVersionStatusResponse = self.stub.SetVersionStatus(
            request, **self._options()
        )
        return response.version

    def review(
        self, model: str, version: int, approve: bool, comment: str = ""
    ) -> pb.ReviewVersionResponse:
        decision = pb.REVIEW_DECISION_APPROVE if approve else pb.REVIEW_DECISION_REJECT
        request = pb.ReviewVersionRequest(
            model=model, version=version, decision=decision, comment=comment
        )
        return self.stub.ReviewVersion(request, **self._options())

    def list_reviews(self, model: str, version: int) -> list[pb.Review]:
        request = pb.ListReviewsRequest(model=model, version=version)
        response: pb.ListReviewsResponse = self.stub.ListReviews(request, **self._options())
        return list(response.reviews)

    # --- aliases --------------------------------------------------------------------------

    def set_alias(
        self, model: str, alias: str, version: int, expected_version: int, reason: str = ""
    ) -> pb.Alias:
        request = pb.SetAliasRequest(
            model=model,
            alias=alias,
            version=version,
            expected_version=expected_version,
            reason=reason,
        )
        response: pb.SetAliasResponse = self.stub.SetAlias(request, **self._options())
        return response.alias

    def delete_alias(
        self, model: str, alias: str, expected_version: int, reason: str = ""
    ) -> pb.AliasEvent:
        request = pb.DeleteAliasRequest(
            model=model, alias=alias, expected_version=expected_version, reason=reason
        )
        response: pb.DeleteAliasResponse = self.stub.DeleteAlias(request, **self._options())
        return response.event

    def list_aliases(self, model: str) -> list[pb.Alias]:
        response: pb.ListAliasesResponse = self.stub.ListAliases(
            pb.ListAliasesRequest(model=model), **self._options()
        )
        return list(response.aliases)

    def alias_history(self, model: str, alias: str = "") -> list[pb.AliasEvent]:
        response: pb.GetAliasHistoryResponse = self.stub.GetAliasHistory(
            pb.GetAliasHistoryRequest(model=model, alias=alias), **self._options()
        )
        return list(response.events)

    def alias_at(self, model: str, alias: str, when: datetime | None = None) -> int:
        request = pb.GetAliasAtRequest(model=model, alias=alias, time=_timestamp(when))
        response: pb.GetAliasAtResponse = self.stub.GetAliasAt(request, **self._options())
        return response.version

    # --- rollout policies -----------------------------------------------------------------

    def get_rollout(self, model: str) -> pb.RolloutPolicy:
        """The model's rollout policy; revision 0 and no routes when never set."""
        response: pb.GetRolloutPolicyResponse = self.stub.GetRolloutPolicy(
            pb.GetRolloutPolicyRequest(model=model), **self._options()
        )
        return response.policy

    def set_rollout(
        self,
        model: str,
        routes: Routes = (),
        shadow_alias: str = "",
        shadow_percent: int = 0,
        expected_revision: int | None = None,
        reason: str = "",
    ) -> pb.RolloutPolicy:
        """Replaces the model's rollout policy: `routes` as {alias: weight} (weights sum to
        100; empty turns splitting off), `shadow_percent` of requests mirrored to
        `shadow_alias` (0: none). Compare-and-set on `expected_revision` (ABORTED when the
        policy is at another revision); None reads the current revision first, i.e.
        replaces whatever policy holds now (only a change landing between that read and
        the write is refused)."""
        if expected_revision is None:
            expected_revision = self.get_rollout(model).revision
        request = pb.SetRolloutPolicyRequest(
            model=model,
            routes=_route_weights(routes),
            expected_revision=expected_revision,
            reason=reason,
        )
        if shadow_percent or shadow_alias:
            request.shadow.CopyFrom(pb.ShadowRoute(alias=shadow_alias, percent=shadow_percent))
        response: pb.SetRolloutPolicyResponse = self.stub.SetRolloutPolicy(
            request, **self._options()
        )
        return response.policy

    # --- watch and audit ------------------------------------------------------------------

    def watch(self, model: str, timeout: float | None = None) -> Iterator[pb.WatchModelResponse]:
        """The snapshot, then changes; cancel the returned iterator to stop watching."""
        return self.stub.WatchModel(  # type: ignore[no-any-return]
            pb.WatchModelRequest(model=model), timeout=timeout, metadata=self._metadata
        )

    def audit(
        self,
        actor: str = "",
        target_prefix: str = "",
        action: str = "",
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[pb.AuditEvent]:
        request = pb.ListAuditEventsRequest(
            actor=actor,
            target_prefix=target_prefix,
            action=action,
            since=_timestamp(since),
            page_size=limit,
        )
        response: pb.ListAuditEventsResponse = self.stub.ListAuditEvents(request, **self._options())
        return list(response.events)
