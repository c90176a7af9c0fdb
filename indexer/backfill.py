"""``indexer backfill``: fill gaps in the archive, from a relay's replay window or from whole repos.

Two kinds of job write into the same tables as ``indexer run``, through the same ``Store``, so they
can run beside it:

- **Replay** (``--cursor N``): replays ``subscribeRepos`` from seq N through a ``StreamIndexer``
  under its own cursor row (``cursors.job``, default ``backfill``). It stops at ``--until``, or at
  the live indexer's committed cursor when the job was created. Running it again, or with
  ``--resume``, continues from the job's cursor. An ``OutdatedCursor`` from the relay is recorded
  in ``gaps`` and reported.
- **Repos** (``--repo``, ``--repos-file``, ``--all``, ``--desynchronized``): fetch whole repos with
  ``getRepo``; see ``indexer.repo_jobs``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import psycopg

from indexer import frames
from indexer.errors import ConfigError
from indexer.ingest import DEFAULT_BATCH_SIZE, REPOS_METHOD, StreamIndexer
from indexer.repo_jobs import RepoJob, RepoJobSettings, count_states
from indexer.store import Store
from indexer.stream import DEFAULT_MAX_MESSAGE_SIZE, Backoff, StreamClient, endpoint_url
from indexer.verifier import EventVerifier, VerifySettings

log = logging.getLogger(__name__)

LIVE_JOB = "live"
REPLAY_JOB = "backfill"


def libpq_url(url: str) -> str:
    """Return ``url`` in the form psycopg accepts (without the SQLAlchemy driver name)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# --- replay ------------------------------------------------------------------------------------

@dataclass
class ReplaySettings:
    """Options of a replay backfill, besides the database URL."""

    relay: str
    job: str = REPLAY_JOB
    cursor: int | None = None  # --cursor: where a new job starts; None continues an existing job
    until: int | None = None  # --until: last seq to index; None means the live cursor at creation
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_interval: float = 0.2
    receive_timeout: float = 60.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    backoff: Callable[[], Backoff] | None = None
    verify: VerifySettings = field(default_factory=VerifySettings)  # off unless set


@dataclass(frozen=True, slots=True)
class ReplayJob:
    """A replay job's row in ``cursors``: where it started, where it is, where it stops."""

    endpoint: str
    job: str
    start_seq: int
    position: int  # committed cursor: every event at or below it is in the database
    target_seq: int

    @property
    def complete(self) -> bool:
        return self.position >= self.target_seq


@dataclass
class ReplayResult:
    """Outcome of a replay run: the job's position and the gaps the relay reported meanwhile."""

    job: ReplayJob
    events: int  # events committed by this run (dead letters included)
    gaps: list[tuple[int | None, int | None, str | None]] = field(default_factory=list)


def prepare_replay(database_url: str, settings: ReplaySettings) -> ReplayJob:
    """Create the job's cursor row, or read it back when the job exists; return the job.

    A new job needs ``cursor``; its target is ``until`` or the live cursor of the same relay
    endpoint. An existing job is continued: ``cursor`` and ``until``, when given, must match it.
    Raises ConfigError with the way out when they do not, or when no target can be set.
    """
    endpoint = endpoint_url(settings.relay, REPOS_METHOD)
    with psycopg.connect(libpq_url(database_url)) as connection:
        row = connection.execute(
            "SELECT start_seq, seq, target_seq FROM cursors WHERE endpoint = %s AND job = %s FOR UPDATE",
            (endpoint, settings.job)).fetchone()
        if row is not None:
            return _existing_replay(endpoint, settings, *row)
        if settings.cursor is None:
            raise ConfigError(f"there is no backfill job {settings.job!r} for {endpoint} to resume; "
                              "start one with --cursor SEQ")
        target = settings.until
        if target is None:
            live = connection.execute("SELECT seq FROM cursors WHERE endpoint = %s AND job = %s",
                                      (endpoint, LIVE_JOB)).fetchone()
            if live is None or live[0] is None:
                raise ConfigError(f"no live cursor for {endpoint} to stop at (has `indexer run` indexed this "
                                  "relay?); give --until SEQ")
            target = live[0]
        if target < settings.cursor:
            raise ConfigError(f"--cursor {settings.cursor} is above the target seq {target}: nothing to backfill")
        # The job's cursor starts just below the first seq wanted; cursor=0 requests everything retained.
        position = max(settings.cursor - 1, 0)
        connection.execute(
            "INSERT INTO cursors (endpoint, job, seq, start_seq, target_seq) VALUES (%s, %s, %s, %s, %s)",
            (endpoint, settings.job, position, settings.cursor, target))
    return ReplayJob(endpoint, settings.job, settings.cursor, position, target)


