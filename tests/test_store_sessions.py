"""The PostgreSQL sessions a Store opens: their settings, and the locks that keep one writer per cursor."""

from __future__ import annotations

import pytest

from indexer import store as store_module
from indexer.runner import RunSettings, build_indexers
from indexer.store import Store, StreamLocked

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


def test_second_writer_refused_while_lane_alive(database_url, monkeypatch):
    monkeypatch.setattr(store_module, "LOCK_WAIT_SECONDS", 0.3)
    first = Store(database_url, ENDPOINT, exclusive=True)
    second = Store(database_url, ENDPOINT, exclusive=True)
    try:
        first.connect()
        first._drop_connection(0)  # lane 1 still writes for the first store
        with pytest.raises(StreamLocked, match="already indexing"):
            second.connect()
        assert second.lanes == [None, None]
        first.connect()  # the second store released the lane 0 lock it had taken
    finally:
        first.close()
        second.close()


def test_lanes_named_in_pg_stat_activity(database_url):
    store = Store(database_url, ENDPOINT, job="backfill")
    try:
        assert session_setting(store, "application_name") == "indexer backfill lane 0"
    finally:
        store.close()
