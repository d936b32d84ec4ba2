"""What the typed clients of the inference, feature and monitoring services share: one channel,
a deadline on every call, a bounded wait for the first connection, and retries of
idempotent calls only, with backoff and full jitter inside the call's deadline, never
sooner than the server's retry hint (`grpc-retry-pushback-ms`, gRFC A6). Every
call carries the current trace context, so a call made inside a span continues its
trace in the service called."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from modelplane.client.credentials import ClientCredentials, resolve
from modelplane.kernel.errors import RETRY_PUSHBACK_KEY
from modelplane.kernel.settings import MAX_MESSAGE_BYTES
from modelplane.kernel.telemetry import trace_metadata

CONNECT_TIMEOUT_S = 5.0
# Idempotent calls retry these; everything else is the server's answer.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0

_T = TypeVar("_T")
_sleep = time.sleep  # the pause between attempts (tests record it)


def retry_pushback_s(error: grpc.RpcError) -> float | None:
    """The server's retry hint in seconds (its `grpc-retry-pushback-ms` trailer); None
    when there is none; negative when the server asks not to retry at all."""
    trailers = getattr(error, "trailing_metadata", None)
    for key, value in (trailers() if callable(trailers) else None) or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return int(value) / 1000
            except (TypeError, ValueError):
                return -1.0  # gRFC A6: an unparsable hint means "do not retry"
    return None


class CannotConnect(ConnectionError):
    """Nothing answered at the address within the connect timeout."""


class ServiceClient:
    """`timeout` bounds every call, retries included; `connect_timeout` bounds the wait
    for the connection before the first call (None: no separate wait, as a service's
    background sender wants: a call to an absent server then fails within its deadline).
    Thread-safe: one client can serve many threads."""

    def __init__(
        self,
        address: str,
        timeout: float,
        connect_timeout: float | None = CONNECT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        credentials: ClientCredentials | None = None,
    ) -> None:
        """`credentials`: TLS and token (default: from the environment, see
        modelplane.client.credentials)."""
        self.address = address
        self.credentials = resolve(credentials)
        self._channel = self.credentials.channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                *options,
            ],
        )
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connected = threading.Event()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self, timeout: float | None = None) -> None:
        """Waits until the channel is connected; CannotConnect after `timeout` seconds
        (default `connect_timeout`). Calls do this once by themselves."""
        limit = self.connect_timeout if timeout is None else timeout
        if limit is None or self._connected.is_set():
            return
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=limit)
        except grpc.FutureTimeoutError:
            raise self._cannot_connect(
                f"cannot connect to {self.address} (no server answered within {limit:g} s)"
            ) from None
        finally:
            ready.cancel()
        self._connected.set()

    def _cannot_connect(self, message: str) -> Exception:
        """The error `connect` raises; a client with its own error classes returns one."""
        return CannotConnect(message)

    def _once(self, method: Callable[..., _T], request: Any, timeout: float | None = None) -> _T:
        """Calls `method` once (a call that must not be repeated), within the deadline
        (`timeout`, default the client's)."""
        self.connect()
        return method(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=trace_metadata(),
        )

    def _idempotent(
        self, method: Callable[..., _T], request: Any, timeout: float | None = None
    ) -> _T:
        """Calls `method`, retrying UNAVAILABLE with backoff and full jitter until the
        deadline (`timeout`, default the client's), which covers every attempt. A server
        retry hint (`grpc-retry-pushback-ms`) is a floor under the pause: the jitter is
        added to it; a hint that cannot be met before the deadline ends the call at once,
        and a negative one means no retry."""
        self.connect()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        backoff = INITIAL_BACKOFF_S
        while True:
            try:
                return method(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=trace_metadata(),
                )
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:  # type: ignore[attr-defined]
                    raise
                pushback = retry_pushback_s(exc)
                if pushback is not None and pushback < 0:
                    raise
                pause = (pushback or 0.0) + random.uniform(0.0, backoff)
                if time.monotonic() + pause >= deadline:
                    raise
                _sleep(pause)  # backoff before the next attempt
                backoff = min(backoff * 2, MAX_BACKOFF_S)
