"""Inspecting and retrying dead letters: the inputs that could not be decoded or stored.

``list_dead_letters`` and ``read_dead_letter`` read the ``dead_letters`` table; ``decoded_form``
decodes a row's raw bytes again to show what they contain. ``retry`` re-decodes raw frames (after
an upgrade fixed the cause, say) and writes those that now decode through ``indexer.store``, one
transaction per row that also deletes the row. A retry never writes a cursor, so no stream
position moves, backwards or forwards.

Not every row can be retried, and ``retry`` reports those as not retryable and leaves them in
place. An op's dead letter keeps only the record block, but writing a record needs the commit's
rev and the op's CID. A dropped oversized message kept no bytes. Retrying a ``signature_invalid``
frame would skip the verification that rejected it.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import libipld
import psycopg

from indexer import frames, jsonform
from indexer.events import DropReason, ErrorFrame, Info, Invalid, Skipped
from indexer.store import Batch, Store

log = logging.getLogger(__name__)

COLUMNS = "id, endpoint, seq, did, t, path, reason, error, raw, created_at"

# Reasons whose rows a re-decode cannot fix or must not bypass.
NOT_RETRYABLE_REASONS = {
    DropReason.OVERSIZED_FRAME: "the message was dropped unread, so no bytes were kept",
    DropReason.TOO_BIG: "a tooBig commit carries no ops; refetch the repo with indexer backfill",
    DropReason.SIGNATURE_INVALID: "retrying would index it without the signature check that rejected it",
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row of ``dead_letters``. ``path`` is set when the failure is confined to one op of a commit."""

    id: int
    endpoint: str
    seq: int | None
    did: str | None
    t: str | None
    path: str | None
    reason: str
    error: str
    raw: bytes | None
    created_at: datetime


class Outcome(enum.StrEnum):
    """Result of retrying one dead letter."""

    INDEXED = "indexed"  # written, and the row deleted
    STILL_FAILING = "still_failing"  # decoding or storing still fails; the row stays
    NOT_RETRYABLE = "not_retryable"  # the row cannot be retried (see the module docstring)


@dataclass(frozen=True, slots=True)
class RetryResult:
    """The outcome of one dead letter, with the reason it failed again or cannot be retried."""

    id: int
    outcome: Outcome
    detail: str | None = None


def connect(url: str) -> psycopg.Connection:
    """Open a psycopg connection to a SQLAlchemy-style or libpq URL."""
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1))


def count_by_reason(connection: psycopg.Connection) -> list[tuple[str, str, int]]:
    """Return ``(reason, endpoint, count)`` for every reason and endpoint with dead letters."""
    return connection.execute(
        "SELECT reason, endpoint, count(*) FROM dead_letters GROUP BY reason, endpoint ORDER BY reason, endpoint"
    ).fetchall()


def list_dead_letters(connection: psycopg.Connection, *, reason: str | None = None, limit: int = 50,
                      ids: Sequence[int] | None = None) -> list[DeadLetter]:
    """Return dead letters oldest first, optionally only one ``reason`` or the given ``ids``."""
    conditions, params = [], []
    if reason is not None:
        conditions.append("reason = %s")
        params.append(reason)
    if ids:
        conditions.append("id = ANY(%s)")
        params.append(list(ids))
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = connection.execute(f"SELECT {COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT %s",
                              (*params, limit)).fetchall()
    return [DeadLetter(*row) for row in rows]


def read_dead_letter(connection: psycopg.Connection, letter_id: int) -> DeadLetter | None:
    """Return the dead letter with ``letter_id``, or None when there is none (retried or never existed)."""
    found = list_dead_letters(connection, ids=[letter_id], limit=1)
    return found[0] if found else None


def decoder_for(endpoint: str) -> Callable[[bytes], Any] | None:
    """Return the frame decoder of the stream at ``endpoint``; None for a repo export's dead letters."""
    if endpoint.endswith("/com.atproto.label.subscribeLabels"):
        return frames.decode_label_frame
    if endpoint.endswith("/com.atproto.sync.subscribeRepos"):
        return frames.decode_repo_frame
    return None


