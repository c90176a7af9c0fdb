"""The ``indexer`` command line: option parsing, database selection, and user-facing errors.

Every option can also be set through an ``INDEXER_*`` environment variable (shown in ``--help``);
the database URL also through ``DATABASE_URL``. User errors print one line and exit non-zero
without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Optional

import typer

from indexer import db, embedded, metrics
from indexer import log as logs
from indexer.errors import ConfigError, IndexerError
from indexer.ingest import DEFAULT_BATCH_SIZE
from indexer.metrics import DEFAULT_ADDRESS as DEFAULT_METRICS_ADDRESS

EXAMPLES = (
    "Examples:\n\n"
    "indexer run   (embedded PostgreSQL, relay wss://bsky.network, labeler wss://mod.bsky.app)\n\n"
    "indexer run --database-url postgresql://indexer@localhost/indexer --metrics-addr 127.0.0.1:9464\n\n"
    "indexer backfill --cursor 31527015360 --until 31527015471\n\n"
    "indexer backfill --repo did:plc:53iucmf5ldftgqyf2ac7hmhd\n\n"
    "indexer status --json\n\n"
    "indexer dead-letters list --reason invalid_record\n\n"
    "indexer dead-letters show 42\n\n"
    "indexer dead-letters retry --reason invalid_body\n\n"
    "indexer db upgrade\n\n"
    "Every option can also be set as an INDEXER_* environment variable, shown in each command's --help."
)

app = typer.Typer(
    help="Archive the AT Protocol (Bluesky) network into PostgreSQL.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="Migrate and inspect the database schema.\n\nExample: indexer db upgrade", no_args_is_help=True)
app.add_typer(db_app, name="db")
dead_letters_app = typer.Typer(
    help="Inspect and retry the inputs that could not be decoded or stored.\n\n"
    "Example: indexer dead-letters list",
    no_args_is_help=True,
)
app.add_typer(dead_letters_app, name="dead-letters")

DatabaseUrlOption = Annotated[
    Optional[str],
    typer.Option(
        "--database-url",
        envvar="INDEXER_DATABASE_URL",
        help="PostgreSQL URL (postgresql:// or postgresql+psycopg://). Also read from DATABASE_URL. "
        "Unset: start the embedded PostgreSQL in INDEXER_DATA_DIR.",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str, typer.Option("--log-level", envvar="INDEXER_LOG_LEVEL", help="debug, info, warning or error.")
]
LogFormatOption = Annotated[
    str, typer.Option("--log-format", envvar="INDEXER_LOG_FORMAT", help="Log line format: text or json.")
]

MetricsAddressOption = Annotated[str, typer.Option(
    "--metrics-addr", envvar="INDEXER_METRICS_ADDR",
    help="HOST:PORT to serve Prometheus metrics on, at /metrics.")]
NoMetricsOption = Annotated[bool, typer.Option(
    "--no-metrics", envvar="INDEXER_NO_METRICS", help="Do not serve Prometheus metrics.")]
ProgressIntervalOption = Annotated[float, typer.Option(
    "--progress-interval", envvar="INDEXER_PROGRESS_INTERVAL", min=1.0,
    help="Seconds between progress log lines when stderr is not a terminal.")]
JsonOption = Annotated[bool, typer.Option("--json", envvar="INDEXER_JSON",
                                          help="Print JSON for programs instead of tables.")]

VerifyOption = Annotated[str, typer.Option(
    "--verify", envvar="INDEXER_VERIFY",
    help="Signature verification: off; record (store the outcome in each row's verified column); "
    "enforce (also dead-letter events that fail, with reason signature_invalid).")]
VerifyWorkersOption = Annotated[Optional[int], typer.Option(
    "--verify-workers", envvar="INDEXER_VERIFY_WORKERS", min=0,
    help="Worker processes that check signatures and commit proofs; 0 checks in a thread of the "
    "indexer process. Default: one per CPU, at most 8.", show_default=False)]
VerifyKeyWaitOption = Annotated[float, typer.Option(
    "--verify-key-wait", envvar="INDEXER_VERIFY_KEY_WAIT", min=0.0,
    help="Seconds a batch commit waits for DID documents still being resolved; rows whose key is "
    "still unknown are stored with verified NULL (reason no_key).")]

log = logging.getLogger("indexer")


def setup(log_level: str = "info", log_format: str = "text") -> None:
    """Configure logging and make SIGTERM/SIGHUP exit normally so the embedded server stops."""
    if log_format not in ("text", "json"):
        raise ConfigError(f"invalid --log-format {log_format!r}: use text or json")
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"invalid --log-level {log_level!r}: use debug, info, warning or error")
    logs.configure(log_level, log_format)
    embedded.install_exit_signal_handlers()


def announce(line: str) -> None:
    typer.echo(line, err=True)


@db_app.command("upgrade")
def db_upgrade(
    database_url: DatabaseUrlOption = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database to the newest schema (a no-op when it is current).

    Example: indexer db upgrade --database-url postgresql://localhost/indexer
    """
    setup()
    database = db.open_database(database_url, announce=announce)
    db.create_engine(database).dispose()
    before = db.current_revision(database.url)
    db.upgrade(database.url, revision)
    after = db.current_revision(database.url)
    if before == after:
        typer.echo(f"Database {database.display_url} is already at revision {after}.")
    else:
        typer.echo(f"Database {database.display_url} migrated from {before or 'empty'} to {after}.")


