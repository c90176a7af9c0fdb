"""The indexing loop of one stream: receive frames, decode them, batch them, commit them.

``StreamIndexer`` ties a ``StreamClient`` to a ``Store``. Events are decoded in arrival order and
added to the open batch; a batch is committed when it holds ``batch_size`` events or its oldest
event is ``batch_interval`` seconds old, in worker threads so that receiving goes on meanwhile.
A full batch is handed to the writer and the next one fills while it commits, so decoding overlaps
PostgreSQL's share of the write. The writer uses the store's two lanes (connections) in turn: a
batch's rows are staged on its lane while the batch before it commits on the other one. A full
batch waits until the batch before it is staged and the one before that has committed, so at most
three batches are held. Batches commit one at a time, in stream order. Once a commit fails or is
abandoned (a second signal), no later batch commits: its cursor would cover the events of the
batch that did not commit.

Cursor contract: the cursor stored with a batch is the seq of its last event, and every event at or
below it is committed. Before every reconnect the open batch is committed and the connection asks
for that cursor, so the relay resends nothing we lack. Events whose seq is not above the highest
seq already accepted (committed or in an open batch) are counted as replayed and skipped: a replay
after reconnecting, or a duplicate or out-of-order seq. So the cursor never moves backwards, and
which events are kept does not depend on where batches end.

While the database is unreachable, the write is retried with backoff and jitter, one log line per
state change; the cursor does not move meanwhile. A write that fails because of our own code stops
the process (``StoreError``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from indexer import frames
from indexer.errors import DatabaseUnavailable, FutureCursorError
from indexer.events import (
    Commit,
    DropReason,
    ErrorFrame,
    Identity,
    Info,
    Invalid,
    Labels,
    Skipped,
    SkipReason,
    Sync,
)
from indexer.labels import subject_did
from indexer.recheck import backlog_row
from indexer.store import Batch, Gap, Store
from indexer.stream import Backoff, OversizedMessage, StreamClient
from indexer.verifier import EventVerifier, VerifyMode, dead_letter_failures

log = logging.getLogger(__name__)

REPOS_METHOD = "com.atproto.sync.subscribeRepos"
LABELS_METHOD = "com.atproto.label.subscribeLabels"

# Events per batch during catch-up. At the live tip a batch commits after batch_interval, long
# before it fills. Larger batches spread the fixed cost of each commit over more events. Measured
# end to end on 2 cores, events/s by batch size: 1000: 12,700, 2000: 15,200, 3000: 16,700,
# 5000: 16,400, 10000: 15,200 (docs/performance.md).
DEFAULT_BATCH_SIZE = 3000


@dataclass
class Filters:
    """Which repos and collections to index; empty means everything.

    On a label stream ``dids`` keeps the labels whose subject (the DID, or the repo of an AT-URI)
    is listed; ``collections`` does not apply there.

    ``collections`` holds NSIDs or prefixes ending in ``.*`` (``app.bsky.feed.*``). Events and ops
    that do not match are counted as filtered, and the cursor still moves past them.
    """

    collections: tuple[str, ...] = ()
    dids: frozenset[str] = frozenset()

    def wants_collection(self, collection: str) -> bool:
        if not self.collections:
            return True
        for pattern in self.collections:
            if pattern.endswith(".*"):
                if collection.startswith(pattern[:-1]):
                    return True
            elif collection == pattern:
                return True
        return False

    def wants_did(self, did: str | None) -> bool:
        return not self.dids or did in self.dids


@dataclass
class IngestCounters:
    """Running totals for one stream, read by status lines and metrics."""

    received: int = 0
    indexed: int = 0
    replayed: int = 0
    batches: int = 0
    events_by_kind: collections.Counter = field(default_factory=collections.Counter)
    ops: collections.Counter = field(default_factory=collections.Counter)  # (collection, action)
    skipped: collections.Counter = field(default_factory=collections.Counter)  # SkipReason
    dead_letters: collections.Counter = field(default_factory=collections.Counter)  # DropReason
    commit_seconds: list[float] = field(default_factory=list)
    # Seconds from the arrival of a batch's first event to its commit, for the latest batches.
    batch_lags: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    last_seq: int | None = None
    last_event_time: str | None = None


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class RateLimitedWarnings:
    """Log the first problem of each reason per interval, then only count, so hostile input cannot flood logs."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.last_logged: dict[str, float] = {}
        self.suppressed: collections.Counter = collections.Counter()

    def warn(self, reason: str, message: str, **extra: Any) -> None:
        now = time.monotonic()
        last = self.last_logged.get(reason)
        if last is not None and now - last < self.interval:
            self.suppressed[reason] += 1
            return
        self.last_logged[reason] = now
        suppressed = self.suppressed.pop(reason, 0)
        if suppressed:
            extra["count"] = suppressed
        log.warning(message, extra={"reason": reason, **extra})


