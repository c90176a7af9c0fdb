"""The replay relay: loading recordings, cursor rules of the Event Stream spec, and fault knobs.

A plain aiohttp websocket client talks to the relay here, so these tests do not depend on
``indexer.stream``.
"""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import libipld
import pytest

from indexer.errors import ConfigError
from indexer.replay import (
    LABELS_METHOD,
    REPOS_METHOD,
    Faults,
    NoCursor,
    ReplayRelay,
    assign_seqs,
    info_frame,
    load_frame_directory,
    load_length_prefixed,
    main,
)
from fixture_data import JETSTREAM_CORPUS, PROTORUNE_FRAMES, fixture_path, read_length_prefixed

pytestmark = pytest.mark.timeout(30)

CORPUS_OLDEST = 31527015360
CORPUS_NEWEST = 31527015471


def identity_frame(seq: int) -> bytes:
    """A small ``#identity`` frame built by the test, with the given seq."""
    header = libipld.encode_dag_cbor({"op": 1, "t": "#identity"})
    body = libipld.encode_dag_cbor({"seq": seq, "did": "did:plc:replaytest", "time": "2026-01-01T00:00:00.000Z"})
    return header + body


def small_frames(count: int) -> list[tuple[int, bytes]]:
    return [(seq, identity_frame(seq)) for seq in range(1, count + 1)]


def decode(frame: bytes) -> tuple[dict, dict]:
    header, body = libipld.decode_dag_cbor_multi(frame)
    return header, body



@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client_session:
        yield client_session


async def receive_until_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 2.0) -> list[bytes]:
    """Collect binary messages until the server closes the connection."""
    messages = []
    while True:
        message = await ws.receive(timeout=timeout)
        if message.type is not aiohttp.WSMsgType.BINARY:
            return messages
        messages.append(message.data)


async def receive_count(ws: aiohttp.ClientWebSocketResponse, count: int, timeout: float = 2.0) -> list[bytes]:
    messages = []
    while len(messages) < count:
        message = await ws.receive(timeout=timeout)
        assert message.type is aiohttp.WSMsgType.BINARY, f"expected a binary message, got {message.type}"
        messages.append(message.data)
    return messages


# Loading recordings


def test_length_prefixed_corpus_seqs_read(corpus_frames):
    seqs = [seq for seq, _frame in corpus_frames]
    assert seqs == list(range(CORPUS_OLDEST, CORPUS_NEWEST + 1))
    raw = read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))
    assert [frame for _seq, frame in corpus_frames] == raw


def test_frame_without_seq_keeps_previous():
    info = info_frame("OutdatedCursor")
    pairs = assign_seqs([info, identity_frame(5), info, b"\xff not cbor", identity_frame(7)])
    assert [seq for seq, _frame in pairs] == [0, 5, 5, 5, 7]


def test_truncated_length_prefixed_file_rejected(tmp_path):
    frame = identity_frame(1)
    path = tmp_path / "cut.lp.bin"
    path.write_bytes(struct.pack("<I", len(frame)) + frame + struct.pack("<I", 100) + b"short")
    with pytest.raises(ConfigError, match="truncated"):
        load_length_prefixed(path)


def test_frame_directory_loads_in_name_order():
    directory = fixture_path(PROTORUNE_FRAMES)
    pairs = load_frame_directory(directory)
    files = sorted(directory.glob("*.bin"))
    assert len(pairs) == len(files)
    assert [frame for _seq, frame in pairs] == [file.read_bytes() for file in files]
    assert pairs[0][0] == 32625482169


def test_main_missing_source_exits_2(tmp_path, capsys):
    status = main([str(tmp_path / "absent.lp.bin"), "--port", "0"])
    assert status == 2
    assert "no such file or directory" in capsys.readouterr().err


# Cursor rules


async def test_no_cursor_sends_every_frame(start_relay, session, corpus_frames):
    relay = await start_relay(corpus_frames, close_at_end=True)
    async with session.ws_connect(relay.url(REPOS_METHOD)) as ws:
        received = await receive_until_close(ws)
    assert received == [frame for _seq, frame in corpus_frames]
    assert relay.connections[0].cursor is None
    assert relay.connections[0].outcome == "end"


