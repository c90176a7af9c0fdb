"""Record mapping: real records to typed rows, bad shapes, U+0000, createdAt parsing and bounds."""

from __future__ import annotations

import copy
import functools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import libipld
import psycopg
import pytest
from fixture_data import JETSTREAM_CORPUS, PROTORUNE_FRAMES, fixture_path, read_length_prefixed
from frame_builder import commit_frame
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import JSONB

from indexer import schema
from indexer.frames import decode_repo_frame
from indexer.records import (
    RecordRow,
    parse_datetime,
    record_columns,
    row_for_record,
)
from indexer.store import Batch

# The corpus commit times are 2026-07-04 around 14:38 UTC.
CORPUS_NOW = datetime(2026, 7, 4, 14, 38, 8, tzinfo=UTC)
JETSTREAM_REPO = "repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd"
JETSTREAM_REPO_DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"
JETSTREAM_REPO_REV = "3migo7fijwi2k"
LITTLE_REPO = "repos/repostream_little.car"
STAGING_REPO = "repos/indigo_paul_staging.repo.car"
LEGACY_AVATAR_CID = "bafkreib5l3g4gs4lb33xiz4gbb5wem3zy2e6pjix2j4znykt2zpookfhye"  # from STAGING_REPO

# A record of the tests' own making, and the row arguments used with records whose repo and
# commit do not matter. Cached fixture records are shared, so tests copy them before changing them.
BUILT_POST = {
    "$type": "app.bsky.feed.post",
    "text": "hello",
    "langs": ["en", "de"],
    "labels": {
        "$type": "com.atproto.label.defs#selfLabels",
        "values": [{"val": "nudity"}, {"val": "graphic-media"}],
    },
    "tags": ["one", "two"],
    "createdAt": "2026-07-04T14:38:06.055Z",
}
BUILT_ARGS = ("did:plc:testauthor", "3mptbyo7dms2m", "bafyreib2rxk3rh6kzwq", "3mptbypqszz2h", 1)


# Fixture loading --------------------------------------------------------------------------------


@functools.cache
def corpus_ops() -> list[dict]:
    """Every create/update op of the jetstream corpus with its record, block and commit fields."""
    ops = []
    for frame in read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin")):
        header, body = libipld.decode_dag_cbor_multi(frame)
        if header.get("t") != "#commit":
            continue
        _, blocks = libipld.decode_car(body["blocks"])
        for op in body["ops"]:
            if op["action"] not in ("create", "update"):
                continue
            collection, rkey = op["path"].split("/")
            ops.append(
                {
                    "collection": collection,
                    "did": body["repo"],
                    "rkey": rkey,
                    "cid": libipld.encode_cid(op["cid"]),
                    "rev": body["rev"],
                    "seq": body["seq"],
                    "record": blocks[op["cid"]],
                    "block": libipld.encode_dag_cbor(blocks[op["cid"]]),
                }
            )
    return ops


def corpus_row(op: dict, **options) -> RecordRow:
    return row_for_record(
        op["collection"], op["did"], op["rkey"], op["cid"], op["rev"], op["seq"], op["record"], **options
    )


def expected_jetstream_records() -> dict[tuple[str, str, str], dict]:
    """Jetstream's JSON of each corpus record, keyed by (did, collection, rkey)."""
    expected = {}
    path = fixture_path(f"{JETSTREAM_CORPUS}/expected_jetstream_v1.jsonl")
    for line in path.read_text().splitlines():
        event = json.loads(line)
        commit = event.get("commit")
        if commit and "record" in commit:
            expected[(event["did"], commit["collection"], commit["rkey"])] = commit["record"]
    return expected


def find_corpus_op(predicate) -> dict:
    for op in corpus_ops():
        if predicate(op):
            return op
    raise AssertionError("no corpus op matches")


@functools.cache
def repo_records(relative: str) -> dict[str, dict]:
    """Records of a repo CAR keyed by CID string (every block with a $type)."""
    _, blocks = libipld.decode_car(fixture_path(relative).read_bytes())
    return {
        libipld.encode_cid(cid): block
        for cid, block in blocks.items()
        if isinstance(block, dict) and isinstance(block.get("$type"), str)
    }


def protorune_post() -> tuple[dict, dict]:
    """The commit body and the post record of protorune frame_00 (recordWithMedia, external thumb)."""
    header, body = libipld.decode_dag_cbor_multi(fixture_path(f"{PROTORUNE_FRAMES}/frame_00.bin").read_bytes())
    _, blocks = libipld.decode_car(body["blocks"])
    return body, blocks[body["ops"][0]["cid"]]


def datetime_vectors(name: str) -> list[str]:
    """Lines of an interop datetime vector file, without comments and blank lines (spaces kept)."""
    path = fixture_path(f"interop-tests/syntax/datetime_syntax_{name}.txt")
    lines = Path(path).read_text().split("\n")
    return [line for line in lines if line and not line.startswith("#")]


