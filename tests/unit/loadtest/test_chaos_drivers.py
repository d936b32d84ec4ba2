"""The chaos harness's closed-loop callers wait out a rejection's retry hint, as the
clients we ship do, instead of resending at once (which turned a few rejections into a
storm of them that held a one-CPU service busy refusing)."""

from __future__ import annotations

import grpc

from modelplane.kernel.errors import RETRY_PUSHBACK_KEY
from modelplane.loadtest.chaos.calls import retry_after_s
from modelplane.loadtest.chaos.drivers import closed_loop_for


def _rejection(hint: str | None) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata(*([(RETRY_PUSHBACK_KEY, hint)] if hint is not None else []))
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailers, "overloaded"
    )


def test_the_retry_hint_is_read_from_the_trailer() -> None:
    assert retry_after_s(_rejection("250")) == 0.25
    assert retry_after_s(_rejection(None)) is None
    assert retry_after_s(_rejection("soon")) is None


async def test_closed_loop_callers_wait_out_the_hint_before_resending() -> None:
    async def refused() -> object:
        raise _rejection("400")

    calls, _elapsed = await closed_loop_for(refused, concurrency=2, duration_s=0.5)

    # Each caller: a call at once, then one after the 0.4 s hint, then the window is
    # over. Resending at once, they made thousands.
    assert 2 <= len(calls) <= 4
    assert {call.code for call in calls} == {"UNAVAILABLE"}
    assert {call.retry_after_s for call in calls} == {0.4}


async def test_a_hint_longer_than_the_window_ends_the_caller_with_the_window() -> None:
    async def refused() -> object:
        raise _rejection("30000")

    calls, elapsed = await closed_loop_for(refused, concurrency=1, duration_s=0.2)

    assert len(calls) == 1
    assert elapsed < 15  # not the 30 s the hint asked for


async def test_after_a_failure_without_a_hint_callers_pause_briefly() -> None:
    attempts = 0

    async def failing() -> object:
        nonlocal attempts
        attempts += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom"
        )

    calls, _elapsed = await closed_loop_for(failing, concurrency=1, duration_s=0.2)

    assert len(calls) == attempts
    assert attempts <= 0.2 / 0.02 + 1  # PAUSE_AFTER_FAILURE_S between attempts
    assert calls[0].detail == "boom" and calls[0].retry_after_s is None
