"""The model repository: `<root>/<model>/<version>/model.onnx` (+ `<model>/config.pbtxt`),
loaded into runtime instances behind one dynamic batcher per version.

Lookups read an immutable snapshot (a dict replaced on every load/unload, on the event
loop), so the hot path takes no lock and a load or unload of one model never touches
another's batcher.
A reload builds and warms the new versions before swapping them in; the old ones drain
their queues before they close, so no accepted request is lost.

Models served from the registry (see registry_follower.py) are installed the same way,
with a route table: which loaded version answers a request that names no version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from opentelemetry import trace

from inference import model_config_pb2 as mc
from modelplane.client.registry import file_sha256
from modelplane.kernel.errors import FailedPrecondition, InvalidArgument, NotFound, clip
from modelplane.services.inference import model_config
from modelplane.services.inference.batcher import (
    BatchingPolicy,
    DynamicBatcher,
    Runner,
    Tensors,
)
from modelplane.services.inference.datatypes import Datatype
from modelplane.services.inference.enrichment import (
    FeatureBinding,
    FeatureRequest,
    FeatureSource,
    enriching_runner,
)
from modelplane.services.inference.model_config import Defaults, ModelPlan
from modelplane.services.inference.routing import Route, RouteTable
from modelplane.services.inference.runtime import (
    OrtRuntime,
    ProviderChoice,
    TensorSignature,
    available_providers,
    choose_providers,
)
from modelplane.services.inference.stats import InferenceMetrics, VersionStats

log = logging.getLogger("modelplane.inference.repository")


class Runtime(Protocol):
    """One runtime instance (OrtRuntime, or a wrapper around one)."""

    provider: str
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]

    def __call__(self, feeds: Tensors) -> dict[str, np.ndarray]: ...


RuntimeFactory = Callable[[Path, ProviderChoice, int], Runtime]


def ort_runtime(path: Path, providers: ProviderChoice, threads: int) -> Runtime:
    return OrtRuntime(path, providers, threads)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor as requests see it: dims exclude the batch dimension when the model
    batches; None marks a variable dimension."""

    name: str
    datatype: Datatype
    dims: tuple[int | None, ...]

    @property
    def variable(self) -> bool:
        return None in self.dims


