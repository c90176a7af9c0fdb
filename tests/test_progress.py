"""The progress display of running streams: a rich status line in a terminal, log lines otherwise."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from rich.console import Console

from fixture_archive import replay_archive, scratch_database
from indexer.progress import ProgressReporter, StreamSample, format_duration, sample_indexers, status_line

pytestmark = pytest.mark.timeout(60)

CORPUS_NEWEST = 31527015471


async def report_during_replay(url: str, console: Console, *, log_interval: float = 30.0) -> None:
    """Replay the fixture archive while a reporter draws on ``console``, then let it draw once more."""

    async def with_reporter(indexers, relay):
        reporter = ProgressReporter(sample_indexers(indexers), console=console, refresh=0.05,
                                    log_interval=log_interval)
        task = asyncio.create_task(reporter.run())
        # The run stops only after this returns, so wait here until everything is committed.
        while indexers[0].committed != CORPUS_NEWEST or indexers[1].committed != 3:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    await replay_archive(url, while_running=with_reporter)


@pytest.fixture(scope="module")
def terminal_output(postgres_server_url, template_database) -> str:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=250, color_system=None)
    with scratch_database(postgres_server_url, template_database) as url:
        asyncio.run(report_during_replay(url, console))
    return output.getvalue()


def test_terminal_line_shows_seq(terminal_output):
    assert f"seq {CORPUS_NEWEST}" in terminal_output


def test_terminal_line_shows_rate_and_lag(terminal_output):
    assert "events/s" in terminal_output
    assert "lag " in terminal_output


def test_terminal_line_shows_totals(terminal_output):
    assert "rows " in terminal_output
    assert "dead letters 0" in terminal_output


def test_terminal_line_names_each_stream(terminal_output):
    assert terminal_output.count("127.0.0.1:") >= 2


def test_plain_output_logs_progress_lines(postgres_server_url, template_database, caplog):
    console = Console(file=io.StringIO(), force_terminal=False)
    caplog.set_level(logging.INFO, logger="indexer.progress")
    with scratch_database(postgres_server_url, template_database) as url:
        asyncio.run(report_during_replay(url, console, log_interval=0.05))
    lines = [record for record in caplog.records if record.getMessage().startswith("progress:")]
    assert lines
    assert any(getattr(record, "seq", None) == CORPUS_NEWEST for record in lines)
    assert console.file.getvalue() == ""


def sample(lag: float | None, stream: str = "wss://relay.test/xrpc/com.atproto.sync.subscribeRepos") -> StreamSample:
    return StreamSample(stream=stream, seq=7, committed=7, indexed=7, received=7, rows_written=3,
                        dead_letters=1, lag=lag)


def test_lag_state_changes_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="indexer.progress")
    lags = iter([500.0, 5.0, 4.0, 30.0, 90.0, 120.0, 2.0])
    reporter = ProgressReporter(lambda: [sample(next(lags))], console=Console(file=io.StringIO()))
    for _ in range(7):
        reporter.tick()
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["caught up with the stream", "falling behind the stream", "caught up with the stream"]


def test_status_line_marks_dead_letters():
    line = status_line([sample(1.5)], {"wss://relay.test/xrpc/com.atproto.sync.subscribeRepos": 12.0})
    assert line.plain == "relay.test 12 events/s seq 7 lag 2s | rows 3 | dead letters 1"


@pytest.mark.parametrize("seconds, text", [(None, "-"), (0.25, "250ms"), (12.4, "12s"), (245, "4m05s"),
                                           (10920, "3h02m")])
def test_duration_format(seconds, text):
    assert format_duration(seconds) == text


def test_status_line_shows_committed_seq_before_first_event():
    sample = StreamSample(stream="ws://relay", seq=None, committed=41, indexed=0, received=0, rows_written=0,
                          dead_letters=0, lag=None)
    assert " seq 41" in status_line([sample], {"ws://relay": 0.0}).plain


async def test_logged_rate_covers_whole_interval(caplog):
    # Regression (newcomer walkthrough): a log line every 3 s showed the rate of its last 1 s sample,
    # 0.0 events/s although 112 events were indexed within the interval.
    counts = iter([0, 0, 112, 112, 112, 112, 112, 112, 112, 112])

    def sampler() -> list[StreamSample]:
        return [StreamSample(stream="ws://relay", seq=1, committed=1, indexed=next(counts, 112), received=112,
                             rows_written=0, dead_letters=0, lag=None)]

    reporter = ProgressReporter(sampler, console=Console(file=io.StringIO()), refresh=0.05, log_interval=0.2)
    with caplog.at_level(logging.INFO, logger="indexer.progress"):
        task = asyncio.create_task(reporter.run())
        while not any(record.getMessage().startswith("progress:") for record in caplog.records):
            await asyncio.sleep(0.01)
        task.cancel()
    first = next(record for record in caplog.records if record.getMessage().startswith("progress:"))
    assert not first.getMessage().startswith("progress: 0.0 events/s")
