"""``indexer status`` on an archive filled from the real fixture frames and labels, run as the real command."""

from __future__ import annotations

import asyncio
import json

import pytest

from command_harness import run_cli
from fixture_archive import query, replay_archive, scratch_database
from indexer import db

pytestmark = pytest.mark.timeout(90)

CORPUS_NEWEST = 31527015471


@pytest.fixture(scope="module")
def archive(postgres_server_url, template_database):
    with scratch_database(postgres_server_url, template_database) as url:
        archive, _ = asyncio.run(replay_archive(url))
        yield url, archive


@pytest.fixture(scope="module")
def status_json(archive) -> dict:
    url, _ = archive
    completed = run_cli("status", "--json", "--database-url", url)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def stream(status: dict, endpoint: str) -> dict:
    return next(entry for entry in status["streams"] if entry["endpoint"] == endpoint)


def test_status_relay_cursor_is_last_seq(status_json, archive):
    relay = stream(status_json, archive[1].relay_endpoint)
    assert relay["cursor"] == CORPUS_NEWEST
    assert relay["kind"] == "repos"
    assert relay["job"] == "live"


def test_status_relay_lag_from_event_time(status_json, archive):
    relay = stream(status_json, archive[1].relay_endpoint)
    assert relay["last_event_time"].startswith("2026-07-04")
    # The corpus was recorded on 2026-07-04, so the lag is the time since then.
    assert relay["lag"] > 0


def test_status_labeler_cursor_is_last_seq(status_json, archive):
    labeler = stream(status_json, archive[1].labeler_endpoint)
    assert labeler["cursor"] == 3
    assert labeler["kind"] == "labels"
    assert labeler["lag"] is None


def test_status_row_counts_match_tables(status_json, archive):
    url, _ = archive
    counts = {entry["table"]: entry for entry in status_json["tables"]}
    for table in ("posts", "likes", "reposts", "follows", "deletions", "labels", "actors", "cursors"):
        (exact,) = query(url, f"SELECT count(*) FROM {table}")[0]
        assert counts[table]["rows"] == exact, table
        assert counts[table]["estimated"] is False, table
    assert counts["likes"]["rows"] == 78


def test_status_reports_no_dead_letters_or_gaps(status_json):
    assert status_json["dead_letters"] == []
    assert status_json["gap_count"] == 0
    assert status_json["gaps"] == []


def test_status_backfill_empty_but_present(status_json):
    assert status_json["backfill"] == []


def test_status_counts_dead_letters_by_reason(archive, database_url):
    db.upgrade(database_url)
    query(database_url, "INSERT INTO dead_letters (endpoint, reason, error, digest) VALUES "
                        "('wss://relay.test/xrpc/com.atproto.sync.subscribeRepos', 'invalid_body', 'x', 'a'), "
                        "('wss://relay.test/xrpc/com.atproto.sync.subscribeRepos', 'invalid_body', 'y', 'b') "
                        "RETURNING id")
    completed = run_cli("status", "--json", "--database-url", database_url)
    assert json.loads(completed.stdout)["dead_letters"] == [
        {"endpoint": "wss://relay.test/xrpc/com.atproto.sync.subscribeRepos", "reason": "invalid_body", "count": 2}]


def test_status_without_backfill_table(empty_database_url):
    db.upgrade(empty_database_url, "0001")
    completed = run_cli("status", "--json", "--database-url", empty_database_url)
    assert completed.returncode == 0, completed.stderr
    status = json.loads(completed.stdout)
    assert status["backfill"] is None
    assert status["streams"] == []


def test_status_text_lists_streams(archive):
    url, archive_info = archive
    completed = run_cli("status", "--database-url", url)
    assert completed.returncode == 0, completed.stderr
    assert "31527015471" in completed.stdout
    assert "Dead letters: none" in completed.stdout