@dataclass(slots=True)
class ModelVersion:
    """A loaded, warmed-up model version ready for requests."""

    name: str
    version: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    variable_dims: bool
    raw_only_outputs: bool
    provider: str
    config: mc.ModelConfig
    batcher: DynamicBatcher
    stats: VersionStats
    sha256: str = ""
    feature_input: FeatureBinding | None = None
    """Set when requests may send entity keys in place of this input (enrichment.py)."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    versions: dict[str, ModelVersion]
    latest: ModelVersion
    """What a request naming no version gets when there is no route table."""
    table: RouteTable[ModelVersion] | None = None
    """Registry-served models: routes by alias (and weight) to loaded versions."""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelRepository:
    """Loads, serves and unloads the models of one repository directory."""

    def __init__(
        self,
        root: Path,
        defaults: Defaults,
        metrics: InferenceMetrics,
        tracer: trace.Tracer | None = None,
        runtime_factory: RuntimeFactory = ort_runtime,
    ) -> None:
        self.root = root
        self._defaults = defaults
        self._metrics = metrics
        self._tracer = tracer
        self._factory = runtime_factory
        self._models: dict[str, ModelEntry] = {}
        self._failures: dict[str, str] = {}
        # Registry-served versions that were refused (e.g. a digest mismatch), shown by
        # RepositoryIndex while the previous version keeps serving.
        self._version_failures: dict[tuple[str, str], str] = {}
        # In registry mode, the models followed (listed even when none is loaded).
        self.followed: Callable[[], Iterable[str]] | None = None
        # The feature service, for versions that take entity keys (enrichment.py).
        self.features: FeatureSource | None = None
        self.source = f"repository {root}"
        # Loads and unloads run on the event loop; two loads of one model at once would
        # race to install, so they take turns (serving never waits on this).
        self._load_serially = asyncio.Lock()

    # --- hot path -------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"model '{clip(name)}' is not loaded")
        if not version:
            return entry.latest
        found = entry.versions.get(version)
        if found is None:
            raise NotFound(
                f"model '{name}' has no ready version '{clip(version)}' "
                f"(ready: {', '.join(entry.versions)})"
            )
        return found

    def route(
        self, name: str, version: str, routing_key: Callable[[], str | None]
    ) -> tuple[ModelVersion, Route[ModelVersion] | None]:
        """The version that answers a request, and the route that chose it (None for a
        model without a route table, or a request naming its version)."""
        entry = self._models.get(name)
        if entry is None or version or entry.table is None:
            return self.get(name, version), None
        chosen = entry.table.pick(routing_key() if len(entry.table.routes) > 1 else None)
        return chosen.version, chosen

    def table(self, name: str) -> RouteTable[ModelVersion] | None:
        entry = self._models.get(name)
        return None if entry is None else entry.table

    def loaded(self) -> list[ModelVersion]:
        return [v for entry in self._models.values() for v in entry.versions.values()]

    def refusing_every_call(self) -> int | None:
        """The shortest retry hint (ms) when every loaded version's batcher would refuse
        any request now (so a call can be refused before its body is read); None while
        one would take a request, or nothing is loaded."""
        hints = []
        for entry in self._models.values():
            for version in entry.versions.values():
                hint = version.batcher.refuses_any()
                if hint is None:
                    return None
                hints.append(hint)
        return min(hints) if hints else None

    def versions(self, name: str) -> list[ModelVersion]:
        entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"model '{clip(name)}' is not loaded")
        return list(entry.versions.values())

    # --- control --------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Every model directory in the repository (or followed in the registry), loaded
        or not."""
        if self.followed is not None:
            return sorted(self.followed())
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _valid_name(p.name))

    def load_all(self) -> None:
        """Loads every model at start (before serving, so blocking is fine); one model's
        failure does not stop others."""
        if not self.root.is_dir():
            log.warning("model repository %s does not exist; serving no models", self.root)
        for name in self.model_names():
            try:
                self.load_at_start(name)
            except Exception as exc:
                log.error("model %s failed to load: %s", name, exc, extra={"model": name})

    def load_at_start(self, name: str) -> None:
        """Loads a model before the server serves: nothing can be replaced yet."""
        old = self._install(name, self._build_checked(name))
        assert old is None, "load_at_start() is for a repository that serves nothing yet"

    async def load(self, name: str) -> None:
        """Loads (or reloads) a model while serving: new versions are built and warmed up
        in a thread, so other models keep serving, then swapped in; the old ones finish
        what they had queued."""
        async with self._load_serially:
            built = await asyncio.to_thread(self._build_checked, name)
            old = self._install(name, built)
        if old is not None:
            # Series of versions that stay loaded belong to the new instances now.
            await self._retire(old.versions.values(), keep_series=set(built))

    async def unload(self, name: str) -> None:
        """Stops routing to a model; its queued and running requests still finish."""
        models = dict(self._models)
        old = models.pop(name, None)
        if old is None:
            raise NotFound(f"model '{clip(name)}' is not loaded")
        self._models = models
        await self._retire(old.versions.values())
        log.info("model %s unloaded", name, extra={"model": name})

    async def unload_if_loaded(self, name: str) -> None:
        if name in self._models:
            await self.unload(name)

    async def close(self) -> None:
        old, self._models = self._models, {}
        await self._retire(v for entry in old.values() for v in entry.versions.values())

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        models = self._models
        for name in sorted(set(self.model_names()) | set(models)):
            entry = models.get(name)
            if entry is not None:
                entries += [
                    IndexEntry(name, v, "READY", "") for v in sorted(entry.versions, key=int)
                ]
                if not ready_only:
                    entries += [
                        IndexEntry(name, version, "UNAVAILABLE", reason)
                        for (model, version), reason in sorted(self._version_failures.items())
                        if model == name and version not in entry.versions
                    ]
            elif not ready_only:
                reason = self._failures.get(name, "unloaded")
                entries.append(IndexEntry(name, "", "UNAVAILABLE", reason))
        return entries

    # --- registry-served models (blocking calls run on a follower thread) -------------

    def loaded_version(self, name: str, version: str) -> ModelVersion | None:
        entry = self._models.get(name)
        return None if entry is None else entry.versions.get(version)

    def build_from_file(
        self,
        name: str,
        version: str,
        path: Path,
        serving_config: str,
        sha256: str,
        feature: FeatureRequest | None = None,
    ) -> ModelVersion:
        """Builds and warms one registry version from a verified artifact (blocking)."""
        where = f"{name} version {version} serving_config"
        config = model_config.parse_config(serving_config, where) if serving_config else None
        plan = model_config.resolve(config, name, where, self._defaults)
        providers = choose_providers(plan.execution_provider, available_providers())
        if feature is not None and self.features is None:
            log.warning(
                "model %s version %s names feature bundle %s, but no --feature-service is "
                "set: it takes tensors only",
                name,
                version,
                feature.bundle,
            )
            feature = None
        return self._build_version(name, version, path, plan, providers, sha256, feature)

    def refuse_version(self, name: str, version: str, reason: str) -> None:
        self._version_failures[(name, version)] = reason

    def accept_version(self, name: str, version: str) -> None:
        self._version_failures.pop((name, version), None)

    def install_routed(
        self, name: str, versions: dict[str, ModelVersion], table: RouteTable[ModelVersion]
    ) -> list[ModelVersion]:
        """Swaps in a registry model's versions and routes (one assignment, on the event
        loop or before serving); returns the versions no longer served, to retire."""
        primary = table.routes[0].version
        models = dict(self._models)
        old = models.get(name)
        models[name] = ModelEntry(versions, primary, table)
        self._models = models
        self._failures.pop(name, None)
        log.info(
            "model %s routes: %s",
            name,
            ", ".join(f"{r.alias} v{r.version.version} {r.weight}%" for r in table.routes)
            + (
                f"; shadow {table.shadow.alias} v{table.shadow.version.version} "
                f"{table.shadow.percent}%"
                if table.shadow
                else ""
            ),
            extra={"model": name, "versions": sorted(versions, key=int)},
        )
        if old is None:
            return []
        return [v for number, v in old.versions.items() if versions.get(number) is not v]

    async def retire(self, versions: Iterable[ModelVersion]) -> None:
        """Drains and closes versions that no route reaches any more."""
        await self._retire(versions)

    def fail_model(self, name: str, reason: str) -> None:
        self._failures[name] = reason

    # --- building ------------------------------------------------------------------

    def _build_checked(self, name: str) -> dict[str, ModelVersion]:
        if not _valid_name(name):
            raise InvalidArgument(f"'{clip(name)}' is not a valid model name")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise NotFound(f"model '{clip(name)}' not found in repository {self.root}")
        try:
            built = self._build(name, model_dir)
        except Exception as exc:
            self._failures[name] = str(getattr(exc, "message", exc))
            raise
        self._failures.pop(name, None)
        return built

    def _install(self, name: str, built: dict[str, ModelVersion]) -> ModelEntry | None:
        """Swaps a model's new versions in (one dict assignment); returns the old entry."""
        latest = built[max(built, key=int)]
        models = dict(self._models)
        old = models.get(name)
        models[name] = ModelEntry(built, latest)
        self._models = models
        log.info(
            "model %s loaded",
            name,
            extra={
                "model": name,
                "versions": list(built),
                "provider": latest.provider,
                "instances": latest.batcher.instances,
                "max_batch_size": latest.max_batch_size,
                "batching": latest.batcher.policy.enabled,
            },
        )
        return old

    async def _retire(
        self, versions: Iterable[ModelVersion], keep_series: frozenset[str] | set[str] = frozenset()
    ) -> None:
        for version in versions:
            await version.batcher.close()
            if version.version not in keep_series:
                self._metrics.forget(version.name, version.version, version.provider)

    def _build(self, name: str, model_dir: Path) -> dict[str, ModelVersion]:
        plan = model_config.plan(model_dir, self._defaults)
        found = [
            int(p.name)
            for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / plan.model_file).is_file()
        ]
        chosen = model_config.selected_versions(plan.config, found)
        if not chosen:
            raise FailedPrecondition(
                f"model '{name}' has no version directory with {plan.model_file}"
            )
        providers = choose_providers(plan.execution_provider, available_providers())
        built: dict[str, ModelVersion] = {}
        try:
            for number in chosen:
                path = model_dir / str(number) / plan.model_file
                built[str(number)] = self._build_version(
                    name, str(number), path, plan, providers, file_sha256(path)
                )
        except BaseException:
            for version in built.values():
                version.batcher.close_now()
            raise
        return built

    def _build_version(
        self,
        name: str,
        version: str,
        path: Path,
        plan: ModelPlan,
        providers: ProviderChoice,
        sha256: str,
        feature: FeatureRequest | None = None,
    ) -> ModelVersion:
        instances = [
            self._factory(path, providers, plan.intra_op_threads)
            for _ in range(plan.instance_count)
        ]
        first = instances[0]
        max_batch_size = _max_batch_size(name, plan, first)
        batched = max_batch_size > 0
        inputs = {s.name: _spec(s, batched) for s in first.inputs}
        outputs = {s.name: _spec(s, batched) for s in first.outputs}
        _check_declared(name, plan.config, inputs, outputs)
        binding = None
        runners: list[Runner] = list(instances)
        if feature is not None:
            assert self.features is not None
            binding = _bind_features(name, feature, inputs, batched, self.features)
            runners = [
                enriching_runner(instance, name, binding, frozenset(inputs), self.features)
                for instance in instances
            ]
        policy = dataclasses.replace(
            plan.policy,
            max_batch_size=max_batch_size,
            enabled=plan.policy.enabled and batched,
        )
        if providers.primary not in (first.provider,):
            log.warning(
                "model %s wanted %s but runs on %s", name, providers.primary, first.provider
            )
        for instance in instances:
            _warm_up(instance, inputs, policy)
        stats = VersionStats(name, version, self._metrics, self._tracer)
        batcher = DynamicBatcher(
            f"{name}:{version}", runners, policy, stats, self._defaults.runtime_thread_nice
        )
        self._metrics.queue_rows.labels(name, version).set_function(lambda: batcher.queued_rows)
        self._metrics.queue_limit.labels(name, version).set(policy.max_queue_rows)
        self._metrics.instances.labels(name, version, first.provider).set(len(instances))
        log.info(
            "model %s version %s on %s (%s)",
            name,
            version,
            first.provider,
            providers.reason,
            extra={"model": name, "version": version, "provider": first.provider},
        )
        config = _full_config(name, plan, policy, inputs, outputs, first.provider, providers)
        config.parameters["sha256"].string_value = sha256
        config.parameters["source"].string_value = self.source
        return ModelVersion(
            name=name,
            version=version,
            max_batch_size=max_batch_size,
            inputs=inputs,
            outputs=outputs,
            variable_dims=any(spec.variable for spec in inputs.values()),
            raw_only_outputs=any(spec.datatype.wire == "FP16" for spec in outputs.values()),
            provider=first.provider,
            config=config,
            batcher=batcher,
            stats=stats,
            sha256=sha256,
            feature_input=binding,
        )


