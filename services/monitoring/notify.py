"""Notifications and retraining: alert webhooks and retrain triggers, off the alert path.

Evaluating alerts must never wait on somebody else's HTTP endpoint or training script,
so both run behind bounds here:

- `WebhookNotifier` keeps a bounded queue drained by a worker task (one by default, so
  one endpoint sees an alert's changes in order). A full queue drops the notification
  at once and counts it (`modelplane_monitoring_webhook_dropped_total`) rather than
  blocking the caller or growing without end. Each POST runs in a thread (urllib is
  blocking) with a timeout; connection errors, 5xx and 429 are retried with exponential
  backoff and full jitter up to `attempts` tries, other 4xx are the receiver refusing
  the payload and are not. Redirects are not followed and the environment's proxies are
  not used: a webhook goes where its configured URL says, nowhere else.
- `RetrainRunner` runs a rule's command without a shell, the JSON payload on its
  standard input, in its own process group so a timeout kills the whole job; at most
  `max_running` at once (more are dropped and counted). Its output goes to the
  service's own stdout/stderr (the container log), unbuffered by us. Its webhook goes
  through the notifier.

Everything here runs on the event loop thread except the POSTs themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.monitoring.v1 import monitoring_pb2 as pb

log = logging.getLogger("modelplane.monitoring.notify")

# Receivers answer 429 when they want us to slow down and 5xx when they are unwell:
# both may succeed later. Any other 4xx will fail the same way every time.
_RETRY_STATUS = 429


def alert_payload(alert: pb.Alert) -> dict[str, Any]:
    """An alert as the JSON a webhook receives: proto field names, enum names, RFC 3339
    times, every field present (a receiver need not know proto3's defaults)."""
    return json_format.MessageToDict(
        alert, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _redacted(url: str) -> str:
    """Scheme and host only: webhook URLs often carry a secret token in their path."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


@dataclass(frozen=True)
class _Delivery:
    url: str
    body: bytes


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns a redirect into an HTTPError: a POST is not silently re-sent elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookNotifier:
    """POSTs JSON payloads to webhooks from a bounded queue, retrying with backoff."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        queue_size: int = 1_000,
        attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        timeout: float = 5.0,
        drain_timeout: float = 2.0,
        workers: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        if queue_size < 1 or attempts < 1 or workers < 1:
            raise ValueError("queue_size, attempts and workers must be at least 1")
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_size)
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._timeout = timeout
        self._drain_timeout = drain_timeout
        self._worker_count = workers
        self._rng = rng or random.Random()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        registry = registry if registry is not None else CollectorRegistry()
        self.sent = Counter(
            "modelplane_monitoring_webhook_sent",
            "Webhook payloads delivered (a 2xx answer).",
            registry=registry,
        )
        self.failures = Counter(
            "modelplane_monitoring_webhook_failures",
            "Webhook payloads given up on: refused (4xx) or still failing after every attempt.",
            registry=registry,
        )
        self.retries = Counter(
            "modelplane_monitoring_webhook_retries",
            "Webhook attempts that failed and were retried.",
            registry=registry,
        )
        self.dropped = Counter(
            "modelplane_monitoring_webhook_dropped",
            "Webhook payloads dropped undelivered: the queue was full or the notifier stopped.",
            registry=registry,
        )
        depth = Gauge(
            "modelplane_monitoring_webhook_queue_depth",
            "Webhook payloads waiting to be sent.",
            registry=registry,
        )
        depth.set_function(self._queue.qsize)
        Gauge(
            "modelplane_monitoring_webhook_queue_limit",
            "The webhook queue's bound.",
            registry=registry,
        ).set(queue_size)

    def start(self) -> None:
        """Starts the workers on the running event loop."""
        if self._workers or self._closed:
            return
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-notifier-{i}")
            for i in range(self._worker_count)
        ]

    def submit(self, url: str, payload: Mapping[str, Any]) -> bool:
        """Queues a POST of `payload` (encoded now, so later changes to it do not leak
        in) and returns at once: False when it was dropped (queue full or stopped).
        Call on the event loop thread. A payload that is not strict JSON raises."""
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        if self._closed:
            self.dropped.inc()
            return False
        try:
            self._queue.put_nowait(_Delivery(url, body))
        except asyncio.QueueFull:
            self.dropped.inc()
            log.warning("webhook queue full, dropped a payload for %s", _redacted(url))
            return False
        return True

    async def join(self) -> None:
        """Returns once everything queued so far was delivered or given up on."""
        await self._queue.join()

    async def stop(self) -> None:
        """Refuses new payloads, gives the queue `drain_timeout` seconds to empty, then
        cancels the workers; whatever is left undelivered counts as dropped."""
        self._closed = True
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self._drain_timeout)
            for worker in self._workers:
                worker.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self.dropped.inc()

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except asyncio.CancelledError:
                self.dropped.inc()
                raise
            except Exception:  # a worker must outlive any one payload
                self.failures.inc()
                log.exception("webhook to %s failed", _redacted(delivery.url))
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        where = _redacted(delivery.url)
        for attempt in range(1, self._attempts + 1):
            status = await asyncio.to_thread(self._post, delivery)
            if status is not None and 200 <= status < 300:
                self.sent.inc()
                return
            retryable = status is None or status == _RETRY_STATUS or status >= 500
            if not retryable or attempt == self._attempts:
                self.failures.inc()
                log.warning(
                    "webhook to %s failed (%s) after %d attempt(s)",
                    where,
                    status or "no answer",
                    attempt,
                )
                return
            self.retries.inc()
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, base * 2^(attempt-1)], capped, so many services
        retrying against one receiver spread out instead of arriving in waves."""
        ceiling = min(self._max_delay, self._base_delay * 2 ** (attempt - 1))
        return self._rng.uniform(0.0, ceiling)

    def _post(self, delivery: _Delivery) -> int | None:
        """One attempt, on a worker thread: the HTTP status, or None for no answer."""
        request = urllib.request.Request(
            delivery.url,
            data=delivery.body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "modelplane-monitoring"},
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            log.debug("webhook to %s: %s", _redacted(delivery.url), exc)
            return None


class RetrainRunner:
    """Runs retrain triggers: the command as a child process, the webhook through the
    notifier. `submit` never waits; `run_command` waits for one command."""

    def __init__(
        self,
        notifier: WebhookNotifier,
        registry: CollectorRegistry | None = None,
        *,
        timeout: float = 600.0,
        max_running: int = 4,
    ) -> None:
        self._notifier = notifier
        self._timeout = timeout
        self._max_running = max_running
        self._tasks: set[asyncio.Task[int | None]] = set()
        registry = registry if registry is not None else CollectorRegistry()
        self.runs = Counter(
            "modelplane_monitoring_retrain_runs",
            "Retrain commands by outcome: ok, failed (non-zero exit), timeout (killed), "
            "error (could not start), dropped (too many running).",
            ["outcome"],
            registry=registry,
        )
        Gauge(
            "modelplane_monitoring_retrain_running",
            "Retrain commands running now.",
            registry=registry,
        ).set_function(lambda: len(self._tasks))

    def submit(self, trigger: pb.RetrainTrigger, payload: Mapping[str, Any]) -> bool:
        """Starts what `trigger` asks for in the background; False if any part of it
        was dropped (notifier queue full, too many commands running)."""
        accepted = True
        if trigger.webhook_url:
            accepted = self._notifier.submit(trigger.webhook_url, payload)
        if trigger.command:
            if len(self._tasks) >= self._max_running:
                self.runs.labels("dropped").inc()
                log.warning("retrain command dropped: %d already running", len(self._tasks))
                return False
            task = asyncio.create_task(self.run_command(list(trigger.command), payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return accepted

    async def run_command(self, command: Sequence[str], payload: Mapping[str, Any]) -> int | None:
        """Runs `command` with the payload as JSON on stdin; its exit status, or None
        when it could not start or was killed at the timeout."""
        body = json.dumps(payload, allow_nan=False).encode() + b"\n"
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, start_new_session=True
            )
        except OSError as exc:
            self.runs.labels("error").inc()
            log.error("retrain command %r could not start: %s", command[0], exc)
            return None
        try:
            await asyncio.wait_for(self._feed(process, body), self._timeout)
        except TimeoutError:
            await _kill(process)
            self.runs.labels("timeout").inc()
            log.error("retrain command %r killed after %.0f s", command[0], self._timeout)
            return None
        except asyncio.CancelledError:
            await _kill(process)
            raise
        status = process.returncode
        self.runs.labels("ok" if status == 0 else "failed").inc()
        log.log(
            logging.INFO if status == 0 else logging.ERROR,
            "retrain command %r exited with %s",
            command[0],
            status,
        )
        return status

    @staticmethod
    async def _feed(process: asyncio.subprocess.Process, body: bytes) -> None:
        # A child that exits without reading its input must not fail the run.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await process.communicate(body)
        await process.wait()

    async def join(self) -> None:
        """Waits for the commands started by `submit` so far."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Kills the running commands."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kills the command's whole process group (it may have started children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
