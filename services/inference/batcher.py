"""The dynamic batcher: one bounded queue per model version, one worker thread per runtime
instance.

Handler threads submit a `PendingRequest` and block on it; an idle worker takes what is
queued at once (a lone request at low load runs without any added delay), so requests
that arrive while every instance is busy form the next batch. Only a worker that found
work already waiting when it finished a batch - the sign of load - holds a short batch
back, up to `max_queue_delay_s` after its oldest request arrived, for more rows.

Batches count rows, not requests: a request of 5 rows takes 5 slots, in the queue bound
and in the batch. Requests whose inputs differ in a variable non-batch dimension carry
different `shape_key`s and never share a batch. A request whose deadline passed, whose
caller cancelled or whose handler gave up is dropped before it runs. When a batch fails
in the runtime, each of its requests is retried alone so one bad request fails alone.
Pure Python and threads: ONNX Runtime releases the GIL while it computes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
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

    @property
    def target_rows(self) -> int:
        limit = max(self.max_batch_size, 1)
        if self.preferred_batch_sizes:
            return min(max(self.preferred_batch_sizes), limit)
        return limit


class PendingRequest:
    """One request travelling through the batcher; the submitting thread waits on it."""

    __slots__ = (
        "_callback",
        "_done",
        "abandoned",
        "batch_id",
        "batch_rows",
        "deadline",
        "enqueued_ns",
        "error",
        "finished_ns",
        "inputs",
        "is_active",
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
        is_active: Callable[[], bool] | None = None,
        received_ns: int = 0,
        callback: Callable[[PendingRequest], None] | None = None,
        tag: object = None,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.shape_key = shape_key
        self.deadline = deadline  # time.monotonic() value
        self.is_active = is_active
        self.received_ns = received_ns or time.perf_counter_ns()
        self.enqueued_ns = 0
        self.started_ns = 0
        self.finished_ns = 0
        self.batch_id = 0
        self.batch_rows = 0
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.tag = tag  # opaque to the batcher (e.g. the proto request, for the stream)
        self._callback = callback
        self._done = threading.Lock()
        self._done.acquire()

    def _finish(self) -> None:
        self.finished_ns = time.perf_counter_ns()
        self._done.release()
        if self._callback is not None:
            self._callback(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until a worker finished the request; False on timeout."""
        acquired = self._done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))
        if acquired:
            self._done.release()  # later waiters (and tests) see it done too
        return acquired

    def result(self) -> dict[str, np.ndarray]:
        """The request's outputs, or the error it failed with."""
        if self.error is not None:
            raise self.error
        assert self.outputs is not None
        return self.outputs


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


class Unloading(Unavailable):
    """The batcher closed between the caller's model lookup and its submit."""


class ExecutionFailed(InvalidArgument):
    """The runtime rejected a well-formed request's values when it ran alone."""


