"""Feast 0.67 beside modelplane's feature service, in the same minutes on the same machine.

The feature issue's latency targets come with Feast 0.67 figures measured on this
machine kind, but this kind of VM runs up to ~2x slower for minutes at a time, so figures
taken hours apart do not compare. This script measures both on the data shape of
bench/feature.py (100k entities, one view of 10 double features, sequential calls from
one client, the server pinned to the last CPU), store by store:
  - Feast, default settings: its Python call in process, its HTTP feature server
    (`feast serve`) and its gRPC feature server (`feast listen`: grpcio's server as ours,
    called with the same client and settings);
  - modelplane: bench/feature.py's latency figures for the same store, right after.
Feast runs in a venv of its own, made on first use under the temp directory (it needs
PyPI), so nothing of it enters the project's venv. Not part of `make bench`.
Usage: python3 bench/compare/feast_side_by_side.py [--stores sqlite,redis] [--calls 4000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FEAST = "feast[grpcio,redis]==0.67.0"
VENV = Path(tempfile.gettempdir()) / "modelplane-feast-0.67"
ENTITIES = 100_000
FEATURES = [f"f{i}" for i in range(10)]
REFS = [f"user_stats:{f}" for f in FEATURES]
# What the issue quotes for Feast 0.67 on this machine kind (HTTP server; in process).
ORIENTATION = {
    "redis": {"http": (1.4, 1.8, 17.6, 20.8), "in process": (None, 0.5, None, 9.9)},
    "sqlite": {"http": (None, 1.9, None, 16.6)},
}
# modelplane.kernel.grpc_defaults.EXPERIMENTS: the client settings bench/feature.py uses.
CLIENT_EXPERIMENTS = "-event_engine_listener,-event_engine_client"
Keysets = list[list[int]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentiles(samples: list[float]) -> tuple[float, float]:
    import numpy as np

    ms = np.array(samples) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(
    call: Callable[[list[int]], None], keysets: list[list[int]], count: int
) -> tuple[float, float]:
    for keys in keysets[:100]:  # warm-up
        call(keys)
    samples = []
    for i in range(count):
        keys = keysets[i % len(keysets)]
        started = time.perf_counter()
        call(keys)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def feast_worker(store_kind: str, calls: int, cpu: int) -> dict[str, tuple[float, float]]:
    """Runs inside Feast's venv: loads the data, then times the three ways to read it."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import numpy as np
    import pandas as pd
    from feast import FeatureStore

    repo = Path(tempfile.mkdtemp(prefix="feast-compare-"))
    project = "cmp" + uuid.uuid4().hex[:8]
    online = (
        f"online_store:\n  type: sqlite\n  path: {repo}/online.db\n"
        if store_kind == "sqlite"
        else "online_store:\n  type: redis\n  connection_string: 127.0.0.1:6379\n"
    )
    (repo / "feature_store.yaml").write_text(
        f"project: {project}\nregistry: {repo}/registry.db\nprovider: local\n{online}"
        "offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
    )
    now = pd.Timestamp.now(tz="UTC")
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {"user_id": np.arange(ENTITIES, dtype=np.int64), "event_timestamp": now}
        | {f: rng.random(ENTITIES) for f in FEATURES}
    )
    frame.to_parquet(repo / "source.parquet")
    fields = ", ".join(f'Field(name="{f}", dtype=Float64)' for f in FEATURES)
    (repo / "definitions.py").write_text(
        "from datetime import timedelta\n"
        "from feast import Entity, FeatureView, Field, FileSource, ValueType\n"
        "from feast.types import Float64\n"
        'user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)\n'
        f'source = FileSource(path="{repo}/source.parquet", timestamp_field="event_timestamp")\n'
        'user_stats = FeatureView(name="user_stats", entities=[user], ttl=timedelta(days=7),\n'
        f"    schema=[{fields}], source=source)\n"
    )
    feast_cli = str(Path(sys.executable).with_name("feast"))
    subprocess.run([feast_cli, "apply"], cwd=repo, check=True, capture_output=True)
    store = FeatureStore(repo_path=str(repo))
    for start in range(0, ENTITIES, 10_000):
        store.write_to_online_store("user_stats", frame.iloc[start : start + 10_000])
    keys = np.random.default_rng(3)
    ones = [[int(keys.integers(0, ENTITIES))] for _ in range(2_000)]
    hundreds = [keys.choice(ENTITIES, 100, replace=False).tolist() for _ in range(500)]
    figures: dict[str, tuple[float, float]] = {}
    try:
        os.sched_setaffinity(0, {cpu})  # where the servers run too
        read = store.get_online_features

        def in_process(keys: list[int]) -> None:
            read(features=REFS, entity_rows=[{"user_id": k} for k in keys]).to_dict()

        figures["in process 1"] = timed(in_process, ones, calls // 4)
        figures["in process 100"] = timed(in_process, hundreds, calls // 8)
        os.sched_setaffinity(0, os.sched_getaffinity(os.getppid()))
        figures |= feast_http(feast_cli, repo, cpu, ones, hundreds, calls)
        figures |= feast_grpc(feast_cli, repo, cpu, ones, hundreds, calls)
    finally:
        if store_kind == "redis":
            import redis

            client = redis.Redis()
            for key in client.scan_iter(match=f"*{project}*", count=10_000):
                client.delete(key)
    return figures


def serve(feast_cli: str, repo: Path, cpu: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["taskset", "-c", str(cpu), feast_cli, *args],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def feast_http(
    feast_cli: str, repo: Path, cpu: int, ones: Keysets, hundreds: Keysets, calls: int
) -> dict[str, tuple[float, float]]:
    port = free_port()
    server = serve(feast_cli, repo, cpu, "serve", "-h", "127.0.0.1", "-p", str(port))
    connection: list[http.client.HTTPConnection] = []

    def call(keys: list[int]) -> None:
        body = json.dumps({"features": REFS, "entities": {"user_id": keys}})
        for attempt in range(2):  # a worker restarted (Feast's --max-requests) drops one
            if not connection:
                connection.append(http.client.HTTPConnection("127.0.0.1", port, timeout=30))
            try:
                connection[0].request(
                    "POST", "/get-online-features", body, {"Content-Type": "application/json"}
                )
                response = connection[0].getresponse()
                data = response.read()
                assert response.status == 200, data[:200]
                return
            except (ConnectionError, http.client.HTTPException):
                connection.clear()
                if attempt:
                    raise

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                call(ones[0])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        return {"http 1": timed(call, ones, calls), "http 100": timed(call, hundreds, calls // 2)}
    finally:
        server.terminate()
        server.wait(30)


def feast_grpc(
    feast_cli: str, repo: Path, cpu: int, ones: Keysets, hundreds: Keysets, calls: int
) -> dict[str, tuple[float, float]]:
    import grpc
    from feast.protos.feast.serving.GrpcServer_pb2_grpc import GrpcFeatureServerStub
    from feast.protos.feast.serving.ServingService_pb2 import FeatureList, GetOnlineFeaturesRequest
    from feast.protos.feast.types.Value_pb2 import RepeatedValue, Value

    port = free_port()
    server = serve(feast_cli, repo, cpu, "listen", "-a", f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = GrpcFeatureServerStub(channel)

            def call(keys: list[int]) -> None:
                ids = RepeatedValue(val=[Value(int64_val=k) for k in keys])
                request = GetOnlineFeaturesRequest(
                    features=FeatureList(val=REFS), entities={"user_id": ids}
                )
                stub.GetOnlineFeatures(request, timeout=30)

            return {
                "grpc 1": timed(call, ones, calls),
                "grpc 100": timed(call, hundreds, calls // 2),
            }
    finally:
        server.terminate()
        server.wait(30)


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"installing {FEAST} into {VENV} (once)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", FEAST], check=True)
    return python


def modelplane(store: str, calls: int, cpu: int) -> dict[str, float]:
    """bench/feature.py's figures for one store (materialization and throughput kept short)."""
    command = [
        str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "bench" / "feature.py"),
        "--stores", store, "--calls", str(calls), "--service-cpus", str(cpu),
        "--materialize-rows", "10000", "--seconds", "1",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(x for x in run.stderr.splitlines() if x.startswith(f"{store}: {{"))
    return dict(json.loads(line.split(": ", 1)[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,redis")
    parser.add_argument("--calls", type=int, default=4_000, help="sequential calls per figure")
    parser.add_argument("--feast-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = max(os.sched_getaffinity(0))
    if args.feast_worker:
        print(json.dumps(feast_worker(args.feast_worker, args.calls, cpu)))
        return
    feast_python = ensure_venv()
    env = dict(os.environ, GRPC_EXPERIMENTS=CLIENT_EXPERIMENTS)
    print(f"{ENTITIES:,} entities x 10 double features, sequential calls, servers on CPU {cpu}")
    print(f"{'store / reader':<34}{'1 entity p50':>14}{'p99':>8}{'100 ent. p50':>14}{'p99':>8}")
    for store in args.stores.split(","):
        started = time.strftime("%H:%M")
        worker = subprocess.run(
            [str(feast_python), __file__, "--feast-worker", store, "--calls", str(args.calls)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        feast = json.loads(worker.stdout.strip().splitlines()[-1])
        ours = modelplane(store, args.calls, cpu)
        rows = [
            (f"feast {kind}", (*feast[f"{kind} 1"], *feast[f"{kind} 100"]))
            for kind in ("in process", "http", "grpc")
        ]
        rows.append(
            (
                "modelplane gRPC",
                (
                    ours["1 entity p50 ms"],
                    ours["1 entity p99 ms"],
                    ours["100 entities p50 ms"],
                    ours["100 entities p99 ms"],
                ),
            )
        )
        # What grpc alone costs there: the same server answering a health Check.
        floor = (ours["floor: health p50 ms"], ours["floor: health p99 ms"], None, None)
        rows.append(("modelplane floor (health Check)", floor))
        rows += [(f"issue's feast {k}", v) for k, v in ORIENTATION[store].items()]
        print(f"-- {store} (from {started})")
        for name, values in rows:
            cells = "".join(
                f"{'-' if v is None else f'{v:.2f}':>{w}}"
                for v, w in zip(values, (14, 8, 14, 8), strict=True)
            )
            print(f"{name:<34}{cells}", flush=True)


if __name__ == "__main__":
    main()
