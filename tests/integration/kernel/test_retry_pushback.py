"""A retry hint travels as gRPC's `grpc-retry-pushback-ms` trailer from both server kinds,
and the shared client honours it: idempotent calls wait at least that long before the
next attempt (never past their deadline), calls that must not repeat never retry.

The client's pauses are recorded instead of slept, and its jitter is fixed, so the
tests assert on the pauses chosen, never on elapsed time."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from modelplane.client import channel
from modelplane.client.channel import ServiceClient
from modelplane.client.credentials import ClientCredentials
from modelplane.kernel.errors import Overloaded
from modelplane.kernel.server import AioServiceServer, SyncServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.support import running_aio_in_thread, running_sync

SERVICE = "test.Busy"
METHOD = f"/{SERVICE}/Call"


class Busy:
    """Refuses the first `refusals` calls with Overloaded(retry_after_ms=`pushback`)."""

    def __init__(self, refusals: int, pushback: int | None) -> None:
        self.refusals = refusals
        self.pushback = pushback
        self.calls = 0
        self._lock = threading.Lock()

    def answer(self) -> bytes:
        with self._lock:
            self.calls += 1
            if self.calls <= self.refusals:
                raise Overloaded("busy; retry later", retry_after_ms=self.pushback)
        return b"done"


def aio_server(settings: ServiceSettings, busy: Busy) -> AioServiceServer:
    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return busy.answer()

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    return AioServiceServer(
        settings, "busy", [SERVICE], lambda server: server.add_generic_rpc_handlers((handler,))
    )


def sync_server(settings: ServiceSettings, busy: Busy) -> SyncServiceServer:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        return busy.answer()

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    return SyncServiceServer(
        settings, "busy", [SERVICE], lambda server: server.add_generic_rpc_handlers((handler,))
    )


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's pauses between attempts, recorded instead of slept; no jitter."""
    recorded: list[float] = []
    monkeypatch.setattr(channel, "_sleep", recorded.append)
    monkeypatch.setattr(channel.random, "uniform", lambda low, high: 0.0)
    return recorded


@pytest.fixture(params=["aio", "sync"])
def serve(request: pytest.FixtureRequest, tmp_path):
    def start(busy: Busy) -> Iterator[str]:
        settings = ServiceSettings(port=0, data_dir=tmp_path, log_level="WARNING")
        if request.param == "aio":
            return running_aio_in_thread(aio_server(settings, busy))
        return running_sync(sync_server(settings, busy))

    return start


def client(address: str, timeout: float = 30.0) -> ServiceClient:
    return ServiceClient(address, timeout, credentials=ClientCredentials())


def test_the_hint_reaches_the_caller_as_a_trailer(serve):
    with (
        serve(Busy(refusals=1, pushback=250)) as address,
        grpc.insecure_channel(address) as ch,
        pytest.raises(grpc.RpcError) as refused,
    ):
        ch.unary_unary(METHOD)(b"", timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert refused.value.details() == "busy; retry later"
    assert ("grpc-retry-pushback-ms", "250") in refused.value.trailing_metadata()
    assert channel.retry_pushback_s(refused.value) == 0.25


def test_idempotent_calls_wait_at_least_the_hint(serve, pauses):
    busy = Busy(refusals=2, pushback=250)
    with serve(busy) as address, client(address) as c:
        assert c._idempotent(c._channel.unary_unary(METHOD), b"") == b"done"
    assert busy.calls == 3
    assert pauses == [0.25, 0.25]


def test_a_hint_past_the_deadline_ends_the_call_at_once(serve, pauses):
    busy = Busy(refusals=1, pushback=60_000)
    with (
        serve(busy) as address,
        client(address, timeout=5.0) as c,
        pytest.raises(grpc.RpcError) as refused,
    ):
        c._idempotent(c._channel.unary_unary(METHOD), b"")
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert (busy.calls, pauses) == (1, [])


def test_calls_that_must_not_repeat_are_never_retried(serve, pauses):
    busy = Busy(refusals=1, pushback=1)
    with (
        serve(busy) as address,
        client(address) as c,
        pytest.raises(grpc.RpcError) as refused,
    ):
        c._once(c._channel.unary_unary(METHOD), b"")
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert (busy.calls, pauses) == (1, [])


def test_without_a_hint_the_pause_is_the_jittered_backoff(serve, pauses, monkeypatch):
    monkeypatch.setattr(channel.random, "uniform", lambda low, high: high)
    busy = Busy(refusals=2, pushback=None)  # no trailer at all
    with serve(busy) as address, client(address) as c:
        assert c._idempotent(c._channel.unary_unary(METHOD), b"") == b"done"
    assert pauses == [channel.INITIAL_BACKOFF_S, 2 * channel.INITIAL_BACKOFF_S]