def all_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in [key, *all_strings(item)]]
    if isinstance(value, list):
        return [text for item in value for text in all_strings(item)]
    return []


# parse_datetime ---------------------------------------------------------------------------------

WIDE_BOUNDS = {"earliest": datetime(1, 1, 1, tzinfo=UTC), "now": datetime(3500, 1, 1, tzinfo=UTC)}


def test_interop_valid_datetimes_parse() -> None:
    for raw in datetime_vectors("valid"):
        if raw.startswith("0000-"):
            continue  # Python's datetime has no year 0
        assert parse_datetime(raw, **WIDE_BOUNDS) is not None, raw


def test_interop_year_zero_is_none() -> None:
    assert parse_datetime("0000-01-01T00:00:00.000Z", **WIDE_BOUNDS) is None


def test_interop_invalid_datetimes_are_none() -> None:
    for raw in datetime_vectors("invalid"):
        assert parse_datetime(raw, **WIDE_BOUNDS) is None, repr(raw)


def test_default_bounds_drop_implausible_vectors() -> None:
    dropped = [raw for raw in datetime_vectors("valid") if parse_datetime(raw, now=CORPUS_NOW) is None]
    assert dropped == [
        "0985-04-12T23:20:50.123-07:00",
        "0123-01-01T00:00:00.000Z",
        "0000-01-01T00:00:00.000Z",
        "0001-01-01T00:00:00.000Z",
        "0010-12-31T23:00:00.000Z",
        "1000-12-31T23:00:00.000Z",
        "1900-12-31T23:00:00.000Z",
        "3001-12-31T23:00:00.000Z",
    ]


def test_datetime_offsets_convert_to_utc() -> None:
    assert parse_datetime("1985-04-12T23:20:50.123+01:45", now=CORPUS_NOW) == datetime(
        1985, 4, 12, 21, 35, 50, 123000, tzinfo=UTC
    )
    assert parse_datetime("2026-07-04T23:38:06+09:00", now=CORPUS_NOW) == datetime(
        2026, 7, 4, 14, 38, 6, tzinfo=UTC
    )


def test_datetime_result_is_utc() -> None:
    parsed = parse_datetime("2026-07-04T07:38:06-07:00", now=CORPUS_NOW)
    assert parsed.tzinfo is UTC


def test_datetime_nanoseconds_truncate_to_microseconds() -> None:
    parsed = parse_datetime("2026-07-04T14:38:06.123456789Z", now=CORPUS_NOW)
    assert parsed == datetime(2026, 7, 4, 14, 38, 6, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "garbage",
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00.000Z",
        "2026-07-04T14:38:06",  # no timezone
        "2026-07-04T14:38:06.123",  # no timezone
        "2026-07-04",
        "2036-07-04T14:38:06Z",  # ten years ahead
        "2026-07-04T14:38:06-00:00",  # RFC 3339 "unknown offset", invalid in atproto
        "2026-07-04t14:38:06Z",
        "2026-07-04T14:38:06z",
        "2026-07-04 14:38:06Z",
        "2016-12-31T23:59:60Z",  # leap second: not representable
        "2026-02-30T00:00:00Z",
        "2026-07-04T14:38:06+24:00",
        "2026-07-04T14:38:06." + "1" * 60 + "Z",  # longer than 64 characters
        "\uff12\uff10\uff12\uff16-07-04T14:38:06Z",  # full-width digits
        "1969-12-31T23:59:59Z",
    ],
)
def test_odd_created_at_is_none(raw: str) -> None:
    assert parse_datetime(raw, now=CORPUS_NOW) is None


@pytest.mark.parametrize(
    "raw", [None, 1783175888, 1783175888.5, b"2026-07-04T14:38:06Z", ["2026-07-04T14:38:06Z"]]
)
def test_non_string_datetime_is_none(raw) -> None:
    assert parse_datetime(raw, now=CORPUS_NOW) is None


def test_datetime_bounds_are_inclusive() -> None:
    assert parse_datetime("1970-01-01T00:00:00Z", now=CORPUS_NOW) == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_datetime("2026-07-05T14:38:08Z", now=CORPUS_NOW) == CORPUS_NOW + timedelta(days=1)
    assert parse_datetime("2026-07-05T14:38:08.000001Z", now=CORPUS_NOW) is None


# record_columns ---------------------------------------------------------------------------------


def test_record_columns_skip_generated_ones() -> None:
    for table in (*schema.RECORD_TABLES.values(), schema.records):
        columns = record_columns(table)
        assert "uri" not in columns, table.name
        assert "indexed_at" not in columns, table.name


