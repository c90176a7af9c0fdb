"""``indexer status``: the contents of the archive and the position of each stream, read from the database.

``read_status`` works on any schema revision: a table that does not exist yet (``backfill_repos``
before migration 0002, say) shows as absent instead of failing. Row counts of large tables are
PostgreSQL's planner estimates (``pg_class.reltuples``), so the command stays fast on a big archive.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from indexer import schema
from indexer.db import redact_url
from indexer.errors import DatabaseUnavailable
from indexer.progress import format_duration

# Tables up to this size on disk are counted exactly; larger ones get the planner's estimate.
EXACT_COUNT_MAX_BYTES = 64 * 1024 * 1024
RECENT_GAPS = 10


@dataclass
class StreamStatus:
    """One row of ``cursors``: a stream endpoint and job, with its committed position.

    ``lag`` is seconds from the event time at the cursor to now, None for streams whose events carry
    no time (label streams). ``events`` is None when the database predates the event count column.
    """

    endpoint: str
    kind: str  # "repos", "labels" or "other", from the endpoint's XRPC method
    job: str
    cursor: int | None
    last_event_time: datetime | None
    lag: float | None
    updated_at: datetime
    events: int | None = None
    start_seq: int | None = None
    target_seq: int | None = None


@dataclass
class TableCount:
    """Rows of one table: exact, or the planner's estimate (None before the first ANALYZE)."""

    table: str
    rows: int | None
    estimated: bool


