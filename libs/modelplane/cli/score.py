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

  # into a database table instead of Parquet (PostgreSQL or sqlite:///PATH), with a
  # <table>_manifest of committed chunks next to it
  modelplane score batch data/ --model fraud@production --features ... \
      --output-db postgresql://scorer@db/reports --output-schema ml --output-table fraud_scores
  # through the inference service instead of ONNX Runtime in process
  modelplane score batch data/ --model fraud@production --features ... --output out/ \
      --via-service 127.0.0.1:8001 --batch-rows 64

  # the same job on a Ray cluster (Parquet input): an actor pool, the verified model
  # loaded once per actor; without --ray-address, a local Ray instance for the job
  modelplane score batch data/ --model fraud@production --features ... --output out/ \\
      --engine ray --ray-address 10.0.0.5:6379

A killed job resumes where it stopped when run again with the same arguments: chunks
in the output's manifest are skipped, the others scored again; every input row ends up
in exactly one committed part file (or, with --output-db, in the table: each chunk's
rows and its manifest row are inserted in one transaction). A resume with another
input, model version or options is refused.
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
        help="score Parquet/CSV files or a SQL query into Parquet or a table, exactly once",
        description="Score every row of Parquet/CSV files (or a directory of them) or of a "
        "SQL query with a registry model version (digest verified), in process or through "
        "the inference service, writing Parquet part files or rows of a database table "
        "and a manifest that makes a re-run resume exactly once.",
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
    parser.add_argument("--output", type=Path, help="output directory (Parquet part files)")
    parser.add_argument(
        "--output-db",
        default="",
        help="instead of --output: sqlite:///PATH or postgresql://... whose --output-table "
        "receives the predictions (created if missing; <table>_manifest and <table>_job "
        "beside it); local engine only",
    )
    parser.add_argument("--output-table", default="", help="--output-db: the table's name")
    parser.add_argument(
        "--output-schema", default="", help="--output-db on PostgreSQL: the table's schema"
    )
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
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=16_384,
        help="rows per model run, or per request with --via-service (there at most the "
        "served model's max_batch_size) (default %(default)s)",
    )
    parser.add_argument(
        "--via-service",
        default="",
        metavar="ADDRESS",
        help="score through the inference service at host:port (KServe v2 ModelInfer) "
        "instead of ONNX Runtime in process; NAME@ALIAS is routed by the service, "
        "NAME/VERSION pinned; each row records the version that answered",
    )
    parser.add_argument(
        "--service-in-flight",
        type=int,
        default=4,
        help="--via-service: requests in flight at once (default %(default)s)",
    )
    parser.add_argument(
        "--service-timeout",
        type=float,
        default=30.0,
        help="--via-service: deadline of each request, seconds (default %(default)s)",
    )
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


def _output_problem(args: argparse.Namespace) -> str:
    """What is wrong with the output and engine options ('' if nothing)."""
    if (args.output is None) == (not args.output_db):
        return "give either --output (a directory) or --output-db (a database)"
    if args.output_db and not args.output_table:
        return "--output-db takes --output-table"
    if not args.output_db and (args.output_table or args.output_schema):
        return "--output-table and --output-schema go with --output-db"
    if args.engine == "ray" and args.output_db:
        return "--engine ray writes Parquet only: use --output, or the local engine"
    if args.engine == "ray" and args.via_service:
        return "--engine ray scores in its actors: --via-service is for the local engine"
    if args.service_in_flight < 1 or args.service_timeout <= 0:
        return "--service-in-flight must be at least 1 and --service-timeout above 0"
    return ""


def _database_errors() -> tuple[type[BaseException], ...]:
    """sqlite3's and psycopg's errors (raised while an output table is written)."""
    import sqlite3

    import psycopg

    return (sqlite3.Error, psycopg.Error)


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
    problem = _output_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from modelplane.scoring.via_service import ServiceModel, ServiceOptions, ServiceScoringError

    database_errors = _database_errors()
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
            output=args.output if args.output is not None else Path(),
            output_db=args.output_db,
            output_table=args.output_table,
            output_schema=args.output_schema,
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
        if args.via_service:
            job.service = ServiceModel(
                ref,
                job.feed.input_name,
                model.output_names,
                ServiceOptions(
                    address=args.via_service,
                    batch_rows=args.batch_rows,
                    in_flight=args.service_in_flight,
                    timeout_s=args.service_timeout,
                    credentials=registry.credentials,
                ),
            )
            clients.append(job.service)
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
            batch.reuse_freed_buffers()  # this process runs the job
            result = batch.run_local(job)
    except (batch.BatchInputError, ManifestMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (JobRunning, ServiceScoringError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except database_errors as exc:
        print(f"error: output database: {type(exc).__name__}: {exc}", file=sys.stderr)
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