def test_record_columns_follow_table_order() -> None:
    assert record_columns(schema.likes) == (
        "did", "rkey", "cid", "rev", "seq", "created_at_raw", "created_at", "record",
        "subject_uri", "subject_cid", "via_uri", "via_cid", "verified", "verify_reason",
    )  # fmt: skip
    assert record_columns(schema.records)[:3] == ("did", "collection", "rkey")


def test_record_columns_reject_other_tables() -> None:
    with pytest.raises(ValueError, match="cursors"):
        record_columns(schema.cursors)


def test_row_values_match_record_columns() -> None:
    for op in corpus_ops():
        row = corpus_row(op)
        assert set(row.values) == set(record_columns(row.table)), op["collection"]


def test_column_values_follow_record_columns() -> None:
    op = find_corpus_op(lambda op: op["collection"] == "app.bsky.graph.follow")
    row = corpus_row(op)
    assert row.column_values() == tuple(row.values[name] for name in record_columns(row.table))


# Real records -----------------------------------------------------------------------------------


def test_corpus_records_match_jetstream_json() -> None:
    expected = expected_jetstream_records()
    for op in corpus_ops():
        row = corpus_row(op)
        assert row.values["record"] == expected[(op["did"], op["collection"], op["rkey"])], op["rkey"]


def test_corpus_collections_pick_tables() -> None:
    tables = {op["collection"]: corpus_row(op).table.name for op in corpus_ops()}
    assert tables == {
        "app.bsky.feed.like": "likes",
        "app.bsky.feed.post": "posts",
        "app.bsky.feed.repost": "reposts",
        "app.bsky.graph.follow": "follows",
        "app.bsky.graph.block": "blocks",
        "app.bsky.actor.status": "records",
    }


def test_corpus_created_at_all_parse() -> None:
    for op in corpus_ops():
        row = corpus_row(op)
        assert row.values["created_at"] == parse_datetime(row.values["created_at_raw"], now=CORPUS_NOW), op["rkey"]
        assert row.values["created_at"] is not None, op["rkey"]


def test_common_columns_come_from_arguments() -> None:
    op = find_corpus_op(lambda op: op["collection"] == "app.bsky.feed.like")
    row = corpus_row(op)
    assert row.values["did"] == op["did"]
    assert row.values["rkey"] == op["rkey"]
    assert row.values["cid"] == op["cid"]
    assert row.values["rev"] == op["rev"]
    assert row.values["seq"] == op["seq"]
    assert row.nul_stripped is False


def test_like_with_via_maps_refs() -> None:
    op = find_corpus_op(lambda op: op["rkey"] == "3mptbypquak2d")
    row = corpus_row(op)
    assert row.table is schema.likes
    assert row.values["subject_uri"] == "at://did:plc:3kmrlmaubi4w7n6545bhthiq/app.bsky.feed.post/3mpstmgu3z22k"
    assert row.values["subject_cid"] == "bafyreiahn4azpmgodritbsn5g7val5qlkko4trzhah7kbabokhn6b74eeu"
    assert row.values["via_uri"] == "at://did:plc:cxrt7ggxkamgzxa47cggtees/app.bsky.feed.repost/3mpsuofitly2x"
    assert row.values["via_cid"] == "bafyreialdmrbhy3rj74zzbdlgrzrabhhz7xb5jyxtm2urrtwebdsnawioe"
    assert row.values["created_at_raw"] == "2026-07-04T14:38:06.911Z"
    assert row.values["created_at"] == datetime(2026, 7, 4, 14, 38, 6, 911000, tzinfo=UTC)


def test_repost_without_via_maps_null() -> None:
    op = find_corpus_op(lambda op: op["rkey"] == "3mptbyprlgg2n")
    row = corpus_row(op)
    assert row.table is schema.reposts
    assert row.values["subject_uri"] == "at://did:plc:nx7znvoex7ev3wcxn3tipovm/app.bsky.feed.post/3mpt2nhmowc2o"
    assert row.values["subject_cid"] == "bafyreihnhdhms42ljdptfrc3oogepackd4jxspjd6phjbmt2oj5aioulqm"
    assert row.values["via_uri"] is None
    assert row.values["via_cid"] is None


def test_follow_and_block_map_subject() -> None:
    follow = corpus_row(find_corpus_op(lambda op: op["rkey"] == "3mptbypqtrq2j"))
    block = corpus_row(find_corpus_op(lambda op: op["rkey"] == "3mptbypkpqx2g"))
    assert follow.table is schema.follows
    assert follow.values["subject_did"] == "did:plc:d3jcihv6guhsifx6jvi5rexc"
    assert block.table is schema.blocks
    assert block.values["subject_did"] == "did:plc:wmv3rxaywejtjg4kmrq7bhsy"


