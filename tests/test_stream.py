"""The stream client against the real replay relay on 127.0.0.1: cursors, reconnects and faults.

Each consumer here "commits" by storing the seq of the last frame it decoded, and the client's
cursor callable returns that value, as the indexer's store does with its committed cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import libipld
import pytest
from aiohttp import web

from indexer.errors import ConfigError, FutureCursorError, StreamError
from indexer.replay import LABELS_METHOD, REPOS_METHOD, Faults, ReplayRelay
from indexer.stream import Backoff, OversizedMessage, StreamClient, endpoint_url

pytestmark = pytest.mark.timeout(30)

FAST_BACKOFF = {"base": 0.01, "cap": 0.05}


def identity_frame(seq: int, padding: int = 0) -> bytes:
    """A small ``#identity`` frame built by the test; ``padding`` adds that many bytes to its body."""
    header = libipld.encode_dag_cbor({"op": 1, "t": "#identity"})
    body = {"seq": seq, "did": "did:plc:streamtest", "time": "2026-01-01T00:00:00.000Z"}
    if padding:
        body["padding"] = b"\x00" * padding
    return header + libipld.encode_dag_cbor(body)


def small_frames(count: int) -> list[tuple[int, bytes]]:
    return [(seq, identity_frame(seq)) for seq in range(1, count + 1)]


def frame_seq(frame: bytes) -> int | None:
    """Return the frame's seq, or None for frames without one and for undecodable bytes."""
    try:
        _header, body = libipld.decode_dag_cbor_multi(frame)
    except ValueError:
        return None
    return body.get("seq")


class Consumer:
    """Records every item and commits the seq of each frame it can decode."""

    def __init__(self, committed: int | None = None) -> None:
        self.committed = committed
        self.items: list[bytes | OversizedMessage] = []

    def cursor(self) -> int | None:
        return self.committed

    def take(self, item: bytes | OversizedMessage) -> int | None:
        self.items.append(item)
        if isinstance(item, OversizedMessage):
            return None
        seq = frame_seq(item)
        if seq is not None:
            self.committed = seq
        return seq

    async def run_until(self, client: StreamClient, last_seq: int) -> None:
        async for item in client.frames():
            if self.take(item) == last_seq:
                return


def client_for(relay: ReplayRelay, consumer: Consumer, **options) -> StreamClient:
    options.setdefault("backoff", Backoff(**FAST_BACKOFF))
    options.setdefault("receive_timeout", 2.0)
    return StreamClient(relay.base_url, REPOS_METHOD, consumer.cursor, **options)



# Endpoint URLs


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("bsky.network", "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"),
        ("wss://bsky.network/", "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"),
        ("https://bsky.network", "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"),
        ("http://127.0.0.1:8765", "ws://127.0.0.1:8765/xrpc/com.atproto.sync.subscribeRepos"),
        ("ws://127.0.0.1:8765/xrpc", "ws://127.0.0.1:8765/xrpc/com.atproto.sync.subscribeRepos"),
        (
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos",
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos",
        ),
        ("wss://example.com/relay/", "wss://example.com/relay/xrpc/com.atproto.sync.subscribeRepos"),
        ("ws://[::1]:8765", "ws://[::1]:8765/xrpc/com.atproto.sync.subscribeRepos"),
    ],
)
def test_endpoint_url_accepted_forms(base, expected):
    assert endpoint_url(base, REPOS_METHOD) == expected


@pytest.mark.parametrize(
    ("base", "expected_text"),
    [
        ("", "stream URL is empty"),
        ("ftp://bsky.network", "scheme 'ftp' is not ws, wss, http or https"),
        ("wss://", "missing or invalid host"),
        ("bsky network", "missing or invalid host"),
        ("wss://bsky.network:99999", "invalid port"),
        ("wss://bsky.network?cursor=5", "remove the query string"),
        ("wss://bsky.network/xrpc/com.atproto.label.subscribeLabels", "names method"),
    ],
)
def test_endpoint_url_invalid_rejected(base, expected_text):
    with pytest.raises(ConfigError) as caught:
        endpoint_url(base, REPOS_METHOD)
    message = str(caught.value)
    assert expected_text in message
    if base:
        assert repr(base) in message


