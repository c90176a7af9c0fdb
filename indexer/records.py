"""Map decoded records to table rows: a typed table per known collection, ``records`` for the rest.

This module owns the record-mapping stage. ``row_for_record`` turns one libipld-decoded record into
the column values of one row, and ``record_columns`` gives the column order the writer uses.
Records are untrusted input, so any field may be missing or have the wrong type. The mapping never
raises for the shape of a decoded record: a wrong-typed field maps to NULL in its own column, and
the whole record is still stored in the ``record`` column.

Columns taken from the record are read from its atproto JSON form (``jsonform.to_json``), so U+0000
is already removed from every string in them, and CID links are already CID strings.

``parse_datetime`` reads atproto datetimes (``createdAt``) and returns None for any value that is
invalid or implausible, so that ``created_at`` is safe to sort and bucket by.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table

from indexer.errors import DecodeError
from indexer.events import DropReason
from indexer.jsonform import to_json
from indexer.schema import RECORD_TABLES, records

# The earliest createdAt kept in created_at: the Unix epoch. atproto's syntax allows any year from
# 0000, but Bluesky's AppView also treats a createdAt before the epoch as unusable for sorting
# (docs.bsky.app, "Timestamps"), and many BI tools mishandle such dates. Backdated imports of
# posts from other networks are later than that.
EARLIEST_DATETIME = datetime(1970, 1, 1, tzinfo=UTC)

# How far a createdAt may be ahead of the reference time and still be kept. The Bluesky docs
# suggest a 2-minute clock-skew window for sorting. created_at is data rather than a sort key, so
# the window here also covers clients that send local time with a "Z" suffix (UTC offsets are at
# most 14 hours).
MAX_AHEAD = timedelta(days=1)

# atproto datetimes are at most 64 characters.
_MAX_DATETIME_CHARS = 64

# The atproto datetime syntax: RFC 3339 with an upper-case "T" and "Z", seconds required, a fraction
# of any length, and a timezone required. "-00:00" is checked separately. [0-9] rather than \d so
# that non-ASCII digits do not match.
_DATETIME_SYNTAX = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})\Z"
)

_EMBED_KINDS = {
    "app.bsky.embed.images": "images",
    "app.bsky.embed.video": "video",
    "app.bsky.embed.external": "external",
    "app.bsky.embed.record": "record",
    "app.bsky.embed.recordWithMedia": "recordWithMedia",
}
# "<nsid>#main" names the same definition as "<nsid>".
_EMBED_KINDS.update({f"{nsid}#main": kind for nsid, kind in list(_EMBED_KINDS.items())})
_SELF_LABELS_TYPE = "com.atproto.label.defs#selfLabels"


def parse_datetime(
    raw: object,
    *,
    now: datetime | None = None,
    earliest: datetime = EARLIEST_DATETIME,
    max_ahead: timedelta = MAX_AHEAD,
) -> datetime | None:
    """Parse an atproto datetime into an aware UTC datetime, or return None when it is not usable.

    None means that ``raw`` is not a string or is longer than 64 characters. It also means that
    ``raw`` does not follow the atproto datetime syntax: upper-case ``T`` and ``Z``, seconds and a
    timezone required, and ``-00:00`` rejected. It also means a time that does not exist (month 13,
    second 60 for a leap second, an offset of 24 hours or more). Finally, it means a time before
    ``earliest`` or more than ``max_ahead`` after ``now``, which must be aware and defaults to the
    current time. Fractions beyond microseconds are truncated. Year 0000 is valid atproto syntax
    but always gives None, because Python's datetime starts at year 1.
    """
    if not isinstance(raw, str) or len(raw) > _MAX_DATETIME_CHARS:
        return None
    if _DATETIME_SYNTAX.match(raw) is None or raw.endswith("-00:00"):
        return None
    try:
        # Python 3.11's fromisoformat reads this syntax, truncating long fractions.
        parsed = datetime.fromisoformat(raw).astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    if parsed < earliest:
        return None
    if parsed > (now if now is not None else datetime.now(UTC)) + max_ahead:
        return None
    return parsed


@dataclass(frozen=True, slots=True)
class RecordRow:
    """One row to write: the target table, its column values, and whether U+0000 was removed.

    ``values`` has exactly the columns of ``record_columns(table)``. JSONB columns (``record``,
    ``facets``, ``embed``) hold plain JSON values (dict, list, str, ...), which the writer must
    send as JSON. ``nul_stripped`` is True when U+0000 was removed from any string of the record.
    """

    table: Table
    values: dict[str, Any]
    nul_stripped: bool

    def column_values(self) -> tuple[Any, ...]:
        """Return the values in the order of ``record_columns(self.table)``."""
        values = self.values
        return tuple(values[name] for name in _COLUMNS[self.table.name])


def _writable_columns(table: Table) -> tuple[str, ...]:
    # The database computes uri and fills indexed_at itself, so they are never written.
    return tuple(
        column.name for column in table.columns if column.computed is None and column.server_default is None
    )


_COLUMNS: dict[str, tuple[str, ...]] = {
    table.name: _writable_columns(table) for table in (*RECORD_TABLES.values(), records)
}


def record_columns(table: Table) -> tuple[str, ...]:
    """Return the names of the columns the indexer writes to a record table, in table order.

    ``uri`` (generated) and ``indexed_at`` (server default) are left out. Raises ValueError for a
    table that does not hold records.
    """
    try:
        return _COLUMNS[table.name]
    except KeyError:
        raise ValueError(
            f"table {table.name!r} does not hold records; expected one of {sorted(_COLUMNS)}"
        ) from None


def row_for_record(
    collection: str,
    did: str,
    rkey: str,
    cid: str,
    rev: str,
    seq: int | None,
    record: Any,
    *,
    block: bytes | None = None,
    now: datetime | None = None,
) -> RecordRow:
    """Build the row for one record version. Raises only for a record nested too deeply to convert.

    ``record`` is the libipld-decoded record, and ``block`` its DAG-CBOR bytes when known (they
    let ``to_json`` tell CID links from byte strings exactly). ``seq`` is None for records from a
    repo export. ``collection`` picks the typed table, and any other collection goes to
    ``records``. The identifiers (collection, did, rkey, cid, rev) are written as given.

    ``created_at_raw`` is the record's ``createdAt`` when it is a string, else NULL. ``created_at``
    is ``parse_datetime`` of it, with ``now`` (default: the current time) as the reference for the
    future bound. So a record indexed again later can gain a created_at that was too far ahead the
    first time. The rev is not used as the reference, because a PDS may start revs at any value.

    Raises ``DecodeError(INVALID_RECORD)`` when converting to the JSON form exceeds Python's
    recursion limit. libipld decodes up to about that many nesting levels, and the interpreted
    conversion uses several frames per level, so only plain-Python installs reach it, for records
    nested a few hundred levels deep. Compiled code does not count frames.
    """
    try:
        converted = to_json(record, block=block)
    except RecursionError:
        raise DecodeError(DropReason.INVALID_RECORD, "record is nested too deeply to convert to JSON") from None
    document = converted.value
    fields = document if isinstance(document, dict) else {}

    created_at_raw = fields.get("createdAt")
    if isinstance(created_at_raw, str):
        created_at = parse_datetime(created_at_raw, now=now)
    else:
        created_at_raw = created_at = None

    values = {
        "did": did,
        "rkey": rkey,
        "cid": cid,
        "rev": rev,
        "seq": seq,
        "created_at_raw": created_at_raw,
        "created_at": created_at,
        "record": document,
        # Not checked yet: the indexing loop sets them from the commit's verification outcome.
        "verified": None,
        "verify_reason": None,
    }
    table = RECORD_TABLES.get(collection)
    if table is None:
        table = records
        values["collection"] = collection
    else:
        _TYPED_COLUMNS[collection](fields, values)
    return RecordRow(table, values, converted.nul_chars_removed > 0)


# Field readers. Each returns None for a missing or wrong-typed field.


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _texts(value: Any) -> list[str] | None:
    """Return the string elements of an array (skipping any other element), or None if not an array."""
    if not isinstance(value, list):
        return None
    return [item for item in value if isinstance(item, str)]


def _strong_ref(value: Any) -> tuple[str | None, str | None]:
    """Return (uri, cid) of a com.atproto.repo.strongRef."""
    if not isinstance(value, dict):
        return None, None
    return _text(value.get("uri")), _text(value.get("cid"))


def _blob_cid(value: Any) -> str | None:
    """Return the CID of a blob: ``{"$type": "blob", "ref": {"$link": cid}}`` or legacy ``{"cid": cid}``."""
    if not isinstance(value, dict):
        return None
    if "ref" in value:
        ref = value["ref"]
        return _text(ref.get("$link")) if isinstance(ref, dict) else None
    return _text(value.get("cid"))


# Typed columns, per collection. Each function sets every extra column of its table.


def _post_columns(fields: dict[str, Any], values: dict[str, Any]) -> None:
    values["text"] = _text(fields.get("text"))
    values["langs"] = _texts(fields.get("langs"))

    reply = fields.get("reply")
    if not isinstance(reply, dict):
        reply = {}
    values["reply_root_uri"], values["reply_root_cid"] = _strong_ref(reply.get("root"))
    values["reply_parent_uri"], values["reply_parent_cid"] = _strong_ref(reply.get("parent"))

    embed = fields.get("embed")
    if not isinstance(embed, dict):
        embed = None
    embed_type = _text(embed.get("$type")) if embed is not None else None
    embed_kind = _EMBED_KINDS.get(embed_type, embed_type) if embed_type is not None else None
    values["quote_uri"], values["quote_cid"] = _quoted(embed, embed_kind)
    values["embed_kind"] = embed_kind
    values["embed"] = embed

    facets = fields.get("facets")
    values["facets"] = facets if isinstance(facets, list) else None
    values["self_labels"] = _self_labels(fields.get("labels"))
    values["tags"] = _texts(fields.get("tags"))


def _quoted(embed: dict[str, Any] | None, embed_kind: str | None) -> tuple[str | None, str | None]:
    """Return (uri, cid) of the record a post quotes, from an embed record or recordWithMedia."""
    if embed is None:
        return None, None
    if embed_kind == "record":
        return _strong_ref(embed.get("record"))
    if embed_kind == "recordWithMedia":
        inner = embed.get("record")
        return _strong_ref(inner.get("record")) if isinstance(inner, dict) else (None, None)
    return None, None


def _self_labels(labels: Any) -> list[str] | None:
    """Return the values of com.atproto.label.defs#selfLabels, skipping malformed entries."""
    if not isinstance(labels, dict) or labels.get("$type") != _SELF_LABELS_TYPE:
        return None
    entries = labels.get("values")
    if not isinstance(entries, list):
        return None
    return [
        entry["val"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("val"), str)
    ]


def _subject_ref_columns(fields: dict[str, Any], values: dict[str, Any]) -> None:
    values["subject_uri"], values["subject_cid"] = _strong_ref(fields.get("subject"))
    values["via_uri"], values["via_cid"] = _strong_ref(fields.get("via"))


def _subject_did_columns(fields: dict[str, Any], values: dict[str, Any]) -> None:
    values["subject_did"] = _text(fields.get("subject"))


def _profile_columns(fields: dict[str, Any], values: dict[str, Any]) -> None:
    values["display_name"] = _text(fields.get("displayName"))
    values["description"] = _text(fields.get("description"))
    values["avatar_cid"] = _blob_cid(fields.get("avatar"))
    values["banner_cid"] = _blob_cid(fields.get("banner"))
    values["pinned_post_uri"], values["pinned_post_cid"] = _strong_ref(fields.get("pinnedPost"))


_TYPED_COLUMNS = {
    "app.bsky.feed.post": _post_columns,
    "app.bsky.feed.like": _subject_ref_columns,
    "app.bsky.feed.repost": _subject_ref_columns,
    "app.bsky.graph.follow": _subject_did_columns,
    "app.bsky.graph.block": _subject_did_columns,
    "app.bsky.actor.profile": _profile_columns,
}
