"""Monitoring: what the issue asks `make bench` to print, measured on the real services.

`modelplane serve registry` holds version 1 of two models with reference statistics of
100,000 training rows (decile edges of 10 numeric features and of the score, the
categories of one categorical feature); `modelplane serve monitoring --registry` takes
its references from there. The stream is the issue's: 10 numeric N(0, 1) features, one
categorical feature of 5 values and one score, 1,000-row batches.

1. Ingest: rows/s into the service over gRPC from 3 client threads on this same
   2-core machine (each batch a new set of request ids, times spread over the last
   24 hours), the service's CPU per row, and its resident memory as the rows go in.
   Beside it, in the same minutes, the numpy floor the issue names: in-process
   histograms of the same batches (no sketches, no storage, no network).
2. Report: GetReport over those 24 hours (every ingested row against the 100k-row
   reference), median of 5.
3. Detection: 10k-row windows, each in its own minute, judged by GetReport on that
   minute: 10 with one feature shifted by 0.25 sd, 10 by 0.1 sd, 50 unshifted. Printed
   as the issue's table: windows detected, and windows with any column flagged.
"""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from modelplane.client.monitoring import MonitoringClient, prediction_batch  # noqa: E402
from modelplane.client.registry import RegistryClient  # noqa: E402
from modelplane.loadtest.scenarios import Served, serving  # noqa: E402
from modelplane.monitoring.v1 import monitoring_pb2 as pb  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as rpb  # noqa: E402

FEATURES = [f"f{i}" for i in range(10)]
CATEGORIES = ["grocery", "fuel", "travel", "online", "cash"]
CATEGORY_P = np.array([0.4, 0.25, 0.15, 0.15, 0.05])
WEIGHTS = np.linspace(-1.0, 1.0, len(FEATURES))
BATCH_ROWS = 1_000
REFERENCE_ROWS = 100_000
SHIFTED = "f3"


def rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, ...]:
    x = rng.standard_normal((n, len(FEATURES))).astype(np.float32)
    x[:, FEATURES.index(SHIFTED)] += shift
    score = (1.0 / (1.0 + np.exp(-(x @ WEIGHTS)))).astype(np.float32).reshape(n, 1)
    merchant = rng.choice(len(CATEGORIES), size=n, p=CATEGORY_P)
    return x, score, merchant


def reference_statistics() -> list[rpb.FeatureStatistics]:
    x, score, merchant = rows(np.random.default_rng(7), REFERENCE_ROWS)
    stats = []
    for name, column in [*zip(FEATURES, x.T, strict=True), ("score", score[:, 0])]:
        edges = np.quantile(column, np.linspace(0, 1, 11))
        counts, _ = np.histogram(column, edges)
        stats.append(
            rpb.FeatureStatistics(name=name, bin_edges=edges.tolist(), counts=counts.tolist())
        )
    counts = np.bincount(merchant, minlength=len(CATEGORIES))
    stats.append(
        rpb.FeatureStatistics(name="merchant", categories=CATEGORIES, counts=counts.tolist())
    )
    return stats


def command(service: str, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "modelplane.cli.main", "serve", service, "--port", "0",
        "--metrics-port", "0", "--data-dir", str(data), "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def register(address: str, root: Path, models: Sequence[str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, len(FEATURES)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, len(FEATURES)])],
    )
    path = root / "identity.onnx"
    onnx.save(helper.make_model(graph), path)
    with RegistryClient(address) as client:
        for model in models:
            client.create_model(model)
            client.upload_file(
                path, rpb.UploadMetadata(model=model, feature_statistics=reference_statistics())
            )


