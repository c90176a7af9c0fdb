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
