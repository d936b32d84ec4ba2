"""Serving processes: one process laid out on its CPU share, or `--workers N` processes
on one port under a supervisor.

One process (`serve_share`): the event loop and gRPC's threads on one CPU of the share,
the batch threads and ONNX Runtime's intra-op threads on the others, the intra-op thread
count sized from them (modelplane.kernel.cpu_share has the rule and the measurements).

N workers (`Supervisor`): each worker is a whole server (its own event loop, batchers and
runtimes) started as a process of its own, every one bound to the same port with
SO_REUSEPORT, so the kernel spreads connections over them. The supervisor
- reserves the port first (for `--port 0`, picks it) with a socket bound but never
  listening, so the workers, and a worker restarted later, bind that port and no other
  process can take it meanwhile;
- gives each worker its CPU share (`worker_shares`: its own CPUs when there are enough,
  pinned there), so workers do not fight over cores;
- prints one `{"event": "serving", ...}` line once every worker serves, with the port,
  the metrics port and the workers' pids;
- serves /metrics on the metrics port: each worker's metrics, read when scraped, with a
  `worker` label (sum them: `sum by (model) (rate(...))`), and its own;
- forwards SIGTERM/SIGINT, so each worker shuts down gracefully as a single server does;
- restarts a worker that exits unexpectedly, after a backoff that doubles (0.25 s to
  30 s) while restarts keep failing and resets once a worker has served a minute.
A worker whose supervisor dies sees its stdin close and shuts itself down.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from modelplane.kernel.cpu_affinity import format_cpu_list, pin_process
from modelplane.kernel.cpu_share import (
    CpuShare,
    ThreadLayout,
    cgroup_cpu_limit,
    thread_layout,
    worker_shares,
)
from modelplane.kernel.gc_tuning import tune_gc
from modelplane.kernel.logs import configure_logging
from modelplane.kernel.metrics import new_registry
from modelplane.kernel.startup import StartupError
from modelplane.services.inference.repository import Runtime, RuntimeFactory
from modelplane.services.inference.runtime import OrtRuntime, ProviderChoice

if TYPE_CHECKING:
    from modelplane.services.inference.main import InferenceServer, Settings

log = logging.getLogger("modelplane.inference.workers")

BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
SCRAPE_TIMEOUT_S = 2.0
POLL_S = 0.1
WORKER_ENTRY = "from modelplane.services.inference.workers import worker_main; worker_main()"


def placed_runtime(cpus: frozenset[int], lone_cpus: frozenset[int] = frozenset()) -> RuntimeFactory:
    """ONNX Runtime instances whose threads (intra-op and the batch thread) run on `cpus`,
    and a batch that is the process's only work on `lone_cpus` too (OrtRuntime)."""

    def factory(path: Path, providers: ProviderChoice, threads: int) -> Runtime:
        return OrtRuntime(path, providers, threads, cpus=cpus, lone_cpus=lone_cpus)

    return factory


def laid_out_runtime(layout: ThreadLayout, lend_loop_cpus: bool) -> RuntimeFactory:
    """Runtimes on the layout's compute CPUs (anywhere when it keeps every thread
    together), a lone batch on the event loop's CPUs too when `lend_loop_cpus`."""
    if not layout.split:
        return placed_runtime(frozenset())
    return placed_runtime(layout.compute, layout.serving if lend_loop_cpus else frozenset())


def serve_share(
    settings: Settings,
    share: CpuShare,
    build: Callable[[Settings, RuntimeFactory], InferenceServer],
    worker: int | None = None,
) -> None:
    """Lays this process's threads out on `share`, builds the server and serves until
    SIGTERM/SIGINT; as worker `worker` of a supervisor, on the port it shares."""
    layout = thread_layout(share)
    if share.pinned:
        pin_process(share.cpus)
    if layout.split:
        # Every thread started from here on (gRPC's, the metrics server's) inherits
        # the serving CPU; the runtimes place their own threads on the compute CPUs.
        pin_process(layout.serving)
    budget = settings.thread_budget or layout.intra_op_threads
    settings = settings.model_copy(update={"thread_budget": budget})
    server = build(settings, laid_out_runtime(layout, settings.lone_batches_on_all_cpus))
    if worker is not None:
        server.reuse_port = True
        Gauge(
            "modelplane_inference_worker",
            "This worker process: its index under the supervisor and its pid",
            ["index", "pid"],
            registry=server.registry,
        ).labels(str(worker), str(os.getpid())).set(1)
    log.info(
        "threads placed: %s",
        layout.describe(),
        extra={
            "serving_cpus": format_cpu_list(layout.serving),
            "compute_cpus": format_cpu_list(layout.compute),
            "thread_budget": budget,
        },
    )
    tune_gc(settings.gc_threshold)  # after build: what it made lives as long as the process
    server.run()