async def test_labels_path_served_too(start_relay, session):
    relay = await start_relay(small_frames(3), close_at_end=True)
    async with session.ws_connect(relay.url(LABELS_METHOD)) as ws:
        received = await receive_until_close(ws)
    assert len(received) == 3
    assert relay.connections[0].path == f"/xrpc/{LABELS_METHOD}"


async def test_cursor_inside_window_sends_from_seq(start_relay, session, corpus_frames):
    relay = await start_relay(corpus_frames, close_at_end=True)
    cursor = corpus_frames[50][0]
    async with session.ws_connect(relay.url(), params={"cursor": str(cursor)}) as ws:
        received = await receive_until_close(ws)
    assert decode(received[0])[1]["seq"] == cursor
    assert received == [frame for _seq, frame in corpus_frames[50:]]
    assert relay.connections[0].cursor == cursor


async def test_exclusive_cursor_skips_cursor_seq(start_relay, session):
    relay = await start_relay(small_frames(5), close_at_end=True, cursor_inclusive=False)
    async with session.ws_connect(relay.url(), params={"cursor": "3"}) as ws:
        received = await receive_until_close(ws)
    assert [decode(frame)[1]["seq"] for frame in received] == [4, 5]


async def test_outdated_cursor_sends_info_first(start_relay, session, corpus_frames):
    relay = await start_relay(corpus_frames, close_at_end=True)
    async with session.ws_connect(relay.url(), params={"cursor": str(CORPUS_OLDEST - 1000)}) as ws:
        received = await receive_until_close(ws)
    header, body = decode(received[0])
    assert header == {"op": 1, "t": "#info"}
    assert body["name"] == "OutdatedCursor"
    assert received[1:] == [frame for _seq, frame in corpus_frames]


async def test_cursor_just_below_oldest_is_not_outdated(start_relay, session, corpus_frames):
    relay = await start_relay(corpus_frames, close_at_end=True)
    async with session.ws_connect(relay.url(), params={"cursor": str(CORPUS_OLDEST - 1)}) as ws:
        received = await receive_until_close(ws)
    assert received == [frame for _seq, frame in corpus_frames]


async def test_future_cursor_sends_error_then_closes(start_relay, session, corpus_frames):
    relay = await start_relay(corpus_frames)
    async with session.ws_connect(relay.url(), params={"cursor": str(CORPUS_NEWEST + 1)}) as ws:
        received = await receive_until_close(ws)
        assert ws.closed
    assert len(received) == 1
    header, body = decode(received[0])
    assert header == {"op": -1}
    assert body["error"] == "FutureCursor"
    assert str(CORPUS_NEWEST) in body["message"]
    assert relay.connections[0].outcome == "future_cursor"


async def test_cursor_at_newest_is_not_future(start_relay, session, corpus_frames):
    relay = await start_relay(corpus_frames, close_at_end=True)
    async with session.ws_connect(relay.url(), params={"cursor": str(CORPUS_NEWEST)}) as ws:
        received = await receive_until_close(ws)
    assert received == [corpus_frames[-1][1]]


async def test_invalid_cursor_rejected_with_400(start_relay, session):
    relay = await start_relay(small_frames(2))
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await session.ws_connect(relay.url(), params={"cursor": "abc"})
    assert caught.value.status == 400
    assert relay.connections[0].raw_cursor == "abc"
    assert relay.connections[0].status == 400


async def test_tip_mode_sends_only_appended_frames(start_relay, session):
    relay = await start_relay(small_frames(3), no_cursor=NoCursor.TIP)
    async with session.ws_connect(relay.url()) as ws:
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.2)
        relay.append(4, identity_frame(4))
        received = await receive_count(ws, 1)
    assert decode(received[0])[1]["seq"] == 4


async def test_live_tip_receives_appended_frame(start_relay, session):
    relay = await start_relay(small_frames(2))
    async with session.ws_connect(relay.url()) as ws:
        first = await receive_count(ws, 2)
        relay.append(3, identity_frame(3))
        later = await receive_count(ws, 1)
    assert [decode(frame)[1]["seq"] for frame in first + later] == [1, 2, 3]


# Fault knobs


