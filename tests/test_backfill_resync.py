"""Resync: repos marked desynchronized (by #sync or a broken commit chain) are refetched and brought in line.

The stream frames here are built by the test (``frame_builder``) for the DID of the real jetstream
repo export, which the local PDS serves; their records and CIDs are synthetic.
"""

from __future__ import annotations

import asyncio

import libipld
import psycopg

from fake_network import FakeNetwork, ScriptedResponse
from fixture_data import fixture_path
from frame_builder import build_car, cid_for, commit_frame, message_frame
from indexer.events import Commit, RecordOp, Sync
from indexer.replay import ReplayRelay
from indexer.repo_jobs import RepoJob, RepoJobSettings
from indexer.runner import RunSettings, build_indexers
from indexer.store import Batch, Store
from indexer.stream import Backoff

JETSTREAM_REPO = "repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd.repo.car"
DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"
REPO_REV = "3migo7fijwi2k"
OLD_REV = "3aaaaaaaaaaaa"
STALE_POST = "3aaaaaaaaaaab"  # a post that is not in the repo export
LIKE_IN_REPO = "3lqdkdjpy6t2e"
LIKE_CID_IN_REPO = "bafyreigmpffgbpgzfhvml36cecdcz7cn2v7kde2ar7ib4jgol7grj4jyly"
ENDPOINT = "ws://relay.test/xrpc/com.atproto.sync.subscribeRepos"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _query(database_url: str, sql: str, *params):
    with psycopg.connect(_libpq(database_url)) as connection:
        return connection.execute(sql, params).fetchall()


def _settings(network: FakeNetwork, **options) -> RepoJobSettings:
    return RepoJobSettings(job="resync", plc_url=network.url, allow_local_http=True, host_rate=1000.0,
                           backoff=Backoff(base=0.01, cap=0.02), **options)


def _write(database_url: str, *events) -> None:
    store = Store(database_url, ENDPOINT)
    batch = Batch(endpoint=ENDPOINT)
    for event in events:
        batch.add(event)
    store.write(batch)
    store.close()


def _commit(seq: int, rev: str, since: str | None, ops=(), *, data: str | None = None,
            prev_data: str | None = None) -> Commit:
    return Commit(seq=seq, did=DID, rev=rev, since=since, commit_cid="bafytest", time="2026-01-01T00:00:00Z",
                  ops=list(ops), data=data, prev_data=prev_data)


ROOT_A = libipld.encode_cid(cid_for(b"mst root a"))
ROOT_B = libipld.encode_cid(cid_for(b"mst root b"))


def _mark(database_url: str):
    return _query(database_url, "SELECT desynchronized_at FROM actors WHERE did = %s", DID)[0][0]


def test_commit_following_rev_leaves_mark_unset(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None))
    _write(database_url, _commit(2, "3aaaaaaaaaaa3", "3aaaaaaaaaaa2"))
    assert _mark(database_url) is None


def test_commit_not_following_rev_marks_repo(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None))
    _write(database_url, _commit(3, "3aaaaaaaaaaa5", "3aaaaaaaaaaa4"))
    assert _mark(database_url) is not None


def test_broken_chain_within_batch_marks_repo(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None), _commit(3, "3aaaaaaaaaaa5", "3aaaaaaaaaaa4"))
    assert _mark(database_url) is not None


def test_commit_following_data_leaves_mark_unset(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None, data=ROOT_A))
    _write(database_url, _commit(2, "3aaaaaaaaaaa3", "3aaaaaaaaaaa2", data=ROOT_B, prev_data=ROOT_A))
    assert _mark(database_url) is None


def test_commit_with_other_prev_data_marks_repo(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None, data=ROOT_A))
    _write(database_url, _commit(2, "3aaaaaaaaaaa3", "3aaaaaaaaaaa2", data=ROOT_A, prev_data=ROOT_B))
    assert _mark(database_url) is not None


def test_other_prev_data_within_batch_marks_repo(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None, data=ROOT_A),
           _commit(2, "3aaaaaaaaaaa3", "3aaaaaaaaaaa2", data=ROOT_A, prev_data=ROOT_B))
    assert _mark(database_url) is not None


def test_prev_data_after_sync_leaves_mark_unset(database_url):
    # After a #sync the root at the stored rev is unknown, so no prevData can contradict it.
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None, data=ROOT_A))
    _write(database_url, Sync(seq=2, did=DID, rev="3aaaaaaaaaaa3", time="2026-01-01T00:00:00Z"))
    with psycopg.connect(_libpq(database_url)) as connection:
        connection.execute("UPDATE actors SET desynchronized_at = NULL")
    _write(database_url, _commit(3, "3aaaaaaaaaaa4", "3aaaaaaaaaaa3", data=ROOT_A, prev_data=ROOT_B))
    assert _mark(database_url) is None


def test_replayed_old_commit_leaves_mark_unset(database_url):
    _write(database_url, _commit(5, "3aaaaaaaaaaa5", "3aaaaaaaaaaa4"))
    _write(database_url, _commit(3, "3aaaaaaaaaaa3", "3aaaaaaaaaaa1"))
    assert _mark(database_url) is None


