"""Definitions, their versioned apply, and the status rule shared online and offline."""

from __future__ import annotations

import numpy as np
import pytest

from modelplane.kernel.errors import FailedPrecondition, InvalidArgument, NotFound
from modelplane.services.feature.definition_store.sqlite import SqliteDefinitionStore
from modelplane.services.feature.definitions import (
    DefinitionRegistry,
    definitions_from_yaml,
    parse_duration_us,
)
from modelplane.services.feature.domain import (
    Entity,
    JoinKey,
    Status,
    ValueType,
    entity_keys,
    value_status,
    value_statuses,
)

YAML = """
entities:
  - name: customer
    join_keys: [customer_id]
  - name: pair
    join_keys: [{name: a, type: int64}, {name: b, type: string}]
feature_views:
  - name: stats
    entity: customer
    ttl: 90m
    features:
      - {name: x, type: double}
      - {name: label, type: string}
bundles:
  - name: model
    features: [stats:x, {ref: "stats:y", fill_value: 0}]
"""
# The bundle above names stats:y, which only this version of the view has.
GOOD = YAML.replace(
    "- {name: label, type: string}", "- {name: label, type: string}\n      - {name: y, type: int64}"
)


def test_statuses_follow_found_null_and_max_age_in_that_order():
    found = np.array([True, True, True, False, True])
    null = np.array([False, False, True, False, True])
    event = np.array([100, 10, 10, 0, 100])
    statuses = value_statuses(found, null, event, 150, max_age_us=50)
    assert statuses.tolist() == [
        Status.PRESENT,
        Status.STALE,
        Status.NULL,
        Status.NOT_FOUND,
        Status.NULL,
    ]
    # Exactly max age old is still fresh; zero max age never goes stale.
    assert value_statuses(found[:1], null[:1], np.array([100]), 150, 50).tolist() == [1]
    assert value_statuses(found[:2], null[:2], event[:2], 10**12, 0).tolist() == [1, 1]
    # Offline passes one instant per row.
    per_row = value_statuses(found[:2], null[:2], event[:2], np.array([120, 200]), 50)
    assert per_row.tolist() == [Status.PRESENT, Status.STALE]


def test_the_one_value_rule_is_the_array_rule():
    """The one-entity online read uses `value_status`; every combination of found,
    null and age (fresh, exactly max age, older) and max age (none, some) agrees."""
    cases = [
        (found, null, event, max_age)
        for found in (True, False)
        for null in (True, False)
        for event in (150, 100, 99, 0)
        for max_age in (0, 50)
    ]
    found, null, event, max_age = (np.array(c) for c in zip(*cases, strict=True))
    for age_limit in (0, 50):
        chosen = max_age == age_limit
        arrays = value_statuses(found[chosen], null[chosen], event[chosen], 150, age_limit)
        ones = [
            value_status(bool(f), bool(n), int(e), 150, age_limit)
            for f, n, e in zip(found[chosen], null[chosen], event[chosen], strict=True)
        ]
        assert arrays.tolist() == ones
    assert {value_status(f, n, e, 150, m) for f, n, e, m in cases} == set(map(int, Status))


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("90s", 90_000_000),
        ("15m", 900_000_000),
        ("1h", 3_600_000_000),
        ("2d", 172_800_000_000),
        ("250ms", 250_000),
        ("10us", 10),
        (30, 30_000_000),
        (None, 0),
        ("0", 0),
    ],
)
def test_durations(text, micros):
    assert parse_duration_us(text, "max_age") == micros


@pytest.mark.parametrize("text", ["soon", "-1h", "1y", True])
def test_bad_durations_are_invalid(text):
    with pytest.raises(InvalidArgument):
        parse_duration_us(text, "max_age")


