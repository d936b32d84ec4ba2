"""Feature definitions and the rules every read applies, free of gRPC, SQL and files.

The one rule that decides what a value means, `value_statuses`, is vectorised and
shared by the online read path and the offline point-in-time join: a value is
STALE exactly when it would be STALE in a training set at the same instant, so
the two paths cannot drift apart.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from modelplane.kernel.errors import FailedPrecondition, InvalidArgument, NotFound

NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Every defined name matches NAME_PATTERN, so a longer one in a request names nothing.
MAX_NAME_LENGTH = 63
# How much of a caller's text an error message quotes.
MAX_SHOWN = 80
# Reserved for the row's event time in each stored row.
RESERVED_NAMES = frozenset({"_ts", "entity_key", "event_us"})
# Bounds so one call cannot hold a worker (or the store) for long.
MAX_ENTITIES_PER_READ = 10_000
MAX_ROWS_PER_WRITE = 100_000


def shown(text: str, limit: int = MAX_SHOWN, quote: bool = True) -> str:
    """`text` (quoted, as repr does, unless `quote` is false) for an error message, cut
    to `limit` characters: errors echo what a caller sent, never unboundedly."""
    cut = text if len(text) <= limit else text[:limit]
    shown_text = repr(cut) if quote else cut
    return shown_text if cut is text else f"{shown_text}... ({len(text)} characters)"


def check_lookup_name(kind: str, name: str) -> None:
    """A name a request looks up: longer than any defined name can be is refused."""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"{kind} name {shown(name, 20)} is longer than {MAX_NAME_LENGTH} characters"
        )


class ValueType(enum.IntEnum):
    """Numbers match the proto enum so conversion is an int cast."""

    DOUBLE = 1
    INT64 = 2
    BOOL = 3
    STRING = 4

    @property
    def numeric(self) -> bool:
        return self is not ValueType.STRING


class Status(enum.IntEnum):
    """Numbers match the proto enum FeatureStatus."""

    PRESENT = 1
    NOT_FOUND = 2
    NULL = 3
    STALE = 4


KEY_TYPES = (ValueType.INT64, ValueType.STRING)
# Plain ints for the hot path (enum attribute lookups cost more than the array work).
_PRESENT, _NOT_FOUND, _NULL, _STALE = (int(s) for s in Status)


@dataclass(frozen=True)
class JoinKey:
    name: str
    type: ValueType


@dataclass(frozen=True)
class Entity:
    name: str
    join_keys: tuple[JoinKey, ...]
    description: str = ""
    version: int = 0


@dataclass(frozen=True)
class Feature:
    name: str
    type: ValueType
    description: str = ""


@dataclass(frozen=True)
class ParquetSource:
    path: str
    timestamp_field: str


@dataclass(frozen=True)
class FeatureView:
    name: str
    entity: str
    features: tuple[Feature, ...]
    # 0 means values never go stale.
    max_age_us: int = 0
    source: ParquetSource | None = None
    description: str = ""
    version: int = 0

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise NotFound(f"feature {self.name}:{shown(name, quote=False)} is not defined")


@dataclass(frozen=True)
class BundleFeature:
    ref: str
    # NaN when unset: a model input slot with no PRESENT value.
    fill_value: float | None = None

    @property
    def fill(self) -> float:
        """What this feature's tensor slot holds when its value is not PRESENT."""
        return math.nan if self.fill_value is None else self.fill_value


@dataclass(frozen=True)
class FeatureBundle:
    name: str
    features: tuple[BundleFeature, ...]
    description: str = ""
    version: int = 0


Definition = Entity | FeatureView | FeatureBundle


def kind_of(definition: Definition) -> str:
    if isinstance(definition, Entity):
        return "entity"
    if isinstance(definition, FeatureView):
        return "feature_view"
    return "bundle"


