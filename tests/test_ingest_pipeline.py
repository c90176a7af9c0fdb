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
    """Replaces ``store.finish``, the commit of a batch: records each batch's cursor, can hold the first commit or fail one."""

    def __init__(self, store, fail_call: int | None = None) -> None:
        self.finish = store.finish
        self.fail_call = fail_call
        self.cursors: list[int | None] = []
        self.first_entered = threading.Event()
        self.release_first = threading.Event()
        store.finish = self

    def __call__(self, batch, lane, staged):
        self.cursors.append(batch.cursor)
        if len(self.cursors) == 1:
            self.first_entered.set()
            self.release_first.wait(timeout=30)
        if len(self.cursors) == self.fail_call:
            raise StoreError(f"refused by the test at cursor {batch.cursor}")
        return self.finish(batch, lane, staged)


async def _wait_for(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_next_batch_fills_while_one_commits(database_url, corpus_frames):
    async with ReplayRelay(corpus_frames) as relay:
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE, batch_interval=NO_INTERVAL_FLUSH,
                                stop_at_seq=corpus_frames[-1][0])
        writes = WrappedWrite(indexer.store)
        stage = indexer.store.stage
        staged_lanes = []

        def recording_stage(batch, lane):
            staged_lanes.append((batch.cursor, lane))
            return stage(batch, lane)

        indexer.store.stage = recording_stage
        task = asyncio.create_task(indexer.run())

        await _wait_for(writes.first_entered.is_set)
        await _wait_for(lambda: indexer.counters.received >= 3 * BATCH_SIZE)
        await asyncio.sleep(0.2)  # a third batch that did not wait would be staged by now
        received_while_held = indexer.counters.received
        committed_while_held = indexer.committed
        staged_while_held = list(staged_lanes)
        writes.release_first.set()
        await task
        indexer.store.close()

    assert committed_while_held is None
    # The second batch is staged on the other lane while the first commits, and a third full one
    # waits for that commit.
    assert [cursor for cursor, _lane in staged_while_held] == [corpus_frames[BATCH_SIZE - 1][0],
                                                                corpus_frames[2 * BATCH_SIZE - 1][0]]
    assert staged_while_held[0][1] != staged_while_held[1][1]
    assert received_while_held == 3 * BATCH_SIZE
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
        finish = indexer.store.finish
        cursors = []

        def fail_first(batch, lane, staged):
            cursors.append(batch.cursor)
            if len(cursors) == 1:
                raise DatabaseUnavailable("the test's database is down")
            return finish(batch, lane, staged)

        indexer.store.finish = fail_first
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


async def test_staged_batch_rewritten_after_outage(database_url, corpus_frames):
    # The database went away between staging and commit: the retry writes the batch whole.
    async with ReplayRelay(corpus_frames) as relay:
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE, batch_interval=NO_INTERVAL_FLUSH,
                                stop_at_seq=corpus_frames[-1][0])
        finish = indexer.store.finish
        calls = []

        def fail_first(batch, lane, staged):
            calls.append((batch.cursor, staged))
            if len(calls) == 1:
                raise DatabaseUnavailable("the test's database is down")
            return finish(batch, lane, staged)

        indexer.store.finish = fail_first
        await asyncio.wait_for(indexer.run(), timeout=30)
        events = indexer.store.connect().execute("SELECT events FROM cursors").fetchall()
        indexer.store.close()

    first_cursor = corpus_frames[BATCH_SIZE - 1][0]
    assert calls[:2] == [(first_cursor, True), (first_cursor, False)]
    assert indexer.committed == corpus_frames[-1][0]
    assert events == [(len(corpus_frames),)]
