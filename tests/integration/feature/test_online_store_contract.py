"""One contract, both online stores: the same tests run on SQLite and on Redis."""

from __future__ import annotations

import pytest

from modelplane.services.feature.online_store import OnlineStore

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
