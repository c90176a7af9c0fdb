"""Generate ``docs/schema.md``, the reference of every table, view and column, from ``indexer.schema``.

Run ``python -m indexer.schema_doc > docs/schema.md`` after changing the schema. Table and column
descriptions are the ``comment=`` texts of the SQLAlchemy metadata, which PostgreSQL also stores.
The few columns created without a comment, and the views (which have no metadata), are described
here. ``render`` raises ``MissingDescription`` for a table, column or view without any description,
so a column cannot be added without documenting it.
"""

from __future__ import annotations

import re
import sys

from sqlalchemy import CheckConstraint, Column, MetaData, Table
from sqlalchemy.dialects import postgresql

from indexer import schema

# Descriptions of columns that have no comment in the metadata (adding one there needs a migration).
COLUMN_NOTES = {
    "dead_letters.id": "Row id, as `indexer dead-letters show ID` and `retry --id` take it.",
    "dead_letters.created_at": "When the input was dead-lettered.",
    "gaps.id": "Row id, in the order the gaps were detected.",
    "gaps.detected_at": "When the indexer recorded the gap.",
    "labels.id": "Row id, in the order the labels were received.",
}

# Each view: the table its columns come from, and what it shows.
VIEW_NOTES = {
    "current_labels": (
        "labels",
        "Labels in force now: for each (src, uri, val), the newest label by `cts` (a negation wins a "
        "tie), unless that label is a negation or has expired. The clock is `now()`, or the session setting `indexer.now` when "
        "set (for reproducible queries).",
    ),
}

INTRODUCTION = """\
# Database schema

Generated from `indexer/schema.py` by `python -m indexer.schema_doc > docs/schema.md`; edit the
comments there, not this file. PostgreSQL stores the same descriptions as comments, so `\\d+ posts`
in psql and most BI tools show them too.

Conventions:

- Identifier columns (did, rkey, cid, rev, uri, collection, handle) use `COLLATE "C"`, so they
  compare byte-wise.
- Every `seq` is `BIGINT`: relay sequence numbers are above 2^31.
- A record's identity is (did, collection, rkey). Its `rev` (a TID, ordered as text) decides which
  write wins: a create or update whose rev is not newer than the stored one changes nothing.
- Times are `timestamptz` in UTC. Columns ending in `_raw` keep a value exactly as sent; the parsed
  column beside it is NULL when the value is invalid.
- The typed record tables (posts, likes, reposts, follows, blocks, profiles) hold one row per
  existing record; every other collection goes to `records`. Deleted records are removed and noted
  in `deletions`.
"""


class MissingDescription(Exception):
    """Tables, columns or views of the schema that have no description; lists them all."""


def render(metadata: MetaData = schema.metadata, views: dict[str, str] = schema.VIEWS) -> str:
    """Return the Markdown reference of ``metadata`` and ``views``; raise MissingDescription when any lack one."""
    missing = _missing(metadata, views)
    if missing:
        raise MissingDescription(
            f"no description for {', '.join(missing)}: add comment= in indexer/schema.py (or a note in "
            "indexer/schema_doc.py), then run `python -m indexer.schema_doc > docs/schema.md`"
        )
    tables = sorted(metadata.tables.values(), key=lambda table: table.name)
    parts = [INTRODUCTION, "## Tables\n", *(f"- [{table.name}](#{table.name})" for table in tables), ""]
    parts.extend(f"- [{name}](#{name}) (view)" for name in sorted(views))
    parts.append("")
    for table in tables:
        parts.append(_table_section(table))
    parts.append("## Views\n")
    for name in sorted(views):
        parts.append(_view_section(name, views[name], metadata))
    return "\n".join(parts).rstrip("\n") + "\n"


def _missing(metadata: MetaData, views: dict[str, str]) -> list[str]:
    missing = []
    for table in sorted(metadata.tables.values(), key=lambda table: table.name):
        if not table.comment:
            missing.append(f"table {table.name}")
        missing.extend(f"column {table.name}.{column.name}" for column in table.columns
                       if not _column_description(table, column))
    missing.extend(f"view {name}" for name in sorted(views) if name not in VIEW_NOTES)
    return missing


def _column_description(table: Table, column: Column) -> str | None:
    return column.comment or COLUMN_NOTES.get(f"{table.name}.{column.name}")


def _type_of(column: Column) -> str:
    compiled = str(column.type.compile(dialect=postgresql.dialect()))
    return compiled.replace(' COLLATE "C"', "").replace("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ")


def _table_section(table: Table) -> str:
    lines = [f"### {table.name}\n", table.comment, "", "| column | type | null | description |", "|---|---|---|---|"]
    for column in table.columns:
        description = _column_description(table, column)
        if column.computed is not None:
            description += f" Generated: `{column.computed.sqltext}`."
        elif column.server_default is not None and hasattr(column.server_default, "arg"):
            description += f" Default: `{_default_text(column.server_default.arg)}`."
        null = "no" if not column.nullable else "yes"
        lines.append(f"| `{column.name}` | {_type_of(column)} | {null} | {_cell(description)} |")
    lines.append("")
    key = ", ".join(column.name for column in table.primary_key.columns)
    lines.append(f"Primary key: ({key}).")
    for index in sorted(table.indexes, key=lambda index: index.name or ""):
        kind = "Unique index" if index.unique else "Index"
        lines.append(f"{kind} on ({', '.join(column.name for column in index.columns)}).")
    for constraint in sorted(table.constraints, key=lambda constraint: str(constraint.name)):
        if isinstance(constraint, CheckConstraint):
            lines.append(f"Check: `{constraint.sqltext}`.")
    lines.append("")
    return "\n".join(lines)


def _default_text(arg) -> str:
    return arg if isinstance(arg, str) else str(getattr(arg, "text", arg))


def _view_section(name: str, sql: str, metadata: MetaData) -> str:
    base_name, description = VIEW_NOTES[name]
    base = metadata.tables[base_name]
    lines = [f"### {name}\n", description, "", f"Columns, as in [{base_name}](#{base_name}):", "",
             "| column | type | description |", "|---|---|---|"]
    for column_name in _selected_columns(sql):
        column = base.columns[column_name]
        lines.append(f"| `{column_name}` | {_type_of(column)} | {_cell(_column_description(base, column))} |")
    lines.extend(["", "Definition:", "", "```sql", sql.strip(), "```", ""])
    return "\n".join(lines)


def _selected_columns(sql: str) -> list[str]:
    """Return the column names of the view's outer ``SELECT a, b, c FROM`` list."""
    match = re.search(r"SELECT\s+(.*?)\s+FROM", sql, flags=re.DOTALL)
    if match is None:
        raise MissingDescription(f"cannot read the column list of view SQL starting {sql.strip()[:60]!r}")
    return [name.strip() for name in match.group(1).split(",")]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
