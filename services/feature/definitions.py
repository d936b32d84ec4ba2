"""Definitions as documents (YAML or stored JSON) and the versioned apply.

One document shape serves three uses: the YAML a person writes, the JSON kept
per version in the definition store, and `modelplane features` output.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.feature.domain import (
    KEY_TYPES,
    BundleFeature,
    Catalog,
    Definition,
    Entity,
    Feature,
    FeatureBundle,
    FeatureRef,
    FeatureView,
    JoinKey,
    ParquetSource,
    ValueType,
    check_compatible,
    check_name,
    kind_of,
    validate_catalog,
)

_UNITS_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000}
_UNITS_US["d"] = 24 * _UNITS_US["h"]
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)?\s*$")
_TYPE_NAMES = {
    "double": ValueType.DOUBLE,
    "float": ValueType.DOUBLE,
    "float64": ValueType.DOUBLE,
    "int64": ValueType.INT64,
    "int": ValueType.INT64,
    "bool": ValueType.BOOL,
    "string": ValueType.STRING,
    "str": ValueType.STRING,
}


def parse_duration_us(value: object, where: str) -> int:
    """ "90s", "15m", "1h", "7d", "250ms", "10us", or a number of seconds; 0 = no limit."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidArgument(f"{where}: {value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise InvalidArgument(f"{where}: duration must be a finite non-negative number")
        return int(value * 1_000_000)
    match = _DURATION.match(str(value))
    if not match:
        raise InvalidArgument(f"{where}: {value!r} is not a duration like 90s, 15m, 1h or 7d")
    return int(float(match.group(1)) * _UNITS_US[match.group(2) or "s"])


def parse_type(value: object, where: str) -> ValueType:
    try:
        return _TYPE_NAMES[str(value).lower()]
    except KeyError:
        raise InvalidArgument(
            f"{where}: unknown type {value!r} (use double, int64, bool or string)"
        ) from None


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{where} must be a mapping")
    return value


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be a list")
    return value


def _name(spec: Mapping[str, Any], kind: str, where: str) -> str:
    name = spec.get("name")
    if not isinstance(name, str):
        raise InvalidArgument(f"{where}: name is required")
    check_name(kind, name)
    return name


def entity_from_spec(spec: Mapping[str, Any], where: str = "entity") -> Entity:
    name = _name(spec, "entity", where)
    where = f"entity {name!r}"
    keys = []
    for item in _list(spec.get("join_keys"), f"{where}: join_keys"):
        if isinstance(item, str):
            key = JoinKey(item, ValueType.INT64)
        else:
            item = _mapping(item, f"{where}: join key")
            key_name = _name(item, "join key", where)
            key = JoinKey(key_name, parse_type(item.get("type", "int64"), f"{where}.{key_name}"))
        check_name("join key", key.name)
        if key.type not in KEY_TYPES:
            raise InvalidArgument(f"{where}: join key {key.name!r} must be int64 or string")
        keys.append(key)
    if not keys:
        raise InvalidArgument(f"{where}: at least one join key is required")
    if len({k.name for k in keys}) != len(keys):
        raise InvalidArgument(f"{where}: join keys repeat")
    return Entity(name, tuple(keys), str(spec.get("description", "")))


def view_from_spec(spec: Mapping[str, Any], where: str = "feature view") -> FeatureView:
    name = _name(spec, "feature view", where)
    where = f"feature view {name!r}"
    entity = spec.get("entity")
    if not isinstance(entity, str) or not entity:
        raise InvalidArgument(f"{where}: entity is required")
    features = []
    for item in _list(spec.get("features"), f"{where}: features"):
        item = _mapping(item, f"{where}: feature")
        feature_name = _name(item, "feature", where)
        if "type" not in item:
            raise InvalidArgument(f"{where}: feature {feature_name!r} needs a type")
        features.append(
            Feature(
                feature_name,
                parse_type(item["type"], f"{where}.{feature_name}"),
                str(item.get("description", "")),
            )
        )
    if not features:
        raise InvalidArgument(f"{where}: at least one feature is required")
    if len({f.name for f in features}) != len(features):
        raise InvalidArgument(f"{where}: feature names repeat")
    source = None
    if spec.get("source") is not None:
        source_spec = _mapping(spec["source"], f"{where}: source")
        path = source_spec.get("path")
        if not isinstance(path, str) or not path:
            raise InvalidArgument(f"{where}: source.path is required")
        source = ParquetSource(path, str(source_spec.get("timestamp_field", "event_timestamp")))
    max_age = spec.get("max_age", spec.get("ttl"))
    return FeatureView(
        name=name,
        entity=entity,
        features=tuple(features),
        max_age_us=parse_duration_us(max_age, f"{where}: max_age"),
        source=source,
        description=str(spec.get("description", "")),
    )


def bundle_from_spec(spec: Mapping[str, Any], where: str = "bundle") -> FeatureBundle:
    name = _name(spec, "bundle", where)
    where = f"bundle {name!r}"
    items = []
    for item in _list(spec.get("features"), f"{where}: features"):
        if isinstance(item, str):
            items.append(BundleFeature(str(FeatureRef.parse(item))))
            continue
        item = _mapping(item, f"{where}: feature")
        ref = str(FeatureRef.parse(str(item.get("ref", ""))))
        fill = item.get("fill_value")
        if fill is not None and (isinstance(fill, bool) or not isinstance(fill, int | float)):
            raise InvalidArgument(f"{where}: fill_value of {ref} must be a number")
        items.append(BundleFeature(ref, None if fill is None else float(fill)))
    if not items:
        raise InvalidArgument(f"{where}: at least one feature is required")
    if len({i.ref for i in items}) != len(items):
        raise InvalidArgument(f"{where}: features repeat")
    return FeatureBundle(name, tuple(items), str(spec.get("description", "")))


def definitions_from_document(document: object) -> list[Definition]:
    """Definitions from a parsed YAML/JSON document with entities, feature_views, bundles."""
    if document is None:
        return []
    document = _mapping(document, "the definitions document")
    unknown = set(document) - {"entities", "feature_views", "bundles"}
    if unknown:
        raise InvalidArgument(f"unknown top-level keys: {', '.join(sorted(unknown))}")
    found: list[Definition] = []
    for spec in _list(document.get("entities"), "entities"):
        found.append(entity_from_spec(_mapping(spec, "entity")))
    for spec in _list(document.get("feature_views"), "feature_views"):
        found.append(view_from_spec(_mapping(spec, "feature view")))
    for spec in _list(document.get("bundles"), "bundles"):
        found.append(bundle_from_spec(_mapping(spec, "bundle")))
    return found


def definitions_from_yaml(text: str, base_dir: Path | None = None) -> list[Definition]:
    """Parses YAML definitions; relative source paths are resolved against `base_dir`
    (the YAML file's folder) when given."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"the definitions are not valid YAML: {exc}") from None
    definitions = definitions_from_document(document)
    if base_dir is None:
        return definitions
    resolved: list[Definition] = []
    for d in definitions:
        if isinstance(d, FeatureView) and d.source and not Path(d.source.path).is_absolute():
            path = str((base_dir / d.source.path).resolve())
            d = dataclasses.replace(d, source=dataclasses.replace(d.source, path=path))
        resolved.append(d)
    return resolved


_TYPE_SPELLING = {t: t.name.lower() for t in ValueType}


def to_spec(definition: Definition) -> dict[str, Any]:
    """The document form of a definition (what `definitions_from_document` reads)."""
    if isinstance(definition, Entity):
        return {
            "name": definition.name,
            "join_keys": [
                {"name": k.name, "type": _TYPE_SPELLING[k.type]} for k in definition.join_keys
            ],
            "description": definition.description,
        }
    if isinstance(definition, FeatureView):
        spec: dict[str, Any] = {
            "name": definition.name,
            "entity": definition.entity,
            "features": [
                {"name": f.name, "type": _TYPE_SPELLING[f.type], "description": f.description}
                for f in definition.features
            ],
            "max_age": f"{definition.max_age_us}us",
            "description": definition.description,
        }
        if definition.source is not None:
            spec["source"] = {
                "path": definition.source.path,
                "timestamp_field": definition.source.timestamp_field,
            }
        return spec
    return {
        "name": definition.name,
        "features": [
            {"ref": f.ref, **({} if f.fill_value is None else {"fill_value": f.fill_value})}
            for f in definition.features
        ],
        "description": definition.description,
    }


def from_spec(kind: str, spec: Mapping[str, Any], version: int) -> Definition:
    parsers: dict[str, Callable[[Mapping[str, Any]], Definition]] = {
        "entity": entity_from_spec,
        "feature_view": view_from_spec,
        "bundle": bundle_from_spec,
    }
    return dataclasses.replace(parsers[kind](spec), version=version)


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    version: int
    change: str  # "created", "updated" or "unchanged"


# Given the latest stored definitions, the new versions to store.
Plan = Callable[[list[Definition]], Sequence[Definition]]


class DefinitionStore(Protocol):
    """What the registry needs of `definition_store`."""

    def load(self) -> list[Definition]: ...

    def save_with(self, plan: Plan) -> None: ...


def catalog_of(definitions: Iterable[Definition]) -> Catalog:
    entities: dict[str, Entity] = {}
    views: dict[str, FeatureView] = {}
    bundles: dict[str, FeatureBundle] = {}
    for definition in definitions:
        if isinstance(definition, Entity):
            entities[definition.name] = definition
        elif isinstance(definition, FeatureView):
            views[definition.name] = definition
        else:
            bundles[definition.name] = definition
    return Catalog(entities, views, bundles)


class DefinitionRegistry:
    """The current catalog, and the only way to change it (apply → new versions).

    The catalog is a cache of the store's latest versions. Several processes may share
    one store (PostgreSQL): each apply plans against the store's latest versions, not
    the cache, and `refresh` picks up what other processes applied.
    """

    def __init__(
        self,
        store: DefinitionStore,
        on_views_changed: Callable[[Sequence[FeatureView]], None] = lambda views: None,
    ) -> None:
        self._store = store
        self._on_views_changed = on_views_changed
        self._lock = threading.Lock()
        self.catalog = Catalog()
        self.refresh()

    def refresh(self) -> None:
        """Reloads the catalog from the store (after another process applied)."""
        with self._lock:
            catalog = catalog_of(self._store.load())
            if catalog != self.catalog:
                self._prepare(catalog)
                self.catalog = catalog

    def _prepare(self, catalog: Catalog) -> None:
        # Storage first: a view is never visible before the online store can hold it.
        changed = [v for v in catalog.views.values() if self.catalog.views.get(v.name) != v]
        if changed:
            self._on_views_changed(changed)

    def apply(self, definitions: Sequence[Definition], dry_run: bool = False) -> list[Change]:
        seen: set[tuple[str, str]] = set()
        for definition in definitions:
            key = (kind_of(definition), definition.name)
            if key in seen:
                raise InvalidArgument(f"{key[0]} {key[1]!r} is defined twice")
            seen.add(key)
        with self._lock:
            if dry_run:
                changes, _, _ = _plan_apply(catalog_of(self._store.load()), definitions)
                return changes
            outcome: list[tuple[list[Change], Catalog]] = []

            def plan(latest: list[Definition]) -> list[Definition]:
                changes, stored, catalog = _plan_apply(catalog_of(latest), definitions)
                self._prepare(catalog)
                outcome.append((changes, catalog))
                return stored

            self._store.save_with(plan)
            changes, catalog = outcome[0]
            self.catalog = catalog
            return changes


def _plan_apply(
    current: Catalog, definitions: Sequence[Definition]
) -> tuple[list[Change], list[Definition], Catalog]:
    """What applying `definitions` to `current` changes, the new versions to store, and
    the resulting catalog; raises InvalidArgument/FailedPrecondition when it may not."""
    candidate: dict[str, dict[str, Any]] = {
        "entity": dict(current.entities),
        "feature_view": dict(current.views),
        "bundle": dict(current.bundles),
    }
    changes: list[Change] = []
    stored: list[Definition] = []
    pairs: list[tuple[Definition, Definition]] = []
    for definition in definitions:
        kind = kind_of(definition)
        old: Definition | None = candidate[kind].get(definition.name)
        if old is None:
            new = dataclasses.replace(definition, version=1)
            changes.append(Change(kind, definition.name, 1, "created"))
        elif dataclasses.replace(old, version=0) == dataclasses.replace(definition, version=0):
            changes.append(Change(kind, definition.name, old.version, "unchanged"))
            continue
        else:
            new = dataclasses.replace(definition, version=old.version + 1)
            changes.append(Change(kind, definition.name, new.version, "updated"))
            pairs.append((old, new))
        candidate[kind][definition.name] = new
        stored.append(new)
    catalog = Catalog(candidate["entity"], candidate["feature_view"], candidate["bundle"])
    for old, new in pairs:
        check_compatible(old, new, catalog)
    validate_catalog(catalog)
    return changes, stored, catalog