def test_endpoint_url_error_shows_example():
    with pytest.raises(ConfigError, match="expected e.g. wss://bsky.network"):
        endpoint_url("ftp://bsky.network", REPOS_METHOD)


# Backoff policy


def test_backoff_ceiling_doubles_to_cap():
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    ceilings = []
    for _attempt in range(9):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_delays_within_ceiling():
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(11))
    for _attempt in range(50):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling


def test_backoff_seeded_delays_reproducible():
    first = Backoff(rng=random.Random(3))
    second = Backoff(rng=random.Random(3))
    assert [first.next_delay() for _ in range(8)] == [second.next_delay() for _ in range(8)]


def test_backoff_mean_delay_grows():
    early = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(200)]
    late = []
    for seed in range(200):
        backoff = Backoff(rng=random.Random(seed), attempt=5)
        late.append(backoff.next_delay())
    assert sum(late) / len(late) > 4 * sum(early) / len(early)


def test_backoff_reset_returns_to_base():
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(1))
    for _attempt in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.ceiling() == 0.5


def test_backoff_invalid_settings_rejected():
    with pytest.raises(ConfigError, match="above 0"):
        Backoff(base=0)
    with pytest.raises(ConfigError, match="at least the base"):
        Backoff(base=2.0, cap=1.0)


# Cursor handling against the replay relay


async def test_cursor_honoured_on_connect(start_relay, corpus_frames):
    relay = await start_relay(corpus_frames)
    start = corpus_frames[100][0]
    consumer = Consumer(committed=start)
    async with client_for(relay, consumer) as client:
        await consumer.run_until(client, corpus_frames[-1][0])
    assert relay.connections[0].cursor == start
    assert consumer.items == [frame for _seq, frame in corpus_frames[100:]]


async def test_async_cursor_callable_awaited(start_relay, corpus_frames):
    relay = await start_relay(corpus_frames)
    start = corpus_frames[-2][0]

    async def committed_cursor() -> int:
        return start

    consumer = Consumer()
    async with StreamClient(relay.base_url, REPOS_METHOD, committed_cursor, backoff=Backoff(**FAST_BACKOFF)) as client:
        await consumer.run_until(client, corpus_frames[-1][0])
    assert relay.connections[0].cursor == start
    assert len(consumer.items) == 2


async def test_outdated_cursor_info_then_frames(start_relay, corpus_frames):
    relay = await start_relay(corpus_frames)
    consumer = Consumer(committed=corpus_frames[0][0] - 500)
    async with client_for(relay, consumer) as client:
        await consumer.run_until(client, corpus_frames[-1][0])
    header, body = libipld.decode_dag_cbor_multi(consumer.items[0])
    assert header == {"op": 1, "t": "#info"}
    assert body["name"] == "OutdatedCursor"
    assert consumer.items[1:] == [frame for _seq, frame in corpus_frames]


async def test_future_cursor_error_propagates(start_relay, corpus_frames):
    relay = await start_relay(corpus_frames)
    consumer = Consumer(committed=corpus_frames[-1][0] + 10)
    client = client_for(relay, consumer)
    with pytest.raises(FutureCursorError):
        async with client:
            async for item in client.frames():
                header, body = libipld.decode_dag_cbor_multi(item)
                if header.get("op") == -1 and body.get("error") == "FutureCursor":
                    raise FutureCursorError(body["message"])
    assert not client.connected
    assert client.counters.connects == 1
    assert relay.connections[0].outcome == "future_cursor"


async def test_labels_method_url_used(start_relay):
    relay = await start_relay(small_frames(2))
    consumer = Consumer()
    async with StreamClient(relay.base_url, LABELS_METHOD, consumer.cursor, backoff=Backoff(**FAST_BACKOFF)) as client:
        await consumer.run_until(client, 2)
    assert relay.connections[0].path == f"/xrpc/{LABELS_METHOD}"


# Reconnecting