def test_reply_post_maps_root_and_parent() -> None:
    row = corpus_row(find_corpus_op(lambda op: op["rkey"] == "3mptbyoumc22i"))
    assert row.table is schema.posts
    assert row.values["reply_root_uri"] == "at://did:plc:u4lmvw4wwzaql3z5kcf3r7h4/app.bsky.feed.post/3mptbyospqk2i"
    assert row.values["reply_root_cid"] == "bafyreicvph75m77atsvujmsfl7yxhu7uk4bq37vv2lggwmp4rveydl7oqu"
    assert row.values["reply_parent_uri"] == "at://did:plc:u4lmvw4wwzaql3z5kcf3r7h4/app.bsky.feed.post/3mptbyou7ls2i"
    assert row.values["reply_parent_cid"] == "bafyreighmaxvkwtgrp6p6lgdobtehf2x4e4c2ru7kn7qkjc6qi5i7jqeky"
    assert row.values["langs"] == ["tr"]
    assert row.values["embed_kind"] is None
    assert row.values["quote_uri"] is None


def test_post_facets_kept_as_json() -> None:
    row = corpus_row(find_corpus_op(lambda op: op["rkey"] == "3mptbypfywk2v"))
    assert row.values["facets"][0] == {
        "features": [{"$type": "app.bsky.richtext.facet#tag", "tag": "HowToTellAiToShutUp"}],
        "index": {"byteEnd": 20, "byteStart": 0},
    }
    assert row.values["text"].startswith("#HowToTellAiToShutUp!")
    assert row.values["langs"] == ["de"]
    assert row.values["tags"] is None
    assert row.values["self_labels"] is None


def test_external_embed_keeps_thumb_link() -> None:
    row = corpus_row(find_corpus_op(lambda op: op["rkey"] == "3mptbyoigog2b"))
    assert row.values["embed_kind"] == "external"
    assert row.values["embed"]["external"]["thumb"]["ref"] == {
        "$link": "bafkreibm4roabrh67skixyd36zjntgnnbz72nspgrlocnf23ehi2qegjdi"
    }
    assert row.values["created_at"] == datetime(2026, 7, 4, 14, 38, 2, tzinfo=UTC)


def test_images_embed_kind() -> None:
    row = corpus_row(find_corpus_op(lambda op: op["rkey"] == "3mptbxs3hq22j"))
    assert row.values["embed_kind"] == "images"
    assert row.values["embed"]["images"][0]["image"]["ref"] == {
        "$link": "bafkreicwsq23gkygrgpijv7ocssxdyjokfv3quss3f2dg4csds3jpeqkwe"
    }


def test_record_with_media_maps_quote() -> None:
    body, record = protorune_post()
    op = body["ops"][0]
    collection, rkey = op["path"].split("/")
    cid = libipld.encode_cid(op["cid"])
    row = row_for_record(collection, body["repo"], rkey, cid, body["rev"], body["seq"], record)
    assert row.table is schema.posts
    assert row.values["embed_kind"] == "recordWithMedia"
    assert row.values["quote_uri"] == "at://did:plc:4llrhdclvdlmmynkwsmg5tdc/app.bsky.feed.post/3msqlva64k42v"
    assert row.values["quote_cid"] == "bafyreigxdqmh7bofhyhnh5smzsawh7cs2uqp6xencwnomtadyds4fsqopq"
    assert row.values["embed"]["media"]["external"]["thumb"]["ref"] == {
        "$link": "bafkreiaz3vtpicfmgs5x2oq6wacu2kqypl4xf7am2fl4wpjjarxdpilva4"
    }
    assert row.values["text"] == "They use the same hair products"
    assert row.values["created_at"] == datetime(2026, 8, 10, 19, 20, 48, 199000, tzinfo=UTC)


def test_record_embed_maps_quote() -> None:
    record = repo_records(LITTLE_REPO)["bafyreihvb6gnqhl5nx4aqieh4dhwkcewykgc5qntpgomc6trptb6bkqdx4"]
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, record)
    assert row.values["embed_kind"] == "record"
    assert row.values["quote_uri"] == record["embed"]["record"]["uri"]
    assert row.values["quote_cid"] == record["embed"]["record"]["cid"]
    assert row.values["quote_uri"].startswith("at://")


def test_video_embed_kind() -> None:
    record = repo_records(LITTLE_REPO)["bafyreihalk6ovlrtgcw4qubrnmz5pm5apgu6kn2tl2fsuginp5e2eclxbe"]
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, record)
    assert row.values["embed_kind"] == "video"
    assert row.values["quote_uri"] is None


def test_other_collection_goes_to_records() -> None:
    row = corpus_row(find_corpus_op(lambda op: op["collection"] == "app.bsky.actor.status"))
    assert row.table is schema.records
    assert row.values["collection"] == "app.bsky.actor.status"
    assert row.values["record"]["durationMinutes"] == 240
    assert row.values["created_at"] == datetime(2026, 7, 4, 14, 38, 6, 730000, tzinfo=UTC)


