"""``indexer run`` end to end on real relay frames, checked against Jetstream's own decoding.

The 112 recorded frames of the Jetstream corpus are served by a ``ReplayRelay`` on 127.0.0.1 and
indexed by the real command in a subprocess. Every row is compared with the line that production
Jetstream produced for the same op. The 12 protorune frames go through the same loop in-process.
"""

from __future__ import annotations

import asyncio
import json

import libipld
import psycopg
import pytest

from command_harness import run_until_committed
from fixture_data import JETSTREAM_CORPUS, PROTORUNE_FRAMES, commit_bodies, fixture_path
from indexer import schema
from indexer.ingest import REPOS_METHOD
from indexer.replay import ReplayRelay, load_frame_directory
from indexer.stream import endpoint_url
from ingest_harness import index_frames, migrated_database

pytestmark = pytest.mark.timeout(60)

CORPUS_NEWEST = 31527015471


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def query(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(libpq(url)) as connection:
        return connection.execute(sql, params).fetchall()


def committed_cursor(url: str, endpoint: str) -> int | None:
    rows = query(url, "SELECT seq FROM cursors WHERE endpoint = %s AND job = 'live'", endpoint)
    return rows[0][0] if rows else None


def expected_lines() -> list[dict]:
    path = fixture_path(f"{JETSTREAM_CORPUS}/expected_jetstream_v1.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



async def _index_corpus_with_command(database_url: str, frames: list[tuple[int, bytes]]) -> dict:
    async with ReplayRelay(frames) as relay:
        code, log_text = await run_until_committed(database_url, relay, frames[-1][0], "--log-format", "json")
        endpoint = endpoint_url(relay.base_url, REPOS_METHOD)
    return {"url": database_url, "endpoint": endpoint, "code": code, "log": log_text}


@pytest.fixture(scope="module")
def indexed_corpus(postgres_server_url, template_database, corpus_frames) -> dict:
    """Index the corpus once with ``indexer run``; return the database URL, endpoint, exit code and log."""
    with migrated_database(postgres_server_url, template_database) as url:
        yield asyncio.run(_index_corpus_with_command(url, corpus_frames))


@pytest.fixture(scope="module")
def indexed_protorune(postgres_server_url, template_database) -> str:
    """Index the protorune frames once in-process; return the database URL."""
    frames = load_frame_directory(fixture_path(PROTORUNE_FRAMES))

    async def index(url: str) -> None:
        async with ReplayRelay(frames) as relay:
            indexer = await index_frames(url, relay, frames[-1][0])
        assert indexer.committed == frames[-1][0]

    with migrated_database(postgres_server_url, template_database) as url:
        asyncio.run(index(url))
        yield url


def record_row(url: str, collection: str, did: str, rkey: str) -> tuple | None:
    """Return (cid, rev, record) of the stored record, or None when there is no row."""
    table = schema.RECORD_TABLES.get(collection)
    if table is None:
        rows = query(url, "SELECT cid, rev, record FROM records WHERE did = %s AND collection = %s AND rkey = %s",
                     did, collection, rkey)
    else:
        rows = query(url, f"SELECT cid, rev, record FROM {table.name} WHERE did = %s AND rkey = %s", did, rkey)
    return rows[0] if rows else None


def table_count(url: str, table: str) -> int:
    return query(url, f"SELECT count(*) FROM {table}")[0][0]


def test_run_command_exits_zero_on_sigterm(indexed_corpus):
    assert indexed_corpus["code"] == 0, indexed_corpus["log"][-3000:]


def test_run_command_commits_last_seq(indexed_corpus):
    assert committed_cursor(indexed_corpus["url"], indexed_corpus["endpoint"]) == CORPUS_NEWEST


def test_run_command_matches_jetstream_records(indexed_corpus):
    url = indexed_corpus["url"]
    checked = 0
    for line in expected_lines():
        if line["kind"] != "commit" or line["commit"]["operation"] == "delete":
            continue
        commit = line["commit"]
        where = f"{line['did']}/{commit['collection']}/{commit['rkey']}"
        stored = record_row(url, commit["collection"], line["did"], commit["rkey"])
        assert stored is not None, f"no row for {where}"
        cid, rev, record = stored
        assert cid == commit["cid"], where
        assert rev == commit["rev"], where
        assert record == commit["record"], where
        checked += 1
    assert checked == 109


def test_run_command_matches_jetstream_deletes(indexed_corpus):
    url = indexed_corpus["url"]
    deletes = [line for line in expected_lines() if line["kind"] == "commit" and line["commit"]["operation"] == "delete"]
    assert len(deletes) == 3
    for line in deletes:
        commit = line["commit"]
        rows = query(url, "SELECT rev FROM deletions WHERE did = %s AND collection = %s AND rkey = %s",
                     line["did"], commit["collection"], commit["rkey"])
        assert rows == [(commit["rev"],)], f"{line['did']}/{commit['collection']}/{commit['rkey']}"
        assert record_row(url, commit["collection"], line["did"], commit["rkey"]) is None


@pytest.mark.parametrize(("table", "count"), [
    ("likes", 78), ("posts", 14), ("reposts", 11), ("follows", 4), ("blocks", 1), ("profiles", 0),
    ("records", 1), ("deletions", 3), ("identity_events", 1), ("account_events", 1), ("sync_events", 0),
    ("dead_letters", 0), ("gaps", 0),
])
def test_run_command_row_counts(indexed_corpus, table, count):
    assert table_count(indexed_corpus["url"], table) == count


def test_run_command_status_update_in_records(indexed_corpus):
    rows = query(indexed_corpus["url"], "SELECT collection FROM records")
    assert rows == [("app.bsky.actor.status",)]


def test_run_command_stores_identity_event(indexed_corpus):
    line = next(line for line in expected_lines() if line["kind"] == "identity")
    event = line["identity"]
    rows = query(indexed_corpus["url"], "SELECT endpoint, seq, did, time_raw, handle FROM identity_events")
    assert rows == [(indexed_corpus["endpoint"], event["seq"], event["did"], event["time"], event.get("handle"))]


def test_run_command_stores_account_event(indexed_corpus):
    line = next(line for line in expected_lines() if line["kind"] == "account")
    event = line["account"]
    rows = query(indexed_corpus["url"], "SELECT endpoint, seq, did, time_raw, active, status FROM account_events")
    assert rows == [(indexed_corpus["endpoint"], event["seq"], event["did"], event["time"], event["active"],
                     event.get("status"))]


def test_run_command_sets_actor_state(indexed_corpus):
    account = next(line for line in expected_lines() if line["kind"] == "account")["account"]
    identity = next(line for line in expected_lines() if line["kind"] == "identity")["identity"]
    rows = query(indexed_corpus["url"],
                 "SELECT active, status, account_seq, identity_seq, handle, last_seq FROM actors WHERE did = %s",
                 account["did"])
    assert rows == [(True, None, account["seq"], identity["seq"], None, account["seq"])]


def test_run_command_actor_rev_per_author(indexed_corpus):
    newest_rev: dict[str, str] = {}
    for line in expected_lines():
        if line["kind"] == "commit":
            newest_rev[line["did"]] = max(newest_rev.get(line["did"], ""), line["commit"]["rev"])
    stored = dict(query(indexed_corpus["url"], "SELECT did, rev FROM actors WHERE rev IS NOT NULL"))
    assert stored == newest_rev


def test_protorune_frames_indexed(indexed_protorune):
    counts = {table: table_count(indexed_protorune, table)
              for table in ("posts", "likes", "reposts", "deletions", "identity_events", "dead_letters")}
    assert counts == {"posts": 1, "likes": 7, "reposts": 2, "deletions": 1, "identity_events": 1, "dead_letters": 0}


def test_protorune_post_quote_and_thumb(indexed_protorune):
    rows = query(indexed_protorune, "SELECT did, rkey, embed_kind, quote_uri, quote_cid, "
                 "embed->'media'->'external'->'thumb'->'ref'->>'$link' FROM posts")
    assert rows == [(
        "did:plc:4vdi2b4k2klzdke344ag2njy", "3msqt2ammfk2e", "recordWithMedia",
        "at://did:plc:4llrhdclvdlmmynkwsmg5tdc/app.bsky.feed.post/3msqlva64k42v",
        "bafyreigxdqmh7bofhyhnh5smzsawh7cs2uqp6xencwnomtadyds4fsqopq",
        "bafkreiaz3vtpicfmgs5x2oq6wacu2kqypl4xf7am2fl4wpjjarxdpilva4",
    )]


def test_protorune_identity_without_handle(indexed_protorune):
    rows = query(indexed_protorune, "SELECT seq, did, handle FROM identity_events")
    assert rows == [(32625561603, "did:plc:hoyoz2vqz74upepwfqoxcooz", None)]


def test_run_command_actor_data_cid_from_commit_block(indexed_corpus, corpus_frames):
    # The newest commit of each repo names its MST root in the commit block of its CAR.
    newest: dict[str, tuple[str, str]] = {}
    for body in commit_bodies([frame for _seq, frame in corpus_frames]):
        blocks = libipld.decode_car(body["blocks"])[1]
        root = blocks[body["commit"]]["data"]
        if body["repo"] not in newest or body["rev"] > newest[body["repo"]][0]:
            newest[body["repo"]] = (body["rev"], libipld.encode_cid(root))
    stored = dict(query(indexed_corpus["url"], "SELECT did, data_cid FROM actors WHERE rev IS NOT NULL"))
    assert stored == {did: data for did, (_rev, data) in newest.items()}


def test_run_command_real_commits_mark_no_repo(indexed_corpus):
    assert query(indexed_corpus["url"], "SELECT did FROM actors WHERE desynchronized_at IS NOT NULL") == []
