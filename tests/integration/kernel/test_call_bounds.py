"""The kernel's aio server: bounds on waiting for clients (modelplane.kernel.call_bounds)
and synchronous handlers on its threads (AioThreadedHandlers)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from modelplane.kernel import errors
from modelplane.kernel.call_bounds import NO_REQUEST
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.support import running_aio

SERVICE = "test.Bounds"


def _sync_call(request: bytes, context: grpc.ServicerContext) -> bytes:
    command = request.decode()
    if command == "thread":
        return threading.current_thread().name.encode()
    if command == "notfound":
        raise errors.NotFound("no such thing")
    if command == "abort":
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "aborted in a thread")
    return request


async def _chatty(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    """Reads its client stream all along (as ModelStreamInfer does) and, once a request
    came, answers every 0.1 s for 1.5 s: the client sends nothing meanwhile, but the
    stream is not idle."""
    first = asyncio.Event()

    async def read() -> None:
        async for _ in requests:
            first.set()

    reader = asyncio.ensure_future(read())
    try:
        await first.wait()
        for _ in range(15):
            await asyncio.sleep(0.1)  # ok-sleep: a server that is busy answering
            yield b"tick"
    finally:
        reader.cancel()


def _server(tmp_path: Path) -> AioServiceServer:
    settings = ServiceSettings(
        port=0,
        data_dir=tmp_path,
        log_json=False,
        request_body_timeout_s=0.5,
        stream_idle_timeout_s=0.5,
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Sync": grpc.unary_unary_rpc_method_handler(_sync_call),
            "Chatty": grpc.stream_stream_rpc_method_handler(_chatty),
        },
    )
    return AioServiceServer(
        settings,
        "bounds",
        [SERVICE],
        lambda server: server.add_generic_rpc_handlers((handler,)),
        handler_threads=2,
    )


async def test_synchronous_handlers_run_on_the_servers_threads(tmp_path):
    async with (
        running_aio(_server(tmp_path)) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        call = channel.unary_unary(f"/{SERVICE}/Sync")
        assert (await call(b"thread", timeout=10)).startswith(b"bounds")
        assert await call(b"echo", timeout=10) == b"echo"
        for command, code, details in [
            (b"notfound", grpc.StatusCode.NOT_FOUND, "no such thing"),
            (b"abort", grpc.StatusCode.FAILED_PRECONDITION, "aborted in a thread"),
        ]:
            failed = call(command, timeout=10)
            assert await failed.code() == code
            assert await failed.details() == details


async def test_a_call_without_a_request_message_is_invalid(tmp_path):
    async def empty() -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover

    async with (
        running_aio(_server(tmp_path)) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        call = channel.stream_unary(f"/{SERVICE}/Sync")(empty(), timeout=10)
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await call.details() == NO_REQUEST


async def test_a_stream_the_server_keeps_answering_is_not_idle(tmp_path):
    release = asyncio.Event()

    async def one_then_silence() -> AsyncIterator[bytes]:
        yield b"tick"
        await release.wait()

    async with (
        running_aio(_server(tmp_path)) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        call = channel.stream_stream(f"/{SERVICE}/Chatty")(one_then_silence(), timeout=30)
        answers = [answer async for answer in call]
        release.set()
        # Fifteen answers over 1.5 s, three times the idle timeout, while a read of the
        # client stream was pending all along.
        assert answers == [b"tick"] * 15
        assert await call.code() == grpc.StatusCode.OK