def _existing_replay(endpoint: str, settings: ReplaySettings, start: int | None, position: int | None,
                     target: int | None) -> ReplayJob:
    if target is None or start is None or position is None:
        raise ConfigError(f"the cursors row of job {settings.job!r} for {endpoint} is not a backfill job "
                          "(it has no start or target seq); choose another --job")
    if settings.cursor is not None and settings.cursor != start:
        raise ConfigError(
            f"backfill job {settings.job!r} for {endpoint} started at seq {start} and is at {position}; "
            f"rerun with --cursor {start} or --resume to continue it, or give --job NAME to start another")
    if settings.until is not None and settings.until != target:
        raise ConfigError(f"backfill job {settings.job!r} for {endpoint} stops at seq {target}, not "
                          f"{settings.until}; drop --until to continue it, or give --job NAME to start another")
    return ReplayJob(endpoint, settings.job, start, position, target)


def build_replay_indexer(database_url: str, job: ReplayJob, settings: ReplaySettings) -> StreamIndexer:
    """Create the StreamIndexer of a replay job: the job's own cursor row, stopping after its target."""
    store = Store(database_url, job.endpoint, job=job.job, exclusive=True)

    def client_factory(cursor_source):
        backoff = settings.backoff() if settings.backoff else None
        return StreamClient(job.endpoint, REPOS_METHOD, cursor_source, receive_timeout=settings.receive_timeout,
                            max_message_size=settings.max_message_size, backoff=backoff)

    return StreamIndexer(store, client_factory, decode=frames.decode_repo_frame, batch_size=settings.batch_size,
                         batch_interval=settings.batch_interval, stop_at_seq=job.target_seq,
                         verifier=EventVerifier(settings.verify, database_url))


async def run_replay(database_url: str, job: ReplayJob, settings: ReplaySettings,
                     progress: ReplayProgress | None = None) -> ReplayResult:
    """Replay the relay stream into the database until the job's target seq is committed.

    Returns early, with everything received committed, when a signal stops the indexer (see
    ``indexer.runner.run_streams``). Running it again continues from the committed cursor.
    """
    from indexer.runner import run_streams

    started = await asyncio.to_thread(_max_gap_id, database_url)
    indexer = build_replay_indexer(database_url, job, settings)
    watcher = asyncio.create_task(_stop_at_target(indexer, job, progress))
    try:
        await run_streams([indexer])
    finally:
        watcher.cancel()
    position = indexer.committed if indexer.committed is not None else job.position
    finished = ReplayJob(job.endpoint, job.job, job.start_seq, position, job.target_seq)
    if progress is not None:
        progress.finish(finished, indexer.counters.received)
    gaps = await asyncio.to_thread(_gaps_since, database_url, job, started)
    # Not counters.received: it also counts replayed events and the one past --until.
    return ReplayResult(finished, indexer.counters.indexed, gaps)


async def _stop_at_target(indexer: StreamIndexer, job: ReplayJob, progress: ReplayProgress | None) -> None:
    """Stop the indexer once the target seq is committed; feed the progress display meanwhile.

    ``stop_at_seq`` alone stops only when an event after the target arrives, which may take long on a
    quiet relay, so the committed cursor is watched too.
    """
    while True:
        await asyncio.sleep(0.1)
        committed = indexer.committed
        if progress is not None:
            progress.update(committed if committed is not None else job.position, indexer.counters.received)
        if (committed is not None and committed >= job.target_seq) or indexer.reached_stop_seq:
            if not indexer.stopping:
                indexer.stop()
            return