# --- the port -----------------------------------------------------------------------


def _addresses(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
    bare = host.strip("[]") or None
    infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: dict[tuple[int, str], tuple[int, tuple[Any, ...]]] = {}
    for family, _type, _proto, _name, sockaddr in infos:
        seen.setdefault((family, str(sockaddr[0])), (family, tuple(sockaddr)))
    return list(seen.values())


def reserve_port(host: str, port: int, attempts: int = 20) -> tuple[int, list[socket.socket]]:
    """Binds (never listens on) `host:port` with SO_REUSEPORT, picking a free port for 0,
    and returns the port and the reserving sockets: the workers can bind it beside them,
    any other process is refused. A port something already listens on is an error."""
    addresses = _addresses(host, port)
    last: OSError | None = None
    for _ in range(attempts):
        chosen = port
        held: list[socket.socket] = []
        try:
            for family, sockaddr in addresses:
                address = (sockaddr[0], chosen, *sockaddr[2:])
                # Without SO_REUSEPORT this bind fails if anything holds the port, even
                # a server that shares it (SO_REUSEADDR only skips TIME_WAIT leftovers).
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(address)
                    except OSError as exc:
                        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and held:
                            continue  # e.g. ::1 on a host without IPv6
                        raise
                    chosen = probe.getsockname()[1]
                reserver = socket.socket(family, socket.SOCK_STREAM)
                held.append(reserver)
                reserver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                reserver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                reserver.bind((sockaddr[0], chosen, *sockaddr[2:]))
            return chosen, held
        except OSError as exc:
            for sock in held:
                sock.close()
            last = exc
            if port != 0:
                break
    raise StartupError(f"inference: cannot bind {host}:{port} ({last})")


# --- metrics ------------------------------------------------------------------------


class WorkersCollector:
    """The workers' metrics, read from their /metrics when scraped, each sample labelled
    with its worker; the supervisor's own (its process CPU, restarts) as worker
    "supervisor". A worker that cannot be read is left out of that scrape."""

    def __init__(
        self, sources: Callable[[], list[tuple[str, str]]], own: CollectorRegistry
    ) -> None:
        self._sources = sources
        self._own = own

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}

        def add(family: Metric, worker: str) -> None:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                merged.samples.append(
                    Sample(
                        sample.name,
                        {**sample.labels, "worker": worker},
                        sample.value,
                        sample.timestamp,
                        sample.exemplar,
                    )
                )

        for family in self._own.collect():
            add(family, "supervisor")
        for worker, url in self._sources():
            try:
                with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
                    text = response.read().decode("utf-8", errors="replace")
                parsed = list(text_string_to_metric_families(text))
            except (OSError, ValueError) as exc:
                log.warning("cannot read worker %s metrics at %s: %s", worker, url, exc)
                continue
            for family in parsed:
                add(family, worker)
        yield from families.values()


# --- the supervisor -----------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    share: CpuShare
    process: subprocess.Popen[str] | None = None
    started: float = 0.0
    serving: bool = False
    metrics_port: int | None = None
    backoff_s: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    spec: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Event:
    index: int
    pid: int
    line: str | None  # None: the worker's stdout closed