def _bind_features(
    name: str,
    feature: FeatureRequest,
    inputs: dict[str, TensorSpec],
    batched: bool,
    source: FeatureSource,
) -> FeatureBinding:
    """Checks a version's FeatureInput against the model (and, when it answers, the
    feature service): the input exists and is FP32 [batch, width] with the bundle's
    width. A mismatch refuses the version."""
    input_name = feature.input or (next(iter(inputs)) if len(inputs) == 1 else "")
    spec = inputs.get(input_name)
    if spec is None:
        raise FailedPrecondition(
            f"model '{name}': feature input '{feature.input}' is not one of its inputs "
            f"({', '.join(inputs)})"
        )
    if not batched or spec.datatype.wire != "FP32" or len(spec.dims) != 1 or not spec.dims[0]:
        raise FailedPrecondition(
            f"model '{name}': input '{input_name}' must be FP32 [batch, width] to take a "
            "feature bundle"
        )
    width = int(spec.dims[0])
    served = source.bundle_features(feature.bundle)
    if served is not None and len(served) != width:
        raise FailedPrecondition(
            f"model '{name}': bundle '{feature.bundle}' has {len(served)} features, input "
            f"'{input_name}' takes {width}"
        )
    return FeatureBinding(
        feature.bundle, input_name, width, feature.reject_missing, tuple(served or ())
    )


