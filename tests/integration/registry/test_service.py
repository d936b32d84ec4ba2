"""The registry over gRPC: uploads, downloads, aliases, approvals, watch and audit,
through the typed client against a real server on port 0."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import onnx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modelplane.client.registry import RegistryClient, file_sha256
from modelplane.examples.models import mlp
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.registry.v1 import registry_pb2_grpc as pb_grpc
from tests.integration.registry.conftest import ThreadedServer
from tests.integration.registry.large_onnx import write_large_onnx
from tests.postgres import POSTGRES_URL
from tests.support import wait_until


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(mlp((8, 16, 3), seed=1), path)
    return path


@pytest.fixture
def client(registry: ThreadedServer) -> RegistryClient:
    with RegistryClient(registry.address, actor="alice", timeout=30) as c:
        yield c  # type: ignore[misc]


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def _leftovers(server: ThreadedServer) -> list[str]:
    return os.listdir(server.settings.data_dir / "artifacts" / "tmp")


def _blobs(server: ThreadedServer) -> list[Path]:
    return [
        p for p in (server.settings.data_dir / "artifacts" / "sha256").rglob("*") if p.is_file()
    ]


def test_upload_then_download_round_trip(
    registry: ThreadedServer, client: RegistryClient, model_file: Path, tmp_path: Path
) -> None:
    client.create_model("fraud", owner="risk")
    version = client.upload_file(
        model_file,
        pb.UploadMetadata(
            model="fraud",
            description="first",
            lineage=pb.Lineage(
                code_revision="abc123",
                metrics=[pb.Metric(name="auc", value=0.9, slice={"region": "eu"})],
            ),
            card=pb.ModelCard(intended_use="demo"),
            feature_statistics=[pb.FeatureStatistics(name="x", bin_edges=[0, 1, 2], counts=[5, 6])],
        ),
    )
    assert version.version == 1
    assert version.artifact.sha256 == file_sha256(model_file)
    assert version.artifact.size_bytes == model_file.stat().st_size
    assert version.artifact.format == "onnx"
    assert [(s.name, s.datatype, list(s.shape)) for s in version.signature.inputs] == [
        ("input", "FP32", [-1, 8])
    ]
    assert [(s.name, list(s.shape)) for s in version.signature.outputs] == [("output", [-1, 3])]
    assert version.created_by == "alice"
    got = client.get_version("fraud", 1)
    assert got.lineage.metrics[0].slice == {"region": "eu"}
    assert got.card.intended_use == "demo"
    assert list(got.feature_statistics[0].counts) == [5, 6]

    client.set_alias("fraud", "production", 1, 0, "launch")
    target = tmp_path / "down.onnx"
    meta = client.download("fraud", target, alias="production", chunk_bytes=1000)
    assert (meta.version, meta.artifact.sha256) == (1, version.artifact.sha256)
    assert target.read_bytes() == model_file.read_bytes()
    assert _leftovers(registry) == []


def test_identical_bytes_are_stored_once(
    registry: ThreadedServer, client: RegistryClient, model_file: Path
) -> None:
    client.create_model("fraud")
    first = client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
    second = client.upload_file(model_file, pb.UploadMetadata(model="fraud"), verify=False)
    assert (first.version, second.version) == (1, 2)
    assert first.artifact.sha256 == second.artifact.sha256
    assert len(_blobs(registry)) == 1


@pytest.mark.parametrize(
    ("chunks", "metadata", "fragment"),
    [
        ([os.urandom(5000)], {}, "not a valid ONNX model"),
        ([b"hello, world"], {}, "not a valid ONNX model"),
        ([], {}, "no bytes"),
        (None, {"sha256": "0" * 64}, "digest mismatch"),
        (None, {"size_bytes": 7}, "announced 7"),
        (None, {"sha256": "xyz"}, "sha256"),
    ],
)
def test_bad_uploads_are_invalid_and_leave_nothing(
    registry: ThreadedServer,
    client: RegistryClient,
    model_file: Path,
    chunks: list[bytes] | None,
    metadata: dict[str, object],
    fragment: str,
) -> None:
    client.create_model("fraud")
    data = [model_file.read_bytes()] if chunks is None else chunks
    code, details = _code(
        lambda: client.upload_chunks(pb.UploadMetadata(model="fraud", **metadata), data)  # type: ignore[arg-type]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details
    assert client.get_model("fraud").latest_version == 0
    assert client.list_versions("fraud") == []
    assert _leftovers(registry) == []
    assert _blobs(registry) == []
    refused = client.audit(action="version.create")
    assert json.loads(refused[0].details_json)["outcome"] == "refused"


def test_upload_protocol_errors(client: RegistryClient, model_file: Path) -> None:
    client.create_model("fraud")

    def chunk_first() -> object:
        requests = iter([pb.UploadVersionRequest(chunk=b"abc")])
        return client.stub.UploadVersion(requests, timeout=10)

    assert _code(chunk_first)[0] == grpc.StatusCode.INVALID_ARGUMENT

    def metadata_twice() -> object:
        requests = iter([pb.UploadVersionRequest(metadata=pb.UploadMetadata(model="fraud"))] * 2)
        return client.stub.UploadVersion(requests, timeout=10)

    assert _code(metadata_twice)[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _code(lambda: client.upload_file(model_file, pb.UploadMetadata(model="nope")))
    assert (code, "nope" in details) == (grpc.StatusCode.NOT_FOUND, True)


def test_64_mib_upload_and_download_keep_their_digest(
    registry: ThreadedServer, client: RegistryClient, tmp_path: Path
) -> None:
    source = tmp_path / "large.onnx"
    digest = write_large_onnx(source, 64 * 1024 * 1024)
    client.create_model("large")
    version = client.upload_file(source, pb.UploadMetadata(model="large", sha256=digest))
    assert version.artifact.sha256 == digest
    assert list(version.signature.inputs[0].shape) == [-1, 16 * 1024 * 1024]
    target = tmp_path / "copy.onnx"
    meta = client.download("large", target, version=1)
    assert meta.artifact.sha256 == digest == file_sha256(target)


def test_corrupted_blob_is_detected_on_download(
    registry: ThreadedServer, client: RegistryClient, model_file: Path, tmp_path: Path
) -> None:
    client.create_model("fraud")
    client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
    (blob,) = _blobs(registry)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    code, _ = _code(lambda: client.download("fraud", tmp_path / "x.onnx", version=1))
    assert code == grpc.StatusCode.DATA_LOSS
    assert not (tmp_path / "x.onnx").exists()


def test_aliases_over_grpc(client: RegistryClient, model_file: Path) -> None:
    client.create_model("fraud")
    for _ in range(2):
        client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
    client.set_alias("fraud", "production", 1, 0, "launch")
    between = datetime.now(UTC)
    code, details = _code(lambda: client.set_alias("fraud", "production", 2, 0))
    assert code == grpc.StatusCode.ABORTED and "held by v1" in details
    assert _code(lambda: client.set_alias("fraud", "v2", 2, 0))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert _code(lambda: client.get_version("fraud", alias="canary"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    client.set_alias("fraud", "production", 2, 1, "v2 is better")
    assert client.get_version("fraud", alias="production").version == 2
    assert client.alias_at("fraud", "production") == 2
    assert client.alias_at("fraud", "production", between) == 1
    assert (
        _code(lambda: client.alias_at("fraud", "production", datetime(2000, 1, 1, tzinfo=UTC)))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    history = client.alias_history("fraud", "production")
    assert [(e.from_version, e.to_version, e.actor, e.reason) for e in history] == [
        (0, 1, "alice", "launch"),
        (1, 2, "alice", "v2 is better"),
    ]


def test_approvals_gate_production(registry: ThreadedServer, model_file: Path) -> None:
    with (
        RegistryClient(registry.address, actor="owner") as owner,
        RegistryClient(registry.address, actor="rev1") as rev1,
        RegistryClient(registry.address, actor="rev2") as rev2,
    ):
        owner.create_model("fraud", required_approvals=2, protected_aliases=["production"])
        owner.upload_file(model_file, pb.UploadMetadata(model="fraud"))
        code, details = _code(lambda: owner.set_alias("fraud", "production", 1, 0))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "2 approval" in details
        rev1.review("fraud", 1, approve=True, comment="metrics ok")
        response = rev2.review("fraud", 1, approve=True, comment="card ok")
        assert response.version.status == pb.VERSION_STATUS_APPROVED
        assert response.version.approvals == 2
        owner.set_alias("fraud", "production", 1, 0, "approved by two")
        reviews = owner.list_reviews("fraud", 1)
        assert [(r.actor, r.comment) for r in reviews] == [
            ("rev1", "metrics ok"),
            ("rev2", "card ok"),
        ]
        refused = owner.audit(actor="owner", action="alias.set")
        assert [json.loads(e.details_json).get("outcome") for e in refused] == [None, "refused"]


def test_watch_streams_snapshot_then_changes(client: RegistryClient, model_file: Path) -> None:
    client.create_model("fraud")
    client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
    client.set_alias("fraud", "production", 1, 0)
    stream = client.watch("fraud", timeout=30)
    try:
        first = next(stream)
        assert first.WhichOneof("event") == "snapshot"
        assert [(a.alias, a.version) for a in first.snapshot.aliases] == [("production", 1)]
        assert first.snapshot.latest_version == 1
        client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
        client.set_alias("fraud", "production", 2, 1, "roll forward")
        created = next(stream)
        assert created.version_created.version.version == 2
        moved = next(stream)
        assert (moved.alias_moved.from_version, moved.alias_moved.to_version) == (1, 2)
    finally:
        stream.cancel()
    assert _code(lambda: next(client.watch("nope", timeout=10)))[0] == grpc.StatusCode.NOT_FOUND


def test_errors_for_unknown_and_duplicate(client: RegistryClient) -> None:
    client.create_model("fraud")
    assert _code(lambda: client.create_model("fraud"))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert _code(lambda: client.get_model("ghost"))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.get_version("fraud", 3))[0] == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: client.create_model("bad name"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_audit_records_the_actor_from_metadata(registry: ThreadedServer) -> None:
    with RegistryClient(registry.address) as anonymous:
        anonymous.create_model("a")
    with RegistryClient(registry.address, actor="carol") as carol:
        carol.create_model("b")
        events = carol.audit(action="model.create")
    assert [(e.actor, e.target) for e in events] == [("carol", "b"), ("anonymous", "a")]


def test_runs_on_postgres(
    server_factory: Callable[..., ThreadedServer], pg_schema: str, model_file: Path
) -> None:
    server = server_factory(database_url=POSTGRES_URL, database_schema=pg_schema)
    with RegistryClient(server.address, actor="pg") as client:
        client.create_model("fraud")
        version = client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
        assert version.version == 1
        assert client.get_version("fraud", 1).artifact.sha256 == file_sha256(model_file)


def test_uploads_beyond_the_limit_are_refused_at_once(
    server_factory: Callable[..., ThreadedServer], model_file: Path
) -> None:
    server = server_factory(max_concurrent_uploads=1)
    with RegistryClient(server.address) as client:
        client.create_model("fraud")
        release = threading.Event()
        first_chunk_sent = threading.Event()

        def held_open() -> Iterator[bytes]:
            yield model_file.read_bytes()[:100]
            first_chunk_sent.set()
            release.wait(30)

        holder = threading.Thread(
            target=lambda: _code(
                lambda: client.upload_chunks(pb.UploadMetadata(model="fraud"), held_open())
            )
        )
        holder.start()
        try:
            assert first_chunk_sent.wait(30)
            # The first upload is in flight (its bytes were sent); wait until the server
            # counts it, via the leftover temporary file it writes into.
            wait_until(lambda: _leftovers(server))
            code, details = _code(
                lambda: client.upload_file(model_file, pb.UploadMetadata(model="fraud"))
            )
            assert code == grpc.StatusCode.UNAVAILABLE and "uploads are in progress" in details
        finally:
            release.set()
            holder.join(30)
        assert client.get_model("fraud").latest_version == 0


def test_shutdown_ends_watches_with_unavailable(
    server_factory: Callable[..., ThreadedServer],
) -> None:
    server = server_factory(grace_period_s=60.0)
    with RegistryClient(server.address) as client:
        client.create_model("fraud")
        stream = client.watch("fraud", timeout=60)
        assert next(stream).WhichOneof("event") == "snapshot"
        server.stop(grace=60.0)  # returns early only because the watch was ended
        code, details = _code(lambda: next(stream))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in details


def test_watch_hears_changes_made_through_another_replica(
    server_factory: Callable[..., ThreadedServer], pg_schema: str, model_file: Path
) -> None:
    """Two registry servers on one PostgreSQL schema: a watcher on one sees what is
    done through the other (LISTEN/NOTIFY), each change exactly once."""
    first = server_factory(database_url=POSTGRES_URL, database_schema=pg_schema)
    second = server_factory(database_url=POSTGRES_URL, database_schema=pg_schema)
    with RegistryClient(first.address) as watcher, RegistryClient(second.address) as writer:
        writer.create_model("fraud")
        stream = watcher.watch("fraud", timeout=60)
        try:
            assert next(stream).snapshot.latest_version == 0
            writer.upload_file(model_file, pb.UploadMetadata(model="fraud"))
            writer.set_alias("fraud", "production", 1, 0, "launch")
            writer.delete_alias("fraud", "production", 1, "rollback")
            created = next(stream)
            assert created.version_created.version.version == 1
            moved = next(stream).alias_moved
            assert (moved.to_version, moved.reason) == (1, "launch")
            removed = next(stream).alias_moved
            assert (removed.from_version, removed.to_version) == (1, 0)
            writer.set_alias("fraud", "canary", 1, 0)
            assert next(stream).alias_moved.alias == "canary"  # nothing repeated in between
        finally:
            stream.cancel()


def test_bad_timestamps_and_oversized_queries_are_invalid_argument(
    registry: ThreadedServer, client: RegistryClient
) -> None:
    """Found by tests/fuzz: these answered INTERNAL (a ValueError from Timestamp's
    conversion; SQLite's "LIKE or GLOB pattern too complex")."""
    client.create_model("fraud", owner="risk")
    with grpc.insecure_channel(registry.address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        for bad in [Timestamp(seconds=1, nanos=-1), Timestamp(seconds=2**62)]:
            audit = pb.ListAuditEventsRequest(since=bad)
            alias_at = pb.GetAliasAtRequest(model="fraud", alias="production", time=bad)
            for code, details in (
                _code(lambda r=audit: stub.ListAuditEvents(r, timeout=10)),
                _code(lambda r=alias_at: stub.GetAliasAt(r, timeout=10)),
            ):
                assert code is grpc.StatusCode.INVALID_ARGUMENT
                assert details.startswith("invalid timestamp")
        code, details = _code(
            lambda: stub.ListModels(pb.ListModelsRequest(query="%_" * 30_000), timeout=10)
        )
        assert (code, details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "query of 60000 characters: at most 256 are allowed",
        )
        assert [m.name for m in client.list_models(query="fra")] == ["fraud"]
