"""Batch scoring throughput: `modelplane score batch` over a Parquet input, for the light
and heavy MLPs, beside the in-process ONNX Runtime ceiling at the same batch size: the
best of one run at a time over every CPU (intra-op threads) and one run per CPU at once
(one thread each, as the job runs them), on a matrix already in memory, no I/O. The
target is a job at 0.8x the ceiling or better: bounded by the model, not by reading,
converting or writing.

The light MLP reads 64 float32 columns (a tabular input); the heavy one a fixed-size
list column of 512 float32 (an embedding); both in row groups of 65,536 rows, chunks of
at most 262,144 rows and at least 8 chunks. By default 3M light rows and 200k heavy
rows keep the run near two minutes; MODELPLANE_BENCH_BATCH_FULL=1 scores the issue's
10M rows of each (the heavy one then takes many minutes on 2 cores). After each local
run, the same job over at most 1M rows into a SQLite table, a PostgreSQL table
(MODELPLANE_BENCH_POSTGRES, default the machine's database `test`) and through an
inference service process (`--via-service`), each beside the same ceiling;
`--no-outputs` leaves them out. `--engine ray` is measured last, on a local Ray
instance started then (its start printed apart), with the default actor pool (one actor
per CPU, one ONNX Runtime thread each), beside a ceiling measured again; `--no-ray`
leaves it out. Under each local run: what the job spends outside the model (reading and
writing its first chunks, each timed alone on one CPU), and the most a job doing that
could reach beside this ceiling. A shared machine is noisy: `--repeat N` measures N
times. `make bench` runs it.

The process gives Arrow the memory pool `modelplane score batch` gives its job
(reuse_freed_buffers)."""

import os
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
# Ray starts its processes (fork, then exec) while this process serves the registry;
# gRPC's fork handlers, which only logged that they skipped themselves, are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import psycopg  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from psycopg import sql  # noqa: E402

from modelplane.client.registry import RegistryClient  # noqa: E402
from modelplane.examples.models import HEAVY_MLP, LIGHT_MLP, mlp  # noqa: E402
from modelplane.loadtest.scenarios import serving  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as rpb  # noqa: E402
from modelplane.scoring.batch import (  # noqa: E402
    DEFAULT_CHUNK_ROWS,
    BatchJob,
    BatchOptions,
    BatchResult,
    FileInput,
    Scored,
    reuse_freed_buffers,
    run_local,
    write_parts,
)
from modelplane.scoring.model import (  # noqa: E402
    ModelRef,
    ScoringModel,
    cpu_session,
    fetch,
    intra_op_threads,
    resolve,
)
from modelplane.scoring.ray_engine import RayOptions, run_ray  # noqa: E402
from modelplane.scoring.via_service import ServiceModel, ServiceOptions  # noqa: E402
from modelplane.services.registry.main import Settings, build  # noqa: E402

FULL_ROWS = 10_000_000
OUTPUTS_ROWS = 1_000_000
"""Rows of the database-output and --via-service runs (slower ways than Parquet)."""
POSTGRES_URL = os.environ.get("MODELPLANE_BENCH_POSTGRES", "postgresql://127.0.0.1:5432/test")


ROW_GROUP = 65_536