async def test_close_after_n_frames(start_relay, session):
    relay = await start_relay(small_frames(5))
    relay.faults.close_after = 2
    async with session.ws_connect(relay.url()) as ws:
        received = await receive_until_close(ws)
    assert len(received) == 2
    assert relay.connections[0].outcome == "close"


async def test_stall_keeps_socket_open(start_relay, session):
    relay = await start_relay(small_frames(5))
    relay.faults.stall_after = 2
    async with session.ws_connect(relay.url()) as ws:
        received = await receive_count(ws, 2)
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.3)
        assert len(received) == 2
        assert not ws.closed


async def test_truncate_sends_half_frame_then_closes(start_relay, session):
    frames = small_frames(3)
    relay = await start_relay(frames)
    relay.faults.truncate_after = 1
    async with session.ws_connect(relay.url()) as ws:
        received = await receive_until_close(ws)
    assert received[0] == frames[0][1]
    assert received[1] == frames[1][1][: len(frames[1][1]) // 2]
    assert len(received) == 2
    with pytest.raises(ValueError):
        libipld.decode_dag_cbor_multi(received[1])


async def test_error_frame_then_close(start_relay, session):
    relay = await start_relay(small_frames(5))
    relay.faults.error_after = 3
    async with session.ws_connect(relay.url()) as ws:
        received = await receive_until_close(ws)
    assert len(received) == 4
    header, body = decode(received[3])
    assert header == {"op": -1}
    assert body["error"] == "ConsumerTooSlow"


async def test_handshakes_rejected_with_503(start_relay, session):
    relay = await start_relay(small_frames(1), close_at_end=True)
    relay.faults.reject_handshakes = 2
    for _attempt in range(2):
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(relay.url())
        assert caught.value.status == 503
    async with session.ws_connect(relay.url()) as ws:
        received = await receive_until_close(ws)
    assert len(received) == 1
    assert [record.status for record in relay.connections] == [503, 503, 101]


async def test_faults_limited_to_next_connections(start_relay, session):
    relay = await start_relay(small_frames(4), close_at_end=True)
    relay.faults = Faults(close_after=1, connections=1)
    async with session.ws_connect(relay.url()) as ws:
        first = await receive_until_close(ws)
    async with session.ws_connect(relay.url()) as ws:
        second = await receive_until_close(ws)
    assert len(first) == 1
    assert len(second) == 4
    assert relay.faults == Faults()


async def test_connections_record_requested_cursors(start_relay, session):
    relay = await start_relay(small_frames(4), close_at_end=True)
    for params in (None, {"cursor": "2"}, {"cursor": "4"}):
        async with session.ws_connect(relay.url(), params=params) as ws:
            await receive_until_close(ws)
    assert [record.cursor for record in relay.connections] == [None, 2, 4]
    assert [record.frames_sent for record in relay.connections] == [4, 3, 1]


async def test_stop_closes_open_connections(start_relay, session):
    relay = await start_relay(small_frames(1))
    async with session.ws_connect(relay.url()) as ws:
        await receive_count(ws, 1)
        # Reading while the relay stops lets the client reply to the close frame at once.
        receiver = asyncio.create_task(ws.receive(timeout=2.0))
        await relay.stop()
        message = await receiver
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


def test_labels_file_served_as_label_frames():
    from fixture_data import fixture_path
    from indexer.frames import decode_label_frame
    from indexer.replay import load_frames

    frames = load_frames(fixture_path("labels/signed_labels.json"))
    events = [decode_label_frame(frame) for _, frame in frames]

    assert [seq for seq, _ in frames] == [1, 2, 3]
    assert [event.seq for event in events] == [1, 2, 3]
    assert [len(event.labels) for event in events] == [1, 1, 1]
    assert all(event.labels[0].sig for event in events)


async def test_did_documents_served_like_plc_directory():
    import aiohttp

    from indexer.replay import ReplayRelay

    document = {"id": "did:plc:abc", "verificationMethod": []}
    async with ReplayRelay([], did_documents={"did:plc:abc": document}) as relay:
        base = f"http://127.0.0.1:{relay.port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/did:plc:abc") as found:
                served = await found.json()
                found_status = found.status
            async with session.get(f"{base}/did:plc:unknown") as missing:
                missing_status = missing.status

    assert found_status == 200
    assert served == document
    assert missing_status == 404
