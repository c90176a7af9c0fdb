"""Replay backfill (``indexer backfill --cursor``) over the recorded relay frames, beside ``indexer run``."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import uuid

import psycopg
import pytest

from fixture_data import JETSTREAM_CORPUS, REPO_ROOT, fixture_path
from indexer import schema
from indexer.backfill import ReplaySettings, prepare_replay, replay_and_report, run_replay
from indexer.errors import ConfigError
from indexer.replay import Faults, ReplayRelay, load_length_prefixed
from indexer.runner import RunSettings, build_indexers
from indexer.stream import Backoff

# Columns that record when a row was written, not what the input contained.
WRITE_TIME_COLUMNS = {"indexed_at", "updated_at", "received_at", "detected_at", "created_at", "id"}
# Tables a replay job and a live run fill alike; cursors differ by job on purpose.
COMPARED_TABLES = [table for table in schema.metadata.sorted_tables if table.name != "cursors"]


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def frames():
    return load_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))


@pytest.fixture
def other_database_url(postgres_server_url, template_database):
    """A second migrated database, to compare a replay with a live run."""
    from sqlalchemy.engine import make_url

    name = f"test_other_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(postgres_server_url), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(_libpq(postgres_server_url), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _snapshot(url: str, *, keep_write_times: bool = False) -> dict[str, list]:
    """Return every compared table's rows as sorted reprs, without write-time columns unless kept."""
    result = {}
    with psycopg.connect(_libpq(url)) as connection:
        for table in COMPARED_TABLES:
            # actors.updated_at moves on every upsert, even one that changes nothing else.
            skipped = {"updated_at"} if keep_write_times else WRITE_TIME_COLUMNS
            columns = [column.name for column in table.columns if column.name not in skipped]
            names = ", ".join(f'"{name}"' for name in columns)
            result[table.name] = sorted(map(repr, connection.execute(f"SELECT {names} FROM {table.name}")))
    return result


def _settings(relay: ReplayRelay, **options) -> ReplaySettings:
    return ReplaySettings(relay=relay.base_url, batch_interval=0.05, receive_timeout=2.0,
                          backoff=lambda: Backoff(base=0.01, cap=0.05), **options)


async def _run_live(database_url: str, relay: ReplayRelay, *, stop_at_seq: int) -> None:
    """Index the relay as ``indexer run`` does, until ``stop_at_seq`` is committed."""
    settings = RunSettings(relay=relay.base_url, labelers=[], batch_interval=0.05, receive_timeout=2.0)
    (indexer,) = build_indexers(database_url, settings)
    indexer.stop_at_seq = stop_at_seq
    task = asyncio.create_task(indexer.run())
    try:
        async with asyncio.timeout(30):
            while indexer.committed is None or indexer.committed < stop_at_seq:
                await asyncio.sleep(0.02)
    finally:
        indexer.stop()
        await task
        indexer.store.close()


async def _backfill(database_url: str, relay: ReplayRelay, **options):
    settings = _settings(relay, **options)
    job = await asyncio.to_thread(prepare_replay, database_url, settings)
    async with asyncio.timeout(30):
        return await run_replay(database_url, job, settings)


def _cursor(database_url: str, job: str) -> tuple | None:
    with psycopg.connect(_libpq(database_url)) as connection:
        return connection.execute("SELECT seq, start_seq, target_seq FROM cursors WHERE job = %s", (job,)).fetchone()


async def test_replay_fills_same_rows_as_run(frames, database_url, other_database_url):
    first, last = frames[0][0], frames[-1][0]
    async with ReplayRelay(frames) as relay:
        await _run_live(database_url, relay, stop_at_seq=last)
        result = await _backfill(other_database_url, relay, cursor=first, until=last)
    assert result.job.complete
    assert _snapshot(other_database_url) == _snapshot(database_url)


async def test_replay_after_run_changes_nothing(frames, database_url):
    first, last = frames[0][0], frames[-1][0]
    async with ReplayRelay(frames) as relay:
        await _run_live(database_url, relay, stop_at_seq=last)
        before = _snapshot(database_url, keep_write_times=True)
        await _backfill(database_url, relay, cursor=first, until=last)
    assert _snapshot(database_url, keep_write_times=True) == before


async def test_replay_stops_at_live_cursor(frames, database_url):
    first, middle = frames[0][0], frames[40][0]
    async with ReplayRelay(frames) as relay:
        await _run_live(database_url, relay, stop_at_seq=middle)
        live_position = _cursor(database_url, "live")[0]
        result = await _backfill(database_url, relay, cursor=first)
    assert result.job.target_seq == live_position
    assert _cursor(database_url, "backfill") == (live_position, first, live_position)


