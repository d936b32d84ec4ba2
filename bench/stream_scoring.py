"""Stream scoring (`modelplane score stream`) of the light MLP from the machine's Redis:
the registry and the scorer as processes (the scorer with one consumer, micro-batches
of up to 256 events), events of 64 floats as JSON.

1. Capacity: a backlog of events is in the stream before the scorer starts; events/s
   is the backlog over the time the scorer takes to publish every prediction.
   On a 2-core machine the producer (this script) takes a core from the scorer, so
   capacity is measured again with the producer offering more than the scorer takes.
2. Lag at a steady rate of 80% of the lower capacity: a producer XADDs events every 2 ms
   for a while; the lag of an event is its prediction's stream id time minus its own
   (both Redis' clock, millisecond resolution): p50/p99 (target p99 <= 50 ms).

Keys live under a unique prefix and are deleted at the end. `make bench` runs it."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import redis  # noqa: E402

from modelplane.client.registry import RegistryClient  # noqa: E402
from modelplane.examples.models import LIGHT_MLP, mlp  # noqa: E402
from modelplane.kernel import grpc_defaults  # noqa: E402
from modelplane.loadtest.scenarios import serving  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as rpb  # noqa: E402

MODEL = "stream_light"
REDIS_URL = "redis://127.0.0.1:6379/0"


def registry_command(data: Path) -> list[str]:
    return [
        sys.executable, "-m", "modelplane.cli.main", "serve", "registry", "--port", "0",
        "--metrics-port", "0", "--data-dir", str(data), "--log-level", "WARNING",
    ]  # fmt: skip


def payloads(count: int) -> list[str]:
    rows = np.random.default_rng(0).standard_normal((count, LIGHT_MLP[0])).round(4)
    return [json.dumps(row.tolist()) for row in rows]


def fill(r: redis.Redis, stream: str, events: int, pool: list[str]) -> None:
    for start in range(0, events, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(start + 1000, events)):
            pipe.xadd(stream, {"features": pool[i % len(pool)]})
        pipe.execute()


def produce_steady(
    r: redis.Redis, stream: str, rate: float, seconds: float, pool: list[str]
) -> int:
    """XADDs at `rate` events/s (in 2 ms ticks) for `seconds`; returns how many."""
    tick = 0.002
    started = time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(rate * elapsed) - sent
        if due > 0:
            pipe = r.pipeline(transaction=False)
            for i in range(due):
                pipe.xadd(stream, {"features": pool[(sent + i) % len(pool)]})
            pipe.execute()
            sent += due
        time.sleep(max(0.0, tick - (time.perf_counter() - started - elapsed)))  # ok-sleep: pacing
    return sent


def wait_for(r: redis.Redis, stream: str, count: int, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while r.xlen(stream) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{stream}: {r.xlen(stream)} of {count} predictions")
        time.sleep(0.01)  # ok-sleep: polling the output stream
    return time.perf_counter()


def lags_ms(r: redis.Redis, output: str, after: str) -> np.ndarray:
    """Prediction time minus event time, per event published after stream id `after`."""
    seen: dict[str, int] = {}
    entries: Any = r.xrange(output, min=f"({after}")
    for out_id, fields in entries:
        event_id = fields[b"event_id"].decode()
        if event_id not in seen:
            seen[event_id] = int(out_id.split(b"-")[0]) - int(event_id.split("-")[0])
    return np.array(list(seen.values()), dtype=np.float64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=60_000, help="events for capacity")
    parser.add_argument("--seconds", type=float, default=15.0, help="steady-rate run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=1)
    args = parser.parse_args()
    prefix = f"bench-stream-{uuid.uuid4().hex[:8]}"
    inp, out = f"{prefix}:events", f"{prefix}:predictions"
    pool = payloads(4096)
    r = redis.Redis.from_url(REDIS_URL)
    try:
        with tempfile.TemporaryDirectory(prefix="modelplane-bench-") as temp:
            root = Path(temp)
            onnx.save(mlp(LIGHT_MLP, seed=7, name=MODEL), root / "light.onnx")
            with serving(registry_command(root / "registry"), root / "registry.log") as registry:
                with RegistryClient(registry.address) as client:
                    client.create_model(MODEL)
                    client.upload_file(root / "light.onnx", rpb.UploadMetadata(model=MODEL))
                    client.set_alias(MODEL, "production", 1, expected_version=0)
                fill(r, inp, args.backlog, pool)
                command = [
                    sys.executable, "-m", "modelplane.scoring.stream",
                    "--registry", registry.address, "--model", f"{MODEL}@production",
                    "--redis", REDIS_URL, "--input", inp, "--output", out, "--group", "bench",
                    "--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms),
                    "--consumers", str(args.consumers), "--cache-dir", str(root / "cache"),
                ]  # fmt: skip
                with (root / "scorer.log").open("w") as log:
                    scorer = subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                        env=grpc_defaults.environment(),
                    )
                    try:
                        assert scorer.stdout is not None
                        announced = scorer.stdout.readline()
                        if not announced.startswith("{"):
                            raise RuntimeError((root / "scorer.log").read_text()[-2000:])
                        started = time.perf_counter()
                        done = wait_for(r, out, args.backlog, timeout=120)
                        capacity = args.backlog / (done - started)
                        # On a small machine the producer takes CPU from the scorer: the
                        # capacity that counts is the one with a producer running.
                        before = r.xlen(out)
                        t0 = time.perf_counter()
                        offered = produce_steady(r, inp, 1.5 * capacity, 5.0, pool)
                        shared = (r.xlen(out) - before) / (time.perf_counter() - t0)
                        wait_for(r, out, args.backlog + offered, timeout=120)

                        last: Any = r.xrevrange(out, count=1)
                        after = last[0][0].decode()
                        rate = 0.8 * min(capacity, shared)
                        sent = produce_steady(r, inp, rate, args.seconds, pool)
                        wait_for(r, out, args.backlog + offered + sent, timeout=60)
                        lags = lags_ms(r, out, after)
                    finally:
                        scorer.terminate()
                        scorer.wait(30)
    finally:
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
        r.close()
    p50, p99 = np.percentile(lags, [50, 99])
    print(
        f"\n-- stream scoring: light MLP {LIGHT_MLP}, Redis Streams, {args.consumers} consumer(s), "
        f"micro-batches <= {args.batch_size}, max wait {args.max_wait_ms} ms"
    )
    print(f"capacity, scorer alone (backlog of {args.backlog}): {capacity:,.0f} events/s")
    print(f"capacity beside a producer in this process:  {shared:,.0f} events/s")
    print(
        f"steady {rate:,.0f} events/s (80%) for {args.seconds:.0f} s: {len(lags):,} events, "
        f"lag p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {lags.max():.0f} ms "
        f"(target p99 <= 50 ms: {'met' if p99 <= 50 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
