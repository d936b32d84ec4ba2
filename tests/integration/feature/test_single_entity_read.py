"""The one-entity read path (`OnlineFeatures.read_single`, no arrays) answers exactly
what the general path (`OnlineFeatures.read`) answers, byte for byte, on both stores,
and so does the one-entity bundle tensor (`bundle_tensor_single` / `bundle_tensor`):
present, null, stale, never written, a feature added after the row was written, two
views, two entities' key kinds, duplicate refs and bundles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelplane.services.feature import wire
from modelplane.services.feature.codec import Column
from modelplane.services.feature.definition_store.sqlite import SqliteDefinitionStore
from modelplane.services.feature.definitions import DefinitionRegistry, definitions_from_yaml
from modelplane.services.feature.domain import Status, ValueType
from modelplane.services.feature.online import OnlineFeatures
from modelplane.services.feature.online_store import OnlineStore

NOW = 1_800_000_000_000_000
MINUTE = 60_000_000

YAML = """
entities:
  - name: customer
    join_keys: [customer_id]
  - name: pair
    join_keys: [{name: a, type: int64}, {name: b, type: string}]
feature_views:
  - name: stats
    entity: customer
    max_age: 10m
    features:
      - {name: x, type: double}
      - {name: n, type: int64}
      - {name: flag, type: bool}
      - {name: label, type: string}
  - name: more
    entity: customer
    features: [{name: y, type: double}]
  - name: pairs
    entity: pair
    max_age: 10m
    features: [{name: z, type: double}]
bundles:
  - name: model
    features: [stats:x, more:y, stats:n, {ref: stats:flag, fill_value: 0}]