@contextmanager
def registry(data: Path) -> Iterator[str]:
    """A registry server on its own event loop thread; yields its address."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = Settings(data_dir=data, port=0, tracing_enabled=False, log_json=False)  # type: ignore[call-arg]
    server = build(settings)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    try:
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=0.5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def write_input(path: Path, width: int, rows: int, as_list: bool) -> list[str]:
    """`rows` random rows in row groups of ROW_GROUP, written group by group; returns
    the feature column names."""
    names = ["x"] if as_list else [f"f{i}" for i in range(width)]
    rng = np.random.default_rng(0)
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        x = rng.standard_normal((n, width), dtype=np.float32)
        columns: dict[str, pa.Array] = {"id": pa.array(np.arange(start, start + n))}
        if as_list:
            columns["x"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width)
        else:
            columns.update({name: pa.array(x[:, j]) for j, name in enumerate(names)})
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()
    # On disk before the job is timed: else the kernel writes this input back while
    # the job runs, and the job's own fsyncs wait for it (seconds at 1 CPU).
    os.sync()
    return names


def ceiling(model: ScoringModel, width: int, batch_rows: int, rows: int) -> tuple[float, str]:
    """The best rows/s in-process ONNX Runtime reaches on one in-memory batch of
    `batch_rows`, run until `rows` are done, whichever way it uses the CPUs: one run at
    a time over every CPU (intra-op threads, the ceiling this bench used first), or
    one run per CPU at once with one thread each (what the job does). Returns it and
    its way."""
    cpus = intra_op_threads()
    x = np.random.default_rng(1).standard_normal((batch_rows, width), dtype=np.float32)
    feeds = {model.input_names[0]: x}
    spread = cpu_session(str(model.path), cpus)
    single = model.session  # one intra-op thread (the job's)
    runs = max(1, rows // batch_rows)

    def one_at_a_time() -> float:
        spread.run(None, feeds)
        started = time.perf_counter()
        for _ in range(runs):
            spread.run(None, feeds)
        return runs * batch_rows / (time.perf_counter() - started)

    def at_once() -> float:
        with ThreadPoolExecutor(cpus) as pool:
            list(pool.map(lambda _: single.run(None, feeds), range(cpus)))
            started = time.perf_counter()
            list(pool.map(lambda _: single.run(None, feeds), range(runs)))
            return runs * batch_rows / (time.perf_counter() - started)

    found = {f"{cpus} intra-op threads": one_at_a_time(), f"{cpus} runs at once": at_once()}
    way = max(found, key=lambda k: found[k])
    return found[way], way


def outside_the_model(job: BatchJob, ceiling_rows_per_s: float) -> tuple[float, float, float]:
    """The CPU the job spends a row outside the model, each part timed alone (no model
    running beside it), over its first chunks up to a whole row group (chunks that split
    one share its decoding), best of two: reading them into model input, and making and
    writing their output. Returns both (us of one CPU a row) and the most a job doing
    that work can reach against the ceiling: the model's CPU a row at the ceiling (every
    CPU running it) over that plus this, with nothing lost to contention."""
    scorer = job.scorer()
    scored: list[Scored] = []  # the model's outputs, computed once (not timed)
    per_row: list[tuple[float, float]] = []
    try:
        with tempfile.TemporaryDirectory() as out:
            options = replace(job.options, output=Path(out))
            for _ in range(2):
                read = write = 0.0
                rows = 0
                chunks = job.source.chunks(job.columns, options.chunk_rows, set())
                for k, chunk in enumerate(chunks):
                    began = time.thread_time()  # this thread's CPU: the job reads on one too
                    table = chunk.load()
                    x, reasons = scorer.prepare(chunk, table)
                    read += time.thread_time() - began
                    if k == len(scored):
                        scored.append(scorer.predict(x, reasons))
                    began = time.thread_time()
                    write_parts(options, chunk, scorer.output_table(chunk, table, scored[k]))
                    write += time.thread_time() - began
                    rows += table.num_rows
                    if rows >= ROW_GROUP:
                        break
                per_row.append((1e6 * read / rows, 1e6 * write / rows))
    finally:
        scorer.close()
    read_us, write_us = min(per_row)
    model_us = 1e6 * intra_op_threads() / ceiling_rows_per_s
    return read_us, write_us, model_us / (model_us + read_us + write_us)


@dataclass
class Beside:
    """A job's result between two measurements of the ceiling."""

    result: BatchResult
    before: float
    after: float
    way: str
    """How the higher of the two ran ONNX Runtime."""

    @property
    def top(self) -> float:
        return max(self.before, self.after)