def _valid_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and name not in ("..",)


def _max_batch_size(name: str, plan: ModelPlan, runtime: Runtime) -> int:
    signatures = (*runtime.inputs, *runtime.outputs)
    symbolic_first = all(s.shape and s.shape[0] is None for s in signatures)
    if plan.max_batch_size is None:
        return plan.policy.max_batch_size if symbolic_first else 0
    if plan.max_batch_size > 0 and not symbolic_first:
        fixed = next(s.name for s in signatures if not (s.shape and s.shape[0] is None))
        raise InvalidArgument(
            f"model '{name}': max_batch_size {plan.max_batch_size} needs a variable first "
            f"dimension, but tensor '{fixed}' has a fixed one"
        )
    return plan.max_batch_size


def _spec(signature: TensorSignature, batched: bool) -> TensorSpec:
    dims = signature.shape[1:] if batched else signature.shape
    return TensorSpec(signature.name, signature.datatype, dims)


def _check_declared(
    name: str, config: mc.ModelConfig, inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]
) -> None:
    for declared, actual, kind in (
        (config.input, inputs, "input"),
        (config.output, outputs, "output"),
    ):
        for tensor in declared:
            if tensor.name not in actual:
                raise InvalidArgument(
                    f"model '{name}': config declares {kind} '{tensor.name}', which the model "
                    f"does not have (it has {', '.join(actual)})"
                )