def test_profile_from_repo_export() -> None:
    cid = "bafyreia3zwwmogntyn7zhsr6kyzvelma2l77axbldfja6jwcqbjq5e5tj4"  # app.bsky.actor.profile/self
    record = repo_records(f"{JETSTREAM_REPO}.repo.car")[cid]
    row = row_for_record(
        "app.bsky.actor.profile", JETSTREAM_REPO_DID, "self", cid, JETSTREAM_REPO_REV, None, record
    )
    assert row.table is schema.profiles
    assert row.values["display_name"] == "               This is a handle with spaces"
    assert row.values["description"] == ""
    assert row.values["avatar_cid"] == libipld.encode_cid(record["avatar"]["ref"])
    assert row.values["avatar_cid"].startswith("bafkrei")
    assert row.values["banner_cid"] is None
    assert row.values["pinned_post_uri"] is None
    assert row.values["seq"] is None
    assert row.values["created_at"] == datetime(2025, 5, 29, 11, 49, 9, 123000, tzinfo=UTC)


def test_profile_pinned_post_maps() -> None:
    record = repo_records(LITTLE_REPO)["bafyreifvrttyw5bh6fwxa34svboseqaugsb22arpf5kummef56sqd6yuf4"]
    row = row_for_record("app.bsky.actor.profile", *BUILT_ARGS, record)
    assert row.values["pinned_post_uri"] == "at://did:plc:lulmyldiq4sb2ikags5sfb25/app.bsky.feed.post/3lxx7r7bv522r"
    assert row.values["pinned_post_cid"] == "bafyreiemcfquqw3hgi25vhagwvvz5i3k2oz6l6r4zvxaqh7n7ogrmxgofa"


def test_profile_legacy_blobs_map_cid() -> None:
    record = repo_records(STAGING_REPO)["bafyreidnvxobbfoerrt4y4bum3md2aiaambkh4alpnk4bk6mzebkdooxvu"]
    row = row_for_record("app.bsky.actor.profile", *BUILT_ARGS, record)
    assert row.values["avatar_cid"] == LEGACY_AVATAR_CID
    assert row.values["banner_cid"] == "bafkreih7yfe2jan5lirgqj2zi4l6ybpldqjjg67imoikypbynnhzypmifu"
    assert row.values["display_name"] == "Paul"
    assert row.values["created_at_raw"] is None
    assert row.values["created_at"] is None


def test_post_self_labels_and_tags() -> None:
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, BUILT_POST)
    assert row.values["self_labels"] == ["nudity", "graphic-media"]
    assert row.values["tags"] == ["one", "two"]
    assert row.values["langs"] == ["en", "de"]


def test_block_argument_gives_same_row() -> None:
    for op in corpus_ops():
        assert corpus_row(op, block=op["block"]) == corpus_row(op), op["rkey"]


# createdAt in rows ------------------------------------------------------------------------------


def test_created_at_bound_defaults_to_clock() -> None:
    current = datetime.now(UTC)
    too_far = (current + timedelta(days=2)).isoformat()
    recent = (current - timedelta(hours=1)).isoformat()
    assert post_row(dict(BUILT_POST, createdAt=too_far)).values["created_at"] is None
    assert post_row(dict(BUILT_POST, createdAt=recent)).values["created_at"] is not None


def test_created_at_bound_uses_now_argument() -> None:
    post = dict(BUILT_POST, createdAt="2026-07-06T14:38:07Z")
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, post, now=datetime(2026, 7, 6, tzinfo=UTC))
    assert row.values["created_at"] == datetime(2026, 7, 6, 14, 38, 7, tzinfo=UTC)
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, post, now=datetime(2026, 7, 4, tzinfo=UTC))
    assert row.values["created_at"] is None


@pytest.mark.parametrize(
    "raw",
    ["", "garbage", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "2026-07-04T14:38:06", "2036-07-04T14:38:06Z"],
)
def test_odd_created_at_keeps_raw(raw: str) -> None:
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, dict(BUILT_POST, createdAt=raw))
    assert row.values["created_at_raw"] == raw
    assert row.values["created_at"] is None


def test_created_at_with_offset_in_row() -> None:
    post = dict(BUILT_POST, createdAt="2026-07-04T23:38:06.123456789+09:00")
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, post)
    assert row.values["created_at"] == datetime(2026, 7, 4, 14, 38, 6, 123456, tzinfo=UTC)


@pytest.mark.parametrize("value", [1783175888, None, {"at": "2026-07-04T14:38:06Z"}, ["2026-07-04T14:38:06Z"]])
def test_non_string_created_at_maps_null(value) -> None:
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, dict(BUILT_POST, createdAt=value))
    assert row.values["created_at_raw"] is None
    assert row.values["created_at"] is None
    assert row.values["record"]["createdAt"] == value


