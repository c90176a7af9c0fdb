"""Database selection, connections and schema migrations.

The database URL comes from, in order: the ``--database-url`` option, ``INDEXER_DATABASE_URL``,
``DATABASE_URL``. With none of them set, the embedded PostgreSQL server is started (see
``indexer.embedded``). Migrations are the Alembic scripts shipped in ``indexer.migrations``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from indexer import embedded
from indexer.errors import ConfigError, DatabaseUnavailable

log = logging.getLogger(__name__)

URL_ENV_VARS = ("INDEXER_DATABASE_URL", "DATABASE_URL")
ACCEPTED_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


@dataclass(frozen=True)
class Database:
    """A configured database: its SQLAlchemy URL, and the embedded server when one was started."""

    url: str
    embedded: embedded.EmbeddedDatabase | None = None

    @property
    def display_url(self) -> str:
        """The URL without its password, or the data directory of the embedded server."""
        if self.embedded is not None:
            return f"(embedded, {self.embedded.data_dir})"
        return redact_url(self.url)


def normalize_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver, or raise ConfigError for a non-PostgreSQL URL."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ConfigError(
            f"invalid database URL {redact_text(url)!r}: {error}. "
            "Expected e.g. postgresql://user:password@localhost:5432/indexer"
        ) from None
    if parsed.drivername not in ACCEPTED_SCHEMES:
        raise ConfigError(
            f"unsupported database URL scheme {parsed.drivername!r} in {redact_url(url)}: "
            "use postgresql:// or postgresql+psycopg://"
        )
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def redact_url(url: str | URL) -> str:
    """Return the URL with its password replaced by ***, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return redact_text(str(url))


def redact_text(text: str) -> str:
    """Hide a password in something that failed to parse as a URL: keep only scheme and host part."""
    if "@" in text and "://" in text:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return text


def configured_url(option: str | None) -> str | None:
    """Return the URL from the option or the environment, or None when the embedded server is wanted."""
    if option:
        return option
    for name in URL_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def open_database(option: str | None = None, *, announce=print) -> Database:
    """Resolve the database to use, starting the embedded server when none is configured.

    ``announce`` receives a human-readable line saying where an embedded database lives.
    """
    url = configured_url(option)
    if url is not None:
        return Database(url=normalize_url(url))

    server = embedded.start()
    announce(
        f"Using the embedded PostgreSQL in {server.data_dir} (it runs while indexer runs). "
        f"Connect with: {server.psql_command}"
    )
    return Database(url=server.url, embedded=server)


def create_engine(database: Database | str, **options) -> Engine:
    """Create an engine and check that the database accepts a query; raise DatabaseUnavailable if not."""
    url = database.url if isinstance(database, Database) else normalize_url(database)
    engine = sqlalchemy.create_engine(url, pool_pre_ping=True, **options)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except OperationalError as error:
        engine.dispose()
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact_url(url)}: {first_line(error.orig)}. "
            "Check that the server runs and the URL is right, or unset DATABASE_URL to use the embedded server."
        ) from None
    return engine


def first_line(error: BaseException | None) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def migrations_dir() -> Path:
    """Return the directory of the Alembic migration scripts (installed with the package)."""
    return Path(str(resources.files("indexer.migrations")))


def alembic_config(url: str):
    """Build an Alembic configuration for ``url`` without needing alembic.ini on disk."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["url"] = normalize_url(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database to ``revision``. Idempotent: at that revision already, nothing runs."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` removes every table)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """Return the revision the database is at, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """Return the newest revision of the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://localhost/unused")).get_current_head()