class Supervisor:
    """Starts, watches and stops the worker processes of `--workers N` (module doc)."""

    def __init__(
        self,
        settings: Settings,
        shares: list[CpuShare] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.settings = settings
        if shares is None:
            shares = worker_shares(
                settings.workers, frozenset(os.sched_getaffinity(0)), cgroup_cpu_limit()
            )
        self._workers = [_Worker(index, share) for index, share in enumerate(shares)]
        self._command = command or [sys.executable, "-c", WORKER_ENTRY]
        self._events: queue.Queue[_Event | None] = queue.Queue()
        self._stopping = False
        self.port = 0
        self.metrics_port: int | None = None
        self._registry = new_registry()
        self._serving_gauge = Gauge(
            "modelplane_inference_workers_serving",
            "Worker processes serving",
            registry=self._registry,
        )
        self._restarts = Counter(
            "modelplane_inference_worker_restarts",
            "Workers restarted after exiting unexpectedly",
            ["index"],
            registry=self._registry,
        )

    # -- lifecycle --

    def run(self) -> int:
        """Serves until SIGTERM/SIGINT; returns the exit status."""
        settings = self.settings
        configure_logging("inference", settings.log_level, settings.log_json)
        self.port, reserved = reserve_port(settings.host, settings.port)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        metrics = None
        try:
            try:
                for worker in self._workers:
                    self._start(worker)
                serving = self._wait_until_serving()
            except BaseException:
                self._shutdown(1)
                raise
            if not serving:
                return self._shutdown(0)
            if settings.metrics_port is not None:
                metrics, _thread = start_http_server(
                    settings.metrics_port,
                    addr=settings.host,
                    registry=self._metrics_registry(),
                )
                self.metrics_port = int(metrics.server_port)
            self._announce()
            return self._supervise()
        finally:
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            for sock in reserved:
                sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # No logging here: the handler may interrupt a log call on this thread.
        self._stopping = True
        self._events.put(None)

    def _wait_until_serving(self) -> bool:
        while not all(worker.serving for worker in self._workers):
            if self._stopping:
                return False
            event = self._next_event()
            if event is None:
                continue
            worker = self._workers[event.index]
            if event.line is None and not worker.serving:
                status = worker.process.wait() if worker.process is not None else None
                raise StartupError(
                    f"inference worker {event.index} exited with status {status} before "
                    "serving (its log is above)"
                )
        return True

    def _supervise(self) -> int:
        while not self._stopping:
            self._next_event()
            now = time.monotonic()
            for worker in self._workers:
                process = worker.process
                if process is not None and process.poll() is not None:
                    self._died(worker, process.returncode, now)
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restart_at = None
                    self._restarts.labels(str(worker.index)).inc()
                    self._start(worker)
        return self._shutdown(0)

    def _next_event(self) -> _Event | None:
        try:
            event = self._events.get(timeout=POLL_S)
        except queue.Empty:
            return None
        if event is None:
            return None
        worker = self._workers[event.index]
        if worker.process is None or worker.process.pid != event.pid:
            return None  # from a worker process that has been replaced
        if event.line is not None:
            try:
                announced = json.loads(event.line)
            except ValueError:
                return event
            if isinstance(announced, dict) and announced.get("event") == "serving":
                worker.serving = True
                worker.metrics_port = announced.get("metrics_port")
                self._serving_gauge.set(sum(w.serving for w in self._workers))
                log.info(
                    "worker %d serving (pid %d, %s)",
                    worker.index,
                    event.pid,
                    worker.share.describe(),
                    extra={"worker": worker.index, "pid": event.pid},
                )
        return event

    def _died(self, worker: _Worker, status: int, now: float) -> None:
        lived = now - worker.started
        worker.process = None
        worker.serving = False
        worker.metrics_port = None
        self._serving_gauge.set(sum(w.serving for w in self._workers))
        if lived >= STABLE_AFTER_S:
            worker.backoff_s = BACKOFF_FIRST_S
        delay = worker.backoff_s
        worker.backoff_s = min(worker.backoff_s * 2, BACKOFF_MAX_S)
        worker.restart_at = now + delay
        log.error(
            "worker %d exited unexpectedly with status %d after %.1fs; restarting in %.2fs",
            worker.index,
            status,
            lived,
            delay,
            extra={"worker": worker.index, "status": status, "restart_in_s": delay},
        )

    def _start(self, worker: _Worker) -> None:
        spec = {
            "index": worker.index,
            "cpus": sorted(worker.share.cpus),
            "capacity": worker.share.capacity,
            "pinned": worker.share.pinned,
            "settings": self._worker_settings(),
        }
        process = subprocess.Popen(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches them once, through us
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(spec) + "\n")
        process.stdin.flush()
        worker.process = process
        worker.started = time.monotonic()
        worker.serving = False
        threading.Thread(
            target=self._read_lines,
            args=(worker.index, process.pid, process.stdout),
            name=f"worker-{worker.index}-stdout",
            daemon=True,
        ).start()
        log.info(
            "worker %d started (pid %d) on %s",
            worker.index,
            process.pid,
            worker.share.describe(),
            extra={"worker": worker.index, "pid": process.pid},
        )

    def _read_lines(self, index: int, pid: int, stream: IO[str]) -> None:
        for line in stream:
            self._events.put(_Event(index, pid, line.strip()))
        self._events.put(_Event(index, pid, None))

    def _worker_settings(self) -> dict[str, Any]:
        update: dict[str, Any] = {
            "port": self.port,
            "workers": 1,
            "cpus": "",
            "metrics_port": None if self.settings.metrics_port is None else 0,
        }
        return self.settings.model_copy(update=update).model_dump(mode="json")

    def _shutdown(self, status: int) -> int:
        self._stopping = True
        running = [w.process for w in self._workers if w.process is not None]
        log.info("stopping %d workers", len(running))
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_period_s + 10.0
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        log.info("supervisor stopped %d workers", len(running))
        return status

    # -- what others see --

    def _metrics_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(self._metric_sources, self._registry))  # type: ignore[arg-type]
        return registry

    def _metric_sources(self) -> list[tuple[str, str]]:
        host = self.settings.host.strip("[]")
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return [
            (str(worker.index), f"http://{host}:{worker.metrics_port}/metrics")
            for worker in self._workers
            if worker.serving and worker.metrics_port is not None
        ]

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]

    def _announce(self) -> None:
        line = {
            "event": "serving",
            "service": "inference",
            "address": f"{self.settings.host}:{self.port}",
            "port": self.port,
            "metrics_port": self.metrics_port,
            "workers": len(self._workers),
            "worker_pids": self.worker_pids(),
            "worker_metrics_ports": [w.metrics_port for w in self._workers],
            "worker_cpus": [format_cpu_list(w.share.cpus) for w in self._workers],
        }
        print(json.dumps(line), flush=True)
        log.info(
            "inference serving on %s:%d with %d workers; metrics of all workers on port %s",
            self.settings.host,
            self.port,
            len(self._workers),
            self.metrics_port,
            extra={"port": self.port, "metrics_port": self.metrics_port},
        )


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()


