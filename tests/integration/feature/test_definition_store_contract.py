"""One contract for both definition stores: SQLite (a file) and PostgreSQL (a schema of
the machine's server). Each factory call opens another instance on the same data, as
another feature process would."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelplane.kernel.errors import InvalidArgument, Unavailable
from modelplane.services.feature.definition_store import DefinitionStore, open_definition_store
from modelplane.services.feature.definition_store.postgres import PostgresDefinitionStore
from modelplane.services.feature.definitions import DefinitionRegistry, definitions_from_yaml
from modelplane.services.feature.domain import Definition, FeatureView
from tests.postgres import POSTGRES_URL, fresh_schema

StoreFactory = Callable[[], DefinitionStore]

YAML = """
entities:
  - {{name: customer, join_keys: [customer_id]}}
feature_views:
  - name: stats
    entity: customer
    description: "{description}"
    features: [{{name: trips, type: double}}]
"""


def definitions(description: str = "") -> list[Definition]:
    return definitions_from_yaml(YAML.format(description=description))


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[DefinitionStore] = []
    with fresh_schema("feature") as schema:
        location = str(tmp_path / "defs.db") if request.param == "sqlite" else POSTGRES_URL

        def factory() -> DefinitionStore:
            store = open_definition_store(location, schema)
            opened.append(store)
            return store

        try:
            yield factory
        finally:
            for store in opened:
                store.close()


def test_load_gives_the_latest_versions_and_history_all_of_them(store_factory):
    store = store_factory()
    reg = DefinitionRegistry(store)
    reg.apply(definitions("first"))
    reg.apply(definitions("second"))
    latest = {d.name: d for d in store_factory().load()}
    assert latest["customer"].version == 1
    assert (latest["stats"].version, latest["stats"].description) == (2, "second")
    history = store.history("feature_view", "stats")
    assert [(v.version, v.description) for v in history] == [(1, "first"), (2, "second")]
    assert store.history("feature_view", "nothing") == []


def test_a_plan_sees_what_another_instance_saved(store_factory):
    DefinitionRegistry(store_factory()).apply(definitions("from a"))
    seen: list[list[Definition]] = []

    def plan(latest: list[Definition]) -> list[Definition]:
        seen.append(latest)
        return []

    store_factory().save_with(plan)
    assert sorted((d.name, d.version) for d in seen[0]) == [("customer", 1), ("stats", 1)]


def test_a_failed_plan_saves_nothing_and_releases_the_lock(store_factory):
    store = store_factory()
    DefinitionRegistry(store).apply(definitions("kept"))

    def failing(latest: list[Definition]) -> list[Definition]:
        raise InvalidArgument("no")

    with pytest.raises(InvalidArgument):
        store.save_with(failing)
    assert [d.description for d in store.load() if isinstance(d, FeatureView)] == ["kept"]
    # Another instance can still write: the failed apply holds no lock.
    DefinitionRegistry(store_factory()).apply(definitions("next"))
    assert [v.version for v in store.history("feature_view", "stats")] == [1, 2]


def test_applies_from_several_processes_queue_and_never_reuse_a_version(store_factory):
    registries = [DefinitionRegistry(store_factory()) for _ in range(3)]
    registries[0].apply(definitions("start"))
    errors: list[BaseException] = []
    start = threading.Barrier(len(registries))

    def apply_many(index: int) -> None:
        start.wait()
        for round_ in range(4):
            try:
                registries[index].apply(definitions(f"{index}-{round_}"))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=apply_many, args=(i,)) for i in range(len(registries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    history = store_factory().history("feature_view", "stats")
    # Each apply planned against the latest stored version, whichever process made it.
    assert [v.version for v in history] == list(range(1, 14))
    assert sorted(v.description for v in history[1:]) == sorted(
        f"{i}-{r}" for i in range(3) for r in range(4)
    )


def test_an_unchanged_apply_adds_no_version(store_factory):
    store = store_factory()
    DefinitionRegistry(store).apply(definitions("same"))
    changes = DefinitionRegistry(store_factory()).apply(definitions("same"))
    assert {c.change for c in changes} == {"unchanged"}
    assert [v.version for v in store.history("feature_view", "stats")] == [1]


def test_a_watermark_moves_forward_never_back(store_factory):
    store = store_factory()
    assert store.watermark("stats") is None
    store.set_watermark("stats", 2_000)
    store.set_watermark("stats", 1_000)  # a slower replica finishing an older range
    assert store_factory().watermark("stats") == 2_000
    store.set_watermark("stats", 3_000)
    assert store.watermark("stats") == 3_000
    assert store.watermark("other") is None


def test_an_unreachable_postgres_is_unavailable_not_a_hang():
    with pytest.raises(Unavailable):
        PostgresDefinitionStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=0.5)
