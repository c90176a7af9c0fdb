"""Mapping labels from ``subscribeLabels`` streams onto rows of the ``labels`` history table.

Labels are kept as received, negations included, because a labeler's stream drops negated labels
on replay: the history exists only where it was captured live. The ``current_labels`` view derives
the labels in force from this table.
"""

from __future__ import annotations

from typing import Any

from indexer.events import Label
from indexer.records import parse_datetime

# Label timestamps are set by the labeler, not by users, but a labeler's clock or code can be wrong;
# a far-future cts must still be stored, so the plausibility window is wide.
FAR_FUTURE_DAYS = 365 * 100


def subject_did(uri: str) -> str | None:
    """Return the DID a label's subject belongs to: the uri itself, or the repo of an AT-URI."""
    if uri.startswith("did:"):
        return uri
    if uri.startswith("at://"):
        authority = uri[len("at://"):].split("/", 1)[0]
        return authority if authority.startswith("did:") else None
    return None


def row_for_label(endpoint: str, seq: int, label: Label) -> dict[str, Any]:
    """Return the ``labels`` row for one received label (without the database defaults)."""
    from datetime import timedelta

    wide = timedelta(days=FAR_FUTURE_DAYS)
    return {
        "endpoint": endpoint,
        "seq": seq,
        "ver": label.ver,
        "src": _without_nul(label.src),
        "uri": _without_nul(label.uri),
        "subject_did": subject_did(label.uri),
        "cid": label.cid,
        "val": _without_nul(label.val),
        "neg": label.neg,
        "cts_raw": _without_nul(label.cts),
        "cts": parse_datetime(label.cts, max_ahead=wide),
        "exp_raw": _without_nul(label.exp) if label.exp is not None else None,
        "exp": parse_datetime(label.exp, max_ahead=wide) if label.exp is not None else None,
        "sig": label.sig,
    }


def _without_nul(text: str) -> str:
    return text.replace("\x00", "") if "\x00" in text else text
