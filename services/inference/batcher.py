"""The dynamic batcher: one bounded row queue per model version on the event loop, one
thread per runtime instance.

Why the queue lives on the event loop: handlers are coroutines, so a request waiting for
its batch costs an asyncio future, not a blocked thread. Handing a batch to an instance
thread and its result back are two thread switches per *batch*; the thread-per-request
server this replaced paid about ten context switches (GIL handoffs between handler
threads) per *request*, which was most of its CPU (measured, see the inference issue).

- An idle instance takes what is queued at once: a lone request at low load runs
  without any added delay, and requests that arrive while every instance is busy form
  the next batch.
- Only an instance that came free with work already waiting - the sign of load - holds a
  short batch back, until a preferred batch size can be formed or its oldest request has
  waited `max_queue_delay_s`; a batch then takes up to the largest preferred size.
  A hold also ends early once every caller is waiting on it: when as many rows are
  queued and running as the callers lately had in flight at most (with 8 closed-loop
  clients, when all 8 are here), since no more can be on their way. A long delay thus
  costs little at moderate load and buys full batches at high load, where each request
  a batch adds saves per-batch work on the instance thread and the event loop. (The
  event loop's timers have millisecond granularity, so a sub-millisecond delay can last
  up to a millisecond when nothing else wakes the loop.)
- A batch that starts as the only work of the process, while callers keep about one
  request in flight, is marked alone (`running_alone`): the runtime may lend it the
  event loop's CPU, which is idle meanwhile.
- Batches count rows, not requests: a request of 5 rows takes 5 slots, in the queue
  bound and in the batch. Requests whose inputs differ in a variable non-batch
  dimension carry different `shape_key`s and never share a batch.
- Admission: a request is rejected at once (Overloaded, UNAVAILABLE, with a retry hint)
  when its rows do not fit in the queue, when the rows ahead of it (queued and running)
  would take longer than `max_queue_wait_s` at the rate recent batches ran at, or could
  not be computed before its deadline. A rejection costs the
  caller a round trip instead of a wait ending in DEADLINE_EXCEEDED, and costs the
  server no compute for an answer nobody would read. The estimate can be wrong (the
  first batches of a flood run slower than those it was learned from), so a request
  still queued once it has waited past the bound is refused then, as Triton's queue
  timeout does: the bound holds for every request that runs. While even a 1-row
  request would be refused (`refuses_any`), the service refuses calls before reading
  their body.
- A request whose deadline passed or whose caller went away is dropped before it runs.
  When a batch fails in the runtime, each of its requests is retried alone so one bad
  request fails alone.

Everything but `_Instance._run` runs on the event loop thread, so the queue needs no
lock; ONNX Runtime releases the GIL while it computes, so instances run in parallel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modelplane.kernel.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ModelplaneError,
    Overloaded,
    Unavailable,
)

log = logging.getLogger("modelplane.inference.batcher")

Tensors = Mapping[str, np.ndarray]
Runner = Callable[[Tensors], dict[str, np.ndarray]]
"""Runs one batch on one runtime instance: inputs stacked on axis 0 → all outputs."""

_batch_ids = itertools.count(1)
_running = threading.local()


def running_batch() -> Sequence[PendingRequest]:
    """The batch the calling instance thread is running (empty elsewhere): a runner that
    calls another service uses it to carry its callers' trace context along."""
    return getattr(_running, "batch", ())


def running_alone() -> bool:
    """Whether the batch the calling instance thread runs was, when it started, the only
    work of its event loop (so of a serving process): no other batch running in any
    batcher, nothing queued behind it, and its callers lately keeping about one request
    in flight. A runner may then spread it over CPUs that otherwise serve the event loop
    (OrtRuntime's lone-batch session): nothing else is waiting for them."""
    return getattr(_running, "alone", False)


_batches_running: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = (
    weakref.WeakKeyDictionary()
)
"""Batches running per event loop, over every batcher on it (a server has one loop)."""

ALONE_USUAL_ROWS = 1.5
"""A batch can be alone only while the rows in flight that arrivals lately found (the
batcher's usual rows, itself included) average below this: about one caller at a time.
With more, the next request is likely to arrive while the batch runs, and the event loop
then needs the CPUs a lone batch would borrow (at 64 closed-loop callers, lending them to
every batch that happened to start alone made batches smaller and slower, measured)."""
USUAL_GAIN = 0.01
"""Weight of each arrival in the usual rows in flight: it follows the last ~100."""


