"""The ``indexer`` command line: option parsing, database selection, and user-facing errors.

Every option can also be set through an ``INDEXER_*`` environment variable (shown in ``--help``);
the database URL also through ``DATABASE_URL``. User errors print one line and exit non-zero
without a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import typer

from indexer import db, embedded
from indexer import log as logs
from indexer.errors import ConfigError, IndexerError

app = typer.Typer(
    help=(
        "Archive the AT Protocol (Bluesky) network into PostgreSQL.\n\n"
        "Example: indexer run   (embedded PostgreSQL, default relay wss://bsky.network)"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
db_app = typer.Typer(help="Migrate and inspect the database schema.\n\nExample: indexer db upgrade", no_args_is_help=True)
app.add_typer(db_app, name="db")

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


def prepare_database(database_url: str | None, migrate: bool) -> db.Database:
    """Open the configured (or embedded) database and bring its schema up to date unless told not to."""
    database = db.open_database(database_url, announce=announce)
    db.create_engine(database).dispose()
    if migrate:
        db.upgrade(database.url)
    elif db.current_revision(database.url) != db.head_revision():
        raise ConfigError(
            f"the database schema is at revision {db.current_revision(database.url) or 'none'}, not "
            f"{db.head_revision()}: run `indexer db upgrade` or drop --no-migrate"
        )
    return database


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
        "--did", envvar="INDEXER_DIDS", help="Index only this account's events. Repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(envvar="INDEXER_BATCH_SIZE", min=1,
                                            help="Commit after this many events.")] = 1000,
    batch_interval: Annotated[float, typer.Option(envvar="INDEXER_BATCH_INTERVAL", min=0.01,
                                                  help="Commit when the oldest uncommitted event is this many seconds old.")] = 0.2,
    receive_timeout: Annotated[float, typer.Option(envvar="INDEXER_RECEIVE_TIMEOUT", min=0.1,
                                                   help="Reconnect when a stream is silent for this many seconds.")] = 60.0,
    max_message_size: Annotated[int, typer.Option(envvar="INDEXER_MAX_MESSAGE_SIZE", min=1024,
                                                  help="Largest websocket message accepted, in bytes.")] = 8 * 1024 * 1024,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", envvar="INDEXER_NO_MIGRATE",
                                             help="Do not upgrade the schema first; fail if it is not current.")] = False,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = "info",
    log_format: LogFormatOption = "text",
) -> None:
    """Index the relay's repo stream and labelers' label streams into PostgreSQL until stopped.

    Resumes from the stored cursors. Ctrl-C or SIGTERM commits what was received and exits.

    Example: indexer run --relay wss://bsky.network --labeler wss://mod.bsky.app
    """
    import asyncio

    from indexer.ingest import Filters
    from indexer.runner import DEFAULT_LABELER, RunSettings, build_indexers, run_streams

    setup(log_level, log_format)
    filters = Filters(collections=tuple(collection or ()), dids=frozenset(did or ()))
    settings = RunSettings(
        relay=None if no_repos else relay,
        labelers=[] if no_labels else (labeler or [DEFAULT_LABELER]),
        filters=filters, batch_size=batch_size, batch_interval=batch_interval,
        receive_timeout=receive_timeout, max_message_size=max_message_size,
    )
    if settings.relay is None and not settings.labelers:
        raise ConfigError("nothing to index: --no-repos and --no-labels were both given")
    database = prepare_database(database_url, migrate=not no_migrate)
    indexers = build_indexers(database.url, settings)
    try:
        asyncio.run(run_streams(indexers))
    except asyncio.CancelledError:
        raise typer.Exit(130) from None


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
