"""Repo backfill (getRepo) against a local PLC + PDS + relay serving the real repo exports."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import psycopg
import pytest

from fake_network import FakeNetwork, ScriptedResponse
from fixture_data import REPO_ROOT, fixture_path
from indexer import schema
from indexer.events import Commit, RecordOp
from indexer.repo_jobs import RepoJob, RepoJobSettings
from indexer.store import Batch, Store
from indexer.stream import Backoff

JETSTREAM_REPO = "repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd.repo.car"
JETSTREAM_RECORDS = "repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd.expected_records.tsv"
JETSTREAM_DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"
JETSTREAM_REV = "3migo7fijwi2k"
LITTLE_REPO = "repos/repostream_little.car"
EMPTY_REPO = "repos/repostream_empty.car"
V2_REPO = "repos/indigo_fakermaker.repo.car"


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _settings(network: FakeNetwork, **options) -> RepoJobSettings:
    options.setdefault("backoff", Backoff(base=0.01, cap=0.02))
    options.setdefault("host_rate", 1000.0)
    return RepoJobSettings(plc_url=network.url, allow_local_http=True, **options)


def _indexed_records(database_url: str, did: str) -> dict[str, tuple]:
    """Return ``{collection/rkey: (cid, rev, seq)}`` over every record table, for one repo."""
    selects = [f"SELECT '{collection}', rkey, cid, rev, seq FROM {table.name} WHERE did = %(did)s"
               for collection, table in schema.RECORD_TABLES.items()]
    selects.append("SELECT collection, rkey, cid, rev, seq FROM records WHERE did = %(did)s")
    with psycopg.connect(_libpq(database_url)) as connection:
        rows = connection.execute(" UNION ALL ".join(selects), {"did": did}).fetchall()
    return {f"{collection}/{rkey}": (cid, rev, seq) for collection, rkey, cid, rev, seq in rows}


def _repo_state(database_url: str, job: str, did: str) -> tuple:
    with psycopg.connect(_libpq(database_url)) as connection:
        return connection.execute(
            "SELECT state, rev, records, error, attempts FROM backfill_repos WHERE job = %s AND did = %s",
            (job, did)).fetchone()


def _expected_jetstream() -> dict[str, str]:
    lines = fixture_path(JETSTREAM_RECORDS).read_text().splitlines()
    return dict(line.split("\t") for line in lines if line.strip())


def _write_commit(database_url: str, did: str, rev: str, ops: list[RecordOp], seq: int) -> None:
    """Write one commit through the live writer, as if it arrived on the stream at ``seq``."""
    store = Store(database_url, "ws://relay.test/xrpc/com.atproto.sync.subscribeRepos")
    batch = Batch(endpoint=store.endpoint)
    batch.add(Commit(seq=seq, did=did, rev=rev, since=None, commit_cid="bafytest", time="2026-01-01T00:00:00Z",
                     ops=ops))
    store.write(batch)
    store.close()


async def test_repo_backfill_indexes_every_record(database_url):
    expected = _expected_jetstream()
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    indexed = _indexed_records(database_url, did)
    assert {path: cid for path, (cid, _, _) in indexed.items()} == expected
    assert {rev for _, rev, _ in indexed.values()} == {JETSTREAM_REV}
    assert {seq for _, _, seq in indexed.values()} == {None}


async def test_repo_state_done_at_rev(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        summary = await RepoJob(database_url, _settings(network)).run(dids=[did])
    state, rev, records, error, attempts = _repo_state(database_url, "repos", did)
    assert (state, rev, records, error, attempts) == ("done", JETSTREAM_REV, 23, None, 1)
    assert summary.states == {"done": 1}


async def test_other_collections_land_in_records_table(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(LITTLE_REPO))
        summary = await RepoJob(database_url, _settings(network)).run(dids=[did])
    print(f"\nrepostream_little.car: {summary.records} records in {summary.seconds:.2f} s "
          f"({summary.records_per_second:,.0f} records/s including fetch)")
    indexed = _indexed_records(database_url, did)
    with psycopg.connect(_libpq(database_url)) as connection:
        generic = connection.execute("SELECT count(*), count(*) FILTER (WHERE collection LIKE 'sh.tangled.%%') "
                                     "FROM records WHERE did = %s", (did,)).fetchone()
    assert len(indexed) == 278
    assert summary.records == 278
    assert generic[1] > 0
    assert generic[0] == sum(1 for path in indexed if path.split("/")[0] not in schema.RECORD_TABLES)


async def test_empty_repo_is_done(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(EMPTY_REPO))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert _repo_state(database_url, "repos", did)[:3] == ("done", "3m5fo6xa2js2x", 0)


async def test_version_2_repo_fails_with_reason(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(V2_REPO))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    state, _, _, error, _ = _repo_state(database_url, "repos", did)
    assert state == "failed"
    assert "version 2" in error


async def test_newer_live_record_not_overwritten(database_url):
    # A like of the repo, updated live at a rev newer than the export's, keeps the live version.
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        rkey = "3lqdkdjpy6t2e"
        live = {"$type": "app.bsky.feed.like", "createdAt": "2026-01-01T00:00:00Z",
                "subject": {"uri": f"at://{did}/app.bsky.feed.post/3kabc", "cid": "bafytest"}}
        _write_commit(database_url, did, "3zzzzzzzzzzzz", [
            RecordOp("create", "app.bsky.feed.like", rkey, "bafyreilivecid", record=live)], seq=10)
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert _indexed_records(database_url, did)[f"app.bsky.feed.like/{rkey}"] == ("bafyreilivecid", "3zzzzzzzzzzzz", 10)


async def test_live_delete_after_rev_stays_deleted(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        _write_commit(database_url, did, "3zzzzzzzzzzzz", [
            RecordOp("delete", "app.bsky.feed.like", "3lqdkdjpy6t2e", None)], seq=10)
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    indexed = _indexed_records(database_url, did)
    assert "app.bsky.feed.like/3lqdkdjpy6t2e" not in indexed
    assert len(indexed) == 22


async def test_older_record_absent_from_repo_deleted(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        stale = {"$type": "app.bsky.feed.post", "text": "deleted since", "createdAt": "2025-01-01T00:00:00Z"}
        _write_commit(database_url, did, "3aaaaaaaaaaaa", [
            RecordOp("create", "app.bsky.feed.post", "3aaaaaaaaaaab", "bafyreistalecid", record=stale)], seq=5)
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    with psycopg.connect(_libpq(database_url)) as connection:
        deletion = connection.execute("SELECT rev, seq FROM deletions WHERE did = %s AND rkey = '3aaaaaaaaaaab'",
                                      (did,)).fetchone()
    assert "app.bsky.feed.post/3aaaaaaaaaaab" not in _indexed_records(database_url, did)
    assert deletion == (JETSTREAM_REV, None)


async def test_refetch_changes_no_rows(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
        first = _all_rows(database_url)
        await RepoJob(database_url, _settings(network, refetch=True)).run(dids=[did])
    assert network.calls("/xrpc/com.atproto.sync.getRepo") == 2
    assert _all_rows(database_url) == first


async def test_rerun_skips_done_repo(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert network.calls("/xrpc/com.atproto.sync.getRepo") == 1


def _all_rows(database_url: str) -> dict[str, list]:
    tables = [*schema.RECORD_TABLES.values(), schema.records, schema.deletions]
    with psycopg.connect(_libpq(database_url)) as connection:
        return {table.name: sorted(map(repr, connection.execute(f"SELECT * FROM {table.name}").fetchall()))
                for table in tables}


async def test_interrupted_job_resumes_without_duplicates(database_url):
    async with FakeNetwork() as network:
        first = network.add_repo(fixture_path(JETSTREAM_REPO))
        second = network.add_repo(fixture_path(LITTLE_REPO))
        released = network.hold(second)
        job = asyncio.create_task(RepoJob(database_url, _settings(network, concurrency=1)).run(dids=[first, second]))
        while network.calls("/xrpc/com.atproto.sync.getRepo", second) == 0:
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        interrupted = _repo_state(database_url, "repos", second)[0]
        released.set()
        summary = await RepoJob(database_url, _settings(network, concurrency=1)).run(dids=[first, second])
    assert interrupted == "in_progress"
    assert summary.states == {"done": 2}
    assert network.calls("/xrpc/com.atproto.sync.getRepo", first) == 1
    assert len(_indexed_records(database_url, first)) == 23
    assert len(_indexed_records(database_url, second)) == 278


@pytest.mark.parametrize(("error", "state"), [
    ("RepoDeactivated", "deactivated"),
    ("RepoTakendown", "takendown"),
    ("RepoSuspended", "suspended"),
    ("RepoNotFound", "not_found"),
])
async def test_final_error_recorded_not_retried(database_url, error, state):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(did, ScriptedResponse(400, error, f"Repo {did} says {error}"))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    recorded, _, _, message, attempts = _repo_state(database_url, "repos", did)
    assert recorded == state
    assert error in message
    assert network.calls("/xrpc/com.atproto.sync.getRepo", did) == 1


async def test_unknown_repo_on_pds_is_not_found(database_url):
    async with FakeNetwork() as network:
        did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
        network.documents[did] = network.document_for(did)
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert _repo_state(database_url, "repos", did)[0] == "not_found"


async def test_rate_limit_waits_for_retry_after(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(did, ScriptedResponse(429, "RateLimitExceeded", "slow down", {"Retry-After": "1"}))
        started = time.monotonic()
        await RepoJob(database_url, _settings(network)).run(dids=[did])
        waited = time.monotonic() - started
    assert _repo_state(database_url, "repos", did)[0] == "done"
    assert network.calls("/xrpc/com.atproto.sync.getRepo", did) == 2
    assert waited >= 1.0  # Retry-After is a lower bound on the pause, not a speed claim


async def test_transient_errors_retried(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(did, ScriptedResponse(502), ScriptedResponse(500, "InternalServerError", "oops"))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert _repo_state(database_url, "repos", did)[0] == "done"
    assert network.calls("/xrpc/com.atproto.sync.getRepo", did) == 3


async def test_persistent_server_error_fails_repo(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(did, *[ScriptedResponse(503)] * 3)
        await RepoJob(database_url, _settings(network, max_attempts=3)).run(dids=[did])
    state, _, _, error, _ = _repo_state(database_url, "repos", did)
    assert state == "failed"
    assert "503" in error
    assert network.calls("/xrpc/com.atproto.sync.getRepo", did) == 3


async def test_invalid_request_not_retried(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(did, ScriptedResponse(400, "InvalidRequest", "bad did"))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert _repo_state(database_url, "repos", did)[0] == "failed"
    assert network.calls("/xrpc/com.atproto.sync.getRepo", did) == 1


async def test_failed_repo_retried_by_next_run(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        network.script_get_repo(did, ScriptedResponse(400, "InvalidRequest", "bad did"))
        await RepoJob(database_url, _settings(network)).run(dids=[did])
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    assert _repo_state(database_url, "repos", did)[0] == "done"


async def test_unresolvable_did_fails_with_reason(database_url):
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO), publish=False)
        await RepoJob(database_url, _settings(network)).run(dids=[did])
    state, _, _, error, _ = _repo_state(database_url, "repos", did)
    assert state == "failed"
    assert "not found" in error


async def test_all_enumerates_listing_pages(database_url):
    async with FakeNetwork(list_page_size=1) as network:
        first = network.add_repo(fixture_path(JETSTREAM_REPO))
        second = network.add_repo(fixture_path(LITTLE_REPO))
        taken_down = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
        network.listed[taken_down] = {"active": False, "status": "takendown"}
        summary = await RepoJob(database_url, _settings(network, job="all")).run(list_relay=network.url)
        with psycopg.connect(_libpq(database_url)) as connection:
            listing = connection.execute("SELECT repos, completed_at IS NOT NULL FROM backfill_listings").fetchone()
    assert summary.states == {"done": 2, "takendown": 1}
    assert _repo_state(database_url, "all", taken_down)[0] == "takendown"
    assert network.calls("/xrpc/com.atproto.sync.getRepo", taken_down) == 0
    assert listing == (3, True)
    assert _repo_state(database_url, "all", first)[0] == "done"
    assert _repo_state(database_url, "all", second)[0] == "done"


async def test_interrupted_listing_resumes_from_cursor(database_url):
    async with FakeNetwork(list_page_size=1) as network:
        network.add_repo(fixture_path(JETSTREAM_REPO))
        network.add_repo(fixture_path(LITTLE_REPO))
        network.list_failures_after = 1
        with pytest.raises(Exception, match="500"):
            await RepoJob(database_url, _settings(network, job="all", max_attempts=2)).run(list_relay=network.url)
        network.list_failures_after = None
        cursors_before = [query.get("cursor") for path, query in network.requests if path.endswith("listRepos")]
        summary = await RepoJob(database_url, _settings(network, job="all")).run(list_relay=network.url)
        cursors_after = [query.get("cursor") for path, query in network.requests if path.endswith("listRepos")]
    assert summary.states == {"done": 2}
    assert cursors_before[0] is None
    assert cursors_after[len(cursors_before)] is not None  # the second run did not start over


async def test_cli_backfill_repo_subprocess(database_url):
    """Run ``indexer backfill --repo`` as a user would, against the local network."""
    async with FakeNetwork() as network:
        did = network.add_repo(fixture_path(JETSTREAM_REPO))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "indexer.cli", "backfill", "--repo", did, "--plc-url", network.url,
            "--allow-local-http", "--database-url", database_url,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
            env={**os.environ, "RUST_LIB_BACKTRACE": "0"})
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    assert "done 1" in stdout.decode()
    assert len(_indexed_records(database_url, did)) == 23
