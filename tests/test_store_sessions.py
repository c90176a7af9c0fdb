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


@pytest.mark.parametrize(("synchronous_commit", "expected"), [(False, "off"), (True, "on")])
def test_run_sets_synchronous_commit(database_url, synchronous_commit, expected):
    settings = RunSettings(relay="ws://127.0.0.1:9", labelers=[], synchronous_commit=synchronous_commit)
    store = build_indexers(database_url, settings)[0].store
    try:
        assert session_setting(store, "synchronous_commit") == expected
    finally:
        store.close()


def test_store_commits_synchronously_by_default(database_url):
    # Only the stream indexers turn it off: their cursor commits with the rows, so the stream can be read again.
    store = Store(database_url, ENDPOINT)
    try:
        assert session_setting(store, "synchronous_commit") == "on"
    finally:
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