DEFAULT_MAX_QUEUE_DELAY_US = 0
"""The batching delay under load of a model whose config.pbtxt sets none: none, as in
Triton. A delay steadies closed-loop throughput: without it, at 64 closed-loop callers the
heavy demo MLP settled at each start on a mean batch anywhere from 6 to 26 rows and stayed
there, so throughput and CPU per request swung 1.1-1.4x from one start to the next (issue
19); with 2 ms, batches of ~20-26 rows in every start and CPU per request within
1.03-1.10x. But independent (open-loop) callers pay for it: at 1,500 requests a second
the heavy MLP's p50 went from ~1.7 ms to ~3.2 ms, since a short batch then waits out the
delay. Gating the hold on the instances being busy (>= 70% or 85% of their time) cost
open-loop latency less but brought the small batches back at c=64. So it stays opt-in
(`--max-queue-delay-us`), for closed-loop or batch-heavy callers; see the README. (Later
measured: at c=64 on 2 CPUs the event loop is the bottleneck and the batcher sees only
the requests it has decoded, so batch sizes follow the loop's speed rather than set it; a
hold for the callers' usual share, half the rows usually in flight for at most a batch's
time or 3-5 ms, left the spread between starts as it was.)"""
DEFAULT_MAX_QUEUE_WAIT_S = 0.0
"""Off by default, as Triton's queue timeout is. Set (e.g. 0.1 s), the queue is kept short
in time, not only in rows: 1,024 queued rows of the heavy demo MLP are ~0.7 s of work, so
without it every admitted request waits that long under overload, while with it admitted
requests keep about the latency they have at capacity. Not on by default because the
rate it divides by comes from recent batches: after a quiet spell (small, slow-per-row
batches) it underestimates what large batches drain, and a sudden burst of a few dozen
calls on a cold server was refused (measured on the heavy model, 64 concurrent calls)."""


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    """How a model version's queue forms batches."""

    enabled: bool = True
    """False: every request runs alone on a free instance."""
    max_batch_size: int = 64
    """Most rows in one batch (and in one request); 0 for a model that cannot batch."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes (rows) to aim for; the largest caps a batch formed from many requests."""
    max_queue_delay_s: float = 0.0
    """Under load, how long past its oldest request's arrival a short batch may wait."""
    max_queue_rows: int = 1024
    """Rows waiting at most; beyond it requests are rejected at once."""
    max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S
    """Longest expected wait a request is admitted to (0: no bound but the deadline's
    and the queue's); never less than two 1-row batches' time (see `refusal`)."""
    peak_window_s: float = 0.5
    """How long the most rows in flight at once is remembered (for two windows), so a
    hold adapts within a second when fewer callers remain."""

    @property
    def target_rows(self) -> int:
        """The most rows a batch formed from several requests takes."""
        limit = max(self.max_batch_size, 1)
        if self.preferred_batch_sizes:
            return min(max(self.preferred_batch_sizes), limit)
        return limit

    @property
    def enough_rows(self) -> int:
        """Rows that make a batch worth running at once, as in Triton: any preferred
        size that can be formed (the smallest), else a full batch. Holding out for the
        largest preferred size instead would stall closed-loop clients fewer than it."""
        limit = max(self.max_batch_size, 1)
        if self.preferred_batch_sizes:
            return min(min(self.preferred_batch_sizes), limit)
        return limit


