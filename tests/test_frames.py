"""Frame decoding: real relay frames checked against Jetstream, and broken frames built here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import libipld
import pytest
from fixture_data import JETSTREAM_CORPUS, PROTORUNE_FRAMES, fixture_path, read_length_prefixed
from frame_builder import (
    build_car,
    build_frame,
    cid_for,
    commit_body,
    commit_frame,
    error_frame,
    label,
    message_frame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.errors import DecodeError
from indexer.events import (
    Account,
    Commit,
    DropReason,
    ErrorFrame,
    Header,
    Identity,
    Info,
    Invalid,
    Labels,
    Skipped,
    SkipReason,
    Sync,
)
from indexer.frames import decode_header, decode_label_frame, decode_repo_frame, message_position, split_path
from indexer.jsonform import to_json

DID = "did:plc:testauthor"
REV = "3kabcdefghi2a"
POST = {"$type": "app.bsky.feed.post", "text": "hello", "createdAt": "2026-01-01T00:00:00Z"}
LIKE = {"$type": "app.bsky.feed.like", "createdAt": "2026-01-01T00:00:00Z"}


def corpus_frames() -> list[bytes]:
    return read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))


def expected_jetstream_lines() -> list[dict]:
    path = fixture_path(f"{JETSTREAM_CORPUS}/expected_jetstream_v1.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def invalid_utf8_record() -> bytes:
    """A post block whose text is the bytes b"ab\\xffd": well-formed CBOR, invalid UTF-8."""
    block = libipld.encode_dag_cbor({**POST, "text": "abcd"})
    return block.replace(b"\x64abcd", b"\x64ab\xffd")


def decode_commit(frame: bytes) -> Commit:
    event = decode_repo_frame(frame)
    assert isinstance(event, Commit), event
    return event


# --- real frames ---------------------------------------------------------------------------------


def test_corpus_frames_all_decode() -> None:
    events = [decode_repo_frame(frame) for frame in corpus_frames()]
    kinds = Counter(type(event).__name__ for event in events)
    assert len(events) == 112
    assert kinds == {"Commit": 110, "Identity": 1, "Account": 1}


def test_corpus_op_counts() -> None:
    commits = [event for event in map(decode_repo_frame, corpus_frames()) if isinstance(event, Commit)]
    counts = Counter((op.action, op.collection) for commit in commits for op in commit.ops)
    assert counts[("create", "app.bsky.feed.like")] == 78
    assert counts[("create", "app.bsky.feed.post")] == 14
    assert counts[("create", "app.bsky.feed.repost")] == 11
    assert counts[("create", "app.bsky.graph.follow")] == 4
    assert counts[("create", "app.bsky.graph.block")] == 1
    assert counts[("delete", "app.bsky.graph.follow")] == 2
    assert counts[("delete", "app.bsky.feed.post")] == 1
    assert counts[("update", "app.bsky.actor.status")] == 1
    assert sum(counts.values()) == 112
    assert all(op.error is None for commit in commits for op in commit.ops)
    assert all(commit.prev_data is not None for commit in commits)


def test_corpus_matches_jetstream() -> None:
    commits: dict[tuple[str, str], Commit] = {}
    by_seq = {}
    for event in map(decode_repo_frame, corpus_frames()):
        if isinstance(event, Commit):
            commits[(event.did, event.rev)] = event
        else:
            by_seq[event.seq] = event

    compared = 0
    for line in expected_jetstream_lines():
        if line["kind"] == "commit":
            expected = line["commit"]
            commit = commits[(line["did"], expected["rev"])]
            (op,) = [op for op in commit.ops if (op.collection, op.rkey) == (expected["collection"], expected["rkey"])]
            assert op.action == expected["operation"]
            assert op.cid == expected.get("cid")
            if "record" in expected:
                assert to_json(op.record, block=op.record_bytes).value == expected["record"]
            else:
                assert op.record is None
        else:
            expected = line[line["kind"]]
            event = by_seq[expected["seq"]]
            assert isinstance(event, Identity if line["kind"] == "identity" else Account)
            assert event.did == expected["did"]
            assert event.time == expected["time"]
            if line["kind"] == "account":
                assert event.active is expected["active"]
        compared += 1
    assert compared == 114


def test_protorune_frames_decode() -> None:
    paths = sorted(Path(fixture_path(PROTORUNE_FRAMES)).glob("*.bin"))
    events = {path.name: decode_repo_frame(path.read_bytes()) for path in paths}
    assert len(events) == 12
    assert sum(isinstance(event, Commit) for event in events.values()) == 11
    identity = events["frame_identity.bin"]
    assert isinstance(identity, Identity)
    assert identity.handle is None
    delete = events["frame_delete.bin"]
    assert isinstance(delete, Commit)
    assert delete.ops[0].action == "delete"
    assert delete.ops[0].prev is not None
    post = events["frame_00.bin"]
    assert isinstance(post, Commit)
    assert post.ops[0].record is not None
    assert post.ops[0].record["embed"]


def test_corpus_frame_fields() -> None:
    commit = decode_commit(corpus_frames()[0])
    assert commit.seq == 31527015360
    assert commit.did == "did:plc:sywusqblkah4nyoqxelzvr5o"
    assert commit.since == "3mptbxqsntf2n"
    assert commit.commit_cid.startswith("bafyrei")
    assert commit.blocks
    assert commit.ops[0].record_bytes is not None
    assert commit.too_big is False


def test_corpus_cids_verify() -> None:
    for frame in corpus_frames():
        event = decode_repo_frame(frame, verify_cids=True)
        assert all(op.error is None for op in getattr(event, "ops", []))


# --- frames that do not decode -------------------------------------------------------------------


def test_truncated_frames_never_raise() -> None:
    frame = corpus_frames()[0]
    for length in range(len(frame)):
        event = decode_repo_frame(frame[:length])
        assert isinstance(event, Invalid), length
        assert event.raw == frame[:length]


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_corrupted_frames_never_raise(position: int, value: int) -> None:
    frame = bytearray(commit_frame(7, DID, REV, [("create", "app.bsky.feed.post/3kabc", POST)]))
    frame[position % len(frame)] = value
    decode_repo_frame(bytes(frame))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    decode_repo_frame(data)
    decode_label_frame(data)


def test_header_without_body_is_invalid() -> None:
    event = decode_repo_frame(build_frame({"t": "#commit", "op": 1}, None))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_FRAME
    assert "no body" in event.error
    assert event.t == "#commit"


def test_trailing_bytes_are_invalid() -> None:
    frame = commit_frame(42, DID, REV, [("create", "app.bsky.feed.post/3kabc", POST)]) + b"\x00\x01"
    event = decode_repo_frame(frame)
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_FRAME
    assert "2 trailing bytes" in event.error
    assert event.seq == 42
    assert event.did == DID


def test_garbage_header_is_invalid() -> None:
    event = decode_repo_frame(b"\xff\xfe")
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_FRAME
    assert event.seq is None


def test_header_op_must_be_integer() -> None:
    event = decode_repo_frame(build_frame({"t": "#commit", "op": "1"}, {"seq": 1}))
    assert isinstance(event, Invalid)
    assert "'op' must be an integer" in event.error


def test_header_with_extra_key_decodes() -> None:
    body = commit_body(5, DID, REV, [("create", "app.bsky.feed.like/3kbbb", LIKE)])
    event = decode_repo_frame(build_frame({"t": "#commit", "op": 1, "extra": True}, body))
    assert isinstance(event, Commit)
    assert event.ops[0].record == LIKE


def test_decode_header_reads_op_and_type() -> None:
    assert decode_header(commit_frame(1, DID, REV)) == Header(op=1, t="#commit")
    assert decode_header(error_frame("FutureCursor")) == Header(op=-1, t=None)


def test_decode_header_raises_for_garbage() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_header(b"\x82\x01")
    assert caught.value.reason == DropReason.INVALID_FRAME


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("seq", "abc", "str 'abc'"),
        ("seq", 1.5, "float 1.5"),
        ("seq", True, "bool True"),
        ("repo", 5, "int 5"),
        ("rev", None, "missing required field 'rev'"),
        ("ops", {"action": "create"}, "must be an array"),
        ("tooBig", 1, "must be a boolean"),
        ("commit", "bafyreib", "must be a CID link"),
        ("commit", b"\x01\x02", "must be a CID link"),
        ("since", 3, "must be a string"),
        ("blocks", "not bytes", "must be a byte string"),
    ],
)
def test_commit_wrong_field_types(field: str, value: object, shown: str) -> None:
    body = commit_body(9, DID, REV, [("create", "app.bsky.feed.like/3kabc", LIKE)])
    body[field] = value
    event = decode_repo_frame(message_frame("#commit", body))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_BODY
    assert shown in event.error
    assert f"'{field}'" in event.error


def test_long_bad_value_is_truncated() -> None:
    body = commit_body(9, DID, REV)
    body["rev"] = ["x" * 1000]
    event = decode_repo_frame(message_frame("#commit", body))
    assert isinstance(event, Invalid)
    assert len(event.error) < 200
    assert event.error.endswith("...")


def test_invalid_body_keeps_seq_and_did() -> None:
    body = commit_body(77, DID, REV)
    body["ops"] = "nope"
    event = decode_repo_frame(message_frame("#commit", body))
    assert isinstance(event, Invalid)
    assert event.seq == 77
    assert event.did == DID
    assert event.t == "#commit"


@pytest.mark.parametrize(
    ("op", "shown"),
    [
        ({"action": 1, "path": "a.b.c/x", "cid": None}, "'action' must be a string"),
        ({"action": "frobnicate", "path": "a.b.c/x", "cid": None}, "must be create, update or delete"),
        ({"action": "create", "path": "a.b.c/x", "cid": None}, "create without a 'cid'"),
        ("not a map", "ops[0] must be a map"),
    ],
)
def test_malformed_op_is_invalid_body(op: object, shown: str) -> None:
    body = commit_body(9, DID, REV)
    body["ops"] = [op]
    event = decode_repo_frame(message_frame("#commit", body))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_BODY
    assert shown in event.error


# --- commits with broken parts -------------------------------------------------------------------


def test_invalid_utf8_fails_only_its_op() -> None:
    ops = [
        ("create", "app.bsky.feed.post/3kaaa", POST),
        ("create", "app.bsky.feed.post/3kbbb", invalid_utf8_record()),
        ("create", "app.bsky.feed.post/3kccc", {**POST, "text": "third"}),
    ]
    commit = decode_commit(commit_frame(5, DID, REV, ops))
    first, middle, last = commit.ops
    assert first.record == POST
    assert last.record is not None
    assert last.record["text"] == "third"
    assert middle.record is None
    assert middle.error is not None
    assert middle.error.reason == DropReason.INVALID_RECORD
    assert "3kbbb" in middle.error.message
    assert middle.record_bytes == invalid_utf8_record()


def test_missing_block_fails_only_its_op() -> None:
    ops = [("create", "app.bsky.feed.post/3kaaa", POST), ("create", "app.bsky.feed.like/3kbbb", LIKE)]
    commit = decode_commit(commit_frame(5, DID, REV, ops, omit_blocks_for=["app.bsky.feed.like/3kbbb"]))
    post, like = commit.ops
    assert post.record == POST
    assert like.error is not None
    assert like.error.reason == DropReason.MISSING_BLOCK
    assert like.cid == libipld.encode_cid(cid_for(libipld.encode_dag_cbor(LIKE)))
    assert like.record_bytes is None


@pytest.mark.parametrize(
    ("block", "shown"),
    [
        (b"\xa1\x61a\xf7", "not valid DAG-CBOR"),  # {"a": undefined}
        (b"\xa1\x61a\xc1\x01", "Non-42 tags"),  # {"a": tag 1 (epoch time)}
        (b"\xa1\x61a", "not valid DAG-CBOR"),  # map cut short
        (libipld.encode_dag_cbor(["a", "list"]), "must be a map"),
        (libipld.encode_dag_cbor(POST) + b"\x00", "not valid DAG-CBOR"),  # trailing byte
        (b"\x81" * 100_000 + b"\x00", "not valid DAG-CBOR"),  # nested deeper than the recursion limit
    ],
    ids=["undefined", "tag", "truncated", "list", "trailing", "deep"],
)
def test_bad_record_is_invalid_record(block: bytes, shown: str) -> None:
    ops = [("create", "app.bsky.feed.post/3kaaa", block), ("create", "app.bsky.feed.like/3kbbb", LIKE)]
    commit = decode_commit(commit_frame(5, DID, REV, ops))
    bad, good = commit.ops
    assert bad.error is not None
    assert bad.error.reason == DropReason.INVALID_RECORD
    assert shown in bad.error.message
    assert bad.record is None
    assert good.record == LIKE


def test_empty_blocks_give_missing_blocks() -> None:
    ops = [("create", "app.bsky.feed.post/3kaaa", POST), ("delete", "app.bsky.feed.like/3kbbb", None)]
    commit = decode_commit(commit_frame(5, DID, REV, ops, include_blocks=False))
    create, delete = commit.ops
    assert create.error is not None
    assert create.error.reason == DropReason.MISSING_BLOCK
    assert delete.error is None
    assert commit.blocks == b""


@pytest.mark.parametrize("blocks", [b"\x00", b"\x01", b"\xa1"], ids=repr)
def test_one_byte_blocks_are_invalid_car(blocks: bytes) -> None:
    body = commit_body(31, DID, REV, [("create", "app.bsky.feed.post/3kaaa", POST)])
    body["blocks"] = blocks
    event = decode_repo_frame(message_frame("#commit", body))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_CAR
    assert event.seq == 31
    assert event.did == DID


def test_car_cut_mid_block_is_invalid_car() -> None:
    body = commit_body(32, DID, REV, [("create", "app.bsky.feed.post/3kaaa", POST)])
    body["blocks"] = body["blocks"][:-3]
    event = decode_repo_frame(message_frame("#commit", body))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_CAR
    assert "truncated" in event.error
    assert event.seq == 32


def test_too_big_without_blocks() -> None:
    ops = [("create", "app.bsky.feed.post/3kaaa", POST), ("delete", "app.bsky.feed.like/3kbbb", None)]
    body = commit_body(5, DID, REV, ops, too_big=True)
    del body["blocks"]
    commit = decode_commit(message_frame("#commit", body))
    create, delete = commit.ops
    assert commit.too_big is True
    assert create.error is not None
    assert create.error.reason == DropReason.TOO_BIG
    assert create.cid is not None
    assert delete.error is None


@pytest.mark.parametrize(
    "path",
    ["no-slash", "app.bsky.feed.post/", "/3kaaa", "app.bsky.feed.post/a b", "notansid/3kaaa", "a.b.c/x/y", "a.b.c/.."],
)
def test_bad_path_fails_only_its_op(path: str) -> None:
    ops = [("create", path, POST), ("create", "app.bsky.feed.like/3kbbb", LIKE)]
    commit = decode_commit(commit_frame(5, DID, REV, ops))
    bad, good = commit.ops
    assert bad.error is not None
    assert bad.error.reason == DropReason.INVALID_PATH
    assert bad.record == POST
    assert good.error is None


def test_bad_path_keeps_best_effort_halves() -> None:
    commit = decode_commit(commit_frame(5, DID, REV, [("create", "a.b.c/x/y", POST)]))
    assert commit.ops[0].collection == "a.b.c"
    assert commit.ops[0].rkey == "x/y"


def test_split_path_best_effort() -> None:
    assert split_path("app.bsky.feed.post/3kaaa") == ("app.bsky.feed.post", "3kaaa", None)
    assert split_path("no-slash")[:2] == ("no-slash", "")
    assert split_path("a.b.c/x/y")[:2] == ("a.b.c", "x/y")


def test_cid_mismatch_with_verification() -> None:
    block = libipld.encode_dag_cbor(POST)
    forged = libipld.encode_dag_cbor({**POST, "text": "forged"})
    body = commit_body(5, DID, REV, [("create", "app.bsky.feed.post/3kaaa", POST)])
    body["blocks"] = build_car([body["commit"]], [(cid_for(block), forged)])
    unverified = decode_commit(message_frame("#commit", body))
    verified = decode_repo_frame(message_frame("#commit", body), verify_cids=True)
    assert unverified.ops[0].record is not None
    assert unverified.ops[0].record["text"] == "forged"
    assert isinstance(verified, Commit)
    assert verified.ops[0].error is not None
    assert verified.ops[0].error.reason == DropReason.CID_MISMATCH


# --- other message types -------------------------------------------------------------------------


def test_account_unknown_status_kept() -> None:
    body = {"seq": 3, "did": DID, "time": "2026-01-01T00:00:00Z", "active": False, "status": "throttled"}
    event = decode_repo_frame(message_frame("#account", body))
    assert event == Account(seq=3, did=DID, time="2026-01-01T00:00:00Z", active=False, status="throttled")


def test_account_active_must_be_bool() -> None:
    body = {"seq": 3, "did": DID, "time": "2026-01-01T00:00:00Z", "active": 1}
    event = decode_repo_frame(message_frame("#account", body))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_BODY
    assert "'active' must be a boolean, got int 1" in event.error
    assert event.did == DID


def test_identity_with_handle() -> None:
    body = {"seq": 4, "did": DID, "time": "2026-01-01T00:00:00Z", "handle": "alice.test"}
    event = decode_repo_frame(message_frame("#identity", body))
    assert event == Identity(seq=4, did=DID, time="2026-01-01T00:00:00Z", handle="alice.test")


def test_sync_keeps_blocks() -> None:
    body = {"seq": 6, "did": DID, "rev": REV, "time": "2026-01-01T00:00:00Z", "blocks": b"car bytes"}
    event = decode_repo_frame(message_frame("#sync", body))
    assert event == Sync(seq=6, did=DID, rev=REV, time="2026-01-01T00:00:00Z", blocks=b"car bytes")


def test_info_frame() -> None:
    event = decode_repo_frame(message_frame("#info", {"name": "OutdatedCursor", "message": "too old"}))
    assert event == Info(name="OutdatedCursor", message="too old")


def test_error_frame() -> None:
    event = decode_repo_frame(error_frame("FutureCursor", "Cursor in the future."))
    assert event == ErrorFrame(error="FutureCursor", message="Cursor in the future.")


def test_error_frame_without_error_is_invalid() -> None:
    event = decode_repo_frame(build_frame({"op": -1}, {"message": "x"}))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_BODY


def test_unknown_type_skipped_with_seq() -> None:
    event = decode_repo_frame(message_frame("#brandnew", {"seq": 11}))
    assert event == Skipped(SkipReason.UNKNOWN_TYPE, "#brandnew", 11)


@pytest.mark.parametrize("t", ["#handle", "#migrate", "#tombstone"])
def test_legacy_type_skipped_with_seq(t: str) -> None:
    event = decode_repo_frame(message_frame(t, {"seq": 12, "did": DID}))
    assert event == Skipped(SkipReason.LEGACY_TYPE, t, 12)


def test_legacy_type_with_broken_body() -> None:
    event = decode_repo_frame(message_frame("#handle", b"\xff"))
    assert event == Skipped(SkipReason.LEGACY_TYPE, "#handle", None)


def test_unknown_op_skipped() -> None:
    event = decode_repo_frame(build_frame({"t": "#commit", "op": 2}, {"seq": 1}))
    assert event == Skipped(SkipReason.UNKNOWN_OP, "#commit")


def test_filtered_type_body_not_decoded() -> None:
    frame = message_frame("#identity", b"\xff garbage that is never read")
    event = decode_repo_frame(frame, wanted=lambda t: t != "#identity")
    assert event == Skipped(SkipReason.FILTERED, "#identity")


def test_wanted_type_is_decoded() -> None:
    frame = commit_frame(5, DID, REV, [("create", "app.bsky.feed.like/3kbbb", LIKE)])
    assert isinstance(decode_repo_frame(frame, wanted=lambda t: t == "#commit"), Commit)


# --- label stream --------------------------------------------------------------------------------


def test_labels_frame_decodes() -> None:
    labels = [label(sig=b"\x01" * 64, cid="bafyreib"), label(val="!hide", neg=True, exp="2027-01-01T00:00:00Z")]
    event = decode_label_frame(message_frame("#labels", {"seq": 8, "labels": labels}))
    assert isinstance(event, Labels)
    first, second = event.labels
    assert event.seq == 8
    assert first.neg is False
    assert first.sig == b"\x01" * 64
    assert first.cid == "bafyreib"
    assert first.ver == 1
    assert second.neg is True
    assert second.exp == "2027-01-01T00:00:00Z"
    assert second.sig is None


def test_labels_without_ver() -> None:
    unversioned = label()
    del unversioned["ver"]
    event = decode_label_frame(message_frame("#labels", {"seq": 8, "labels": [unversioned]}))
    assert isinstance(event, Labels)
    assert event.labels[0].ver is None


@pytest.mark.parametrize("body", [{"seq": 9}, {"seq": 9, "labels": []}], ids=["absent", "empty"])
def test_labels_frame_without_labels(body: dict) -> None:
    assert decode_label_frame(message_frame("#labels", body)) == Labels(seq=9, labels=[])


def test_malformed_label_invalidates_frame() -> None:
    labels = [label(), label(val=7)]
    event = decode_label_frame(message_frame("#labels", {"seq": 10, "labels": labels}))
    assert isinstance(event, Invalid)
    assert event.reason == DropReason.INVALID_BODY
    assert "labels[1]" in event.error
    assert "'val' must be a string, got int 7" in event.error
    assert event.seq == 10


def test_label_neg_as_int_is_invalid() -> None:
    event = decode_label_frame(message_frame("#labels", {"seq": 10, "labels": [label(neg=1)]}))
    assert isinstance(event, Invalid)
    assert "'neg' must be a boolean" in event.error


def test_label_stream_info_and_unknown() -> None:
    assert decode_label_frame(message_frame("#info", {"name": "OutdatedCursor"})) == Info("OutdatedCursor")
    assert decode_label_frame(message_frame("#commit", {"seq": 3})) == Skipped(SkipReason.UNKNOWN_TYPE, "#commit", 3)


def test_label_error_frame() -> None:
    assert decode_label_frame(error_frame("ConsumerTooSlow")) == ErrorFrame("ConsumerTooSlow")


def test_truncated_header_error_states_frame_size():
    # Regression (newcomer walkthrough): a 17-byte frame was said to end "at byte 24".
    frame = b"\xa2\x61t\x78\x20" + b"x" * 12  # a text string declaring 32 bytes, 12 present
    with pytest.raises(DecodeError, match="frame of 17 bytes ends inside a CBOR item"):
        decode_header(frame)


def test_message_position_reads_type_seq_and_did():
    frame = commit_frame(7, "did:plc:position", "3kaaaaaaaaaaa", [])

    assert message_position(frame) == ("#commit", 7, "did:plc:position")


def test_message_position_of_garbage_is_unknown():
    assert message_position(b"\xff\x00garbage") == (None, None, None)
