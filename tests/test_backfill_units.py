"""Pure parts of backfill: Retry-After parsing, relay URLs, repos files, the progress line."""

from __future__ import annotations

import io

import pytest

from indexer.backfill import ReplayJob, ReplayProgress
from indexer.errors import ConfigError
from indexer.repo_fetch import MAX_RATE_LIMIT_WAIT, retry_after_seconds, relay_http_url
from indexer.repo_jobs import read_repos_file

NOW = 1_800_000_000.0


def test_retry_after_seconds_parsed():
    assert retry_after_seconds({"Retry-After": "7"}, now=NOW) == 7.0


def test_retry_after_http_date_parsed():
    # Fri, 15 Jan 2027 08:00:30 GMT is 30 s after NOW.
    assert retry_after_seconds({"Retry-After": "Fri, 15 Jan 2027 08:00:30 GMT"}, now=NOW) == 30.0


def test_retry_after_past_date_is_zero():
    assert retry_after_seconds({"Retry-After": "Fri, 15 Jan 2027 08:00:30 GMT"}, now=NOW + 60) == 0.0


def test_ratelimit_reset_epoch_parsed():
    assert retry_after_seconds({"RateLimit-Reset": str(int(NOW) + 12)}, now=NOW) == 12.0


def test_retry_after_capped():
    assert retry_after_seconds({"Retry-After": "86400"}, now=NOW) == MAX_RATE_LIMIT_WAIT


def test_retry_after_garbage_uses_default():
    assert retry_after_seconds({"Retry-After": "soon"}, now=NOW, default=3.0) == 3.0
    assert retry_after_seconds({"Retry-After": "nan"}, now=NOW, default=3.0) == 3.0


def test_retry_after_missing_uses_default():
    assert retry_after_seconds({}, now=NOW, default=3.0) == 3.0


@pytest.mark.parametrize(("relay", "expected"), [
    ("wss://bsky.network", "https://bsky.network"),
    ("bsky.network", "https://bsky.network"),
    ("ws://127.0.0.1:8765/xrpc/com.atproto.sync.subscribeRepos", "http://127.0.0.1:8765"),
    ("http://127.0.0.1:8765/", "http://127.0.0.1:8765"),
])
def test_relay_http_url(relay, expected):
    assert relay_http_url(relay) == expected


def test_relay_http_url_rejects_other_scheme():
    with pytest.raises(ConfigError, match="ftp://relay"):
        relay_http_url("ftp://relay")


def test_repos_file_skips_comments(tmp_path):
    path = tmp_path / "dids.txt"
    path.write_text("# accounts\ndid:plc:aaaaaaaaaaaaaaaaaaaaaaaa\n\ndid:web:example.com  # a web DID\n")
    assert read_repos_file(path) == ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:web:example.com"]


def test_repos_file_rejects_non_did(tmp_path):
    path = tmp_path / "dids.txt"
    path.write_text("alice.bsky.social\n")
    with pytest.raises(ConfigError, match="dids.txt:1"):
        read_repos_file(path)


def test_progress_line_shows_position_rate_eta():
    progress = ReplayProgress(ReplayJob("ws://relay", "backfill", 100, 99, 1099), io.StringIO())
    line = progress.describe(599, 3000, 2.0)
    assert "50.0%" in line
    assert "seq 599/1099" in line
    assert "1,500 events/s" in line
    assert "ETA 2s" in line


def test_progress_plain_lines_when_not_terminal():
    stream = io.StringIO()
    progress = ReplayProgress(ReplayJob("ws://relay", "backfill", 100, 99, 1099), stream)
    progress.update(599, 3000, force=True)
    assert stream.getvalue().endswith("\n")
    assert "\r" not in stream.getvalue()
