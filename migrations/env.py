"""Alembic environment: runs migrations online against the URL given by indexer or the environment."""

from alembic import context
from sqlalchemy import create_engine, pool

from indexer.db import configured_url, normalize_url
from indexer.errors import ConfigError
from indexer.schema import metadata

config = context.config
target_metadata = metadata


def database_url() -> str:
    url = config.attributes.get("url") or configured_url(None)
    if not url:
        raise ConfigError("no database URL: set INDEXER_DATABASE_URL or DATABASE_URL, or use `indexer db upgrade`")
    return normalize_url(url)


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise ConfigError("offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
