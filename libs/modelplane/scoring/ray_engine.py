"""`modelplane score batch --engine ray`: the batch job of batch.py on a Ray cluster
(Ray Data), resumable and exactly once under the same manifest.

The design, and why it is exactly once:
  * The driver (the CLI process) plans the job's chunks exactly as the local engine
    does (`FileInput.parquet_chunks`: Parquet files by row-group ranges, the same chunk
    ids), opens the same manifest (which deletes orphan and temporary files left by a
    crash) and keeps the chunks it does not hold.
  * Those chunks, as plain values (path, row-group sizes, row range, first input row),
    are the rows of one Ray dataset, one chunk per block. `map_batches` runs them
    through a fixed pool of actors (`ActorPoolStrategy`), each of which fetches the
    model version from the registry once, verified by digest (model.py, as the local
    engine), and builds the same `ChunkScorer` as the local engine. An actor call
    reads its chunk's row groups straight from the file, scores them, writes the
    chunk's part files under temporary names, fsyncs and renames them to their final
    names (`part-<chunk id>.parquet`), and returns only the chunk id, its row count and
    its file names.
  * The driver consumes those small results as they stream in and records each chunk
    in the manifest, in one SQLite transaction, only then. A chunk is done if and only
    if its row is in the manifest, as for the local engine.
  Whatever is killed (the driver, an actor, a node) and whenever: a chunk not yet in
  the manifest is scored again by the re-run, and its files take the same final names
  (replacing whatever a dead attempt may have renamed into place, or being deleted as
  orphans when the re-run opens the manifest). A retried actor task (Ray retries on
  actor death) writes the same names too. So each input row ends in exactly one part
  file named by exactly one committed chunk. Only the driver writes the manifest, and
  its lock keeps two drivers of one job apart.

Why not `read_parquet` → `map_batches` → `write_parquet` end to end: Ray's Parquet
reader neither addresses row groups nor tells a row's position in the input (the
`input_row` column and the chunk boundaries need both), it splits and merges blocks as
it sees fit (so a chunk's rows could end in several tasks' outputs), and
`write_parquet` names its files itself and commits the whole dataset at once, which
is not resumable by chunk. The Ray dataset therefore carries chunks, not rows; the
reading and writing happen in the actors, one chunk per call, in parallel over the
cluster, with the same pyarrow code as the local engine.

On a cluster of several machines the input files, the output directory and the model
cache directory must be paths every node sees alike (a shared volume); the manifest
is written by the driver only. Only Parquet inputs are supported: CSV files and SQL
queries are chunked as they are read, which one process does (use the local engine).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import time
from collections.abc import Generator
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from modelplane.client.credentials import ClientCredentials
from modelplane.scoring.batch import (
    BatchInputError,
    BatchJob,
    BatchOptions,
    BatchResult,
    ChunkScorer,
    FileInput,
    ModelFeed,
    ParquetChunk,
    reuse_freed_buffers,
    write_success,
)
from modelplane.scoring.manifest import ChunkManifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where the job runs and how wide."""

    address: str = ""
    """A cluster to join (`ray://…` or `host:port` of its GCS); empty: start a local
    Ray instance on this machine for the job, stopped at its end."""
    actors: int = 0
    """Scoring actors; 0: as many as the cluster's CPUs hold at `actor_cpus` each."""
    actor_cpus: float = 1.0
    """CPUs reserved per actor; each actor then scores this many batches at once
    (unless `threads` says otherwise)."""
    threads: int = 0
    registry: str = "127.0.0.1:50051"
    cache_dir: Path = Path(".modelplane/score-cache")
    feature_service: str = ""
    monitoring: str = ""
    credentials: ClientCredentials | None = None
    """The driver's credentials, handed to the actors (the cluster's environment may
    not have them)."""


