"""A request that is not a valid message of its type is the caller's fault: the kernel's
interceptors answer INVALID_ARGUMENT (grpc's own parsing answers UNKNOWN or INTERNAL and
logs a traceback per request), for unary calls and for each frame of a client stream,
on both server kinds, and log it as one rate-limited line."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from modelplane.kernel.logs import RateLimitedLog
from modelplane.kernel.server import AioServiceServer, SyncServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.support import running_aio_in_thread, running_sync, streams_still_writing

SERVICE = "test.Count"
# Field 1 says "length-delimited, 2**63 bytes follow": no message parses from it.
GARBAGE = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x7f"
GOOD = health_pb2.HealthCheckRequest(service="x").SerializeToString()
parse = health_pb2.HealthCheckRequest.FromString
reply = health_pb2.HealthCheckResponse.SerializeToString


def _settings(tmp_path) -> ServiceSettings:
    return ServiceSettings(port=0, data_dir=tmp_path, log_json=False, tracing_enabled=False)


async def _aio_count(requests: AsyncIterator[health_pb2.HealthCheckRequest], context):
    count = 0
    async for _ in requests:
        count += 1
    return health_pb2.HealthCheckResponse(status=count)


def _sync_count(requests: Iterator[health_pb2.HealthCheckRequest], context):
    return health_pb2.HealthCheckResponse(status=sum(1 for _ in requests))


def _aio_server(tmp_path) -> AioServiceServer:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Count": grpc.stream_unary_rpc_method_handler(_aio_count, parse, reply)}
    )
    return AioServiceServer(
        _settings(tmp_path), "count", [SERVICE], lambda s: s.add_generic_rpc_handlers((handler,))
    )


def _sync_server(tmp_path) -> SyncServiceServer:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Count": grpc.stream_unary_rpc_method_handler(_sync_count, parse, reply)}
    )
    return SyncServiceServer(
        _settings(tmp_path), "count", [SERVICE], lambda s: s.add_generic_rpc_handlers((handler,))
    )


@pytest.fixture(params=["aio", "sync"])
def address(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "aio":
        with running_aio_in_thread(_aio_server(tmp_path)) as address:
            yield address
    else:
        with running_sync(_sync_server(tmp_path)) as address:
            yield address


def _code(call, payload) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call(payload, timeout=10)
    return error.value.code(), error.value.details()


def test_an_undecodable_unary_request_is_invalid_argument(address, caplog):
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with caplog.at_level(logging.WARNING, "modelplane.errors"):
            code, details = _code(check, GARBAGE)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details == (
            "the request (10 bytes) could not be decoded as grpc.health.v1.HealthCheckRequest"
        )
        assert not any(record.exc_info for record in caplog.records)
        # The server goes on answering good requests.
        assert check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=10)


def test_an_undecodable_frame_of_a_client_stream_is_invalid_argument(address):
    with grpc.insecure_channel(address) as channel:
        count = channel.stream_unary(f"/{SERVICE}/Count")
        code, _ = _code(count, iter([GOOD, GARBAGE, GOOD]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        answer = health_pb2.HealthCheckResponse.FromString(count(iter([GOOD, GOOD]), timeout=10))
        assert answer.status == 2


def test_a_stream_failed_while_its_client_still_writes_reads_invalid_argument(tmp_path):
    """The frame that fails the call is the first; its client is still writing when the
    server answers. grpc.aio's client then read "Internal error from Core" (INTERNAL) in a
    few percent of calls, unless the server first reads what the client sends."""
    with running_aio_in_thread(_aio_server(tmp_path)) as address:
        outcomes = streams_still_writing(address, f"/{SERVICE}/Count", GARBAGE, GOOD * 400)
    assert outcomes == {"INVALID_ARGUMENT": 200}


def test_bad_input_is_logged_once_per_interval_with_a_count(caplog):
    log = RateLimitedLog(logging.getLogger("test.bad-input"), interval_s=3600)
    with caplog.at_level(logging.WARNING, "test.bad-input"):
        for n in range(3):
            log.warning("bad request %d", n)
        log.interval_s = 0
        log._next.clear()
        log.warning("bad request %d", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "bad request 0",
        "bad request 3 (2 more left out)",
    ]
