"""The Alembic migrations produce exactly the schema described by indexer.schema, and round-trip."""

from __future__ import annotations

import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from indexer import db
from indexer.schema import VIEWS, metadata


def _schema_differences(url: str) -> list:
    engine = db.create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def _table_names(url: str) -> set[str]:
    engine = db.create_engine(url)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrated_database_matches_metadata(database_url):
    assert _schema_differences(database_url) == []


def test_migrated_database_has_views(database_url):
    engine = db.create_engine(database_url)
    try:
        views = set(sqlalchemy.inspect(engine).get_view_names())
    finally:
        engine.dispose()
    assert views == set(VIEWS)


def test_upgrade_twice_is_noop(empty_database_url):
    db.upgrade(empty_database_url)
    first = db.current_revision(empty_database_url)
    db.upgrade(empty_database_url)
    assert db.current_revision(empty_database_url) == first == db.head_revision()


def test_downgrade_base_then_upgrade_roundtrips(empty_database_url):
    db.upgrade(empty_database_url)
    db.downgrade(empty_database_url, "base")
    assert _table_names(empty_database_url) <= {"alembic_version"}
    assert db.current_revision(empty_database_url) is None

    db.upgrade(empty_database_url)
    assert _schema_differences(empty_database_url) == []


def test_migrated_views_match_schema_sql(database_url):
    """Each view made by the migrations has the definition written in indexer.schema.VIEWS."""
    engine = db.create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(sqlalchemy.text("CREATE SCHEMA expected_views"))
            for name, sql in VIEWS.items():
                connection.execute(sqlalchemy.text(f"CREATE VIEW expected_views.{name} AS {sql}"))
            for name in VIEWS:
                migrated = connection.execute(
                    sqlalchemy.text("SELECT pg_get_viewdef(to_regclass(:name), true)"), {"name": f"public.{name}"}
                ).scalar_one()
                expected = connection.execute(
                    sqlalchemy.text("SELECT pg_get_viewdef(to_regclass(:name), true)"), {"name": f"expected_views.{name}"}
                ).scalar_one()
                assert migrated == expected, name
    finally:
        engine.dispose()
