"""Shared test fixtures: a real PostgreSQL server for the session and a fresh database per test.

``TEST_DATABASE_URL`` selects an existing server (its user needs CREATEDB); otherwise one embedded
PostgreSQL is started for the whole session in a temporary directory. The schema is migrated once
into a template database, and each test gets its own copy of it, so tests are independent.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

os.environ.setdefault("RUST_LIB_BACKTRACE", "0")
# Tests never reach the real network: a PLC directory on the discard port refuses at once, so a
# test that forgets to pass a local one sees DID resolution fail instead of contacting plc.directory.
os.environ.setdefault("INDEXER_PLC_URL", "http://127.0.0.1:9")

TEMPLATE = f"indexer_template_{uuid.uuid4().hex[:8]}"


def pytest_configure(config: pytest.Config) -> None:
    # An edited module whose compiled copy was built earlier would leave the tests running the old
    # code, and passing or failing for the wrong reason.
    from indexer import native

    stale = native.stale_modules()
    if stale:
        pytest.exit(f"cannot test: {native.stale_message(stale)}", returncode=4)
_counter = itertools.count()


def _server_url_for(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


def _libpq(url: str) -> str:
    """Turn a SQLAlchemy URL into one psycopg accepts."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def make_data_dir() -> Path:
    """Create a directory for an embedded server's data, outside pytest's own temporary tree.

    As root, the embedded server runs as another system user that must traverse every parent
    directory. pytest resets its ``pytest-of-USER`` directory to mode 0700 whenever a session
    starts, which would lock a running server out of its data, so the data lives directly in /tmp.
    """
    return Path(tempfile.mkdtemp(prefix="indexer-test-"))


@pytest.fixture
def data_dir() -> Path:
    """A fresh INDEXER_DATA_DIR for one test, removed afterwards."""
    path = make_data_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL (postgresql+psycopg) of the maintenance database of the session's PostgreSQL server."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        from indexer.db import normalize_url

        yield _server_url_for(normalize_url(configured), "postgres")
        return

    from indexer import embedded

    path = make_data_dir()
    # The server stops at interpreter exit, in the atexit hook that embedded.start registers.
    # atexit runs hooks in reverse order of registration, so this one, registered first, removes
    # the data after the server has stopped (removing it under a running server breaks it).
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    server = embedded.start(path)
    yield _server_url_for(server.url, "postgres")


@pytest.fixture(scope="session")
def template_database(postgres_server_url) -> str:
    """Name of a database migrated to the newest revision, copied for each test."""
    from indexer import db

    with psycopg.connect(_libpq(postgres_server_url), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{TEMPLATE}"')
    db.upgrade(_server_url_for(postgres_server_url, TEMPLATE))
    yield TEMPLATE
    with psycopg.connect(_libpq(postgres_server_url), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')


@pytest.fixture
def empty_database_url(postgres_server_url) -> str:
    """URL of a new database with no tables at all (for migration tests)."""
    yield from _fresh_database(postgres_server_url, template=None)


@pytest.fixture
def database_url(postgres_server_url, template_database) -> str:
    """URL of a new database already migrated to the newest revision."""
    yield from _fresh_database(postgres_server_url, template=template_database)


def _fresh_database(server_url: str, template: str | None):
    name = f"test_{os.getpid()}_{next(_counter)}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(_libpq(server_url), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"{clause}')
    yield _server_url_for(server_url, name)
    with psycopg.connect(_libpq(server_url), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(database_url):
    """A SQLAlchemy engine on the test's migrated database."""
    from indexer.db import create_engine

    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def corpus_frames() -> list[tuple[int, bytes]]:
    """``(seq, frame)`` of the recorded Jetstream corpus relay frames, in stream order."""
    from fixture_archive import corpus_frames as load_corpus_frames

    return load_corpus_frames()


@pytest.fixture
async def start_relay():
    """A function that starts a ``ReplayRelay`` on 127.0.0.1; every relay it started is stopped afterwards."""
    from indexer.replay import ReplayRelay

    relays = []

    async def start(frames, **options) -> ReplayRelay:
        relay = await ReplayRelay(frames, **options).start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        await relay.stop()