@dataclass
class Measured:
    """A model's job as the local engine ran it, for the same job on Ray after."""

    label: str
    job: BatchJob
    ceiling_rows: int

    def beside_ceiling(self, output: Path, run: Callable[[BatchJob], BatchResult]) -> Beside:
        """`run` on the job writing to `output` (emptied first), between two
        measurements of the ceiling."""
        job, batch = self.job, self.job.options.batch_rows
        before, way = ceiling(job.model, job.feed.width, batch, self.ceiling_rows)
        shutil.rmtree(output, ignore_errors=True)
        result = run(BatchJob(job.source, job.model, replace(job.options, output=output)))
        after, way_after = ceiling(job.model, job.feed.width, batch, self.ceiling_rows)
        return Beside(result, before, after, way if before >= after else way_after)


def measure(
    client: RegistryClient,
    address: str,
    work: Path,
    name: str,
    layers: tuple[int, ...],
    rows: int,
    batch: int,
    repeat: int,
    other_outputs: bool,
) -> Measured | None:
    if not rows:
        return None
    artifact = work / f"{name}.onnx"
    onnx.save(mlp(layers, seed=1, name=name), artifact)
    client.create_model(name)
    client.upload_file(artifact, rpb.UploadMetadata(model=name))
    client.set_alias(name, "production", 1, expected_version=0)
    ref = ModelRef.parse(f"{name}@production")
    # As the CLI loads it: one intra-op thread, one run per CPU at once.
    model = fetch(client, resolve(client, ref), work / "cache", threads=1)
    width = layers[0]
    source = work / f"{name}.parquet"
    features = write_input(source, width, rows, as_list=width > 64)
    ceiling_rows = min(rows, max(batch * 8, rows // 4))
    options = BatchOptions(
        output=work / f"{name}-out",
        features=tuple(features),
        keys=("id",),
        batch_rows=batch,
        # At least about 8 chunks, so that reading, scoring and writing overlap (and
        # Ray has work for every actor).
        chunk_rows=min(DEFAULT_CHUNK_ROWS, max(batch, rows // 8)),
        progress=False,
        scoring_threads=intra_op_threads(),
    )
    label = f"{name:5s} {'x'.join(map(str, layers))} rows {rows:,} batch {batch:,}"
    print(f"{label}, chunks of {options.chunk_rows:,}, {intra_op_threads()} CPUs:", flush=True)
    measured = Measured(label, BatchJob(FileInput([source]), model, options), ceiling_rows)
    for _ in range(repeat):
        local = measured.beside_ceiling(options.output, run_local)
        top = local.top
        print(
            f"  local engine: job {local.result.rows_per_s:>10,.0f} rows/s; ORT ceiling "
            f"{top:>10,.0f} rows/s ({local.way}; before {local.before:,.0f}, after "
            f"{local.after:,.0f}) -> {local.result.rows_per_s / top:.2f}x (target >= 0.80x)",
            flush=True,
        )
        read_us, write_us, most = outside_the_model(measured.job, top)
        print(
            f"    outside the model, timed alone: reading {read_us:.2f} and writing "
            f"{write_us:.2f} us of one CPU a row, against the model's "
            f"{1e6 * intra_op_threads() / top:.2f} at the ceiling: at most {most:.2f}x here",
            flush=True,
        )
        if other_outputs:
            extra = work / f"{name}-outputs.parquet"
            extra_rows = min(rows, OUTPUTS_ROWS)
            write_input(extra, width, extra_rows, as_list=width > 64)
            print(f"  the same job over {extra_rows:,} rows, other outputs and ways:", flush=True)
            for label, result in outputs_and_ways(address, work, model, extra, options):
                print(
                    f"    {label:32s} job {result.rows_per_s:>10,.0f} rows/s -> "
                    f"{result.rows_per_s / top:.2f}x of the ceiling",
                    flush=True,
                )
    return measured


def outputs_and_ways(
    address: str, work: Path, model: ScoringModel, source: Path, options: BatchOptions
) -> Iterator[tuple[str, BatchResult]]:
    """The job into a SQLite table, a PostgreSQL table (the machine's, a schema of its
    own dropped after) and, as Parquet, through an inference service process that
    follows the registry (--via-service, 4 requests in flight)."""

    def run(options: BatchOptions, service: ServiceModel | None = None) -> BatchResult:
        shutil.rmtree(options.output, ignore_errors=True)
        job = BatchJob(FileInput([source]), model, options)
        job.service = service
        return run_local(job)

    database = work / f"{model.name}-predictions.db"
    database.unlink(missing_ok=True)
    sqlite = replace(options, output_db=f"sqlite:///{database}", output_table="predictions")
    yield "--output-db sqlite", run(sqlite)
    schema = f"bench_batch_{os.getpid()}"
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as db:
            db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            postgres = replace(
                options, output_db=POSTGRES_URL, output_table="predictions", output_schema=schema
            )
            try:
                yield "--output-db postgresql (COPY)", run(postgres)
            finally:
                db.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    except psycopg.OperationalError as exc:
        print(f"    --output-db postgresql: skipped, {POSTGRES_URL} unreachable ({exc})")
    command = [
        sys.executable, "-m", "modelplane.cli.main", "serve", "inference",
        "--registry", address, "--load-model", f"{model.name}@production", "--port", "0",
        "--metrics-port", "0", "--data-dir", str(work / "inference"), "--log-level", "WARNING",
    ]  # fmt: skip
    with serving(command, work / "inference.log") as served:
        service = ServiceModel(
            ModelRef.parse(f"{model.name}@production"),
            model.input_names[0],
            model.output_names,
            ServiceOptions(address=served.address, batch_rows=options.batch_rows),
        )
        try:
            yield "--via-service (4 in flight)", run(options, service)
        finally:
            service.close()


def main() -> int:
    full = os.environ.get("MODELPLANE_BENCH_BATCH_FULL") == "1"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--light-rows", type=int, default=FULL_ROWS if full else 3_000_000)
    parser.add_argument("--heavy-rows", type=int, default=FULL_ROWS if full else 200_000)
    parser.add_argument("--light-batch", type=int, default=16_384)
    parser.add_argument("--heavy-batch", type=int, default=4_096)
    parser.add_argument("--no-ray", action="store_true", help="leave --engine ray out")
    parser.add_argument(
        "--no-outputs",
        action="store_true",
        help="leave out the database outputs and --via-service",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure each so often (a shared machine is noisy)"
    )
    args = parser.parse_args()
    print("batch scoring, Parquet in and out (rows/s, higher is better)", flush=True)
    reuse_freed_buffers()  # as `modelplane score batch` does for its job
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with registry(work / "registry") as address, RegistryClient(address) as client:
            measured = [
                measure(
                    client,
                    address,
                    work,
                    name,
                    layers,
                    rows,
                    batch,
                    args.repeat,
                    not args.no_outputs,
                )
                for name, layers, rows, batch in (
                    ("light", LIGHT_MLP, args.light_rows, args.light_batch),
                    ("heavy", HEAVY_MLP, args.heavy_rows, args.heavy_batch),
                )
            ]
            if not args.no_ray:
                on_ray(address, work, [m for m in measured if m is not None], args.repeat)
    return 0


def on_ray(address: str, work: Path, measured: list[Measured], repeat: int) -> None:
    """The same jobs with --engine ray, on a local Ray instance started now: started
    before the local engine's runs, its idle processes took CPU from them (about 3% of
    this machine)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(
        f"--engine ray: a local Ray instance ({cpus} CPUs) started in "
        f"{time.perf_counter() - started:.1f} s; one actor per CPU",
        flush=True,
    )
    try:
        ray_options = RayOptions(registry=address, cache_dir=work / "cache")
        for m in measured:
            for _ in range(repeat):
                scored = m.beside_ceiling(
                    work / f"{m.job.model.name}-ray", lambda job: run_ray(job, ray_options)
                )
                print(
                    f"  {m.label} ({scored.result.chunks_scored} chunks): job "
                    f"{scored.result.rows_per_s:>10,.0f} rows/s; ORT ceiling {scored.top:>10,.0f} "
                    f"rows/s -> {scored.result.rows_per_s / scored.top:.2f}x",
                    flush=True,
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
