"""Mapping labels from ``subscribeLabels`` streams onto rows of the ``labels`` history table.

Labels are kept as received, negations included, because a labeler's stream drops negated labels
on replay: the history exists only where it was captured live. The ``current_labels`` view derives
the labels in force from this table.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import libipld

from indexer.events import Label, Labels
from indexer.records import parse_datetime

# Label timestamps are set by the labeler, not by users, but a labeler's clock or code can be wrong;
# a far-future cts must still be stored, so the plausibility window is wide.
FAR_FUTURE_DAYS = 365 * 100
_FAR_FUTURE = timedelta(days=FAR_FUTURE_DAYS)


def subject_did(uri: str) -> str | None:
    """Return the DID a label's subject belongs to: the uri itself, or the repo of an AT-URI."""
    if uri.startswith("did:"):
        return uri
    if uri.startswith("at://"):
        authority = uri[len("at://"):].split("/", 1)[0]
        return authority if authority.startswith("did:") else None
    return None


def row_for_label(endpoint: str, seq: int, label: Label) -> dict[str, Any]:
    """Return the ``labels`` row for one received label (without the database defaults).

    U+0000, which PostgreSQL text rejects, is removed from every text field.
    """
    return {
        "endpoint": endpoint,
        "seq": seq,
        "ver": label.ver,
        "src": _without_nul(label.src),
        "uri": _without_nul(label.uri),
        "subject_did": subject_did(label.uri),
        "cid": _without_nul(label.cid) if label.cid is not None else None,
        "val": _without_nul(label.val),
        "neg": label.neg,
        "cts_raw": _without_nul(label.cts),
        "cts": parse_datetime(label.cts, max_ahead=_FAR_FUTURE),
        "exp_raw": _without_nul(label.exp) if label.exp is not None else None,
        "exp": parse_datetime(label.exp, max_ahead=_FAR_FUTURE) if label.exp is not None else None,
        "sig": label.sig,
    }


def encode_labels_frame(event: Labels) -> bytes:
    """Encode ``event`` again as a ``#labels`` frame, for the dead letter of a frame the database rejected.

    The decoded event keeps no raw bytes, so the frame is rebuilt from its fields. It decodes to the
    same labels, but it need not match the received bytes: a ``neg: false`` that was sent is left
    out, as an absent ``neg`` is.
    """
    labels = []
    for label in event.labels:
        fields: dict[str, Any] = {"src": label.src, "uri": label.uri, "val": label.val, "cts": label.cts}
        optional = {"ver": label.ver, "cid": label.cid, "exp": label.exp, "sig": label.sig}
        fields.update({name: value for name, value in optional.items() if value is not None})
        if label.neg:
            fields["neg"] = True
        labels.append(fields)
    header = libipld.encode_dag_cbor({"t": "#labels", "op": 1})
    return header + libipld.encode_dag_cbor({"seq": event.seq, "labels": labels})


def _without_nul(text: str) -> str:
    return text.replace("\x00", "") if "\x00" in text else text
