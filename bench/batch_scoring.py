"""Batch scoring throughput: `modelplane score batch`'s local engine over a Parquet input,
for the light and heavy MLPs, beside the in-process ONNX Runtime ceiling at the same
batch size and thread count (the same session options, a matrix already in memory, no
I/O). The target is a job at 0.8x the ceiling or better: bounded by the model, not by
reading, converting or writing.

The light MLP reads 64 float32 columns (a tabular input); the heavy one a fixed-size
list column of 512 float32 (an embedding). By default a few million light rows and
50k heavy rows keep the run near a minute; MODELPLANE_BENCH_BATCH_FULL=1 scores the
issue's 10M rows of each (the heavy one then takes many minutes on 2 cores).
`make bench` runs it."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from modelplane.client.registry import RegistryClient  # noqa: E402
from modelplane.examples.models import HEAVY_MLP, LIGHT_MLP, mlp  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as rpb  # noqa: E402
from modelplane.scoring.batch import BatchJob, BatchOptions, FileInput, run_local  # noqa: E402
from modelplane.scoring.model import ModelRef, ScoringModel, fetch, resolve  # noqa: E402
from modelplane.services.registry.main import Settings, build  # noqa: E402

FULL_ROWS = 10_000_000
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
    return names


def ceiling(model: ScoringModel, width: int, batch_rows: int, rows: int) -> float:
    """Rows/s of the same session on one in-memory batch, run until `rows` are done."""
    x = np.random.default_rng(1).standard_normal((batch_rows, width), dtype=np.float32)
    feeds = {model.input_names[0]: x}
    model.session.run(None, feeds)
    done = 0
    started = time.perf_counter()
    while done < rows:
        model.session.run(None, feeds)
        done += batch_rows
    return done / (time.perf_counter() - started)


def measure(
    client: RegistryClient, work: Path, name: str, layers: tuple[int, ...], rows: int, batch: int
) -> None:
    artifact = work / f"{name}.onnx"
    onnx.save(mlp(layers, seed=1, name=name), artifact)
    client.create_model(name)
    client.upload_file(artifact, rpb.UploadMetadata(model=name))
    client.set_alias(name, "production", 1, expected_version=0)
    model = fetch(client, resolve(client, ModelRef.parse(f"{name}@production")), work / "cache")
    width = layers[0]
    source = work / f"{name}.parquet"
    features = write_input(source, width, rows, as_list=width > 64)
    limit = ceiling(model, width, batch, min(rows, max(batch * 4, rows // 4)))
    options = BatchOptions(
        output=work / f"{name}-out",
        features=tuple(features),
        keys=("id",),
        batch_rows=batch,
        progress=False,
    )
    result = run_local(BatchJob(FileInput([source]), model, options))
    after = ceiling(model, width, batch, min(rows, max(batch * 4, rows // 4)))
    best = max(limit, after)
    print(
        f"{name:5s} {'x'.join(map(str, layers)):>18s} rows {rows:>10,} batch {batch:>6,} "
        f"threads {model.session.get_session_options().intra_op_num_threads}: "
        f"job {result.rows_per_s:>10,.0f} rows/s, ORT ceiling {best:>10,.0f} rows/s "
        f"(before {limit:,.0f}, after {after:,.0f}) -> {result.rows_per_s / best:.2f}x "
        f"(target >= 0.80x)"
    )


def main() -> int:
    full = os.environ.get("MODELPLANE_BENCH_BATCH_FULL") == "1"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--light-rows", type=int, default=FULL_ROWS if full else 3_000_000)
    parser.add_argument("--heavy-rows", type=int, default=FULL_ROWS if full else 50_000)
    parser.add_argument("--light-batch", type=int, default=16_384)
    parser.add_argument("--heavy-batch", type=int, default=4_096)
    args = parser.parse_args()
    print("batch scoring, local engine, Parquet in and out (rows/s, higher is better)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with registry(work / "registry") as address, RegistryClient(address) as client:
            measure(client, work, "light", LIGHT_MLP, args.light_rows, args.light_batch)
            measure(client, work, "heavy", HEAVY_MLP, args.heavy_rows, args.heavy_batch)
    print("--engine ray: not implemented yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
