"""Inference service: KServe v2 gRPC (tritonclient-compatible) with dynamic batching."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any, Literal

from opentelemetry import trace
from prometheus_client import CollectorRegistry
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from inference import grpc_service_pb2
from modelplane.client.monitoring import MAX_RECORDS_PER_CALL
from modelplane.kernel.cpu_share import process_share, thread_layout
from modelplane.kernel.gc_tuning import SERVING_THRESHOLD
from modelplane.kernel.load_shedding import LoopLagShedder
from modelplane.kernel.metrics import new_registry
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import MAX_MESSAGE_BYTES, ServiceSettings
from modelplane.kernel.startup import StartupError
from modelplane.kernel.telemetry import tracer_provider
from modelplane.services.inference import wire
from modelplane.services.inference.batcher import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MAX_QUEUE_WAIT_S,
)
from modelplane.services.inference.codec import InputLimits
from modelplane.services.inference.enrichment import EnrichmentMetrics, FeatureSource
from modelplane.services.inference.model_config import Defaults
from modelplane.services.inference.prediction_log import (
    PredictionLog,
    PredictionLogConfig,
    parse_rates,
)
from modelplane.services.inference.registry_follower import (
    FollowerMetrics,
    RegistryFollower,
    parse_target,
)
from modelplane.services.inference.repository import (
    ModelRepository,
    RuntimeFactory,
    ort_runtime,
)
from modelplane.services.inference.servicer import InferenceServicer
from modelplane.services.inference.stats import InferenceMetrics, RoutingMetrics
from modelplane.services.inference.workers import serve_share, supervise

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_LIMITS = InputLimits()


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPLANE_INFERENCE_", extra="ignore")

    model_repository: Path | None = Field(
        None, description="Model repository directory; unset means <data_dir>/models."
    )
    model_control_mode: Literal["none", "explicit", "registry"] = Field(
        "none",
        description="none: load every model at start; explicit: only --load-model ones "
        "(RepositoryModelLoad/Unload work in both); registry: every registry model that "
        "has the default alias. With --registry, none means explicit.",
    )
    load_model: list[str] = Field(
        [],
        description="Models to load at start: NAME, or NAME@ALIAS with --registry "
        "(JSON list in the env).",
    )
    registry: str | None = Field(
        None,
        description="Registry address HOST:PORT; set, models are served from the registry's "
        "aliases instead of the model repository.",
    )
    default_alias: str = Field(
        "production", description="Alias followed for --load-model NAME without @ALIAS."
    )
    registry_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of each registry call (downloads: per MiB, at least)."
    )
    registry_discovery_s: float = Field(
        10.0,
        gt=0,
        description="In registry control mode, how often the registry is asked for models "
        "that newly have the default alias.",
    )
    feature_service: str | None = Field(
        None,
        description="Feature service address HOST:PORT, for registry versions that name a "
        "feature bundle: their requests may then send entity keys instead of the tensor.",
    )
    feature_timeout_s: float = Field(
        1.0, gt=0, description="Deadline of each feature-service call (one per batch)."
    )
    artifact_cache_dir: Path | None = Field(
        None,
        description="Registry artifacts cached by digest, and the last known aliases; "
        "unset means <data_dir>/inference-cache.",
    )
    workers: int = Field(
        1, ge=1, description="Server processes sharing the gRPC port (SO_REUSEPORT)."
    )
    max_batch_size: int = Field(
        64, ge=0, description="max_batch_size of models without a config.pbtxt."
    )
    max_queue_delay_us: int = Field(
        DEFAULT_MAX_QUEUE_DELAY_US,
        ge=0,
        description="Batching delay under load for models without a config.pbtxt (µs).",
    )
    lone_batches_on_all_cpus: bool = Field(
        True,
        description="A batch that is the only work of the process, while callers keep about "
        "one request in flight, runs on the event loop's CPU too (a second ONNX Runtime "
        "session per CPU instance, so a second copy of the weights; not for models over "
        "1 GiB).",
    )
    max_queue_rows: int = Field(
        1024, gt=0, description="Queue bound in rows where config.pbtxt sets none."
    )
    max_queue_wait_us: int = Field(
        int(DEFAULT_MAX_QUEUE_WAIT_S * 1e6),
        ge=0,
        description="Longest expected queue wait a request is admitted to (µs; at least two "
        "batches' time; 0: none) where config.pbtxt sets no default_timeout_microseconds.",
    )
    instance_count: int = Field(
        1, gt=0, description="Runtime instances per model where config.pbtxt sets none."
    )
    shed_loop_lag_us: int = Field(
        0,
        ge=0,
        description="Refuse a share of new ModelInfer calls at their headers while the "
        "event loop runs later than this (µs; 0: never), so that overload far past "
        "capacity is answered fast (see kernel/load_shedding.py).",
    )
    runtime_thread_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Nice value of the threads that run batches (0: as the process); e.g. "
        "10 on a dedicated CPU keeps overload rejections fast. Starves them beside other "
        "busy processes on a shared CPU, or under callers that resend refused calls at once "
        "instead of waiting out the retry hint (README, Overload).",
    )
    execution_provider: str = Field(
        "auto", description="auto (CUDA when present), cpu or cuda, where config sets none."
    )
    thread_budget: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per model, split across its instances; "
        "0: the CPUs this process (or worker) may use, less the event loop's one.",
    )
    gc_threshold: int = Field(
        SERVING_THRESHOLD,
        ge=0,
        description="Python GC young-generation threshold for `serve` (0 keeps Python's 700); "
        "see modelplane.kernel.gc_tuning. Thousands of calls a second on one CPU: 5000 "
        "(shorter collector pauses; README, Overload).",
    )
    monitoring: str | None = Field(
        None,
        description="Monitoring service HOST:PORT; set, successful predictions are logged "
        "there (sampled, batched, off the request path); unset, prediction logging is off.",
    )
    prediction_log_sample_rate: float = Field(
        1.0, ge=0, le=1, description="Share of predictions logged, for models without a rate."
    )
    prediction_log_sample: dict[str, float] = Field(
        {},
        description="Share of predictions logged per model: MODEL=RATE flags (repeatable) "
        "or a JSON object in the env.",
    )
    prediction_log_buffer_rows: int = Field(
        20_000,
        gt=0,
        description="Prediction records waiting to be sent at most; beyond it new ones are "
        "dropped and counted.",
    )
    prediction_log_batch_rows: int = Field(
        1_000,
        gt=0,
        le=MAX_RECORDS_PER_CALL,
        description="Records that make the prediction log send at once; also the most one "
        "LogPredictions call carries.",
    )
    prediction_log_interval_ms: int = Field(
        200, gt=0, description="Longest a prediction record waits before it is sent (ms)."
    )
    prediction_log_timeout_s: float = Field(
        2.0, gt=0, description="Deadline of each LogPredictions call, retries included."
    )
    # The kernel's default, restated so the inference flags document it: a request
    # larger than this is refused by gRPC before it is read (RESOURCE_EXHAUSTED); Triton's
    # 2 GiB - 1 let one 100 MB request through. Tensor-level limits follow below.
    max_message_bytes: int = Field(
        64 * 2**20,
        gt=0,
        le=MAX_MESSAGE_BYTES,
        description="Largest gRPC message sent or received (64 MiB for inference).",
    )
    max_request_elements: int = Field(
        _LIMITS.max_request_elements,
        gt=0,
        description="Tensor elements one request's inputs may declare in all, checked "
        "before anything is allocated.",
    )
    max_request_bytes: int = Field(
        _LIMITS.max_request_bytes,
        gt=0,
        description="Bytes of tensor data one request's inputs may hold in all (elements x "
        "item size; BYTES: their encoded length).",
    )
    max_bytes_element_length: int = Field(
        _LIMITS.max_bytes_element_length,
        gt=0,
        description="Longest BYTES element (one string) a request may send, in bytes.",
    )
    max_rows_per_request: int = Field(
        _LIMITS.max_rows_per_request,
        gt=0,
        description="Rows (first dimension of a batched model's inputs) one request may "
        "send, whatever the model's max_batch_size.",
    )

    @field_validator("prediction_log_sample", mode="before")
    @classmethod
    def _sample_rates(cls, value: Any) -> Any:
        if isinstance(value, list | tuple | dict):
            return parse_rates(value)
        return value

    @property
    def input_limits(self) -> InputLimits:
        return InputLimits(
            max_request_elements=self.max_request_elements,
            max_request_bytes=self.max_request_bytes,
            max_bytes_element_length=self.max_bytes_element_length,
            max_rows_per_request=self.max_rows_per_request,
        )

    @property
    def repository_path(self) -> Path:
        return self.model_repository or self.data_dir / "models"

    @property
    def cache_path(self) -> Path:
        return self.artifact_cache_dir or self.data_dir / "inference-cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Triton-style flags; each is also settable as MODELPLANE_INFERENCE_<NAME>."""
    parser.add_argument(
        "--model-repository", type=Path, metavar="DIR", help="model repository directory"
    )
    parser.add_argument(
        "--model-control-mode",
        choices=["none", "explicit", "registry"],
        help="none loads every model at start; explicit only those given by --load-model; "
        "registry every registry model with the default alias",
    )
    parser.add_argument(
        "--load-model",
        action="append",
        metavar="NAME[@ALIAS]",
        help="model to load at start (repeatable); with --registry NAME@ALIAS follows an "
        "alias (default: production)",
    )
    parser.add_argument(
        "--registry", metavar="HOST:PORT", help="serve models from this registry's aliases"
    )
    parser.add_argument("--default-alias", help="alias followed by default (production)")
    parser.add_argument(
        "--registry-timeout-s", type=float, help="deadline of each registry call (10)"
    )
    parser.add_argument(
        "--registry-discovery-s",
        type=float,
        help="registry control mode: how often to look for new models (10)",
    )
    parser.add_argument(
        "--artifact-cache-dir", type=Path, metavar="DIR", help="registry artifact cache"
    )
    parser.add_argument(
        "--feature-service",
        metavar="HOST:PORT",
        help="feature service for models that take entity ids (a registry FeatureInput)",
    )
    parser.add_argument(
        "--feature-timeout-s", type=float, help="deadline of each feature-service call (1)"
    )
    parser.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    parser.add_argument(
        "--max-batch-size", type=int, help="max_batch_size for models without config.pbtxt"
    )
    parser.add_argument(
        "--max-queue-delay-us", type=int, help="batching delay under load without config.pbtxt"
    )
    parser.add_argument(
        "--lone-batches-on-all-cpus",
        action=argparse.BooleanOptionalAction,
        help="run a batch that is the process's only work on the event loop's CPU too (on)",
    )
    parser.add_argument("--max-queue-rows", type=int, help="queue bound (rows) by default")
    parser.add_argument("--instance-count", type=int, help="runtime instances per model")
    parser.add_argument(
        "--execution-provider", choices=["auto", "cpu", "cuda"], help="default provider"
    )
    parser.add_argument("--thread-budget", type=int, help="intra-op threads per model")
    parser.add_argument(
        "--max-request-elements",
        type=int,
        metavar="N",
        help="tensor elements per request (16777216)",
    )
    parser.add_argument(
        "--max-request-bytes", type=int, metavar="BYTES", help="tensor bytes per request (64 MiB)"
    )
    parser.add_argument(
        "--max-bytes-element-length",
        type=int,
        metavar="BYTES",
        help="longest BYTES element (1 MiB)",
    )
    parser.add_argument(
        "--max-rows-per-request", type=int, metavar="ROWS", help="rows per request (65536)"
    )
    parser.add_argument(
        "--monitoring", metavar="HOST:PORT", help="log predictions to this monitoring service"
    )
    parser.add_argument(
        "--prediction-log-sample-rate",
        type=float,
        metavar="RATE",
        help="share of predictions logged, 0..1 (1)",
    )
    parser.add_argument(
        "--prediction-log-sample",
        action="append",
        metavar="MODEL=RATE",
        help="share of one model's predictions logged (repeatable)",
    )
    parser.add_argument(
        "--prediction-log-buffer-rows",
        type=int,
        metavar="ROWS",
        help="prediction records queued at most (20000)",
    )
    parser.add_argument(
        "--prediction-log-batch-rows",
        type=int,
        metavar="ROWS",
        help="records per LogPredictions call (1000)",
    )
    parser.add_argument(
        "--prediction-log-interval-ms",
        type=int,
        metavar="MS",
        help="longest a record waits to be sent (200)",
    )
    parser.add_argument(
        "--prediction-log-timeout-s",
        type=float,
        metavar="SECONDS",
        help="deadline of each LogPredictions call (2)",
    )


