"""indigo's relay test scenarios, indexed end to end, must end in the state their frames imply.

Each scenario file contains atproto JSON frames built by indigo's maintainers from real accounts
(real signed CARs, small made-up seqs). They are turned back into binary frames, served by a
``ReplayRelay`` and indexed by a ``StreamIndexer`` into the test database, once with one event
per batch and once with every event in one batch: the end state must not depend on batching.

Frames marked ``drop`` are ones indigo's relay rejects. Our rules for them:

- an event whose seq is not above the last seq already accepted is skipped (duplicate or
  out-of-order seq), because the cursor only moves forward;
- an op whose rev is not newer than the stored version of its record changes nothing, for deletes
  as for creates and updates;
- commits of a deactivated account are archived like any other (the relay sent them).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import libipld
import psycopg
import pytest

from fixture_data import INDIGO_SCENARIOS, fixture_path
from indexer.jsonform import from_json
from indexer.replay import ReplayRelay
from ingest_harness import build_indexer, index_frames, run_until

pytestmark = pytest.mark.timeout(60)

BNEWBOLD = "did:plc:44ybard66vv44zksje25o7dz"
PENGUA = "did:plc:vvpy7d6y2li5yo73cgbszibl"


def scenario_frames(name: str, count: int | None = None) -> list[tuple[int, bytes]]:
    """Return the first ``count`` (default all) frames of a scenario as ``(seq, binary frame)``."""
    scenario = json.loads(fixture_path(f"{INDIGO_SCENARIOS}/{name}.json").read_text())
    frames = []
    for message in scenario["messages"][:count]:
        frame = message["frame"]
        encoded = libipld.encode_dag_cbor(from_json(frame["header"])) + libipld.encode_dag_cbor(from_json(frame["body"]))
        frames.append((frame["body"]["seq"], encoded))
    return frames


async def index_scenario(url: str, name: str, batch_size: int, count: int | None = None) -> None:
    frames = scenario_frames(name, count)
    async with ReplayRelay(frames) as relay:
        await index_frames(url, relay, max(seq for seq, _frame in frames), batch_size=batch_size)


def query(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql, params).fetchall()


def record_keys(url: str, table: str) -> list[tuple]:
    return query(url, f"SELECT did, rkey, rev FROM {table} ORDER BY did, rkey")


def generic_records(url: str) -> list[tuple]:
    return query(url, "SELECT did, collection, rkey, rev FROM records ORDER BY collection, rkey")


def deletion_rows(url: str) -> list[tuple]:
    return query(url, "SELECT did, collection, rkey, rev, seq FROM deletions ORDER BY collection, rkey")


BATCH_SIZES = pytest.mark.parametrize("batch_size", [1, 1000], ids=["batch1", "batch1000"])


@BATCH_SIZES
async def test_post_lifecycle_end_state(database_url, batch_size):
    await index_scenario(database_url, "post_lifecycle", batch_size)

    assert record_keys(database_url, "likes") == []
    assert record_keys(database_url, "posts") == [(BNEWBOLD, "3lmxk35znys2k", "3lmxk36v2fg2o")]
    assert record_keys(database_url, "profiles") == [(BNEWBOLD, "self", "3lmxk25y7ad22")]
    assert generic_records(database_url) == [
        (BNEWBOLD, "app.bsky.feed.postgate", "3lmxk35znys2k", "3lmxk36v2fg2o"),
        (BNEWBOLD, "app.bsky.feed.threadgate", "3lmxk35znys2k", "3lmxk36v2fg2o"),
    ]
    assert deletion_rows(database_url) == [
        (BNEWBOLD, "app.bsky.feed.like", "3lmxjza3h2i27", "3lmxjzbfkb522", 35942466),
        (BNEWBOLD, "app.bsky.feed.post", "3lmxjzlexp22k", "3lmxjzvdjcc2e", 35956607),
    ]
    assert query(database_url, "SELECT rev, last_seq FROM actors WHERE did = %s", BNEWBOLD) == [
        ("3lmxk36v2fg2o", 35986865)]


@BATCH_SIZES
async def test_post_lifecycle_legacy_end_state(database_url, batch_size):
    await index_scenario(database_url, "post_lifecycle_legacy", batch_size)

    assert record_keys(database_url, "likes") == [(BNEWBOLD, "3llpyftcvih2r", "3llpyftdf4h2r")]
    assert record_keys(database_url, "posts") == []
    assert generic_records(database_url) == [
        (BNEWBOLD, "app.bsky.feed.threadgate", "3llxv7pnd3s2q", "3llxvahjm3b2n")]
    assert deletion_rows(database_url) == [
        (BNEWBOLD, "app.bsky.feed.like", "3llxva3wc7x22", "3llxva5nnod2d", 7441143562),
        (BNEWBOLD, "app.bsky.feed.post", "3llxv7pnd3s2q", "3llxvapijbc2o", 7441151612),
    ]


@BATCH_SIZES
async def test_deactivation_end_state(database_url, batch_size):
    await index_scenario(database_url, "deactivation", batch_size)

    # The post created while deactivated (dropped by indigo) is archived, then deleted at seq 107.
    assert record_keys(database_url, "posts") == []
    assert record_keys(database_url, "likes") == [(BNEWBOLD, "3llpyftcvih2r", "3llpyftdf4h2r")]
    assert generic_records(database_url) == [
        (BNEWBOLD, "app.bsky.feed.threadgate", "3llxv7pnd3s2q", "3llxvahjm3b2n")]
    assert deletion_rows(database_url) == [
        (BNEWBOLD, "app.bsky.feed.like", "3llxva3wc7x22", "3llxva5nnod2d", 105),
        (BNEWBOLD, "app.bsky.feed.post", "3llxv7pnd3s2q", "3llxvapijbc2o", 107),
    ]
    assert query(database_url, "SELECT seq, active, status FROM account_events ORDER BY seq") == [
        (101, False, "deactivated"), (103, True, None)]
    assert query(database_url, "SELECT active, status, account_seq FROM actors WHERE did = %s", BNEWBOLD) == [
        (True, None, 103)]


async def test_deactivated_commit_archived(database_url):
    await index_scenario(database_url, "deactivation", batch_size=1, count=3)

    assert record_keys(database_url, "posts") == [(BNEWBOLD, "3llxv7pnd3s2q", "3llxv7purdb2n")]
    assert query(database_url, "SELECT active, status FROM actors WHERE did = %s", BNEWBOLD) == [
        (False, "deactivated")]


@BATCH_SIZES
async def test_account_lifecycle_end_state(database_url, batch_size):
    await index_scenario(database_url, "account_lifecycle", batch_size)

    assert query(database_url, "SELECT seq, did, handle FROM identity_events") == [
        (110, PENGUA, "pengua.bsky.social")]
    assert query(database_url, "SELECT seq, active, status FROM account_events ORDER BY seq") == [
        (120, True, None), (140, False, "deleted")]
    assert query(database_url, "SELECT seq, did, rev FROM sync_events") == [(130, PENGUA, "3lmxrbvasth2t")]
    actor = query(database_url, "SELECT handle, active, status, rev, desynchronized_at, last_seq "
                  "FROM actors WHERE did = %s", PENGUA)
    assert actor == [("pengua.bsky.social", False, "deleted", "3lmxrbvasth2t",
                      datetime(2025, 4, 16, 23, 40, 33, 897000, tzinfo=UTC), 140)]


@BATCH_SIZES
async def test_legacy_commit_end_state(database_url, batch_size):
    await index_scenario(database_url, "legacy", batch_size)

    assert query(database_url, "SELECT did, rkey, rev, seq FROM likes") == [
        (BNEWBOLD, "3llpyftcvih2r", "3llpyftdf4h2r", 7278969010)]
    assert query(database_url, "SELECT seq, handle FROM identity_events") == [(7278969008, None)]
    assert query(database_url, "SELECT seq, active, status FROM account_events") == [(7278969009, True, None)]
    assert query(database_url, "SELECT handle, active, account_seq FROM actors WHERE did = %s", BNEWBOLD) == [
        (None, True, 7278969009)]
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]


@BATCH_SIZES
async def test_rev_ordering_end_state(database_url, batch_size):
    await index_scenario(database_url, "rev_ordering", batch_size)

    assert record_keys(database_url, "likes") == []
    assert deletion_rows(database_url) == [
        (BNEWBOLD, "app.bsky.feed.like", "3lmxjza3h2i27", "3lmxjzbfkb522", 103)]


@BATCH_SIZES
async def test_stale_deletes_change_nothing(database_url, batch_size):
    # Seq 101 deletes with an older rev and seq 102 with the create's own rev: both are stale.
    await index_scenario(database_url, "rev_ordering", batch_size, count=3)

    assert query(database_url, "SELECT rkey, rev, seq FROM likes") == [("3lmxjza3h2i27", "3lmxjza3nva27", 100)]
    assert deletion_rows(database_url) == []


@BATCH_SIZES
async def test_seq_ordering_end_state(database_url, batch_size):
    await index_scenario(database_url, "seq_ordering", batch_size)

    # The #account reusing seq 1000 and the commit at seq 5 come after seq 1000: both are skipped.
    assert query(database_url, "SELECT seq FROM identity_events") == [(1000,)]
    assert query(database_url, "SELECT seq FROM account_events") == []
    assert query(database_url, "SELECT rkey, rev, seq FROM likes") == [("3llpyftcvih2r", "3llpyftdf4h2r", 2000)]
    assert query(database_url, "SELECT active, last_seq FROM actors WHERE did = %s", BNEWBOLD) == [(None, 2000)]


async def test_seq_ordering_cursor_never_moves_back(database_url):
    frames = scenario_frames("seq_ordering", count=3)  # seqs 1000, 1000, 5
    async with ReplayRelay(frames) as relay:
        indexer = build_indexer(database_url, relay, batch_interval=10.0)
        await run_until(indexer, lambda running: running.counters.received == 3)

    assert query(database_url, "SELECT seq FROM cursors") == [(1000,)]
    assert indexer.counters.replayed == 2