@dataclass(frozen=True)
class FeatureRef:
    view: str
    feature: str

    def __str__(self) -> str:
        return f"{self.view}:{self.feature}"

    @classmethod
    def parse(cls, text: str) -> FeatureRef:
        view, sep, feature = text.partition(":")
        if not sep or not view or not feature:
            raise InvalidArgument(
                f"feature reference {shown(text)} is not of the form view:feature"
            )
        check_lookup_name("feature view", view)
        check_lookup_name("feature", feature)
        return cls(view, feature)


def check_name(kind: str, name: str) -> None:
    if not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
        raise InvalidArgument(
            f"{kind} name {shown(name)} must match {NAME_PATTERN.pattern} and not be reserved"
        )


@dataclass(frozen=True)
class Catalog:
    """One consistent snapshot of the current definitions; replaced whole on apply."""

    entities: Mapping[str, Entity] = field(default_factory=dict)
    views: Mapping[str, FeatureView] = field(default_factory=dict)
    bundles: Mapping[str, FeatureBundle] = field(default_factory=dict)

    def entity(self, name: str) -> Entity:
        try:
            return self.entities[name]
        except KeyError:
            check_lookup_name("entity", name)
            raise NotFound(f"entity {shown(name)} is not defined") from None

    def view(self, name: str) -> FeatureView:
        try:
            return self.views[name]
        except KeyError:
            check_lookup_name("feature view", name)
            raise NotFound(f"feature view {shown(name)} is not defined") from None

    def bundle(self, name: str) -> FeatureBundle:
        try:
            return self.bundles[name]
        except KeyError:
            check_lookup_name("feature bundle", name)
            raise NotFound(f"feature bundle {shown(name)} is not defined") from None

    def resolve(self, refs: Iterable[str]) -> list[tuple[FeatureRef, FeatureView, Feature]]:
        """Parses and checks feature references; NotFound names the first unknown one."""
        resolved = []
        for text in refs:
            ref = FeatureRef.parse(text)
            view = self.view(ref.view)
            resolved.append((ref, view, view.feature(ref.feature)))
        if not resolved:
            raise InvalidArgument("no features asked for")
        return resolved

    def refs_of_request(self, refs: Sequence[str], bundle: str) -> list[str]:
        """A request names features or a bundle, not both."""
        if refs and bundle:
            raise InvalidArgument("give either features or bundle, not both")
        if bundle:
            return [f.ref for f in self.bundle(bundle).features]
        return list(refs)


def validate_catalog(catalog: Catalog) -> None:
    """Cross-references: views name defined entities; bundles name numeric features."""
    for view in catalog.views.values():
        if view.entity not in catalog.entities:
            raise InvalidArgument(
                f"feature view {view.name!r}: entity {shown(view.entity)} is not defined"
            )
        key_names = {k.name for k in catalog.entities[view.entity].join_keys}
        for feature in view.features:
            if feature.name in key_names:
                raise InvalidArgument(
                    f"feature {view.name}:{feature.name} has the name of a join key"
                )
    for bundle in catalog.bundles.values():
        for item in bundle.features:
            ref = FeatureRef.parse(item.ref)
            if ref.view not in catalog.views:
                raise InvalidArgument(
                    f"bundle {bundle.name!r}: feature view {ref.view!r} is not defined"
                )
            feature = catalog.views[ref.view].feature(ref.feature)
            if not feature.type.numeric:
                raise InvalidArgument(
                    f"bundle {bundle.name!r}: {item.ref} is a string; tensors hold numbers only"
                )


def check_compatible(old: Definition, new: Definition, catalog: Catalog) -> None:
    """Changes that would make stored values mean something else are refused."""
    if isinstance(old, FeatureView) and isinstance(new, FeatureView):
        if old.entity != new.entity:
            raise FailedPrecondition(
                f"feature view {new.name!r}: its entity cannot change ({old.entity} → "
                f"{new.entity}); define a new view"
            )
        new_types = {f.name: f.type for f in new.features}
        for feature in old.features:
            changed = new_types.get(feature.name)
            if changed is not None and changed != feature.type:
                raise FailedPrecondition(
                    f"feature {new.name}:{feature.name}: its type cannot change "
                    f"({feature.type.name} → {changed.name}); add a new feature"
                )
    if isinstance(old, Entity) and isinstance(new, Entity) and old.join_keys != new.join_keys:
        users = sorted(v.name for v in catalog.views.values() if v.entity == new.name)
        if users:
            raise FailedPrecondition(
                f"entity {new.name!r}: join keys cannot change while views use it "
                f"({', '.join(users)})"
            )


