"""Regression cases of hostile or unusual streams, each indexed end to end into a real database.

Frames are built here (``frame_builder``), served by a ``ReplayRelay`` and indexed by a real
``StreamIndexer``; each test checks what an operator would find in the tables afterwards.

Cases already tested elsewhere with the same rule, and therefore not repeated here:

- a commit of three ops whose middle record has invalid UTF-8 text:
  ``test_run_bad_input.py::test_invalid_utf8_record_dead_lettered_alone``;
- empty ``blocks``: ``test_run_bad_input.py::test_empty_blocks_keeps_delete``; a CAR cut in the
  middle of a block: ``test_run_bad_input.py::test_truncated_car_dead_lettered``;
- a create op whose CID is not in the CAR, beside a valid op:
  ``test_run_bad_input.py::test_missing_block_beside_valid_op``;
- ``FutureCursor``: ``test_run_bad_input.py::test_future_cursor_stops_with_stored_cursor``;
  ``OutdatedCursor`` then later seqs: ``test_run_bad_input.py::test_outdated_cursor_records_gap``;
- the first event after a reconnect being the last one stored:
  ``test_run_bad_input.py::test_relay_close_mid_stream_resumes``;
- ``ConsumerTooSlow`` then close: ``test_run_bad_input.py::test_consumer_too_slow_resumes``;
- a label without ``neg``: ``test_labels_stream.py::test_label_without_neg_stored_false``; labels
  whose ``exp`` is past or future: ``test_labels_stream.py::test_label_expiry_with_test_clock``;
  ``#labels`` frames without labels: ``test_labels_stream.py::test_frames_without_labels_advance_cursor``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import libipld
import psycopg
import pytest

from frame_builder import commit_body, commit_frame, message_frame
from indexer.events import SkipReason
from indexer.replay import Faults, ReplayRelay
from ingest_harness import index_frames

pytestmark = pytest.mark.timeout(60)

DID = "did:plc:regressioncases"
TIME = "2026-01-02T03:04:05.678Z"
POST = "app.bsky.feed.post"
FOLLOW = "app.bsky.graph.follow"
PROFILE = "app.bsky.actor.profile"
_TID_CHARS = "234567abcdefghijklmnopqrstuvwxyz"


def tid(step: int) -> str:
    """Return a TID ``step`` seconds after 2026-01-02, so revs sort by step."""
    moment = datetime(2026, 1, 2, tzinfo=UTC) + timedelta(seconds=step)
    value = ((moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)) << 10
    return "".join(_TID_CHARS[(value >> shift) & 31] for shift in range(60, -1, -5))


def post(text: str = "hello", **fields) -> dict:
    return {"$type": POST, "text": text, "createdAt": TIME, **fields}


def follow(subject: str = "did:plc:followed") -> dict:
    return {"$type": FOLLOW, "subject": subject, "createdAt": TIME}


def post_commit(seq: int) -> tuple[int, bytes]:
    return seq, commit_frame(seq, DID, tid(seq), [("create", f"{POST}/p{seq}", post(f"post {seq}"))])


def account_frame(seq: int, active: bool, status: str | None = None) -> tuple[int, bytes]:
    body = {"seq": seq, "did": DID, "time": TIME, "active": active}
    if status is not None:
        body["status"] = status
    return seq, message_frame("#account", body)


async def index_all(url: str, frames: list[tuple[int, bytes]], faults: Faults | None = None, **settings):
    """Serve ``frames`` and index them until the highest seq is committed; return (indexer, relay)."""
    async with ReplayRelay(frames) as relay:
        if faults is not None:
            relay.faults = faults
        indexer = await index_frames(url, relay, max(seq for seq, _frame in frames), **settings)
    return indexer, relay


def query(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql, params).fetchall()


def stored_cursor(url: str) -> int | None:
    rows = query(url, "SELECT seq FROM cursors")
    return rows[0][0] if rows else None


# 2. a record containing a CBOR undefined ----------------------------------------------------------


async def test_undefined_in_record_dead_lettered(database_url):
    undefined_post = b"\xa2\x65$type" + libipld.encode_dag_cbor(POST) + b"\x64text\xf7"  # {"$type": POST, "text": undefined}
    frames = [(1, commit_frame(1, DID, tid(1), [("create", f"{POST}/undefined", undefined_post)])), post_commit(2)]
    await index_all(database_url, frames)

    assert query(database_url, "SELECT seq, path, reason FROM dead_letters") == [(1, f"{POST}/undefined", "invalid_record")]
    assert "not valid DAG-CBOR" in query(database_url, "SELECT error FROM dead_letters")[0][0]
    assert query(database_url, "SELECT seq FROM posts") == [(2,)]
    assert stored_cursor(database_url) == 2


# a message above the size limit that the relay sends again after every reconnect -----------------


async def test_resent_oversized_message_gets_its_seq(database_url):
    big = commit_frame(2, DID, tid(2), [("create", f"{POST}/big", post("x" * 4096))])
    await index_all(database_url, [post_commit(1), (2, big), post_commit(3)], max_message_size=2048)

    assert query(database_url, "SELECT seq, did, reason FROM dead_letters") == [(2, DID, "oversized_frame")]
    assert query(database_url, "SELECT events FROM cursors") == [(3,)]  # the big message counted once
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(1,), (3,)]
    assert stored_cursor(database_url) == 3


# 3. blocks of one byte ----------------------------------------------------------------------------


async def test_one_byte_blocks_dead_lettered(database_url):
    body = commit_body(1, DID, tid(1), [("create", f"{POST}/one", post())])
    body["blocks"] = b"\x01"
    await index_all(database_url, [(1, message_frame("#commit", body)), post_commit(2)])

    assert query(database_url, "SELECT seq, did, reason FROM dead_letters") == [(1, DID, "invalid_car")]
    assert query(database_url, "SELECT seq FROM posts") == [(2,)]
    assert stored_cursor(database_url) == 2


# 4. a deprecated tooBig commit without blocks ----------------------------------------------------


async def test_too_big_commit_ops_need_refetch(database_url):
    ops = [("create", f"{POST}/big", post()), ("delete", f"{POST}/gone", None)]
    body = commit_body(1, DID, tid(1), ops, too_big=True)
    del body["blocks"]
    await index_all(database_url, [(1, message_frame("#commit", body))])

    assert query(database_url, "SELECT seq, path, reason FROM dead_letters") == [(1, f"{POST}/big", "too_big")]
    assert query(database_url, "SELECT rkey FROM deletions") == [("gone",)]
    assert query(database_url, "SELECT count(*) FROM posts") == [(0,)]
    assert stored_cursor(database_url) == 1
    assert query(database_url, "SELECT desynchronized_at IS NOT NULL FROM actors WHERE did = %s", DID) == [(True,)]


# 6. garbage as frame 106 of 110 and a disconnect after 108 ----------------------------------------


async def test_garbage_frame_106_dead_lettered_once(database_url):
    frames = [post_commit(seq) for seq in range(1, 111)]
    frames[105] = (106, b"\xffgarbage, not a frame\x00" * 4)
    _indexer, relay = await index_all(database_url, frames, Faults(close_after=108, connections=1))

    assert relay.connections[0].outcome == "close"
    assert relay.connections[1].cursor == 108
    assert query(database_url, "SELECT seq, reason FROM dead_letters") == [(None, "invalid_frame")]
    assert query(database_url, "SELECT count(*) FROM posts") == [(109,)]
    assert query(database_url, "SELECT count(*) FROM posts WHERE seq = 106") == [(0,)]
    assert stored_cursor(database_url) == 110


# 7. a relay that goes silent after accepting; handshakes rejected with HTTP 503 --------------------


async def test_silent_relay_after_accept_reconnects(database_url):
    frames = [post_commit(seq) for seq in range(1, 4)]
    indexer, relay = await index_all(database_url, frames, Faults(stall_after=0, connections=1), receive_timeout=0.3)

    assert relay.connections[0].outcome == "stall"
    assert relay.connections[0].frames_sent == 0
    assert indexer.client.counters.timeouts == 1
    assert query(database_url, "SELECT count(*) FROM posts") == [(3,)]


async def test_handshake_503_five_times_then_indexed(database_url):
    frames = [post_commit(seq) for seq in range(1, 4)]
    indexer, relay = await index_all(database_url, frames, Faults(reject_handshakes=5))

    assert [record.status for record in relay.connections[:6]] == [503] * 5 + [101]
    assert indexer.client.counters.handshake_failures == 5
    assert query(database_url, "SELECT count(*) FROM posts") == [(3,)]


# 9. seqs that jump ---------------------------------------------------------------------------------


async def test_seq_jumps_raise_no_alarm(database_url, caplog):
    caplog.set_level(logging.WARNING, logger="indexer")
    indexer, _relay = await index_all(database_url, [post_commit(seq) for seq in (100, 101, 103, 200)])

    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(100,), (101,), (103,), (200,)]
    assert query(database_url, "SELECT count(*) FROM gaps") == [(0,)]
    assert indexer.counters.replayed == 0
    assert [record.getMessage() for record in caplog.records if record.name.startswith("indexer")] == []
    assert stored_cursor(database_url) == 200


# 12. NUL characters in text fields ----------------------------------------------------------------


async def test_nul_in_text_fields_removed(database_url):
    image = {"$type": "app.bsky.embed.images#image", "alt": "a\x00cat",
             "image": {"$type": "blob", "ref": libipld.decode_cid("bafkreibme22gw2h7y2h7tg2fhqotaqjucnbc24deqo72b6mkl2egezxhvy"),
                       "mimeType": "image/jpeg", "size": 1}}
    external = {"$type": "app.bsky.embed.external",
                "external": {"uri": "https://example.com", "title": "t", "description": "des\x00cription"}}
    ops = [
        ("create", f"{POST}/text", post("te\x00xt")),
        ("create", f"{POST}/alt", post("alt", embed={"$type": "app.bsky.embed.images", "images": [image]})),
        ("create", f"{POST}/external", post("external", embed=external)),
        ("create", f"{PROFILE}/self", {"$type": PROFILE, "displayName": "Al\x00ice"}),
    ]
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), ops))])

    posts = dict(query(database_url, "SELECT rkey, jsonb_build_array(text, embed) FROM posts"))
    assert posts["text"][0] == "text"
    assert posts["alt"][1]["images"][0]["alt"] == "acat"
    assert posts["external"][1]["external"]["description"] == "description"
    assert query(database_url, "SELECT display_name FROM profiles") == [("Alice",)]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


async def test_integers_beyond_64_bits_stored(database_url):
    # DAG-CBOR integers reach down to -2**64, outside the 64-bit range of the fast JSON writer.
    extreme = {"low": -(2**64), "high": 2**64 - 1, "list": [-(2**63) - 1]}
    ops = [("create", f"{POST}/extreme", post("extreme", extreme=extreme))]
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), ops))])

    stored = query(database_url, "SELECT record->'extreme' FROM posts WHERE rkey = 'extreme'")
    assert stored == [(extreme,)]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


# 13. the same commit three times, then an older rev ------------------------------------------------


async def test_same_commit_thrice_then_older_rev(database_url):
    newer = [("create", f"{POST}/same", post("newer"))]
    older = [("create", f"{POST}/same", post("older"))]
    frames = [(seq, commit_frame(seq, DID, tid(10), newer)) for seq in (1, 2, 3)]
    frames.append((4, commit_frame(4, DID, tid(5), older)))
    await index_all(database_url, frames)

    assert query(database_url, "SELECT text, rev, seq FROM posts") == [("newer", tid(10), 1)]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert stored_cursor(database_url) == 4


# 14. a follow's delete before its create; create, delete, re-create --------------------------------


async def test_follow_delete_before_create(database_url):
    frames = [(1, commit_frame(1, DID, tid(2), [("delete", f"{FOLLOW}/f1", None)])),
              (2, commit_frame(2, DID, tid(1), [("create", f"{FOLLOW}/f1", follow())]))]
    await index_all(database_url, frames)

    assert query(database_url, "SELECT count(*) FROM follows") == [(0,)]
    assert query(database_url, "SELECT rkey, rev FROM deletions") == [("f1", tid(2))]


async def test_recreate_after_delete_kept(database_url):
    first, second = follow("did:plc:first"), follow("did:plc:second")
    frames = [(1, commit_frame(1, DID, tid(1), [("create", f"{FOLLOW}/f1", first)])),
              (2, commit_frame(2, DID, tid(2), [("delete", f"{FOLLOW}/f1", None)])),
              (3, commit_frame(3, DID, tid(3), [("create", f"{FOLLOW}/f1", second)]))]
    await index_all(database_url, frames)
    second_cid = libipld.encode_cid(libipld.decode_dag_cbor_multi(frames[2][1])[1]["ops"][0]["cid"])

    assert query(database_url, "SELECT subject_did, rev, cid FROM follows") == [("did:plc:second", tid(3), second_cid)]
    assert query(database_url, "SELECT rev FROM deletions") == [(tid(2),)]


# 15. createdAt without timezone, with +09:00, with nanoseconds, ten years ahead ---------------------


async def test_created_at_variants_stored(database_url):
    values = {
        "naive": "2026-01-02T03:04:05",
        "offset": "2026-01-02T12:04:05+09:00",
        "nanos": "2026-01-02T03:04:05.123456789Z",
        "future": "2036-01-02T03:04:05Z",
    }
    ops = [("create", f"{POST}/{name}", post(name, createdAt=value)) for name, value in values.items()]
    await index_all(database_url, [(1, commit_frame(1, DID, tid(1), ops, time=TIME))])
    rows = {rkey: (raw, parsed) for rkey, raw, parsed in query(database_url, "SELECT rkey, created_at_raw, created_at FROM posts")}

    assert rows["naive"] == (values["naive"], None)
    assert rows["offset"] == (values["offset"], datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert rows["nanos"] == (values["nanos"], datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC))
    assert rows["future"] == (values["future"], None)


# 16. #account takendown, commit, reactivated; deleted; unknown status --------------------------------


async def test_takedown_commit_reactivation_end_state(database_url):
    frames = [account_frame(1, False, "takendown"), post_commit(2), account_frame(3, True)]
    await index_all(database_url, frames)

    assert query(database_url, "SELECT active, status, account_seq FROM actors") == [(True, None, 3)]
    assert query(database_url, "SELECT seq, active, status FROM account_events ORDER BY seq") == [
        (1, False, "takendown"), (3, True, None)]
    assert query(database_url, "SELECT seq FROM posts") == [(2,)]


async def test_deleted_account_status_stored(database_url):
    await index_all(database_url, [post_commit(1), account_frame(2, False, "deleted")])

    assert query(database_url, "SELECT active, status FROM actors") == [(False, "deleted")]
    assert query(database_url, "SELECT seq FROM posts") == [(1,)]


async def test_unknown_account_status_kept(database_url):
    await index_all(database_url, [account_frame(1, False, "throttled")])

    assert query(database_url, "SELECT active, status FROM actors") == [(False, "throttled")]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


# 17. #sync, an unknown type, a commit with neither prevData nor since --------------------------------


async def test_sync_event_marks_repo(database_url):
    sync = {"seq": 2, "did": DID, "rev": tid(5), "blocks": b"", "time": TIME}
    await index_all(database_url, [post_commit(1), (2, message_frame("#sync", sync))])

    assert query(database_url, "SELECT seq, rev FROM sync_events") == [(2, tid(5))]
    assert query(database_url, "SELECT desynchronized_at IS NOT NULL, rev FROM actors") == [(True, tid(5))]


async def test_unknown_frobnicate_type_skipped(database_url):
    frames = [post_commit(1), (2, message_frame("#frobnicate", {"seq": 2, "did": DID})), post_commit(3)]
    indexer, _relay = await index_all(database_url, frames)

    assert indexer.counters.skipped[SkipReason.UNKNOWN_TYPE] == 1
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(1,), (3,)]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert stored_cursor(database_url) == 3


async def test_commit_without_prev_data_or_since(database_url):
    body = commit_body(1, DID, tid(1), [("create", f"{POST}/bare", post())])
    del body["prevData"]
    del body["since"]
    await index_all(database_url, [(1, message_frame("#commit", body))])

    assert query(database_url, "SELECT rkey, rev FROM posts") == [("bare", tid(1))]
    assert query(database_url, "SELECT desynchronized_at FROM actors") == [(None,)]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


# Found by fuzzing: values the database cannot store must not stop the writer --------------------


async def test_seq_beyond_bigint_dead_lettered(database_url):
    body = commit_body(1, DID, tid(1), [("create", f"{POST}/huge", post())])
    body["seq"] = 2**64 - 1
    frames = [post_commit(1), (2, message_frame("#commit", body)), post_commit(3)]
    await index_all(database_url, frames)

    assert query(database_url, "SELECT seq, reason FROM dead_letters") == [(None, "invalid_body")]
    assert "must be from 0 to 2**63 - 1" in query(database_url, "SELECT error FROM dead_letters")[0][0]
    assert query(database_url, "SELECT seq FROM posts ORDER BY seq") == [(1,), (3,)]
    assert stored_cursor(database_url) == 3


async def test_nul_in_repo_did_dead_lettered(database_url):
    frames = [(1, commit_frame(1, "did:plc:nul\x00did", tid(1), [("create", f"{POST}/nul", post())])), post_commit(2)]
    await index_all(database_url, frames)

    assert query(database_url, "SELECT seq, did, reason FROM dead_letters") == [(1, "did:plc:nuldid", "store_failed")]
    assert query(database_url, "SELECT seq FROM posts") == [(2,)]
    assert stored_cursor(database_url) == 2
