"""Every example query of ``docs/queries.md`` runs on an archive filled from the real fixture frames.

The SQL is read out of the Markdown, so the documentation and the tests cannot drift apart. Each
query must return rows, and where the fixture determines the result, the rows are checked too.
"""

from __future__ import annotations

import asyncio
import re
from datetime import date
from pathlib import Path

import psycopg
import pytest

from fixture_archive import replay_archive, scratch_database

pytestmark = pytest.mark.timeout(60)

QUERIES_DOC = Path(__file__).resolve().parent.parent / "docs" / "queries.md"
MODERATION = "did:plc:ar7c4by46qjdydhdevvrndac"
TAKEN_DOWN = "did:plc:qx7s5vdotumqa4h52ejojeby"
RECORDED = date(2026, 7, 4)


def documented_queries() -> dict[str, str]:
    """Return each ```sql block of docs/queries.md keyed by the title on its first ``-- `` line."""
    queries = {}
    for block in re.findall(r"```sql\n(.*?)```", QUERIES_DOC.read_text(), flags=re.DOTALL):
        first_line = block.splitlines()[0]
        assert first_line.startswith("-- "), f"sql block without a '-- title' first line: {first_line!r}"
        queries[first_line[3:]] = block
    return queries


QUERIES = documented_queries()


@pytest.fixture(scope="module")
def archive_url(postgres_server_url, template_database):
    with scratch_database(postgres_server_url, template_database) as url:
        asyncio.run(replay_archive(url))
        yield url


def run(url: str, title: str) -> list[tuple]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        connection.read_only = True
        return connection.execute(QUERIES[title]).fetchall()


def test_queries_doc_has_ten_queries():
    assert len(QUERIES) >= 10


@pytest.mark.parametrize("title", sorted(QUERIES))
def test_documented_query_returns_rows(archive_url, title):
    assert run(archive_url, title)


def test_posts_per_language_counts_each_lang(archive_url):
    rows = run(archive_url, "Posts per language per day")
    assert (RECORDED, "en", 8) in rows
    assert (RECORDED, "tr", 3) in rows
    assert (RECORDED, "(none)", 1) in rows


def test_deletions_per_collection_counts(archive_url):
    rows = run(archive_url, "Deletions per collection per day")
    assert rows == [(RECORDED, "app.bsky.graph.follow", 2), (RECORDED, "app.bsky.feed.post", 1)]


def test_labels_per_labeler_split_negations(archive_url):
    rows = run(archive_url, "Labels per labeler per value")
    assert (MODERATION, "!takedown", 1, 1) in rows


def test_accounts_taken_down_by_label(archive_url):
    rows = run(archive_url, "Accounts taken down")
    assert rows == [(TAKEN_DOWN, f"label from {MODERATION}")]


def test_top_liked_posts_limited(archive_url):
    rows = run(archive_url, "Top liked posts in a time window")
    assert len(rows) == 20
    assert all(row[0].startswith("at://") for row in rows)


def test_collections_outside_typed_tables(archive_url):
    assert run(archive_url, "Collections outside the typed tables") == [("app.bsky.actor.status", 1, 1)]