# --- the worker process -------------------------------------------------------------


def _label_logs(index: int) -> None:
    """Every log record of this process names its worker (a JSON log's `worker` key)."""
    make_record = logging.getLogRecordFactory()

    def labelled(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.worker = index
        return record

    logging.setLogRecordFactory(labelled)


def _stop_when_orphaned(fd: int) -> None:
    """The supervisor holds our stdin open; EOF means it is gone: shut down gracefully.
    (The raw descriptor: a daemon thread blocked in sys.stdin's buffered reader would
    hold its lock at interpreter exit, which Python treats as a fatal error.)"""
    with contextlib.suppress(OSError):
        while os.read(fd, 65536):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def _read_line(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line


def worker_main() -> None:
    """A worker's entry point: its spec (settings, index, CPU share) is one JSON line on
    stdin, written by the supervisor."""
    from modelplane.services.inference import main  # here: main imports this module

    fd = sys.stdin.fileno()
    spec = json.loads(_read_line(fd))
    index = int(spec["index"])
    _label_logs(index)
    settings = main.Settings.model_validate(spec["settings"])
    share = CpuShare(frozenset(spec["cpus"]), int(spec["capacity"]), bool(spec["pinned"]))
    threading.Thread(
        target=_stop_when_orphaned, args=(fd,), name="orphan-watch", daemon=True
    ).start()
    try:
        serve_share(settings, share, main.build, worker=index)
    except StartupError as exc:
        print(f"modelplane serve inference (worker {index}): {exc}", file=sys.stderr)
        raise SystemExit(2) from None
