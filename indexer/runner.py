"""Running stream indexers together in one process: construction, signals and shutdown.

``run_streams`` starts one ``StreamIndexer`` for the relay and one for each labeler. The first
SIGINT or SIGTERM asks every indexer to commit what it has received and return; a second one
abandons the open batches (nothing uncommitted is lost: the cursor never moved past them) and
exits at once. If one stream fails (for example ``FutureCursor``), the others are stopped too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from indexer import frames
from indexer.errors import IndexerError
from indexer.ingest import DEFAULT_BATCH_SIZE, LABELS_METHOD, REPOS_METHOD, Filters, StreamIndexer
from indexer.store import Store
from indexer.stream import DEFAULT_MAX_MESSAGE_SIZE, StreamClient, endpoint_url
from indexer.verifier import EventVerifier, VerifySettings

log = logging.getLogger(__name__)

DEFAULT_RELAY = "wss://bsky.network"
DEFAULT_LABELER = "wss://mod.bsky.app"
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class RunSettings:
    """Everything ``indexer run`` needs besides the database URL."""

    relay: str | None = DEFAULT_RELAY  # None: no repo stream
    labelers: list[str] = field(default_factory=lambda: [DEFAULT_LABELER])
    filters: Filters = field(default_factory=Filters)
    batch_size: int = DEFAULT_BATCH_SIZE
    batch_interval: float = 0.2
    receive_timeout: float = 60.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    job: str = "live"
    stop_at_seq: int | None = None
    # Off unless set: programs and tests must choose a PLC directory; `indexer run` defaults to record.
    verify: VerifySettings = field(default_factory=VerifySettings)


def build_indexers(database_url: str, settings: RunSettings) -> list[StreamIndexer]:
    """Create the indexers for the relay and each labeler; nothing connects yet."""
    indexers = []
    if settings.relay:
        indexers.append(_indexer(database_url, settings, settings.relay, REPOS_METHOD, frames.decode_repo_frame))
    for labeler in settings.labelers:
        indexers.append(_indexer(database_url, settings, labeler, LABELS_METHOD, frames.decode_label_frame))
    return indexers


def _indexer(database_url: str, settings: RunSettings, base: str, method: str, decode) -> StreamIndexer:
    endpoint = endpoint_url(base, method)
    store = Store(database_url, endpoint, job=settings.job, exclusive=True)

    def client_factory(cursor_source):
        return StreamClient(endpoint, method, cursor_source, receive_timeout=settings.receive_timeout,
                            max_message_size=settings.max_message_size)

    return StreamIndexer(store, client_factory, decode=decode, filters=settings.filters,
                         batch_size=settings.batch_size, batch_interval=settings.batch_interval,
                         stop_at_seq=settings.stop_at_seq, verifier=EventVerifier(settings.verify, database_url))


class StreamsFailed(ExceptionGroup, IndexerError):
    """The IndexerErrors that stopped ``run_streams``: an ExceptionGroup that is also an IndexerError.

    Its text is that of the errors alone, so that the CLI can print it as one line.
    """

    def __str__(self) -> str:
        return "; ".join(str(error) for error in self.exceptions)


async def run_streams(indexers: list[StreamIndexer], background: Sequence[Callable[[], Awaitable]] = ()) -> None:
    """Run the indexers until a signal or a failure; commit what was received before returning.

    ``background`` coroutine functions (such as the periodic resync) run beside the indexers and are
    cancelled once every indexer has returned. Signal handlers are installed only when this runs
    in the main thread, where Python allows them.
    """
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("signal received: committing and stopping (send it again to exit at once)",
                     extra={"reason": signal.Signals(signum).name})
            for indexer in indexers:
                indexer.stop()
        else:
            log.warning("second signal: exiting without committing the open batches",
                        extra={"reason": signal.Signals(signum).name})
            for indexer in indexers:
                indexer.abandon = True
            main_task.cancel()

    handles_signals = threading.current_thread() is threading.main_thread()
    if handles_signals:
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
    extra_tasks = [asyncio.create_task(work()) for work in background]
    try:
        async with asyncio.TaskGroup() as group:
            for indexer in indexers:
                group.create_task(_run_and_stop_others(indexer, indexers))
    except ExceptionGroup as failures:
        # Failures that are all IndexerErrors (FutureCursor, a refused write) are the user's to fix,
        # and the CLI reports an IndexerError as one line. Anything else is a bug: its traceback stays.
        if all(isinstance(error, IndexerError) for error in failures.exceptions):
            raise StreamsFailed(failures.message, failures.exceptions) from None
        raise
    finally:
        for task in extra_tasks:
            task.cancel()
        await asyncio.gather(*extra_tasks, return_exceptions=True)
        if handles_signals:
            for signum in HANDLED_SIGNALS:
                loop.remove_signal_handler(signum)
        for indexer in indexers:
            indexer.store.close()


async def _run_and_stop_others(indexer: StreamIndexer, indexers: list[StreamIndexer]) -> None:
    try:
        await indexer.run()
    except BaseException:
        for other in indexers:
            if other is not indexer and not other.stopping:
                other.stop()
        raise



async def resync_periodically(database_url: str, settings, interval: float) -> None:
    """Refetch repos marked desynchronized, then again every ``interval`` seconds, until cancelled.

    ``settings`` is a ``RepoJobSettings``. A failing round is logged and retried at the next
    interval; it never stops the stream indexers.
    """
    from indexer.repo_jobs import RepoJob

    while True:
        try:
            summary = await RepoJob(database_url, settings).run(desynchronized=True)
            if summary.repos_indexed or summary.failures:
                log.info("resync round finished", extra={"job": summary.job, "indexed": summary.repos_indexed,
                                                         "rows": summary.records, "count": len(summary.failures)})
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a network or database failure of one round; the next round retries
            log.warning("resync round failed; retrying at the next interval",
                        extra={"job": settings.job, "error": str(error), "delay": interval})
        await asyncio.sleep(interval)