@dataclass
class Status:
    """Everything ``indexer status`` reports. ``backfill`` is None when the database has no backfill table."""

    database: str
    checked_at: datetime
    streams: list[StreamStatus] = field(default_factory=list)
    tables: list[TableCount] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)  # endpoint, reason, count
    gaps: list[dict[str, Any]] = field(default_factory=list)  # the most recent ones
    gap_count: int = 0
    backfill: list[dict[str, Any]] | None = None  # job, state, repos
    # Events stored unchecked for want of a key, waiting for indexer run to check them again.
    # None when the database has no verification_backlog table.
    verification_backlog: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the status as JSON-ready values (datetimes as ISO 8601 strings)."""
        return _jsonable(asdict(self))


def read_status(url: str, display: str | None = None) -> Status:
    """Read the status of the archive at ``url``; raise DatabaseUnavailable when it cannot be reached.

    ``display`` is how the report names the database (default: the URL without its password).
    """
    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
            connection.read_only = True
            return _read(connection, display or redact_url(url))
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(
            f"reading the status from {redact_url(url)} failed: {str(error).strip().splitlines()[0]}"
        ) from None


def _read(connection: psycopg.Connection, display_url: str) -> Status:
    existing = _existing_tables(connection)
    checked_at = connection.execute("SELECT now()").fetchone()[0]
    status = Status(database=display_url, checked_at=checked_at)
    if "cursors" in existing:
        status.streams = _streams(connection)
    status.tables = _table_counts(connection, existing)
    if "dead_letters" in existing:
        status.dead_letters = _rows(connection, "SELECT endpoint, reason, count(*) AS count FROM dead_letters "
                                                "GROUP BY endpoint, reason ORDER BY endpoint, reason")
    if "gaps" in existing:
        status.gap_count = connection.execute("SELECT count(*) FROM gaps").fetchone()[0]
        status.gaps = _rows(connection, "SELECT endpoint, from_seq, to_seq, reason, message, detected_at FROM gaps "
                                        "ORDER BY id DESC LIMIT %s", (RECENT_GAPS,))
    if "verification_backlog" in existing:
        status.verification_backlog = connection.execute("SELECT count(*) FROM verification_backlog").fetchone()[0]
    if "backfill_repos" in existing:
        status.backfill = _rows(connection, "SELECT job, state, count(*) AS repos FROM backfill_repos "
                                            "GROUP BY job, state ORDER BY job, state")
    return status


def _existing_tables(connection: psycopg.Connection) -> set[str]:
    rows = connection.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')").fetchall()
    return {name for (name,) in rows}


def _rows(connection: psycopg.Connection, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    cursor = connection.execute(sql, params)
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _streams(connection: psycopg.Connection) -> list[StreamStatus]:
    columns = {name for (name,) in connection.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = 'cursors'").fetchall()}
    optional = [name for name in ("events", "start_seq", "target_seq") if name in columns]
    selected = ", ".join(["endpoint", "job", "seq AS cursor", "last_event_time", "updated_at",
                          "extract(epoch FROM now() - last_event_time)::float8 AS lag", *optional])
    return [
        StreamStatus(kind=_stream_kind(row["endpoint"]), **row)
        for row in _rows(connection, f"SELECT {selected} FROM cursors ORDER BY endpoint, job")
    ]


def _stream_kind(endpoint: str) -> str:
    if endpoint.endswith("/com.atproto.sync.subscribeRepos"):
        return "repos"
    if endpoint.endswith("/com.atproto.label.subscribeLabels"):
        return "labels"
    return "other"


def _table_counts(connection: psycopg.Connection, existing: set[str]) -> list[TableCount]:
    """Count rows exactly in small tables; estimate large ones as the planner does."""
    names = [table.name for table in schema.metadata.sorted_tables if table.name in existing]
    stats = {
        name: (reltuples, relpages, size)
        for name, reltuples, relpages, size in connection.execute(
            "SELECT c.relname, c.reltuples, c.relpages, pg_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = ANY(%s)", (names,)).fetchall()
    }
    block_size = int(connection.execute("SELECT current_setting('block_size')").fetchone()[0])
    counts = []
    for name in sorted(names):
        reltuples, relpages, size = stats[name]
        if size <= EXACT_COUNT_MAX_BYTES:
            # Table names come from the schema module, never from input.
            exact = connection.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
            counts.append(TableCount(name, exact, estimated=False))
        elif reltuples < 0 or relpages == 0:
            counts.append(TableCount(name, None, estimated=True))  # never analyzed
        else:
            # The planner scales the tuple density of the last ANALYZE by the current size.
            counts.append(TableCount(name, round(reltuples / relpages * (size / block_size)), estimated=True))
    return counts


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_status(status: Status, console: Console) -> None:
    """Print the status as tables for a person to read."""
    console.print(f"Database {status.database}, checked at {status.checked_at:%Y-%m-%d %H:%M:%S %Z}")
    streams = Table("stream", "kind", "job", "cursor", "last event time", "lag", "events", title="Streams")
    for stream in status.streams:
        cursor = "-" if stream.cursor is None else str(stream.cursor)  # a seq, not a quantity: no separators
        streams.add_row(stream.endpoint, stream.kind, stream.job, cursor,
                        _text(stream.last_event_time), format_duration(stream.lag), _text(stream.events))
    console.print(streams if status.streams else "Streams: none indexed yet")

    tables = Table("table", "rows", title="Rows (~ marks an estimate)")
    for count in status.tables:
        rows = "unknown (never analyzed)" if count.rows is None else f"{'~' if count.estimated else ''}{count.rows:,}"
        tables.add_row(count.table, rows)
    console.print(tables)

    _print_rows(console, "Dead letters", status.dead_letters, "none")
    console.print(f"Gaps recorded: {status.gap_count}")
    if status.verification_backlog is not None:
        console.print(f"Events stored unchecked (no key yet), to be checked again by indexer run: "
                      f"{status.verification_backlog:,}")
    _print_rows(console, "Most recent gaps", status.gaps, None)
    if status.backfill is None:
        console.print("Backfill: this database has no backfill table (run `indexer db upgrade`)")
    else:
        # Replay jobs (backfill --cursor) are streams and appear in the streams table.
        _print_rows(console, "Repo backfill jobs (--repo, --all, --desynchronized), repos by state", status.backfill,
                    "no repo backfill jobs")


def _print_rows(console: Console, title: str, rows: list[dict[str, Any]], empty: str | None) -> None:
    if not rows:
        if empty is not None:
            console.print(f"{title}: {empty}")
        return
    table = Table(*rows[0], title=title)
    for row in rows:
        table.add_row(*(_text(value) for value in row.values()))
    console.print(table)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z")
    if isinstance(value, int):
        return f"{value:,}" if not isinstance(value, bool) else str(value)
    return str(value)
