"""Prometheus metrics scraped over HTTP from the real indexers while they replay the fixture frames."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fixture_archive import corpus_frames, replay_archive, wait_for_cursors
from indexer.errors import ConfigError
from indexer.metrics import MetricsServer, build_registry, parse_address

pytestmark = pytest.mark.timeout(60)

FIRST_PART = 60  # frames served before the first scrape; the rest are appended after it


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Return every sample of a scrape keyed by (name, labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(scraped: dict, name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


async def scrape(port: int) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            return samples(await response.text())


@pytest.fixture(scope="module")
def scrapes(postgres_server_url, template_database):
    """Scrape once after the first part of the corpus is committed and once after all of it."""
    from fixture_archive import scratch_database

    frames = corpus_frames()
    scraped: list[dict] = []

    async def scrape_while_running(indexers, relay):
        async with MetricsServer(build_registry(indexers), "127.0.0.1", 0) as server:
            await wait_for_cursors(indexers[:1], [frames[FIRST_PART - 1][0]])
            scraped.append(await scrape(server.port))
            for seq, frame in frames[FIRST_PART:]:
                relay.append(seq, frame)
            await wait_for_cursors(indexers, [frames[-1][0], 3])
            scraped.append(await scrape(server.port))

    with scratch_database(postgres_server_url, template_database) as url:
        archive, _ = asyncio.run(replay_archive(url, relay_frames=frames[:FIRST_PART], final_relay_seq=frames[-1][0],
                                                while_running=scrape_while_running))
    return archive.relay_endpoint, archive.labeler_endpoint, scraped[0], scraped[1]


def test_received_counter_moves(scrapes):
    relay, _, first, second = scrapes
    assert value(first, "indexer_events_received_total", stream=relay) == FIRST_PART
    assert value(second, "indexer_events_received_total", stream=relay) == 112


def test_indexed_counter_moves(scrapes):
    relay, _, first, second = scrapes
    assert value(first, "indexer_events_indexed_total", stream=relay) == FIRST_PART
    assert value(second, "indexer_events_indexed_total", stream=relay) == 112


def test_ops_counted_by_collection_and_action(scrapes):
    relay, _, _, second = scrapes
    assert value(second, "indexer_ops_total", stream=relay, collection="app.bsky.feed.like", action="create") == 78
    assert value(second, "indexer_ops_total", stream=relay, collection="app.bsky.graph.follow", action="delete") == 2


def test_events_counted_by_kind(scrapes):
    relay, labeler, _, second = scrapes
    assert value(second, "indexer_events_decoded_total", stream=relay, kind="Commit") == 110
    assert value(second, "indexer_events_decoded_total", stream=relay, kind="Identity") == 1
    assert value(second, "indexer_events_decoded_total", stream=labeler, kind="Labels") == 3


def test_cursor_gauge_per_stream(scrapes):
    relay, labeler, first, second = scrapes
    assert value(first, "indexer_cursor", stream=relay) == corpus_frames()[FIRST_PART - 1][0]
    assert value(second, "indexer_cursor", stream=relay) == 31527015471
    assert value(second, "indexer_cursor", stream=labeler) == 3


def test_commit_latency_histogram_counts_batches(scrapes):
    relay, _, first, second = scrapes
    batches = value(second, "indexer_batches_committed_total", stream=relay)
    assert batches > value(first, "indexer_batches_committed_total", stream=relay)
    assert value(second, "indexer_batch_commit_seconds_count", stream=relay) == batches
    assert value(second, "indexer_batch_commit_seconds_bucket", stream=relay, le="+Inf") == batches
    assert value(second, "indexer_batch_commit_seconds_sum", stream=relay) > 0


def test_lag_from_event_time(scrapes):
    relay, labeler, _, second = scrapes
    # The corpus was recorded on 2026-07-04, so its events are at least hours old.
    assert value(second, "indexer_lag_seconds", stream=relay) > 3600
    assert value(second, "indexer_lag_seconds", stream=labeler) is None


def test_client_connects_counted(scrapes):
    relay, _, _, second = scrapes
    assert value(second, "indexer_stream_client_events_total", stream=relay, event="connects") >= 1
    assert value(second, "indexer_stream_client_events_total", stream=relay, event="reconnects") is not None
    assert value(second, "indexer_stream_connected", stream=relay) == 1


def test_no_dead_letters_on_clean_corpus(scrapes):
    relay, _, _, second = scrapes
    assert not [key for key in second if key[0] == "indexer_dead_letters_total"]
    assert value(second, "indexer_dead_letter_rows_written_total", stream=relay) == 0


def test_rows_written_counted(scrapes):
    relay, _, _, second = scrapes
    assert value(second, "indexer_record_rows_written_total", stream=relay) > 100


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80)),
])
def test_metrics_address_parses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":9464", "example.com:9464"])
def test_metrics_address_rejects_invalid(text):
    with pytest.raises(ConfigError, match="metrics-addr"):
        parse_address(text)
