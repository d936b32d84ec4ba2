"""Feature service figures: online read latency and throughput on SQLite and Redis,
write and materialization throughput.

Starts `modelplane serve feature` as a subprocess per store (port 0, metrics port 0),
pinned to one CPU as the README recommends deploying it (`--cpus`), loads 100k entities
of one view with 10 double features over gRPC, then measures:
  - GetOnlineFeatures, 1 entity x 10 features, sequential: p50 / p99
  - GetOnlineFeatures, 100 entities x 10 features, sequential: p50 / p99
  - GetBundleTensor, 1 entity x 10 features, sequential: p50 / p99
  - the floor under those: the same server answering grpc.health.v1 Check (no work),
    sequential: p50 / p99 - what gRPC alone costs on the machine at hand
  - 16 concurrent callers, 1 entity per call: requests/s and server CPU per request
    (process_cpu_seconds_total from the service's /metrics, before and after)
  - Materialize: 1M Parquet rows x 10 features (1M distinct entities) into the store.
Then it restarts the service on the same data without pinning and measures the 1-entity
latency, the concurrency-16 figures and materialization (of the whole source again)
once more: what placement by the OS costs.
The bench's own channels use the `modelplane` command's gRPC settings
(`modelplane.kernel.grpc_defaults`), as the CLI and the services' clients do.
Usage: .venv/bin/python bench/feature.py [--stores sqlite,redis] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from modelplane.kernel import grpc_defaults

# Before grpc is imported: it reads these settings only then.
grpc_defaults.apply()

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from modelplane.feature.v1 import feature_pb2 as pb  # noqa: E402
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
FEATURES = [f"f{i}" for i in range(10)]
REFS = [f"user_stats:{f}" for f in FEATURES]
DEFINITIONS = """
entities:
  - name: user
    join_keys: [user_id]
feature_views:
  - name: user_stats
    entity: user
    max_age: 7d
    source: {{path: "{source}", timestamp_field: event_timestamp}}
    features:
{features}
bundles:
  - name: model
    features: [{refs}]