ACTOR_BASE_BYTES = 512 << 20
"""An actor's memory beside its chunk: the interpreter, Ray, pyarrow, ONNX Runtime and a
model of tens of MB."""
CHUNK_COPIES = 5
"""How many times a chunk's model input an actor holds at once: the decoded row groups,
the chunk's table, its input matrix, the outputs and the table written. Measured by Ray
Data: ~2.4 GiB an actor for 262,144-row chunks of 512 float32 features (0.5 GiB)."""


def actor_memory(chunk_rows: int, row_bytes: int, cluster_bytes: float, actors: int) -> int:
    """The memory a scoring actor asks Ray for, so that the scheduler does not pack more
    actors on a node than its memory holds (without it Ray asks for none and warns). Never
    more than an equal share of the cluster's memory: a request no node can grant would
    leave the actor unscheduled and the job waiting forever."""
    wanted = ACTOR_BASE_BYTES + CHUNK_COPIES * chunk_rows * row_bytes
    if cluster_bytes > 0:
        wanted = min(wanted, int(cluster_bytes / max(1, actors)))
    return int(wanted)


@dataclass(frozen=True)
class ActorSpec:
    """Everything an actor needs to score chunks as the driver's job would."""

    model: str
    version: int
    sha256: str
    feed: ModelFeed
    keys: tuple[str, ...]
    columns: tuple[str, ...]
    options: BatchOptions
    job_id: str
    registry: str
    cache_dir: str
    feature_service: str
    monitoring: str
    credentials: ClientCredentials | None


class ChunkActor:
    """A Ray Data actor: the verified model, loaded once, and the job's scorer; each call
    scores and writes the chunks of its batch (one per batch) and returns their ids,
    row counts and files."""

    def __init__(self, spec: ActorSpec) -> None:
        from modelplane.client.registry import RegistryClient
        from modelplane.scoring.model import fetch

        self.spec = spec
        reuse_freed_buffers()  # the actor's process runs only this job's chunks
        with RegistryClient(spec.registry, credentials=spec.credentials) as registry:
            version = registry.get_version(spec.model, version=spec.version)
            if version.artifact.sha256 != spec.sha256:
                raise RuntimeError(
                    f"{spec.model}/{spec.version} has digest {version.artifact.sha256} in "
                    f"the registry; the job was planned with {spec.sha256}"
                )
            model = fetch(registry, version, Path(spec.cache_dir), threads=1)
        # Clients for the actor's life (it ends with the job).
        feature_client = None
        if spec.feature_service:
            from modelplane.client.feature import FeatureClient

            feature_client = FeatureClient(spec.feature_service, credentials=spec.credentials)
        monitoring = None
        if spec.monitoring and spec.options.monitoring_sample > 0:
            from modelplane.client.monitoring import MonitoringClient

            monitoring = MonitoringClient(spec.monitoring, credentials=spec.credentials)
        self.scorer = ChunkScorer(
            model, spec.feed, spec.keys, spec.options, feature_client, monitoring
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        results: list[dict[str, Any]] = []
        for item in batch.to_pylist():
            chunk = ParquetChunk(**{**item, "groups": tuple(item["groups"])})
            began = time.perf_counter()
            table = chunk.load(self.spec.columns)
            output, x, rejected = self.scorer.score_chunk(chunk, table)
            files = self.scorer.write_chunk(chunk, output)
            if self.scorer.monitoring is not None:
                self.scorer.log_sample(self.spec.job_id, output, x, time.perf_counter() - began)
            results.append(
                {
                    "chunk_id": chunk.chunk_id,
                    "rows": output.num_rows,
                    "rejected": rejected,
                    "files": json.dumps(files),
                }
            )
        return pa.Table.from_pylist(results)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fails fast when nothing listens at a `host:port` (or `ray://host:port`) address:
    ray.init retried such an address for minutes."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {address}: {exc}") from None


