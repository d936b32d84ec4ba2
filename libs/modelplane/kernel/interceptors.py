"""Server interceptors: one place maps domain errors to gRPC status codes.

Handlers raise `modelplane.kernel.errors` exceptions; these interceptors abort the
call with the matching code and the error's message, cut to
`MAX_STATUS_MESSAGE_BYTES` (a longer one would overflow gRPC's metadata limit and
reach the caller as a different error). Anything unexpected becomes
INTERNAL with an opaque incident id (the traceback goes to the log, never to the
caller).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from modelplane.kernel.errors import status_for


def _wrap_aio_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_for(exc, method)
            await context.abort(code, message)

    return wrapper


def _wrap_aio_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def gen_wrapper(
            request_or_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code, message = status_for(exc, method)
                await context.abort(code, message)

        return gen_wrapper
    # A coroutine handler that writes with context.write() behaves like a unary one.
    return _wrap_aio_unary(behavior, method)


class _WrappedHandlers:
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


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by grpc.aio handlers to status codes."""

    def __init__(self) -> None:
        self._handlers = _WrappedHandlers(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._handlers.get(handler, handler_call_details.method)

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_aio_unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_aio_unary(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_aio_stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_aio_stream(handler.stream_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _abort_sync(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    # context.abort() itself raises; a handler that already aborted has a code set.
    if context.code() is not None:  # type: ignore[attr-defined]
        raise exc
    code, message = status_for(exc, method)
    context.abort(code, message)


def _wrap_sync_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def wrapper(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request_or_iterator, context)
        except Exception as exc:
            _abort_sync(exc, context, method)

    return wrapper


def _wrap_sync_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def wrapper(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request_or_iterator, context)
        except Exception as exc:
            _abort_sync(exc, context, method)

    return wrapper


class SyncErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by synchronous grpc.server handlers to status codes."""

    def __init__(self) -> None:
        self._handlers = _WrappedHandlers(self._wrap)

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
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_sync_unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_sync_unary(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_sync_stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_sync_stream(handler.stream_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )
