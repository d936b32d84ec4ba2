"""One contract, both online stores: the same tests run on SQLite and on Redis."""

from __future__ import annotations

import pytest
import redis

from modelplane.kernel.errors import Unavailable
from modelplane.services.feature.online_store import OnlineStore
from modelplane.services.feature.online_store.redis import RedisOnlineStore
from tests.integration.feature.servers import REDIS_URL

VIEW = "stats"
FEATURES = ["a", "b"]


def cell(value: int) -> bytes:
    return value.to_bytes(8, "little", signed=True)


@pytest.fixture
def store(online_store: OnlineStore) -> OnlineStore:
    online_store.ensure_view(VIEW, FEATURES)
    return online_store


def test_rows_read_back_in_the_order_asked_with_absent_keys_not_found(store):
    outcome = store.write_rows(
        VIEW, FEATURES, ["1", "2"], [100, 200], [[cell(1), cell(2)], [cell(10), b""]]
    )
    assert (outcome.written, outcome.ignored) == (2, 0)
    rows = store.read_rows(VIEW, FEATURES, ["2", "missing", "1"])
    assert rows.found.tolist() == [True, False, True]
    assert rows.event_us.tolist() == [200, 0, 100]
    assert list(rows.cells[0]) == [cell(2), None, cell(1)]
    # An explicit null (b"") stays distinct from an absent value (None).
    assert list(rows.cells[1]) == [b"", None, cell(10)]


def test_a_one_entity_read_agrees_with_the_same_entity_read_among_others(store):
    # One-entity reads take their own path in each store (the common online call).
    store.write_rows(VIEW, FEATURES, ["1"], [100], [[cell(1)], [b""]])
    for key in ["1", "missing"]:
        alone = store.read_rows(VIEW, FEATURES, [key])
        among = store.read_rows(VIEW, FEATURES, [key, "other"])
        assert alone.found.tolist() == among.found.tolist()[:1]
        assert alone.found.dtype == among.found.dtype
        assert alone.event_us.tolist() == among.event_us.tolist()[:1]
        assert alone.event_us.dtype == among.event_us.dtype
        assert [list(c) for c in alone.cells] == [list(c)[:1] for c in among.cells]
    # And `read_row`, the same without arrays.
    assert store.read_row(VIEW, FEATURES, "missing") is None
    event_us, cells = store.read_row(VIEW, FEATURES, "1")
    assert (event_us, list(cells)) == (100, [cell(1), b""])
    assert type(event_us) is int


def test_an_older_row_never_overwrites_a_newer_one(store):
    store.write_rows(VIEW, FEATURES, ["1"], [500], [[cell(5)], [cell(5)]])
    older = store.write_rows(VIEW, FEATURES, ["1"], [400], [[cell(4)], [cell(4)]])
    assert (older.written, older.ignored) == (0, 1)
    assert list(store.read_rows(VIEW, FEATURES, ["1"]).cells[0]) == [cell(5)]
    same = store.write_rows(VIEW, FEATURES, ["1"], [500], [[cell(6)], [cell(6)]])
    assert same.written == 1  # an equal event time is a correction and replaces the row
    newer = store.write_rows(VIEW, FEATURES, ["1"], [600], [[cell(7)], [cell(7)]])
    assert newer.written == 1
    rows = store.read_rows(VIEW, FEATURES, ["1"])
    assert list(rows.cells[0]) == [cell(7)] and rows.event_us.tolist() == [600]


def test_within_one_write_the_newest_row_of_an_entity_wins_whatever_the_order(store):
    outcome = store.write_rows(
        VIEW,
        FEATURES,
        ["1", "1", "1"],
        [300, 900, 600],
        [[cell(3), cell(9), cell(6)], [cell(3), cell(9), cell(6)]],
    )
    assert outcome.written == 2 and outcome.ignored == 1
    rows = store.read_rows(VIEW, FEATURES, ["1"])
    assert list(rows.cells[0]) == [cell(9)] and rows.event_us.tolist() == [900]


def test_many_entities_and_repeated_keys_in_one_read(store):
    keys = [str(i) for i in range(1_500)]
    store.write_rows(
        VIEW,
        FEATURES,
        keys,
        list(range(1, 1_501)),
        [[cell(i) for i in range(1_500)], [cell(-i) for i in range(1_500)]],
    )
    asked = [*keys[::-1], "7", "nope", "7"]
    rows = store.read_rows(VIEW, FEATURES, asked)
    assert rows.found.sum() == 1_502
    assert list(rows.cells[0][:1_500]) == [cell(i) for i in range(1_499, -1, -1)]
    assert list(rows.cells[1][-3:]) == [cell(-7), None, cell(-7)]