def _start_or_join(address: str) -> bool:
    """Connects this process to Ray; True if it started (so must stop) the instance."""
    import ray

    if ray.is_initialized():
        return False
    # No usage report from a batch job; and a quiet driver (its own progress bar).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return not address


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_ray(job: BatchJob, ray_options: RayOptions) -> BatchResult:
    """Scores every chunk the manifest does not hold on a Ray cluster, committing each
    as its actor reports it written."""
    from tqdm import tqdm

    if importlib.util.find_spec("ray") is None:
        raise BatchInputError(
            "--engine ray needs Ray, an optional dependency: pip install 'modelplane[ray]' "
            "(the local engine needs nothing more)"
        )
    source = job.source
    if not isinstance(source, FileInput) or source.format != "parquet":
        raise BatchInputError(
            "--engine ray reads Parquet files; CSV files and SQL queries are read by the "
            "local engine"
        )
    if job.feed.bundle is not None and not ray_options.feature_service:
        raise BatchInputError("--engine ray with a feature bundle needs --feature-service")
    options = job.options
    result = BatchResult(output=options.output)
    manifest = ChunkManifest.open(options.output, job.identity())
    try:
        committed = manifest.committed()
        plan = source.parquet_chunks(options.chunk_rows)
        pending = [chunk for chunk in plan if chunk.chunk_id not in committed]
        for chunk_id in committed:
            result.chunks_skipped += 1
            result.rows_skipped += committed[chunk_id].rows
        started = time.perf_counter()
        bar = tqdm(
            total=source.total_rows,
            unit="rows",
            unit_scale=True,
            disable=not options.progress,
            desc=f"{job.model.name}/{job.model.version} (ray)",
        )
        with bar:
            bar.update(result.rows_skipped)
            if pending:
                with closing(_score_on_ray(job, ray_options, pending)) as results:
                    for done in results:
                        files = json.loads(done["files"])
                        manifest.commit(done["chunk_id"], done["rows"], files)
                        result.chunks_scored += 1
                        result.rows_scored += done["rows"]
                        result.rows_rejected += done["rejected"]
                        bar.update(done["rows"])
                        if options.chunk_delay_s:
                            time.sleep(
                                options.chunk_delay_s
                            )  # ok-sleep: test hook, see BatchOptions
        result.seconds = time.perf_counter() - started
        write_success(job, result)
    finally:
        manifest.close()
    return result


def _score_on_ray(
    job: BatchJob, ray_options: RayOptions, pending: list[ParquetChunk]
) -> Generator[dict[str, Any], None, None]:
    """Yields each pending chunk's result ({chunk_id, rows, rejected, files}) once its
    files are in place, in the order they finish."""
    import ray
    import ray.data

    started_here = _start_or_join(ray_options.address)
    try:
        _quiet_ray_data()
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        actor_cpus = ray_options.actor_cpus
        actors = ray_options.actors or max(1, int(cpus // actor_cpus))
        actors = min(actors, len(pending))
        spec = ActorSpec(
            model=job.model.name,
            version=job.model.version,
            sha256=job.model.sha256,
            feed=job.feed,
            keys=job.keys,
            columns=tuple(job.columns),
            # The delay is the driver's (between commits); actors never wait.
            options=replace(
                job.options,
                chunk_delay_s=0.0,
                progress=False,
                scoring_threads=ray_options.threads or max(1, int(actor_cpus)),
            ),
            job_id=job.job_id(),
            registry=ray_options.registry,
            cache_dir=str(Path(ray_options.cache_dir).resolve()),
            feature_service=ray_options.feature_service,
            monitoring=ray_options.monitoring,
            credentials=ray_options.credentials,
        )
        items = [asdict(chunk) for chunk in pending]
        chunks = ray.data.from_items(items, override_num_blocks=len(items))
        memory = actor_memory(
            job.options.chunk_rows,
            job.feed.width * np.dtype(job.feed.dtype).itemsize,
            float(resources.get("memory", 0.0)),
            actors,
        )
        scored = chunks.map_batches(
            ChunkActor,
            fn_constructor_kwargs={"spec": spec},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus,
            memory=memory,
        )
        log.info("scoring %d chunks on %d Ray actors", len(pending), actors)
        yield from scored.iter_rows()
    finally:
        if started_here:
            ray.shutdown()
