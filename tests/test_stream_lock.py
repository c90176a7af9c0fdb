"""One writer per stream cursor: a second indexer on the same endpoint and job is refused."""

from __future__ import annotations

import pytest

from indexer import store as store_module
from indexer.store import Store, StreamLocked

ENDPOINT = "ws://relay.test/xrpc/com.atproto.sync.subscribeRepos"


@pytest.fixture
def short_lock_wait(monkeypatch):
    monkeypatch.setattr(store_module, "LOCK_WAIT_SECONDS", 0.3)


def test_second_writer_on_cursor_refused(database_url, short_lock_wait):
    first = Store(database_url, ENDPOINT, exclusive=True)
    second = Store(database_url, ENDPOINT, exclusive=True)
    try:
        first.connect()
        with pytest.raises(StreamLocked, match="already indexing"):
            second.connect()
    finally:
        first.close()
        second.close()


def test_lock_released_when_writer_closes(database_url, short_lock_wait):
    first = Store(database_url, ENDPOINT, exclusive=True)
    first.connect()
    first.close()

    second = Store(database_url, ENDPOINT, exclusive=True)
    try:
        second.connect()
        assert second.read_cursor() is None
    finally:
        second.close()


def test_other_job_not_blocked(database_url, short_lock_wait):
    live = Store(database_url, ENDPOINT, exclusive=True)
    backfill = Store(database_url, ENDPOINT, job="backfill", exclusive=True)
    try:
        live.connect()
        backfill.connect()
        assert backfill.read_cursor() is None
    finally:
        live.close()
        backfill.close()