def test_missing_created_at_maps_null() -> None:
    post = {key: value for key, value in BUILT_POST.items() if key != "createdAt"}
    row = row_for_record("app.bsky.feed.post", *BUILT_ARGS, post)
    assert row.values["created_at_raw"] is None
    assert row.values["created_at"] is None


# Bad shapes -------------------------------------------------------------------------------------


def real_post() -> dict:
    """A real reply post from the corpus, copied so a test can break it."""
    return copy.deepcopy(find_corpus_op(lambda op: op["rkey"] == "3mptbyoumc22i")["record"])


def post_row(record) -> RecordRow:
    return row_for_record("app.bsky.feed.post", *BUILT_ARGS, record)


@pytest.mark.parametrize(
    ("field", "value", "column"),
    [
        ("text", 42, "text"),
        ("text", ["a"], "text"),
        ("langs", "en", "langs"),
        ("langs", {"en": True}, "langs"),
        ("facets", {"index": 0}, "facets"),
        ("facets", "facet", "facets"),
        ("embed", ["app.bsky.embed.images"], "embed"),
        ("embed", "app.bsky.embed.images", "embed_kind"),
        ("labels", ["nudity"], "self_labels"),
        ("labels", {"values": [{"val": "nudity"}]}, "self_labels"),  # no $type
        ("labels", {"$type": "com.atproto.label.defs#selfLabels", "values": "nudity"}, "self_labels"),
        ("tags", "one", "tags"),
        ("reply", "at://did:plc:x/app.bsky.feed.post/1", "reply_root_uri"),
        ("reply", ["root"], "reply_parent_cid"),
    ],
)
def test_wrong_typed_post_field_maps_null(field: str, value, column: str) -> None:
    record = dict(real_post(), **{field: value})
    row = post_row(record)
    assert row.values[column] is None
    assert row.values["record"][field] == value


def test_reply_without_root_keeps_parent() -> None:
    record = real_post()
    del record["reply"]["root"]
    row = post_row(record)
    assert row.values["reply_root_uri"] is None
    assert row.values["reply_root_cid"] is None
    assert row.values["reply_parent_uri"] == "at://did:plc:u4lmvw4wwzaql3z5kcf3r7h4/app.bsky.feed.post/3mptbyou7ls2i"


def test_reply_ref_fields_wrong_typed() -> None:
    record = real_post()
    record["reply"]["root"] = {"uri": 7, "cid": ["x"]}
    record["reply"]["parent"] = "at://did:plc:x/app.bsky.feed.post/1"
    row = post_row(record)
    assert row.values["reply_root_uri"] is None
    assert row.values["reply_root_cid"] is None
    assert row.values["reply_parent_uri"] is None
    assert row.values["reply_parent_cid"] is None


def test_array_columns_skip_non_strings() -> None:
    row = post_row(dict(BUILT_POST, langs=["en", 5, None, "fr"], tags=[{"tag": "x"}, "kept"]))
    assert row.values["langs"] == ["en", "fr"]
    assert row.values["tags"] == ["kept"]


def test_self_labels_skip_malformed_entries() -> None:
    labels = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": 3}, "porn", {"val": "porn"}, {}]}
    row = post_row(dict(BUILT_POST, labels=labels))
    assert row.values["self_labels"] == ["porn"]


def test_embed_without_type_has_no_kind() -> None:
    row = post_row(dict(BUILT_POST, embed={"images": []}))
    assert row.values["embed_kind"] is None
    assert row.values["embed"] == {"images": []}


def test_unknown_embed_type_kept_as_given() -> None:
    row = post_row(dict(BUILT_POST, embed={"$type": "com.example.embed.poll", "options": ["a", "b"]}))
    assert row.values["embed_kind"] == "com.example.embed.poll"
    assert row.values["quote_uri"] is None


def test_embed_main_suffix_maps_kind() -> None:
    embed = {"$type": "app.bsky.embed.record#main", "record": {"uri": "at://q", "cid": "c"}}
    row = post_row(dict(BUILT_POST, embed=embed))
    assert row.values["embed_kind"] == "record"
    assert row.values["quote_uri"] == "at://q"


def test_quote_with_wrong_shapes_maps_null() -> None:
    for embed in (
        {"$type": "app.bsky.embed.record", "record": "at://did:plc:x/app.bsky.feed.post/1"},
        {"$type": "app.bsky.embed.record"},
        {"$type": "app.bsky.embed.recordWithMedia", "record": ["x"]},
        {"$type": "app.bsky.embed.recordWithMedia", "record": {"record": 5}},
    ):
        row = post_row(dict(BUILT_POST, embed=embed))
        assert row.values["quote_uri"] is None, embed
        assert row.values["quote_cid"] is None, embed


