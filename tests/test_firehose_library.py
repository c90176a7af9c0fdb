"""The library API: async iterator and blocking callback over a local replay relay, no database."""

from __future__ import annotations

import asyncio
import gc
import threading
from contextlib import aclosing

import pytest

from fixture_data import JETSTREAM_CORPUS, fixture_path
from indexer.events import Commit
from indexer.firehose import Firehose, subscribe_repos
from indexer.replay import ReplayRelay, load_length_prefixed

pytestmark = pytest.mark.timeout(60)


def jetstream_frames():
    return load_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))


async def test_async_iterator_yields_typed_events():
    frames = jetstream_frames()
    async with ReplayRelay(frames) as relay:
        seen = []
        async with aclosing(subscribe_repos(relay.base_url, receive_timeout=5)) as events:
            async for event in events:
                seen.append(event)
                if len(seen) == len(frames):
                    break
    assert [event.seq for event in seen] == [seq for seq, _ in frames]
    assert sum(isinstance(event, Commit) for event in seen) == 110


async def test_async_iterator_resumes_after_cursor():
    frames = jetstream_frames()
    start = frames[49][0]
    async with ReplayRelay(frames) as relay:
        async with aclosing(subscribe_repos(relay.base_url, cursor=start, receive_timeout=5)) as events:
            async for event in events:
                first = event
                break
    assert first.seq == frames[50][0]


# Regression: stop() from on_event left the websocket's HTTP response to the garbage collector,
# which reported "Event loop is closed" once start() had returned.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
async def test_callback_form_stops_and_keeps_cursor():
    frames = jetstream_frames()
    async with ReplayRelay(frames) as relay:
        firehose = Firehose(relay.base_url, receive_timeout=5)
        received = []

        def on_event(event):
            received.append(event.seq)
            if len(received) == 10:
                firehose.stop()

        thread = threading.Thread(target=firehose.start, args=(on_event,))
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.05)
        gc.collect()  # an unreleased response would report its error now, inside this test

    assert received == [seq for seq, _ in frames[:10]]
    assert firehose.cursor == frames[9][0]
