"""GRPCInferenceService on a server, with requests that cannot be parsed kept in hand.

gRPC's own handlers parse each request with the message's `FromString`: a frame that is
not a valid message raises inside grpc, which logs a traceback per frame (log flooding on
repeated bad input), answers a unary call with UNKNOWN and ends a stream, dropping the
frames after it. Here each request is parsed by `_parse`, which turns a frame that does
not parse into an `Undecodable` marker: a unary call is refused with INVALID_ARGUMENT, and
ModelStreamInfer answers that frame with an error reply and reads on. Bad input is logged
as one warning line, without traceback, at most once per `RateLimitedLog.interval_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from inference import grpc_service_pb2 as pb
from modelplane.kernel.errors import InvalidArgument
from modelplane.kernel.logs import RateLimitedLog

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

log = logging.getLogger("modelplane.inference.wire")


bad_input_log = RateLimitedLog(log)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request frame that is not a valid message of its type."""

    type_name: str
    size: int

    @property
    def message(self) -> str:
        return f"the request ({self.size} bytes) could not be decoded as {self.type_name}"


def _parse(message_type: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Undecodable:
        try:
            return message_type.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError):
            bad_input_log.warning("undecodable %s (%d bytes) refused", name, len(data))
            return Undecodable(name, len(data))

    return parse


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.message)
        return await behavior(request, context)

    return handler


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    """Registers every GRPCInferenceService method of `servicer` (an
    InferenceServicer) with the parsing above. Only the unary methods are wrapped; the
    stream method (ModelStreamInfer) meets `Undecodable` frames itself."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        behavior = getattr(servicer, method.name)
        parse = _parse(request_type)
        serialize = response_type.SerializeToString
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behavior, request_deserializer=parse, response_serializer=serialize
            )
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behavior), request_deserializer=parse, response_serializer=serialize
            )
        else:  # the service has no such method today; one added later fails loudly
            raise TypeError(f"{method.full_name}: half-streaming methods are not wrapped")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
