"""`modelplane score`: a registered model scored outside the inference service.

`score batch` runs a resumable, exactly-once batch job (modelplane.scoring.batch).
`score stream` is added by modelplane.scoring.stream when that module exists: its
`register_stream(subcommands)` (or `register`) is called with this group's subparsers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  # columns f0..f7 are the model's input; keep customer_id with each prediction
  modelplane score batch data/*.parquet --model fraud@production \\
      --features f0,f1,f2,f3,f4,f5,f6,f7 --keys customer_id --output out/
  # a model fed by a feature bundle: features joined point-in-time from the feature
  # service for each row's entity keys and event time
  modelplane score batch events/ --model fraud/1 --timestamp event_timestamp \\
      --feature-service 127.0.0.1:50052 --output out/ --partition-by event_timestamp
  # a query (rows in a deterministic order: ORDER BY a unique key)
  modelplane score batch --sql 'SELECT * FROM events ORDER BY id' \\
      --db sqlite:///events.db --model fraud@production --features ... --output out/

  # the same job on a Ray cluster (Parquet input): an actor pool, the verified model
  # loaded once per actor; without --ray-address, a local Ray instance for the job
  modelplane score batch data/ --model fraud@production --features ... --output out/ \\
      --engine ray --ray-address 10.0.0.5:6379

A killed job resumes where it stopped when run again with the same arguments: chunks
in the output's manifest are skipped, the others scored again; every input row ends up
in exactly one committed part file. A resume with another input, model version or
options is refused.
"""

