"""A model's `config.pbtxt` (Triton's format: protobuf text of `inference.ModelConfig`)
read into the plan the repository loads a model by.

A model directory without the file gets the server defaults with batching on; a file
without a `dynamic_batching` block turns batching off (each request runs alone on a
free instance), as in Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from inference import model_config_pb2 as mc
from modelplane.kernel.errors import InvalidArgument
from modelplane.services.inference.batcher import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MAX_QUEUE_WAIT_S,
    BatchingPolicy,
)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILE = "model.onnx"


@dataclass(frozen=True, slots=True)
class Defaults:
    """Server-wide defaults for what a model's configuration leaves unset."""

    max_batch_size: int = 64
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    max_queue_rows: int = 1024
    max_queue_wait_us: int = int(DEFAULT_MAX_QUEUE_WAIT_S * 1e6)
    instance_count: int = 1
    execution_provider: str = "auto"
    thread_budget: int = 2
    runtime_thread_nice: int = 0


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """How to load one model: the parsed configuration and what follows from it."""

    config: mc.ModelConfig
    """As written (or empty); the loader fills in what the model file tells."""
    max_batch_size: int | None
    """None: batch when the model's first dimension is symbolic, up to the default."""
    policy: BatchingPolicy
    instance_count: int
    execution_provider: str
    intra_op_threads: int
    model_file: str


def read_config(model_dir: Path) -> mc.ModelConfig | None:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return None
    return parse_config(path.read_text(encoding="utf-8"), f"{model_dir.name}/{CONFIG_FILE}")


def parse_config(text: str, where: str) -> mc.ModelConfig:
    """A config.pbtxt's text, from a file or as the registry stores it with a version."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    return config


def plan(model_dir: Path, defaults: Defaults) -> ModelPlan:
    """Reads `<model_dir>/config.pbtxt` (if any) and resolves it against the defaults."""
    return resolve(
        read_config(model_dir), model_dir.name, f"{model_dir.name}/{CONFIG_FILE}", defaults
    )


def resolve(config: mc.ModelConfig | None, name: str, where: str, defaults: Defaults) -> ModelPlan:
    """A model's configuration (None: there is none) resolved against the defaults."""
    if config is None:
        config = mc.ModelConfig()
        batching = True
        max_batch_size: int | None = None
    else:
        batching = config.HasField("dynamic_batching")
        max_batch_size = config.max_batch_size
        if max_batch_size < 0:
            raise InvalidArgument(f"{where}: max_batch_size must not be negative")
    if config.name and config.name != name:
        raise InvalidArgument(f"{where}: name '{config.name}' differs from the model's '{name}'")

    dynamic = config.dynamic_batching
    limit = max_batch_size if max_batch_size is not None else defaults.max_batch_size
    preferred = tuple(sorted(set(dynamic.preferred_batch_size)))
    for size in preferred:
        if size <= 0 or (limit and size > limit):
            raise InvalidArgument(
                f"{where}: preferred_batch_size {size} must be between 1 and max_batch_size {limit}"
            )
    queue_rows = dynamic.default_queue_policy.max_queue_size or defaults.max_queue_rows
    # Triton's queue timeout, as the bound on a request's expected wait at admission.
    wait_us = (
        dynamic.default_queue_policy.default_timeout_microseconds or defaults.max_queue_wait_us
    )
    delay_us = (
        dynamic.max_queue_delay_microseconds
        if config.HasField("dynamic_batching")
        else defaults.max_queue_delay_us
    )
    policy = BatchingPolicy(
        enabled=batching and limit > 0,
        max_batch_size=limit,
        preferred_batch_sizes=preferred,
        max_queue_delay_s=delay_us / 1e6,
        max_queue_rows=queue_rows,
        max_queue_wait_s=wait_us / 1e6,
    )

    count = sum(group.count or 1 for group in config.instance_group) or defaults.instance_count
    provider = defaults.execution_provider
    kinds = {group.kind for group in config.instance_group}
    if mc.ModelInstanceGroup.KIND_GPU in kinds:
        provider = "cuda"
    elif mc.ModelInstanceGroup.KIND_CPU in kinds:
        provider = "cpu"
    parameters = config.parameters
    if "execution_provider" in parameters:
        provider = parameters["execution_provider"].string_value
    threads = max(1, defaults.thread_budget // count)
    if "intra_op_thread_count" in parameters:
        try:
            threads = int(parameters["intra_op_thread_count"].string_value)
        except ValueError:
            raise InvalidArgument(f"{where}: intra_op_thread_count must be an integer") from None
        if threads < 1:
            raise InvalidArgument(f"{where}: intra_op_thread_count must be at least 1")
    return ModelPlan(
        config=config,
        max_batch_size=max_batch_size,
        policy=policy,
        instance_count=count,
        execution_provider=provider,
        intra_op_threads=threads,
        model_file=config.default_model_filename or DEFAULT_MODEL_FILE,
    )


def selected_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """The versions the configuration's version policy serves (default: all of them)."""
    versions = sorted(available)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        return versions[-max(1, policy.latest.num_versions) :]
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in versions if v in wanted]
    return versions
