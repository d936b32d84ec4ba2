"""Online reads and writes against an OnlineStore, under the current definitions."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modelplane.kernel.errors import InvalidArgument, NotFound
from modelplane.services.feature import codec
from modelplane.services.feature.codec import Column
from modelplane.services.feature.definitions import DefinitionRegistry
from modelplane.services.feature.domain import (
    MAX_ENTITIES_PER_READ,
    MAX_ROWS_PER_WRITE,
    Catalog,
    Feature,
    FeatureRef,
    FeatureView,
    Status,
    ValueType,
    entity_count,
    entity_keys,
    shown,
    value_status,
    value_statuses,
)
from modelplane.services.feature.online_store import OnlineStore, WriteOutcome

KeyColumns = Mapping[str, np.ndarray | list]

# What a slot holds when its status is not PRESENT.
_BLANK: dict[ValueType, object] = {
    ValueType.DOUBLE: np.nan,
    ValueType.INT64: 0,
    ValueType.BOOL: False,
    ValueType.STRING: "",
}


PRESENT = int(Status.PRESENT)
# The same blanks as bytes of each numeric type's array, for the one-entity read.
_BLANK_BYTES: dict[ValueType, bytes] = {
    t: np.array([_BLANK[t]], dtype=codec.numpy_dtype(t)).tobytes() for t in ValueType if t.numeric
}


def now_us() -> int:
    return time.time_ns() // 1_000


class Block:
    """[features, entities] arrays of features of one view and type, as read together.

    Per-feature results are rows of a block, and a response serializes each array's
    bytes once per block and slices them per feature: the read path does a fixed
    amount of array work per view, not per feature.
    """

    __slots__ = ("_bytes", "count", "null", "statuses", "times", "value_type", "values")

    def __init__(
        self,
        value_type: ValueType,
        values: np.ndarray,
        null: np.ndarray,
        statuses: np.ndarray,
        times: np.ndarray,
    ) -> None:
        self.value_type = value_type
        self.values = values
        self.null = null
        self.statuses = statuses  # uint8 Status numbers
        self.times = times  # int64 event times, 0 where NOT_FOUND
        self.count = values.shape[1]
        self._bytes: tuple[bytes, bytes, bytes] | None = None

    def raw(self) -> tuple[bytes, bytes, bytes]:
        """Values (numeric types only), statuses and event times as bytes in numpy's
        native order, feature-major."""
        if self._bytes is None:
            self._bytes = (
                self.values.tobytes() if self.value_type.numeric else b"",
                self.statuses.tobytes(),
                self.times.astype(np.int64, copy=False).tobytes(),
            )
        return self._bytes


class FeatureResult:
    """One requested feature for every entity (row `index` of a block); slots whose
    status is not PRESENT hold a blank value."""

    __slots__ = ("block", "index", "ref")

    def __init__(self, ref: str, block: Block, index: int) -> None:
        self.ref = ref
        self.block = block
        self.index = index

    @property
    def column(self) -> Column:
        return Column(
            self.block.value_type, self.block.values[self.index], self.block.null[self.index]
        )

    @property
    def statuses(self) -> np.ndarray:
        return self.block.statuses[self.index]

    @property
    def event_us(self) -> np.ndarray:
        return self.block.times[self.index]


@dataclass(frozen=True)
class OnlineResult:
    count: int
    as_of_us: int
    features: list[FeatureResult]
    catalog: Catalog


@dataclass(frozen=True)
class SingleEntityRead:
    """One entity's requested features, in request order, for a response written
    without arrays: per feature its ref, type, value (the little-endian bytes of the
    type's array item, blank unless PRESENT), status and event time (0 when not found).
    `statuses` has one entry per feature read (a feature asked for twice is read once)."""

    as_of_us: int
    features: list[tuple[str, ValueType, bytes, int, int]]
    statuses: list[int]
    catalog: Catalog  # the snapshot the read used


@dataclass(frozen=True)
class BundleTensor:
    values: np.ndarray  # float32 [entities, features], row-major
    statuses: np.ndarray  # uint8 [entities, features]
    refs: list[str]
    bundle_version: int
    as_of_us: int


@dataclass(frozen=True)
class _ViewRead:
    """How to read one view for a request: its features grouped by type."""

    view: FeatureView
    names: list[str]
    refs: list[str]
    types: list[ValueType]
    groups: list[tuple[ValueType, list[int]]]


@dataclass(frozen=True)
class _ReadPlan:
    catalog: Catalog  # the snapshot the plan was made from, used for the whole read
    views: list[_ViewRead]
    # Output position → (index into views, index into that view's names).
    order: list[tuple[int, int]]
    numeric: bool  # every feature read is a number (or bool)


class OnlineFeatures:
    # Distinct feature lists seen are few (one per model); the bound guards against abuse.
    MAX_PLANS = 1024

    def __init__(
        self,
        registry: DefinitionRegistry,
        store: OnlineStore,
        clock_us: Callable[[], int] = now_us,
        max_entities: int = MAX_ENTITIES_PER_READ,
    ) -> None:
        self._registry = registry
        self._store = store
        self.max_entities = max_entities
        self._clock_us = clock_us
        self._plans: dict[tuple[tuple[str, ...], str], _ReadPlan] = {}
        self._plans_catalog = registry.catalog

    def _plan(self, refs: Sequence[str], bundle: str) -> _ReadPlan:
        """Resolves a request's features once per catalog version, not once per call."""
        catalog = self._registry.catalog
        if catalog is not self._plans_catalog or len(self._plans) >= self.MAX_PLANS:
            self._plans = {}
            self._plans_catalog = catalog
        key = (tuple(refs), bundle)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        resolved = catalog.resolve(catalog.refs_of_request(refs, bundle))
        by_view: dict[str, tuple[FeatureView, list[Feature]]] = {}
        for _, view, feature in resolved:
            entry = by_view.setdefault(view.name, (view, []))
            if feature not in entry[1]:
                entry[1].append(feature)
        views = []
        for view, features in by_view.values():
            groups: dict[ValueType, list[int]] = {}
            for index, feature in enumerate(features):
                groups.setdefault(feature.type, []).append(index)
            views.append(
                _ViewRead(
                    view,
                    [f.name for f in features],
                    [str(FeatureRef(view.name, f.name)) for f in features],
                    [f.type for f in features],
                    list(groups.items()),
                )
            )
        position = {
            (v.view.name, name): (vi, fi)
            for vi, v in enumerate(views)
            for fi, name in enumerate(v.names)
        }
        plan = _ReadPlan(
            catalog,
            views,
            [position[(ref.view, ref.feature)] for ref, _, _ in resolved],
            all(t.numeric for v in views for t in v.types),
        )
        self._plans[key] = plan
        return plan

    @staticmethod
    def _keys_of_views(
        plan: _ReadPlan, key_columns: KeyColumns
    ) -> list[tuple[_ViewRead, list[str]]]:
        """Each view to read, with the storage keys of the request's entities (made once
        per entity, whatever the number of its views)."""
        keys_by_entity: dict[str, list[str]] = {}
        views = []
        for read in plan.views:
            entity = read.view.entity
            keys = keys_by_entity.get(entity)
            if keys is None:
                keys = entity_keys(plan.catalog.entity(entity), key_columns)
                keys_by_entity[entity] = keys
            views.append((read, keys))
        return views

    def read(self, key_columns: KeyColumns, refs: Sequence[str], bundle: str = "") -> OnlineResult:
        plan = self._plan(refs, bundle)
        catalog = plan.catalog
        count = entity_count(key_columns, self.max_entities)
        as_of = self._clock_us()
        per_view: list[list[FeatureResult]] = []
        for read, keys in self._keys_of_views(plan, key_columns):
            view = read.view
            rows = self._store.read_rows(view.name, read.names, keys)
            results: list[FeatureResult] = [None] * len(read.names)  # type: ignore[list-item]
            for value_type, indices in read.groups:
                if value_type is ValueType.STRING:
                    for i in indices:
                        column, found = codec.decode(value_type, rows.cells[i])
                        results[i] = _result(
                            [read.refs[i]], view, value_type, column.values[None, :],
                            column.null[None, :], found[None, :], rows.event_us, as_of,
                        )[0]  # fmt: skip
                    continue
                values, null, found = codec.decode_block(
                    value_type, [rows.cells[i] for i in indices]
                )
                block = _result(
                    [read.refs[i] for i in indices],
                    view, value_type, values, null, found, rows.event_us, as_of,
                )  # fmt: skip
                for j, i in enumerate(indices):
                    results[i] = block[j]
            per_view.append(results)
        ordered = [per_view[vi][fi] for vi, fi in plan.order]
        return OnlineResult(count, as_of, ordered, catalog)

    def read_single(
        self, key_columns: KeyColumns, refs: Sequence[str], bundle: str = ""
    ) -> SingleEntityRead | None:
        """`read` for the common online call, one entity of numeric features, without
        arrays, down to the store (`read_row`): for one row, the thirty-odd small numpy
        operations of `read` cost more than the store read itself. Measured, handler CPU
        in process: ~160 -> ~110 µs on SQLite, ~225 -> ~180 on Redis without them, then
        134 -> 104 and 176 -> 148 with `read_row` instead of `read_rows`; in the pinned
        server the latter saved ~90 µs of CPU per call (~685 -> ~590, on a slow VM).
        Same statuses, blanks and event times as `read`, byte for byte in the response,
        which a test checks case by case. None when the call is not of that kind."""
        plan = self._plan(refs, bundle)
        if not plan.numeric or entity_count(key_columns, self.max_entities) != 1:
            return None
        as_of = self._clock_us()
        per_view: list[list[tuple[str, ValueType, bytes, int, int]]] = []
        statuses: list[int] = []
        for read, (key,) in self._keys_of_views(plan, key_columns):
            view = read.view
            row = self._store.read_row(view.name, read.names, key)
            event_us, cells = (0, [None] * len(read.names)) if row is None else row
            features = []
            for ref, value_type, cell in zip(read.refs, read.types, cells, strict=True):
                found = cell is not None  # None: never written (no row, or a newer column)
                status = value_status(
                    found, cell == codec.NULL_CELL, event_us, as_of, view.max_age_us
                )
                value = cell if cell is not None and status == PRESENT else _BLANK_BYTES[value_type]
                features.append((ref, value_type, value, status, event_us if found else 0))
                statuses.append(status)
            per_view.append(features)
        return SingleEntityRead(
            as_of, [per_view[vi][fi] for vi, fi in plan.order], statuses, plan.catalog
        )

    def bundle_tensor_single(
        self, bundle_name: str, key_columns: KeyColumns
    ) -> BundleTensor | None:
        """`bundle_tensor` for one entity, built on `read_single`: the same float32
        values (each type cast by numpy, as there: an int64 is not rounded twice through
        a Python float), fills and statuses, which a test checks byte for byte. None when
        the call is not of that kind."""
        single = self.read_single(key_columns, [], bundle_name)
        if single is None:
            return None
        bundle = single.catalog.bundle(bundle_name)
        width = len(bundle.features)
        values = np.empty((1, width), dtype=np.float32)
        statuses = np.empty((1, width), dtype=np.uint8)
        present: dict[ValueType, tuple[list[int], list[bytes]]] = {}
        for j, (item, (_, value_type, value, status, _)) in enumerate(
            zip(bundle.features, single.features, strict=True)
        ):
            statuses[0, j] = status
            if status == PRESENT:
                columns, cells = present.setdefault(value_type, ([], []))
                columns.append(j)
                cells.append(value)
            else:
                values[0, j] = np.float32(item.fill)
        for value_type, (columns, cells) in present.items():
            stored = np.frombuffer(b"".join(cells), dtype=codec.numpy_dtype(value_type))
            values[0, columns] = stored.astype(np.float32)
        refs = [ref for ref, *_ in single.features]
        return BundleTensor(values, statuses, refs, bundle.version, single.as_of_us)

    def bundle_tensor(self, bundle_name: str, key_columns: KeyColumns) -> BundleTensor:
        result = self.read(key_columns, [], bundle_name)
        bundle = result.catalog.bundle(bundle_name)  # the version the read used
        width = len(bundle.features)
        values = np.empty((result.count, width), dtype=np.float32)
        statuses = np.empty((result.count, width), dtype=np.uint8)
        for j, (item, feature) in enumerate(zip(bundle.features, result.features, strict=True)):
            column = feature.column.values.astype(np.float32)
            column[feature.statuses != Status.PRESENT] = np.float32(item.fill)
            values[:, j] = column
            statuses[:, j] = feature.statuses
        return BundleTensor(
            values, statuses, [f.ref for f in result.features], bundle.version, result.as_of_us
        )

    def write(
        self,
        view_name: str,
        key_columns: KeyColumns,
        event_us: np.ndarray,
        columns: Mapping[str, Column],
    ) -> WriteOutcome:
        """Checks the whole request first, so a bad value means nothing is written."""
        catalog = self._registry.catalog
        view = catalog.view(view_name)
        rows = len(event_us)
        if rows > MAX_ROWS_PER_WRITE:
            raise InvalidArgument(f"at most {MAX_ROWS_PER_WRITE} rows per write, got {rows}")
        keys = entity_keys(catalog.entity(view.entity), key_columns)
        if len(keys) != rows:
            raise InvalidArgument(f"{len(keys)} entity keys for {rows} event times")
        if rows and int(event_us.min()) <= 0:
            raise InvalidArgument("event_time_unix_us must be positive")
        check_columns(view, columns, rows)
        if rows == 0:
            return WriteOutcome(0, 0)
        cells = [codec.encode(columns[f.name]) for f in view.features]
        return self._store.write_rows(
            view.name, [f.name for f in view.features], keys, event_us.tolist(), cells
        )


def _result(
    refs: list[str],
    view: FeatureView,
    value_type: ValueType,
    values: np.ndarray,
    null: np.ndarray,
    found: np.ndarray,
    event_us: np.ndarray,
    as_of_us: int,
) -> list[FeatureResult]:
    """Statuses for a [features, entities] block; blanks every slot not PRESENT."""
    statuses = value_statuses(found, null, event_us, as_of_us, view.max_age_us)
    absent = statuses != PRESENT
    if absent.any():
        values[absent] = _BLANK[value_type]
    times = np.where(found, event_us, 0)
    block = Block(value_type, values, null, statuses, times)
    return [FeatureResult(ref, block, j) for j, ref in enumerate(refs)]


def check_columns(view: FeatureView, columns: Mapping[str, Column], rows: int) -> None:
    """Every feature of the view, of its declared type, one value per row."""
    declared = {f.name: f for f in view.features}
    for name in columns:
        if name not in declared:
            raise NotFound(f"feature {view.name}:{shown(name, quote=False)} is not defined")
    missing = [name for name in declared if name not in columns]
    if missing:
        raise InvalidArgument(
            f"a write to {view.name!r} carries every feature of the view (null where unknown);"
            f" missing: {', '.join(missing)}"
        )
    for name, column in columns.items():
        expected = declared[name].type
        if column.type is not expected:
            raise InvalidArgument(
                f"feature {view.name}:{shown(name, quote=False)} is {expected.name}, "
                f"got {column.type.name} values"
            )
        if len(column) != rows:
            raise InvalidArgument(
                f"feature {view.name}:{shown(name, quote=False)} has {len(column)} values "
                f"for {rows} rows"
            )
