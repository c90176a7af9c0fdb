"""Using the stream client and decoder from Python, without a database.

Two styles, both resuming from a given cursor and reconnecting by themselves:

    async for event in subscribe_repos("wss://bsky.network", cursor=None):
        ...

    def on_event(event): ...
    Firehose("wss://bsky.network").start(on_event)  # blocks until stop() or Ctrl-C

Events are the typed objects of ``indexer.events`` (``Commit``, ``Identity``, ``Account``, ``Sync``,
``Info``, ``Skipped``, ``Invalid``; ``Labels`` for label streams). Error frames other than
``FutureCursor`` lead to a reconnect; ``FutureCursor`` raises ``FutureCursorError``. After a
reconnect, events at or below the last seq already delivered are not delivered again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from indexer import frames
from indexer.errors import FutureCursorError
from indexer.events import ErrorFrame, LabelEvent, RepoEvent
from indexer.ingest import LABELS_METHOD, REPOS_METHOD
from indexer.stream import DEFAULT_MAX_MESSAGE_SIZE, OversizedMessage, StreamClient


async def subscribe_repos(relay: str, cursor: int | None = None, **options: Any) -> AsyncIterator[RepoEvent]:
    """Yield decoded events of a relay's ``subscribeRepos`` stream, starting after ``cursor``.

    ``cursor`` None starts at the live tip. ``options`` are passed to ``StreamClient``
    (``receive_timeout``, ``max_message_size``, ``backoff``). To leave the loop early, iterate
    inside ``contextlib.aclosing(subscribe_repos(...))`` so the connection closes at once.
    """
    # aclosing: closing this generator closes the inner one at once, while the loop runs. Left to the
    # garbage collector, its connection's shutdown could be cut off when the loop stops.
    async with aclosing(_subscribe(relay, REPOS_METHOD, frames.decode_repo_frame, cursor, options)) as events:
        async for event in events:
            yield event


async def subscribe_labels(labeler: str, cursor: int | None = None, **options: Any) -> AsyncIterator[LabelEvent]:
    """Yield decoded events of a labeler's ``subscribeLabels`` stream, starting after ``cursor``."""
    async with aclosing(_subscribe(labeler, LABELS_METHOD, frames.decode_label_frame, cursor, options)) as events:
        async for event in events:
            yield event


async def _subscribe(base: str, method: str, decode: Callable[[bytes], Any], cursor: int | None,
                     options: dict[str, Any]) -> AsyncIterator[Any]:
    position = cursor  # seq of the last event delivered; sent as the cursor on every (re)connect
    options.setdefault("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
    async with StreamClient(base, method, lambda: position, **options) as client:
        async for item in client.frames():
            if isinstance(item, OversizedMessage):
                continue
            event = decode(item)
            if isinstance(event, ErrorFrame) and event.error == "FutureCursor":
                raise FutureCursorError(
                    f"{client.url} rejected cursor {position} as ahead of its newest event: {event.message}. "
                    "Pass an older cursor, or None for the live tip."
                )
            seq = getattr(event, "seq", None)
            if seq is not None:
                if position is not None and seq <= position:
                    continue  # already delivered before a reconnect
                position = seq
            yield event


class Firehose:
    """Blocking, callback-style consumer of a relay's (or, with ``labels=True``, a labeler's) stream."""

    def __init__(self, url: str, cursor: int | None = None, *, labels: bool = False, **options: Any) -> None:
        self.url = url
        self.cursor = cursor
        self.labels = labels
        self.options = options
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopped = threading.Event()

    def start(self, on_event: Callable[[Any], None]) -> None:
        """Call ``on_event`` for every event until ``stop()`` is called (from any thread) or it raises.

        ``self.cursor`` follows the seq of the last event passed to ``on_event``, so a later
        ``Firehose(url, cursor=previous.cursor)`` resumes after it.
        """
        asyncio.run(self._run(on_event))

    def stop(self) -> None:
        """Make ``start`` return after the current event."""
        self._stopped.set()
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    async def _run(self, on_event: Callable[[Any], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        subscribe = subscribe_labels if self.labels else subscribe_repos
        try:
            # aclosing: returning early must close the connection while the loop still runs.
            async with aclosing(subscribe(self.url, self.cursor, **self.options)) as events:
                async for event in events:
                    on_event(event)
                    seq = getattr(event, "seq", None)
                    if seq is not None:
                        self.cursor = seq
                    if self._stopped.is_set():
                        return
        except asyncio.CancelledError:
            if not self._stopped.is_set():
                raise
