"""Fill a test database the way ``indexer run`` does, from the real fixture frames and labels.

The relay is a ``ReplayRelay`` on 127.0.0.1 serving the 112 recorded frames of the Jetstream corpus.
The labeler is another one serving three ``#labels`` frames, each carrying one of the real signed
labels of ``labels/signed_labels.json``. The frames themselves are built here, because no recorded
``subscribeLabels`` frames exist. The indexers are the real ones, built by ``indexer.runner``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import libipld
import psycopg

from fixture_data import JETSTREAM_CORPUS, fixture_path
from frame_builder import message_frame
from ingest_harness import migrated_database as scratch_database  # noqa: F401 - re-exported for the tests
from indexer.ingest import LABELS_METHOD, REPOS_METHOD, StreamIndexer
from indexer.jsonform import from_json
from indexer.replay import ReplayRelay, load_length_prefixed
from indexer.runner import RunSettings, build_indexers, run_streams

RUN_TIMEOUT = 30.0  # seconds a fixture replay may take before the harness gives up


@dataclass
class Archive:
    """Where the fixture streams were served from, and what their last seqs are."""

    relay_endpoint: str
    labeler_endpoint: str
    relay_last_seq: int
    labeler_last_seq: int


def corpus_frames() -> list[tuple[int, bytes]]:
    """Return ``(seq, frame)`` of the Jetstream corpus, in stream order."""
    return load_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))


def label_frames() -> list[tuple[int, bytes]]:
    """Return three ``#labels`` frames (seq 1 to 3), one real signed label each."""
    document = json.loads(fixture_path("labels/signed_labels.json").read_text())
    labels = [from_json(entry["label"]) for entry in document["labels"]]
    return [(seq, message_frame("#labels", libipld.encode_dag_cbor({"seq": seq, "labels": [label]})))
            for seq, label in enumerate(labels, start=1)]


async def replay_archive(
    database_url: str,
    *,
    relay_frames: list[tuple[int, bytes]] | None = None,
    final_relay_seq: int | None = None,
    while_running: Callable[[list[StreamIndexer], ReplayRelay], Awaitable[None]] | None = None,
) -> tuple[Archive, list[StreamIndexer]]:
    """Index the corpus and the label frames until every frame is committed, then stop like SIGTERM does.

    ``relay_frames`` replaces the corpus. ``while_running`` is awaited once both streams have
    started, with the indexers and the relay, so a test may append frames to the relay. The run then
    continues until ``final_relay_seq`` is committed (default: the seq of the last of ``relay_frames``).
    """
    frames = relay_frames if relay_frames is not None else corpus_frames()
    final_relay_seq = final_relay_seq if final_relay_seq is not None else frames[-1][0]
    labels = label_frames()
    async with ReplayRelay(frames) as relay, ReplayRelay(labels) as labeler:
        settings = RunSettings(relay=relay.base_url, labelers=[labeler.base_url], batch_interval=0.05,
                               receive_timeout=5.0)
        indexers = build_indexers(database_url, settings)
        run = asyncio.create_task(run_streams(indexers))
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                if while_running is not None:
                    await while_running(indexers, relay)
                await wait_for_cursors(indexers, [final_relay_seq, labels[-1][0]], run)
        finally:
            for indexer in indexers:
                if not indexer.stopping:
                    indexer.stop()
            await run
        archive = Archive(relay.url(REPOS_METHOD), labeler.url(LABELS_METHOD), final_relay_seq, labels[-1][0])
    return archive, indexers


async def wait_for_cursors(indexers: list[StreamIndexer], seqs: list[int], run: asyncio.Task | None = None) -> None:
    """Wait until each indexer's committed cursor reaches its seq in ``seqs`` (or the run ends)."""
    while not all(indexer.committed is not None and indexer.committed >= seq for indexer, seq in zip(indexers, seqs)):
        if run is not None and run.done():
            return
        await asyncio.sleep(0.02)


def query(database_url: str, sql: str, params=None) -> list[tuple]:
    """Run one statement on the SQLAlchemy-style ``database_url`` and return its rows."""
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql, params).fetchall()


