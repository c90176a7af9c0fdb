"""The writer pipeline: a full batch commits in the background while the next one fills, in order.

The stream is the 112 real frames of the Jetstream corpus, in batches of 5. ``Store.write`` is
wrapped so a test can hold a commit or make it fail, and see what the receiving side does meanwhile.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from indexer.errors import DatabaseUnavailable
from indexer.replay import ReplayRelay
from indexer.store import StoreError
from ingest_harness import build_indexer

pytestmark = pytest.mark.timeout(60)

BATCH_SIZE = 5
NO_INTERVAL_FLUSH = 30.0  # seconds; longer than any test, so only full batches and stops commit



class WrappedWrite:
    """Replaces ``store.write``: records each batch's cursor, can hold the first write or fail one."""

    def __init__(self, store, fail_call: int | None = None) -> None:
        self.write = store.write
        self.fail_call = fail_call
        self.cursors: list[int | None] = []
        self.first_entered = threading.Event()
        self.release_first = threading.Event()
        store.write = self

    def __call__(self, batch):
        self.cursors.append(batch.cursor)
        if len(self.cursors) == 1:
            self.first_entered.set()
            self.release_first.wait(timeout=30)
        if len(self.cursors) == self.fail_call:
            raise StoreError(f"refused by the test at cursor {batch.cursor}")
        return self.write(batch)


async def _wait_for(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_next_batch_fills_while_one_commits(database_url, corpus_frames):
    async with ReplayRelay(corpus_frames) as relay:
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE, batch_interval=NO_INTERVAL_FLUSH,
                                stop_at_seq=corpus_frames[-1][0])
        writes = WrappedWrite(indexer.store)
        task = asyncio.create_task(indexer.run())

        await _wait_for(writes.first_entered.is_set)
        await _wait_for(lambda: indexer.counters.received >= 2 * BATCH_SIZE)
        received_while_held = indexer.counters.received
        committed_while_held = indexer.committed
        writes.release_first.set()
        await task
        indexer.store.close()

    assert committed_while_held is None
    assert received_while_held == 2 * BATCH_SIZE  # a third full batch waits for the first commit
    assert indexer.committed == corpus_frames[-1][0]
    assert writes.cursors == sorted(writes.cursors)


async def test_failed_commit_stops_later_batches(database_url, corpus_frames):
    async with ReplayRelay(corpus_frames) as relay:
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE, batch_interval=NO_INTERVAL_FLUSH)
        writes = WrappedWrite(indexer.store, fail_call=1)
        task = asyncio.create_task(indexer.run())
        await _wait_for(lambda: indexer.counters.received >= 2 * BATCH_SIZE)
        writes.release_first.set()
        with pytest.raises(StoreError, match="refused by the test"):
            async with asyncio.timeout(20):
                await task
        cursor = indexer.store.read_cursor()
        indexer.store.close()

    assert writes.cursors == [corpus_frames[BATCH_SIZE - 1][0]]  # the second batch never reached the store
    assert cursor is None
    assert indexer.committed is None


class SlowRetry:
    """A database backoff that keeps a failed commit waiting long enough for the test to act."""

    def next_delay(self) -> float:
        return 5.0

    def reset(self) -> None:
        pass


async def test_abandoned_commit_blocks_queued_commits(database_url, corpus_frames):
    # Regression (review of the background commit): a second signal cancelled the commit in flight,
    # and the interval flush queued behind it then committed a cursor past the cancelled batch.
    async with ReplayRelay(corpus_frames) as relay:
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE, batch_interval=0.1)
        indexer.db_backoff = SlowRetry()
        write = indexer.store.write
        cursors = []

        def fail_first(batch):
            cursors.append(batch.cursor)
            if len(cursors) == 1:
                raise DatabaseUnavailable("the test's database is down")
            return write(batch)

        indexer.store.write = fail_first
        task = asyncio.create_task(indexer.run())
        await _wait_for(lambda: cursors and indexer.counters.received >= 2 * BATCH_SIZE and len(indexer.commits) >= 2)
        indexer.abandon = True  # what a second signal does before cancelling the main task
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # a queued commit that was not cancelled would run now
        stored = indexer.store.read_cursor()
        indexer.store.close()

    assert cursors == [corpus_frames[BATCH_SIZE - 1][0]]
    assert stored is None