class StreamIndexer:
    """Index one stream endpoint (a relay's subscribeRepos or a labeler's subscribeLabels)."""

    def __init__(
        self,
        store: Store,
        client_factory: Callable[[Callable], StreamClient],
        *,
        decode: Callable[[bytes], Any] = frames.decode_repo_frame,
        filters: Filters | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_interval: float = 0.2,
        stop_at_seq: int | None = None,
        db_backoff: Backoff | None = None,
        verifier: EventVerifier | None = None,
    ) -> None:
        self.store = store
        self.endpoint = store.endpoint
        self.decode = decode
        self.filters = filters or Filters()
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.stop_at_seq = stop_at_seq
        self.db_backoff = db_backoff or Backoff(base=0.5, cap=30.0)
        # None or mode off: rows keep verified NULL.
        self.verifier = verifier if verifier is not None and verifier.enabled else None
        self.counters = IngestCounters()
        self.warnings = RateLimitedWarnings()
        self.committed: int | None = None
        self.accepted: int | None = None  # highest seq added to a batch, or the committed cursor
        self.batch = Batch(endpoint=self.endpoint)
        self.batch_started: float | None = None
        self.pending_gap: Gap | None = None
        self.write_lock = asyncio.Lock()  # held by the batch being committed
        # The commits of the last two batches handed over, oldest first. last_staged resolves once the
        # last of them is staged.
        self.recent_commits: collections.deque[asyncio.Future] = collections.deque(maxlen=2)
        self.last_staged: asyncio.Future | None = None
        self.lane_locks = [asyncio.Lock(), asyncio.Lock()]  # held by the batch that uses the store's lane
        self.next_lane = 0
        self.commits: set[asyncio.Future] = set()  # commits queued or running, cancelled on abandon
        self.commit_abandoned = False  # a commit was cancelled (abandon): no later batch may commit
        self.client = client_factory(self._cursor_for_connect)
        self.stopping = False
        self.abandon = False  # set on a second signal: exit without committing the open batch
        self.reached_stop_seq = False
        self.write_failure: BaseException | None = None  # the failed commit that stops run(); see _commit_in_order

    async def run(self) -> None:
        """Index until ``stop()`` is called or ``stop_at_seq`` is reached; commit what was received."""
        self.committed = await self._with_database(self.store.read_cursor)
        self.accepted = self.committed
        log.info("indexing stream", extra={"stream": self.endpoint, "cursor": self.committed})
        timer = asyncio.create_task(self._flush_on_interval())
        try:
            async with self.client:
                async for item in self.client.frames():
                    self._handle(item)
                    if len(self.batch) >= self.batch_size:
                        await self._hand_over()
                    if self.stopping:
                        break
        finally:
            timer.cancel()
            try:
                if self.abandon:
                    for commit in list(self.commits):
                        commit.cancel()
                elif self.write_failure is None:
                    await self.flush()
            finally:
                if self.verifier is not None:
                    await self.verifier.aclose()
        if self.write_failure is not None:
            raise self.write_failure
        log.info("stream stopped", extra={"stream": self.endpoint, "cursor": self.committed})

    def stop(self) -> None:
        """Ask ``run`` to commit what it has and return; safe to call from a signal handler callback."""
        self.stopping = True
        asyncio.get_running_loop().create_task(self.client.aclose())

    async def flush(self) -> None:
        """Commit the open batch after every batch handed over before it; return when all are committed.

        Once started, a commit runs to its end even when the flush is cancelled, and the
        cancellation is raised afterwards. A batch taken out of the pipeline and dropped half way
        would let the next batch move the cursor past its events. Only a second signal
        (``abandon``) cuts a commit short, and then no later batch commits.
        """
        await self._settle(self._start_commit())

    async def _hand_over(self) -> None:
        """Start committing the full open batch once the batch before it is staged and the one before that committed."""
        if self.last_staged is not None:
            await self._settle(self.last_staged)
        if len(self.recent_commits) == 2:
            await self._settle(self.recent_commits[0])
        self._start_commit()

    def _start_commit(self) -> asyncio.Future:
        """Take the open batch out of the pipeline and queue its commit; the future runs on its own."""
        batch, started = self.batch, self.batch_started
        self.batch, self.batch_started = Batch(endpoint=self.endpoint), None
        lane, self.next_lane = self.next_lane, 1 - self.next_lane
        previous = self.recent_commits[-1] if self.recent_commits else None
        staged = self.last_staged = asyncio.get_running_loop().create_future()
        commit = asyncio.ensure_future(self._commit_in_order(batch, started, lane, staged, previous))
        self.commits.add(commit)
        self.recent_commits.append(commit)
        commit.add_done_callback(self._after_commit)
        return commit

    async def _settle(self, commit: asyncio.Future) -> None:
        """Wait for ``commit`` and raise its error. When cancelled, wait for it anyway, unless ``abandon`` is set."""
        cancelled: asyncio.CancelledError | None = None
        while not commit.done():
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError as error:
                if self.abandon:
                    commit.cancel()
                    raise
                cancelled = error
        commit.result()
        if cancelled is not None:
            raise cancelled

    async def _commit_in_order(self, batch: Batch, started: float | None, lane: int, staged: asyncio.Future,
                               previous: asyncio.Future | None) -> None:
        """Stage ``batch`` on ``lane``, then commit it after ``previous``, unless an earlier commit did not succeed.

        ``staged`` is resolved once staging is over, however it ended. After a failed commit, its
        error is raised again here. After an abandoned (cancelled) one, this commit is cancelled
        too. Either way the cursor must not move past the events of the earlier batch. Also when a
        cancelled commit's thread is still writing, no second write may start on the same
        connection, which the lane lock ensures.
        """
        try:
            async with self.lane_locks[lane]:
                try:
                    self._raise_if_stopped()
                    batch, rows_staged = await self._stage(batch, lane)
                finally:
                    _resolve(staged)
                if previous is not None:
                    await asyncio.wait([previous])  # in stream order, however the previous commit ended
                async with self.write_lock:
                    self._raise_if_stopped()
                    if batch.is_empty():
                        return
                    await self._commit(batch, lane, rows_staged)
        except asyncio.CancelledError:
            self.commit_abandoned = True
            raise
        except Exception as error:
            if self.write_failure is None:
                self.write_failure = error
            raise
        finally:
            _resolve(staged)  # also when cancelled before its turn on the lane
        if started is not None:
            self.counters.batch_lags.append(time.monotonic() - started)

    def _raise_if_stopped(self) -> None:
        """Raise the error of an earlier commit that failed, or CancelledError after an abandoned one."""
        if self.commit_abandoned:
            raise asyncio.CancelledError
        if self.write_failure is not None:
            raise self.write_failure

    async def _stage(self, batch: Batch, lane: int) -> tuple[Batch, bool]:
        """Verify ``batch`` (when checks are on), COPY its rows on ``lane``, and return it and whether its rows are staged."""
        if batch.is_empty():
            return batch, False
        if self.verifier is not None:
            batch = await self._verify(batch)
        return batch, await asyncio.to_thread(self.store.stage, batch, lane)

    def _after_commit(self, commit: asyncio.Future) -> None:
        """Forget a finished commit. When it failed, end ``run()``, because run() may not be awaiting it."""
        self.commits.discard(commit)
        if not commit.cancelled() and commit.exception() is not None:
            asyncio.get_running_loop().create_task(self.client.aclose())

    async def _commit(self, batch: Batch, lane: int, staged: bool) -> None:
        started = time.monotonic()
        rows_staged = staged

        def write() -> None:
            # A retry after DatabaseUnavailable writes the batch whole: its staged rows went with the connection.
            nonlocal rows_staged
            attempt_staged, rows_staged = rows_staged, False
            self.store.finish(batch, lane, attempt_staged)

        await self._with_database(write)
        self.counters.commit_seconds.append(time.monotonic() - started)
        del self.counters.commit_seconds[:-1000]
        self.counters.batches += 1
        self.counters.indexed += len(batch)
        if batch.cursor is not None:
            self.committed = batch.cursor

    async def _verify(self, batch: Batch) -> Batch:
        """Store the verification outcomes on the batch's rows; with enforce, dead-letter failures."""
        seqs = [event.seq for event in batch.events if isinstance(event, (Commit, Sync, Labels))]
        outcomes = await self.verifier.outcomes(seqs)
        batch.apply_verifications(outcomes)
        # Stored with the rows, so that a later check can set their outcome (indexer.recheck).
        batch.backlog = [backlog_row(self.endpoint, seq, work) for seq, work in self.verifier.take_unchecked().items()]
        if self.verifier.settings.mode is VerifyMode.ENFORCE:
            batch, dropped = dead_letter_failures(batch, outcomes)
            if dropped:
                self.counters.dead_letters[DropReason.SIGNATURE_INVALID] += dropped
                self.warnings.warn(DropReason.SIGNATURE_INVALID, "events dead-lettered: verification failed",
                                   stream=self.endpoint, count=dropped)
        return batch

    async def _cursor_for_connect(self) -> int | None:
        """Commit the open batch, then return the committed cursor to connect with."""
        await self.flush()
        return self.committed

    async def _flush_on_interval(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.batch_interval / 2)
                started = self.batch_started
                if started is not None and time.monotonic() - started >= self.batch_interval:
                    # Shielded: run() cancels this task on the way out, and a cancelled flush would release
                    # the write lock while its thread still writes, letting the final flush use the same
                    # connection at the same time.
                    await asyncio.shield(self.flush())
        except Exception:
            # The failed commit is in write_failure, and _after_commit has closed the client, so
            # run() ends and raises it.
            return

    async def _with_database(self, work: Callable[[], Any]) -> Any:
        """Run blocking database ``work`` in a thread, retrying while the database is unavailable."""
        failing_since = None
        while True:
            try:
                result = await asyncio.to_thread(work)
            except DatabaseUnavailable as error:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("database unavailable, retrying with backoff",
                                extra={"stream": self.endpoint, "cursor": self.committed, "error": str(error)})
                await asyncio.sleep(self.db_backoff.next_delay())
                continue
            if failing_since is not None:
                log.info("database available again", extra={"stream": self.endpoint, "cursor": self.committed})
            self.db_backoff.reset()
            return result

    def _handle(self, item: bytes | OversizedMessage) -> None:
        """Decode one received item and add what it yields to the open batch."""
        self.counters.received += 1
        if isinstance(item, OversizedMessage):
            self._handle_oversized(item)
            return
        event = self.decode(item)
        kind = type(event).__name__
        self.counters.events_by_kind[kind] += 1

        if isinstance(event, ErrorFrame):
            self._handle_error_frame(event)
        elif isinstance(event, Info):
            self._handle_info(event)
        elif isinstance(event, Skipped):
            self.counters.skipped[event.reason] += 1
            self._advance_past(event)
        elif isinstance(event, Invalid):
            if self._seen(event.seq):
                self.counters.replayed += 1
                return
            self.counters.dead_letters[event.reason] += 1
            self.warnings.warn(event.reason, "frame dead-lettered", stream=self.endpoint, seq=event.seq,
                               did=event.did, error=event.error)
            self._add(event)
        else:
            self._handle_event(event)

    def _handle_event(self, event: Any) -> None:
        seq = event.seq
        if self._seen(seq):
            self.counters.replayed += 1
            return
        if self.stop_at_seq is not None and seq > self.stop_at_seq:
            self.reached_stop_seq = True
            self.stopping = True
            return
        if isinstance(event, Labels):
            # A #labels frame has no did of its own, so the DID filter applies to each label's subject.
            self._filter_labels(event)
        elif not self.filters.wants_did(getattr(event, "did", None)):
            self.counters.skipped[SkipReason.FILTERED] += 1
            self._advance_past(event)
            return
        if self.verifier is not None:
            if isinstance(event, Identity):
                self.verifier.refresh(event.did)
            else:
                # Before _filter_ops: the commit proof needs every op of the commit.
                self.verifier.submit(event)
        if isinstance(event, Commit):
            self._filter_ops(event)
        self._add(event)
        if self.stop_at_seq is not None and seq >= self.stop_at_seq:
            # The target itself is indexed: stop now rather than wait for an event past it,
            # which may never come when the target is the relay's newest event.
            self.reached_stop_seq = True
            self.stopping = True

    def _filter_labels(self, event: Labels) -> None:
        """Keep the labels whose subject account passes the DID filter; an emptied frame still moves the cursor."""
        kept = [label for label in event.labels if self.filters.wants_did(subject_did(label.uri))]
        self.counters.skipped[SkipReason.FILTERED] += len(event.labels) - len(kept)
        self.counters.ops[("label", "create")] += len(kept)
        event.labels = kept

    def _filter_ops(self, commit: Commit) -> None:
        kept = []
        for op in commit.ops:
            if self.filters.wants_collection(op.collection):
                kept.append(op)
                self.counters.ops[(op.collection, op.action)] += 1
                if op.error is not None:
                    self.counters.dead_letters[op.error.reason] += 1
                    self.warnings.warn(op.error.reason, "record dead-lettered", stream=self.endpoint,
                                       seq=commit.seq, did=commit.did, error=op.error.message)
            else:
                self.counters.skipped[SkipReason.FILTERED] += 1
        commit.ops = kept

    def _seen(self, seq: int | None) -> bool:
        """Return True when ``seq`` is not above the highest seq accepted; None is never seen."""
        return seq is not None and self.accepted is not None and seq <= self.accepted

    def _advance_past(self, event: Any) -> None:
        """Let the cursor move past an event that adds no rows (filtered or skipped)."""
        seq = getattr(event, "seq", None)
        if seq is not None and not self._seen(seq):
            if self.pending_gap is not None:
                self._close_gap(seq)  # the first seq the server sent after the gap, kept or not
            self.batch.cursor = seq
            self.accepted = seq
            self._add_marker()

    def _add(self, event: Any) -> None:
        if self.pending_gap is not None and getattr(event, "seq", None) is not None:
            self._close_gap(event.seq)
        self.batch.add(event)
        seq = getattr(event, "seq", None)
        if seq is not None:
            self.accepted = seq
            self.counters.last_seq = seq
            self.counters.last_event_time = getattr(event, "time", None)
        self._add_marker()

    def _close_gap(self, seq: int) -> None:
        """Record the pending gap as ending at ``seq``, unless no seq can be missing before it."""
        gap, self.pending_gap = self.pending_gap, None
        if gap.from_seq is not None and seq == gap.from_seq + 1:
            # A server may report OutdatedCursor for a cursor just below its oldest event. Seqs are
            # integers, so nothing lies between the cursor and this event.
            log.info("no events missing after OutdatedCursor: the next seq follows the cursor",
                     extra={"stream": self.endpoint, "cursor": gap.from_seq, "seq": seq})
            return
        gap.to_seq = seq
        self.batch.add(gap)

    def _add_marker(self) -> None:
        if self.batch_started is None:
            self.batch_started = time.monotonic()

    def _handle_error_frame(self, event: ErrorFrame) -> None:
        if event.error == "FutureCursor":
            raise FutureCursorError(
                f"the server at {self.endpoint} rejected our stored cursor {self.committed} as ahead of its newest "
                f"event ({event.message or 'no message'}). Continuing would rewind the archive silently, so "
                "indexing stopped. If the relay was reset, start a new archive or delete this stream's row "
                "from the cursors table to start at the live tip."
            )
        log.warning("error frame from server; reconnecting from the committed cursor",
                    extra={"stream": self.endpoint, "cursor": self.committed,
                           "error": f"{event.error}: {event.message}"})

    def _handle_info(self, event: Info) -> None:
        if event.name == "OutdatedCursor":
            log.warning("the server no longer has events after our cursor; recording a gap",
                        extra={"stream": self.endpoint, "cursor": self.committed, "error": event.message})
            self.pending_gap = Gap(from_seq=self.committed, to_seq=None, reason=event.name, message=event.message)
        else:
            log.info("info message from server", extra={"stream": self.endpoint, "error": f"{event.name}: {event.message}"})

    def _handle_oversized(self, item: OversizedMessage) -> None:
        """Dead-letter a message above the size limit, with its seq when the client read it whole.

        aiohttp drops such a message unread, so its seq is unknown and the cursor stays. The next
        connection accepts it whole (``OversizedMessage.frame``): its row then carries the seq, and
        the cursor moves past it. The row is written at once, without seq, when the message may not
        come again (from the live tip with nothing delivered before it), or cannot be read whole
        (size unknown or above ``OVERSIZED_READ_MAX``). When it does come again after all, it then
        has two rows.
        """
        if item.frame is not None:
            self._handle_oversized_frame(item, item.frame)
            return
        if item.read_whole_next() and item.sent_again():
            return  # the client logged the disconnect, and the row is written once the message is read
        self.counters.dead_letters[DropReason.OVERSIZED_FRAME] += 1
        error = (f"message of {item.size} bytes exceeds the limit of {item.limit} bytes "
                 f"(message {item.position + 1} after cursor {item.cursor})")
        self.warnings.warn(DropReason.OVERSIZED_FRAME, "message dead-lettered", stream=self.endpoint,
                           cursor=item.cursor, error=error)
        self._add(Invalid(DropReason.OVERSIZED_FRAME, error, raw=b""))

    def _handle_oversized_frame(self, item: OversizedMessage, frame: bytes) -> None:
        t, seq, did = frames.message_position(frame)
        if seq is not None and self._seen(seq):
            self.counters.replayed += 1
            return
        self.counters.dead_letters[DropReason.OVERSIZED_FRAME] += 1
        # The frame itself is not kept: the limit exists to keep such messages out of memory and tables.
        error = f"message of {item.size} bytes exceeds the limit of {item.limit} bytes (type {t}, seq {seq})"
        self.warnings.warn(DropReason.OVERSIZED_FRAME, "message dead-lettered", stream=self.endpoint, seq=seq,
                           did=did, error=error)
        self._add(Invalid(DropReason.OVERSIZED_FRAME, error, raw=b"", t=t, seq=seq, did=did))
