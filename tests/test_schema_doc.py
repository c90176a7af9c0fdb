"""``docs/schema.md`` is generated from the schema metadata, is current, and covers every column."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, Text

from indexer import schema
from indexer.schema_doc import MissingDescription, render

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"


def test_schema_doc_is_current():
    assert SCHEMA_DOC.read_text() == render(), (
        "docs/schema.md is out of date: run `python -m indexer.schema_doc > docs/schema.md`")


def test_schema_doc_covers_every_column():
    text = SCHEMA_DOC.read_text()
    for table in schema.metadata.tables.values():
        section = text.split(f"### {table.name}\n", 1)[1].split("\n### ", 1)[0]
        for column in table.columns:
            assert f"| `{column.name}` |" in section, f"{table.name}.{column.name}"


def test_schema_doc_covers_every_view():
    text = SCHEMA_DOC.read_text()
    for view in schema.VIEWS:
        assert f"### {view}\n" in text


def metadata_copy() -> MetaData:
    copy = MetaData()
    for table in schema.metadata.tables.values():
        table.to_metadata(copy)
    return copy


def test_uncommented_column_fails_render():
    metadata = metadata_copy()
    metadata.tables["posts"].append_column(Column("mood", Text))
    with pytest.raises(MissingDescription, match="column posts.mood"):
        render(metadata)


def test_commented_column_appears_in_render():
    metadata = metadata_copy()
    metadata.tables["posts"].append_column(Column("mood", Text, comment="How the author felt."))
    assert "| `mood` | TEXT | yes | How the author felt. |" in render(metadata)


def test_undescribed_view_fails_render():
    with pytest.raises(MissingDescription, match="view trending_posts"):
        render(views={**schema.VIEWS, "trending_posts": "SELECT uri FROM posts"})
