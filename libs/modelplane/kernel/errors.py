"""Domain errors, and the one place that turns them into gRPC status codes.

Domain code raises these without knowing about gRPC; the error interceptor maps
them. Their message is written for the caller and is sent as the status details.
Anything else that escapes a handler is an internal error: the caller gets an
opaque message with an incident id, the log gets the traceback.
"""

from __future__ import annotations

import logging
import uuid

import grpc

log = logging.getLogger("modelplane.errors")


class ModelplaneError(Exception):
    """Base of every error a caller is meant to see."""

    code = grpc.StatusCode.UNKNOWN
    retry_after_ms: int | None = None
    """Set: how long the caller should wait before retrying, sent as gRPC's standard
    `grpc-retry-pushback-ms` trailer (see `trailers_for`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ModelplaneError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ModelplaneError):
    """The request itself is wrong, whatever the state of the system."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(ModelplaneError):
    """Creating something whose name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(ModelplaneError):
    """A concurrent change won (compare-and-set lost); retrying may succeed."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ModelplaneError):
    """The system is not in a state that allows this (e.g. a missing approval)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(ModelplaneError):
    """A bounded queue is full: rejected at once so the caller can back off
    (`retry_after_ms`: for how long, when the service can tell)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class ResourceExhausted(ModelplaneError):
    """A per-caller or per-request limit was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ModelplaneError):
    """A dependency (database, cache, another service) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ModelplaneError):
    """The caller's deadline passed before the work could be done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ModelplaneError):
    """The caller went away before the work could be done."""

    code = grpc.StatusCode.CANCELLED


class PermissionDenied(ModelplaneError):
    """The authenticated caller may not do this (e.g. approve their own upload)."""

    code = grpc.StatusCode.PERMISSION_DENIED


# The message travels in the grpc-message trailer: past gRPC's metadata limit (8 KiB by
# default) the call fails on the client with another code (often RESOURCE_EXHAUSTED),
# so a message echoing a huge request field is cut well below it.
MAX_STATUS_MESSAGE_BYTES = 1024
_TRUNCATED = " [truncated]"


def bounded_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes, marked when cut."""
    encoded = message.encode()
    if len(encoded) <= limit:
        return message
    keep = limit - len(_TRUNCATED)
    return encoded[:keep].decode(errors="ignore") + _TRUNCATED


MAX_ECHOED_CHARS = 64


def clip(value: object, limit: int = MAX_ECHOED_CHARS) -> str:
    """`value` as text for a message, cut to `limit` characters (marked with "…" and the
    full length when cut): messages name what the caller sent, and a caller may send a
    name of any length. Control characters are escaped so a message stays one line."""
    text = str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")[:limit]
    return f"{text}…({len(str(value))} chars)" if cut else text


RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""gRPC's trailer telling a client when to retry (gRFC A6); gRPC's own retry policy
honours it, and so do modelplane's clients."""


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata an error is answered with: its retry hint, if any."""
    retry_after_ms = getattr(exc, "retry_after_ms", None)
    if isinstance(exc, ModelplaneError) and retry_after_ms is not None:
        return ((RETRY_PUSHBACK_KEY, str(max(0, int(retry_after_ms)))),)
    return ()


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and caller-safe message for an exception raised by a handler."""
    if isinstance(exc, ModelplaneError):
        return exc.code, bounded_message(exc.message)
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s (incident %s)", method or "handler", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident})"
