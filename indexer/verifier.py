"""The verification stage of the indexing loop: signing keys from DID documents, checks off the event loop.

``StreamIndexer`` hands each accepted ``#commit``, ``#sync`` and ``#labels`` event to
``EventVerifier.submit`` right after decoding, and ``#identity`` events to ``refresh``. Submitting
starts the DID resolution of every signer whose key is not cached, so the lookup runs while the
batch fills. Events whose keys are known are checked in chunks in a worker pool (processes by
default, because the Sync 1.1 proof is Python code that holds the GIL), so neither the event loop
nor the writer thread waits for ECDSA. ``outcomes`` is awaited when the batch is flushed. It waits
at most ``key_wait`` seconds for pending resolutions. An event whose key is still unknown after
that is checked without one, so its signature result is NULL with reason ``no_key`` (its record
hashes and proof are still checked).

What is checked (see ``indexer.verify``): for a commit, the signature with the repo's
``#atproto`` key and the commit's did and rev against the event. The Sync 1.1 proof is checked
when the commit has ``prevData``, and every record block must hash to its op's CID. For a sync,
the signature, did and rev are checked. For a label, ``sig`` with the ``#atproto_label`` key of its ``src``.

DID documents are re-fetched after an ``#identity`` event, and once per ``retry_after`` seconds
per DID after a signature mismatch (the key may have rotated); events checked with the old key
are then checked again with the new one. A failed resolution is tried again after
``retry_after`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from indexer import car
from indexer.crypto import InvalidKeyError, Verification, VerifyFailure, signing_key
from indexer.errors import DecodeError
from indexer.events import Commit, DropReason, Invalid, Label, Labels, Sync
from indexer.labels import encode_labels_frame
from indexer.resolve import PLC_DIRECTORY, DidDocument, DidResolver
from indexer.store import Batch, rebuild
from indexer.verify import block_cid, verify_commit, verify_commit_blocks, verify_label

log = logging.getLogger(__name__)

REPO_KEY = "atproto"
LABEL_KEY = "atproto_label"
# Events per task sent to the worker pool. Each task wakes the pool's threads, which compete with
# the event loop for the GIL: 128 instead of 32 took the indexer process from 93-94 to 86-87 µs of
# CPU per event with --verify record. A task takes about 20 ms (about 150 µs of checks per commit),
# short beside a batch.
CHUNK_SIZE = 128
# Signers whose keys are kept in memory (each entry is under a kilobyte).
MAX_SIGNERS = 200_000


class VerifyMode(enum.StrEnum):
    """``--verify``: off checks nothing; record stores the outcome; enforce also dead-letters failures."""

    OFF = "off"
    RECORD = "record"
    ENFORCE = "enforce"


# The default cap on worker processes. Each one is a Python process with its own imports
# (about 70 MB resident when idle, measured on Linux x86_64).
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Return the default worker process count: one per CPU, at most MAX_DEFAULT_WORKERS.

    Idle workers cost no CPU, and during catch-up the checks are most of the CPU work: on 2 cores,
    2 workers indexed the recorded commits about 1.2 times as fast as 1 (scripts/bench_ingest.py,
    step 6). The operating system shares the CPUs with decoding and PostgreSQL.
    """
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


@dataclass
class VerifySettings:
    """Options of the verification stage. ``workers`` 0 checks in one thread of this process."""

    mode: VerifyMode = VerifyMode.OFF
    plc_url: str = PLC_DIRECTORY
    key_wait: float = 0.5  # seconds a flush waits for pending DID resolutions
    workers: int = field(default_factory=default_workers)
    retry_after: float = 60.0  # seconds before a failed resolution or a mismatch refresh is repeated
    document_ttl: timedelta = timedelta(hours=24)
    resolve_timeout: float = 10.0
    allow_local_http: bool = False


@dataclass
class _Signer:
    """Cached signing keys of one DID: ``keys`` maps a fragment to a ``did:key``, None, or a BAD_KEY failure."""

    keys: dict[str, str | Verification | None] = field(default_factory=dict)
    fetched_at: float | None = None  # monotonic time of the last resolution that returned a document
    failed_at: float | None = None
    task: asyncio.Task | None = None
    mismatch_refresh_at: float | None = None


@dataclass
class _Job:
    """One submitted event: its work description (picklable) and the keys it was checked with."""

    seq: int
    work: tuple
    signers: list[tuple[str, str]]  # (did, fragment) per signature, in order
    keys: list[str | Verification | None] | None = None  # None while waiting for a resolution
    future: asyncio.Future | None = None