@pytest.mark.parametrize("subject", [{"did": "did:plc:x"}, 42, ["did:plc:x"], None])
def test_follow_subject_wrong_type_maps_null(subject) -> None:
    record = {"$type": "app.bsky.graph.follow", "subject": subject, "createdAt": "2026-07-04T14:38:07.746Z"}
    row = row_for_record("app.bsky.graph.follow", *BUILT_ARGS, record)
    assert row.values["subject_did"] is None
    assert row.values["record"]["subject"] == subject


@pytest.mark.parametrize("subject", ["at://did:plc:x/app.bsky.feed.post/1", 42, {"uri": 1, "cid": 2}])
def test_like_subject_wrong_type_maps_null(subject) -> None:
    record = {"$type": "app.bsky.feed.like", "subject": subject, "via": "x", "createdAt": "2026-07-04T14:38:07Z"}
    row = row_for_record("app.bsky.feed.like", *BUILT_ARGS, record)
    assert row.values["subject_uri"] is None
    assert row.values["subject_cid"] is None
    assert row.values["via_uri"] is None
    assert row.values["via_cid"] is None


@pytest.mark.parametrize(
    ("field", "value", "column"),
    [
        ("displayName", 5, "display_name"),
        ("description", {"text": "x"}, "description"),
        ("avatar", LEGACY_AVATAR_CID, "avatar_cid"),
        ("avatar", {"$type": "blob", "ref": LEGACY_AVATAR_CID}, "avatar_cid"),
        ("banner", {"$type": "blob", "ref": None}, "banner_cid"),
        ("banner", {"cid": 12, "mimeType": "image/jpeg"}, "banner_cid"),
        ("pinnedPost", "at://did:plc:x/app.bsky.feed.post/1", "pinned_post_uri"),
        ("pinnedPost", {"uri": ["x"], "cid": "c"}, "pinned_post_uri"),
    ],
)
def test_wrong_typed_profile_field_maps_null(field: str, value, column: str) -> None:
    record = {"$type": "app.bsky.actor.profile", field: value}
    row = row_for_record("app.bsky.actor.profile", *BUILT_ARGS, record)
    assert row.values[column] is None
    assert row.values["record"][field] == value


@pytest.mark.parametrize("collection", [*schema.RECORD_TABLES, "app.bsky.graph.list"])
@pytest.mark.parametrize("record", [[1, 2], "text", 7, None, {}])
def test_non_map_record_never_raises(collection: str, record) -> None:
    row = row_for_record(collection, *BUILT_ARGS, record)
    assert row.values["record"] == record
    assert set(row.values) == set(record_columns(row.table))


def test_huge_text_kept_whole() -> None:
    text = "x" * 1_000_000
    row = post_row(dict(BUILT_POST, text=text, langs=["en"] * 10_000))
    assert row.values["text"] == text
    assert len(row.values["langs"]) == 10_000


def test_every_typed_collection_has_columns() -> None:
    empty_rows = {collection: row_for_record(collection, *BUILT_ARGS, {}) for collection in schema.RECORD_TABLES}
    for collection, row in empty_rows.items():
        assert row.table is schema.RECORD_TABLES[collection]
        assert set(row.values) == set(record_columns(row.table)), collection


# U+0000 -----------------------------------------------------------------------------------------


def assert_no_nul(row: RecordRow) -> None:
    for name, value in row.values.items():
        for text in all_strings(value):
            assert "\x00" not in text, name


def test_nul_in_post_text_stripped() -> None:
    row = post_row(dict(real_post(), text="a\x00b\x00c"))
    assert row.values["text"] == "abc"
    assert row.values["record"]["text"] == "abc"
    assert row.nul_stripped is True
    assert_no_nul(row)


def test_nul_in_image_alt_stripped() -> None:
    op = find_corpus_op(lambda op: op["rkey"] == "3mptbxs3hq22j")
    original = corpus_row(op)
    post = copy.deepcopy(op["record"])
    post["embed"]["images"][0]["alt"] = "a cat\x00"
    row = post_row(post)
    assert row.values["embed"]["images"][0]["alt"] == "a cat"
    assert row.values["record"]["embed"]["images"][0]["alt"] == "a cat"
    assert row.values["embed"]["images"][0]["image"] == original.values["embed"]["images"][0]["image"]
    assert row.nul_stripped is True
    assert_no_nul(row)


def test_nul_in_external_description_stripped() -> None:
    _, post = protorune_post()
    post = copy.deepcopy(post)
    post["embed"]["media"]["external"]["description"] = "\x00ALT\x00"
    row = post_row(post)
    assert row.values["embed"]["media"]["external"]["description"] == "ALT"
    assert row.nul_stripped is True
    assert_no_nul(row)


