"""Bad input and stream faults, end to end: frames built here, a real relay, indexer and database.

Each test serves constructed frames from a ``ReplayRelay`` to a ``StreamIndexer`` writing into the
test database, and checks what an operator would query afterwards: rows that were indexed, dead
letters for what could not be, the stored cursor, and gaps. The rule throughout: one bad record or
frame never stops the stream and never takes its neighbours with it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import libipld
import psycopg
import pytest

from frame_builder import commit_body, commit_frame, message_frame
from indexer.errors import FutureCursorError
from indexer.events import SkipReason
from indexer.ingest import REPOS_METHOD, Filters
from indexer.replay import Faults, ReplayRelay, info_frame
from indexer.stream import endpoint_url
from ingest_harness import build_indexer, index_frames, run_until

pytestmark = pytest.mark.timeout(60)

DID = "did:plc:badinputtest"
TIME = "2026-01-02T03:04:05.678Z"
POST = "app.bsky.feed.post"
_TID_CHARS = "234567abcdefghijklmnopqrstuvwxyz"
_TID_BASE = datetime(2026, 1, 2, tzinfo=UTC)


def tid(step: int) -> str:
    """Return a valid TID ``step`` seconds after 2026-01-02, so revs sort by step."""
    microseconds = (_TID_BASE + timedelta(seconds=step) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    value = microseconds << 10
    return "".join(_TID_CHARS[(value >> shift) & 31] for shift in range(60, -1, -5))


def post(text: str = "hello", created_at: str | None = TIME) -> dict:
    record = {"$type": POST, "text": text}
    if created_at is not None:
        record["createdAt"] = created_at
    return record


def post_commit(seq: int, rkey: str = "a") -> tuple[int, bytes]:
    return seq, commit_frame(seq, DID, tid(seq), [("create", f"{POST}/{rkey}{seq}", post(f"post {seq}"))])


def invalid_utf8_post() -> bytes:
    """A post block whose text is the bytes ff fe: valid CBOR structure, invalid UTF-8."""
    block = libipld.encode_dag_cbor(post("zz"))
    return block.replace(b"bzz", b"b\xff\xfe", 1)


def truncated_car_frame(seq: int) -> bytes:
    body = commit_body(seq, DID, tid(seq), [("create", f"{POST}/cut{seq}", post())])
    body["blocks"] = body["blocks"][: len(body["blocks"]) // 2]
    return message_frame("#commit", body)


def undecodable_frame(seq: int) -> bytes:
    """A #commit whose body has invalid UTF-8 in 'repo', so not even its seq can be read."""
    frame = commit_frame(seq, "did:plc:zzzzzz", tid(seq), [("create", f"{POST}/x{seq}", post())])
    return frame.replace(b"did:plc:zzzzzz", b"did:plc:\xff\xfezzzz", 1)


def query(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql, params).fetchall()


