"""Serving from the registry: each followed model (`name@alias`) is kept equal to what
the registry's aliases and rollout policy say, through the registry's WatchModel stream.

One thread per model watches, and does the blocking work in order: asking the registry
for a version's digest and serving config, fetching the artifact into the disk cache
(hashed against the registered digest before every load), building and warming the
new version beside the old. Only then does the event loop swap the model's route table
in one assignment; the versions no route reaches any more drain their queues and close.
A version that fails any step is refused and the previous table keeps serving.

The caller decides what happens when the registry is away (DESIGN.md): the service keeps
serving what it has; the watch reconnects with exponential backoff and jitter, and the
snapshot it gets on reconnect applies whatever changed meanwhile. At start, a registry
that cannot be reached means serving the last state recorded in the cache.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from modelplane.client.registry import DigestMismatch, RegistryClient
from modelplane.kernel.errors import NotFound, Unavailable
from modelplane.kernel.startup import StartupError
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.services.inference.artifact_cache import ArtifactCache, CacheCorrupted
from modelplane.services.inference.enrichment import FeatureRequest
from modelplane.services.inference.registry_state import ModelState, Plan
from modelplane.services.inference.repository import ModelRepository, ModelVersion
from modelplane.services.inference.routing import Route, RouteTable, Shadow

log = logging.getLogger("modelplane.inference.registry")

UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
KEEPALIVE_S = 10.0
"""A watch of a registry that vanished without closing the connection (a cut network,
a frozen host) ends within about twice this."""


@dataclass(frozen=True, slots=True)
class Target:
    model: str
    alias: str


def parse_target(text: str, default_alias: str) -> Target:
    """`name` or `name@alias`."""
    name, _, alias = text.strip().partition("@")
    if not name or (_ and not alias):
        raise ValueError(f"--load-model {text!r}: expected NAME or NAME@ALIAS")
    return Target(name, alias or default_alias)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    sha256: str
    serving_config: str
    feature: FeatureRequest | None = None

    @classmethod
    def from_pb(cls, version: pb.ModelVersion) -> VersionInfo:
        feature = None
        if version.feature_input.bundle:
            feature = FeatureRequest(
                version.feature_input.bundle,
                version.feature_input.input,
                version.feature_input.missing_policy != pb.MISSING_FEATURE_POLICY_FILL,
            )
        return cls(version.artifact.sha256, version.serving_config, feature)

    def to_json(self) -> dict[str, Any]:
        feature = None
        if self.feature is not None:
            feature = {
                "bundle": self.feature.bundle,
                "input": self.feature.input,
                "reject_missing": self.feature.reject_missing,
            }
        return {"sha256": self.sha256, "serving_config": self.serving_config, "feature": feature}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionInfo:
        feature = data.get("feature")
        return cls(
            str(data["sha256"]),
            str(data.get("serving_config", "")),
            FeatureRequest(
                str(feature["bundle"]), str(feature["input"]), bool(feature["reject_missing"])
            )
            if feature
            else None,
        )


class FollowerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "modelplane_inference_registry_watch_connected",
            "1 while the model's registry watch is open",
            ["model"],
            registry=registry,
        )
        self.reconnects = Counter(
            "modelplane_inference_registry_watch_reconnects",
            "Registry watches lost and opened again",
            ["model"],
            registry=registry,
        )
        self.loaded = Counter(
            "modelplane_inference_registry_versions_loaded",
            "Registry versions built and put in service",
            ["model"],
            registry=registry,
        )
        self.refused = Counter(
            "modelplane_inference_registry_versions_refused",
            "Registry versions refused (digest_mismatch, unreachable, load_failed); the "
            "previous version kept serving",
            ["model", "reason"],
            registry=registry,
        )
        self.served = Gauge(
            "modelplane_inference_served_version",
            "Version number each route of a registry model is served by",
            ["model", "route"],
            registry=registry,
        )
        self.cache_corrupted = Counter(
            "modelplane_inference_artifact_cache_corrupted",
            "Cached or downloaded artifacts whose bytes did not match their digest",
            registry=registry,
        )


class _Backoff:
    """Exponential backoff with full jitter, so a fleet does not reconnect in step."""

    def __init__(self, first_s: float = 0.1, most_s: float = 10.0) -> None:
        self._first = first_s
        self._most = most_s
        self._next = first_s

    def reset(self) -> None:
        self._next = self._first

    def delay(self) -> float:
        delay = random.uniform(self._first / 2, self._next)
        self._next = min(self._next * 2, self._most)
        return delay


class ModelFollower:
    """Keeps one model served as the registry says, from its own thread."""

    def __init__(
        self, owner: RegistryFollower, target: Target, state: ModelState | None = None
    ) -> None:
        self._owner = owner
        self.target = target
        self.state = state
        self._infos: dict[int, VersionInfo] = {}
        self._served: Plan | None = None
        self._stop = threading.Event()
        self._call: Any = None
        self._thread: threading.Thread | None = None

    @property
    def model(self) -> str:
        return self.target.model

    # --- at start (before the server serves) ---------------------------------------

    def boot_online(self, client: RegistryClient) -> None:
        model = self.model
        client.get_model(model)  # NOT_FOUND: a name the registry does not know
        aliases = client.list_aliases(model)
        self.state = ModelState.from_listing(model, aliases, client.get_rollout(model))
        self.reconcile()
        # What the registry names was refused (say, its bytes do not verify): the
        # version served before the restart is the "previous version" to keep.
        refused = self._served is None and self.state.plan(self.target.alias) is not None
        if refused and self.boot_from_cache():
            log.warning(
                "serving %s as last seen (from the cache) until the registry's version "
                "can be loaded",
                model,
                extra={"model": model},
            )

    def boot_from_cache(self) -> bool:
        cached = self._owner.cache.load_state(self.model)
        if cached is None or cached.get("alias") != self.target.alias:
            return False
        self.state = ModelState.from_json(self.model, cached.get("state", {}))
        self._infos = {
            int(number): VersionInfo.from_json(info)
            for number, info in dict(cached.get("versions", {})).items()
        }
        self.reconcile(offline=True)
        return True

    # --- watching --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._watch, name=f"registry-watch-{self.model}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self) -> None:
        owner = self._owner
        metrics = owner.metrics
        backoff = _Backoff()
        first = True
        while not self._stop.is_set():
            try:
                self._call = call = cast(Any, owner.client.watch(self.model))
                if self._stop.is_set():
                    call.cancel()
                for response in call:
                    self._on_event(response, backoff)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                code = exc.code()
                level = logging.INFO if code in UNREACHABLE else logging.WARNING
                log.log(
                    level,
                    "registry watch of %s ended (%s); keeps serving what it has",
                    self.model,
                    code.name if code else "unknown",
                    extra={"model": self.model},
                )
            except Exception:
                log.exception("registry watch of %s failed", self.model)
            finally:
                metrics.connected.labels(self.model).set(0)
            if not first:
                metrics.reconnects.labels(self.model).inc()
            first = False
            self._stop.wait(backoff.delay())

    def _on_event(self, response: pb.WatchModelResponse, backoff: _Backoff) -> None:
        kind = response.WhichOneof("event")
        if kind == "snapshot":
            self._owner.metrics.connected.labels(self.model).set(1)
            backoff.reset()
            self.state = ModelState.from_snapshot(self.model, response.snapshot)
            self.reconcile()
        elif kind == "alias_moved" and self.state is not None:
            if self.state.apply_alias_event(response.alias_moved):
                self.reconcile()
        elif (
            kind == "rollout_changed"
            and self.state is not None
            and self.state.apply_rollout(response.rollout_changed)
        ):
            self.reconcile()

    # --- applying the registry's state ------------------------------------------------

    def reconcile(self, offline: bool = False) -> None:
        """Serves what the state says, if it differs from what is served."""
        assert self.state is not None
        owner = self._owner
        repository = owner.repository
        model = self.model
        plan = self.state.plan(self.target.alias)
        if plan is None:
            if self._served is not None or repository.table(model) is not None:
                log.warning(
                    "%s@%s is unset in the registry; no longer serving %s",
                    model,
                    self.target.alias,
                    model,
                    extra={"model": model},
                )
                owner.on_loop(lambda: repository.unload_if_loaded(model))
            repository.fail_model(model, f"alias '{self.target.alias}' is not set")
            self._served = None
            self._save()
            return
        if plan == self._served and all(
            repository.loaded_version(model, str(v)) for v in plan.versions
        ):
            return
        versions: dict[str, ModelVersion] = {}
        built: list[ModelVersion] = []
        for number in sorted(plan.versions):
            existing = repository.loaded_version(model, str(number))
            if existing is not None:
                versions[str(number)] = existing
                continue
            try:
                version = self._build(number, offline)
            except Exception as exc:
                self._refuse(number, exc)
                for version in built:
                    version.batcher.close_now()
                return
            built.append(version)
            versions[str(number)] = version
        table = RouteTable(
            [Route(r.alias, versions[str(r.version)], r.weight) for r in plan.routes],
            Shadow(plan.shadow.alias, versions[str(plan.shadow.version)], plan.shadow.weight)
            if plan.shadow
            else None,
        )
        owner.install(model, versions, table)
        for version in built:
            owner.metrics.loaded.labels(model).inc()
            repository.accept_version(model, version.version)
        owner.metrics.served.clear()  # routes that went away must not linger
        for follower in owner.followers():
            follower._publish_routes()
        self._served = plan
        self._save()

    def _publish_routes(self) -> None:
        if self._served is None:
            return
        for route in self._served.routes:
            self._owner.metrics.served.labels(self.model, route.alias).set(route.version)

    def _build(self, number: int, offline: bool) -> ModelVersion:
        owner = self._owner
        info = self._infos.get(number)
        if info is None:
            info = VersionInfo.from_pb(owner.client.get_version(self.model, version=number))
            self._infos[number] = info
        if offline:
            path = owner.cache.verified(info.sha256)
            if path is None:
                raise CacheCorrupted(f"artifact {info.sha256} is not cached intact")
        else:

            def download(destination: Path) -> None:
                owner.client.download(self.model, destination, version=number)

            path = owner.cache.fetch(info.sha256, download)
        return owner.repository.build_from_file(
            self.model, str(number), path, info.serving_config, info.sha256, info.feature
        )

    def _refuse(self, number: int, exc: Exception) -> None:
        if isinstance(exc, CacheCorrupted | DigestMismatch):
            kind, reason = "digest_mismatch", f"artifact failed verification: {exc}"
        elif isinstance(exc, grpc.RpcError):
            code = exc.code()
            kind = "unreachable" if code in UNREACHABLE else "registry_error"
            reason = f"registry call failed: {code.name if code else 'unknown'}: {exc.details()}"
        else:
            kind, reason = "load_failed", f"{getattr(exc, 'message', exc)}"
        reason = reason[:500]
        self._owner.metrics.refused.labels(self.model, kind).inc()
        self._owner.repository.refuse_version(self.model, str(number), reason)
        served = (
            ", ".join(f"{r.alias} v{r.version}" for r in self._served.routes)
            if self._served
            else "nothing"
        )
        log.error(
            "refused %s version %d: %s; still serving %s",
            self.model,
            number,
            reason,
            served,
            extra={"model": self.model, "version": number, "reason": kind},
        )

    def _save(self) -> None:
        assert self.state is not None
        served = self._served.versions if self._served else frozenset()
        self._owner.cache.save_state(
            self.model,
            {
                "alias": self.target.alias,
                "state": self.state.to_json(),
                "versions": {str(n): i.to_json() for n, i in self._infos.items() if n in served},
            },
        )


class RegistryFollower:
    """Every followed model's follower, the registry client they share, and discovery
    of models that gain the default alias (registry control mode)."""

    def __init__(
        self,
        address: str,
        repository: ModelRepository,
        cache_dir: Path,
        targets: Iterable[Target],
        metrics: FollowerMetrics,
        discover_alias: str | None = None,
        discovery_s: float = 10.0,
        timeout_s: float = 10.0,
        default_alias: str = "production",
    ) -> None:
        self.address = address
        self.default_alias = default_alias
        self.repository = repository
        self.metrics = metrics
        self.cache = ArtifactCache(cache_dir, on_corrupted=lambda _: metrics.cache_corrupted.inc())
        self.client = RegistryClient(
            address, timeout=timeout_s, transfer_timeout=600.0, keepalive_s=KEEPALIVE_S
        )
        self._targets = list(targets)
        self._discover_alias = discover_alias
        self._discovery_s = discovery_s
        self._followers: dict[str, ModelFollower] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._discovery: threading.Thread | None = None
        repository.followed = lambda: list(self._followers)
        repository.source = f"registry {address}"

    def followers(self) -> list[ModelFollower]:
        return list(self._followers.values())

    # --- start ---------------------------------------------------------------------

    def boot(self) -> None:
        """Before the server serves: each model as the registry says now, or, when the
        registry cannot be reached, as the cache recorded it. A model the registry
        does not know is a StartupError."""
        targets = list(self._targets)
        reachable = True
        if self._discover_alias is not None:
            try:
                names = [m.name for m in self.client.list_models()]
            except grpc.RpcError as exc:
                if exc.code() not in UNREACHABLE:
                    raise
                reachable = False
                names = self.cache.cached_models()
            known = {t.model for t in targets}
            targets += [Target(n, self._discover_alias) for n in names if n not in known]
        for target in targets:
            follower = ModelFollower(self, target)
            self._followers[target.model] = follower
            if reachable:
                try:
                    follower.boot_online(self.client)
                    continue
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        raise StartupError(
                            f"--load-model {target.model}: the registry at {self.address} "
                            f"has no model '{target.model}'"
                        ) from None
                    if exc.code() not in UNREACHABLE:
                        raise
                    reachable = False
            if follower.boot_from_cache():
                log.warning(
                    "registry %s unreachable: serving %s as last seen (from the cache); "
                    "ready, and applying changes once the registry is back",
                    self.address,
                    target.model,
                    extra={"model": target.model},
                )
            else:
                log.warning(
                    "registry %s unreachable and %s@%s is not cached: not serving it until "
                    "the registry answers",
                    self.address,
                    target.model,
                    target.alias,
                    extra={"model": target.model},
                )
                self.repository.fail_model(target.model, "registry unreachable; not cached")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once serving: watch every model (and look for new ones)."""
        self._loop = loop
        for follower in self.followers():
            follower.start()
        if self._discover_alias is not None:
            self._discovery = threading.Thread(
                target=self._discover, name="registry-discovery", daemon=True
            )
            self._discovery.start()

    async def stop(self) -> None:
        self._stop.set()
        followers = self.followers()
        for follower in followers:
            follower.stop()

        def join() -> None:
            for follower in followers:
                follower.join(5.0)
            if self._discovery is not None:
                self._discovery.join(5.0)

        await asyncio.to_thread(join)
        self.client.close()

    async def follow(self, model: str) -> None:
        """RepositoryModelLoad in registry mode: serve `model@<default alias>` from now
        on (a model already followed is left as it is)."""
        if model in self._followers:
            return
        follower = ModelFollower(self, Target(model, self.default_alias))
        try:
            await asyncio.to_thread(follower.boot_online, self.client)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"the registry has no model '{model[:128]}'") from None
            raise Unavailable(f"the registry at {self.address} did not answer") from None
        self._followers[model] = follower
        follower.start()

    async def unfollow(self, model: str) -> None:
        """RepositoryModelUnload in registry mode: stop following and serving `model`."""
        follower = self._followers.pop(model, None)
        if follower is None:
            raise NotFound(f"model '{model[:128]}' is not followed")
        follower.stop()
        await asyncio.to_thread(follower.join, 5.0)
        if self.repository.table(model) is not None:
            await self.repository.unload(model)
        self.cache.forget_state(model)

    def _discover(self) -> None:
        assert self._discover_alias is not None
        while not self._stop.wait(self._discovery_s):
            try:
                names = [m.name for m in self.client.list_models()]
            except grpc.RpcError as exc:
                log.info("model discovery: registry call failed (%s)", exc.code())
                continue
            for name in names:
                if name not in self._followers and not self._stop.is_set():
                    follower = ModelFollower(self, Target(name, self._discover_alias))
                    self._followers[name] = follower
                    follower.start()

    # --- the event loop's part ----------------------------------------------------------

    def on_loop(self, work: Callable[[], Any]) -> None:
        """Runs `work` (a function returning a coroutine) on the serving loop and waits;
        before serving starts, runs the coroutine here."""
        loop = self._loop
        if loop is None:
            asyncio.run(work())
            return
        future: Future[Any] = asyncio.run_coroutine_threadsafe(work(), loop)
        future.result()

    def install(
        self, model: str, versions: dict[str, ModelVersion], table: RouteTable[ModelVersion]
    ) -> None:
        repository = self.repository

        async def swap() -> None:
            retired = repository.install_routed(model, versions, table)
            await repository.retire(retired)

        if self._loop is None:
            # Before serving: nothing can be queued on a version being replaced.
            for version in repository.install_routed(model, versions, table):
                version.batcher.close_now()
            return
        self.on_loop(swap)