def value_statuses(
    found: np.ndarray,
    null: np.ndarray,
    event_us: np.ndarray,
    as_of_us: np.ndarray | int,
    max_age_us: int,
) -> np.ndarray:
    """Status of each value, as uint8 numbers of `Status`.

    found: a row exists (online: in the store; offline: at or before the instant);
    null: the value in that row is null; event_us: the row's event time;
    as_of_us: the instant asked about (now online, each entity row's timestamp
    offline). Arrays may be [rows] or [features, rows] (event times broadcast).
    A value is STALE when it is older than the view's max age at that
    instant. Online and offline both call this, so they agree by construction.
    """
    statuses = np.full(found.shape, _PRESENT, dtype=np.uint8)
    # copyto broadcasts `where` itself (event times over features), in C.
    if max_age_us > 0:
        np.copyto(statuses, _STALE, where=(as_of_us - event_us) > max_age_us)
    np.copyto(statuses, _NULL, where=null)
    np.copyto(statuses, _NOT_FOUND, where=~found)
    return statuses


def value_status(found: bool, null: bool, event_us: int, as_of_us: int, max_age_us: int) -> int:
    """`value_statuses` for one value, without arrays: the one-entity online read's
    rule. The same precedence (NOT_FOUND over NULL over STALE); a test holds the two
    equal over every combination."""
    if not found:
        return _NOT_FOUND
    if null:
        return _NULL
    if max_age_us > 0 and as_of_us - event_us > max_age_us:
        return _STALE
    return _PRESENT


# Entity keys are stored as one string per entity; composite keys join their parts
# with a separator that cannot occur in an int and is rejected in string keys.
KEY_SEPARATOR = "\x1f"


def entity_keys(entity: Entity, columns: Mapping[str, np.ndarray | list]) -> list[str]:
    """The storage key of each entity row, from the request's join key columns."""
    parts: list[list[str]] = []
    for key in entity.join_keys:
        if key.name not in columns:
            raise InvalidArgument(f"join key {key.name!r} of entity {entity.name!r} is missing")
        values = columns[key.name]
        if key.type is ValueType.INT64:
            if not isinstance(values, np.ndarray) or values.dtype.kind not in "iu":
                raise InvalidArgument(f"join key {key.name!r} must be INT64")
            parts.append([str(v) for v in values.tolist()])
        else:
            if isinstance(values, np.ndarray) and values.dtype.kind in "iub":
                raise InvalidArgument(f"join key {key.name!r} must be STRING")
            strings = [str(v) for v in values]
            if any(KEY_SEPARATOR in s for s in strings):
                raise InvalidArgument(f"join key {key.name!r} contains a control character")
            parts.append(strings)
    if len(parts) == 1:
        return parts[0]
    lengths = {len(p) for p in parts}
    if len(lengths) > 1:
        raise InvalidArgument(f"join key columns of entity {entity.name!r} differ in length")
    return [KEY_SEPARATOR.join(row) for row in zip(*parts, strict=True)]


def entity_count(
    columns: Mapping[str, np.ndarray | list], limit: int = MAX_ENTITIES_PER_READ
) -> int:
    lengths = {len(values) for values in columns.values()}
    if not lengths:
        raise InvalidArgument("no entity key columns given")
    if len(lengths) > 1:
        raise InvalidArgument("entity key columns differ in length")
    count = lengths.pop()
    check_entity_count(count, limit)
    return count


def check_entity_count(count: int, limit: int) -> None:
    if count > limit:
        raise InvalidArgument(
            f"at most {limit} entities per call (setting max_entities_per_read), got {count}"
        )
