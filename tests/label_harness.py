"""Run label-stream indexers against local test labelers, and build ``#labels`` frames.

A test labeler is a ``ReplayRelay`` on 127.0.0.1 serving ``subscribeLabels``. ``index_streams``
runs the real indexers (``indexer.runner.build_indexers`` and ``run_streams``) until every stream's
committed cursor reaches its target seq, then stops them the way a signal does, so every batch
received so far is committed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from typing import Any

import libipld
import psycopg

from fixture_data import fixture_path
from frame_builder import message_frame
from indexer.ingest import LABELS_METHOD, Filters, StreamIndexer
from indexer.jsonform import from_json
from indexer.replay import ReplayRelay
from indexer.runner import RunSettings, build_indexers, run_streams

SIGNED_LABELS = "labels/signed_labels.json"


def labels_frame(seq: int, labels: Iterable[Mapping[str, Any]] | None) -> tuple[int, bytes]:
    """Return ``(seq, frame)`` for a ``#labels`` frame; ``labels`` None leaves the key out."""
    body: dict[str, Any] = {"seq": seq}
    if labels is not None:
        body["labels"] = [dict(label) for label in labels]
    return seq, message_frame("#labels", libipld.encode_dag_cbor(body))


def signed_labels() -> list[dict[str, Any]]:
    """Return the real signed labels of the fixtures as DAG-CBOR-ready maps (``sig`` as bytes)."""
    document = json.loads(fixture_path(SIGNED_LABELS).read_text())
    return [from_json(entry["label"]) for entry in document["labels"]]


def labels_endpoint(labeler: ReplayRelay) -> str:
    """Return the endpoint URL the indexer stores in ``cursors`` and ``labels`` for ``labeler``."""
    return labeler.url(LABELS_METHOD)


async def index_streams(
    database_url: str,
    targets: Mapping[ReplayRelay, int],
    *,
    relay: tuple[ReplayRelay, int] | None = None,
    filters: Filters | None = None,
    timeout: float = 20.0,
) -> list[StreamIndexer]:
    """Index each labeler in ``targets`` (and the repo stream of ``relay``) until its cursor reaches the seq given.

    Returns the stopped indexers. An error that ends the run early (such as FutureCursorError)
    propagates inside the ``ExceptionGroup`` that ``run_streams`` raises. Raises TimeoutError naming
    every stream's committed cursor when a target is not reached within ``timeout`` seconds.
    """
    settings = RunSettings(
        relay=relay[0].base_url if relay else None,
        labelers=[labeler.base_url for labeler in targets],
        filters=filters or Filters(),
        batch_interval=0.05,
    )
    indexers = build_indexers(database_url, settings)
    wanted = ([relay[1]] if relay else []) + list(targets.values())
    run = asyncio.create_task(run_streams(indexers))
    try:
        async with asyncio.timeout(timeout):
            while not run.done() and not _reached(indexers, wanted):
                await asyncio.sleep(0.02)
    except TimeoutError:
        reached = {indexer.endpoint: indexer.committed for indexer in indexers}
        raise TimeoutError(f"cursors {reached} did not reach {wanted} within {timeout} s") from None
    finally:
        for indexer in indexers:
            if not indexer.stopping:
                indexer.stop()
        await run  # re-raises what stopped the run early
    return indexers


def _reached(indexers: list[StreamIndexer], wanted: list[int]) -> bool:
    return all(indexer.committed is not None and indexer.committed >= seq for indexer, seq in zip(indexers, wanted))


def query(database_url: str, sql: str, params: Any = None, *, now: str | None = None) -> list[tuple]:
    """Run one query and return its rows; ``now`` sets the ``indexer.now`` clock of the views first."""
    with connect(database_url) as connection:
        if now is not None:
            connection.execute("SELECT set_config('indexer.now', %s, false)", (now,))
        return connection.execute(sql, params).fetchall()


def connect(database_url: str) -> psycopg.Connection:
    """Open a psycopg connection to the SQLAlchemy-style ``database_url`` the fixtures give."""
    return psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1))