class InferenceServer(AioServiceServer):
    """The kernel's grpc.aio server holding the model repository it serves.

    Measured against the synchronous server (64 concurrent clients, light MLP): with a
    thread per request, every request waiting for its batch is a blocked thread, and the
    GIL handoffs between those threads cost ~10 context switches per request, about half
    of the server's CPU. On the event loop a waiting request is a future, and a batch
    costs two thread switches whatever its size (see batcher.py)."""

    def __init__(
        self,
        repository: ModelRepository,
        follower: RegistryFollower | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.repository = repository
        self.follower = follower

    async def start(self) -> int:
        port = await super().start()
        if self.follower is not None:
            # Watching starts once the server's loop runs: it installs changes there.
            self.follower.start(asyncio.get_running_loop())
        return port


def build(settings: Settings, runtime_factory: RuntimeFactory = ort_runtime) -> InferenceServer:
    registry = new_registry()
    tracer = None
    if settings.spans_enabled:
        # One span per request, made by the batcher with its batch id, instead of the
        # kernel's per-RPC interceptor, and one per feature call (enrichment.py), which
        # carries the first caller's trace context to the feature service. Only when
        # spans are on (by default: when exported): creating them costs ~100 µs of CPU
        # per request (measured), more than the batcher itself.
        tracer = tracer_provider("inference", settings.otlp_endpoint).get_tracer(
            "modelplane.inference"
        )
    repository = ModelRepository(
        settings.repository_path,
        Defaults(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_rows=settings.max_queue_rows,
            max_queue_wait_us=settings.max_queue_wait_us,
            runtime_thread_nice=settings.runtime_thread_nice,
            instance_count=settings.instance_count,
            execution_provider=settings.execution_provider,
            thread_budget=settings.thread_budget or thread_layout(process_share()).intra_op_threads,
        ),
        InferenceMetrics(registry),
        tracer,
        runtime_factory,
    )
    if settings.feature_service:
        repository.features = FeatureSource(
            settings.feature_service,
            settings.feature_timeout_s,
            EnrichmentMetrics(registry),
            tracer,
        )
    follower = _registry_follower(settings, repository, registry)
    prediction_log = _prediction_log(settings, registry, tracer)
    ready = asyncio.Event()
    servicer = InferenceServicer(
        repository,
        ready.is_set,
        trace_requests=tracer is not None,
        routing_metrics=RoutingMetrics(registry) if follower is not None else None,
        follower=follower,
        prediction_log=prediction_log,
        limits=settings.input_limits,
    )

    def add_servicers(server: object) -> None:
        # Models load before the port opens, so readiness means "models are warm".
        if follower is not None:
            follower.boot()
        elif settings.model_control_mode == "none":
            repository.load_all()
        else:
            for name in settings.load_model:
                repository.load_at_start(name)
        # Not grpc_service_pb2_grpc's registration: requests that do not parse are
        # refused (and streams go on) without a traceback per request; see wire.py.
        wire.add_to_server(servicer, server)
        if prediction_log is not None:
            prediction_log.start()
        ready.set()

    async def not_ready() -> None:
        ready.clear()

    async def close_features() -> None:
        if repository.features is not None:
            repository.features.close()

    return InferenceServer(
        repository,
        follower,
        settings.model_copy(update={"tracing_enabled": False}),
        "inference",
        [SERVICE_NAME],
        add_servicers,
        on_stop=[
            not_ready,
            *([follower.stop] if follower else []),
            repository.close,
            close_features,
            # After the repository drained: the last requests' records are queued.
            *([prediction_log.aclose] if prediction_log else []),
        ],
        registry=registry,
        shedder=(
            LoopLagShedder(settings.shed_loop_lag_us / 1e6, registry)
            if settings.shed_loop_lag_us
            else None
        ),
        shed_methods=(f"/{SERVICE_NAME}/ModelInfer",),
        # What admission would refuse anyway, refused before the body is read.
        door=repository.refusing_every_call,
    )


def _prediction_log(
    settings: Settings, registry: CollectorRegistry, tracer: trace.Tracer | None
) -> PredictionLog | None:
    """The prediction log, when a monitoring service is set; none costs nothing."""
    if not settings.monitoring:
        return None
    return PredictionLog(
        PredictionLogConfig(
            address=settings.monitoring,
            buffer_rows=settings.prediction_log_buffer_rows,
            batch_rows=settings.prediction_log_batch_rows,
            interval_s=settings.prediction_log_interval_ms / 1000,
            timeout_s=settings.prediction_log_timeout_s,
            default_rate=settings.prediction_log_sample_rate,
            rates=settings.prediction_log_sample,
        ),
        registry,
        tracer=tracer,
    )


def _registry_follower(
    settings: Settings, repository: ModelRepository, registry: CollectorRegistry
) -> RegistryFollower | None:
    if not settings.registry:
        if settings.model_control_mode == "registry":
            raise StartupError("--model-control-mode registry needs --registry HOST:PORT")
        return None
    try:
        targets = [parse_target(text, settings.default_alias) for text in settings.load_model]
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    discover = settings.model_control_mode == "registry"
    if not targets and not discover:
        raise StartupError(
            "--registry needs --load-model NAME[@ALIAS] (repeatable) or "
            "--model-control-mode registry"
        )
    return RegistryFollower(
        settings.registry,
        repository,
        settings.cache_path,
        targets,
        FollowerMetrics(registry),
        discover_alias=settings.default_alias if discover else None,
        discovery_s=settings.registry_discovery_s,
        timeout_s=settings.registry_timeout_s,
        default_alias=settings.default_alias,
    )


def run(settings: Settings) -> None:
    """Serves until SIGTERM/SIGINT: this process, its threads laid out on the CPUs it may
    use, or with `workers` > 1 a supervisor and that many worker processes (workers.py)."""
    if settings.workers > 1:
        status = supervise(settings)
        if status:
            raise SystemExit(status)
        return
    serve_share(settings, process_share(), build)
