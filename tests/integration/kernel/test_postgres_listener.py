"""The LISTEN feed replicas use to hear each other: delivery, a gap after a lost
connection, and a failing callback that does not end the feed. The machine's PostgreSQL."""

from __future__ import annotations

import queue
import uuid

import psycopg

from modelplane.kernel.postgres import PostgresChangeListener, channel_name
from tests.postgres import POSTGRES_URL

WAIT = 20.0


def notify(channel: str, payload: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def test_changes_are_heard_and_a_lost_connection_reports_a_gap() -> None:
    channel = channel_name("modelplane_test_", uuid.uuid4().hex)
    heard: queue.Queue[object] = queue.Queue()

    def on_change(change: dict[str, object]) -> None:
        if change.get("fail"):
            raise RuntimeError("a callback that fails")
        heard.put(change)

    listener = PostgresChangeListener(
        POSTGRES_URL, channel, on_change, lambda: heard.put("gap"), "test", retry_s=0.05
    )
    listener.start()
    try:
        notify(channel, '{"n": 1}')
        assert heard.get(timeout=WAIT) == {"n": 1}

        notify(channel, '{"fail": true}')  # logged; the feed goes on
        notify(channel, '{"n": 2}')
        assert heard.get(timeout=WAIT) == {"n": 2}

        # The server drops the listening connection: the listener reconnects, then
        # reports the gap, because whatever was committed meanwhile went unheard.
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            ended = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                (f'LISTEN "{channel}"',),
            ).fetchall()
        assert ended == [(True,)]
        assert heard.get(timeout=WAIT) == "gap"
        notify(channel, '{"n": 3}')
        assert heard.get(timeout=WAIT) == {"n": 3}
    finally:
        listener.stop()
    assert heard.empty()
