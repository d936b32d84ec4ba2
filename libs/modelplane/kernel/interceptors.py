"""Server interceptors: one place maps domain errors to gRPC status codes.

Handlers raise `modelplane.kernel.errors` exceptions; these interceptors abort the
call with the matching code and the error's message, cut to
`MAX_STATUS_MESSAGE_BYTES` (a longer one would overflow gRPC's metadata limit and
reach the caller as a different error), and with the error's retry hint, if any, as
the `grpc-retry-pushback-ms` trailer. Anything unexpected becomes
INTERNAL with an opaque incident id (the traceback goes to the log, never to the
caller).

They also parse each request themselves (`_tolerant`): gRPC's own parsing of a request
that is not a valid message raises inside grpc, which logs a traceback per request and
answers UNKNOWN (INTERNAL on the synchronous server). Here such a request becomes an
`Undecodable` marker that the wrapped handler refuses with INVALID_ARGUMENT (in a client
stream, when the handler reads that frame), logged as one rate-limited line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from modelplane.kernel.errors import InvalidArgument, status_for, trailers_for
from modelplane.kernel.logs import RateLimitedLog

log = logging.getLogger("modelplane.errors")


bad_input_log = RateLimitedLog(log)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request (or client-stream frame) that is not a valid message of its type."""

    type_name: str
    size: int

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request ({self.size} bytes) could not be decoded as {self.type_name}"
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` returning `Undecodable` instead of raising."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "the request message")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or anything else the parser raises on bad bytes
            bad_input_log.warning("undecodable %s (%d bytes) refused", name, len(data))
            return Undecodable(name, len(data))

    return parse


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise request.error()


async def _checked_aio_frames(frames: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for frame in frames:
        _refuse_undecodable(frame)
        yield frame


def _checked_sync_frames(frames: Iterable[Any]) -> Iterator[Any]:
    for frame in frames:
        _refuse_undecodable(frame)
        yield frame


def _checked_request(request_or_iterator: Any, client_streaming: bool, aio: bool) -> Any:
    """The request, refused when undecodable; or the client stream, whose undecodable
    frames are refused when the handler reaches them."""
    if not client_streaming:
        _refuse_undecodable(request_or_iterator)
        return request_or_iterator
    if aio:
        return _checked_aio_frames(request_or_iterator)
    return _checked_sync_frames(request_or_iterator)


REFUSAL_READS_S = 0.25
"""How long refusing (or failing) a client-streaming call first reads, and drops, what
its client is still sending. grpc.aio's client reports "Internal error from Core"
(INTERNAL) instead of the status when the call ends while it is still writing: 11 of
300 refused 2-message uploads whose client paused 2 ms between its messages, 14-40 of
200 uploads refused by authentication, and 1 of ~140 calls sent to the registry while
it drained in `make chaos` (an upload among them); none when the server read the stream
first. Bounded, so that a slow client cannot hold its refusal."""


async def read_out(requests: AsyncIterable[Any], limit_s: float = REFUSAL_READS_S) -> None:
    """Reads and drops `requests` until the client ends them or `limit_s` passed: what a
    refusal of a client-streaming call does before it answers (see REFUSAL_READS_S)."""

    async def read() -> None:
        async for _ in requests:
            pass

    # Whatever the stream does (times out, breaks, sends garbage), the call is refused next.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(read(), limit_s)


def _wrap_aio_unary(
    behavior: Callable[..., Any], method: str, client_streaming: bool = False
) -> Callable[..., Any]:
    async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = _checked_request(request_or_iterator, client_streaming, aio=True)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_for(exc, method)
            if client_streaming:  # else its client may read INTERNAL (REFUSAL_READS_S)
                await read_out(request_or_iterator)
            await context.abort(code, message, trailers_for(exc))

    return wrapper


def _wrap_aio_stream(
    behavior: Callable[..., Any], method: str, client_streaming: bool = False
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def gen_wrapper(
            request_or_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                request = _checked_request(request_or_iterator, client_streaming, aio=True)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code, message = status_for(exc, method)
                await context.abort(code, message, trailers_for(exc))

        return gen_wrapper
    # A coroutine handler that writes with context.write() behaves like a unary one.
    return _wrap_aio_unary(behavior, method, client_streaming)


Behavior = Callable[..., Any]


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Behavior, bool, bool], Behavior],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind whose behaviour is `wrap(behaviour, client
    streaming, server streaming)`, with another request parser when one is given: what
    every server interceptor here (errors, authentication, drain) builds per method."""
    parse = request_deserializer or handler.request_deserializer
    serialize = handler.response_serializer
    if handler.unary_unary:
        behavior = wrap(handler.unary_unary, False, False)
        return grpc.unary_unary_rpc_method_handler(behavior, parse, serialize)
    if handler.stream_unary:
        behavior = wrap(handler.stream_unary, True, False)
        return grpc.stream_unary_rpc_method_handler(behavior, parse, serialize)
    if handler.unary_stream:
        behavior = wrap(handler.unary_stream, False, True)
        return grpc.unary_stream_rpc_method_handler(behavior, parse, serialize)
    behavior = wrap(handler.stream_stream, True, True)
    return grpc.stream_stream_rpc_method_handler(behavior, parse, serialize)


class WrappedHandlers:
    """Each method's wrapped handler, built once: wrapping allocates, and the services'
    handlers never change (an entry is keyed by the handler it wraps). Handler threads
    of the synchronous server may race to fill an entry; either result is the same."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._wrap = wrap
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._by_method[method] = (handler, wrapped)
        return wrapped


class AioWrappingInterceptor(grpc.aio.ServerInterceptor):
    """A grpc.aio interceptor that serves every method through `wrap(handler, method)`,
    built once per method (WrappedHandlers)."""

    def __init__(self, wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]):
        self._handlers = WrappedHandlers(wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._handlers.get(handler, handler_call_details.method)


class AioErrorInterceptor(AioWrappingInterceptor):
    """Maps exceptions raised by grpc.aio handlers to status codes."""

    def __init__(self) -> None:
        super().__init__(self._wrap)

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def wrap(behavior: Behavior, client_streaming: bool, server_streaming: bool) -> Behavior:
            if server_streaming:
                return _wrap_aio_stream(behavior, method, client_streaming=client_streaming)
            return _wrap_aio_unary(behavior, method, client_streaming=client_streaming)

        return rewrap(handler, wrap, _tolerant(handler.request_deserializer))


def _abort_sync(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    # context.abort() itself raises; a handler that already aborted has a code set.
    if context.code() is not None:  # type: ignore[attr-defined]
        raise exc
    code, message = status_for(exc, method)
    trailers = trailers_for(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    context.abort(code, message)


def _wrap_sync_unary(
    behavior: Callable[..., Any], method: str, client_streaming: bool = False
) -> Callable[..., Any]:
    def wrapper(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            request = _checked_request(request_or_iterator, client_streaming, aio=False)
            return behavior(request, context)
        except Exception as exc:
            _abort_sync(exc, context, method)

    return wrapper


def _wrap_sync_stream(
    behavior: Callable[..., Any], method: str, client_streaming: bool = False
) -> Callable[..., Any]:
    def wrapper(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            request = _checked_request(request_or_iterator, client_streaming, aio=False)
            yield from behavior(request, context)
        except Exception as exc:
            _abort_sync(exc, context, method)

    return wrapper


class SyncErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by synchronous grpc.server handlers to status codes."""

    def __init__(self) -> None:
        self._handlers = WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._handlers.get(handler, handler_call_details.method)

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        def wrap(behavior: Behavior, client_streaming: bool, server_streaming: bool) -> Behavior:
            if server_streaming:
                return _wrap_sync_stream(behavior, method, client_streaming=client_streaming)
            return _wrap_sync_unary(behavior, method, client_streaming=client_streaming)

        return rewrap(handler, wrap, _tolerant(handler.request_deserializer))
