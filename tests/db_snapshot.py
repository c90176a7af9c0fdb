"""Snapshot every table of the schema, so two databases filled by different runs can be compared.

``snapshot(url)`` reads each table of ``indexer.schema.metadata`` and returns its rows as sorted
tuples. Columns whose values depend on when or in which order rows were written, rather than on
the input, are left out: write times (``indexed_at``, ``updated_at``, ``received_at``,
``detected_at``, ``created_at`` of dead letters) and identity ``id`` columns. Two runs over the
same frames must then give equal snapshots, however they were interrupted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from sqlalchemy import Table

from indexer import schema

# Per-table columns that record write times, not input; every table also drops identity columns.
WRITE_TIME_COLUMNS = {"indexed_at", "updated_at", "received_at", "detected_at"}
TABLE_WRITE_TIME_COLUMNS = {"dead_letters": {"created_at"}}


def compared_columns(table: Table) -> list[str]:
    """Return the columns of ``table`` that a snapshot compares, in table order."""
    skipped = WRITE_TIME_COLUMNS | TABLE_WRITE_TIME_COLUMNS.get(table.name, set())
    return [column.name for column in table.columns
            if column.name not in skipped and column.identity is None]


def _sort_key(row: tuple) -> tuple:
    # NULLs and mixed types cannot be ordered directly, so each value sorts by (is None, repr).
    return tuple((value is None, repr(value)) for value in row)


def snapshot(url: str, endpoints: Mapping[str, str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Return ``{table name: sorted row tuples}`` for every table, without write-time columns.

    ``url`` may use the ``postgresql+psycopg://`` (SQLAlchemy) or ``postgresql://`` form.
    ``endpoints`` renames values of ``endpoint`` columns, so that runs against relays on different
    ports compare equal; endpoints not in it are kept. JSONB values come back as Python dicts and
    lists, byte columns as ``bytes``.
    """
    libpq_url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    renames = dict(endpoints or {})
    result: dict[str, list[tuple[Any, ...]]] = {}
    with psycopg.connect(libpq_url) as connection:
        for table in schema.metadata.sorted_tables:
            columns = compared_columns(table)
            names = ", ".join(f'"{name}"' for name in columns)
            rows = [list(row) for row in connection.execute(f"SELECT {names} FROM {table.name}")]
            if "endpoint" in columns:
                position = columns.index("endpoint")
                for row in rows:
                    row[position] = renames.get(row[position], row[position])
            result[table.name] = sorted((tuple(row) for row in rows), key=_sort_key)
    return result


def differences(expected: dict[str, list[tuple]], actual: dict[str, list[tuple]]) -> dict[str, dict[str, list]]:
    """Return, per table that differs, the rows only in ``expected`` and the rows only in ``actual``.

    An empty result means the snapshots are equal. Meant for readable assertion messages.
    """
    found = {}
    for table in sorted(set(expected) | set(actual)):
        left = expected.get(table, [])
        right = actual.get(table, [])
        if left == right:
            continue
        found[table] = {
            "missing": [row for row in left if row not in right],
            "unexpected": [row for row in right if row not in left],
        }
    return found