def _stream_frames() -> list[tuple[int, bytes]]:
    """A commit at an old rev (a post since deleted, an old version of a like), then #sync to the repo's rev."""
    post = {"$type": "app.bsky.feed.post", "text": "deleted before the export", "createdAt": "2025-01-01T00:00:00Z"}
    like = {"$type": "app.bsky.feed.like", "createdAt": "2025-01-01T00:00:00Z",
            "subject": {"uri": f"at://{DID}/app.bsky.feed.post/3kold", "cid": LIKE_CID_IN_REPO}}
    commit = commit_frame(100, DID, OLD_REV, [("create", f"app.bsky.feed.post/{STALE_POST}", post),
                                             ("create", f"app.bsky.feed.like/{LIKE_IN_REPO}", like)])
    commit_block = libipld.encode_dag_cbor({"did": DID, "version": 3, "data": cid_for(b"mst root"), "rev": REPO_REV,
                                            "prev": None, "sig": b"\x00" * 64})
    sync_body = {"seq": 101, "did": DID, "rev": REPO_REV, "time": "2026-01-02T00:00:00Z",
                 "blocks": build_car([cid_for(commit_block)], [(cid_for(commit_block), commit_block)])}
    return [(100, commit), (101, message_frame("#sync", sync_body))]


async def _run_live(database_url: str, frames: list[tuple[int, bytes]]) -> None:
    async with ReplayRelay(frames) as relay:
        (indexer,) = build_indexers(database_url, RunSettings(relay=relay.base_url, labelers=[],
                                                              batch_interval=0.05, receive_timeout=2.0))
        task = asyncio.create_task(indexer.run())
        async with asyncio.timeout(30):
            while indexer.committed is None or indexer.committed < frames[-1][0]:
                await asyncio.sleep(0.02)
        indexer.stop()
        await task
        indexer.store.close()


async def test_sync_then_resync_brings_repo_in_line(database_url):
    await _run_live(database_url, _stream_frames())
    marked = _mark(database_url)
    async with FakeNetwork() as network:
        network.add_repo(fixture_path(JETSTREAM_REPO))
        summary = await RepoJob(database_url, _settings(network)).run(desynchronized=True)
    likes = _query(database_url, "SELECT cid, rev FROM likes WHERE did = %s AND rkey = %s", DID, LIKE_IN_REPO)
    deletion = _query(database_url, "SELECT rev, seq FROM deletions WHERE did = %s AND rkey = %s", DID, STALE_POST)
    assert marked is not None
    assert summary.states == {"done": 1}
    assert _query(database_url, "SELECT count(*) FROM posts WHERE rkey = %s", STALE_POST) == [(0,)]
    assert deletion == [(REPO_REV, None)]
    assert likes == [(LIKE_CID_IN_REPO, REPO_REV)]
    assert _mark(database_url) is None
    assert summary.deleted == 1


async def test_resync_skips_unmarked_repos(database_url):
    _write(database_url, _commit(1, "3aaaaaaaaaaa2", None))
    async with FakeNetwork() as network:
        network.add_repo(fixture_path(JETSTREAM_REPO))
        summary = await RepoJob(database_url, _settings(network)).run(desynchronized=True)
    assert summary.states == {}
    assert network.calls("/xrpc/com.atproto.sync.getRepo") == 0


async def test_mark_during_fetch_kept(database_url):
    _write(database_url, Sync(seq=1, did=DID, rev="3aaaaaaaaaaa2", time="2026-01-01T00:00:00Z"))
    async with FakeNetwork() as network:
        network.add_repo(fixture_path(JETSTREAM_REPO))
        released = network.hold(DID)
        job = asyncio.create_task(RepoJob(database_url, _settings(network)).run(desynchronized=True))
        while network.calls("/xrpc/com.atproto.sync.getRepo") == 0:
            await asyncio.sleep(0.01)
        _write(database_url, Sync(seq=2, did=DID, rev="3zzzzzzzzzzzz", time="2026-01-03T00:00:00Z"))
        released.set()
        await job
    assert _mark(database_url) is not None


async def test_taken_down_repo_not_refetched_until_marked_again(database_url):
    _write(database_url, Sync(seq=1, did=DID, rev="3aaaaaaaaaaa2", time="2026-01-01T00:00:00Z"))
    async with FakeNetwork() as network:
        network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(DID, ScriptedResponse(400, "RepoTakendown", "taken down"))
        await RepoJob(database_url, _settings(network)).run(desynchronized=True)
        await RepoJob(database_url, _settings(network)).run(desynchronized=True)
        calls_while_taken_down = network.calls("/xrpc/com.atproto.sync.getRepo")
        _write(database_url, Sync(seq=2, did=DID, rev="3aaaaaaaaaaa3", time="2099-01-01T00:00:00Z"))
        summary = await RepoJob(database_url, _settings(network)).run(desynchronized=True)
    assert calls_while_taken_down == 1
    assert summary.states == {"done": 1}


async def test_run_with_resync_refetches_marked_repo(database_url):
    from indexer.runner import resync_periodically, run_streams

    frames = _stream_frames()
    async with FakeNetwork() as network, ReplayRelay(frames) as relay:
        network.add_repo(fixture_path(JETSTREAM_REPO))
        (indexer,) = build_indexers(database_url, RunSettings(relay=relay.base_url, labelers=[],
                                                              batch_interval=0.05, receive_timeout=2.0))
        resync = lambda: resync_periodically(database_url, _settings(network), interval=0.2)  # noqa: E731
        task = asyncio.create_task(run_streams([indexer], [resync]))
        async with asyncio.timeout(30):
            # Regression (CI run of stop 10): waiting for the deletion row alone raced the mark's clearing.
            while not _query(database_url, "SELECT 1 FROM backfill_repos WHERE job = 'resync' AND state = 'done'"):
                await asyncio.sleep(0.05)
        indexer.stop()
        await task

    assert _mark(database_url) is None
    assert _query(database_url, "SELECT count(*) FROM posts WHERE rkey = %s", STALE_POST) == [(0,)]
    assert _query(database_url, "SELECT count(*) FROM deletions WHERE rkey = %s", STALE_POST) == [(1,)]