def test_yaml_definitions_parse_with_shorthands():
    entity, pair, view, bundle = definitions_from_yaml(YAML)
    assert isinstance(entity, Entity) and entity.join_keys == (
        JoinKey("customer_id", ValueType.INT64),
    )
    assert [k.type for k in pair.join_keys] == [ValueType.INT64, ValueType.STRING]
    assert view.max_age_us == 90 * 60 * 1_000_000 and view.source is None
    assert [f.type for f in view.features] == [ValueType.DOUBLE, ValueType.STRING]
    assert [(f.ref, f.fill_value) for f in bundle.features] == [("stats:x", None), ("stats:y", 0)]


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("{name: x, type: double}", "{name: x, type: complex}", "complex"),
        ("name: stats", "name: Stats", "Stats"),
        ("join_keys: [customer_id]", "join_keys: []", "customer"),
        ("ttl: 90m", "ttl: soon", "max_age"),
        ("entities:", "entitys:", "entitys"),
    ],
)
def test_malformed_yaml_is_invalid_and_names_the_culprit(old, new, named):
    with pytest.raises(InvalidArgument) as error:
        definitions_from_yaml(YAML.replace(old, new))
    assert named in error.value.message


def registry(tmp_path):
    return DefinitionRegistry(SqliteDefinitionStore(tmp_path / "defs.db"))


def test_apply_versions_changed_definitions_only(tmp_path):
    reg = registry(tmp_path)
    with pytest.raises(NotFound):  # the bundle names a feature the view lacks
        reg.apply(definitions_from_yaml(YAML))
    good = YAML.replace(', {ref: "stats:y", fill_value: 0}', "")
    changes = reg.apply(definitions_from_yaml(good))
    assert [(c.name, c.version, c.change) for c in changes] == [
        ("customer", 1, "created"),
        ("pair", 1, "created"),
        ("stats", 1, "created"),
        ("model", 1, "created"),
    ]
    assert {c.change for c in reg.apply(definitions_from_yaml(good))} == {"unchanged"}
    grown = good.replace(
        "- {name: label, type: string}",
        "- {name: label, type: string}\n      - {name: y, type: int64}",
    )
    changes = reg.apply(definitions_from_yaml(grown))
    assert [(c.name, c.version, c.change) for c in changes if c.change != "unchanged"] == [
        ("stats", 2, "updated")
    ]
    # A fresh registry over the same file sees the same catalog; history keeps v1.
    again = registry(tmp_path)
    assert again.catalog == reg.catalog
    store = SqliteDefinitionStore(tmp_path / "defs.db")
    assert [len(v.features) for v in store.history("feature_view", "stats")] == [2, 3]


def test_changes_that_would_reinterpret_stored_values_are_refused(tmp_path):
    reg = registry(tmp_path)
    good = GOOD
    reg.apply(definitions_from_yaml(good))
    with pytest.raises(FailedPrecondition, match="stats:x"):
        reg.apply(
            definitions_from_yaml(good.replace("{name: x, type: double}", "{name: x, type: int64}"))
        )
    with pytest.raises(FailedPrecondition, match="entity"):
        reg.apply(definitions_from_yaml(good.replace("entity: customer", "entity: pair")))
    with pytest.raises(FailedPrecondition, match="stats"):
        reg.apply(
            definitions_from_yaml(good.replace("join_keys: [customer_id]", "join_keys: [id]"))
        )
    with pytest.raises(InvalidArgument, match="string"):
        reg.apply(
            definitions_from_yaml(good.replace("features: [stats:x", "features: [stats:label"))
        )
    assert reg.catalog.views["stats"].version == 1  # nothing refused was stored


def test_entity_keys_are_typed_and_composite_keys_are_joined():
    customer = Entity("customer", (JoinKey("id", ValueType.INT64),))
    assert entity_keys(customer, {"id": np.array([1, 22])}) == ["1", "22"]
    with pytest.raises(InvalidArgument, match="INT64"):
        entity_keys(customer, {"id": ["1"]})
    with pytest.raises(InvalidArgument, match="missing"):
        entity_keys(customer, {"other": np.array([1])})
    pair = Entity("pair", (JoinKey("a", ValueType.INT64), JoinKey("b", ValueType.STRING)))
    keys = entity_keys(pair, {"a": np.array([1, 1]), "b": ["x", "y"]})
    assert len(set(keys)) == 2 and all(k.startswith("1") for k in keys)