async def test_server_close_resumes_from_committed_cursor(start_relay):
    relay = await start_relay(small_frames(10))
    relay.faults.close_after = 4
    consumer = Consumer()
    async with client_for(relay, consumer) as client:
        await consumer.run_until(client, 10)
    # The relay sends seq >= cursor, so each reconnect repeats the committed frame first.
    assert [record.cursor for record in relay.connections] == [None, 4, 7]
    assert sorted({frame_seq(item) for item in consumer.items}) == list(range(1, 11))
    assert client.counters.server_closes == 2
    assert client.counters.reconnects == 2


async def test_silent_socket_triggers_reconnect(start_relay):
    relay = await start_relay(small_frames(5))
    relay.faults = Faults(stall_after=2, connections=1)
    consumer = Consumer()
    async with client_for(relay, consumer, receive_timeout=0.3) as client:
        await consumer.run_until(client, 5)
    assert client.counters.timeouts == 1
    assert [record.cursor for record in relay.connections] == [None, 2]
    assert relay.connections[0].outcome == "stall"


async def test_slow_consumer_not_silence(start_relay):
    # Review finding: a consumer busy for longer than the receive timeout (a slow commit) made the
    # silence timer close a connection whose server kept sending.
    relay = await start_relay(small_frames(3))
    consumer = Consumer()
    async with client_for(relay, consumer, receive_timeout=0.3) as client:
        async for item in client.frames():
            if consumer.take(item) == 1:
                await asyncio.sleep(1.0)
            if consumer.committed == 3:
                break
    assert client.counters.timeouts == 0
    assert client.counters.connects == 1


async def test_handshake_503_retried_until_success(start_relay):
    relay = await start_relay(small_frames(3))
    relay.faults.reject_handshakes = 5
    consumer = Consumer()
    async with client_for(relay, consumer) as client:
        await consumer.run_until(client, 3)
    assert client.counters.handshake_failures == 5
    assert client.counters.connects == 1
    assert [record.status for record in relay.connections] == [503] * 5 + [101]


async def test_handshake_404_raises_stream_error(start_relay):
    relay = await start_relay(small_frames(1))
    consumer = Consumer()
    client = StreamClient(relay.base_url + "/wrong", REPOS_METHOD, consumer.cursor, backoff=Backoff(**FAST_BACKOFF))
    with pytest.raises(StreamError, match="HTTP 404"):
        async with client:
            await consumer.run_until(client, 1)
    assert client.counters.handshake_failures == 1


async def test_connection_refused_retried(start_relay):
    relay = await start_relay(small_frames(2))
    port = relay.port
    await relay.stop()
    consumer = Consumer()
    client = StreamClient(f"ws://127.0.0.1:{port}", REPOS_METHOD, consumer.cursor, backoff=Backoff(**FAST_BACKOFF))

    async def restart_relay_later() -> None:
        while client.counters.connect_errors < 2:
            await asyncio.sleep(0.01)
        await start_relay(small_frames(2), port=port)

    restarter = asyncio.create_task(restart_relay_later())
    async with client:
        await consumer.run_until(client, 2)
    await restarter
    assert client.counters.connect_errors >= 2
    assert client.counters.connects == 1


