"""`modelplane serve inference --workers 2` as a user runs it: a supervisor and two worker
processes on one port (port 0), every worker answering, their metrics summed behind the
supervisor's endpoint, a killed worker restarted, SIGTERM stopping them all. Also where
one process puts its threads (the runtime's CPUs)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.cli.main import build_parser
from modelplane.cli.serve import settings_from_args
from modelplane.examples.models import LIGHT_MLP, mlp, write_model
from modelplane.kernel.cpu_share import ThreadLayout
from modelplane.kernel.startup import StartupError
from modelplane.loadtest.server_cpu import ServerCpuProbe, read_cpu_seconds
from modelplane.services.inference import runtime as runtime_module
from modelplane.services.inference.batcher import (
    BatchingPolicy,
    DynamicBatcher,
    PendingRequest,
    Tensors,
)
from modelplane.services.inference.runtime import CPU, OrtRuntime, ProviderChoice
from modelplane.services.inference.workers import laid_out_runtime, reserve_port
from tests.integration.inference.conftest import fp32_request
from tests.support import wait_serving_sync, wait_until

pytestmark = pytest.mark.slow

WAIT = 60.0
X = np.random.default_rng(3).standard_normal((1, LIGHT_MLP[0])).astype(np.float32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(mlp(LIGHT_MLP, seed=5, name="light"), root, "light")
    return root


@dataclass
class Supervised:
    process: subprocess.Popen[str]
    serving: dict
    log: queue.Queue[dict]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.serving['port']}"

    def metrics(self) -> dict[str, list]:
        url = f"http://127.0.0.1:{self.serving['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        return samples

    def next_log(self, match: str) -> dict:
        """The next supervisor or worker log record whose message contains `match`."""
        while True:
            entry = self.log.get(timeout=WAIT)
            if match in entry.get("msg", ""):
                return entry


def _pump(stream, lines: queue.Queue[dict]) -> None:
    for line in stream:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"msg": line}
        if isinstance(entry, dict):
            lines.put(entry)


@pytest.fixture
def supervised(repository: Path, tmp_path: Path) -> Iterator[Supervised]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "modelplane.cli.main", "serve", "inference",
            "--model-repository", str(repository), "--port", "0", "--metrics-port", "0",
            "--data-dir", str(tmp_path / "data"), "--workers", "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    log: queue.Queue[dict] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stderr, log), daemon=True).start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once every worker serves
        if not line:
            pytest.fail(f"supervisor exited with {process.wait()} before serving")
        serving = json.loads(line)
        assert serving["event"] == "serving" and serving["workers"] == 2
        supervised = Supervised(process, serving, log)
        wait_serving_sync(supervised.address)
        yield supervised
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def _infer_on_new_connection(address: str) -> None:
    # A channel of its own subchannel pool opens its own TCP connection, which the
    # kernel hands to one worker (SO_REUSEPORT balances connections).
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        response = stub.ModelInfer(fp32_request("light", X), timeout=WAIT)
        assert response.model_name == "light"


def _per_worker(samples: list, **labels: str) -> dict[str, float]:
    return {
        s.labels["worker"]: s.value
        for s in samples
        if all(s.labels.get(key) == value for key, value in labels.items())
    }


def _answers_by_worker(supervised: Supervised) -> dict[str, float]:
    return _per_worker(
        supervised.metrics()["modelplane_inference_requests_total"], outcome="success"
    )


def _worker_pids(supervised: Supervised) -> dict[str, int]:
    return {
        s.labels["index"]: int(s.labels["pid"])
        for s in supervised.metrics()["modelplane_inference_worker"]
    }


def test_two_worker_processes_answer_on_one_port(supervised: Supervised):
    pids = supervised.serving["worker_pids"]
    assert len(set(pids)) == 2 and supervised.process.pid not in pids
    assert _worker_pids(supervised) == {"0": pids[0], "1": pids[1]}
    answered: dict[str, float] = {}
    # Each connection lands on one of two workers: 64 all on one has odds of 2**-63.
    for _ in range(64):
        _infer_on_new_connection(supervised.address)
        answered = _answers_by_worker(supervised)
        if len([count for count in answered.values() if count > 0]) == 2:
            break
    assert set(answered) == {"0", "1"} and min(answered.values()) > 0


def test_server_cpu_adds_up_over_the_workers(supervised: Supervised):
    samples = supervised.metrics()["process_cpu_seconds_total"]
    assert set(_per_worker(samples)) == {"supervisor", "0", "1"}
    own = [f"127.0.0.1:{port}" for port in supervised.serving["worker_metrics_ports"]]
    each = [read_cpu_seconds(f"http://{address}/metrics") for address in own]
    summed = ServerCpuProbe(",".join(own))
    assert len(summed.urls) == 2
    total = asyncio.run(summed.read())
    assert total >= sum(each)  # read after, and CPU only grows


def test_a_killed_worker_is_restarted(supervised: Supervised):
    old = supervised.serving["worker_pids"][0]
    os.kill(old, signal.SIGKILL)
    died = supervised.next_log("exited unexpectedly")
    assert died["worker"] == 0 and died["status"] == -signal.SIGKILL
    back = supervised.next_log("worker 0 serving")
    assert back["pid"] != old
    wait_serving_sync(supervised.address)
    metrics = supervised.metrics()
    assert _worker_pids(supervised)["0"] == back["pid"]
    restarts = _per_worker(metrics["modelplane_inference_worker_restarts_total"], index="0")
    assert restarts == {"supervisor": 1.0}
    assert supervised.process.poll() is None


def test_sigterm_stops_every_worker(supervised: Supervised):
    pids = supervised.serving["worker_pids"]
    supervised.process.send_signal(signal.SIGTERM)
    assert supervised.process.wait(WAIT) == 0
    for pid in pids:  # the supervisor waited for them: they are gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_cannot_start_fails_the_supervisor(tmp_path: Path):
    process = subprocess.run(
        [
            sys.executable, "-m", "modelplane.cli.main", "serve", "inference",
            "--model-repository", str(tmp_path), "--port", "0", "--workers", "2",
            "--model-control-mode", "explicit", "--load-model", "missing",
            "--data-dir", str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )  # fmt: skip
    assert process.returncode == 2
    assert "exited with status" in process.stderr and "before serving" in process.stderr
    assert process.stdout == ""


def test_the_supervisor_holds_its_port_for_the_workers_only():
    port, held = reserve_port("127.0.0.1", 0)
    try:
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as worker:  # what grpc does with grpc.so_reuseport
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
    finally:
        for sock in held:
            sock.close()


def test_a_port_in_use_is_refused():
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a sharing one
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(StartupError, match="cannot bind"):
            reserve_port("127.0.0.1", other.getsockname()[1])


def test_a_runtime_runs_its_threads_on_its_cpus(tmp_path: Path):
    path = write_model(mlp(LIGHT_MLP, seed=1, name="m"), tmp_path, "m")
    seen: dict[str, object] = {}

    def build_and_run() -> None:  # a thread of its own: the test runner stays unpinned
        cpus = frozenset({min(os.sched_getaffinity(0))})
        before = _threads()
        runtime = OrtRuntime(path, ProviderChoice((CPU,), "test"), 2, cpus=cpus)
        seen["pool"] = [cpus_of for tid, cpus_of in _threads().items() if tid not in before]
        seen["builder"] = os.sched_getaffinity(0)
        runtime.prepare_thread()
        seen["caller"] = os.sched_getaffinity(0)
        seen["cpus"] = cpus
        runtime({"input": np.zeros((2, LIGHT_MLP[0]), np.float32)})

    thread = threading.Thread(target=build_and_run)
    thread.start()
    thread.join()
    assert seen["pool"] == [seen["cpus"]]  # intra-op threads: 2 = the caller + one more
    assert seen["builder"] == os.sched_getaffinity(0)  # restored after the session
    assert seen["caller"] == seen["cpus"]


def test_a_lone_batch_runs_on_the_lent_cpus_too_and_others_do_not(tmp_path: Path):
    path = write_model(mlp(LIGHT_MLP, seed=1, name="m"), tmp_path, "m")
    everywhere = frozenset(os.sched_getaffinity(0))
    cpus = frozenset({min(everywhere)})
    seen: dict[str, object] = {}

    def build() -> None:  # a thread of its own: the test runner stays unpinned
        before = _threads()
        seen["runtime"] = OrtRuntime(
            path, ProviderChoice((CPU,), "test"), 1, cpus=cpus, lone_cpus=everywhere
        )
        seen["pool"] = [cpus_of for tid, cpus_of in _threads().items() if tid not in before]

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    runtime = seen["runtime"]
    assert isinstance(runtime, OrtRuntime) and runtime.lone_session is not None
    # The first session's one thread is the caller's; the lone one's extra threads (one
    # per lent CPU) may run on every CPU.
    assert seen["pool"] == [everywhere] * (len(everywhere) - 1)
    ran: list[str] = []
    narrow, lone = runtime._run, runtime._lone_run
    runtime._run = lambda names, feeds: ran.append("narrow") or narrow(names, feeds)  # type: ignore[method-assign]
    runtime._lone_run = lambda names, feeds: ran.append("lone") or lone(names, feeds)  # type: ignore[assignment, misc]

    async def serve() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher("m", [runtime], BatchingPolicy())
        x = np.random.default_rng(1).random((1, LIGHT_MLP[0]), dtype=np.float32)
        alone = await batcher.infer(PendingRequest({"input": x}, 1))
        # A batch starting while another batcher's batch runs is not alone.
        gate, entered = threading.Event(), threading.Event()

        def held(feeds: Tensors) -> dict[str, np.ndarray]:
            entered.set()
            assert gate.wait(WAIT)
            return dict(feeds)

        blocker = DynamicBatcher("b", [held], BatchingPolicy())
        blocked = blocker.submit(PendingRequest({"x": x}, 1))
        assert await asyncio.to_thread(entered.wait, WAIT)
        beside = await batcher.infer(PendingRequest({"input": x}, 1))
        gate.set()
        await blocked
        await batcher.close()
        await blocker.close()
        return [alone, beside]

    alone, beside = asyncio.run(serve())
    assert ran == ["lone", "narrow"]
    np.testing.assert_allclose(
        alone[runtime.outputs[0].name], beside[runtime.outputs[0].name], rtol=1e-5
    )


def test_a_model_over_the_size_bound_gets_no_lone_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = write_model(mlp(LIGHT_MLP, seed=1, name="m"), tmp_path, "m")
    monkeypatch.setattr(runtime_module, "LONE_SESSION_MAX_BYTES", path.stat().st_size - 1)
    runtime = OrtRuntime(path, ProviderChoice((CPU,), "test"), 1, lone_cpus=frozenset({0}))
    assert runtime.lone_session is None


def test_the_flag_decides_whether_a_split_layout_lends_the_loops_cpus(tmp_path: Path):
    path = write_model(mlp(LIGHT_MLP, seed=1, name="m"), tmp_path, "m")
    everywhere = frozenset(os.sched_getaffinity(0))
    layout = ThreadLayout(frozenset({min(everywhere)}), everywhere, 1)
    off = build_parser().parse_args(["serve", "inference", "--no-lone-batches-on-all-cpus"])
    assert settings_from_args(off.service_module, off).lone_batches_on_all_cpus is False
    results: dict[bool, object] = {}

    def build() -> None:  # a thread of its own: the test runner stays unpinned
        for lend in (True, False):
            runtime = laid_out_runtime(layout, lend)(path, ProviderChoice((CPU,), "test"), 1)
            assert isinstance(runtime, OrtRuntime)
            results[lend] = runtime.lone_session

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert (results[True] is not None) == layout.split
    assert results[False] is None


def _threads() -> dict[int, frozenset[int]]:
    return {
        int(tid): frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")
    }


def test_workers_stop_when_the_supervisor_is_killed(supervised: Supervised):
    pids = supervised.serving["worker_pids"]
    supervised.process.kill()  # no chance to stop them: they see their stdin close
    supervised.process.wait(WAIT)

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in pids)

    wait_until(gone, timeout=WAIT)
