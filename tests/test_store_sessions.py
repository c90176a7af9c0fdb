"""The PostgreSQL sessions a Store opens: their settings, and the locks that keep one writer per cursor."""

from __future__ import annotations

import pytest

from indexer import store as store_module
from indexer.runner import RunSettings, build_indexers
from indexer.store import Batch, LockLost, Store, StoreError, StreamLocked

ENDPOINT = "ws://relay.test/xrpc/com.atproto.sync.subscribeRepos"


def session_setting(store: Store, name: str) -> str:
    row = store.connect().execute(f"SHOW {name}").fetchone()
    store.connection.rollback()
    return row[0]


def test_stream_commits_wait_for_disk(database_url):
    # Regression: with synchronous_commit off, a PostgreSQL crash while the indexer kept running lost
    # the last commits for good, because the indexer went on from its cursor in memory.
    settings = RunSettings(relay="ws://127.0.0.1:9", labelers=["ws://127.0.0.1:10"])
    stores = [indexer.store for indexer in build_indexers(database_url, settings)]
    try:
        assert [session_setting(store, "synchronous_commit") for store in stores] == ["on", "on"]
    finally:
        for store in stores:
            store.close()


def cursor_batch(seq: int) -> Batch:
    batch = Batch(endpoint=ENDPOINT)
    batch.cursor = seq
    return batch


def test_lane_one_stops_after_lock_lost(database_url, monkeypatch):
    # Review finding: with a lock per lane, a lane that reconnected could commit beside a second
    # process. Lane 1 now commits only while lane 0's session holds the one cursor lock.
    monkeypatch.setattr(store_module, "LOCK_WAIT_SECONDS", 0.3)
    first = Store(database_url, ENDPOINT, exclusive=True)
    second = Store(database_url, ENDPOINT, exclusive=True)
    try:
        first.write(cursor_batch(1), lane=1)
        first._drop_connection(0)  # its session ends, and the lock with it
        second.connect()

        with pytest.raises(LockLost):
            first.write(cursor_batch(2), lane=1)
        with pytest.raises(StreamLocked):
            first.write(cursor_batch(2), lane=1)  # the retry tries to take the lock back
        assert second.read_cursor() == 1
    finally:
        first.close()
        second.close()


def test_lanes_named_in_pg_stat_activity(database_url):
    store = Store(database_url, ENDPOINT, job="backfill")
    try:
        assert session_setting(store, "application_name") == "indexer backfill lane 0"
    finally:
        store.close()


def test_spurious_lock_lost_keeps_lane_zero(database_url):
    # Review finding: a LockLost seen while lane 0 was reconnecting on another thread made the retry
    # reconnect lane 0 again. The retry now queries lane 0's session first.
    store = Store(database_url, ENDPOINT, exclusive=True)
    try:
        store.connect()
        lane_zero = store.connection
        store.lock_lost = True
        store.write(cursor_batch(1), lane=1)
        assert store.connection is lane_zero
        assert store.read_cursor() == 1
    finally:
        store.close()


def test_closed_store_connects_no_more(database_url):
    # Review finding: a thread still staging after close() reopened both lanes and took the lock again.
    store = Store(database_url, ENDPOINT, exclusive=True)
    store.connect()
    store.close()
    with pytest.raises(StoreError, match="the store is closed"):
        store.write(cursor_batch(1), lane=1)
    assert store.lanes == [None, None]
