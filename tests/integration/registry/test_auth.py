"""A real registry with authentication on: the issue's forged-actor and role scenarios.

Calls go through the generated stub with `bearer_metadata`, so the test depends only on
the wire contract, not on how the typed client gathers its credentials."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import onnx
import pytest

from modelplane.client.registry import file_sha256
from modelplane.examples.models import mlp
from modelplane.kernel.auth import add_token, bearer_metadata
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.registry.v1 import registry_pb2_grpc as pb_grpc
from tests.integration.registry.conftest import ThreadedServer

Metadata = tuple[tuple[str, str], ...]
FORGED = ("x-modelplane-actor", "cto")


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, Metadata]]:
    path = tmp_path / "tokens.jsonl"
    names = {
        "uploader": ["writer"],
        "reader": ["reader"],
        "alice": ["approver"],
        "bob": ["approver"],
        "root": ["admin"],
    }
    return path, {
        name: bearer_metadata(add_token(path, name, roles)) for name, roles in names.items()
    }


@pytest.fixture
def stub(
    server_factory: Callable[..., ThreadedServer], tokens: tuple[Path, dict[str, Metadata]]
) -> Iterator[pb_grpc.RegistryServiceStub]:
    server = server_factory(auth_tokens_file=tokens[0])
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RegistryServiceStub(channel)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined, no-any-return]


def _upload(stub: pb_grpc.RegistryServiceStub, path: Path, metadata: Metadata) -> pb.ModelVersion:
    def requests() -> Iterator[pb.UploadVersionRequest]:
        yield pb.UploadVersionRequest(
            metadata=pb.UploadMetadata(
                model="fraud", sha256=file_sha256(path), size_bytes=path.stat().st_size
            )
        )
        yield pb.UploadVersionRequest(chunk=path.read_bytes())

    response: pb.UploadVersionResponse = stub.UploadVersion(
        requests(), metadata=metadata, timeout=30
    )
    return response.version


def _approve(stub: pb_grpc.RegistryServiceStub, metadata: Metadata) -> pb.ReviewVersionResponse:
    request = pb.ReviewVersionRequest(model="fraud", version=1, decision=pb.REVIEW_DECISION_APPROVE)
    response: pb.ReviewVersionResponse = stub.ReviewVersion(request, metadata=metadata, timeout=10)
    return response


@pytest.fixture
def version(
    stub: pb_grpc.RegistryServiceStub, tokens: tuple[Path, dict[str, Metadata]], tmp_path: Path
) -> pb.ModelVersion:
    """fraud v1, uploaded by `uploader` (who also claims to be the CTO); `production`
    needs two approvals."""
    meta = tokens[1]
    stub.CreateModel(
        pb.CreateModelRequest(
            name="fraud",
            approval_policy=pb.ApprovalPolicy(
                required_approvals=2, protected_aliases=["production"]
            ),
        ),
        metadata=meta["uploader"] + (FORGED,),
        timeout=10,
    )
    path = tmp_path / "model.onnx"
    onnx.save(mlp((8, 16, 3), seed=1), path)
    return _upload(stub, path, meta["uploader"] + (FORGED,))


def test_the_audited_actor_is_the_principal_not_the_header(
    stub: pb_grpc.RegistryServiceStub,
    tokens: tuple[Path, dict[str, Metadata]],
    version: pb.ModelVersion,
) -> None:
    meta = tokens[1]
    assert version.created_by == "uploader"
    _approve(stub, meta["alice"] + (FORGED,))
    events = stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=meta["reader"], timeout=10)
    actors = {event.action: event.actor for event in events.events}
    assert "cto" not in actors.values()
    assert actors["version.review.approve"] == "alice"
    assert {actor for action, actor in actors.items() if action != "version.review.approve"} == {
        "uploader"
    }
    reviews = stub.ListReviews(
        pb.ListReviewsRequest(model="fraud", version=1), metadata=meta["reader"], timeout=10
    )
    assert [review.actor for review in reviews.reviews] == ["alice"]


def test_a_reader_cannot_approve_change_the_policy_or_delete_an_alias(
    stub: pb_grpc.RegistryServiceStub,
    tokens: tuple[Path, dict[str, Metadata]],
    version: pb.ModelVersion,
) -> None:
    meta = tokens[1]
    reader = meta["reader"] + (("x-modelplane-actor", "alice"),)
    assert _code(lambda: _approve(stub, reader)) == grpc.StatusCode.PERMISSION_DENIED
    policy = pb.SetApprovalPolicyRequest(model="fraud", policy=pb.ApprovalPolicy())
    assert _code(lambda: stub.SetApprovalPolicy(policy, metadata=reader, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # A staging alias the approvers set; the reader cannot remove it.
    stub.SetAlias(
        pb.SetAliasRequest(model="fraud", alias="staging", version=1, expected_version=0),
        metadata=meta["alice"],
        timeout=10,
    )
    delete = pb.DeleteAliasRequest(model="fraud", alias="staging", expected_version=1)
    assert _code(lambda: stub.DeleteAlias(delete, metadata=reader, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # A writer cannot either; no token at all is UNAUTHENTICATED.
    assert _code(lambda: stub.DeleteAlias(delete, metadata=meta["uploader"], timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert _code(lambda: stub.DeleteAlias(delete, metadata=(FORGED,), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    aliases = stub.ListAliases(
        pb.ListAliasesRequest(model="fraud"), metadata=meta["reader"], timeout=10
    )
    assert [(a.alias, a.version) for a in aliases.aliases] == [("staging", 1)]


def test_one_approver_counts_once_and_the_uploader_cannot_approve(
    stub: pb_grpc.RegistryServiceStub,
    tokens: tuple[Path, dict[str, Metadata]],
    version: pb.ModelVersion,
) -> None:
    meta = tokens[1]
    # alice twice, the second time claiming to be bob: still one approval.
    _approve(stub, meta["alice"])
    second = _approve(stub, meta["alice"] + (("x-modelplane-actor", "bob"),))
    assert second.version.approvals == 1
    promote = pb.SetAliasRequest(model="fraud", alias="production", version=1, expected_version=0)
    assert _code(lambda: stub.SetAlias(promote, metadata=meta["alice"], timeout=10)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    # The uploader cannot approve its own version (it lacks the role, and the rule holds
    # even for an admin: test_an_admin_uploader_cannot_approve_its_own_upload).
    assert _code(lambda: _approve(stub, meta["uploader"])) == grpc.StatusCode.PERMISSION_DENIED
    # A second, distinct approver makes two: production may now move.
    assert _approve(stub, meta["bob"]).version.approvals == 2
    alias = stub.SetAlias(promote, metadata=meta["bob"], timeout=10)
    assert alias.alias.version == 1
    history = stub.GetAliasHistory(
        pb.GetAliasHistoryRequest(model="fraud", alias="production"),
        metadata=meta["reader"],
        timeout=10,
    )
    assert [event.actor for event in history.events] == ["bob"]


def test_an_admin_uploader_cannot_approve_its_own_upload(
    stub: pb_grpc.RegistryServiceStub,
    tokens: tuple[Path, dict[str, Metadata]],
    tmp_path: Path,
) -> None:
    root = tokens[1]["root"]
    stub.CreateModel(pb.CreateModelRequest(name="fraud"), metadata=root, timeout=10)
    path = tmp_path / "model.onnx"
    onnx.save(mlp((8, 16, 3), seed=2), path)
    assert _upload(stub, path, root).created_by == "root"
    assert _code(lambda: _approve(stub, root)) == grpc.StatusCode.PERMISSION_DENIED
    # The refusal is audited under the principal; no approval was recorded.
    events = stub.ListAuditEvents(
        pb.ListAuditEventsRequest(action="version.review.approve"), metadata=root, timeout=10
    )
    assert [(e.actor, "refused" in e.details_json) for e in events.events] == [("root", True)]
    reviews = stub.ListReviews(
        pb.ListReviewsRequest(model="fraud", version=1), metadata=root, timeout=10
    )
    assert list(reviews.reviews) == []
    # Rejecting one's own upload is allowed: it only withholds.
    reject = pb.ReviewVersionRequest(model="fraud", version=1, decision=pb.REVIEW_DECISION_REJECT)
    stub.ReviewVersion(reject, metadata=root, timeout=10)


def test_a_policy_may_let_an_uploader_approve_its_own_upload(
    stub: pb_grpc.RegistryServiceStub,
    tokens: tuple[Path, dict[str, Metadata]],
    tmp_path: Path,
) -> None:
    root = tokens[1]["root"]
    policy = pb.ApprovalPolicy(
        required_approvals=1, protected_aliases=["production"], allow_self_approval=True
    )
    created = stub.CreateModel(
        pb.CreateModelRequest(name="fraud", approval_policy=policy), metadata=root, timeout=10
    )
    assert created.model.approval_policy.allow_self_approval
    path = tmp_path / "model.onnx"
    onnx.save(mlp((8, 16, 3), seed=3), path)
    _upload(stub, path, root)
    assert _approve(stub, root).version.approvals == 1
    # Turned off again, the next upload needs someone else.
    policy.allow_self_approval = False
    stub.SetApprovalPolicy(
        pb.SetApprovalPolicyRequest(model="fraud", policy=policy), metadata=root, timeout=10
    )
    other = tmp_path / "other.onnx"
    onnx.save(mlp((8, 16, 3), seed=4), other)
    _upload(stub, other, root)
    second = pb.ReviewVersionRequest(model="fraud", version=2, decision=pb.REVIEW_DECISION_APPROVE)
    assert _code(lambda: stub.ReviewVersion(second, metadata=root, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_role_denials_are_audited_under_the_principal(
    stub: pb_grpc.RegistryServiceStub,
    tokens: tuple[Path, dict[str, Metadata]],
    version: pb.ModelVersion,
) -> None:
    meta = tokens[1]
    policy = pb.SetApprovalPolicyRequest(model="fraud", policy=pb.ApprovalPolicy())
    for _ in range(3):
        assert _code(
            lambda: stub.SetApprovalPolicy(policy, metadata=meta["reader"], timeout=10)
        ) == (grpc.StatusCode.PERMISSION_DENIED)
    # No token: refused, but nobody to name — logged and counted, not audited.
    assert _code(lambda: stub.SetApprovalPolicy(policy, timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    request = pb.ListAuditEventsRequest(action="auth.denied")
    events: list[pb.AuditEvent] = []
    for _ in range(200):  # written off the event loop: wait for it, boundedly
        events = list(stub.ListAuditEvents(request, metadata=meta["reader"], timeout=10).events)
        if events:
            break
        threading.Event().wait(0.05)
    # Three refusals in a row make one row (repeats are coalesced per window).
    assert [(e.actor, e.target) for e in events] == [
        ("reader", "/modelplane.registry.v1.RegistryService/SetApprovalPolicy")
    ]
    assert json.loads(events[0].details_json)["needed_role"] == "approver"