def store_cursor(url: str, relay: ReplayRelay, seq: int) -> None:
    """Store a cursor for the relay's endpoint, as an earlier run would have."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        connection.execute("INSERT INTO cursors (endpoint, job, seq) VALUES (%s, 'live', %s)",
                           (endpoint_url(relay.base_url, REPOS_METHOD), seq))


async def index_all(url: str, frames: list[tuple[int, bytes]], **settings):
    async with ReplayRelay(frames) as relay:
        indexer = await index_frames(url, relay, max(seq for seq, _frame in frames), **settings)
    return indexer, relay


def stored_cursor(url: str) -> int | None:
    rows = query(url, "SELECT seq FROM cursors")
    return rows[0][0] if rows else None


# --- broken records and CARs ---------------------------------------------------------------------


async def test_invalid_utf8_record_dead_lettered_alone(database_url):
    ops = [("create", f"{POST}/first", post("first")), ("create", f"{POST}/middle", invalid_utf8_post()),
           ("create", f"{POST}/last", post("last"))]
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), ops))])

    assert query(database_url, "SELECT rkey, text FROM posts ORDER BY rkey") == [("first", "first"), ("last", "last")]
    assert query(database_url, "SELECT seq, did, t, path, reason FROM dead_letters") == [
        (1, DID, "#commit", f"{POST}/middle", "invalid_record")]
    assert query(database_url, "SELECT raw FROM dead_letters") == [(invalid_utf8_post(),)]
    assert stored_cursor(database_url) == 1


async def test_empty_blocks_keeps_delete(database_url):
    ops = [("create", f"{POST}/new", post()), ("delete", f"{POST}/old", None)]
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), ops, include_blocks=False))])

    assert query(database_url, "SELECT rkey FROM deletions") == [("old",)]
    assert query(database_url, "SELECT path, reason FROM dead_letters") == [(f"{POST}/new", "missing_block")]
    assert query(database_url, "SELECT count(*) FROM posts") == [(0,)]
    assert stored_cursor(database_url) == 1


async def test_truncated_car_dead_lettered(database_url):
    frames = [(1, truncated_car_frame(1)), post_commit(2)]
    await index_all(database_url, frames)

    assert query(database_url, "SELECT seq, did, reason FROM dead_letters") == [(1, DID, "invalid_car")]
    assert query(database_url, "SELECT seq FROM posts") == [(2,)]
    assert stored_cursor(database_url) == 2


async def test_missing_block_beside_valid_op(database_url):
    ops = [("create", f"{POST}/kept", post("kept")), ("create", f"{POST}/lost", post("lost"))]
    frame = commit_frame(1, DID, tid(1), ops, omit_blocks_for=[f"{POST}/lost"])
    await index_all(database_url, [(1, frame)])

    assert query(database_url, "SELECT rkey FROM posts") == [("kept",)]
    assert query(database_url, "SELECT seq, path, reason FROM dead_letters") == [(1, f"{POST}/lost", "missing_block")]


async def test_nul_removed_from_post_text(database_url):
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), [("create", f"{POST}/nul", post("a\x00b\x00"))]))])

    assert query(database_url, "SELECT text, record->>'text' FROM posts") == [("ab", "ab")]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


ODD_CREATED_AT = ["", "garbage", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "2026-01-02T03:04:05",
                  "9999-12-31T23:59:59Z"]


async def test_odd_created_at_kept_raw(database_url):
    ops = [("create", f"{POST}/odd{index}", post(created_at=value)) for index, value in enumerate(ODD_CREATED_AT)]
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), ops))])

    rows = query(database_url, "SELECT created_at_raw, created_at FROM posts ORDER BY rkey")
    assert rows == [(value, None) for value in ODD_CREATED_AT]


# --- message types and error frames --------------------------------------------------------------


async def test_unknown_type_skipped_cursor_moves(database_url):
    frames = [post_commit(1), (2, message_frame("#mystery", {"seq": 2, "did": DID}))]
    indexer, _relay = await index_all(database_url, frames)

    assert indexer.counters.skipped[SkipReason.UNKNOWN_TYPE] == 1
    assert stored_cursor(database_url) == 2
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_future_cursor_stops_with_stored_cursor(database_url):
    async with ReplayRelay([post_commit(1), post_commit(2)]) as relay:
        store_cursor(database_url, relay, 500)
        indexer = build_indexer(database_url, relay)
        with pytest.raises(FutureCursorError) as raised:
            await run_until(indexer, lambda running: False)

    message = str(raised.value)
    assert "cursor 500 is ahead" in message
    assert "cursors table" in message
    assert stored_cursor(database_url) == 500


async def test_consumer_too_slow_resumes(database_url):
    frames = [post_commit(seq) for seq in range(1, 6)]
    async with ReplayRelay(frames) as relay:
        relay.faults = Faults(error_after=2, error="ConsumerTooSlow", connections=1)
        await index_frames(database_url, relay, 5)

    assert relay.connections[0].outcome == "error"
    assert [record.cursor for record in relay.connections[:2]] == [None, 2]
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(seq,) for seq in range(1, 6)]


async def test_outdated_cursor_records_gap(database_url):
    frames = [post_commit(seq) for seq in (10, 11, 12)]
    async with ReplayRelay(frames) as relay:
        store_cursor(database_url, relay, 3)
        await index_frames(database_url, relay, 12)

    assert query(database_url, "SELECT from_seq, to_seq, reason FROM gaps") == [(3, 10, "OutdatedCursor")]
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(10,), (11,), (12,)]


async def test_outdated_cursor_gap_ends_at_first_seq_sent(database_url):
    # Regression (review): events filtered out after OutdatedCursor did not close the gap, so it
    # ended at the first event kept instead of the first one the server sent.
    other = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
    frames = [(seq, commit_frame(seq, other, tid(seq), [("create", f"{POST}/b{seq}", post("other"))]))
              for seq in (10, 11)] + [post_commit(12)]
    async with ReplayRelay(frames) as relay:
        store_cursor(database_url, relay, 3)
        await index_frames(database_url, relay, 12, filters=Filters(dids=frozenset({DID})))

    assert query(database_url, "SELECT from_seq, to_seq, reason FROM gaps") == [(3, 10, "OutdatedCursor")]


async def test_outdated_cursor_before_next_seq_records_no_gap(database_url):
    # Regression (newcomer walkthrough): a server that reports OutdatedCursor for the cursor just
    # below its oldest event left a gap row although no seq can lie between them.
    frames = [(10, info_frame("OutdatedCursor", "cursor 9 is older than 10")), post_commit(10), post_commit(11)]
    async with ReplayRelay(frames) as relay:
        store_cursor(database_url, relay, 9)
        await index_frames(database_url, relay, 11)

    assert query(database_url, "SELECT count(*) FROM gaps") == [(0,)]
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(10,), (11,)]


# --- connection faults ---------------------------------------------------------------------------


async def test_silent_socket_reconnects(database_url):
    frames = [post_commit(seq) for seq in range(1, 6)]
    async with ReplayRelay(frames) as relay:
        relay.faults = Faults(stall_after=2, connections=1)
        indexer = await index_frames(database_url, relay, 5, receive_timeout=0.3)

    assert indexer.client.counters.timeouts == 1
    assert [record.cursor for record in relay.connections[:2]] == [None, 2]
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(seq,) for seq in range(1, 6)]


async def test_relay_close_mid_stream_resumes(database_url):
    frames = [post_commit(seq) for seq in range(1, 6)]
    async with ReplayRelay(frames) as relay:
        relay.faults = Faults(close_after=3, connections=1)
        indexer = await index_frames(database_url, relay, 5)

    assert [record.cursor for record in relay.connections[:2]] == [None, 3]
    assert indexer.counters.replayed == 1
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(seq,) for seq in range(1, 6)]


@pytest.mark.parametrize("garbage", [truncated_car_frame, undecodable_frame], ids=["seq_readable", "seq_unreadable"])
async def test_replayed_garbage_dead_lettered_once(database_url, garbage):
    frames = [post_commit(1), (2, garbage(2)), post_commit(3)]
    async with ReplayRelay(frames) as relay:
        relay.faults = Faults(close_after=2, connections=1)
        await index_frames(database_url, relay, 3)

    assert len(relay.connections) >= 2
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(1,)]
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(1,), (3,)]