class EventVerifier:
    """Verify the events of one stream; use as an async context manager.

    ``database_url`` is where resolved DID documents are cached (``did_documents``); None keeps
    them in memory only. ``resolver`` is borrowed when given (tests pass one with a local PLC).
    """

    def __init__(self, settings: VerifySettings, database_url: str | None = None,
                 resolver: DidResolver | None = None) -> None:
        self.settings = settings
        self.resolver = resolver or DidResolver(
            plc_url=settings.plc_url, database_url=database_url, ttl=settings.document_ttl,
            timeout=settings.resolve_timeout, allow_local_http=settings.allow_local_http)
        self._owns_resolver = resolver is None
        self._signers: collections.OrderedDict[str, _Signer] = collections.OrderedDict()
        self._jobs: dict[int, _Job] = {}
        self._chunk: list[_Job] = []
        self._pool: concurrent.futures.Executor | None = None
        self.counts: collections.Counter = collections.Counter()  # "true", "false", "null" outcomes
        # The work of events whose outcome was NO_KEY, by seq, kept until take_unchecked(). It is
        # what a later check needs (see indexer.recheck).
        self.unchecked: dict[int, tuple] = {}
        self._failures_logged_at: float | None = None
        self._failures_unlogged = 0

    @property
    def enabled(self) -> bool:
        return self.settings.mode is not VerifyMode.OFF

    async def __aenter__(self) -> EventVerifier:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the worker pool and pending resolutions, and close the resolver if it is ours."""
        tasks = [signer.task for signer in self._signers.values() if signer.task is not None]
        for task in tasks:
            task.cancel()
        # Awaited so that their HTTP responses are released before the session closes.
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # Waits for the pool's manager thread, at most for the chunk being checked. At exit, Python
            # 3.11 wakes every manager thread still alive without the pool's lock (_python_exit in
            # concurrent/futures/process.py), so one closing its pipe then raises "Bad file descriptor".
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        if self._owns_resolver:
            await self.resolver.aclose()

    # --- intake ---------------------------------------------------------------------------------

    def submit(self, event: Any) -> None:
        """Start verifying ``event`` (a Commit, Sync or Labels); other events are ignored.

        Call it before collection filters drop ops: the commit proof needs every op.
        """
        job = _job_for(event)
        if job is not None:
            self._submit(job)

    def submit_work(self, key: int, work: tuple) -> None:
        """Start checking ``work`` (as ``_job_for`` builds it) under ``key``, which ``outcomes`` takes as a seq."""
        self._submit(_job(key, work))

    def take_unchecked(self) -> dict[int, tuple]:
        """Return and forget the work of the events whose outcome was NO_KEY, by seq."""
        unchecked, self.unchecked = self.unchecked, {}
        return unchecked

    def _submit(self, job: _Job) -> None:
        self._jobs[job.seq] = job
        keys = [self._cached_key(did, fragment) for did, fragment in job.signers]
        if any(key is _PENDING for key in keys):
            return  # dispatched when its resolutions finish, or at the flush
        job.keys = keys
        self._queue(job)

    def refresh(self, did: str) -> None:
        """Re-fetch the DID document of ``did`` (after an ``#identity`` event); events submitted later wait for it."""
        if not self.enabled:
            return
        signer = self._signer(did)
        if signer.task is not None and not signer.task.done():
            signer.task.cancel()
        signer.task = asyncio.get_running_loop().create_task(self._resolve(did, refresh=True))

    def _signer(self, did: str) -> _Signer:
        signer = self._signers.get(did)
        if signer is None:
            signer = self._signers[did] = _Signer()
            while len(self._signers) > MAX_SIGNERS:
                self._signers.popitem(last=False)
        else:
            self._signers.move_to_end(did)
        return signer

    def _cached_key(self, did: str, fragment: str) -> Any:
        """Return the key of ``did#fragment``, or _PENDING after starting a resolution."""
        signer = self._signer(did)
        if signer.task is not None:
            return _PENDING
        now = time.monotonic()
        fresh = signer.fetched_at is not None and now - signer.fetched_at < self.settings.document_ttl.total_seconds()
        failed_recently = signer.failed_at is not None and now - signer.failed_at < self.settings.retry_after
        if fresh or failed_recently:
            return signer.keys.get(fragment)
        signer.task = asyncio.get_running_loop().create_task(self._resolve(did))
        return _PENDING

    async def _resolve(self, did: str, refresh: bool = False) -> None:
        """Resolve ``did``, store its keys, then queue the jobs that were waiting for them."""
        signer = self._signer(did)
        try:
            result = await self.resolver.resolve(did, refresh=refresh)
        except Exception as error:  # the cache database failing must not stop indexing
            log.warning("DID resolution failed", extra={"did": did, "error": f"{type(error).__name__}: {error}"})
            result = None
        if isinstance(result, DidDocument):
            signer.keys = {fragment: _key_of(result.document, fragment) for fragment in (REPO_KEY, LABEL_KEY)}
            signer.fetched_at, signer.failed_at = time.monotonic(), None
        else:
            if result is not None:
                self._log_failure(did, result.error)
            signer.failed_at = time.monotonic()
        signer.task = None
        self._queue_waiting()

    def _log_failure(self, did: str, error: str) -> None:
        """Log a failed resolution, at most once per ``retry_after`` seconds, with the count of those not logged."""
        now = time.monotonic()
        if self._failures_logged_at is not None and now - self._failures_logged_at < self.settings.retry_after:
            self._failures_unlogged += 1
            return
        log.warning("DID resolution failed; events signed by it are stored with verified NULL until it resolves",
                    extra={"did": did, "error": error, "count": self._failures_unlogged + 1})
        self._failures_logged_at, self._failures_unlogged = now, 0

    def _queue_waiting(self) -> None:
        for job in self._jobs.values():
            if job.keys is None and job.future is None:
                keys = [self._known_key(did, fragment) for did, fragment in job.signers]
                if all(key is not _PENDING for key in keys):
                    job.keys = keys
                    self._queue(job)

    def _known_key(self, did: str, fragment: str) -> Any:
        signer = self._signers.get(did)
        if signer is None or signer.task is not None:
            return _PENDING
        return signer.keys.get(fragment)

    def _queue(self, job: _Job) -> None:
        self._chunk.append(job)
        if len(self._chunk) >= CHUNK_SIZE:
            self._dispatch()

    def _dispatch(self) -> None:
        """Send the queued jobs to the worker pool as one task."""
        if not self._chunk:
            return
        jobs, self._chunk = self._chunk, []
        work = [(job.work, job.keys) for job in jobs]
        future = asyncio.get_running_loop().run_in_executor(self._executor(), verify_work, work)
        for index, job in enumerate(jobs):
            job.future = _pick(future, index)

    def _executor(self) -> concurrent.futures.Executor:
        if self._pool is None:
            if self.settings.workers == 0:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verify")
            else:
                # spawn, not fork: the indexer process has threads (the writer) and open sockets.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.settings.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=prepare_worker, initargs=(os.getpid(),))
        return self._pool

    # --- results --------------------------------------------------------------------------------

    async def outcomes(self, seqs: list[int]) -> dict[int, Any]:
        """Return the outcome of each submitted event among ``seqs`` and forget those events.

        The value is a ``Verification`` for a commit or sync, and a list with one per label for
        a #labels event. Waits at most ``key_wait`` seconds for pending DID resolutions.
        """
        jobs = [self._jobs.pop(seq) for seq in seqs if seq in self._jobs]
        if not jobs:
            return {}
        waiting = [job for job in jobs if job.keys is None]
        if waiting:
            await self._wait_for_keys(waiting)
        self._dispatch()
        results = {job.seq: await job.future for job in jobs}
        await self._retry_mismatches(jobs, results)
        outcomes = {seq: _combine(result) for seq, result in results.items()}
        for job in jobs:
            outcome = outcomes[job.seq]
            for single in singles(outcome):
                self.counts[_count_label(single)] += 1
            if lacks_key(outcome):
                self.unchecked[job.seq] = job.work
        return outcomes

    async def _wait_for_keys(self, waiting: list[_Job]) -> None:
        tasks = {signer.task for did, _ in _signers_of(waiting)
                 if (signer := self._signers.get(did)) is not None and signer.task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.key_wait)
        for job in waiting:
            if job.keys is None:
                keys = [self._known_key(did, fragment) for did, fragment in job.signers]
                job.keys = [None if key is _PENDING else key for key in keys]
                self._queue(job)

    async def _retry_mismatches(self, jobs: list[_Job], results: dict[int, Any]) -> None:
        """Re-fetch the documents of signers whose signature did not match, and check again if the key changed."""
        mismatched = [job for job in jobs if _has_mismatch(results[job.seq])]
        now = time.monotonic()
        dids = set()
        for did, _ in _signers_of(mismatched):
            signer = self._signer(did)
            if signer.mismatch_refresh_at is None or now - signer.mismatch_refresh_at >= self.settings.retry_after:
                signer.mismatch_refresh_at = now
                dids.add(did)
        if not dids:
            return
        tasks = []
        for did in dids:
            self.refresh(did)
            tasks.append(self._signers[did].task)
        await asyncio.wait(tasks, timeout=self.settings.key_wait)
        again = []
        for job in mismatched:
            keys = [self._known_key(did, fragment) for did, fragment in job.signers]
            if all(key is not _PENDING for key in keys) and keys != job.keys:
                again.append(replace(job, keys=keys, future=None))
        for job in again:
            self._chunk.append(job)
        self._dispatch()
        for job in again:
            results[job.seq] = await job.future


_PENDING = object()


def _key_of(document: dict, fragment: str) -> str | Verification | None:
    """Return the ``did:key`` of ``#fragment`` in a DID document, None when absent, or a BAD_KEY failure."""
    try:
        key = signing_key(document, fragment)
    except InvalidKeyError as error:
        return Verification.failed(VerifyFailure.BAD_KEY, str(error))
    return key.did_key if key is not None else None


def _signers_of(jobs: list[_Job]) -> set[tuple[str, str]]:
    return {signer for job in jobs for signer in job.signers}


async def _pick(future: asyncio.Future, index: int) -> Any:
    return (await future)[index]


def _job_for(event: Any) -> _Job | None:
    if isinstance(event, Commit):
        if event.too_big:
            return None  # a deprecated tooBig commit carries too few blocks to check
        ops = [{"action": op.action, "path": op.path, "cid": op.cid, "prev": op.prev} for op in event.ops]
        return _job(event.seq, ("commit", event.blocks, event.commit_cid, event.did, event.rev, ops, event.prev_data))
    if isinstance(event, Sync):
        return _job(event.seq, ("sync", event.blocks, event.did, event.rev))
    if isinstance(event, Labels) and event.labels:
        return _job(event.seq, ("labels", list(event.labels)))
    return None


def _job(seq: int, work: tuple) -> _Job:
    """Return the job of ``work``, with the key of each signature it carries."""
    return _Job(seq, work, signers(work))


def signers(work: tuple) -> list[tuple[str, str]]:
    """Return ``(did, key fragment)`` of each signature in ``work``: one for a commit or sync, one per label."""
    if work[0] == "commit":
        return [(work[3], REPO_KEY)]
    if work[0] == "sync":
        return [(work[2], REPO_KEY)]
    return [(label.src, LABEL_KEY) for label in work[1]]


def singles(outcome: Any) -> list[Verification]:
    """Return the Verifications of an outcome: itself for a commit or sync, one per label for #labels."""
    return outcome if isinstance(outcome, list) else [outcome]


def lacks_key(outcome: Any) -> bool:
    """True when a signature of the outcome could not be checked because no key was known."""
    return any(single.reason is VerifyFailure.NO_KEY for single in singles(outcome))


# --- worker side ---------------------------------------------------------------------------------

def verify_work(items: list[tuple[tuple, list]]) -> list[Any]:
    """Check a chunk of events in a worker; return per event a result tuple (see ``_check``).

    Runs in a worker process, so it takes and returns only picklable values.
    """
    return [_check(work, keys) for work, keys in items]


def _check(work: tuple, keys: list) -> tuple[str, list[Verification]]:
    """Return ``(kind, results)``: a commit's signature, records and proof results, a sync's one
    result, or one result per label."""
    kind = work[0]
    if kind == "commit":
        _, blocks, commit_cid, did, rev, ops, prev_data = work
        try:
            block_map = car.read_car(blocks).blocks if blocks else {}
        except DecodeError as error:
            failure = Verification.failed(VerifyFailure.INVALID_COMMIT, f"the commit's blocks are not a readable CAR: {error}")
            return kind, [failure, failure, failure]
        checks = verify_commit_blocks(block_map, commit_cid, keys[0], did, rev, ops, prev_data)
        return kind, [checks.signature, checks.records, checks.proof]
    if kind == "sync":
        _, blocks, did, rev = work
        return kind, [_check_sync(blocks, keys[0], did, rev)]
    labels: list[Label] = work[1]
    return kind, [verify_label(label, key) for label, key in zip(labels, keys)]


def _check_sync(blocks: bytes, key: Any, did: str, rev: str) -> Verification:
    try:
        parsed = car.read_car(blocks)
    except DecodeError as error:
        return Verification.failed(VerifyFailure.INVALID_COMMIT, f"the #sync blocks are not a readable CAR: {error}")
    if not parsed.roots or parsed.roots[0] not in parsed.blocks:
        return Verification.failed(VerifyFailure.MISSING_COMMIT_BLOCK, "the #sync CAR does not contain its root commit block")
    root = parsed.roots[0]
    block = parsed.blocks[root]
    if block_cid(root, block) != root:
        return Verification.failed(VerifyFailure.INVALID_COMMIT, "the #sync commit block does not hash to its CID")
    return verify_commit(block, key, did, rev)


# --- combining -----------------------------------------------------------------------------------

def _combine(result: tuple[str, list[Verification]]) -> Any:
    """Reduce a worker result to what rows store: one Verification, or a list for labels."""
    kind, parts = result
    if kind == "commit":
        return commit_outcome(*parts)
    if kind == "sync":
        return parts[0]
    return parts


def commit_outcome(signature: Verification, records: Verification, proof: Verification) -> Verification:
    """Return the stored outcome of a commit: the first failed check, else the signature's result.

    A commit without ``prevData`` (proof NO_PREV_DATA) counts as verified when its signature and
    records are, because commits before Sync 1.1 carry no proof.
    """
    for check in (signature, records, proof):
        if check.verified is False:
            return check
    return signature


def _has_mismatch(result: tuple[str, list[Verification]]) -> bool:
    return any(part.reason is VerifyFailure.SIGNATURE_MISMATCH for part in result[1])


def _count_label(outcome: Verification) -> str:
    return {True: "true", False: "false", None: "null"}[outcome.verified]


# --- enforce -------------------------------------------------------------------------------------

def dead_letter_failures(batch: Batch, outcomes: dict[int, Any]) -> tuple[Batch, int]:
    """Return ``batch`` with every failed event (or label) replaced by a SIGNATURE_INVALID dead letter.

    Also returns how many were replaced. NULL outcomes (not checked) are kept. The returned batch
    keeps the cursor and the retried dead letters of ``batch``.
    """
    events = []
    replaced = 0
    kept_outcomes = dict(outcomes)
    for event in batch.events:
        outcome = outcomes.get(getattr(event, "seq", None)) if not isinstance(event, Invalid) else None
        if isinstance(event, Labels) and isinstance(outcome, list):
            kept, letters = _split_labels(event, outcome)
            kept_outcomes[event.seq] = [single for single in outcome if single.verified is not False]
            replaced += len(letters)
            events.extend([Labels(event.seq, kept), *letters])
        elif isinstance(outcome, Verification) and outcome.verified is False:
            replaced += 1
            events.append(Invalid(DropReason.SIGNATURE_INVALID, f"{outcome.reason}: {outcome.detail}",
                                  raw=event.blocks, t="#commit" if isinstance(event, Commit) else "#sync",
                                  seq=event.seq, did=event.did))
        else:
            events.append(event)
    if not replaced:
        return batch, 0
    rebuilt = rebuild(batch.endpoint, events, kept_outcomes, batch.backlog)
    rebuilt.cursor, rebuilt.cursor_time = batch.cursor, batch.cursor_time
    rebuilt.retried_dead_letters = batch.retried_dead_letters
    return rebuilt, replaced


def _split_labels(event: Labels, outcomes: list[Verification]) -> tuple[list[Label], list[Invalid]]:
    kept, letters = [], []
    for label, outcome in zip(event.labels, outcomes):
        if outcome.verified is False:
            raw = encode_labels_frame(Labels(event.seq, [label]))
            letters.append(Invalid(DropReason.SIGNATURE_INVALID, f"{outcome.reason}: {outcome.detail}",
                                   raw=raw, t="#labels", seq=event.seq, did=label.src))
        else:
            kept.append(label)
    return kept, letters


def prepare_worker(parent_pid: int) -> None:
    """Set up a verification worker process: leave signals to the parent, and die with it.

    Ctrl-C reaches the whole process group; the parent commits and shuts the pool down, so a worker
    must not print a KeyboardInterrupt traceback. SIGTERM keeps its default action, because the pool
    terminates broken workers with it. A parent killed with SIGKILL cannot shut the pool
    down, so each worker watches for that and exits instead of lingering as an orphan.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_when_orphaned, name="orphan-watch", daemon=True).start()
