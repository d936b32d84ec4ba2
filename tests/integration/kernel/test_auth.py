"""The auth interceptor on real aio and sync servers: no token, wrong role, health open,
the principal visible to handlers (unary and streaming)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.kernel.auth import add_token, bearer_metadata, current_principal
from modelplane.kernel.server import AioServiceServer, SyncServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.support import running_aio_in_thread, running_sync, streams_still_writing

REGISTRY = "modelplane.registry.v1.RegistryService"
INFERENCE = "inference.GRPCInferenceService"
GET_MODEL = f"/{REGISTRY}/GetModel"  # reader
UPLOAD = f"/{REGISTRY}/UploadVersion"  # writer, client streaming
WATCH_MODEL = f"/{REGISTRY}/WatchModel"  # reader, server streaming
SET_ALIAS = f"/{REGISTRY}/SetAlias"  # approver
UNLOAD = f"/{INFERENCE}/RepositoryModelUnload"  # admin


def _who() -> bytes:
    principal = current_principal()
    return b"-" if principal is None else principal.name.encode()


async def _aio_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _who()


async def _aio_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield _who()


async def _aio_upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return _who()


def _sync_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return _who()


def _sync_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in range(2):
        yield _who()


def _sync_upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    for _ in requests:
        pass
    return _who()


def _handlers(
    unary: Callable[..., object], stream: Callable[..., object], upload: Callable[..., object]
) -> list:
    return [
        grpc.method_handlers_generic_handler(
            REGISTRY,
            {
                "GetModel": grpc.unary_unary_rpc_method_handler(unary),
                "SetAlias": grpc.unary_unary_rpc_method_handler(unary),
                "WatchModel": grpc.unary_stream_rpc_method_handler(stream),
                "UploadVersion": grpc.stream_unary_rpc_method_handler(upload),
            },
        ),
        grpc.method_handlers_generic_handler(
            INFERENCE, {"RepositoryModelUnload": grpc.unary_unary_rpc_method_handler(unary)}
        ),
    ]


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens.jsonl"
    return path, {
        "reader": add_token(path, "rita", ["reader"]),
        "approver": add_token(path, "alice", ["approver"]),
        "admin": add_token(path, "root", ["admin"]),
    }


def _serve(kind: str, path: Path) -> AbstractContextManager[str]:
    settings = ServiceSettings(
        auth_tokens_file=path, tracing_enabled=False, log_json=False, log_level="WARNING"
    )
    if kind == "aio":
        aio = AioServiceServer(
            settings,
            "auth-test",
            [REGISTRY],
            lambda server: server.add_generic_rpc_handlers(
                _handlers(_aio_unary, _aio_stream, _aio_upload)
            ),
        )
        return running_aio_in_thread(aio)
    sync = SyncServiceServer(
        settings,
        "auth-test",
        [REGISTRY],
        lambda server: server.add_generic_rpc_handlers(
            _handlers(_sync_unary, _sync_stream, _sync_upload)
        ),
        max_workers=4,
    )
    return running_sync(sync)


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return]
    return None


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_tokens_and_roles(kind: str, tokens: tuple[Path, dict[str, str]]) -> None:
    path, made = tokens
    reader = bearer_metadata(made["reader"])
    approver = bearer_metadata(made["approver"])
    admin = bearer_metadata(made["admin"])
    with _serve(kind, path) as address, grpc.insecure_channel(address) as channel:
        get_model = channel.unary_unary(GET_MODEL)
        set_alias = channel.unary_unary(SET_ALIAS)
        unload = channel.unary_unary(UNLOAD)
        watch = channel.unary_stream(WATCH_MODEL)

        # Health stays open.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        # No token / a bad one → UNAUTHENTICATED, on unary and streaming calls.
        assert _code(lambda: get_model(b"", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        bad = bearer_metadata("mp_0000_nope")
        assert _code(lambda: get_model(b"", metadata=bad, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(lambda: list(watch(b"", timeout=5))) == grpc.StatusCode.UNAUTHENTICATED
        # A forged actor header is no credential.
        forged = (("x-modelplane-actor", "root"),)
        assert _code(lambda: set_alias(b"", metadata=forged, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # Wrong role → PERMISSION_DENIED.
        assert _code(lambda: set_alias(b"", metadata=reader, timeout=5)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert _code(lambda: unload(b"", metadata=approver, timeout=5)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # The right role reaches the handler, which sees the principal.
        assert get_model(b"", metadata=reader, timeout=5) == b"rita"
        assert set_alias(b"", metadata=approver, timeout=5) == b"alice"
        assert unload(b"", metadata=admin, timeout=5) == b"root"
        assert list(watch(b"", metadata=reader, timeout=5)) == [b"rita", b"rita"]
        # One principal's call does not leak into the next (thread pool reuse).
        assert get_model(b"", metadata=admin, timeout=5) == b"root"
        assert get_model(b"", metadata=reader, timeout=5) == b"rita"


def test_an_upload_refused_while_its_client_still_writes_reads_the_refusal(
    tokens: tuple[Path, dict[str, str]],
) -> None:
    """A client stream refused while its client is still writing: grpc.aio's client read
    "Internal error from Core" (INTERNAL) instead of the code in 14-40 of these 200
    calls, unless the refusal first reads what the client sends."""
    path, made = tokens
    reader = bearer_metadata(made["reader"])
    with _serve("aio", path) as address:
        anonymous = streams_still_writing(address, UPLOAD, b"m" * 100, b"x" * 4000, 100)
        denied = streams_still_writing(address, UPLOAD, b"m" * 100, b"x" * 4000, 100, reader)
    assert anonymous == {"UNAUTHENTICATED": 100}
    assert denied == {"PERMISSION_DENIED": 100}
