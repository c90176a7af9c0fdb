"""Progress of running streams: a live status line in a terminal, periodic log lines otherwise.

``ProgressReporter`` samples the counters of the running indexers every ``refresh`` seconds. When
its console is a terminal, it keeps one rich status line at the bottom of the screen, and log lines
scroll above it. Otherwise it logs one INFO line per stream every ``log_interval`` seconds. It
also logs one line per lag state change of a stream ("caught up", "falling behind"), whichever
the output is.

The reporter only reads counters: it never touches the database or the hot path. ``backfill``
and other commands plug in by passing their own ``sample`` function returning ``StreamSample``s.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.live import Live
from rich.text import Text

from indexer.records import parse_datetime

log = logging.getLogger(__name__)

# A stream whose newest event is at most CAUGHT_UP seconds old is caught up. A caught-up stream that
# falls more than FALLING_BEHIND seconds behind is reported once. The space between the two
# thresholds keeps a stream hovering around one of them from logging a line per sample.
CAUGHT_UP = 10.0
FALLING_BEHIND = 60.0


@dataclass(frozen=True, slots=True)
class StreamSample:
    """Progress of one stream so far, read from its counters at one moment.

    ``lag`` is seconds between the newest received event's ``time`` and now, or None when no event
    with a time was received (label streams carry no event time).
    """

    stream: str
    seq: int | None  # newest seq received
    committed: int | None  # cursor committed to the database
    indexed: int  # events committed
    received: int  # frames received
    rows_written: int  # record rows plus history rows (labels, identity and account events)
    dead_letters: int
    lag: float | None


def event_lag(event_time: str | None, now: datetime | None = None) -> float | None:
    """Return seconds from the atproto datetime ``event_time`` to ``now``; None when it is missing or invalid."""
    parsed = parse_datetime(event_time)
    if parsed is None:
        return None
    return ((now or datetime.now(UTC)) - parsed).total_seconds()


def sample_indexers(indexers: Sequence) -> Callable[[], list[StreamSample]]:
    """Return a function that samples each ``StreamIndexer`` of ``indexers``."""

    def sample() -> list[StreamSample]:
        now = datetime.now(UTC)
        return [
            StreamSample(
                stream=indexer.endpoint,
                seq=indexer.counters.last_seq,
                committed=indexer.committed,
                indexed=indexer.counters.indexed,
                received=indexer.counters.received,
                rows_written=indexer.store.rows_written + indexer.store.history_rows_written,
                dead_letters=sum(indexer.counters.dead_letters.values()),
                lag=event_lag(indexer.counters.last_event_time, now),
            )
            for indexer in indexers
        ]

    return sample


def format_duration(seconds: float | None) -> str:
    """Render a lag as ``850ms``, ``12s``, ``4m05s`` or ``3h02m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def short_stream(stream: str) -> str:
    """Return the host (and port) of a stream endpoint URL, which is what tells streams apart on screen."""
    rest = stream.split("://", 1)[-1]
    return rest.split("/", 1)[0]


def status_line(samples: Sequence[StreamSample], rates: dict[str, float]) -> Text:
    """Build the one-line terminal status: per stream its events/s, seq and lag, then totals."""
    line = Text()
    for sample in samples:
        line.append(short_stream(sample.stream), style="bold")
        line.append(f" {rates.get(sample.stream, 0.0):,.0f} events/s")
        # Before the first event of this run, the committed cursor is the stream's position.
        position = sample.seq if sample.seq is not None else sample.committed
        line.append(f" seq {position if position is not None else '-'}")
        line.append(" lag ")
        line.append(format_duration(sample.lag), style=_lag_style(sample.lag))
        line.append(" | ")
    line.append(f"rows {sum(s.rows_written for s in samples):,}")
    dead = sum(s.dead_letters for s in samples)
    line.append(" | ")
    line.append(f"dead letters {dead:,}", style="red" if dead else "")
    return line


def _lag_style(lag: float | None) -> str:
    if lag is None or lag <= CAUGHT_UP:
        return "green"
    return "yellow" if lag <= FALLING_BEHIND else "red"


