"""Property-based fuzzing of a running service: the RPC list, the request strategies, the
raw calls and the property every answer must satisfy.

Each service module (tests/fuzz/test_<service>.py) starts one real server on port 0 and
hands its service descriptor to `fuzz_cases`; every RPC the descriptor declares is fuzzed
three ways, so an RPC added to a proto is fuzzed without touching the tests:

- `bytes`: random bytes as the serialized request (frames, for a client stream), sent
  through a raw channel method with no serializer, so undecodable messages reach the
  server;
- `fields`: structurally valid messages with random field values (empty, huge, unicode
  and control-character strings, NaN/inf, extreme integers, unknown enum numbers, long
  repeated fields, nested messages), strings mixed with names the server knows so calls
  get past "not found";
- `mutated`: a valid message's bytes with bits flipped, bytes inserted, cut or repeated.

The property (`check_answer`): the call ends OK or with one of `ALLOWED`, never INTERNAL
or UNKNOWN; its status message is at most `MAX_DETAILS_BYTES`; and no call hangs. After
a run each module checks that the server still answers a normal call and its health
check, and that the test process's RSS (the servers run in it) grew by less than
`MAX_RSS_GROWTH_BYTES`.

The inference service (GRPCInferenceService) gets its module, tests/fuzz/test_inference.py,
from its own owners: the same fixture shape over a repository of small ONNX models, plus
tensor-aware strategies (shapes, datatypes, raw contents that disagree with them).

`MODELPLANE_FUZZ_EXAMPLES` is the number of cases per service (default 600, a few
seconds; `make fuzz` runs 12,000): spread evenly over its RPCs and the three kinds.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CASES_PER_SERVICE = int(os.environ.get("MODELPLANE_FUZZ_EXAMPLES", "600"))
KINDS = ("bytes", "fields", "mutated")

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# A server stream that is valid may stay open (a watch): the fuzzer reads a few replies
# and then cancels it, or lets its short deadline end it.
STREAM_ENDINGS = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_DETAILS_BYTES = 1024
MAX_RSS_GROWTH_BYTES = 300 * 2**20
UNARY_DEADLINE_S = 15.0
STREAM_DEADLINE_S = 0.1
STREAM_REPLIES_READ = 3


@dataclass(frozen=True)
class Rpc:
    path: str  # /package.Service/Method
    method: d.MethodDescriptor
    request: type[Message]

    @property
    def name(self) -> str:
        return self.method.name


def rpcs(service: d.ServiceDescriptor) -> list[Rpc]:
    """Every method of `service`, with its request message class."""
    return [
        Rpc(f"/{service.full_name}/{m.name}", m, GetMessageClass(m.input_type))
        for m in service.methods
    ]


def examples_per_test(service: d.ServiceDescriptor) -> int:
    return max(1, math.ceil(CASES_PER_SERVICE / (len(service.methods) * len(KINDS))))


def fuzz_settings(service: d.ServiceDescriptor) -> settings:
    return settings(
        max_examples=examples_per_test(service),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        print_blob=True,
    )


# ---- strategies -------------------------------------------------------------------------

_EDGE_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63)]
_EDGE_FLOATS = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324]
_INT_RANGES = {
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_MAX_REPEATED = 40
_MAX_LONG_REPEATED = 5_000
_MAX_DEPTH = 4
_MAX_NESTED_REPEATED = (8, 4, 2, 2, 1)
_TEXT = (d.FieldDescriptor.CPPTYPE_STRING,)


def names(known: Sequence[str]) -> st.SearchStrategy[str]:
    """Strings for name-like fields: names the server knows (so a call reaches its
    logic), near misses, empty, unicode with control characters, and huge ones."""
    pieces: list[st.SearchStrategy[str]] = [
        st.text(max_size=24),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=64),
        st.sampled_from(["", " ", ".", "..", "../x", "/etc/passwd", "\x00", "a" * 300]),
        st.integers(1, 100_000).map(lambda n: "x" * n),
        st.text(alphabet="abc-_./:\\\x00\n\u202e\U0001f600", min_size=1, max_size=8),
    ]
    if known:
        pieces.insert(0, st.sampled_from(list(known)))
        pieces.insert(1, st.sampled_from(list(known)).map(lambda s: s + "\x00"))
    return st.one_of(*pieces)


def _scalar(field: d.FieldDescriptor, known: Sequence[str]) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.one_of(
            st.sampled_from([v for v in _EDGE_INTS if low <= v <= high]),
            st.integers(-3, 40).filter(lambda v: low <= v <= high),
            st.integers(low, high),
        )
    if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        width = 64 if t == d.FieldDescriptor.TYPE_DOUBLE else 32
        return st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(width=width))
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == d.FieldDescriptor.TYPE_STRING:
        return names(known)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.integers(0, 100_000).map(lambda n: b"\xff" * n))
    if t == d.FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field type {t} of {field.full_name}")


def messages(
    descriptor: d.Descriptor, known: Sequence[str] = (), depth: int = 0
) -> st.SearchStrategy[Message]:
    """Valid messages of `descriptor`'s type: any subset of fields set, each to a random
    (often hostile) value; nesting bounded by `_MAX_DEPTH`, repeated fields by
    `_MAX_REPEATED` (scalars sometimes by thousands)."""
    cls = GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return _timestamps()

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            _set_field(draw, message, field, known, depth)
        return message

    return build()


# Year 1 and year 9999 (the valid range's ends), and the epoch's neighbourhood.
_EDGE_SECONDS = [-62_135_596_800, 253_402_300_799, 0, -1, 1, 1_700_000_000, 4_102_444_800]


def _timestamps() -> st.SearchStrategy[Message]:
    """Timestamps at and past the valid range's ends (a plain int64 would nearly always
    be out of range, and the valid extremes are the interesting ones)."""
    seconds = st.one_of(
        st.sampled_from(_EDGE_SECONDS),
        st.integers(-62_135_596_800, 253_402_300_799),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(
        st.sampled_from([0, 999_999_999, -1, 1_000_000_000]), st.integers(-(2**31), 2**31 - 1)
    )
    return st.builds(Timestamp, seconds=seconds, nanos=nanos)


def _value(
    field: d.FieldDescriptor, known: Sequence[str], depth: int
) -> st.SearchStrategy[Any] | None:
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        if depth >= _MAX_DEPTH:
            return None
        return messages(field.message_type, known, depth + 1)
    return _scalar(field, known)


def _set_field(
    draw: st.DrawFn,
    message: Message,
    field: d.FieldDescriptor,
    known: Sequence[str],
    depth: int,
) -> None:
    container = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        keys = draw(st.lists(_scalar(key_field, known), max_size=8))
        for key in keys:
            value = _value(value_field, known, depth)
            if value is None:
                continue
            if value_field.type == d.FieldDescriptor.TYPE_MESSAGE:
                container[key].CopyFrom(draw(value))
            else:
                container[key] = draw(value)
        return
    value = _value(field, known, depth)
    if value is None:
        return
    if field.is_repeated:
        if field.type == d.FieldDescriptor.TYPE_MESSAGE:
            # Few nested messages per level: lists of lists of... grow exponentially.
            container.extend(draw(st.lists(value, max_size=_MAX_NESTED_REPEATED[depth])))
            return
        items = draw(st.lists(value, max_size=_MAX_REPEATED))
        # Sometimes thousands of numbers (not of strings: each may be huge already).
        if items and field.cpp_type not in _TEXT and draw(st.integers(0, 9)) == 0:
            items = items * draw(st.integers(1, _MAX_LONG_REPEATED // len(items)))
        container.extend(items)
        return
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        container.CopyFrom(draw(value))
    else:
        setattr(message, field.name, draw(value))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Message]) -> bytes:
    """A valid message's bytes, damaged a few times over."""
    data = bytearray(draw(valid).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "repeat", "varint"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        elif op == "repeat":
            data += data[at:]
        elif op == "varint":
            # A huge length or value where the parser expects a small one.
            data[at:at] = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    return bytes(data)


def requests(rpc: Rpc, kind: str, known: Sequence[str]) -> st.SearchStrategy[list[bytes]]:
    """Serialized request frames for one call: one for a unary request, 0..4 for a
    client stream."""
    valid = messages(rpc.request.DESCRIPTOR, known)
    frame: st.SearchStrategy[bytes]
    if kind == "bytes":
        frame = st.binary(max_size=512)
    elif kind == "fields":
        frame = valid.map(lambda m: m.SerializeToString())
    else:
        frame = mutated(valid)
    if rpc.method.client_streaming:
        return st.lists(frame, max_size=4)
    return frame.map(lambda f: [f])


# ---- calls and the property -------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    replies: int


def call_raw(channel: grpc.Channel, rpc: Rpc, frames: list[bytes]) -> Answer:
    """Sends `frames` as the request(s) of `rpc`, unserialized; reads replies as bytes."""
    m = rpc.method
    try:
        if not m.client_streaming and not m.server_streaming:
            unary = channel.unary_unary(rpc.path)
            unary(frames[0], timeout=UNARY_DEADLINE_S)
            return Answer(grpc.StatusCode.OK, "", 1)
        if m.client_streaming and not m.server_streaming:
            upload = channel.stream_unary(rpc.path)
            upload(iter(frames), timeout=UNARY_DEADLINE_S)
            return Answer(grpc.StatusCode.OK, "", 1)
        if m.server_streaming and not m.client_streaming:
            call = channel.unary_stream(rpc.path)(frames[0], timeout=STREAM_DEADLINE_S)
        else:
            call = channel.stream_stream(rpc.path)(iter(frames), timeout=STREAM_DEADLINE_S)
        return _read_stream(call)
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "", 0)


