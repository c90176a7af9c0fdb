"""Checking again the events that were stored unchecked because their signer's key was unknown.

A DID document may not resolve in time: the PLC directory is down or slow, or the key wait ran
out. The event's rows are then stored with ``verified`` NULL and ``verify_reason`` ``no_key``, and
what its checks need goes to ``verification_backlog`` in the same transaction. ``indexer run``
calls ``recheck_once`` every few minutes: it checks the oldest entries again, sets the outcome on
the rows that still carry ``no_key``, and deletes every entry that got an outcome. An entry that
still finds no key stays, and is tried again after ``retry_after`` seconds.

``--verify enforce`` applies when an event is indexed: an event that fails a later check keeps its
rows, with ``verified`` false and the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, replace
from typing import Any

import libipld
import psycopg

from indexer import schema
from indexer.crypto import Verification, VerifyFailure
from indexer.events import Label
from indexer.labels import row_for_label
from indexer.verifier import EventVerifier, VerifySettings, lacks_key, signers, singles

log = logging.getLogger(__name__)

# Seconds a re-check waits for DID documents. No stream waits for a re-check, so it may wait longer
# than a batch does.
RECHECK_KEY_WAIT = 30.0
# Entries per round. A full round that settled some entries is followed by the next one at once,
# so a backlog left by a long outage drains without waiting an interval per round.
ROUND_SIZE = 1000
# An entry that still finds no key waits twice as long before each next check. After this many
# checks it is dropped and its rows keep no_key, so that DIDs that never resolve (deleted, invalid,
# without a signing key) do not fill every round. At the default interval of 300 s, the last check
# comes about 7 days after the first (2047 intervals).
MAX_ATTEMPTS = 12

# The tables whose rows a #commit writes, each with verified and verify_reason.
_COMMIT_TABLES = [*schema.RECORD_TABLES.values(), schema.records, schema.deletions]


def encode_work(work: tuple) -> bytes:
    """Return the DAG-CBOR form of a verification work tuple (see ``verifier._job_for``)."""
    if work[0] == "labels":
        return libipld.encode_dag_cbor([dataclasses.asdict(label) for label in work[1]])
    return libipld.encode_dag_cbor(list(work[1:]))


def decode_work(kind: str, data: bytes) -> tuple:
    """Return the work tuple that ``encode_work`` turned into ``data``."""
    fields = libipld.decode_dag_cbor(data)
    if kind == "labels":
        return ("labels", [Label(**label) for label in fields])
    return (kind, *fields)


def backlog_row(endpoint: str, seq: int, work: tuple) -> dict[str, Any]:
    """Return the ``verification_backlog`` row of an event stored unchecked."""
    # Without U+0000, as the labels row stores a label's src: PostgreSQL text rejects it.
    did = signers(work)[0][0].replace("\x00", "")
    return {"endpoint": endpoint, "seq": seq, "kind": work[0], "did": did, "work": encode_work(work)}


@dataclass
class RecheckSummary:
    """The counts of one ``recheck_once`` round."""

    checked: int = 0
    verified: int = 0  # events whose outcome is now true (every label, for #labels)
    failed: int = 0  # events with at least one check now false
    still_unchecked: int = 0
    given_up: int = 0  # entries dropped after MAX_ATTEMPTS checks without a key
    deferred: int = 0  # entries left for the next round because their update was a deadlock victim


async def recheck_once(database_url: str, verifier: EventVerifier, *, limit: int | None = None,
                       retry_after: float = 600.0) -> RecheckSummary:
    """Check up to ``limit`` (default ``ROUND_SIZE``) backlog entries again, oldest first, and store what they find.

    An entry is due ``retry_after`` seconds after its first check, and the wait doubles after each
    further check. Safe to run while the streams index, because it only changes rows that still
    carry ``no_key``.
    """
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    entries = await asyncio.to_thread(_due_entries, url, ROUND_SIZE if limit is None else limit, retry_after)
    summary = RecheckSummary(checked=len(entries))
    if not entries:
        return summary

    works = [decode_work(kind, work) for _endpoint, _seq, kind, work in entries]
    for key, work in enumerate(works):
        verifier.submit_work(key, work)
    outcomes = await verifier.outcomes(list(range(len(entries))))
    verifier.take_unchecked()

    results = []
    for key, (endpoint, seq, kind, _work) in enumerate(entries):
        outcome = outcomes[key]
        if lacks_key(outcome):
            summary.still_unchecked += 1
        elif any(single.verified is False for single in singles(outcome)):
            summary.failed += 1
        else:
            summary.verified += 1
        results.append((endpoint, seq, kind, works[key], outcome))
    await asyncio.to_thread(_store_outcomes, url, results, summary)
    return summary


async def recheck_periodically(database_url: str, settings: VerifySettings, interval: float) -> None:
    """Run ``recheck_once`` now and then every ``interval`` seconds, until cancelled.

    A failing round is logged and retried at the next interval; it never stops the indexers. The
    checks run in one worker process (or a thread with ``workers`` 0), beside the streams' own.
    """
    settings = replace(settings, key_wait=max(settings.key_wait, RECHECK_KEY_WAIT), workers=min(settings.workers, 1))
    verifier = EventVerifier(settings, database_url)
    try:
        while True:
            try:
                summary = await recheck_once(database_url, verifier, retry_after=interval)
                if summary.checked:
                    log.info(f"unchecked events checked again: {summary.verified} verified, {summary.failed} "
                             f"failed, {summary.still_unchecked} still without a key ({summary.given_up} of them "
                             f"given up after {MAX_ATTEMPTS} checks), {summary.deferred} left for the next "
                             "round after a deadlock", extra={"count": summary.checked})
                if summary.checked == ROUND_SIZE and summary.still_unchecked < summary.checked:
                    continue  # more are due, and keys are being found: go on at once
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a database or network failure of one round: the next round retries
                log.warning("re-checking unchecked events failed; retrying at the next interval",
                            extra={"error": f"{type(error).__name__}: {error}", "delay": interval})
                # A new verifier: the failure may be its worker pool, which stays broken once a worker died.
                await verifier.aclose()
                verifier = EventVerifier(settings, database_url)
            await asyncio.sleep(interval)
    finally:
        await verifier.aclose()


def _due_entries(url: str, limit: int, retry_after: float) -> list[tuple[str, int, str, bytes]]:
    """Return the entries due for a check: never checked first, then the least checked, oldest first."""
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT endpoint, seq, kind, work FROM verification_backlog "
            "WHERE checked_at IS NULL "
            "OR checked_at < now() - make_interval(secs => %s * power(2, attempts - 1)) "
            "ORDER BY attempts, created_at, endpoint, seq LIMIT %s",
            (retry_after, limit)).fetchall()


def _store_outcomes(url: str, results: list[tuple[str, int, str, tuple, Any]], summary: RecheckSummary) -> None:
    """Set the outcomes on the rows and settle the backlog entries, one transaction per entry.

    Short transactions lock the rows of one event at a time, so a round cannot hold locks that
    the stream writers wait for. An entry whose transaction loses a deadlock is left for the next
    round.
    """
    with psycopg.connect(url) as connection:
        for endpoint, seq, kind, work, outcome in results:
            try:
                with connection.transaction(), connection.cursor() as cursor:
                    if _settle(cursor, endpoint, seq, kind, work, outcome):
                        summary.given_up += 1
            except psycopg.errors.DeadlockDetected:
                summary.deferred += 1


def _settle(cursor: psycopg.Cursor, endpoint: str, seq: int, kind: str, work: tuple, outcome: Any) -> bool:
    """Store the outcomes found and update or delete the entry; return True when it was given up."""
    _set_outcome(cursor, endpoint, seq, kind, work, outcome)
    if not lacks_key(outcome):
        cursor.execute("DELETE FROM verification_backlog WHERE endpoint = %s AND seq = %s", (endpoint, seq))
        return False
    attempts = cursor.execute(
        "UPDATE verification_backlog SET attempts = attempts + 1, checked_at = now() "
        "WHERE endpoint = %s AND seq = %s RETURNING attempts", (endpoint, seq)).fetchone()
    if attempts is not None and attempts[0] >= MAX_ATTEMPTS:
        cursor.execute("DELETE FROM verification_backlog WHERE endpoint = %s AND seq = %s", (endpoint, seq))
        return True
    return False


def _set_outcome(cursor: psycopg.Cursor, endpoint: str, seq: int, kind: str, work: tuple, outcome: Any) -> None:
    """Write ``outcome`` on the event's rows that are still unchecked for want of a key.

    An outcome that is still NO_KEY changes nothing. Of a #labels frame, the labels that were
    checked get their outcome.
    """
    if kind != "labels" and lacks_key(outcome):
        return
    if kind == "commit":
        verified, reason = _columns(outcome)
        for table in _COMMIT_TABLES:
            cursor.execute(
                f"UPDATE {table.name} SET verified = %s, verify_reason = %s "
                "WHERE did = %s AND seq = %s AND verify_reason = 'no_key'",
                (verified, reason, work[3], seq))
    elif kind == "sync":
        verified, reason = _columns(outcome)
        cursor.execute(
            "UPDATE sync_events SET verified = %s, verify_reason = %s "
            "WHERE endpoint = %s AND seq = %s AND verify_reason = 'no_key'",
            (verified, reason, endpoint, seq))
    else:
        for label, single in zip(work[1], outcome):
            if single.reason is VerifyFailure.NO_KEY:
                continue
            verified, reason = _columns(single)
            # The unique key of labels, as stored (without U+0000): a label re-sent on replay is one row.
            row = row_for_label(endpoint, seq, label)
            cursor.execute(
                "UPDATE labels SET verified = %s, verify_reason = %s "
                "WHERE src = %s AND uri = %s AND cid IS NOT DISTINCT FROM %s AND val = %s AND neg = %s "
                "AND cts_raw = %s AND verify_reason = 'no_key'",
                (verified, reason, row["src"], row["uri"], row["cid"], row["val"], row["neg"], row["cts_raw"]))


def _columns(outcome: Verification) -> tuple[bool | None, str | None]:
    return outcome.verified, str(outcome.reason) if outcome.reason is not None else None