"""
# A later version of `stats` adds a feature: rows written before lack it.
LATER = YAML.replace(
    "      - {name: label, type: string}",
    "      - {name: label, type: string}\n      - {name: w, type: double}",
)


def column(kind: ValueType, values: list, null: list[bool]) -> Column:
    dtype = {ValueType.DOUBLE: np.float64, ValueType.INT64: np.int64, ValueType.BOOL: bool}
    return Column(kind, np.array(values, dtype=dtype.get(kind, object)), np.array(null))


@pytest.fixture
def online(online_store: OnlineStore, tmp_path: Path) -> Iterator[OnlineFeatures]:
    definitions = SqliteDefinitionStore(tmp_path / "definitions.db")

    def prepare(views):  # type: ignore[no-untyped-def]
        for view in views:
            online_store.ensure_view(view.name, [f.name for f in view.features])

    registry = DefinitionRegistry(definitions, on_views_changed=prepare)
    registry.apply(definitions_from_yaml(YAML))
    features = OnlineFeatures(registry, online_store, clock_us=lambda: NOW)
    customers = {"customer_id": np.array([1, 2, 3], np.int64)}
    features.write(
        "stats",
        customers,
        # fresh; stale (older than 10 minutes); exactly 10 minutes old (still fresh)
        np.array([NOW - MINUTE, NOW - 11 * MINUTE, NOW - 10 * MINUTE], np.int64),
        {
            "x": column(ValueType.DOUBLE, [1.5, 0.0, -2.0], [False, True, False]),
            # 2**60 + 2**36 + 1 rounds to a different float32 through a float64 (twice)
            # than directly, as numpy casts it: the bundle tensor must cast it directly.
            "n": column(ValueType.INT64, [2**60 + 2**36 + 1, -(2**62), 0], [False, False, True]),
            "flag": column(ValueType.BOOL, [True, False, True], [False, False, False]),
            "label": column(ValueType.STRING, ["a", "b", ""], [False, False, True]),
        },
    )
    # Customer 1 has no `more` row; customer 4 has nothing at all.
    features.write(
        "more",
        {"customer_id": np.array([2, 3], np.int64)},
        np.array([NOW - 99 * MINUTE, NOW], np.int64),
        {"y": column(ValueType.DOUBLE, [float("nan"), 4.0], [False, False])},
    )
    features.write(
        "pairs",
        {"a": np.array([1], np.int64), "b": ["k"]},
        np.array([NOW - MINUTE], np.int64),
        {"z": column(ValueType.DOUBLE, [9.0], [False])},
    )
    registry.apply(definitions_from_yaml(LATER))
    yield features
    definitions.close()


def both_paths(online: OnlineFeatures, keys: dict, refs: list[str], bundle: str = "") -> bytes:
    single = online.read_single(keys, refs, bundle)
    assert single is not None
    general = online.read(keys, refs, bundle)
    expected = wire.online_response(general.count, general.as_of_us, general.features)
    got = wire.single_entity_response(single)
    assert got.SerializeToString() == expected.SerializeToString()
    # Statuses counted once per feature read, however often a request names it.
    blocks = {id(f.block): f.block for f in general.features}
    counted = sorted(int(s) for b in blocks.values() for s in b.statuses.ravel())
    assert sorted(single.statuses) == counted
    return got.SerializeToString()


REFS = [
    ["stats:x", "stats:n", "stats:flag", "more:y"],
    ["more:y", "stats:x", "stats:x", "stats:w", "stats:flag", "stats:n"],
    ["stats:w"],
]


@pytest.mark.parametrize("customer", [1, 2, 3, 4])
@pytest.mark.parametrize("refs", REFS)
def test_one_customer_reads_the_same_on_both_paths(online, customer, refs):
    both_paths(online, {"customer_id": np.array([customer], np.int64)}, refs)


@pytest.mark.parametrize("customer", [1, 2, 3, 4])
def test_a_bundle_reads_the_same_on_both_paths(online, customer):
    both_paths(online, {"customer_id": np.array([customer], np.int64)}, [], "model")


@pytest.mark.parametrize("customer", [1, 2, 3, 4])
def test_a_bundle_tensor_is_the_same_on_both_paths(online, customer):
    keys = {"customer_id": np.array([customer], np.int64)}
    single = online.bundle_tensor_single("model", keys)
    assert single is not None
    general = online.bundle_tensor("model", keys)
    assert wire.tensor_payload(single.values, single.statuses) == wire.tensor_payload(
        general.values, general.statuses
    )
    assert single.values.shape == general.values.shape == (1, 4)
    assert (single.refs, single.bundle_version, single.as_of_us) == (
        general.refs, general.bundle_version, general.as_of_us,
    )  # fmt: skip


def test_the_bundle_tensor_casts_int64_to_float32_directly(online):
    tensor = online.bundle_tensor_single("model", {"customer_id": np.array([1], np.int64)})
    assert tensor is not None
    n = tensor.refs.index("stats:n")
    assert tensor.values[0, n] == np.float32(2**60 + 2**37)  # not 2**60, as via a float64
    assert np.float32(float(2**60 + 2**36 + 1)) == np.float32(2**60)


@pytest.mark.parametrize("pair", [(1, "k"), (1, "missing")])
def test_a_composite_key_reads_the_same_on_both_paths(online, pair):
    keys = {"a": np.array([pair[0]], np.int64), "b": [pair[1]]}
    both_paths(online, keys, ["pairs:z"])


def test_the_cases_above_cover_every_status(online):
    seen = set()
    for customer in (1, 2, 3, 4):
        for refs in REFS:
            keys = {"customer_id": np.array([customer], np.int64)}
            single = online.read_single(keys, refs)
            assert single is not None
            seen.update(single.statuses)
    assert seen == {int(s) for s in Status}


def test_strings_and_several_entities_take_the_general_path(online):
    one = {"customer_id": np.array([1], np.int64)}
    two = {"customer_id": np.array([1, 2], np.int64)}
    assert online.read_single(one, ["stats:x", "stats:label"]) is None
    assert online.read_single(two, ["stats:x"]) is None
    assert online.bundle_tensor_single("model", two) is None