def decoded_form(letter: DeadLetter) -> dict[str, Any]:
    """Decode the row's raw bytes again and return them as JSON-ready values.

    An op's row gives ``{"record": ...}`` (its record block), a frame's row ``{"kind": ...,
    "event": ...}``. When the bytes still do not decode, ``error`` contains the reason.
    """
    if not letter.raw:
        return {"error": "no raw bytes were kept"}
    if letter.path is not None:
        try:
            value = libipld.decode_dag_cbor(letter.raw)
        except ValueError as error:
            return {"error": f"the record block is not valid DAG-CBOR: {error}"}
        return {"record": jsonform.to_json(value, block=letter.raw).value}
    decode = decoder_for(letter.endpoint)
    if decode is None:
        return {"error": f"no frame decoder for endpoint {letter.endpoint!r}"}
    event = decode(letter.raw)
    return {"kind": type(event).__name__, "event": event_json(event)}


def event_json(value: Any) -> Any:
    """Convert a decoded event to JSON-ready values; records become atproto JSON, other bytes their length."""
    if dataclasses.is_dataclass(value):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        if "record" in fields and fields["record"] is not None:
            fields["record"] = jsonform.to_json(fields["record"], block=fields.get("record_bytes")).value
        return {name: event_json(item) for name, item in fields.items()}
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        return [event_json(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def retry(url: str, *, reason: str | None = None, ids: Sequence[int] | None = None,
          limit: int = 10_000) -> list[RetryResult]:
    """Retry up to ``limit`` dead letters (of one ``reason``, or the given ``ids``), oldest first.

    Each row that now decodes is written in its own transaction, which also deletes the row, and
    without a cursor. Events already superseded (an older rev) still count as indexed: the rev
    gate then changes nothing. Stream filters of ``indexer run`` (--collection, --did) do not apply.
    """
    with connect(url) as connection:
        letters = list_dead_letters(connection, reason=reason, ids=ids, limit=limit)
    stores: dict[str, Store] = {}
    results = []
    try:
        for letter in letters:
            results.append(_retry_one(url, letter, stores))
    finally:
        for store in stores.values():
            store.close()
    return results


def _retry_one(url: str, letter: DeadLetter, stores: dict[str, Store]) -> RetryResult:
    event_or_result = _redecode(letter)
    if isinstance(event_or_result, RetryResult):
        return event_or_result
    store = stores.get(letter.endpoint)
    if store is None:
        store = stores[letter.endpoint] = Store(url, letter.endpoint)
    batch = Batch(endpoint=letter.endpoint)
    batch.add(event_or_result)
    # A retried event is older than the stream's cursor: writing its seq would move the cursor back.
    batch.cursor = None
    batch.cursor_time = None
    batch.retried_dead_letters.append(letter.id)
    store.write(batch)
    with connect(url) as connection:
        if read_dead_letter(connection, letter.id) is not None:
            return RetryResult(letter.id, Outcome.STILL_FAILING, "the database rejected the event again")
    log.info("dead letter indexed", extra={"stream": letter.endpoint, "seq": letter.seq, "did": letter.did,
                                           "reason": letter.reason})
    return RetryResult(letter.id, Outcome.INDEXED)


def _redecode(letter: DeadLetter) -> Any:
    """Return the event the row's frame now decodes to, or the RetryResult with the reason there is none."""
    why = NOT_RETRYABLE_REASONS.get(letter.reason)
    if why is None and letter.path is not None:
        why = ("an op's dead letter keeps only the record block, not the commit's rev and the op's CID; "
               "refetch the repo with indexer backfill")
    if why is None and not letter.raw:
        why = "no raw bytes were kept"
    decode = decoder_for(letter.endpoint)
    if why is None and decode is None:
        why = f"no frame decoder for endpoint {letter.endpoint!r}"
    if why is not None:
        return RetryResult(letter.id, Outcome.NOT_RETRYABLE, why)

    event = decode(letter.raw)
    if isinstance(event, Invalid):
        if letter.reason == DropReason.STORE_FAILED:
            # For a commit the writer keeps its CAR blocks, not the frame.
            return RetryResult(letter.id, Outcome.NOT_RETRYABLE,
                               "the raw bytes are not a whole frame; refetch the repo with indexer backfill")
        return RetryResult(letter.id, Outcome.STILL_FAILING, f"{event.reason}: {event.error}")
    if isinstance(event, (Skipped, Info, ErrorFrame)):
        return RetryResult(letter.id, Outcome.NOT_RETRYABLE, f"the frame decodes to {type(event).__name__}, "
                                                             "which adds no rows")
    return event