@db_app.command("current")
def db_current(database_url: DatabaseUrlOption = None) -> None:
    """Print the schema revision the database is at, and the newest one available.

    Example: indexer db current
    """
    setup()
    database = db.open_database(database_url, announce=announce)
    current = db.current_revision(database.url)
    head = db.head_revision()
    state = "up to date" if current == head else "needs `indexer db upgrade`"
    typer.echo(f"{current or 'none (empty database)'} (newest: {head}, {state})")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Revision to go down to; 'base' drops every table.")],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Migrate the database down to REVISION; data in dropped tables is lost.

    Example: indexer db downgrade base
    """
    setup()
    database = db.open_database(database_url, announce=announce)
    db.create_engine(database).dispose()
    db.downgrade(database.url, revision)
    typer.echo(f"Database {database.display_url} is now at revision {db.current_revision(database.url) or 'base'}.")


@db_app.command("shell")
def db_shell(database_url: DatabaseUrlOption = None) -> None:
    """Open psql on the database (starting the embedded server for the session if needed).

    Example: indexer db shell
    """
    import subprocess

    setup()
    database = db.open_database(database_url, announce=announce)
    psql = database.embedded.psql_command.split(" ", 1)[0] if database.embedded else "psql"
    url = database.url.replace("postgresql+psycopg://", "postgresql://", 1)
    raise typer.Exit(subprocess.call([psql, url]))


def verify_settings(mode: str, plc_url: str, workers: int | None, key_wait: float,
                    allow_local_http: bool = False):
    """Return the VerifySettings for the --verify options; raises ConfigError for an unknown mode."""
    from indexer.verifier import VerifyMode, VerifySettings

    known = [str(member) for member in VerifyMode]
    if mode not in known:
        raise ConfigError(f"invalid --verify {mode!r}: use one of {', '.join(known)}")
    settings = VerifySettings(mode=VerifyMode(mode), plc_url=plc_url, key_wait=key_wait,
                              allow_local_http=allow_local_http)
    if workers is not None:
        settings.workers = workers
    return settings


def prepare_database(database_url: str | None, migrate: bool, *, wait: bool = False) -> db.Database:
    """Open the configured (or embedded) database and bring its schema up to date unless ``migrate`` is False.

    ``wait``: while a configured server is unreachable, retry with backoff instead of failing, as a
    long-running command should when it starts before its database (after a reboot, say).
    """
    database = db.open_database(database_url, announce=announce)
    if wait and database.embedded is None:
        wait_for_database(database)
    db.create_engine(database).dispose()
    if migrate:
        before = db.current_revision(database.url)
        db.upgrade(database.url)
        after = db.current_revision(database.url)
        if before != after:
            log.info(f"database schema migrated from {before or 'empty'} to {after}",
                     extra={"database": database.display_url})
    elif db.current_revision(database.url) != db.head_revision():
        raise ConfigError(
            f"the database schema is at revision {db.current_revision(database.url) or 'none'}, not "
            f"{db.head_revision()}: run `indexer db upgrade` or drop --no-migrate"
        )
    return database


def wait_for_database(database: db.Database) -> None:
    """Return once the database accepts a query, retrying with backoff; log once when it does not."""
    import time

    from indexer.errors import DatabaseUnavailable
    from indexer.stream import Backoff

    backoff = Backoff(base=0.5, cap=30.0)
    waiting = False
    while True:
        try:
            db.create_engine(database).dispose()
        except DatabaseUnavailable as error:
            if not waiting:
                log.warning("database unavailable at start, retrying with backoff",
                            extra={"database": database.display_url, "error": str(error)})
                waiting = True
            time.sleep(backoff.next_delay())
            continue
        if waiting:
            log.info("database available", extra={"database": database.display_url})
        return


def validate_stream_urls(settings) -> None:
    """Raise ConfigError for a bad relay or labeler URL before anything starts (such as the database)."""
    from indexer.ingest import LABELS_METHOD, REPOS_METHOD
    from indexer.stream import endpoint_url

    if settings.relay:
        endpoint_url(settings.relay, REPOS_METHOD)
    for labeler in settings.labelers:
        endpoint_url(labeler, LABELS_METHOD)


@app.command("run")
def run(
    relay: Annotated[str, typer.Option(envvar="INDEXER_RELAY",
                                       help="Relay to index: wss://, ws://, https:// or http:// URL, or a host name.")]
    = "wss://bsky.network",
    labeler: Annotated[Optional[list[str]], typer.Option(
        "--labeler", envvar="INDEXER_LABELERS",
        help="Labeler whose subscribeLabels stream to index; repeat for several. "
        "Default: the Bluesky moderation service, wss://mod.bsky.app.")] = None,
    no_labels: Annotated[bool, typer.Option("--no-labels", envvar="INDEXER_NO_LABELS",
                                            help="Index no label streams.")] = False,
    no_repos: Annotated[bool, typer.Option("--no-repos", envvar="INDEXER_NO_REPOS",
                                           help="Index no relay stream, only labels.")] = False,
    collection: Annotated[Optional[list[str]], typer.Option(
        "--collection", envvar="INDEXER_COLLECTIONS",
        help="Index only this collection NSID; a prefix like app.bsky.feed.* is allowed. Repeatable.")] = None,
    did: Annotated[Optional[list[str]], typer.Option(
        "--did", envvar="INDEXER_DIDS",
        help="Index only this account's events, and labels whose subject is this account. Repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(envvar="INDEXER_BATCH_SIZE", min=1,
                                            help="Commit after this many events (or after --batch-interval).")] = DEFAULT_BATCH_SIZE,
    batch_interval: Annotated[float, typer.Option(envvar="INDEXER_BATCH_INTERVAL", min=0.01,
                                                  help="Commit when the oldest uncommitted event is this many seconds old.")] = 0.2,
    receive_timeout: Annotated[float, typer.Option(envvar="INDEXER_RECEIVE_TIMEOUT", min=0.1,
                                                   help="Reconnect when a stream is silent for this many seconds.")] = 60.0,
    max_message_size: Annotated[int, typer.Option(envvar="INDEXER_MAX_MESSAGE_SIZE", min=1024,
                                                  help="Largest websocket message accepted, in bytes.")] = 8 * 1024 * 1024,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", envvar="INDEXER_NO_MIGRATE",
                                             help="Do not upgrade the schema first; fail if it is not current.")] = False,
    resync: Annotated[bool, typer.Option("--resync", envvar="INDEXER_RESYNC",
                                         help="Also refetch repos marked desynchronized, in the background "
                                         "(what `indexer backfill --desynchronized` does).")] = False,
    resync_interval: Annotated[float, typer.Option(envvar="INDEXER_RESYNC_INTERVAL", min=1.0,
                                                   help="Seconds between two --resync rounds.")] = 300.0,
    plc_url: Annotated[str, typer.Option(envvar="INDEXER_PLC_URL",
                                         help="PLC directory for resolving did:plc (signing keys, --resync).")]
    = "https://plc.directory",
    verify: VerifyOption = "record",
    verify_workers: VerifyWorkersOption = None,
    verify_key_wait: VerifyKeyWaitOption = 0.5,
    verify_recheck_interval: Annotated[float, typer.Option(
        envvar="INDEXER_VERIFY_RECHECK_INTERVAL", min=1.0,
        help="Seconds between two checks of the events stored unchecked because no key was known.")] = 300.0,
    metrics_addr: MetricsAddressOption = DEFAULT_METRICS_ADDRESS,
    no_metrics: NoMetricsOption = False,
    progress_interval: ProgressIntervalOption = 30.0,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Index the relay's repo stream and labelers' label streams into PostgreSQL until stopped.

    Resumes from the stored cursors. Ctrl-C or SIGTERM commits what was received and exits.
    In a terminal a status line shows events/s, seq and lag per stream; otherwise a progress
    line is logged every --progress-interval seconds. Prometheus metrics are served on
    --metrics-addr.

    Example: indexer run --relay wss://bsky.network --labeler wss://mod.bsky.app
    """
    from indexer.ingest import Filters
    from indexer.runner import DEFAULT_LABELER, RunSettings, build_indexers, resync_periodically, run_streams

    setup(log_level, log_format)
    metrics_address = None if no_metrics else metrics.parse_address(metrics_addr)
    filters = Filters(collections=tuple(collection or ()), dids=frozenset(did or ()))
    settings = RunSettings(
        relay=None if no_repos else relay,
        labelers=[] if no_labels else (labeler or [DEFAULT_LABELER]),
        filters=filters, batch_size=batch_size, batch_interval=batch_interval,
        receive_timeout=receive_timeout, max_message_size=max_message_size,
        verify=verify_settings(verify, plc_url, verify_workers, verify_key_wait),
    )
    if settings.relay is None and not settings.labelers:
        raise ConfigError("nothing to index: --no-repos and --no-labels were both given")
    validate_stream_urls(settings)
    database = prepare_database(database_url, migrate=not no_migrate, wait=True)
    indexers = build_indexers(database.url, settings)
    background = []
    if resync:
        from indexer.repo_jobs import RepoJobSettings

        resync_settings = RepoJobSettings(job="resync", plc_url=plc_url)
        background.append(lambda: resync_periodically(database.url, resync_settings, resync_interval))
    if settings.verify.mode != "off":
        from indexer.recheck import recheck_periodically

        background.append(lambda: recheck_periodically(database.url, settings.verify, verify_recheck_interval))
    report_build()
    tune_gc()
    try:
        asyncio.run(run_observed(run_streams(indexers, background), indexers, metrics_address=metrics_address,
                                 progress_interval=progress_interval))
    except asyncio.CancelledError:
        raise typer.Exit(130) from None


