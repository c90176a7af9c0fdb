"""Repo backfill jobs: which repos to fetch, their per-repo state, and the workers that fetch them.

A job is a name (``backfill_repos.job``) and a set of repos, each in one state: ``pending``,
``in_progress``, ``done`` (at ``rev``), ``failed`` (with ``error``), or a final state the PDS
returned: ``deactivated``, ``takendown``, ``suspended``, ``not_found``. Repos enter a job from
``--repo``/``--repos-file``, from ``listRepos`` on a relay (``--all``, paged, its cursor kept in
``backfill_listings``), or from ``actors.desynchronized_at`` (``--desynchronized``).

Each run first puts the job's ``in_progress`` rows (left by an interrupted run) and ``failed`` rows
back to ``pending``, then ``concurrency`` workers claim pending repos one at a time. A worker
resolves the DID, downloads the repo to a temporary file, and indexes it with
``repo_export.index_repo``. On success the repo's ``desynchronized_at`` mark is cleared, unless a
new mark arrived during the fetch. ``done`` and final rows are not fetched again unless
``refetch`` is set (or, for ``--desynchronized``, the repo is marked again).

One process per job at a time: a second process would put the first one's in-progress repos back
to pending and fetch them twice (harmlessly, since indexing is idempotent, but wastefully).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import psycopg

from indexer.errors import ConfigError
from indexer.repo_export import REPO_ENDPOINT, IndexedRepo, RepoExportError, index_repo
from indexer.repo_fetch import LIST_REPOS, FetchFailed, RepoFetcher, RepoUnavailable, relay_http_url
from indexer.resolve import PLC_DIRECTORY, DidResolver, ResolveFailure
from indexer.store import Store
from indexer.stream import Backoff

log = logging.getLogger(__name__)

REPOS_JOB = "repos"
ALL_JOB = "all"
RESYNC_JOB = "resync"
FINAL_STATES = ("deactivated", "takendown", "suspended", "not_found")
# listRepos statuses of inactive repos that cannot be fetched now, mapped to the state recorded.
LISTED_FINAL_STATUSES = {"takendown": "takendown", "suspended": "suspended", "deactivated": "deactivated"}


@dataclass
class RepoJobSettings:
    """Options of a repo backfill job."""

    job: str = REPOS_JOB
    concurrency: int = 4
    host_rate: float = 5.0  # getRepo and listRepos request starts per second per host
    host_concurrency: int = 4
    max_attempts: int = 5
    plc_url: str = PLC_DIRECTORY
    allow_local_http: bool = False  # tests only: http:// PDS and did:web on 127.0.0.1
    refetch: bool = False
    batch_size: int = 2000
    work_dir: Path | None = None  # where repos are downloaded; None: the system temporary directory
    did_cache_ttl: timedelta = timedelta(hours=24)
    backoff: Backoff | None = None  # retry backoff of HTTP requests; None: 1 s base, 60 s cap


@dataclass
class RepoJobSummary:
    """Counts after a run: repos per state in the job, and what this run indexed."""

    job: str
    states: dict[str, int]
    repos_indexed: int = 0
    records: int = 0
    deleted: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (did, error) of this run

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class RepoJob:
    """Run one repo backfill job to the end: enqueue, enumerate (``--all``), fetch and index.

    ``run`` returns when no repo of the job is pending and enumeration, if any, has finished. It
    is resumable: interrupting it (cancellation, a signal) leaves state that the next run continues.
    """

    def __init__(self, database_url: str, settings: RepoJobSettings) -> None:
        self.database_url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.settings = settings
        self.job = settings.job
        self.summary = RepoJobSummary(job=self.job, states={})
        self._connection: psycopg.AsyncConnection | None = None
        self._listing_done = asyncio.Event()
        self._listing_done.set()

    async def run(self, *, dids: list[str] = (), list_relay: str | None = None,
                  desynchronized: bool = False) -> RepoJobSummary:
        """Add ``dids`` (and the relay's listing, and desynchronized repos) to the job, then process it."""
        started = time.monotonic()
        self._connection = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        try:
            await self._enqueue(dids, desynchronized)
            async with aiohttp.ClientSession(headers={"User-Agent": "indexer (atproto archival indexer)"}) as session:
                fetcher = self._fetcher(session)
                async with DidResolver(plc_url=self.settings.plc_url, database_url=self.database_url,
                                       ttl=self.settings.did_cache_ttl, allow_local_http=self.settings.allow_local_http,
                                       session=session) as resolver:
                    await self._process(fetcher, resolver, list_relay)
            self.summary.states = await self.states()
        finally:
            self.summary.seconds = time.monotonic() - started
            await self._connection.close()
        return self.summary

    def _fetcher(self, session: aiohttp.ClientSession) -> RepoFetcher:
        backoff = self.settings.backoff
        return RepoFetcher(
            session, host_rate=self.settings.host_rate, host_concurrency=self.settings.host_concurrency,
            max_attempts=self.settings.max_attempts, allow_local_http=self.settings.allow_local_http,
            backoff=(lambda: Backoff(base=backoff.base, cap=backoff.cap, rng=backoff.rng)) if backoff
            else (lambda: Backoff(base=1.0, cap=60.0)))

    async def _process(self, fetcher: RepoFetcher, resolver: DidResolver, list_relay: str | None) -> None:
        tasks = []
        if list_relay is not None:
            self._listing_done.clear()
            tasks.append(asyncio.create_task(self._enumerate(fetcher, list_relay)))
        workers = [asyncio.create_task(self._worker(fetcher, resolver, index))
                   for index in range(self.settings.concurrency)]
        try:
            await asyncio.gather(*tasks, *workers)
        finally:
            for task in [*tasks, *workers]:
                task.cancel()
            await asyncio.gather(*tasks, *workers, return_exceptions=True)

    # --- state --------------------------------------------------------------------------------

    async def _enqueue(self, dids: list[str], desynchronized: bool) -> None:
        connection = self._connection
        conflict = ("DO UPDATE SET state = 'pending', error = NULL, updated_at = now() "
                    "WHERE backfill_repos.state <> 'in_progress'") if self.settings.refetch else "DO NOTHING"
        async with connection.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO backfill_repos (job, did, state) VALUES (%s, %s, 'pending') ON CONFLICT (job, did) {conflict}",
                [(self.job, did) for did in dict.fromkeys(dids)])
        if desynchronized:
            await self._enqueue_desynchronized()
        # Repos an interrupted run left in progress, and failed ones, are tried again.
        await connection.execute(
            "UPDATE backfill_repos SET state = 'pending', updated_at = now() "
            "WHERE job = %s AND state IN ('in_progress', 'failed')", (self.job,))

    async def _enqueue_desynchronized(self) -> None:
        # A repo marked again after it was fetched is fetched again. A final state recorded after
        # the mark is kept, so a taken-down repo is not requested on every run.
        await self._connection.execute(
            "INSERT INTO backfill_repos (job, did, state) "
            "SELECT %(job)s, did, 'pending' FROM actors WHERE desynchronized_at IS NOT NULL "
            "ON CONFLICT (job, did) DO UPDATE SET state = 'pending', error = NULL, updated_at = now() "
            "WHERE backfill_repos.state = 'done' OR (backfill_repos.state = ANY(%(final)s) "
            "AND backfill_repos.updated_at < (SELECT desynchronized_at FROM actors a WHERE a.did = EXCLUDED.did))",
            {"job": self.job, "final": list(FINAL_STATES)})

    async def _claim(self) -> tuple[str, datetime | None] | None:
        """Mark one pending repo in progress; return its DID and its desynchronized mark, or None."""
        cursor = await self._connection.execute(
            "UPDATE backfill_repos b SET state = 'in_progress', attempts = b.attempts + 1, updated_at = now() "
            "FROM (SELECT did FROM backfill_repos WHERE job = %(job)s AND state = 'pending' "
            "      ORDER BY created_at, did LIMIT 1 FOR UPDATE SKIP LOCKED) AS next "
            "WHERE b.job = %(job)s AND b.did = next.did "
            "RETURNING b.did, (SELECT desynchronized_at FROM actors a WHERE a.did = b.did)",
            {"job": self.job})
        row = await cursor.fetchone()
        return (row[0], row[1]) if row else None

    async def _finish(self, did: str, state: str, *, error: str | None = None, rev: str | None = None,
                      records: int | None = None, deleted: int | None = None, pds: str | None = None,
                      clear_mark: datetime | None = None) -> None:
        """Record a repo's outcome. With ``clear_mark``, also clear that desynchronized mark, atomically.

        The mark is cleared only if it still has the value seen at claim time, so a repo marked again
        while it was being fetched stays marked. Both updates share one statement so a reader never
        sees the repo done with its old mark still set.
        """
        await self._connection.execute(
            "WITH cleared AS (UPDATE actors SET desynchronized_at = NULL, updated_at = now() "
            "                 WHERE did = %(did)s AND desynchronized_at = %(mark)s) "
            "UPDATE backfill_repos SET state = %(state)s, error = %(error)s, rev = COALESCE(%(rev)s, rev), "
            "records = COALESCE(%(records)s, records), deleted = COALESCE(%(deleted)s, deleted), "
            "pds_endpoint = COALESCE(%(pds)s, pds_endpoint), updated_at = now() "
            "WHERE job = %(job)s AND did = %(did)s",
            {"did": did, "mark": clear_mark, "state": state, "error": error, "rev": rev, "records": records,
             "deleted": deleted, "pds": pds, "job": self.job})

    async def states(self) -> dict[str, int]:
        """Return the number of the job's repos in each state."""
        cursor = await self._connection.execute(
            "SELECT state, count(*) FROM backfill_repos WHERE job = %s GROUP BY state ORDER BY state", (self.job,))
        return {state: count for state, count in await cursor.fetchall()}

    # --- enumeration --------------------------------------------------------------------------

    async def _enumerate(self, fetcher: RepoFetcher, relay: str) -> None:
        """Page through listRepos, adding each repo to the job; resume from the stored cursor."""
        endpoint = f"{relay_http_url(relay)}/xrpc/{LIST_REPOS}"
        try:
            cursor = await self._connection.execute(
                "SELECT cursor, completed_at FROM backfill_listings WHERE endpoint = %s AND job = %s",
                (endpoint, self.job))
            row = await cursor.fetchone()
            if row is not None and row[1] is not None:
                log.info("repo listing already complete", extra={"stream": endpoint, "job": self.job})
                return
            position = row[0] if row else None
            while True:
                repos, position = await fetcher.list_repos(relay, position)
                await self._add_listed(endpoint, repos, position)
                if position is None:
                    log.info("repo listing complete", extra={"stream": endpoint, "job": self.job})
                    return
        finally:
            self._listing_done.set()

    async def _add_listed(self, endpoint: str, repos, next_cursor: str | None) -> None:
        rows = []
        for repo in repos:
            final = LISTED_FINAL_STATUSES.get(repo.status or "") if repo.active is False else None
            error = f"listRepos: inactive, status {repo.status}" if final else None
            rows.append((self.job, repo.did, final or "pending", error))
        async with self._connection.transaction():
            async with self._connection.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO backfill_repos (job, did, state, error) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (job, did) DO NOTHING", rows)
                await cursor.execute(
                    "INSERT INTO backfill_listings (endpoint, job, cursor, repos, completed_at) "
                    "VALUES (%(endpoint)s, %(job)s, %(cursor)s, %(count)s, "
                    "        CASE WHEN %(cursor)s::text IS NULL THEN now() END) "
                    "ON CONFLICT (endpoint, job) DO UPDATE SET cursor = EXCLUDED.cursor, "
                    "repos = backfill_listings.repos + EXCLUDED.repos, completed_at = EXCLUDED.completed_at, "
                    "updated_at = now()",
                    {"endpoint": endpoint, "job": self.job, "cursor": next_cursor, "count": len(repos)})

    # --- fetching -----------------------------------------------------------------------------

    async def _worker(self, fetcher: RepoFetcher, resolver: DidResolver, index: int) -> None:
        store = Store(self.database_url, REPO_ENDPOINT, job=self.job)
        try:
            while True:
                claimed = await self._claim()
                if claimed is None:
                    if self._listing_done.is_set():
                        return
                    await asyncio.sleep(0.2)
                    continue
                did, desynchronized_at = claimed
                await self._fetch_and_index(fetcher, resolver, store, did, desynchronized_at)
        finally:
            await asyncio.to_thread(store.close)

    async def _fetch_and_index(self, fetcher: RepoFetcher, resolver: DidResolver, store: Store, did: str,
                               desynchronized_at: datetime | None) -> None:
        """Fetch and index one repo and record the outcome in its state row."""
        pds = None
        try:
            resolved = await resolver.resolve(did)
            if isinstance(resolved, ResolveFailure):
                raise FetchFailed(f"resolving {did} failed: {resolved.error}")
            pds = resolved.pds_endpoint
            if pds is None:
                raise FetchFailed(f"the DID document of {did} has no #atproto_pds service")
            indexed = await self._download_and_index(fetcher, store, pds, did)
        except RepoUnavailable as error:
            log.info("repo unavailable", extra={"did": did, "reason": error.state, "error": str(error)})
            await self._finish(did, error.state, error=str(error), pds=pds)
            return
        except (FetchFailed, RepoExportError) as error:
            log.warning("repo backfill failed", extra={"did": did, "error": str(error)})
            self.summary.failures.append((did, str(error)))
            await self._finish(did, "failed", error=str(error), pds=pds)
            return
        await self._finish(did, "done", rev=indexed.rev, records=indexed.records, deleted=indexed.deleted, pds=pds,
                           clear_mark=desynchronized_at)
        self.summary.repos_indexed += 1
        self.summary.records += indexed.records
        self.summary.deleted += indexed.deleted
        log.info("repo indexed", extra={"did": did, "rev": indexed.rev, "count": indexed.records})

    async def _download_and_index(self, fetcher: RepoFetcher, store: Store, pds: str, did: str) -> IndexedRepo:
        with tempfile.TemporaryFile(dir=self.settings.work_dir, prefix="indexer-repo-") as file:
            await fetcher.fetch_repo(pds, did, file)
            return await asyncio.to_thread(index_repo, store, file, did, batch_size=self.settings.batch_size)


def count_states(states: dict[str, int]) -> str:
    """Format per-state counts as ``done 3, failed 1`` in a fixed order."""
    order = ["done", *FINAL_STATES, "failed", "in_progress", "pending"]
    counts = Counter(states)
    return ", ".join(f"{state} {counts[state]}" for state in order if counts[state]) or "no repos"


def read_repos_file(path: Path) -> list[str]:
    """Return the DIDs in ``path``, one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the repos file {path}: {error.strerror}") from None
    dids = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not entry.startswith("did:"):
            raise ConfigError(f"{path}:{number}: {entry!r} is not a DID; expected one DID per line")
        dids.append(entry)
    return dids