def _read_stream(call: Any) -> Answer:
    replies = 0
    try:
        for _ in call:
            replies += 1
            if replies >= STREAM_REPLIES_READ:
                call.cancel()
                return Answer(grpc.StatusCode.CANCELLED, "", replies)
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "", replies)
    return Answer(grpc.StatusCode.OK, "", replies)


# Answers seen per (method, code): printed after each module's run (pytest -s shows it),
# to see that the fuzzed calls reach the services' logic and not only their parsers.
TALLY: Counter[tuple[str, str]] = Counter()


def tally_report(service: d.ServiceDescriptor) -> str:
    lines = []
    for method in service.methods:
        codes = sorted((code, n) for (name, code), n in TALLY.items() if name == method.name)
        lines.append(f"{method.name}: " + ", ".join(f"{code} {n}" for code, n in codes))
    return "\n".join(lines)


def check_answer(rpc: Rpc, answer: Answer) -> None:
    TALLY[rpc.name, answer.code.name] += 1
    allowed = ALLOWED | STREAM_ENDINGS if rpc.method.server_streaming else ALLOWED
    assert answer.code in allowed, f"{rpc.name}: {answer.code.name} {answer.details!r}"
    size = len(answer.details.encode())
    assert size <= MAX_DETAILS_BYTES, f"{rpc.name}: status message of {size} bytes"


