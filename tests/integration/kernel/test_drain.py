"""stop(): calls that arrive once it began get UNAVAILABLE ("shutting down") at once, never
CANCELLED; calls in flight get the grace period and finish; health answers NOT_SERVING."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.kernel.server import SHUTTING_DOWN, AioServiceServer, SyncServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.support import running_aio_in_thread, running_sync, streams_still_writing

SERVICE = "test.Drain"
WAIT = 20.0
LATE_CALLS = 20
BURST = 16


class Slow:
    """A call that holds until released, and tells when it has started."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def aio(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, WAIT)
        return b"finished"

    def sync(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.entered.set()
        self.release.wait(WAIT)
        return b"finished"


async def _fast_aio(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def _stream_aio(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    yield b"one"


async def _upload_aio(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return b"stored"


def _fast_sync(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"ok"


def _stream_sync(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"one"


def _upload_sync(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    for _ in requests:
        pass
    return b"stored"


def _handlers(
    slow: Callable[..., Any],
    fast: Callable[..., Any],
    stream: Callable[..., Any],
    upload: Callable[..., Any],
):
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Fast": grpc.unary_unary_rpc_method_handler(fast),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )


@contextmanager
def _serving(kind: str, slow: Slow) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Yields the address and a function that starts stop(grace=WAIT) in the background
    (returning something with .result(timeout))."""
    settings = ServiceSettings(port=0, log_json=False, log_level="WARNING")
    if kind == "aio":
        handlers = _handlers(slow.aio, _fast_aio, _stream_aio, _upload_aio)
        aio = AioServiceServer(
            settings, "drain", [SERVICE], lambda s: s.add_generic_rpc_handlers((handlers,))
        )
        with running_aio_in_thread(aio) as address:
            loop = aio._server._loop  # type: ignore[union-attr]  # the server's own loop
            yield address, lambda: asyncio.run_coroutine_threadsafe(aio.stop(grace=WAIT), loop)
        return
    handlers = _handlers(slow.sync, _fast_sync, _stream_sync, _upload_sync)
    sync = SyncServiceServer(
        settings, "drain", [SERVICE], lambda s: s.add_generic_rpc_handlers((handlers,))
    )
    with running_sync(sync) as address:

        def stop() -> Any:
            thread = threading.Thread(target=sync.stop, kwargs={"grace": WAIT})
            thread.start()

            class Joined:
                def result(self, timeout: float) -> None:
                    thread.join(timeout)
                    assert not thread.is_alive()

            return Joined()

        yield address, stop


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_calls_during_the_grace_period_get_unavailable_and_in_flight_ones_finish(kind):
    slow = Slow()
    with _serving(kind, slow) as (address, stop), grpc.insecure_channel(address) as channel:
        fast = channel.unary_unary(f"/{SERVICE}/Fast")
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        health = health_pb2_grpc.HealthStub(channel)
        assert fast(b"", timeout=WAIT) == b"ok"
        in_flight = channel.unary_unary(f"/{SERVICE}/Slow").future(b"", timeout=WAIT)
        assert slow.entered.wait(WAIT)

        stopping = stop()
        # Health is the signal that the drain began (and is itself still answered).
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        while health.Check(request, timeout=WAIT).status == health_pb2.HealthCheckResponse.SERVING:
            pass
        late = [_code(lambda: fast(b"", timeout=WAIT)) for _ in range(LATE_CALLS)]
        late.append(_code(lambda: list(stream(b"", timeout=WAIT))))
        assert set(late) == {(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)}
        assert not in_flight.done()

        slow.release.set()
        assert in_flight.result(WAIT) == b"finished"
        stopping.result(WAIT)


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_stop_without_calls_in_flight_does_not_wait_for_the_grace_period(kind):
    slow = Slow()
    with _serving(kind, slow) as (address, stop), grpc.insecure_channel(address) as channel:
        assert channel.unary_unary(f"/{SERVICE}/Fast")(b"", timeout=WAIT) == b"ok"
        # WAIT (20 s) is the grace: a stop that waited for it would fail this result().
        stop().result(WAIT / 2)


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_bursts_arriving_while_the_server_stops_are_refused_never_cancelled(kind):
    """Callers that resend together (as closed-loop clients do after a refusal) bring
    bursts: the server takes a burst's calls from gRPC core one at a time, so the rest
    wait in core meanwhile, and core answers CANCELLED to every call still waiting when
    grpc's own stop begins (measured in `make chaos`: 2-12 per SIGTERM of inference)."""
    slow = Slow()
    outcomes: list[grpc.StatusCode] = []
    stopped = threading.Event()
    with (
        _serving(kind, slow) as (address, stop),
        grpc.insecure_channel(address, options=[("grpc.enable_retries", 0)]) as channel,
    ):
        fast = channel.unary_unary(f"/{SERVICE}/Fast")
        assert fast(b"", timeout=WAIT) == b"ok"

        def bursts() -> None:
            while not stopped.is_set():
                calls = [fast.future(b"", timeout=WAIT) for _ in range(BURST)]
                if outcomes.count(grpc.StatusCode.UNAVAILABLE) >= 2 * BURST:
                    # The drain has refused bursts: end the call that holds it open
                    # as this burst arrives, so grpc's stop meets it.
                    slow.release.set()
                outcomes.extend(_code(call.result)[0] for call in calls)
                time.sleep(0.02)  # ok-sleep: the callers' pause between bursts

        sender = threading.Thread(target=bursts)
        sender.start()
        try:
            deadline = time.monotonic() + WAIT
            while len(outcomes) < 5 * BURST and time.monotonic() < deadline:
                time.sleep(0.01)  # ok-sleep: a few bursts served before the stop
            # A call in flight keeps the drain open while bursts are refused.
            in_flight = channel.unary_unary(f"/{SERVICE}/Slow").future(b"", timeout=WAIT)
            assert slow.entered.wait(WAIT)
            stopping = stop()
            assert in_flight.result(WAIT) == b"finished"
            stopping.result(WAIT)
            time.sleep(0.1)  # ok-sleep: bursts that find the server gone
        finally:
            stopped.set()
            slow.release.set()
            sender.join(WAIT)

    assert grpc.StatusCode.UNAVAILABLE in outcomes  # the stop met the bursts
    assert grpc.StatusCode.CANCELLED not in outcomes, collections.Counter(outcomes)


def test_uploads_refused_while_their_client_still_writes_read_unavailable():
    """A client stream refused while its client is still writing: grpc.aio's client then
    read "Internal error from Core" (INTERNAL) in 11 of 300 calls, unless the refusal
    first reads what the client sends (1 of ~140 calls to the registry draining in
    `make chaos`, an upload among them)."""
    slow = Slow()
    with _serving("aio", slow) as (address, stop), grpc.insecure_channel(address) as channel:
        in_flight = channel.unary_unary(f"/{SERVICE}/Slow").future(b"", timeout=WAIT)
        assert slow.entered.wait(WAIT)
        stopping = stop()
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        while health.Check(request, timeout=WAIT).status == health_pb2.HealthCheckResponse.SERVING:
            pass

        outcomes = streams_still_writing(address, f"/{SERVICE}/Upload", b"m" * 100, b"x" * 4000)
        assert outcomes == {"UNAVAILABLE": 200}
        slow.release.set()
        assert in_flight.result(WAIT) == b"finished"
        stopping.result(WAIT)