"""


def definitions(source: Path) -> str:
    return DEFINITIONS.format(
        source=source,
        features="\n".join(f"      - {{name: {f}, type: double}}" for f in FEATURES),
        refs=", ".join(REFS),
    )


class Service:
    """`modelplane serve feature` in a subprocess, learning its ports from stdout."""

    def __init__(
        self, store: str, data_dir: Path, prefix: str, tracing: str = "auto", cpus: str = ""
    ) -> None:
        env = dict(os.environ, MODELPLANE_FEATURE_REDIS_KEY_PREFIX=prefix)
        # The Parquet source lies beside the data directories (feature views' sources
        # must lie in a source root).
        env["MODELPLANE_FEATURE_SOURCE_ROOTS"] = str(data_dir.parent)
        if tracing != "auto":  # auto: the service's default (spans only when exported)
            env["MODELPLANE_FEATURE_TRACING_ENABLED"] = str(tracing == "on").lower()
        command = [
            sys.executable, "-m", "modelplane.cli.main", "serve", "feature",
            "--port", "0", "--metrics-port", "0", "--data-dir", str(data_dir),
            "--log-level", "WARNING",
            "--online-store", "sqlite" if store == "sqlite" else REDIS_URL,
        ]  # fmt: skip
        if cpus:
            command += ["--cpus", cpus]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the feature service exited before serving")
        serving = json.loads(line)
        self.address = f"127.0.0.1:{serving['port']}"
        self.metrics_url = f"http://127.0.0.1:{serving['metrics_port']}/metrics"

    def cpu_seconds(self) -> float:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        match = re.search(r"^process_cpu_seconds_total ([0-9.e+]+)$", text, re.M)
        assert match, "process_cpu_seconds_total missing from /metrics"
        return float(match.group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def keys(ids: np.ndarray) -> list[pb.EntityKeyColumn]:
    return [
        pb.EntityKeyColumn(
            name="user_id",
            values=pb.Values(type=pb.VALUE_TYPE_INT64, int64_values=ids.tolist()),
        )
    ]


def load(stub: pb_grpc.FeatureServiceStub, entities: int) -> float:
    """Pushes one row per entity in 10k-row writes; returns rows/s."""
    rng = np.random.default_rng(1)
    now_us = time.time_ns() // 1_000
    started = time.perf_counter()
    for start in range(0, entities, 10_000):
        ids = np.arange(start, min(start + 10_000, entities))
        stub.WriteFeatures(
            pb.WriteFeaturesRequest(
                feature_view="user_stats",
                entity_keys=keys(ids),
                event_time_unix_us=[now_us] * len(ids),
                features=[
                    pb.FeatureColumn(
                        name=f,
                        values=pb.Values(
                            type=pb.VALUE_TYPE_DOUBLE, double_values=rng.random(len(ids)).tolist()
                        ),
                    )
                    for f in FEATURES
                ],
            ),
            timeout=120,
        )
    return entities / (time.perf_counter() - started)


def latencies(call: Callable[[object], object], requests: list, count: int) -> tuple[float, float]:
    """p50 and p99 in milliseconds of `count` sequential calls (after a warm-up)."""
    for request in requests[:200]:
        call(request)
    samples = np.empty(count)
    for i in range(count):
        request = requests[i % len(requests)]
        started = time.perf_counter()
        call(request)
        samples[i] = time.perf_counter() - started
    return float(np.percentile(samples, 50) * 1e3), float(np.percentile(samples, 99) * 1e3)


async def closed_loop(address: str, requests: list, concurrency: int, seconds: float) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        deadline = time.perf_counter() + seconds
        done = 0

        async def caller(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < deadline:
                await stub.GetOnlineFeatures(requests[i % len(requests)], timeout=10)
                i += concurrency
                done += 1

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        return done


def source_parquet(path: Path, rows: int) -> None:
    rng = np.random.default_rng(2)
    now_us = time.time_ns() // 1_000
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(np.arange(rows, dtype=np.int64) + 10_000_000),
        "event_timestamp": pa.array(
            now_us - rng.integers(1, 3_600_000_000, rows), pa.timestamp("us", tz="UTC")
        ),
    }
    for f in FEATURES:
        columns[f] = pa.array(rng.random(rows))
    pq.write_table(pa.table(columns), path)


def concurrency_16(service: Service, requests: list, seconds: float) -> tuple[float, float]:
    """Requests/s and server CPU µs per request, 16 callers, 1 entity per call."""
    cpu_before, started = service.cpu_seconds(), time.perf_counter()
    done = asyncio.run(closed_loop(service.address, requests, 16, seconds))
    elapsed = time.perf_counter() - started
    cpu = service.cpu_seconds() - cpu_before
    return done / elapsed, cpu / done * 1e6


def materialize(service: Service, everything: bool) -> tuple[float, float]:
    """Rows read and rows/s. `everything`: the whole source again, not only what is
    new since the last run (the default, incremental)."""
    request = pb.MaterializeRequest()
    if everything:
        request.start_time.FromMicroseconds(1)
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        started = time.perf_counter()
        result = stub.Materialize(request, timeout=600).views[0]
        elapsed = time.perf_counter() - started
    return result.rows_read, result.rows_read / elapsed


def bench_store(store: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    prefix = f"modelplane-bench:{uuid.uuid4().hex[:8]}:"
    figures: dict[str, float] = {}
    rng = np.random.default_rng(3)
    one = [
        pb.GetOnlineFeaturesRequest(entity_keys=keys(rng.integers(0, args.entities, 1)),
                                    features=REFS)
        for _ in range(2_000)
    ]  # fmt: skip
    hundred = [
        pb.GetOnlineFeaturesRequest(
            entity_keys=keys(rng.choice(args.entities, 100, replace=False)), features=REFS
        )
        for _ in range(500)
    ]
    tensors = [pb.GetBundleTensorRequest(bundle="model", entity_keys=r.entity_keys) for r in one]
    try:
        service = Service(store, work / store, prefix, args.tracing, args.service_cpus)
        try:
            with grpc.insecure_channel(service.address) as channel:
                stub = pb_grpc.FeatureServiceStub(channel)
                stub.ApplyDefinitions(
                    pb.ApplyDefinitionsRequest(yaml=definitions(work / "source.parquet")),
                    timeout=30,
                )
                figures["write rows/s"] = load(stub, args.entities)
                for request in (one[0], hundred[0]):  # real values are read, not misses
                    response = stub.GetOnlineFeatures(request)
                    statuses = [s for c in response.columns for s in c.statuses]
                    assert all(s == pb.FEATURE_STATUS_PRESENT for s in statuses)

                read = stub.GetOnlineFeatures
                figures["1 entity p50 ms"], figures["1 entity p99 ms"] = latencies(
                    read, one, args.calls
                )
                figures["100 entities p50 ms"], figures["100 entities p99 ms"] = latencies(
                    read, hundred, args.calls // 2
                )
                figures["tensor 1 entity p50 ms"], figures["tensor 1 entity p99 ms"] = latencies(
                    stub.GetBundleTensor, tensors, args.calls // 2
                )
                check = health_pb2_grpc.HealthStub(channel).Check
                figures["floor: health p50 ms"], figures["floor: health p99 ms"] = latencies(
                    check, [health_pb2.HealthCheckRequest()], args.calls
                )
            figures["c16 req/s"], figures["c16 server CPU us/req"] = concurrency_16(
                service, one, args.seconds
            )
            figures["materialize rows"], figures["materialize rows/s"] = materialize(
                service, everything=False
            )
        finally:
            service.stop()
        if not args.service_cpus:
            return figures
        # The same service and data, placed by the OS.
        service = Service(store, work / store, prefix, args.tracing)
        try:
            with grpc.insecure_channel(service.address) as channel:
                read = pb_grpc.FeatureServiceStub(channel).GetOnlineFeatures
                p50, p99 = latencies(read, one, args.calls)
            figures["unpinned: 1 entity p50 ms"], figures["unpinned: 1 entity p99 ms"] = p50, p99
            rate, cpu = concurrency_16(service, one, args.seconds)
            figures["unpinned: c16 req/s"], figures["unpinned: c16 CPU us/req"] = rate, cpu
            figures["unpinned: materialize rows/s"] = materialize(service, everything=True)[1]
        finally:
            service.stop()
    finally:
        if store == "redis":
            client = redis.Redis.from_url(REDIS_URL)
            for batch in _batches(client.scan_iter(match=f"{prefix}*", count=10_000), 10_000):
                client.delete(*batch)
            client.close()
    return figures


def _batches(items, size):  # type: ignore[no-untyped-def]
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,redis", help="comma-separated stores")
    parser.add_argument("--entities", type=int, default=100_000, help="entities loaded online")
    parser.add_argument("--calls", type=int, default=5_000, help="sequential calls per figure")
    parser.add_argument("--seconds", type=float, default=8.0, help="concurrency-16 duration")
    parser.add_argument(
        "--materialize-rows", type=int, default=1_000_000, help="Parquet rows to materialize"
    )
    parser.add_argument(
        "--service-cpus",
        default=str(max(os.sched_getaffinity(0))),
        help="CPUs the service is pinned to (`--cpus`; default: the highest one this "
        "process may use); empty: no pinning and no unpinned rerun",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--tracing",
        choices=["auto", "on", "off"],
        default="auto",
        help="the service's OpenTelemetry spans (auto: only when exported)",
    )
    args = parser.parse_args()
    if args.quick:
        args.entities, args.calls, args.seconds, args.materialize_rows = 5_000, 500, 2.0, 50_000
    with tempfile.TemporaryDirectory(prefix="bench-feature-") as tmp:
        work = Path(tmp)
        source_parquet(work / "source.parquet", args.materialize_rows)
        results = {}
        for store in args.stores.split(","):
            results[store] = bench_store(store, work, args)
            print(f"{store}: {json.dumps(results[store])}", file=sys.stderr, flush=True)
    names = list(next(iter(results.values())))
    pinned = f"the service pinned to CPU {args.service_cpus}" if args.service_cpus else "unpinned"
    print(
        f"feature service: {args.entities} entities, 1 view x 10 double features, gRPC, "
        f"tracing {args.tracing}, {pinned}; client GRPC_EXPERIMENTS="
        f"{os.environ.get('GRPC_EXPERIMENTS', '')}"
    )
    print(f"{'figure':<30}" + "".join(f"{s:>14}" for s in results))
    for name in names:
        print(f"{name:<30}" + "".join(f"{results[s][name]:>14,.2f}" for s in results))


if __name__ == "__main__":
    main()