class PendingRequest:
    """One request travelling through the batcher; its caller awaits `future`."""

    __slots__ = (
        "batch_id",
        "batch_rows",
        "deadline",
        "enqueued_ns",
        "error",
        "finished_ns",
        "future",
        "inputs",
        "outputs",
        "received_ns",
        "rows",
        "shape_key",
        "started_ns",
        "tag",
    )

    def __init__(
        self,
        inputs: Tensors,
        rows: int,
        shape_key: Hashable = None,
        deadline: float | None = None,
        received_ns: int = 0,
        tag: object = None,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.shape_key = shape_key
        self.deadline = deadline  # time.monotonic() value
        self.received_ns = received_ns or time.perf_counter_ns()
        self.enqueued_ns = 0
        self.started_ns = 0
        self.finished_ns = 0
        self.batch_id = 0
        self.batch_rows = 0
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.future: asyncio.Future[dict[str, np.ndarray]] | None = None
        self.tag = tag  # opaque to the batcher (the caller's trace context)


class BatchObserver(Protocol):
    """Receives what the batcher did, for statistics, metrics and traces."""

    def batch_done(
        self,
        batch: Sequence[PendingRequest],
        rows: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None: ...

    def request_dropped(self, request: PendingRequest, reason: str) -> None: ...

    def request_failed(self, request: PendingRequest, reason: str) -> None: ...

    def request_rejected(self, request: PendingRequest, reason: str) -> None: ...


class NullObserver:
    def batch_done(
        self,
        batch: Sequence[PendingRequest],
        rows: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        pass

    def request_dropped(self, request: PendingRequest, reason: str) -> None:
        pass

    def request_failed(self, request: PendingRequest, reason: str) -> None:
        pass

    def request_rejected(self, request: PendingRequest, reason: str) -> None:
        pass


class Unloading(Unavailable):
    """The batcher closed between the caller's model lookup and its submit."""


class Rejected(Overloaded):
    """Refused at submit: `reason` is one of REJECT_REASONS; `retry_after_ms` is the time
    the rows ahead would take (sent as `grpc-retry-pushback-ms`)."""

    def __init__(self, message: str, reason: str, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms)
        self.reason = reason


REJECT_REASONS = ("queue_full", "queue_wait", "deadline", "queue_timeout")
DEFAULT_RETRY_AFTER_MS = 100
"""The retry hint before any batch has finished (no service rate known yet)."""
MAX_RETRY_AFTER_MS = 10_000


class ServiceRate:
    """How long a batch holds an instance, as a line in its rows (t = fixed + per_row x
    rows) fitted to recent batches: decayed sums, each batch timed from the event loop's
    hand-off to the loop taking the result back (under load the loop's own delays are
    part of what draining the queue costs).

    A line, not one rows-per-second figure: a batch's time is far from proportional to
    its rows (the heavy demo MLP: 1 row in 1.5 ms, 64 in 12.6 ms; a 4x wider one 7.9 ms
    and 47 ms). Rows ahead divided by the rate of recent 1-row batches said 16 queued
    rows were 126 ms of work when they were one 19 ms batch: with a 100 ms queue-wait
    bound every request past the first few was refused, so batches stayed small and the
    estimate stayed wrong (27 requests a second served, against ~800 possible).

    While recent batches are all about one size, or larger ones took less time (noise: a
    small batch that waited for a busy CPU), there is no line to fit. A smaller batch is
    then taken to last as long as they did, and a larger one longer in proportion to its
    rows: no batch takes longer, whatever the line, as long as neither of its terms is
    negative. Taking any batch to last as long as recent ones, as before, was wrong at
    5x overload on one CPU: the batches settled at 21 rows (100 ms), 64 rows were
    admitted as 100 ms of work and took 215 ms, and the next 64 240 ms (p99 2.9x the
    at-capacity one); after a 1-row batch took 141 ms, 64 rows were taken as 61 ms and
    took 252. Proportional for every size was wrong the other way (after 1-row batches
    of 8 ms, 16 rows as 128 ms of work when they were one 9 ms batch: under a 100 ms
    bound the batches stayed small and the estimate wrong, 27 requests a second served
    of ~800); taken so only above the usual size, the bound still admits batches larger
    than it whenever they took less than the bound, and those give the sizes that fit a
    line. (Keeping the last line fitted, scaled, does not help: a decayed fit drifts
    flat as the sizes gather around one.)"""

    __slots__ = ("_b", "_bb", "_bt", "_fixed", "_per_row", "_t", "_usual", "_w")

    DECAY = 0.9
    """Weight kept by the past at each batch: the estimate follows ~10 batches, so one
    batch stalled by a busy CPU does not make the queue look hopeless."""

    def __init__(self) -> None:
        self._w = 0.0  # decayed count of batches
        self._b = 0.0  # ... sum of their rows
        self._t = 0.0  # ... sum of their seconds
        self._bb = 0.0  # ... sum of rows squared
        self._bt = 0.0  # ... sum of rows x seconds
        self._fixed = 0.0  # the line, fitted once per batch (admission reads it per call)
        self._per_row = 0.0
        self._usual = 0.0  # the size of recent batches while there is no line (0: a line)

    def add(self, rows: int, ns: int) -> None:
        if rows <= 0 or ns <= 0:
            return
        seconds = ns / 1e9
        d = self.DECAY
        self._w = self._w * d + 1
        self._b = self._b * d + rows
        self._t = self._t * d + seconds
        self._bb = self._bb * d + rows * rows
        self._bt = self._bt * d + rows * seconds
        self._fit()

    def _fit(self) -> None:
        mean_rows = self._b / self._w
        mean_s = self._t / self._w
        spread = self._bb / self._w - mean_rows * mean_rows  # variance of the sizes
        per_row = 0.0
        if spread >= max(1.0, (0.1 * mean_rows) ** 2):
            per_row = (self._bt / self._w - mean_rows * mean_s) / spread
        if per_row <= 0:  # no line in recent batches: see the docstring
            self._fixed, self._per_row, self._usual = mean_s, 0.0, mean_rows
            return
        fixed = mean_s - per_row * mean_rows
        if fixed < 0:  # noise: no batch takes less than nothing
            fixed, per_row = 0.0, mean_s / mean_rows
        self._fixed, self._per_row, self._usual = fixed, per_row, 0.0

    def batch_time(self, rows: int) -> float | None:
        """Seconds a batch of `rows` would hold an instance (None until one finished)."""
        if self._w <= 0:
            return None
        if self._usual and rows > self._usual:
            return self._fixed * rows / self._usual
        return self._fixed + self._per_row * rows

    def drain_s(self, rows: int, max_batch: int, instances: int) -> float | None:
        """Seconds `instances` take to run `rows` in batches of at most `max_batch` (None
        until a batch finished)."""
        full, rest = divmod(rows, max(1, max_batch))
        whole = self.batch_time(max(1, max_batch))
        if whole is None:
            return None
        partial = self.batch_time(rest) if rest else 0.0
        return (full * whole + (partial or 0.0)) / max(1, instances)


class ExecutionFailed(InvalidArgument):
    """The runtime rejected a well-formed request's values when it ran alone."""


@dataclass(slots=True)
class _Timing:
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


class _Instance:
    """One runtime instance and the thread that runs its batches."""

    def __init__(self, batcher: DynamicBatcher, runner: Runner, index: int) -> None:
        self._batcher = batcher
        self._runner = runner
        self._inbox: queue.SimpleQueue[tuple[list[PendingRequest], bool] | None] = (
            queue.SimpleQueue()
        )
        self.started_ns = 0  # when the event loop handed it its current batch
        self._thread = threading.Thread(
            target=self._run, name=f"batcher-{batcher.name}-{index}", daemon=True
        )
        self._thread.start()

    def start(self, batch: list[PendingRequest], alone: bool) -> None:
        self.started_ns = time.perf_counter_ns()
        self._inbox.put((batch, alone))

    def stop(self) -> None:
        self._inbox.put(None)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        batcher = self._batcher
        if batcher.thread_nice > 0:
            # Below the event loop's priority: under overload the loop, which answers
            # every call (a rejection included), gets the CPU first and the model the
            # rest, so rejections stay fast instead of queueing behind compute (see the
            # README, Overload). Only raised: lowering it again needs privileges.
            try:
                thread = threading.get_native_id()
                # Never below the process's own nice (a privileged process could).
                nice = max(os.getpriority(os.PRIO_PROCESS, thread), batcher.thread_nice)
                os.setpriority(os.PRIO_PROCESS, thread, nice)
            except OSError:
                log.warning("cannot lower the priority of %s's thread", batcher.name)
        # A runner may place the thread that runs it (OrtRuntime: on its model's CPUs).
        prepare = getattr(self._runner, "prepare_thread", None)
        if prepare is not None:
            try:
                prepare()
            except Exception:
                log.exception("runner thread setup failed", extra={"model": batcher.name})
        while (item := self._inbox.get()) is not None:
            batch, _running.alone = item
            timing = _Timing()
            try:
                _execute(batch, self._runner, timing, batcher.name)
            except BaseException as exc:  # never strand a caller, whatever happened
                log.exception("batch execution crashed", extra={"model": batcher.name})
                for request in batch:
                    if request.outputs is None and request.error is None:
                        request.error = exc
            batcher._post(self, batch, timing)


class DynamicBatcher:
    """A bounded row queue in front of `len(runners)` runtime instances.

    `submit`, `infer`, `withdraw` and `close` must be called on the event loop that
    serves the model; the first `submit` binds the batcher to that loop.
    """

    def __init__(
        self,
        name: str,
        runners: Sequence[Runner],
        policy: BatchingPolicy,
        observer: BatchObserver | None = None,
        thread_nice: int = 0,
    ) -> None:
        """`thread_nice`: the nice value of the instance threads (see _Instance._run)."""
        if not runners:
            raise ValueError("a batcher needs at least one runtime instance")
        self.name = name
        self.policy = policy
        self.thread_nice = thread_nice
        self._observer: BatchObserver = observer or NullObserver()
        self._queue: deque[PendingRequest] = deque()
        self._queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._instances = [_Instance(self, runner, i) for i, runner in enumerate(runners)]
        self._idle = list(self._instances)
        self._hold: asyncio.TimerHandle | None = None
        self._running_rows = 0
        # The most rows queued and running at once lately, in this window and the last:
        # how many rows the callers keep in flight. A held batch that reaches it has
        # every caller waiting on it.
        self._peak_rows = 0
        self._last_peak_rows = 0
        self._peak_window_end_ns = 0
        # The rows in flight arrivals lately found (a decayed mean): about one means the
        # callers come one at a time.
        self._usual_rows = 0.0
        self._closing = False
        self._drained: asyncio.Event | None = None
        self.rate = ServiceRate()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def drain_s(self, rows: int) -> float | None:
        """Seconds all instances take to run `rows` in full batches, from recent batches
        (None: unknown)."""
        return self.rate.drain_s(rows, self.policy.target_rows, len(self._instances))

    @property
    def instances(self) -> int:
        return len(self._instances)

    def submit(self, request: PendingRequest) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queues a request and returns the future of its outputs; raises Rejected (an
        Overloaded) at once when its rows do not fit or cannot be reached before its
        deadline, Unloading when the batcher is closing."""
        if self._closing:
            raise Unloading(f"model '{self.name}' is unloading; retry")
        self._admit(request)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        request.future = loop.create_future()
        request.enqueued_ns = time.perf_counter_ns()
        self._queue.append(request)
        self._queued_rows += request.rows
        in_flight = self._queued_rows + self._running_rows
        self._usual_rows += (in_flight - self._usual_rows) * USUAL_GAIN
        if self._hold is not None:
            # An instance is holding a short batch back: go as soon as it is big enough,
            # or once as many rows are here as the callers lately had in flight at most
            # (no more can be on their way).
            if self._queued_rows >= self.policy.enough_rows or in_flight >= self._peak():
                self._release_hold()
        elif self._idle:
            self._dispatch(under_load=False)
        self._note_in_flight(in_flight, request.enqueued_ns)
        return request.future

    def _admit(self, request: PendingRequest) -> None:
        refused = self.refusal(request.rows, request.deadline)
        if refused is not None:
            raise refused

    def refusal(self, rows: int, deadline: float | None) -> Rejected | None:
        """Why a request of `rows` with `deadline` (time.monotonic(); None: none) cannot
        be queued now, or cannot be answered before its deadline: when the rows ahead of
        it and its own, in batches as long as recent ones of their sizes (ServiceRate),
        would take longer than the time it has left. None: it would be admitted."""
        ahead = self._queued_rows + self._running_rows
        wait_s = self.drain_s(ahead)
        retry_ms = _retry_ms(wait_s)
        if self._queued_rows + rows > self.policy.max_queue_rows:
            return Rejected(
                f"Exceeds maximum queue size: model '{self.name}' has "
                f"{self._queued_rows} of {self.policy.max_queue_rows} rows queued; "
                f"retry after {retry_ms} ms",
                "queue_full",
                retry_ms,
            )
        if wait_s is None:
            return None
        bound_s = self.wait_bound_s()
        if bound_s > 0 and wait_s > bound_s:
            return Rejected(
                f"Queue too long: model '{self.name}' has {ahead} rows ahead, about "
                f"{wait_s * 1000:.0f} ms of work (bound {bound_s * 1000:.0f} ms); "
                f"retry after {retry_ms} ms",
                "queue_wait",
                retry_ms,
            )
        if deadline is None:
            return None
        left_s = deadline - time.monotonic()
        done_s = self.drain_s(ahead + rows) or 0.0
        if done_s > left_s:
            return Rejected(
                f"Cannot answer before the deadline: model '{self.name}' has {ahead} rows "
                f"ahead, {done_s * 1000:.0f} ms of work with its own, and the request has "
                f"{max(left_s, 0) * 1000:.0f} ms left; retry after {retry_ms} ms",
                "deadline",
                retry_ms,
            )
        return None

    def wait_bound_s(self) -> float:
        """The queue-wait bound in force (0: none): `max_queue_wait_s`, never below two
        1-row batches' time, so a slow model's one running request does not refuse the
        next. Not two recent batches': under overload those are full and slow (64 rows
        of an MLP 13x the heavy demo's took ~250 ms on half a CPU), and requests then
        waited ~500 ms against a 100 ms bound."""
        bound_s = self.policy.max_queue_wait_s
        if bound_s <= 0:
            return 0.0
        return max(bound_s, 2 * (self.rate.batch_time(1) or 0.0))

    def refuses_any(self) -> int | None:
        """The retry hint (ms) when even a 1-row request without a deadline would be
        refused now (queue full, or past the queue-wait bound); None otherwise, and at
        once while nothing is queued or running: it is asked as each call arrives (the
        service's refusal at the door, main.py)."""
        if not self._queued_rows and not self._running_rows:
            return None
        refused = self.refusal(1, None)
        return None if refused is None else refused.retry_after_ms

    async def infer(self, request: PendingRequest) -> dict[str, np.ndarray]:
        """Submits and waits for the outputs."""
        self.submit(request)
        return await self.outputs(request)

    async def outputs(self, request: PendingRequest) -> dict[str, np.ndarray]:
        """Waits for a submitted request. A caller cancelled while waiting (grpc cancels
        the handler when the client goes away or its deadline passes) withdraws the
        request, so a queued one never runs."""
        assert request.future is not None, "submit() the request first"
        try:
            return await request.future
        except asyncio.CancelledError:
            self.withdraw(request)
            raise

    def withdraw(self, request: PendingRequest, reason: str | None = None) -> None:
        """Gives up on a request: removed if still queued; otherwise its result is ignored."""
        if request.future is not None and not request.future.done():
            request.future.cancel()
        try:
            self._queue.remove(request)
        except ValueError:
            return
        self._queued_rows -= request.rows
        self._drop(request, reason or _stale(request, time.monotonic()) or "cancelled")
        self._check_drained()

    async def close(self) -> None:
        """Stops taking requests; queued ones still run; returns when instances stopped."""
        self._closing = True
        if self._hold is not None:
            self._release_hold()
        if self._queue or len(self._idle) < len(self._instances):
            if self._drained is None:
                self._drained = asyncio.Event()
            await self._drained.wait()
        for instance in self._instances:
            instance.stop()
        await asyncio.to_thread(self._join)

    def close_now(self) -> None:
        """Stops the instance threads of a batcher that never served (a failed load)."""
        self._closing = True
        for instance in self._instances:
            instance.stop()
        self._join()

    def _join(self) -> None:
        for instance in self._instances:
            instance.join()

    # --- forming batches (event loop) -------------------------------------------------

    def _dispatch(self, under_load: bool) -> None:
        while self._idle and self._queue:
            if under_load and self._hold_for_more():
                return
            batch = self._take()
            if batch:
                assert self._loop is not None
                running = _batches_running.get(self._loop, 0)
                alone = running == 0 and not self._queue and self._usual_rows < ALONE_USUAL_ROWS
                _batches_running[self._loop] = running + 1
                self._running_rows += sum(request.rows for request in batch)
                self._idle.pop().start(batch, alone)
        self._check_drained()

    def _hold_for_more(self) -> bool:
        """Whether an instance that came free with requests waiting (the sign of load)
        holds them back for more, scheduling the hold's end if it is a new one: with
        `max_queue_delay_s` (Triton's delay), until a preferred size can be formed, or as
        many rows are here as the callers lately had in flight at most, or the oldest
        request has waited the delay."""
        policy = self.policy
        if (
            not policy.enabled
            or policy.max_queue_delay_s <= 0
            or self._closing
            or self._queued_rows >= policy.enough_rows
            or self._queued_rows + self._running_rows >= self._peak()
        ):
            return False
        if self._hold is not None:
            return True  # already holding; its timer or enough rows release it
        oldest_ns = self._queue[0].enqueued_ns
        wait_s = policy.max_queue_delay_s - (time.perf_counter_ns() - oldest_ns) / 1e9
        if wait_s <= 0:
            return False
        assert self._loop is not None
        self._hold = self._loop.call_later(wait_s, self._release_hold)
        return True

    def _note_in_flight(self, rows: int, now_ns: int) -> None:
        """Counts `rows` in flight at `now_ns` (the submit's perf_counter_ns)."""
        window_ns = int(self.policy.peak_window_s * 1e9)
        if now_ns >= self._peak_window_end_ns:
            # A new window; the last one is remembered only if it just ended.
            recent = now_ns < self._peak_window_end_ns + window_ns
            self._last_peak_rows = self._peak_rows if recent else 0
            self._peak_rows = 0
            self._peak_window_end_ns = now_ns + window_ns
        self._peak_rows = max(self._peak_rows, rows)

    def _peak(self) -> int:
        """The most rows the callers lately had in flight at once."""
        return max(self._peak_rows, self._last_peak_rows)

    def _release_hold(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        self._dispatch(under_load=False)

    def _take(self) -> list[PendingRequest]:
        """Moves the next batch of compatible requests out of the queue."""
        queue_ = self._queue
        cap = self.policy.target_rows if self.policy.enabled else 0
        now = time.monotonic()
        now_ns = time.perf_counter_ns()
        timeout_ns = int(self.wait_bound_s() * 1e9)
        batch: list[PendingRequest] = []
        skipped: list[PendingRequest] = []
        rows = 0
        key: Hashable = None
        while queue_:
            request = queue_[0]
            reason = _stale(request, now)
            if reason is None and timeout_ns and now_ns - request.enqueued_ns > timeout_ns:
                reason = "queue_timeout"
            if reason is not None:
                queue_.popleft()
                self._queued_rows -= request.rows
                self._drop(request, reason)
                continue
            if batch:
                if rows + request.rows > cap:
                    break
                if request.shape_key != key:
                    # Incompatible shapes wait for a later batch; look past them.
                    skipped.append(queue_.popleft())
                    continue
            queue_.popleft()
            self._queued_rows -= request.rows
            batch.append(request)
            rows += request.rows
            key = request.shape_key
            if not cap:
                break
        if skipped:
            queue_.extendleft(reversed(skipped))
        return batch

    # --- finishing batches ---------------------------------------------------------------

    def _post(self, instance: _Instance, batch: list[PendingRequest], timing: _Timing) -> None:
        """Called on an instance thread: hands the finished batch back to the loop."""
        assert self._loop is not None
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._finished, instance, batch, timing)

    def _finished(self, instance: _Instance, batch: list[PendingRequest], timing: _Timing) -> None:
        assert self._loop is not None
        _batches_running[self._loop] -= 1
        self._idle.append(instance)
        rows = sum(request.rows for request in batch)
        self._running_rows -= rows
        if batch[0].error is None and batch[-1].error is None:
            self.rate.add(rows, time.perf_counter_ns() - instance.started_ns)
        # Start the next batch before answering this one: the instance works meanwhile.
        if self._queue:
            self._dispatch(under_load=True)
        try:
            if batch[0].batch_id == batch[-1].batch_id and batch[0].error is None:
                self._observer.batch_done(
                    batch, batch[0].batch_rows, timing.input_ns, timing.infer_ns, timing.output_ns
                )
            else:  # the batch failed and its requests ran alone: report each run
                for request in batch:
                    if request.error is None:
                        self._observer.batch_done(
                            [request], request.rows, 0, request.finished_ns - request.started_ns, 0
                        )
            for request in batch:
                if request.error is not None:
                    self._observer.request_failed(request, "execution")
        except Exception:
            log.exception("batch observer failed", extra={"model": self.name})
        for request in batch:
            future = request.future
            if future is None or future.done():
                continue  # withdrawn while it ran
            if request.error is not None:
                future.set_exception(request.error)
            else:
                assert request.outputs is not None
                future.set_result(request.outputs)
        self._check_drained()

    def _drop(self, request: PendingRequest, reason: str) -> None:
        """Fails a request taken out of the queue unrun: "cancelled", "expired" (its
        deadline passed) or "queue_timeout" (it waited past the queue-wait bound, the
        admission estimate having been short: UNAVAILABLE with a retry hint, counted as a
        rejection)."""
        request.finished_ns = time.perf_counter_ns()
        report = self._observer.request_dropped
        if reason == "queue_timeout":
            request.error = self._timed_out(request)
            report = self._observer.request_rejected
        elif reason == "cancelled":
            request.error = Cancelled(f"request to model '{self.name}' cancelled; not executed")
        else:
            request.error = DeadlineExceeded(
                f"deadline passed while queued for model '{self.name}'; not executed"
            )
        try:
            report(request, reason)
        except Exception:
            log.exception("batch observer failed", extra={"model": self.name})
        future = request.future
        if future is not None and not future.done():
            future.set_exception(request.error)

    def _timed_out(self, request: PendingRequest) -> Rejected:
        retry_ms = _retry_ms(self.drain_s(self._queued_rows + self._running_rows))
        return Rejected(
            f"Queue timeout: request to model '{self.name}' waited "
            f"{(request.finished_ns - request.enqueued_ns) / 1e6:.0f} ms in the queue, past "
            f"the queue-wait bound ({self.wait_bound_s() * 1000:.0f} ms); not executed; "
            f"retry after {retry_ms} ms",
            "queue_timeout",
            retry_ms,
        )

    def _check_drained(self) -> None:
        if (
            self._drained is not None
            and not self._queue
            and len(self._idle) == len(self._instances)
        ):
            self._drained.set()


def _execute(batch: list[PendingRequest], runner: Runner, timing: _Timing, name: str) -> None:
    """Runs a batch on an instance thread: stack, run, split; on failure each alone."""
    _running.batch = batch
    batch_id = next(_batch_ids)
    start = time.perf_counter_ns()
    rows = 0
    for request in batch:
        request.started_ns = start
        request.batch_id = batch_id
        rows += request.rows
    for request in batch:
        request.batch_rows = rows
    if len(batch) == 1:
        feeds = batch[0].inputs
    else:
        feeds = {
            name: np.concatenate([request.inputs[name] for request in batch])
            for name in batch[0].inputs
        }
    assembled = time.perf_counter_ns()
    try:
        outputs = runner(feeds)
    except Exception as exc:
        if len(batch) > 1 and not isinstance(exc, Unavailable | DeadlineExceeded):
            # One bad request must not fail its neighbours: run each alone.
            for request in batch:
                _execute([request], runner, timing, name)
            return
        # Alone, or a dependency of the whole batch failed (the feature service of an
        # enriched model): running each request again would only fail each again.
        error = _execution_error(exc, name)
        finished = time.perf_counter_ns()
        for request in batch:
            request.error = error
            request.finished_ns = finished
        return
    computed = time.perf_counter_ns()
    if len(batch) == 1:
        batch[0].outputs = outputs
    else:
        offset = 0
        for request in batch:
            end = offset + request.rows
            request.outputs = {key: value[offset:end] for key, value in outputs.items()}
            offset = end
    done = time.perf_counter_ns()
    for request in batch:
        request.finished_ns = done
    timing.input_ns = assembled - start
    timing.infer_ns = computed - assembled
    timing.output_ns = done - computed


def _execution_error(exc: Exception, name: str) -> ModelplaneError:
    if isinstance(exc, ModelplaneError):
        return exc
    log.warning(
        "model execution failed for one request",
        extra={"model": name, "error": str(exc)[:500]},
    )
    return ExecutionFailed(
        f"model '{name}' could not run this request's input values: {_runtime_message(exc)}"
    )


def _retry_ms(wait_s: float | None) -> int:
    """The retry hint for `wait_s` of work ahead (None: unknown yet)."""
    if wait_s is None:
        return DEFAULT_RETRY_AFTER_MS
    return min(max(1, int(wait_s * 1000) + 1), MAX_RETRY_AFTER_MS)


def _stale(request: PendingRequest, now: float) -> str | None:
    future = request.future
    if future is not None and future.cancelled():
        expired = request.deadline is not None and now >= request.deadline
        return "expired" if expired else "cancelled"
    if request.deadline is not None and now >= request.deadline:
        return "expired"
    return None


def _runtime_message(exc: Exception) -> str:
    """The part of an ONNX Runtime error that describes the input, without its plumbing."""
    text = str(exc)
    marker = "Status Message:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
