"""The PostgreSQL sessions a Store opens: their settings, and the locks that keep one writer per cursor."""

from __future__ import annotations

import pytest

from indexer.runner import RunSettings, build_indexers
from indexer.store import Store

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