class DynamicBatcher:
    """A bounded row queue in front of `len(runners)` runtime instances."""

    def __init__(
        self,
        name: str,
        runners: Sequence[Runner],
        policy: BatchingPolicy,
        observer: BatchObserver | None = None,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runtime instance")
        self.name = name
        self.policy = policy
        self._observer: BatchObserver = observer or NullObserver()
        self._queue: deque[PendingRequest] = deque()
        self._queued_rows = 0
        self._lock = threading.Lock()
        # Workers wait on one condition, observers of the queue on another, so a
        # submit always wakes a worker (notify() wakes a single waiter).
        self._cond = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)
        # A worker filling a batch sleeps until the batch is full or its delay ends,
        # not once per arriving request: under the GIL every wake-up costs CPU.
        self._fill = threading.Condition(self._lock)
        self._idle = 0
        self._filling = 0
        self._fill_rows = 0
        self._closing = False
        self._workers = [
            threading.Thread(
                target=self._work, args=(runner,), name=f"batcher-{name}-{i}", daemon=True
            )
            for i, runner in enumerate(runners)
        ]
        self._alive = len(self._workers)
        for worker in self._workers:
            worker.start()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def instances(self) -> int:
        return len(self._workers)

    def submit(self, request: PendingRequest) -> None:
        """Queues a request, or raises Overloaded at once when its rows do not fit."""
        with self._cond:
            if self._alive == 0:
                raise Unloading(f"model '{self.name}' is unloading; retry")
            if self._queued_rows + request.rows > self.policy.max_queue_rows:
                raise Overloaded(
                    f"Exceeds maximum queue size: model '{self.name}' has "
                    f"{self._queued_rows} of {self.policy.max_queue_rows} rows queued"
                )
            request.enqueued_ns = time.perf_counter_ns()
            self._queue.append(request)
            self._queued_rows += request.rows
            if self._idle:
                self._cond.notify()
            elif self._filling and self._queued_rows >= self._fill_rows:
                self._fill.notify()
            if self._changed._waiters:  # type: ignore[attr-defined]
                self._changed.notify_all()

    def infer(self, request: PendingRequest, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Submits and waits; a request still queued when `timeout` passes is withdrawn."""
        self.submit(request)
        if not request.wait(timeout):
            self.withdraw(request, "expired")
            if not request.wait(0):
                raise DeadlineExceeded(
                    f"deadline passed while model '{self.name}' was busy; not executed"
                )
        return request.result()

    def withdraw(self, request: PendingRequest, reason: str) -> None:
        """Gives up on a request: removed if still queued; otherwise its result is ignored."""
        with self._cond:
            request.abandoned = True
            try:
                self._queue.remove(request)
            except ValueError:
                return
            self._queued_rows -= request.rows
            self._changed.notify_all()
        self._drop(request, reason)

    def wait_until_queued(self, rows: int, timeout: float, exactly: bool = False) -> bool:
        """Blocks until at least (or exactly) `rows` rows are queued (drains and tests)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued_rows < rows or (exactly and self._queued_rows != rows):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self, timeout: float | None = None) -> None:
        """Stops taking requests; queued ones still run; returns when workers exited."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._fill.notify_all()
        for worker in self._workers:
            worker.join(timeout)

    # --- worker side -----------------------------------------------------------------

    def _work(self, runner: Runner) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                try:
                    self._execute(batch, runner)
                except BaseException as exc:  # never lose a waiter, whatever happened
                    log.exception("batch execution crashed", extra={"model": self.name})
                    for request in batch:
                        if request.finished_ns == 0:
                            if request.outputs is None and request.error is None:
                                request.error = exc
                            request._finish()
        finally:
            with self._cond:
                self._alive -= 1
                orphans = list(self._queue) if self._alive == 0 else []
                if orphans:
                    self._queue.clear()
                    self._queued_rows = 0
            for request in orphans:
                request.error = Unavailable(f"model '{self.name}' was unloaded; retry")
                request._finish()

    def _next_batch(self) -> list[PendingRequest] | None:
        policy = self.policy
        with self._cond:
            idle_wait = False
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    idle_wait = True
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                batch, rows, dropped = self._take([], 0)
                if batch:
                    break
                self._finish_dropped(dropped)
            # Requests were already waiting when this instance came free: under load a
            # short batch may wait for more rows, bounded by its oldest request's delay.
            if (
                policy.enabled
                and not idle_wait
                and policy.max_queue_delay_s > 0
                and rows < policy.target_rows
            ):
                deadline_ns = batch[0].enqueued_ns + int(policy.max_queue_delay_s * 1e9)
                self._filling += 1
                try:
                    while rows < policy.target_rows and not self._closing:
                        remaining = (deadline_ns - time.perf_counter_ns()) / 1e9
                        if remaining <= 0:
                            break
                        self._fill_rows = policy.target_rows - rows
                        self._fill.wait(remaining)
                        batch, rows, more_dropped = self._take(batch, rows)
                        dropped += more_dropped
                finally:
                    self._filling -= 1
        self._finish_dropped(dropped)
        return batch

    def _take(
        self, batch: list[PendingRequest], rows: int
    ) -> tuple[list[PendingRequest], int, list[tuple[PendingRequest, str]]]:
        """Moves compatible requests from the queue into `batch` (lock held)."""
        queue = self._queue
        policy = self.policy
        dropped: list[tuple[PendingRequest, str]] = []
        cap = policy.target_rows if policy.enabled else 0
        key = batch[0].shape_key if batch else None
        now = time.monotonic()
        skipped: list[PendingRequest] = []
        while queue:
            request = queue[0]
            reason = _stale(request, now)
            if reason is not None:
                queue.popleft()
                self._queued_rows -= request.rows
                dropped.append((request, reason))
                continue
            if batch:
                if rows + request.rows > cap:
                    break
                if request.shape_key != key:
                    # Incompatible shapes wait for a later batch; look past them.
                    skipped.append(queue.popleft())
                    continue
            queue.popleft()
            self._queued_rows -= request.rows
            batch.append(request)
            rows += request.rows
            key = request.shape_key
            if not policy.enabled:
                break
        if skipped:
            queue.extendleft(reversed(skipped))
        if self._changed._waiters:  # type: ignore[attr-defined]
            self._changed.notify_all()
        return batch, rows, dropped

    def _finish_dropped(self, dropped: list[tuple[PendingRequest, str]]) -> None:
        for request, reason in dropped:
            self._drop(request, reason)

    def _drop(self, request: PendingRequest, reason: str) -> None:
        if reason == "cancelled":
            request.error = Cancelled(f"request to model '{self.name}' cancelled; not executed")
        else:
            request.error = DeadlineExceeded(
                f"deadline passed while queued for model '{self.name}'; not executed"
            )
        self._observer.request_dropped(request, reason)
        request._finish()

    def _execute(self, batch: list[PendingRequest], runner: Runner) -> None:
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
            if len(batch) > 1:
                # One bad request must not fail its neighbours: run each alone.
                for request in batch:
                    self._execute([request], runner)
                return
            self._fail(batch[0], exc)
            return
        computed = time.perf_counter_ns()
        if len(batch) == 1:
            batch[0].outputs = outputs
        else:
            offset = 0
            for request in batch:
                end = offset + request.rows
                request.outputs = {name: value[offset:end] for name, value in outputs.items()}
                offset = end
        done = time.perf_counter_ns()
        self._observer.batch_done(
            batch, rows, assembled - start, computed - assembled, done - computed
        )
        for request in batch:
            request._finish()

    def _fail(self, request: PendingRequest, exc: Exception) -> None:
        if isinstance(exc, ModelplaneError):
            request.error = exc
        else:
            log.warning(
                "model execution failed for one request",
                extra={"model": self.name, "error": str(exc)[:500]},
            )
            request.error = ExecutionFailed(
                f"model '{self.name}' could not run this request's input values: "
                f"{_runtime_message(exc)}"
            )
        self._observer.request_failed(request, "execution")
        request._finish()


def _stale(request: PendingRequest, now: float) -> str | None:
    if request.abandoned:
        return "expired"
    if request.deadline is not None and now >= request.deadline:
        return "expired"
    if request.is_active is not None and not request.is_active():
        return "cancelled"
    return None


def _runtime_message(exc: Exception) -> str:
    """The part of an ONNX Runtime error that describes the input, without its plumbing."""
    text = str(exc)
    marker = "Status Message:"
    if marker in text:
        text = text.split(marker, 1)[1]
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