async def test_truncated_frame_then_close(start_relay):
    frames = small_frames(3)
    relay = await start_relay(frames)
    relay.faults = Faults(truncate_after=1, connections=1)
    consumer = Consumer()
    async with client_for(relay, consumer) as client:
        await consumer.run_until(client, 3)
    truncated = consumer.items[1]
    assert consumer.items[0] == frames[0][1]
    assert truncated == frames[1][1][: len(frames[1][1]) // 2]
    with pytest.raises(ValueError):
        libipld.decode_dag_cbor_multi(truncated)
    assert [record.cursor for record in relay.connections] == [None, 1]
    assert client.counters.server_closes == 1


async def test_consumer_too_slow_then_reconnect(start_relay):
    relay = await start_relay(small_frames(4))
    relay.faults = Faults(error_after=2, connections=1)
    consumer = Consumer()
    async with client_for(relay, consumer) as client:
        await consumer.run_until(client, 4)
    header, body = libipld.decode_dag_cbor_multi(consumer.items[2])
    assert header == {"op": -1}
    assert body["error"] == "ConsumerTooSlow"
    assert [record.cursor for record in relay.connections] == [None, 2]
    assert client.counters.server_closes == 1


async def test_oversized_message_surfaced_then_resumed(start_relay):
    frames = small_frames(4)
    frames[1] = (2, identity_frame(2, padding=4096))
    relay = await start_relay(frames)
    consumer = Consumer()
    async with client_for(relay, consumer, max_message_size=1024) as client:
        async for item in client.frames():
            seq = consumer.take(item)
            if isinstance(item, OversizedMessage):
                # The test built seq 2 as the oversized frame, so it dead-letters it by committing past it.
                consumer.committed = 3
            if seq == 4:
                break
    marker = consumer.items[1]
    assert isinstance(marker, OversizedMessage)
    assert marker.size is not None and marker.size > 4096
    assert marker.limit == 1024
    assert marker.cursor is None
    assert marker.position == 1
    assert marker.repeats == 1
    assert [frame_seq(item) for item in consumer.items[2:]] == [3, 4]
    assert client.counters.oversized == 1
    assert [record.cursor for record in relay.connections] == [None, 3]


async def markers_until(relay: ReplayRelay, last_seq: int) -> list[OversizedMessage]:
    """Receive with a 1 KiB limit until ``last_seq``, committing past each message read whole; return the markers."""
    consumer = Consumer()
    async with client_for(relay, consumer, max_message_size=1024) as client:
        async for item in client.frames():
            consumer.take(item)
            if isinstance(item, OversizedMessage) and item.frame is not None:
                consumer.committed = frame_seq(item.frame)  # as the indexer does: dead-lettered with its seq
            if not isinstance(item, OversizedMessage) and frame_seq(item) == last_seq:
                break
    return [item for item in consumer.items if isinstance(item, OversizedMessage)]


async def test_resent_oversized_message_read_whole(start_relay):
    frames = [(1, identity_frame(1)), (2, identity_frame(2, padding=4096)), (3, identity_frame(3))]
    relay = await start_relay(frames)
    markers = await markers_until(relay, 3)
    assert [marker.frame is not None for marker in markers] == [False, True]
    assert frame_seq(markers[-1].frame) == 2
    assert markers[-1].size == len(markers[-1].frame)
    assert markers[-1].limit == 1024
    assert [record.cursor for record in relay.connections] == [None, 1]


# From the live tip with nothing committed, the replay relay sends the same first message again;
# the stream once retried it forever there.
async def test_live_tip_oversized_message_read_whole(start_relay):
    frames = [(1, identity_frame(1, padding=4096)), (2, identity_frame(2))]
    relay = await start_relay(frames)
    markers = await markers_until(relay, 2)
    assert [(marker.cursor, marker.frame is not None) for marker in markers] == [(None, False), (None, True)]
    assert markers[0].sent_again() is False


async def test_limit_restored_after_whole_read(start_relay):
    frames = [(1, identity_frame(1)), (2, identity_frame(2, padding=4096)), (3, identity_frame(3))]
    relay = await start_relay(frames)
    consumer = Consumer()
    client = client_for(relay, consumer, max_message_size=1024)
    async with client:
        async for item in client.frames():
            consumer.take(item)
            if isinstance(item, OversizedMessage) and item.frame is not None:
                break

    assert client._read_limit() == 1024


async def test_backoff_resets_after_delivering_connection(start_relay):
    relay = await start_relay(small_frames(3))
    relay.faults.reject_handshakes = 3
    relay.faults.close_after = 2
    consumer = Consumer()
    attempts_seen = []
    async with client_for(relay, consumer) as client:
        async for item in client.frames():
            attempts_seen.append(client.backoff.attempt)
            if consumer.take(item) == 3:
                break
    # Three rejected handshakes raised the attempt count while the first connection delivered
    # seq 1 and 2. It then reset, so the single delay before the second connection counts as 1.
    assert attempts_seen[:2] == [3, 3]
    assert attempts_seen[2:] == [1, 1]


# Messages and lifecycle


@contextlib.asynccontextmanager
async def one_handler_server(handler):
    """Serve ``handler`` at the subscribeRepos path on 127.0.0.1 and yield the base URL."""
    app = web.Application()
    app.router.add_get(f"/xrpc/{REPOS_METHOD}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_text_messages_ignored_and_counted():
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("not a frame")
        await ws.send_bytes(identity_frame(1))
        await ws.receive()
        return ws

    async with one_handler_server(handler) as url:
        consumer = Consumer()
        async with StreamClient(url, REPOS_METHOD, consumer.cursor) as client:
            await consumer.run_until(client, 1)
    assert consumer.items == [identity_frame(1)]
    assert client.counters.text_messages == 1


async def test_pings_count_as_traffic():
    pongs: list[object] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        # No frame for 1 s, more than the client's receive timeout, but a ping every 0.1 s.
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_bytes(identity_frame(1))
        for number in range(10):
            await ws.ping(b"ping %d" % number)
            pongs.append((await ws.receive(timeout=2.0)).data)
            await asyncio.sleep(0.1)
        await ws.send_bytes(identity_frame(2))
        await ws.receive()
        return ws

    async with one_handler_server(handler) as url:
        consumer = Consumer()
        async with StreamClient(url, REPOS_METHOD, consumer.cursor, receive_timeout=0.4) as client:
            await consumer.run_until(client, 2)
    assert client.counters.timeouts == 0
    assert client.counters.connects == 1
    assert pongs == [b"ping %d" % number for number in range(10)]


async def test_aclose_from_other_task_ends_iteration(start_relay):
    relay = await start_relay(small_frames(2))
    consumer = Consumer()
    client = client_for(relay, consumer)

    async def consume() -> None:
        async for item in client.frames():
            consumer.take(item)

    task = asyncio.create_task(consume())
    while len(consumer.items) < 2:
        await asyncio.sleep(0.01)
    await client.aclose()
    await asyncio.wait_for(task, timeout=2.0)
    assert task.exception() is None
    assert not client.connected


async def test_cancelled_consumer_closes_connection(start_relay):
    relay = await start_relay(small_frames(2))
    consumer = Consumer()
    client = client_for(relay, consumer)

    async def consume() -> None:
        async with client:
            async for item in client.frames():
                consumer.take(item)

    task = asyncio.create_task(consume())
    while len(consumer.items) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not client.connected
    for _attempt in range(100):
        if relay.connections[0].outcome:
            break
        await asyncio.sleep(0.01)
    assert relay.connections[0].outcome == "client_gone"


async def test_logs_state_changes_not_frames(start_relay, corpus_frames, caplog):
    relay = await start_relay(corpus_frames)
    relay.faults = Faults(close_after=60, connections=1)
    consumer = Consumer()
    with caplog.at_level(logging.INFO, logger="indexer.stream"):
        async with client_for(relay, consumer) as client:
            await consumer.run_until(client, corpus_frames[-1][0])
    records = [record for record in caplog.records if record.name == "indexer.stream"]
    messages = [record.getMessage() for record in records]
    assert messages[0] == "connected"
    assert messages[1] == "disconnected: closed by server"
    assert messages[2].startswith("reconnecting in ")
    assert messages[3] == "connected"
    assert messages[4] == "stream closed"
    assert len(records) == 5
    for record in records:
        assert record.stream == client.url
        assert hasattr(record, "cursor")
        assert hasattr(record, "error")
        assert hasattr(record, "delay")
    assert records[3].cursor == corpus_frames[59][0]
    assert records[2].delay is not None


async def test_timeout_logged_as_warning(start_relay, caplog):
    relay = await start_relay(small_frames(2))
    relay.faults = Faults(stall_after=1, connections=1)
    consumer = Consumer()
    with caplog.at_level(logging.INFO, logger="indexer.stream"):
        async with client_for(relay, consumer, receive_timeout=0.2) as client:
            await consumer.run_until(client, 2)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "timed out" in warnings[0].error
    assert warnings[0].cursor is None
