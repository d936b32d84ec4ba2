"""A service as a child process the chaos scenarios can kill, stop and start again.

Started as `modelplane serve <name>` (what `modelplane up` runs), on 127.0.0.1 and a
port the harness picked, so a restart comes back at the same address and the
clients' channels reconnect to it by themselves. Readiness is the JSON "serving"
line the kernel prints (kernel/server.py `announce`), then a health check.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.kernel import grpc_defaults

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A port nothing listens on now (the OS's pick for port 0), for a service that
    must come back on the same port after a restart."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MiB (VmRSS), NaN once it is gone."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """The largest resident set `pid` ever had (VmHWM), in MiB."""
    return _status_kib(pid, "VmHWM") / 1024


def _status_kib(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


class ServiceProcess:
    """One service process at a time at one address; `start` again after `kill` or
    `terminate` reuses the data directory and the port."""

    def __init__(
        self,
        name: str,
        data_dir: Path,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.process: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.{name}.log"
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "modelplane.cli.main", "serve", self.name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--log-level", "WARNING", *self.extra_args,
        ]  # fmt: skip

    def spawn(self) -> None:
        """Starts the process and returns at once (see `wait_serving`)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = grpc_defaults.environment()
        env.setdefault(f"MODELPLANE_{self.name.upper()}_LOG_JSON", "false")
        env.update(self.env)
        with self.log_path.open("a") as log:
            log.write(f"--- start {self.starts + 1}\n")
            log.flush()
            self.process = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        self.starts += 1

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until the serving line is printed and health answers SERVING."""
        process = self.process
        assert process is not None and process.stdout is not None
        found: dict[str, object] = {}
        announced = threading.Event()
        threading.Thread(
            target=_read_serving, args=(process.stdout, found, announced), daemon=True
        ).start()
        deadline = time.monotonic() + timeout
        while not announced.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(
                    f"{self.name} did not start (exit code {process.poll()}):\n{tail}"
                )
        with grpc.insecure_channel(self.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True
            )
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{self.name} reports {response.status}")

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        self.spawn()
        self.wait_serving(timeout)

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no hooks."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self) -> None:
        """SIGTERM (the graceful path); returns at once, see `wait_exit`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None when it is still running after `timeout`."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        if self.wait_exit(grace) is None:
            self.kill()

    def rss_mb(self) -> float:
        return rss_mb(self.pid) if self.alive() else float("nan")

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.pid) if self.alive() else float("nan")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _read_serving(stream: IO[str], found: dict[str, object], announced: threading.Event) -> None:
    """Reads stdout until the serving line, then keeps draining it (a child blocked on a
    full pipe would look like a hung service)."""
    for line in stream:
        if announced.is_set() or not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "serving":
            found.update(event)
            announced.set()