# Testing only: seconds to pause after each committed chunk, so a test can kill a job
# half way. Read here, at the command's entry, never inside the scoring code.
CHUNK_DELAY_ENV = "MODELPLANE_SCORE_CHUNK_DELAY_S"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "score",
        help="score a registered model over files, a query or a stream",
        description="Score a registered model outside the inference service.",
    )
    subcommands = parser.add_subparsers(dest="score_command", required=True, metavar="MODE")
    _register_batch(subcommands)
    try:
        stream = importlib.import_module("modelplane.scoring.stream")
    except ModuleNotFoundError as exc:
        if exc.name != "modelplane.scoring.stream":
            raise
    else:
        stream_register = getattr(stream, "register_stream", None) or getattr(
            stream, "register", None
        )
        if stream_register is not None:
            stream_register(subcommands)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _register_batch(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "batch",
        help="score Parquet/CSV files or a SQL query into Parquet, resumable, exactly once",
        description="Score every row of Parquet/CSV files (or a directory of them) or of a "
        "SQL query with a registry model version (digest verified) in process, writing "
        "Parquet part files and a manifest that makes a re-run resume exactly once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", type=Path, help="Parquet/CSV files or directories")
    parser.add_argument("--format", choices=("parquet", "csv"), default="", help="input format")
    parser.add_argument("--sql", default="", help="a query instead of files (needs --db)")
    parser.add_argument("--db", default="", help="sqlite:///PATH or postgresql://... for --sql")
    parser.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    parser.add_argument(
        "--registry", default="127.0.0.1:50051", help="registry host:port (default %(default)s)"
    )
    parser.add_argument(
        "--features", type=_names, default=(), help="input columns that make the model's input"
    )
    parser.add_argument(
        "--keys", type=_names, default=(), help="input key columns copied to each prediction"
    )
    parser.add_argument("--timestamp", default="", help="the input's event time column")
    parser.add_argument(
        "--feature-service",
        default="",
        help="feature service host:port, for a model fed by a feature bundle",
    )
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--partition-by",
        type=_names,
        default=(),
        help="key or timestamp columns to partition by (a timestamp by its date)",
    )
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=262_144,
        help="rows per committed chunk; about four chunks of model input are held in "
        "memory: lower it for wide inputs (default %(default)s)",
    )
    parser.add_argument("--batch-rows", type=int, default=16_384, help="rows per model run")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="model runs at once, one CPU each (0: all CPUs; --engine ray: per actor)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".modelplane/score-cache"),
        help="where verified model artifacts are kept (default %(default)s)",
    )
    parser.add_argument("--monitoring", default="", help="monitoring host:port: log a sample")
    parser.add_argument(
        "--monitoring-sample",
        type=float,
        default=0.01,
        help="fraction of rows logged to monitoring (default %(default)s)",
    )
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: in this process (default); ray: on a Ray cluster (Parquet input)",
    )
    parser.add_argument(
        "--ray-address",
        default="",
        help="--engine ray: the cluster to join (default: a local Ray instance for the job)",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        default=0,
        help="--engine ray: scoring actors (0: as many as the cluster's CPUs hold)",
    )
    parser.add_argument(
        "--ray-actor-cpus",
        type=float,
        default=1.0,
        help="--engine ray: CPUs per actor, and its batches scored at once unless --threads",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    import grpc

    from modelplane.client.feature import FeatureClient, FeatureServiceError
    from modelplane.client.registry import RegistryClient
    from modelplane.scoring import batch
    from modelplane.scoring.manifest import JobRunning, ManifestMismatch
    from modelplane.scoring.model import ModelRef, fetch, intra_op_threads, resolve

    if args.chunk_rows < 1 or args.batch_rows < 1:
        print("error: --chunk-rows and --batch-rows must be at least 1", file=sys.stderr)
        return 2
    delay = float(os.environ.get(CHUNK_DELAY_ENV, "0") or 0)
    clients: list[Any] = []
    try:
        if args.sql:
            if args.inputs or not args.db:
                raise batch.BatchInputError("--sql takes --db and no input files")
            source: batch.InputSource = batch.SqlInput(args.sql, args.db)
        else:
            if not args.inputs:
                raise batch.BatchInputError("give input files or a directory, or --sql")
            source = batch.FileInput(args.inputs, args.format)
        ref = ModelRef.parse(args.model)
        registry = RegistryClient(args.registry)
        clients.append(registry)
        # One intra-op thread per run, and as many runs at once as CPUs (see
        # BatchOptions.scoring_threads). The ray engine's actors load the model
        # themselves: the driver only checks its inputs and outputs.
        model = fetch(registry, resolve(registry, ref), args.cache_dir, threads=1)
        feature_client = None
        if args.feature_service:
            feature_client = FeatureClient(args.feature_service)
            clients.append(feature_client)
        monitoring = None
        if args.monitoring:
            from modelplane.client.monitoring import MonitoringClient

            monitoring = MonitoringClient(args.monitoring)
            clients.append(monitoring)
        options = batch.BatchOptions(
            output=args.output,
            features=args.features,
            keys=args.keys,
            timestamp=args.timestamp,
            partition_by=args.partition_by,
            chunk_rows=args.chunk_rows,
            batch_rows=args.batch_rows,
            chunk_delay_s=delay,
            progress=not args.no_progress,
            monitoring_sample=args.monitoring_sample if monitoring is not None else 0.0,
            scoring_threads=args.threads or intra_op_threads(),
        )
        job = batch.BatchJob(source, model, options, feature_client, monitoring)
        if args.engine == "ray":
            from modelplane.scoring.ray_engine import RayOptions, run_ray

            if args.ray_actors < 0 or args.ray_actor_cpus <= 0:
                raise batch.BatchInputError("--ray-actors >= 0 and --ray-actor-cpus > 0")
            ray_options = RayOptions(
                address=args.ray_address,
                actors=args.ray_actors,
                actor_cpus=args.ray_actor_cpus,
                threads=args.threads,
                registry=args.registry,
                cache_dir=args.cache_dir,
                feature_service=args.feature_service,
                monitoring=args.monitoring,
                credentials=registry.credentials,
            )
            result = run_ray(job, ray_options)
        else:
            result = batch.run_local(job)
    except (batch.BatchInputError, ManifestMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FeatureServiceError as exc:
        print(f"error: feature service: {exc}", file=sys.stderr)
        return 1
    except ConnectionError as exc:  # --engine ray: no cluster at --ray-address
        print(f"error: ray: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        print(f"error: registry: {code.name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    finally:
        for client in clients:
            client.close()
    print(result.summary())
    return 0
