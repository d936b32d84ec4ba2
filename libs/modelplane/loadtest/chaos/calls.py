"""What the chaos harness records about each call it makes, and how calls are told
apart: accepted (OK), rejected (a status a service chooses to shed load or to refuse
calls while it stops: RESOURCE_EXHAUSTED, UNAVAILABLE) or failed (anything else,
DEADLINE_EXCEEDED and CANCELLED included: the caller got no answer it can act on)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from modelplane.kernel.errors import RETRY_PUSHBACK_KEY
from modelplane.loadtest.stats import percentile

OK = "OK"
REJECTION_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})

# Every channel the harness opens: its own connection, no transparent retries (every
# failure is counted as the service gave it), and reconnects after a restart within a
# quarter second instead of grpc's default backoff of 1 s growing to 2 min, so the
# time to recover measures the service, not the client's backoff.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
]


def channel(address: str, index: int = 0) -> grpc.aio.Channel:
    """A plaintext channel with its own connection (`index` keeps channels apart)."""
    return grpc.aio.insecure_channel(
        address, options=[*CHANNEL_OPTIONS, ("modelplane.chaos.channel", index)]
    )


def code_of(error: BaseException) -> str:
    """A status code name, or the exception's type for errors that carry none."""
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return str(error.code().name)
    return type(error).__name__


@dataclass(frozen=True)
class Call:
    """One call: when it was sent and answered (time.monotonic) and its status name."""

    sent: float
    done: float
    code: str
    detail: str = ""
    """The status message of a failed call (not kept for OK and rejections)."""
    retry_after_s: float | None = None
    """A rejection's retry hint (the grpc-retry-pushback-ms trailer), when it gave one."""

    @property
    def latency_s(self) -> float:
        return self.done - self.sent


@dataclass
class Tally:
    """Calls counted by outcome."""

    sent: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)

    def add(self, code: str) -> None:
        self.sent += 1
        if code == OK:
            self.accepted += 1
        elif code in REJECTION_CODES:
            self.rejected[code] += 1
        else:
            self.failed[code] += 1

    @classmethod
    def of(cls, calls: Iterable[Call]) -> Tally:
        tally = cls()
        for call in calls:
            tally.add(call.code)
        return tally

    @property
    def codes(self) -> dict[str, int]:
        """Every outcome by status name, OK included."""
        counts = {OK: self.accepted} if self.accepted else {}
        counts.update(self.rejected)
        counts.update(self.failed)
        return counts


def retry_after_s(error: grpc.aio.AioRpcError) -> float | None:
    """The retry hint a rejection carries (gRFC A6's trailer), in seconds."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(0, int(value)) / 1e3
            except (TypeError, ValueError):
                return None
    return None


def latency_ms(calls: Sequence[Call], q: float) -> float:
    """The q-th percentile (nearest rank) of the calls' latencies, in ms; NaN if none."""
    if not calls:
        return math.nan
    return percentile([call.latency_s for call in calls], q) * 1e3


def format_codes(codes: Mapping[str, int]) -> str:
    """`UNAVAILABLE 12, DEADLINE_EXCEEDED 3` (largest first), `0` when empty."""
    if not codes or not any(codes.values()):
        return "0"
    ordered = sorted(codes.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} {count}" for name, count in ordered if count)


def failure_details(calls: Iterable[Call], limit: int = 3) -> str:
    """The most frequent failure messages, `CODE "message" xN; ...` (empty if none)."""
    counts = Counter((call.code, call.detail) for call in calls if call.detail)
    return "; ".join(
        f'{code} "{detail}" x{count}' for (code, detail), count in counts.most_common(limit)
    )