class ProgressReporter:
    """Show the progress of running streams until cancelled.

    ``console`` defaults to a rich Console on stderr. ``refresh`` is the seconds between samples;
    ``log_interval`` the seconds between log lines when the console is not a terminal.
    """

    def __init__(
        self,
        sample: Callable[[], list[StreamSample]],
        *,
        console: Console | None = None,
        refresh: float = 1.0,
        log_interval: float = 30.0,
    ) -> None:
        self.sample = sample
        self.console = console or Console(stderr=True)
        self.refresh = refresh
        self.log_interval = log_interval
        self.caught_up: dict[str, bool] = {}
        self._previous: dict[str, tuple[float, int]] = {}

    async def run(self) -> None:
        """Report until the task is cancelled; the terminal line is removed on exit."""
        if self.console.is_terminal:
            await self._run_live()
        else:
            await self._run_logging()

    async def _run_live(self) -> None:
        original_stderr = sys.stderr
        with Live(Text(""), console=self.console, refresh_per_second=4, transient=True,
                  redirect_stderr=True, redirect_stdout=False) as live:
            restore = _route_log_handlers(original_stderr, sys.stderr)
            try:
                while True:
                    live.update(status_line(*self.tick()))
                    await asyncio.sleep(self.refresh)
            finally:
                restore()

    async def _run_logging(self) -> None:
        last_logged = time.monotonic()
        indexed_at_last_log = {sample.stream: sample.indexed for sample in self.sample()}
        while True:
            await asyncio.sleep(self.refresh)
            samples, _rates = self.tick()
            now = time.monotonic()
            if now - last_logged >= self.log_interval:
                # The rate over the whole interval: the last refresh alone may have seen no event.
                for sample in samples:
                    indexed = sample.indexed - indexed_at_last_log.get(sample.stream, 0)
                    self.log_progress(sample, indexed / (now - last_logged))
                    indexed_at_last_log[sample.stream] = sample.indexed
                last_logged = now

    def tick(self) -> tuple[list[StreamSample], dict[str, float]]:
        """Take one sample, log lag state changes, and return the samples with events/s per stream."""
        samples = self.sample()
        now = time.monotonic()
        rates = {}
        for sample in samples:
            before = self._previous.get(sample.stream)
            if before is not None and now > before[0]:
                rates[sample.stream] = (sample.indexed - before[1]) / (now - before[0])
            self._previous[sample.stream] = (now, sample.indexed)
            self._log_lag_change(sample)
        return samples, rates

    @staticmethod
    def log_progress(sample: StreamSample, rate: float) -> None:
        log.info(
            f"progress: {rate:.1f} events/s, lag {format_duration(sample.lag)}",
            extra={"stream": sample.stream, "seq": sample.seq, "cursor": sample.committed,
                   "indexed": sample.indexed, "rows": sample.rows_written,
                   "dead_letters": sample.dead_letters, "lag": _rounded(sample.lag)},
        )

    def _log_lag_change(self, sample: StreamSample) -> None:
        if sample.lag is None:
            return
        was_caught_up = self.caught_up.get(sample.stream)
        extra = {"stream": sample.stream, "seq": sample.seq, "lag": _rounded(sample.lag)}
        if sample.lag <= CAUGHT_UP and not was_caught_up:
            self.caught_up[sample.stream] = True
            log.info("caught up with the stream", extra=extra)
        elif sample.lag > FALLING_BEHIND and was_caught_up:
            self.caught_up[sample.stream] = False
            log.warning("falling behind the stream", extra=extra)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _route_log_handlers(original, stream) -> Callable[[], None]:
    """Point the root logger's handlers that write to ``original`` at ``stream``; return an undo function.

    While the live line is shown, log lines must go through rich so they print above the line
    instead of overwriting it.
    """
    changed = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is original and stream is not original:
            changed.append((handler, handler.setStream(stream)))

    def restore() -> None:
        for handler, original in changed:
            handler.setStream(original)

    return restore
