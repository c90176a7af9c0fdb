"""Interrupting the indexer anywhere and restarting it gives the same database as one run.

The 112 real frames of the Jetstream corpus are indexed once without interruption, which gives
the baseline snapshot. Then they are indexed again with a stop after event k. The relay stalls
after k frames, and the indexer is stopped either gracefully (committing its open batch) or by
abandoning the open batch, as a crash would. A new indexer then resumes from the stored cursor
against the same relay. Batches of 5 events put most stop points mid-batch.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from db_snapshot import differences, snapshot
from indexer.ingest import REPOS_METHOD
from indexer.replay import Faults, ReplayRelay
from indexer.stream import endpoint_url
from ingest_harness import build_indexer, index_frames, migrated_database, run_until, run_until_stopped

pytestmark = pytest.mark.timeout(60)

BATCH_SIZE = 5
NO_INTERVAL_FLUSH = 30.0  # seconds; longer than any test, so only full batches and stops commit
STOP_POINTS = [1, 4, 5, 6, 37, 111]
RELAY = "replay-relay"  # what snapshots call the relay's endpoint, whatever its port


def relay_snapshot(url: str, relay: ReplayRelay) -> dict:
    return snapshot(url, endpoints={endpoint_url(relay.base_url, REPOS_METHOD): RELAY})



@pytest.fixture(scope="module")
def baseline(postgres_server_url, template_database, corpus_frames) -> dict:
    """Snapshot of one uninterrupted run over the corpus."""
    async def index(url: str) -> dict:
        async with ReplayRelay(corpus_frames) as relay:
            await index_frames(url, relay, corpus_frames[-1][0], batch_size=BATCH_SIZE)
            return relay_snapshot(url, relay)

    with migrated_database(postgres_server_url, template_database) as url:
        yield asyncio.run(index(url))


def assert_same_snapshot(expected: dict, url: str, relay: ReplayRelay) -> None:
    actual = relay_snapshot(url, relay)
    assert actual == expected, differences(expected, actual)


async def stop_after(url: str, relay: ReplayRelay, count: int, *, abandon: bool):
    """Index until ``count`` frames were received (the relay stalls there), then stop the indexer."""
    relay.faults = Faults(stall_after=count, connections=1)
    indexer = build_indexer(url, relay, batch_size=BATCH_SIZE, batch_interval=NO_INTERVAL_FLUSH,
                            receive_timeout=30.0)

    def stalled(running) -> bool:
        if running.counters.received < count:
            return False
        if running.commits:
            return False  # let the full batches commit: what is abandoned here is the open batch
        running.abandon = abandon  # abandoning is what a second signal or a crash does
        return True

    return await run_until(indexer, stalled)


async def resume(url: str, relay: ReplayRelay, frames: list[tuple[int, bytes]]):
    return await index_frames(url, relay, frames[-1][0], batch_size=BATCH_SIZE)


@pytest.mark.parametrize("count", STOP_POINTS)
async def test_graceful_stop_then_resume(database_url, corpus_frames, baseline, count):
    async with ReplayRelay(corpus_frames) as relay:
        first = await stop_after(database_url, relay, count, abandon=False)
        assert first.committed == corpus_frames[count - 1][0]

        await resume(database_url, relay, corpus_frames)

        assert_same_snapshot(baseline, database_url, relay)


@pytest.mark.parametrize("count", STOP_POINTS)
async def test_abandoned_batch_then_resume(database_url, corpus_frames, baseline, count):
    async with ReplayRelay(corpus_frames) as relay:
        first = await stop_after(database_url, relay, count, abandon=True)
        committed_events = count - count % BATCH_SIZE
        expected_cursor = corpus_frames[committed_events - 1][0] if committed_events else None
        assert first.committed == expected_cursor

        await resume(database_url, relay, corpus_frames)

        assert_same_snapshot(baseline, database_url, relay)


async def test_stop_at_seq_then_resume(database_url, corpus_frames, baseline):
    async with ReplayRelay(corpus_frames) as relay:
        first = build_indexer(database_url, relay, batch_size=BATCH_SIZE, stop_at_seq=corpus_frames[36][0])
        await run_until_stopped(first)

        assert first.reached_stop_seq
        assert first.committed == corpus_frames[36][0]
        await resume(database_url, relay, corpus_frames)
        assert_same_snapshot(baseline, database_url, relay)


async def test_resume_asks_for_stored_cursor(database_url, corpus_frames):
    async with ReplayRelay(corpus_frames) as relay:
        await stop_after(database_url, relay, 37, abandon=False)
        await resume(database_url, relay, corpus_frames)

    assert [record.cursor for record in relay.connections] == [None, corpus_frames[36][0]]


async def test_reconnect_asks_for_committed_cursor(database_url, corpus_frames, baseline):
    async with ReplayRelay(corpus_frames) as relay:
        relay.faults = Faults(close_after=23, connections=1)
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE)
        await run_until(indexer, lambda running: running.committed == corpus_frames[-1][0])

        assert [record.cursor for record in relay.connections] == [None, corpus_frames[22][0]]
        assert indexer.counters.replayed == 1  # the relay resends the frame at the cursor itself
        assert_same_snapshot(baseline, database_url, relay)


async def test_same_frames_twice_change_nothing(database_url, corpus_frames, baseline):
    async with ReplayRelay(corpus_frames + corpus_frames) as relay:
        indexer = build_indexer(database_url, relay, batch_size=BATCH_SIZE)
        await run_until(indexer, lambda running: running.counters.received == 2 * len(corpus_frames))

        assert indexer.counters.replayed == len(corpus_frames)
        assert_same_snapshot(baseline, database_url, relay)


async def test_rewriting_every_batch_changes_nothing(database_url, corpus_frames, baseline):
    async with ReplayRelay(corpus_frames) as relay:
        await resume(database_url, relay, corpus_frames)
        # Forgetting the cursor makes the next run write every batch a second time.
        with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
            connection.execute("DELETE FROM cursors")

        second = await resume(database_url, relay, corpus_frames)

        assert [record.cursor for record in relay.connections] == [None, None]
        assert second.counters.replayed == 0
        assert_same_snapshot(baseline, database_url, relay)
