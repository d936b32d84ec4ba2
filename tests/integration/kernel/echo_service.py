"""A raw-bytes service for exercising the kernel without any real service's protos.

Requests are UTF-8 commands: "echo:<text>", "sleep:<seconds>", "notfound",
"crash", "big:<n>" (answers n bytes), "block:<seconds>" (holds the aio server's event
loop itself, as a loop too busy to take calls would).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import grpc

from modelplane.kernel import errors
from modelplane.kernel.server import AioServiceServer, SyncServiceServer
from modelplane.kernel.settings import ServiceSettings

SERVICE = "test.Echo"
METHOD = f"/{SERVICE}/Call"


def _answer(command: str) -> bytes | float:
    verb, _, arg = command.partition(":")
    if verb == "echo":
        return arg.encode()
    if verb == "notfound":
        raise errors.NotFound("model 'ghost' not found")
    if verb == "crash":
        raise RuntimeError("password=hunter2 leaked in a traceback")
    if verb == "big":
        return b"x" * int(arg)
    if verb == "sleep":
        return float(arg)
    raise errors.InvalidArgument(f"unknown command {verb!r}")


async def _aio_call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    verb, _, arg = request.decode().partition(":")
    if verb == "block":
        print("blocking", flush=True)
        time.sleep(float(arg))  # ok-sleep: deliberately blocks the event loop
        return b"unblocked"
    answer = _answer(request.decode())
    if isinstance(answer, float):
        print("in-flight", flush=True)
        await asyncio.sleep(answer)  # ok-sleep: the slow call the shutdown test drains
        return b"slept"
    return answer


def _sync_call(request: bytes, context: grpc.ServicerContext) -> bytes:
    answer = _answer(request.decode())
    if isinstance(answer, float):
        time.sleep(answer)  # ok-sleep: a deliberately slow call
        return b"slept"
    return answer


def aio_server(settings: ServiceSettings) -> AioServiceServer:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(_aio_call)}
    )
    return AioServiceServer(
        settings, "echo", [SERVICE], lambda server: server.add_generic_rpc_handlers((handler,))
    )


def sync_server(settings: ServiceSettings) -> SyncServiceServer:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(_sync_call)}
    )
    return SyncServiceServer(
        settings, "echo", [SERVICE], lambda server: server.add_generic_rpc_handlers((handler,))
    )


if __name__ == "__main__":
    # Run as a process for the SIGTERM test: python echo_service.py <data_dir>
    settings = ServiceSettings(port=0, data_dir=Path(sys.argv[1]), grace_period_s=10)
    asyncio.run(aio_server(settings).serve_until_signal())
