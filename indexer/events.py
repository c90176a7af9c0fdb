"""Typed events decoded from stream frames, and the closed set of reasons an input is dropped.

These types are the contract between decoding (``frames``), mapping (``records``) and writing
(``store``). They carry no database state. Times are kept as the raw strings upstream sent; parsing
happens where rows are built, so a bad value is kept beside a nullable parsed one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class DropReason(enum.StrEnum):
    """Why an input was dead-lettered. Shared by log lines, metrics labels and the dead_letters table."""

    INVALID_FRAME = "invalid_frame"  # header or body is not valid DAG-CBOR, or trailing bytes
    INVALID_BODY = "invalid_body"  # a required field is missing or has the wrong type
    OVERSIZED_FRAME = "oversized_frame"  # above the maximum message size
    INVALID_CAR = "invalid_car"  # the commit's blocks are not a readable CAR v1
    MISSING_BLOCK = "missing_block"  # an op's CID is not among the commit's blocks
    INVALID_RECORD = "invalid_record"  # a record block is not valid DAG-CBOR (bad UTF-8, undefined, ...)
    CID_MISMATCH = "cid_mismatch"  # a block's bytes do not hash to its CID
    INVALID_PATH = "invalid_path"  # an op path that is not "collection/rkey"
    TOO_BIG = "too_big"  # deprecated tooBig commit: its ops need a repo refetch
    STORE_FAILED = "store_failed"  # a row derived from this input could not be written
    SIGNATURE_INVALID = "signature_invalid"  # verification failed while --verify enforce is on


class SkipReason(enum.StrEnum):
    """Why a frame was counted and skipped without a dead-letter row (nothing is wrong with it)."""

    UNKNOWN_TYPE = "unknown_type"  # a message type (t) we do not know
    LEGACY_TYPE = "legacy_type"  # #handle, #migrate, #tombstone: no longer sent by current relays
    UNKNOWN_OP = "unknown_op"  # a header op other than 1 and -1
    FILTERED = "filtered"  # excluded by --collection or --did


@dataclass(frozen=True, slots=True)
class Header:
    """The first DAG-CBOR object of a frame: ``op`` 1 is a message of type ``t``, -1 an error."""

    op: int
    t: str | None


@dataclass(frozen=True, slots=True)
class OpError:
    """A decode failure attached to part of an event (one op), rather than raised for the whole frame."""

    reason: DropReason
    message: str


@dataclass(slots=True)
class RecordOp:
    """One repo operation of a commit.

    ``record`` is the decoded record (libipld values: CID links and byte strings are ``bytes``) for
    create and update, None for delete. ``error`` says why the op cannot be indexed; ``record`` is
    None when the block is missing or undecodable, but is kept for an op with an invalid path.
    The other ops of the same commit are unaffected.
    """

    action: str  # "create", "update" or "delete"
    collection: str
    rkey: str
    cid: str | None  # record CID as a base32 string; None for delete
    prev: str | None = None  # previous record CID (Sync 1.1), None when absent
    record: dict[str, Any] | None = None
    record_bytes: bytes | None = None  # the raw DAG-CBOR block, kept for dead letters and verification
    error: OpError | None = None

    @property
    def path(self) -> str:
        return f"{self.collection}/{self.rkey}"


@dataclass(slots=True)
class Commit:
    """``#commit``: ops applied to one repo at revision ``rev``."""

    seq: int
    did: str
    rev: str
    since: str | None
    commit_cid: str
    time: str
    ops: list[RecordOp]
    prev_data: str | None = None  # CID of the previous MST root (Sync 1.1)
    too_big: bool = False
    rebase: bool = False
    blocks: bytes = b""  # the CAR bytes as received, for signature and proof checks
    # CID of the MST root after this commit (the commit block's ``data``); None when the commit
    # block is absent or unreadable. The next commit's prev_data must equal it.
    data: str | None = None


@dataclass(slots=True)
class Sync:
    """``#sync``: the repo's state was reset to ``rev``; the repo must be refetched."""

    seq: int
    did: str
    rev: str
    time: str
    blocks: bytes = b""


@dataclass(slots=True)
class Identity:
    """``#identity``: the DID document or handle may have changed. ``handle`` None means not sent."""

    seq: int
    did: str
    time: str
    handle: str | None = None


@dataclass(slots=True)
class Account:
    """``#account``: hosting status changed. ``status`` None means not sent; unknown values are data."""

    seq: int
    did: str
    time: str
    active: bool
    status: str | None = None


@dataclass(slots=True)
class Info:
    """``#info``: an informational message such as ``OutdatedCursor``. Has no seq of its own."""

    name: str
    message: str | None = None


@dataclass(slots=True)
class ErrorFrame:
    """An ``op = -1`` frame; the server closes the connection after it."""

    error: str
    message: str | None = None


@dataclass(slots=True)
class Skipped:
    """A frame counted and skipped (unknown or legacy type). ``seq`` is None when it had none."""

    reason: SkipReason
    t: str | None
    seq: int | None = None


@dataclass(slots=True)
class Invalid:
    """A frame that could not be decoded at all; becomes a dead-letter row.

    ``seq`` and ``did`` are filled when they could be read despite the failure, else None.
    """

    reason: DropReason
    error: str
    raw: bytes
    t: str | None = None
    seq: int | None = None
    did: str | None = None


@dataclass(slots=True)
class Label:
    """One ``com.atproto.label.defs#label``. ``neg`` absent upstream is False; ``exp`` None means none."""

    src: str
    uri: str
    val: str
    cts: str
    ver: int | None = None
    cid: str | None = None
    neg: bool = False
    exp: str | None = None
    sig: bytes | None = None


@dataclass(slots=True)
class Labels:
    """``#labels`` from a labeler stream. An empty list still advances the cursor."""

    seq: int
    labels: list[Label] = field(default_factory=list)


RepoEvent = Commit | Sync | Identity | Account | Info | ErrorFrame | Skipped | Invalid
LabelEvent = Labels | Info | ErrorFrame | Skipped | Invalid
