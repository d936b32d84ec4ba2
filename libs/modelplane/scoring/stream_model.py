"""The model a stream scorer runs: a verified registry version loaded in process, how
its input is fed (an FP32 row per event, or a feature bundle's tensor read for the
join keys events carry: the enrichment), and the follower that keeps it on its alias
(a promoted version takes over between micro-batches).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from modelplane.client.feature import FeatureClient
from modelplane.client.registry import RegistryClient
from modelplane.registry.v1 import registry_pb2 as rpb
from modelplane.scoring.model import ModelRef, ScoringModel, fetch, resolve
from modelplane.scoring.stream_config import StreamConfig, StreamMetrics

log = logging.getLogger("modelplane.scoring.stream")

# --- the model and its inputs -------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """A bundle model's input: the join keys events carry, and how to read the tensor."""

    bundle: str
    keys: tuple[tuple[str, int], ...]  # (join key, ValueType)
    reject_missing: bool
    features: tuple[str, ...]


@dataclass(frozen=True)
class LoadedModel:
    model: ScoringModel
    input: str
    width: int | None  # None: the model takes any width
    binding: Binding | None

    @property
    def version(self) -> int:
        return self.model.version

    def feature_names(self, width: int) -> list[str]:
        if self.binding is not None:
            return list(self.binding.features)
        return [f"{self.input}_{i}" for i in range(width)]


def bundle_binding(client: FeatureClient, feature_input: rpb.FeatureInput) -> Binding:
    """The bundle's entity join keys, from the feature service's definitions."""
    definitions = client.list_definitions()
    bundle = next((b for b in definitions.bundles if b.name == feature_input.bundle), None)
    if bundle is None or not bundle.features:
        raise ValueError(f"the feature service has no bundle {feature_input.bundle!r}")
    views = {v.name: v for v in definitions.feature_views}
    entities = {e.name: e for e in definitions.entities}
    view = views.get(bundle.features[0].ref.split(":", 1)[0])
    entity = entities.get(view.entity) if view is not None else None
    if entity is None:
        raise ValueError(f"bundle {bundle.name!r}: its entity is not defined")
    return Binding(
        bundle=bundle.name,
        keys=tuple((k.name, k.type) for k in entity.join_keys),
        reject_missing=feature_input.missing_policy != rpb.MISSING_FEATURE_POLICY_FILL,
        features=tuple(f.ref for f in bundle.features),
    )


def load(
    registry: RegistryClient,
    version: rpb.ModelVersion,
    cache_dir: Path,
    threads: int,
    features: FeatureClient | None,
) -> LoadedModel:
    model = fetch(registry, version, cache_dir, threads=threads)
    inputs = model.session.get_inputs()
    binding = None
    if model.feature_input is not None and model.feature_input.bundle:
        if features is None:
            raise ValueError(
                f"{model.name}/{model.version} takes feature bundle "
                f"{model.feature_input.bundle!r}: give --feature-service"
            )
        binding = bundle_binding(features, model.feature_input)
        name = model.feature_input.input or (inputs[0].name if len(inputs) == 1 else "")
    else:
        name = inputs[0].name if len(inputs) == 1 else ""
    spec = next((i for i in inputs if i.name == name), None)
    if spec is None or len(inputs) != 1:
        raise ValueError(f"{model.name}/{model.version}: stream scoring takes one input tensor")
    if spec.type != "tensor(float)" or len(spec.shape) != 2:
        raise ValueError(f"{model.name}/{model.version}: input {name!r} is not FP32 [batch, width]")
    width = spec.shape[1] if isinstance(spec.shape[1], int) else None
    if binding is not None and width is not None and width != len(binding.features):
        raise ValueError(
            f"{model.name}/{model.version}: input width {width}, bundle "
            f"{binding.bundle!r} has {len(binding.features)} features"
        )
    return LoadedModel(model, name, width, binding)


class ModelFollower:
    """The model the consumers score with, kept on its alias by a background thread."""

    def __init__(
        self,
        config: StreamConfig,
        registry: RegistryClient,
        features: FeatureClient | None,
        metrics: StreamMetrics,
    ) -> None:
        self.ref = ModelRef.parse(config.model)
        self._config = config
        self._registry = registry
        self._features = features
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = self._load(resolve(registry, self.ref))

    def _load(self, version: rpb.ModelVersion) -> LoadedModel:
        c = self._config
        loaded = load(self._registry, version, c.cache_dir, c.threads, self._features)
        self._metrics.model_version.labels(loaded.model.name).set(loaded.version)
        return loaded

    def refresh(self) -> bool:
        """Re-resolves the alias; a new version is fetched, verified and loaded before it
        replaces the current one (consumers take it at their next micro-batch)."""
        if not self.ref.alias:
            return False
        version = resolve(self._registry, self.ref)
        if version.version == self.current.version:
            return False
        loaded = self._load(version)
        previous, self.current = self.current, loaded  # one reference swap: atomic
        self._metrics.swaps.inc()
        log.info("%s: version %d replaces %d", self.ref, loaded.version, previous.version)
        return True

    def start(self) -> None:
        if self.ref.alias:
            self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._config.refresh_s):
            try:
                self.refresh()
            except Exception:  # the registry away, a bad artifact: keep the current model
                log.warning(
                    "%s: refresh failed; scoring with version %d",
                    self.ref,
                    self.current.version,
                    exc_info=True,
                )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
