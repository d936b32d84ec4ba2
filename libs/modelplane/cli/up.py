"""`modelplane up`: all four services as separate processes on localhost.

Each service runs as its own `modelplane serve` process (exactly as in
production, one process per service). `up` waits until every one reports
SERVING on the standard health service, prints the addresses and a call that
works, and on Ctrl-C or SIGTERM stops them all gracefully.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.cli.services import DEFAULT_PORTS, SERVICES
from modelplane.examples.models import DEMO_MODEL_NAME, ensure_demo_repository

START_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    address: str = ""
    metrics_port: int | None = None


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "up",
        help="start all four services on localhost with embedded defaults",
        description="Start registry, feature, inference and monitoring as separate processes "
        "(SQLite and local disk under --data-dir, a demo model generated on first run), wait "
        "until each is SERVING, print their addresses, and stop them all on Ctrl-C.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".modelplane"),
        help="directory for state (default .modelplane)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--any-ports",
        action="store_true",
        help="let every service pick a free port (printed once serving)",
    )
    parser.set_defaults(handler=up)


def _read_serving_line(stream: IO[str], found: dict[str, Any]) -> None:
    for line in stream:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "serving":
            found.update(event)
            return


def _start(name: str, args: argparse.Namespace) -> Child:
    port, metrics_port = (0, 0) if args.any_ports else DEFAULT_PORTS[name]
    command = [
        sys.executable,
        "-m",
        "modelplane.cli.main",
        "serve",
        name,
        "--host",
        args.host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--data-dir",
        str(args.data_dir),
    ]
    if name == "inference":
        command += ["--model-repository", str(args.data_dir / "models")]
    env = dict(os.environ)
    env.setdefault(f"MODELPLANE_{name.upper()}_LOG_JSON", "false")
    # A session of its own: Ctrl-C reaches only `up`, which then stops the children in order.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    return Child(name, process)


def _wait_serving(child: Child, deadline: float) -> None:
    found: dict[str, Any] = {}
    assert child.process.stdout is not None
    reader = threading.Thread(
        target=_read_serving_line, args=(child.process.stdout, found), daemon=True
    )
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if not found:
        raise RuntimeError(f"{child.name} did not start (exit code {child.process.poll()})")
    child.address, child.metrics_port = found["address"], found.get("metrics_port")
    with grpc.insecure_channel(child.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(),
            timeout=max(1.0, deadline - time.monotonic()),
            wait_for_ready=True,
        )
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{child.name} reports {response.status}")
    # Keep draining stdout so a chatty child can never block on a full pipe.
    threading.Thread(target=child.process.stdout.read, daemon=True).start()


def _stop_all(children: list[Child], grace: float = 15.0) -> bool:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    clean = True
    for child in children:
        try:
            code = child.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.process.kill()
            code = child.process.wait()
        clean = clean and code == 0
    return clean


def _usage(children: list[Child]) -> str:
    inference = next(c.address for c in children if c.name == "inference")
    # Unindented so it can be pasted as is (a heredoc's end marker must start its line).
    return f"""
Try it (paste into a shell):

{sys.executable} - <<'PY'
import numpy as np, tritonclient.grpc as tc
client = tc.InferenceServerClient("{inference}")
x = tc.InferInput("input", [1, 64], "FP32")
x.set_data_from_numpy(np.random.rand(1, 64).astype(np.float32))
print(client.infer("{DEMO_MODEL_NAME}", [x]).as_numpy("output"))
PY

Every service lists its API through reflection, e.g.  grpcurl -plaintext {inference} list
Press Ctrl-C to stop."""


def up(args: argparse.Namespace) -> int:
    ensure_demo_repository(args.data_dir / "models")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children: list[Child] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        children = [_start(name, args) for name in SERVICES]
        for child in children:
            _wait_serving(child, deadline)
        for child in children:
            print(
                f"{child.name:<11} grpc {child.address:<18} metrics "
                f"http://{args.host}:{child.metrics_port}/metrics",
                flush=True,
            )
        print(_usage(children), flush=True)
        while not stop.is_set():
            if any(child.process.poll() is not None for child in children):
                failed = [c.name for c in children if c.process.poll() is not None]
                print(f"stopped unexpectedly: {', '.join(failed)}", file=sys.stderr)
                _stop_all(children)
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"modelplane up failed: {exc}", file=sys.stderr)
        _stop_all(children)
        return 1
    print("\nstopping...", flush=True)
    return 0 if _stop_all(children) else 1