async def test_replay_job_has_own_cursor_row(frames, database_url):
    first, last = frames[0][0], frames[30][0]
    async with ReplayRelay(frames) as relay:
        await _backfill(database_url, relay, cursor=first, until=last)
    assert _cursor(database_url, "backfill") == (last, first, last)
    assert _cursor(database_url, "live") is None


async def test_replay_result_counts_committed_events(frames, database_url):
    # Regression (newcomer walkthrough): the count also included the event past --until.
    first, last = frames[0][0], frames[30][0]
    async with ReplayRelay(frames) as relay:
        result = await _backfill(database_url, relay, cursor=first, until=last)
    with psycopg.connect(_libpq(database_url)) as connection:
        committed = connection.execute("SELECT events FROM cursors WHERE job = 'backfill'").fetchone()[0]
    assert result.events == committed
    assert result.events == sum(1 for seq, _frame in frames if first <= seq <= last)


async def test_outdated_cursor_reported_as_gap(frames, database_url):
    first, last = frames[0][0], frames[-1][0]
    out = io.StringIO()
    async with ReplayRelay(frames) as relay:
        settings = _settings(relay, cursor=first - 100, until=last)
        code = await replay_and_report(database_url, settings, out)
    with psycopg.connect(_libpq(database_url)) as connection:
        gap = connection.execute("SELECT from_seq, to_seq, reason FROM gaps").fetchone()
    assert code == 0
    assert gap == (first - 101, first, "OutdatedCursor")
    assert f"resumed at seq {first}" in out.getvalue()


async def test_complete_job_not_replayed_again(frames, database_url):
    first, last = frames[0][0], frames[10][0]
    out = io.StringIO()
    async with ReplayRelay(frames) as relay:
        await _backfill(database_url, relay, cursor=first, until=last)
        connections = len(relay.connections)
        code = await replay_and_report(database_url, _settings(relay, cursor=first), out)
    assert code == 0
    assert "is complete" in out.getvalue()
    assert len(relay.connections) == connections


def test_job_with_other_start_rejected(database_url):
    settings = ReplaySettings(relay="ws://127.0.0.1:9", cursor=100, until=200)
    prepare_replay(database_url, settings)
    with pytest.raises(ConfigError, match="started at seq 100"):
        prepare_replay(database_url, ReplaySettings(relay="ws://127.0.0.1:9", cursor=150))


def test_new_job_without_target_rejected(database_url):
    with pytest.raises(ConfigError, match="--until"):
        prepare_replay(database_url, ReplaySettings(relay="ws://127.0.0.1:9", cursor=100))


def test_resume_without_job_rejected(database_url):
    with pytest.raises(ConfigError, match="--cursor"):
        prepare_replay(database_url, ReplaySettings(relay="ws://127.0.0.1:9"))


async def _wait_for_cursor(database_url: str, at_least: int, process) -> None:
    async with asyncio.timeout(60):
        while True:
            row = _cursor(database_url, "backfill")
            if row is not None and row[0] >= at_least:
                return
            if process.returncode is not None:
                raise AssertionError(f"backfill exited early with {process.returncode}")
            await asyncio.sleep(0.05)


async def test_interrupted_replay_resumes_without_duplicates(frames, database_url, other_database_url):
    """Interrupt ``indexer backfill --cursor`` with SIGINT, rerun the same command, compare with one clean run."""
    first, last = frames[0][0], frames[-1][0]
    async with ReplayRelay(frames) as relay:
        await _backfill(other_database_url, relay, cursor=first, until=last)
        relay.faults = Faults(stall_after=50, connections=1)
        command = [sys.executable, "-m", "indexer.cli", "backfill", "--cursor", str(first), "--until", str(last),
                   "--relay", relay.base_url, "--database-url", database_url, "--batch-size", "10",
                   "--receive-timeout", "30", "--verify", "off"]  # as the clean in-process run
        environment = {**os.environ, "RUST_LIB_BACKTRACE": "0"}
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                       cwd=REPO_ROOT, env=environment)
        await _wait_for_cursor(database_url, frames[40][0], process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        stopped_at = _cursor(database_url, "backfill")[0]

        rerun = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                     cwd=REPO_ROOT, env=environment)
        rerun_stdout, rerun_stderr = await asyncio.wait_for(rerun.communicate(), 60)
    assert process.returncode == 130, stderr.decode()
    assert stopped_at < last
    assert "run the same command again" in stdout.decode()
    assert rerun.returncode == 0, rerun_stderr.decode()
    assert "is complete" in rerun_stdout.decode()
    assert _snapshot(database_url) == _snapshot(other_database_url)

