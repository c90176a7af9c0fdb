"""``indexer dead-letters list|show|retry`` on dead letters made from real recorded frames.

A real ``#commit`` frame of the Jetstream corpus is stored as a dead letter, as if an older version
had failed to decode it. Retrying it must index the post it carries. A truncated copy of the frame
stays invalid.
"""

from __future__ import annotations

import json

import pytest

from command_harness import run_cli
from fixture_archive import corpus_frames, query
from indexer import frames
from indexer.events import Commit, DropReason
from indexer.ingest import REPOS_METHOD
from indexer.store import Batch, Store

pytestmark = pytest.mark.timeout(60)

ENDPOINT = f"ws://127.0.0.1:1/xrpc/{REPOS_METHOD}"
LIVE_CURSOR = 31527015471


def post_commit() -> tuple[bytes, Commit]:
    """Return the first corpus frame whose commit creates one post, with its decoded commit."""
    for _, frame in corpus_frames():
        event = frames.decode_repo_frame(frame)
        if isinstance(event, Commit) and [op.collection for op in event.ops] == ["app.bsky.feed.post"]:
            return frame, event
    raise AssertionError("the corpus has no commit creating exactly one post")


@pytest.fixture
def dead_letters(database_url) -> dict[str, int]:
    """Store a live cursor and four dead letters; return their ids by kind."""
    frame, commit = post_commit()
    store = Store(database_url, ENDPOINT)
    cursor_batch = Batch(endpoint=ENDPOINT)
    cursor_batch.cursor = LIVE_CURSOR
    store.write(cursor_batch)

    batch = Batch(endpoint=ENDPOINT)
    batch.add_dead_letter(DropReason.INVALID_BODY, "rejected by an older decoder", frame, seq=commit.seq,
                          did=commit.did, t="#commit")
    batch.add_dead_letter(DropReason.INVALID_FRAME, "truncated", frame[:-40], seq=commit.seq + 1)
    batch.add_dead_letter(DropReason.INVALID_RECORD, "bad record", commit.ops[0].record_bytes,
                          seq=commit.seq, did=commit.did, t="#commit", path=commit.ops[0].path)
    batch.add_dead_letter(DropReason.OVERSIZED_FRAME, "message of 9000000 bytes exceeds the limit", b"")
    store.write(batch)
    store.close()
    ids = [row[0] for row in query(database_url, "SELECT id FROM dead_letters ORDER BY id")]
    return dict(zip(["frame", "truncated", "op", "oversized"], ids)) | {"seq": commit.seq, "did": commit.did,
                                                                       "rkey": commit.ops[0].rkey}


def test_retry_indexes_fixed_frame(database_url, dead_letters):
    completed = run_cli("dead-letters", "retry", "--database-url", database_url)
    assert completed.returncode == 0, completed.stderr
    assert "4 dead letters retried: 1 indexed, 1 still failing, 2 not retryable." in completed.stdout
    posts = query(database_url, "SELECT seq FROM posts WHERE did = %s AND rkey = %s",
                  (dead_letters["did"], dead_letters["rkey"]))
    assert posts == [(dead_letters["seq"],)]


def test_retry_removes_only_indexed_rows(database_url, dead_letters):
    run_cli("dead-letters", "retry", "--database-url", database_url)
    remaining = {row[0] for row in query(database_url, "SELECT id FROM dead_letters")}
    assert remaining == {dead_letters["truncated"], dead_letters["op"], dead_letters["oversized"]}


def test_retry_keeps_stream_cursor(database_url, dead_letters):
    run_cli("dead-letters", "retry", "--database-url", database_url)
    assert query(database_url, "SELECT endpoint, seq FROM cursors") == [(ENDPOINT, LIVE_CURSOR)]


def test_retry_reports_why_not_retryable(database_url, dead_letters):
    completed = run_cli("dead-letters", "retry", "--database-url", database_url)
    assert f"#{dead_letters['op']} not_retryable: an op's dead letter keeps only the record block" in completed.stdout
    assert f"#{dead_letters['truncated']} still_failing: invalid_frame" in completed.stdout


def test_retry_filters_by_reason(database_url, dead_letters):
    completed = run_cli("dead-letters", "retry", "--reason", "invalid_frame", "--database-url", database_url)
    assert "1 dead letters retried: 0 indexed, 1 still failing, 0 not retryable." in completed.stdout
    assert len(query(database_url, "SELECT id FROM dead_letters")) == 4


def test_retry_rejects_unknown_reason(database_url, dead_letters):
    completed = run_cli("dead-letters", "retry", "--reason", "bogus", "--database-url", database_url)
    assert completed.returncode == 2
    assert "unknown --reason 'bogus': use one of invalid_frame" in completed.stderr


def test_show_decodes_frame(database_url, dead_letters):
    completed = run_cli("dead-letters", "show", str(dead_letters["frame"]), "--database-url", database_url)
    assert completed.returncode == 0, completed.stderr
    shown = json.loads(completed.stdout)
    assert shown["decoded"]["kind"] == "Commit"
    op = shown["decoded"]["event"]["ops"][0]
    assert op["collection"] == "app.bsky.feed.post"
    assert op["record"]["$type"] == "app.bsky.feed.post"


def test_show_decodes_op_record(database_url, dead_letters):
    completed = run_cli("dead-letters", "show", str(dead_letters["op"]), "--database-url", database_url)
    shown = json.loads(completed.stdout)
    assert shown["decoded"]["record"]["$type"] == "app.bsky.feed.post"
    assert shown["path"].startswith("app.bsky.feed.post/")


def test_show_truncated_frame_gives_invalid(database_url, dead_letters):
    completed = run_cli("dead-letters", "show", str(dead_letters["truncated"]), "--database-url", database_url)
    assert json.loads(completed.stdout)["decoded"]["kind"] == "Invalid"


def test_show_missing_id_fails(database_url, dead_letters):
    completed = run_cli("dead-letters", "show", "999999", "--database-url", database_url)
    assert completed.returncode == 2
    assert "dead letter 999999 not found" in completed.stderr


def test_list_counts_by_reason(database_url, dead_letters):
    completed = run_cli("dead-letters", "list", "--json", "--database-url", database_url)
    listed = json.loads(completed.stdout)
    counts = {entry["reason"]: entry["count"] for entry in listed["counts"]}
    assert counts == {"invalid_body": 1, "invalid_frame": 1, "invalid_record": 1, "oversized_frame": 1}
    assert [row["id"] for row in listed["dead_letters"]] == [dead_letters[kind] for kind in
                                                             ("frame", "truncated", "op", "oversized")]


def test_list_one_reason_text(database_url, dead_letters):
    completed = run_cli("dead-letters", "list", "--reason", "invalid_record", "--database-url", database_url)
    assert completed.returncode == 0, completed.stderr
    assert f"#{dead_letters['op']} " in completed.stdout
    assert f"#{dead_letters['frame']} " not in completed.stdout