def _warm_up(runtime: Runtime, inputs: dict[str, TensorSpec], policy: BatchingPolicy) -> None:
    """Runs every preferred batch size once so no user request pays a first-run cost."""
    if policy.max_batch_size > 0:
        sizes = sorted({1, *policy.preferred_batch_sizes, policy.target_rows})
        shapes: Sequence[tuple[int, ...] | None] = [(size,) for size in sizes]
    else:
        shapes = [None]
    for prefix in shapes:
        feeds = {}
        for spec in inputs.values():
            shape = (*(prefix or ()), *(d if d is not None else 1 for d in spec.dims))
            if spec.datatype.is_bytes:
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.datatype.dtype)
        runtime(feeds)


def _full_config(
    name: str,
    plan: ModelPlan,
    policy: BatchingPolicy,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    provider: str,
    choice: ProviderChoice,
) -> mc.ModelConfig:
    """The configuration as served: what the file said, completed from the model."""
    config = mc.ModelConfig()
    config.CopyFrom(plan.config)
    config.name = name
    config.platform = "onnxruntime_onnx"
    config.backend = "onnxruntime"
    config.runtime = "onnxruntime"
    config.default_model_filename = plan.model_file
    config.max_batch_size = policy.max_batch_size
    del config.input[:]
    del config.output[:]
    for spec in inputs.values():
        config.input.add(
            name=spec.name,
            data_type=mc.DataType.Value(spec.datatype.config),
            dims=[d if d is not None else -1 for d in spec.dims],
        )
    for spec in outputs.values():
        config.output.add(
            name=spec.name,
            data_type=mc.DataType.Value(spec.datatype.config),
            dims=[d if d is not None else -1 for d in spec.dims],
        )
    del config.instance_group[:]
    kind = (
        mc.ModelInstanceGroup.KIND_GPU
        if provider == "CUDAExecutionProvider"
        else (mc.ModelInstanceGroup.KIND_CPU)
    )
    config.instance_group.add(name=name, count=plan.instance_count, kind=kind)
    if policy.enabled:
        dynamic = config.dynamic_batching
        dynamic.preferred_batch_size[:] = list(policy.preferred_batch_sizes)
        dynamic.max_queue_delay_microseconds = int(policy.max_queue_delay_s * 1e6)
        dynamic.default_queue_policy.max_queue_size = policy.max_queue_rows
        dynamic.default_queue_policy.default_timeout_microseconds = int(
            policy.max_queue_wait_s * 1e6
        )
    else:
        config.ClearField("dynamic_batching")
    config.parameters["execution_provider"].string_value = provider
    config.parameters["execution_provider_reason"].string_value = choice.reason
    config.parameters["intra_op_thread_count"].string_value = str(plan.intra_op_threads)
    config.parameters["max_queue_rows"].string_value = str(policy.max_queue_rows)
    return config