def _max_gap_id(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as connection:
        return connection.execute("SELECT COALESCE(max(id), 0) FROM gaps").fetchone()[0]


def _gaps_since(database_url: str, job: ReplayJob, after_id: int) -> list[tuple[int | None, int | None, str | None]]:
    """Return the gaps recorded for the job's endpoint since gap id ``after_id``, dropping false ones.

    The job connects with the seq just below its start. When that seq is older than the relay's
    window but the first seq sent is at or below the start, the relay reports ``OutdatedCursor``
    although nothing the job wanted was lost, so that gap row is deleted.
    """
    with psycopg.connect(libpq_url(database_url)) as connection:
        connection.execute("DELETE FROM gaps WHERE endpoint = %s AND id > %s AND to_seq <= %s",
                           (job.endpoint, after_id, job.start_seq))
        return [tuple(row) for row in connection.execute(
            "SELECT from_seq, to_seq, message FROM gaps WHERE endpoint = %s AND id > %s ORDER BY id",
            (job.endpoint, after_id))]


class ReplayProgress:
    """Show a replay's seq position, events/s and ETA to the target.

    On a terminal it redraws one line in place (``\\r``) every ``refresh`` seconds; otherwise it
    writes one plain line every ``interval`` seconds. Rates are averaged over the whole run.
    """

    def __init__(self, job: ReplayJob, stream: TextIO | None = None, *, interval: float = 10.0,
                 refresh: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = refresh if self.tty else interval
        self.first_position = job.position
        self.target = job.target_seq
        self.started = time.monotonic()
        self.last_shown = 0.0

    def update(self, position: int, events: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_shown < self.interval:
            return
        self.last_shown = now
        line = self.describe(position, events, now - self.started)
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:100])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def describe(self, position: int, events: int, elapsed: float) -> str:
        """Return the status text: bar, percentage, seq position, events/s and ETA."""
        span = max(self.target - self.first_position, 1)
        done = min(max(position - self.first_position, 0), span)
        fraction = done / span
        bar = "#" * int(fraction * 20)
        rate = events / elapsed if elapsed > 0 else 0.0
        seq_rate = done / elapsed if elapsed > 0 else 0.0
        remaining = self.target - max(position, self.first_position)
        if remaining <= 0:
            eta = "done"
        elif seq_rate > 0:
            eta = _duration(remaining / seq_rate)
        else:
            eta = "?"
        return (f"[{bar:<20}] {fraction:6.1%}  seq {position}/{self.target}  "
                f"{rate:,.0f} events/s  ETA {eta}")

    def finish(self, job: ReplayJob, events: int) -> None:
        self.update(job.position, events, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"



# --- command line ------------------------------------------------------------------------------

def replay_command(database_url: str, settings: ReplaySettings, out: TextIO | None = None) -> int:
    """Run a replay job for ``indexer backfill --cursor``; print its outcome and return the exit code.

    Returns 0 when the target seq is committed, 130 when a signal stopped the job first.
    """
    return asyncio.run(replay_and_report(database_url, settings, out or sys.stdout))


async def replay_and_report(database_url: str, settings: ReplaySettings, out: TextIO) -> int:
    """Do the work of ``replay_command`` inside a running event loop."""
    job = await asyncio.to_thread(prepare_replay, database_url, settings)
    if job.complete:
        out.write(f"Backfill job {job.job!r} for {job.endpoint} is complete: seq {job.start_seq} to "
                  f"{job.target_seq}.\n")
        return 0
    log.info(f"replay backfill starting; it stops at seq {job.target_seq}",
             extra={"stream": job.endpoint, "job": job.job, "cursor": job.position})
    result = await run_replay(database_url, job, settings, ReplayProgress(job))
    for from_seq, to_seq, message in result.gaps:
        out.write(f"Gap: the relay no longer had the events after seq {from_seq} (it resumed at seq {to_seq}"
                  f"{'; ' + message if message else ''}). They are recorded in the gaps table; fetch the "
                  "affected repos with `indexer backfill --all` or `--repo DID`.\n")
    finished = result.job
    if finished.complete:
        out.write(f"Backfill job {finished.job!r} for {finished.endpoint} is complete: seq {finished.start_seq} "
                  f"to {finished.target_seq}, {result.events} events indexed in this run.\n")
        return 0
    out.write(f"Backfill job {finished.job!r} stopped at seq {finished.position} of {finished.target_seq}; "
              "run the same command again, or with --resume, to continue.\n")
    return 130


def repos_command(database_url: str, settings: RepoJobSettings, *, dids: list[str], list_relay: str | None,
                  desynchronized: bool, out: TextIO | None = None) -> int:
    """Run a repo job for ``indexer backfill --repo/--repos-file/--all/--desynchronized``; print the outcome.

    Returns 0 when every repo of the job ended done or in a final state, 1 when some failed.
    """
    out = out or sys.stdout
    job = RepoJob(database_url, settings)
    summary = asyncio.run(_with_repo_progress(job, job.run(dids=dids, list_relay=list_relay,
                                                          desynchronized=desynchronized)))
    for did, error in summary.failures[:20]:
        out.write(f"failed: {did}: {error}\n")
    if len(summary.failures) > 20:
        out.write(f"... and {len(summary.failures) - 20} more failures; see the backfill_repos table.\n")
    out.write(f"Job {summary.job!r}: {count_states(summary.states)}. This run indexed {summary.repos_indexed} "
              f"repos, {summary.records} records ({summary.records_per_second:,.0f} records/s), "
              f"{summary.deleted} deletions.\n")
    return 1 if summary.states.get("failed") else 0


async def _with_repo_progress(job: RepoJob, work, interval: float = 10.0):
    """Await ``work`` while logging the job's progress every ``interval`` seconds."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=interval)
        if done:
            return task.result()
        summary = job.summary
        log.info("repo backfill progress (indexed repos, rows written, count of failed repos)",
                 extra={"job": summary.job, "indexed": summary.repos_indexed, "rows": summary.records,
                        "count": len(summary.failures)})