@app.command("status")
def status(
    json_output: JsonOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Show stream cursors and lag, rows per table, dead letters, gaps and backfill progress.

    Per stream (relay, labelers, backfill jobs): committed cursor, last event time, lag and events
    indexed. Row counts of tables above 64 MB are PostgreSQL's estimates, marked with ~.

    Example: indexer status --json
    """
    import json

    from rich.console import Console

    from indexer.status import print_status, read_status

    setup()
    database = db.open_database(database_url, announce=announce)
    result = read_status(database.url, display=database.display_url)
    if json_output:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        # Piped output would otherwise be cut at rich's default of 80 columns.
        print_status(result, Console() if sys.stdout.isatty() else Console(width=200))


ReasonOption = Annotated[Optional[str], typer.Option(
    "--reason", envvar="INDEXER_DEAD_LETTER_REASON",
    help="Only dead letters with this drop reason, e.g. invalid_record.", show_default=False)]


def _check_reason(reason: str | None) -> None:
    from indexer.events import DropReason

    known = [str(member) for member in DropReason]
    if reason is not None and reason not in known:
        raise ConfigError(f"unknown --reason {reason!r}: use one of {', '.join(known)}")


@dead_letters_app.command("list")
def dead_letters_list(
    reason: ReasonOption = None,
    limit: Annotated[int, typer.Option(envvar="INDEXER_DEAD_LETTER_LIMIT", min=1,
                                       help="Show at most this many rows, oldest first.")] = 50,
    json_output: JsonOption = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Count dead letters by reason and stream, then list the oldest rows (of one --reason).

    Example: indexer dead-letters list --reason invalid_record --limit 20
    """
    import json

    from indexer import deadletters

    setup()
    _check_reason(reason)
    database = db.open_database(database_url, announce=announce)
    with deadletters.connect(database.url) as connection:
        counts = deadletters.count_by_reason(connection)
        letters = deadletters.list_dead_letters(connection, reason=reason, limit=limit)
    if json_output:
        typer.echo(json.dumps({
            "counts": [{"reason": r, "endpoint": e, "count": c} for r, e, c in counts],
            "dead_letters": [_letter_summary(letter) for letter in letters],
        }, indent=2, default=str))
        return
    if not counts:
        typer.echo("No dead letters.")
        return
    for counted_reason, endpoint, count in counts:
        typer.echo(f"{count:>8}  {counted_reason:<18} {endpoint}")
    typer.echo("")
    for letter in letters:
        summary = _letter_summary(letter)
        typer.echo(f"#{letter.id} {letter.created_at:%Y-%m-%d %H:%M:%S} {letter.reason} seq={letter.seq} "
                   f"did={letter.did} path={letter.path} raw={summary['raw_bytes']} bytes: {summary['error']}")


def _letter_summary(letter) -> dict:
    error = letter.error if len(letter.error) <= 160 else letter.error[:157] + "..."
    return {"id": letter.id, "created_at": letter.created_at.isoformat(), "endpoint": letter.endpoint,
            "seq": letter.seq, "did": letter.did, "t": letter.t, "path": letter.path, "reason": letter.reason,
            "error": error, "raw_bytes": len(letter.raw or b"")}


@dead_letters_app.command("show")
def dead_letters_show(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead letter id, as printed by list.")],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Print one dead letter as JSON with its raw bytes decoded again, where they decode.

    Example: indexer dead-letters show 42
    """
    import json

    from indexer import deadletters

    setup()
    database = db.open_database(database_url, announce=announce)
    with deadletters.connect(database.url) as connection:
        letter = deadletters.read_dead_letter(connection, letter_id)
    if letter is None:
        raise ConfigError(f"dead letter {letter_id} not found; `indexer dead-letters list` shows the ids")
    shown = _letter_summary(letter)
    shown["error"] = letter.error
    shown["decoded"] = deadletters.decoded_form(letter)
    typer.echo(json.dumps(shown, indent=2, default=str))


@dead_letters_app.command("retry")
def dead_letters_retry(
    reason: ReasonOption = None,
    letter_id: Annotated[Optional[list[int]], typer.Option(
        "--id", envvar="INDEXER_DEAD_LETTER_IDS", help="Retry this dead letter id; repeatable.")] = None,
    limit: Annotated[int, typer.Option(envvar="INDEXER_DEAD_LETTER_LIMIT", min=1,
                                       help="Retry at most this many rows, oldest first.")] = 10_000,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Decode dead-lettered frames again and index those that now decode, deleting their rows.

    Use after an upgrade fixed the cause. No stream cursor moves. Rows of single ops, oversized
    messages and signature failures are reported as not retryable and kept.

    Example: indexer dead-letters retry --reason invalid_body
    """
    import collections

    from indexer import deadletters

    setup(log_level, log_format)
    _check_reason(reason)
    database = db.open_database(database_url, announce=announce)
    report_build()  # a retry decodes again, so an out-of-date compiled decoder matters here too
    results = deadletters.retry(database.url, reason=reason, ids=letter_id, limit=limit)
    outcomes = collections.Counter(result.outcome for result in results)
    for result in results:
        if result.outcome is not deadletters.Outcome.INDEXED:
            typer.echo(f"#{result.id} {result.outcome}: {result.detail}")
    typer.echo(f"{len(results)} dead letters retried: {outcomes[deadletters.Outcome.INDEXED]} indexed, "
               f"{outcomes[deadletters.Outcome.STILL_FAILING]} still failing, "
               f"{outcomes[deadletters.Outcome.NOT_RETRYABLE]} not retryable.")


async def run_observed(work: Awaitable, indexers: list, *, metrics_address: tuple[str, int] | None,
                       progress_interval: float = 30.0) -> None:
    """Await ``work`` while serving metrics (unless ``metrics_address`` is None) and showing progress of ``indexers``."""
    from indexer.progress import ProgressReporter, sample_indexers

    async with contextlib.AsyncExitStack() as stack:
        if metrics_address is not None:
            host, port = metrics_address
            try:
                await stack.enter_async_context(metrics.MetricsServer(metrics.build_registry(indexers), host, port))
            except ConfigError as error:
                # Indexing matters more than its metrics: a taken port (a second indexer on the
                # host, say) must not stop the archive. Prometheus reports the target as down.
                log.warning("metrics are not served", extra={"error": str(error)})
        reporter = asyncio.create_task(
            ProgressReporter(sample_indexers(indexers), log_interval=progress_interval).run())
        try:
            await work
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)


@app.command("backfill")
def backfill(
    cursor: Annotated[Optional[int], typer.Option(
        "--cursor", envvar="INDEXER_BACKFILL_CURSOR", min=0,
        help="Replay the relay's repo stream from this seq (a new replay job).", show_default=False)] = None,
    until: Annotated[Optional[int], typer.Option(
        "--until", envvar="INDEXER_BACKFILL_UNTIL", min=0,
        help="Last seq to replay. Default: the live indexer's cursor when the job starts.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", envvar="INDEXER_BACKFILL_RESUME", help="Continue the replay job named by --job.")] = False,
    relay: Annotated[str, typer.Option(envvar="INDEXER_RELAY",
                                       help="Relay to replay from, and to list repos on with --all.")]
    = "wss://bsky.network",
    repo: Annotated[Optional[list[str]], typer.Option(
        "--repo", envvar="INDEXER_BACKFILL_REPOS", help="Fetch this repo (DID) with getRepo and index every record. Repeatable.")] = None,
    repos_file: Annotated[Optional[Path], typer.Option(
        "--repos-file", envvar="INDEXER_BACKFILL_REPOS_FILE", help="Fetch every repo in this file: one DID per line, # starts a comment.")] = None,
    all_repos: Annotated[bool, typer.Option(
        "--all", envvar="INDEXER_BACKFILL_ALL", help="Fetch every repo the relay lists (listRepos, resumable).")] = False,
    desynchronized: Annotated[bool, typer.Option(
        "--desynchronized", envvar="INDEXER_BACKFILL_DESYNCHRONIZED", help="Refetch repos marked desynchronized (by #sync or a broken commit chain).")] = False,
    job: Annotated[Optional[str], typer.Option(
        "--job", envvar="INDEXER_BACKFILL_JOB",
        help="Job name. Default: backfill (replay), repos (--repo, --repos-file), all (--all), "
        "resync (--desynchronized).", show_default=False)] = None,
    refetch: Annotated[bool, typer.Option(
        "--refetch", envvar="INDEXER_BACKFILL_REFETCH", help="Fetch repos again even when the job already has them done or in a final state.")] = False,
    plc_url: Annotated[str, typer.Option(envvar="INDEXER_PLC_URL", help="PLC directory for did:plc resolution.")]
    = "https://plc.directory",
    verify: VerifyOption = "record",
    verify_workers: VerifyWorkersOption = None,
    verify_key_wait: VerifyKeyWaitOption = 0.5,
    concurrency: Annotated[int, typer.Option(envvar="INDEXER_BACKFILL_CONCURRENCY", min=1,
                                             help="Repos fetched and indexed at once.")] = 4,
    host_rate: Annotated[float, typer.Option(envvar="INDEXER_BACKFILL_HOST_RATE", min=0.01,
                                             help="Requests started per second per PDS or relay host.")] = 5.0,
    max_attempts: Annotated[int, typer.Option(envvar="INDEXER_BACKFILL_MAX_ATTEMPTS", min=1,
                                              help="Attempts per request on timeouts and server errors.")] = 5,
    work_dir: Annotated[Optional[Path], typer.Option(
        envvar="INDEXER_BACKFILL_WORK_DIR",
        help="Directory for downloaded repos while they are indexed. Default: the system temp directory.",
        show_default=False)] = None,
    allow_local_http: Annotated[bool, typer.Option(
        "--allow-local-http", envvar="INDEXER_ALLOW_LOCAL_HTTP", help="Accept http:// PDS and did:web hosts on 127.0.0.1 and localhost (testing).")]
    = False,
    batch_size: Annotated[int, typer.Option(envvar="INDEXER_BATCH_SIZE", min=1,
                                            help="Commit after this many events or records.")] = DEFAULT_BATCH_SIZE,
    receive_timeout: Annotated[float, typer.Option(envvar="INDEXER_RECEIVE_TIMEOUT", min=0.1,
                                                   help="Reconnect when the stream is silent for this many seconds.")]
    = 60.0,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", envvar="INDEXER_NO_MIGRATE",
                                             help="Do not upgrade the schema first; fail if it is not current.")] = False,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Fill gaps: replay the relay's stream from a seq, or fetch whole repos with getRepo.

    Runs beside `indexer run` and writes the same tables; newer data always wins (rev gating).
    Every job is resumable: run the same command again to continue it. See docs/backfill.md.

    Example: indexer backfill --cursor 31527015360 --until 31527015471

    Example: indexer backfill --repo did:plc:53iucmf5ldftgqyf2ac7hmhd
    """
    from indexer import backfill as backfills
    from indexer.repo_jobs import ALL_JOB, REPOS_JOB, RESYNC_JOB, RepoJobSettings, read_repos_file

    setup(log_level, log_format)
    replay = cursor is not None or resume or until is not None
    repos = bool(repo) or repos_file is not None or all_repos or desynchronized
    if replay == repos:
        raise ConfigError("give either --cursor/--resume (replay the stream) or --repo/--repos-file/--all/"
                          "--desynchronized (fetch repos); see `indexer backfill --help`")
    if replay:
        settings = backfills.ReplaySettings(relay=relay, job=job or backfills.REPLAY_JOB, cursor=cursor, until=until,
                                            batch_size=batch_size, receive_timeout=receive_timeout,
                                            verify=verify_settings(verify, plc_url, verify_workers, verify_key_wait,
                                                                   allow_local_http))
        database = prepare_database(database_url, migrate=not no_migrate)
        report_build()
        tune_gc()
        raise typer.Exit(backfills.replay_command(database.url, settings))

    dids = [*(repo or []), *(read_repos_file(repos_file) if repos_file is not None else [])]
    if all_repos:
        default_job = ALL_JOB
    elif desynchronized:
        default_job = RESYNC_JOB
    else:
        default_job = REPOS_JOB
    settings = RepoJobSettings(job=job or default_job, concurrency=concurrency, host_rate=host_rate,
                               max_attempts=max_attempts, plc_url=plc_url, allow_local_http=allow_local_http,
                               refetch=refetch, batch_size=batch_size, work_dir=work_dir)
    database = prepare_database(database_url, migrate=not no_migrate)
    report_build()
    tune_gc()
    raise typer.Exit(backfills.repos_command(database.url, settings, dids=dids,
                                             list_relay=relay if all_repos else None, desynchronized=desynchronized))


def report_build() -> None:
    """Log whether the hot modules run compiled, and warn when a compiled copy is out of date."""
    from indexer import native

    stale = native.stale_modules()
    build = native.read_build()
    if stale:
        log.warning(native.stale_message(stale))
    elif not build.compiled and build.reason != native.PURE_PYTHON_REQUESTED:
        log.warning(f"decoding and proof modules run as plain Python (decoding about 1.3 times slower): {build.reason}. "
                    "README, Requirements, says what compiling needs; then run the install again.")
    else:
        log.info(f"decoding and proof modules: {native.summary()}")


def tune_gc() -> None:
    """Set the garbage collector up for a long ingest; call once, after start-up.

    Ingest allocates many short-lived containers (decoded records, rows), so the default young
    generation threshold of 700 ran a collection every few events, and each full collection walked
    every module and class loaded at start-up. Freezing moves those start-up objects out of the
    collector's view; the higher thresholds make collections rarer. Reference counting still frees
    almost everything at once; the collector only has cycles left to find.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def main() -> None:
    """Entry point of the ``indexer`` console script."""
    try:
        app()
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except IndexerError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
