import grpc
import pytest

from modelplane.kernel import errors


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound("model 'x' not found"), grpc.StatusCode.NOT_FOUND),
        (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.Conflict("held by v3"), grpc.StatusCode.ABORTED),
        (errors.FailedPrecondition("needs approval"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Overloaded("Exceeds maximum queue size"), grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("redis down"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED),
    ],
)
def test_domain_errors_map_to_their_status_and_keep_their_message(exc, code):
    assert errors.status_for(exc) == (code, exc.message)


def test_unexpected_errors_are_internal_and_opaque(caplog):
    code, message = errors.status_for(KeyError("secret-table-name"), "/svc/Method")
    assert code is grpc.StatusCode.INTERNAL
    assert "secret-table-name" not in message
    assert message.startswith("internal error (incident ")
    # The operator still gets the traceback, tied to the incident id the caller saw.
    incident = message.split()[-1].rstrip(")")
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)


def test_status_messages_are_bounded_below_the_metadata_limit():
    # A message echoing a huge request field would overflow gRPC's metadata limit and
    # reach the caller as another error; it is cut instead, on a character boundary.
    for text in ("x" * 10_000, "é" * 10_000):
        code, message = errors.status_for(errors.InvalidArgument(text))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert len(message.encode()) <= errors.MAX_STATUS_MESSAGE_BYTES
        assert message.endswith(" [truncated]")
        assert text.startswith(message.removesuffix(" [truncated]"))
    short = "x" * errors.MAX_STATUS_MESSAGE_BYTES
    assert errors.status_for(errors.NotFound(short)) == (grpc.StatusCode.NOT_FOUND, short)