def test_nul_in_profile_display_name_stripped() -> None:
    cid = "bafyreia3zwwmogntyn7zhsr6kyzvelma2l77axbldfja6jwcqbjq5e5tj4"
    record = dict(repo_records(f"{JETSTREAM_REPO}.repo.car")[cid], displayName="Al\x00ice", description="\x00")
    row = row_for_record(
        "app.bsky.actor.profile", JETSTREAM_REPO_DID, "self", cid, JETSTREAM_REPO_REV, None, record
    )
    assert row.values["display_name"] == "Alice"
    assert row.values["description"] == ""
    assert row.nul_stripped is True
    assert_no_nul(row)


def test_nul_in_arrays_and_refs_stripped() -> None:
    post = dict(
        BUILT_POST,
        langs=["e\x00n"],
        tags=["t\x00ag"],
        labels={"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "porn\x00"}]},
        reply={"root": {"uri": "at://r\x00", "cid": "c\x00"}, "parent": {"uri": "at://p", "cid": "c"}},
        createdAt="2026-07-04T14:38:06Z\x00",
    )
    row = post_row(post)
    assert row.values["langs"] == ["en"]
    assert row.values["tags"] == ["tag"]
    assert row.values["self_labels"] == ["porn"]
    assert row.values["reply_root_uri"] == "at://r"
    assert row.values["reply_root_cid"] == "c"
    assert row.values["created_at_raw"] == "2026-07-04T14:38:06Z"
    assert row.nul_stripped is True


def test_nul_in_other_collection_stripped() -> None:
    row = row_for_record("app.bsky.graph.list", *BUILT_ARGS, {"$type": "app.bsky.graph.list", "name": "x\x00"})
    assert row.values["record"] == {"$type": "app.bsky.graph.list", "name": "x"}
    assert row.nul_stripped is True


def test_clean_record_not_nul_stripped() -> None:
    for op in corpus_ops():
        assert corpus_row(op).nul_stripped is False, op["rkey"]


# PostgreSQL -------------------------------------------------------------------------------------


def test_rows_copy_into_postgresql(database_url: str) -> None:
    rows = [corpus_row(op) for op in corpus_ops()]
    _, post = protorune_post()
    rows.append(post_row(dict(post, text="nul\x00", langs=["en"], tags=["x"], labels=BUILT_POST["labels"])))
    profile = {"displayName": "\x00", "avatar": {"cid": LEGACY_AVATAR_CID}}
    rows.append(row_for_record("app.bsky.actor.profile", *BUILT_ARGS, profile))

    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url) as connection:
        for table in {row.table for row in rows}:
            columns = record_columns(table)
            jsonb = [isinstance(table.c[name].type, JSONB) for name in columns]
            with connection.cursor().copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy_in:
                for row in rows:
                    if row.table is table:
                        values = row.column_values()
                        copy_in.write_row(
                            [Jsonb(v) if is_json and v is not None else v for v, is_json in zip(values, jsonb)]
                        )
        counts = {
            name: connection.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
            for name in ("posts", "likes", "reposts", "follows", "blocks", "records", "profiles")
        }
        post_row_back = connection.execute(
            "SELECT uri, quote_uri, self_labels, embed->>'$type' FROM posts WHERE text = 'nul'"
        ).fetchone()

    assert counts == {
        "posts": 15, "likes": 78, "reposts": 11, "follows": 4, "blocks": 1, "records": 1, "profiles": 1,
    }  # fmt: skip
    assert post_row_back[0] == f"at://{BUILT_ARGS[0]}/app.bsky.feed.post/{BUILT_ARGS[1]}"
    assert post_row_back[1] == "at://did:plc:4llrhdclvdlmmynkwsmg5tdc/app.bsky.feed.post/3msqlva64k42v"
    assert post_row_back[2] == ["nudity", "graphic-media"]
    assert post_row_back[3] == "app.bsky.embed.recordWithMedia"


def _nested_record(depth: int) -> dict:
    value: object = [b"\x01", "text"]
    for _ in range(depth):
        value = [value]
    return {"$type": "app.bsky.feed.post", "text": "deep", "createdAt": "2024-01-01T00:00:00Z", "deep": value}


# The interpreted JSON conversion once raised RecursionError out of Batch.add for a record that
# libipld decodes (a few hundred levels of nesting), which would have stopped the stream.
def test_deep_record_stored_or_dead_lettered() -> None:
    frame = commit_frame(1, "did:plc:deep", "3kaaaaaaaaaaa", [("create", "app.bsky.feed.post/3kaaaaaaaaaab",
                                                                _nested_record(990))])
    batch = Batch(endpoint="test")

    batch.add(decode_repo_frame(frame))

    rows = len(batch.records.get("posts", {}))
    dead_letters = [row["reason"] for row in batch.dead_letters]
    assert (rows, dead_letters) in [(1, []), (0, ["invalid_record"])]
