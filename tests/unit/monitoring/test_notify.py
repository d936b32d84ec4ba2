"""Webhooks against a real local HTTP server, retrain commands as real child processes."""

import asyncio
import json
import socket
import sys
import threading
from collections import defaultdict, deque
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry

from modelplane.monitoring.v1 import monitoring_pb2 as pb
from modelplane.services.monitoring.notify import RetrainRunner, WebhookNotifier, alert_payload

WAIT = 5.0  # seconds a test waits for something before failing


class Receiver:
    """A webhook receiver: answers each path with its scripted statuses (then 200) and
    records what it was sent."""

    def __init__(self) -> None:
        self.scripts: dict[str, deque[int]] = defaultdict(deque)
        self.received: list[tuple[str, dict, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append(
                        (self.path, json.loads(body), self.headers["Content-Type"])
                    )
                    script = receiver.scripts[self.path]
                    status = script.popleft() if script else 200
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _, _ in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT)


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
async def notifier(registry):
    notifier = WebhookNotifier(registry, attempts=3, base_delay=0.001, max_delay=0.01)
    notifier.start()
    yield notifier
    await notifier.stop()


def metric(registry, name, **labels):
    return registry.get_sample_value(name, labels or None) or 0.0


async def settle(notifier):
    await asyncio.wait_for(notifier.join(), WAIT)


async def test_a_payload_is_posted_as_json(receiver, notifier, registry):
    payload = {"model": "fraud", "psi": 0.31, "columns": ["amount"]}
    assert notifier.submit(receiver.url("/hook"), payload)
    await settle(notifier)
    assert receiver.received == [("/hook", payload, "application/json")]
    assert metric(registry, "modelplane_monitoring_webhook_sent_total") == 1


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_a_failure_is_retried_until_it_succeeds(receiver, notifier, registry, status):
    receiver.scripts["/flaky"].extend([status, status])
    assert notifier.submit(receiver.url("/flaky"), {"n": 1})
    await settle(notifier)
    assert receiver.paths() == ["/flaky"] * 3
    assert metric(registry, "modelplane_monitoring_webhook_sent_total") == 1
    assert metric(registry, "modelplane_monitoring_webhook_retries_total") == 2
    assert metric(registry, "modelplane_monitoring_webhook_failures_total") == 0


async def test_retries_stop_after_the_last_attempt(receiver, notifier, registry):
    receiver.scripts["/down"].extend([500] * 5)
    notifier.submit(receiver.url("/down"), {"n": 1})
    await settle(notifier)
    assert receiver.paths() == ["/down"] * 3
    assert metric(registry, "modelplane_monitoring_webhook_failures_total") == 1
    assert metric(registry, "modelplane_monitoring_webhook_sent_total") == 0


async def test_a_refusal_is_not_retried(receiver, notifier, registry):
    receiver.scripts["/bad"].append(400)
    notifier.submit(receiver.url("/bad"), {"n": 1})
    await settle(notifier)
    assert receiver.paths() == ["/bad"]
    assert metric(registry, "modelplane_monitoring_webhook_failures_total") == 1
    assert metric(registry, "modelplane_monitoring_webhook_retries_total") == 0


async def test_a_redirect_is_not_followed(receiver, notifier, registry):
    receiver.scripts["/moved"].append(307)
    notifier.submit(receiver.url("/moved"), {"n": 1})
    await settle(notifier)
    assert receiver.paths() == ["/moved"]
    assert metric(registry, "modelplane_monitoring_webhook_failures_total") == 1


async def test_no_answer_is_retried_then_given_up(notifier, registry):
    with socket.socket() as sock:  # a local port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    notifier.submit(f"http://127.0.0.1:{port}/hook", {"n": 1})
    await settle(notifier)
    assert metric(registry, "modelplane_monitoring_webhook_retries_total") == 2
    assert metric(registry, "modelplane_monitoring_webhook_failures_total") == 1


async def test_a_full_queue_drops_and_counts(receiver, registry):
    notifier = WebhookNotifier(registry, queue_size=2, attempts=1)
    assert notifier.submit(receiver.url("/a"), {"n": 1})
    assert notifier.submit(receiver.url("/b"), {"n": 2})
    assert not notifier.submit(receiver.url("/c"), {"n": 3})
    assert metric(registry, "modelplane_monitoring_webhook_dropped_total") == 1
    assert metric(registry, "modelplane_monitoring_webhook_queue_depth") == 2
    notifier.start()
    await settle(notifier)
    await notifier.stop()
    assert receiver.paths() == ["/a", "/b"]
    assert metric(registry, "modelplane_monitoring_webhook_queue_depth") == 0


async def test_stop_drops_what_is_left_and_refuses_more(receiver, registry):
    notifier = WebhookNotifier(registry, drain_timeout=0.0)
    notifier.submit(receiver.url("/a"), {"n": 1})
    await notifier.stop()  # never started: nothing could be sent
    assert not notifier.submit(receiver.url("/b"), {"n": 2})
    assert metric(registry, "modelplane_monitoring_webhook_dropped_total") == 2
    assert receiver.paths() == []


def test_a_payload_that_is_not_json_is_refused_at_once(registry):
    notifier = WebhookNotifier(registry)
    with pytest.raises(ValueError):
        notifier.submit("http://127.0.0.1:9/x", {"value": float("nan")})


def test_alert_payload_names_every_field():
    alert = pb.Alert(
        id="al-1",
        model_name="fraud",
        model_version="2",
        rule="amount-drift",
        kind=pb.ALERT_KIND_DRIFT,
        subject="amount",
        state=pb.ALERT_STATE_FIRING,
        value=0.31,
        windows=3,
        summary="fraud v2: amount drifted (PSI 0.31) for 3 windows",
    )
    alert.fired_time.FromDatetime(datetime(2026, 1, 1, 0, 15, tzinfo=UTC))
    payload = alert_payload(alert)
    json.dumps(payload)
    assert payload["state"] == "ALERT_STATE_FIRING" and payload["kind"] == "ALERT_KIND_DRIFT"
    assert payload["fired_time"] == "2026-01-01T00:15:00Z"
    assert payload["model_name"] == "fraud" and payload["windows"] == 3
    assert payload["threshold"] == 0  # present although zero


# --- retrain ------------------------------------------------------------------------

COPY_STDIN = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_bytes(sys.stdin.buffer.read())"


@pytest.fixture
async def runner(notifier, registry):
    runner = RetrainRunner(notifier, registry, timeout=WAIT)
    yield runner
    await runner.stop()


async def test_a_command_reads_the_payload_on_stdin(runner, registry, tmp_path):
    out = tmp_path / "payload.json"
    payload = {"model": "fraud", "drifted_columns": [{"column": "amount", "psi": 0.31}]}
    status = await runner.run_command([sys.executable, "-c", COPY_STDIN, str(out)], payload)
    assert status == 0
    assert json.loads(out.read_text()) == payload
    assert metric(registry, "modelplane_monitoring_retrain_runs_total", outcome="ok") == 1


async def test_a_failing_command_is_counted(runner, registry):
    status = await runner.run_command([sys.executable, "-c", "raise SystemExit(3)"], {})
    assert status == 3
    assert metric(registry, "modelplane_monitoring_retrain_runs_total", outcome="failed") == 1


async def test_a_missing_program_is_counted(runner, registry, tmp_path):
    assert await runner.run_command([str(tmp_path / "no-such-program")], {}) is None
    assert metric(registry, "modelplane_monitoring_retrain_runs_total", outcome="error") == 1


async def test_a_command_past_its_timeout_is_killed(notifier, registry):
    runner = RetrainRunner(notifier, registry, timeout=0.5)
    hang = "import sys, threading; sys.stdin.read(); threading.Event().wait()"
    assert await runner.run_command([sys.executable, "-c", hang], {}) is None
    assert metric(registry, "modelplane_monitoring_retrain_runs_total", outcome="timeout") == 1


async def test_submit_runs_the_command_and_posts_the_webhook(
    runner, notifier, receiver, registry, tmp_path
):
    out = tmp_path / "payload.json"
    trigger = pb.RetrainTrigger(
        command=[sys.executable, "-c", COPY_STDIN, str(out)], webhook_url=receiver.url("/retrain")
    )
    payload = {"model": "fraud", "rule": "amount-drift"}
    assert runner.submit(trigger, payload)
    await asyncio.wait_for(runner.join(), WAIT)
    await settle(notifier)
    assert json.loads(out.read_text()) == payload
    assert receiver.received == [("/retrain", payload, "application/json")]


async def test_too_many_running_commands_are_dropped(notifier, registry):
    runner = RetrainRunner(notifier, registry, max_running=1, timeout=WAIT)
    hang = pb.RetrainTrigger(
        command=[sys.executable, "-c", "import threading; threading.Event().wait()"]
    )
    assert runner.submit(hang, {})
    assert not runner.submit(hang, {})
    assert metric(registry, "modelplane_monitoring_retrain_runs_total", outcome="dropped") == 1
    assert metric(registry, "modelplane_monitoring_retrain_running") == 1
    await asyncio.wait_for(runner.stop(), WAIT)  # kills the one running
    assert metric(registry, "modelplane_monitoring_retrain_running") == 0