def metric(served: Served, name: str) -> float:
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def batch(
    model: str, ids: Sequence[str], data: tuple[np.ndarray, ...], time_us: int
) -> pb.PredictionBatch:
    x, score, merchant = data
    return prediction_batch(
        model,
        "1",
        ids,
        latency_ms=np.full(len(ids), 1.5),
        features=x,
        feature_names=FEATURES,
        outputs={"score": score},
        time_unix_us=np.full(len(ids), time_us, dtype=np.int64),
        categorical={"merchant": [CATEGORIES[i] for i in merchant]},
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def replayed_batches() -> list[bytes]:
    """The reference's own rows as 1,000-row batches without ids, serialized once: the
    stream replays the training data, so the service sees no drift in it, and the
    clients spend their CPU sending rather than building messages."""
    x, score, merchant = rows(np.random.default_rng(7), REFERENCE_ROWS)
    parts = []
    for start in range(0, REFERENCE_ROWS, BATCH_ROWS):
        window = slice(start, start + BATCH_ROWS)
        ids = [""] * BATCH_ROWS  # placeholders for the shapes; removed below
        message = batch("bench", ids, (x[window], score[window], merchant[window]), 0)
        del message.request_ids[:], message.time_unix_us[:]
        parts.append(message.SerializeToString())
    return parts


def ingest(served: Served, total_rows: int, threads: int) -> None:
    """Each call one batch: a replayed batch's bytes plus new request ids (protobuf
    merges concatenated messages); its records' time is when the service gets them."""
    templates = replayed_batches()
    batches = total_rows // BATCH_ROWS
    rss_at: list[tuple[int, float]] = [(0, metric(served, "process_resident_memory_bytes"))]
    cpu_before = metric(served, "process_cpu_seconds_total")
    next_batch = iter(range(batches))
    lock = threading.Lock()
    sent = [0]

    def client() -> None:
        with grpc.insecure_channel(served.address) as channel:
            call = channel.unary_unary(
                "/modelplane.monitoring.v1.MonitoringService/LogPredictions",
                response_deserializer=pb.LogPredictionsResponse.FromString,
            )
            while True:
                with lock:
                    index = next(next_batch, None)
                if index is None:
                    return
                ids = [f"b{index}-{i}" for i in range(BATCH_ROWS)]
                body = (
                    templates[index % len(templates)]
                    + pb.PredictionBatch(request_ids=ids).SerializeToString()
                )
                result = call(b"\x12" + _varint(len(body)) + body, timeout=60)
                with lock:
                    sent[0] += result.stored

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    marks = [total_rows // 10 * k for k in (1, 5)]
    while any(w.is_alive() for w in workers):
        time.sleep(0.5)
        if marks and sent[0] >= marks[0]:
            rss_at.append((sent[0], metric(served, "process_resident_memory_bytes")))
            marks.pop(0)
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    cpu = metric(served, "process_cpu_seconds_total") - cpu_before
    rss_at.append((sent[0], metric(served, "process_resident_memory_bytes")))
    print(
        f"ingest: {sent[0]:,} rows in {elapsed:.1f} s = {sent[0] / elapsed:,.0f} rows/s over"
        f" gRPC ({threads} client threads on the same 2 cores); the service's CPU"
        f" {cpu / sent[0] * 1e6:.2f} µs/row = {sent[0] / cpu:,.0f} rows/s per core"
    )
    print(
        "  resident memory of the service: "
        + ", ".join(f"{n / 1e6:.1f}M rows {rss / 2**20:.0f} MiB" for n, rss in rss_at)
    )
    pool = [rows(np.random.default_rng(seed), BATCH_ROWS) for seed in range(16)]
    floor = numpy_floor(pool)
    print(f"  numpy floor beside it (histograms only, in process, one core): {floor:,.0f} rows/s")


def numpy_floor(pool: Sequence[tuple[np.ndarray, ...]], seconds: float = 3.0) -> float:
    edges = np.linspace(-3, 3, 11)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        x, score, merchant = pool[done // BATCH_ROWS % len(pool)]
        for column in (*x.T, score[:, 0]):
            np.histogram(column, edges)
        np.bincount(merchant, minlength=len(CATEGORIES))
        done += len(x)
    return done / (time.perf_counter() - started)


def report_time(served: Served) -> None:
    with MonitoringClient(served.address, timeout=120) as client:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            report = client.report("bench", "1")
            times.append(time.perf_counter() - started)
    drifted = [c.name for c in report.columns if c.drifted]
    print(
        f"report: {report.count:,} rows of the last 24 h against a {report.reference_count:,}-row"
        f" reference in {statistics.median(times) * 1000:.0f} ms (median of 5;"
        f" {len(report.columns)} columns, {len(report.drift_over_time)} points over time,"
        f" drifted: {drifted or 'none'})"
    )


def detection(served: Served, window_rows: int) -> None:
    base = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=3)
    plan = [("0.25 sd", 0.25)] * 10 + [("0.1 sd", 0.1)] * 10 + [("none", 0.0)] * 50
    found: dict[str, list[bool]] = {}
    flagged: dict[str, list[bool]] = {}
    with MonitoringClient(served.address, timeout=60) as client:
        for index, (label, shift) in enumerate(plan):
            start = base + timedelta(minutes=index)
            rng = np.random.default_rng(1000 + index)
            for part in range(window_rows // BATCH_ROWS):
                ids = [f"w{index}-{part}-{i}" for i in range(BATCH_ROWS)]
                data = rows(rng, BATCH_ROWS, shift)
                client.log_predictions(
                    [batch("detect", ids, data, int(start.timestamp() * 1e6) + part)]
                )
            report = client.report("detect", "1", start, start + timedelta(minutes=1))
            drifted = {c.name for c in report.columns if c.drifted}
            found.setdefault(label, []).append(SHIFTED in drifted)
            flagged.setdefault(label, []).append(bool(drifted))
    print(f"detection ({window_rows:,}-row windows vs the {REFERENCE_ROWS:,}-row reference):")
    print("  | shift of f3 | windows | f3 flagged | any of 12 columns flagged |")
    for label in ("0.25 sd", "0.1 sd", "none"):
        n = len(found[label])
        print(
            f"  | {label:>11} | {n:>7} | {sum(found[label]):>7}/{n:<2} |"
            f" {sum(flagged[label]):>22}/{n:<2} |"
        )
    print("  targets: 0.25 sd >= 9/10, 0.1 sd >= 5/10, unshifted: any column <= 1/50")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rows",
        type=int,
        default=int(os.environ.get("MODELPLANE_BENCH_MONITORING_ROWS", 10_000_000)),
        help="rows to ingest (the issue's memory figure is over 10M)",
    )
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--window-rows", type=int, default=10_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-") as temp:
        root = Path(temp)
        with serving(command("registry", root / "registry"), root / "registry.log") as registry:
            register(registry.address, root, ["bench", "detect"])
            monitoring_command = command(
                "monitoring", root / "monitoring", "--registry", registry.address
            )
            with serving(monitoring_command, root / "monitoring.log") as monitoring:
                ingest(monitoring, args.rows, args.threads)
                report_time(monitoring)
                detection(monitoring, args.window_rows)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as error:
        print(f"monitoring bench failed: {error}", file=sys.stderr)
        sys.exit(1)