def test_a_subset_of_features_can_be_read_and_new_features_start_absent(store):
    store.write_rows(VIEW, FEATURES, ["1"], [100], [[cell(1)], [cell(2)]])
    store.ensure_view(VIEW, [*FEATURES, "c"])
    rows = store.read_rows(VIEW, ["b", "c"], ["1"])
    assert rows.found.tolist() == [True]
    assert [list(c) for c in rows.cells] == [[cell(2)], [None]]
    event_us, cells = store.read_row(VIEW, ["c", "a"], "1")
    assert (event_us, list(cells)) == (100, [None, cell(1)])


def test_a_malformed_write_stores_nothing(store):
    with pytest.raises(ValueError):
        # One cell short for the second feature: rejected before anything lands.
        store.write_rows(VIEW, FEATURES, ["1", "2"], [1, 2], [[cell(1), cell(2)], [cell(1)]])
    assert not store.read_rows(VIEW, FEATURES, ["1", "2"]).found.any()


def test_views_are_separate(store):
    store.ensure_view("other", FEATURES)
    store.write_rows(VIEW, FEATURES, ["1"], [1], [[cell(1)], [cell(1)]])
    assert not store.read_rows("other", FEATURES, ["1"]).found.any()


def test_concurrent_writers_converge_on_the_newest_row(store):
    import random
    from concurrent.futures import ThreadPoolExecutor

    times = list(range(1, 401))
    random.Random(5).shuffle(times)

    def push(chunk: list[int]) -> None:
        for t in chunk:
            store.write_rows(VIEW, FEATURES, ["hot"], [t], [[cell(t)], [cell(-t)]])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(push, [times[i::8] for i in range(8)]))
    rows = store.read_rows(VIEW, FEATURES, ["hot"])
    assert rows.event_us.tolist() == [400]
    assert [list(c) for c in rows.cells] == [[cell(400)], [cell(-400)]]


@pytest.mark.parametrize("store_kind", ["redis"], indirect=True)
@pytest.mark.parametrize("keys", [["1"], ["1", "2", "3"]])
def test_a_redis_read_whose_connection_was_dropped_reconnects(online_store, keys):
    assert isinstance(online_store, RedisOnlineStore)
    online_store.write_rows(VIEW, FEATURES, ["1"], [100], [[cell(1)], [cell(2)]])
    assert online_store.read_rows(VIEW, FEATURES, keys).found.tolist()[0] is True
    # Kill exactly this thread's read connection (other clients of Redis are left alone),
    # as a Redis restart or client timeout would.
    connection = online_store._reader()
    connection.send_command("CLIENT", "ID")
    client_id = connection.read_response()
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        assert admin.client_kill_filter(_id=client_id) == 1
    finally:
        admin.close()
    assert online_store.read_rows(VIEW, FEATURES, keys).event_us.tolist()[0] == 100


@pytest.mark.parametrize("store_kind", ["redis"], indirect=True)
def test_a_failed_pipelined_redis_read_leaves_no_reply_for_the_next_read(online_store):
    """The replies after a failing one are still on the socket when the read raises; a
    later read on that socket would take them for its own and return another entity's
    values. The failed read must drop the socket instead."""
    assert isinstance(online_store, RedisOnlineStore)
    online_store.write_rows(VIEW, FEATURES, ["1", "2"], [100, 200], [[cell(1), cell(2)]] * 2)
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        admin.set(online_store._key(VIEW, "broken"), "not a hash")  # HMGET fails: WRONGTYPE
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            online_store.read_rows(VIEW, FEATURES, ["1", "broken", "2"])
    finally:
        admin.close()
    rows = online_store.read_rows(VIEW, FEATURES, ["2", "1"])
    assert rows.event_us.tolist() == [200, 100]
    assert [list(c) for c in rows.cells] == [[cell(2), cell(1)], [cell(2), cell(1)]]


@pytest.mark.parametrize("keys", [["1"], ["1", "2", "3"]])
def test_a_redis_that_is_down_fails_a_read_as_unavailable(keys):
    store = RedisOnlineStore("redis://127.0.0.1:1/0", connect_timeout_s=0.5)
    try:
        with pytest.raises(Unavailable):
            store.read_rows(VIEW, FEATURES, keys)
        with pytest.raises(Unavailable):  # and again: no socket is left half-open
            store.read_rows(VIEW, FEATURES, keys)
        with pytest.raises(Unavailable):
            store.read_row(VIEW, FEATURES, keys[0])
    finally:
        store.close()
