"""Run a real ``StreamIndexer`` against a ``ReplayRelay`` and a test database, then stop it.

The indexer is built the way ``indexer.runner`` builds it: a ``Store`` and a ``StreamClient`` on
the relay's subscribeRepos endpoint. Its settings are sized for tests. A short receive timeout and
a fast reconnect backoff let each fault scenario finish in well under a second.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from indexer import frames
from indexer.ingest import REPOS_METHOD, Filters, StreamIndexer
from indexer.replay import ReplayRelay
from indexer.store import Store
from indexer.stream import DEFAULT_MAX_MESSAGE_SIZE, Backoff, StreamClient, endpoint_url

RECEIVE_TIMEOUT = 0.5  # seconds of silence before the client reconnects
WAIT_TIMEOUT = 20.0  # seconds a run may take before the harness gives up

_database_numbers = itertools.count()


def build_indexer(
    database_url: str,
    relay: ReplayRelay,
    *,
    batch_size: int = 1000,
    batch_interval: float = 0.05,
    receive_timeout: float = RECEIVE_TIMEOUT,
    stop_at_seq: int | None = None,
    filters: Filters | None = None,
    decode: Callable[[bytes], Any] = frames.decode_repo_frame,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> StreamIndexer:
    """Create an indexer of the relay's repo stream; nothing connects until ``run()``."""
    endpoint = endpoint_url(relay.base_url, REPOS_METHOD)
    store = Store(database_url, endpoint)

    def client_factory(cursor_source):
        # Seeded, so reconnect delays are the same on every run.
        backoff = Backoff(base=0.01, cap=0.05, rng=random.Random(0))
        return StreamClient(endpoint, REPOS_METHOD, cursor_source, receive_timeout=receive_timeout,
                            backoff=backoff, healthy_after=0.1, max_message_size=max_message_size)

    return StreamIndexer(store, client_factory, decode=decode, filters=filters, batch_size=batch_size,
                         batch_interval=batch_interval, stop_at_seq=stop_at_seq,
                         db_backoff=Backoff(base=0.01, cap=0.05, rng=random.Random(0)))


async def run_until(indexer: StreamIndexer, condition: Callable[[StreamIndexer], bool], *,
                    timeout: float = WAIT_TIMEOUT) -> StreamIndexer:
    """Run ``indexer`` until ``condition(indexer)`` holds, then stop it (committing its open batch).

    Raises TimeoutError naming the committed cursor when the condition does not hold within
    ``timeout`` seconds, and re-raises whatever ``run()`` raised (for example FutureCursorError).
    """
    task = asyncio.create_task(indexer.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not task.done() and not condition(indexer):
            if loop.time() > deadline:
                raise TimeoutError(f"the indexer did not reach the expected state within {timeout} s; "
                                   f"committed cursor is {indexer.committed}")
            await asyncio.sleep(0.01)
    finally:
        if not task.done():
            indexer.stop()
        await _finish(task, indexer)
    return indexer


async def run_until_committed(indexer: StreamIndexer, seq: int, *, timeout: float = WAIT_TIMEOUT) -> StreamIndexer:
    """Run ``indexer`` until its committed cursor is at or above ``seq``, then stop it."""
    return await run_until(indexer, lambda running: running.committed is not None and running.committed >= seq,
                           timeout=timeout)


async def run_until_stopped(indexer: StreamIndexer, *, timeout: float = WAIT_TIMEOUT) -> StreamIndexer:
    """Run ``indexer`` until ``run()`` returns by itself (``stop_at_seq`` reached) or raises."""
    task = asyncio.create_task(indexer.run())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(task)
    except TimeoutError:
        indexer.stop()
        raise TimeoutError(f"the indexer did not stop within {timeout} s; "
                           f"committed cursor is {indexer.committed}") from None
    finally:
        await _finish(task, indexer)
    return indexer


async def _finish(task: asyncio.Task, indexer: StreamIndexer) -> None:
    try:
        await task
    finally:
        indexer.store.close()


async def index_frames(database_url: str, relay: ReplayRelay, seq: int, **settings: Any) -> StreamIndexer:
    """Build an indexer with ``settings`` (those of ``build_indexer``) and run it until ``seq`` commits."""
    return await run_until_committed(build_indexer(database_url, relay, **settings), seq)


@contextmanager
def migrated_database(server_url: str, template: str) -> Iterator[str]:
    """Create a database copied from the migrated ``template``, yield its URL, then drop it.

    Meant for fixtures wider than one test, because ``database_url`` is per test. ``server_url``
    is the SQLAlchemy URL of the server's maintenance database.
    """
    name = f"harness_{os.getpid()}_{next(_database_numbers)}"
    maintenance = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(maintenance, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(maintenance, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