def fuzz_cases(service: d.ServiceDescriptor) -> list[tuple[Rpc, str]]:
    """(rpc, kind) for every method of `service` and every kind: the test parameters."""
    return [(rpc, kind) for rpc in rpcs(service) for kind in KINDS]


def case_id(case: tuple[Rpc, str]) -> str:
    return f"{case[0].name}-{case[1]}"


def proper_status_test(service: d.ServiceDescriptor) -> Callable[..., None]:
    """The property over every case of `service`, for its module to bind as
    `test_every_answer_is_a_proper_status` (it uses the module's `target` fixture). Keep
    that name: hypothesis keys each case's saved examples by the pytest node id."""

    @pytest.mark.parametrize("case", fuzz_cases(service), ids=case_id)
    @fuzz_settings(service)
    @given(data=st.data())
    def test_every_answer_is_a_proper_status(
        target: FuzzTarget, case: tuple[Rpc, str], data: st.DataObject
    ) -> None:
        rpc, kind = case
        frames = data.draw(target.frames_of(rpc, kind), label="frames")
        check_answer(rpc, call_raw(target.channel, rpc, frames))

    return test_every_answer_is_a_proper_status


# ---- after the run ----------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def assert_healthy(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class FuzzTarget:
    """A running server under fuzzing: its channel, the names it knows, RSS at start."""

    channel: grpc.Channel
    known: list[str]
    rss_at_start: int

    def frames_of(self, rpc: Rpc, kind: str) -> st.SearchStrategy[list[bytes]]:
        return requests(rpc, kind, self.known)


def open_target(address: str, known: Sequence[str]) -> Iterator[FuzzTarget]:
    with grpc.insecure_channel(address) as channel:
        yield FuzzTarget(channel, list(known), rss_bytes())
