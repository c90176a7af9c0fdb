"""Decode stream frames (one websocket message each) into the typed events of ``indexer.events``.

A frame is two DAG-CBOR objects back to back: a header ``{op, t}`` and a body. The header is read
first, so the body of a frame that is skipped (unknown op, filtered type) is never decoded.

The ``decode_*_frame`` functions are pure and do not raise for bad input (the tests feed them
truncated, corrupted and random bytes): a frame that cannot be decoded becomes ``Invalid`` (with
``seq`` and ``did`` when they could still be read), a frame of a type we do not handle becomes
``Skipped``. Only an exception raised by the caller's ``wanted`` predicate propagates. A commit op whose record is missing or malformed gets an
``OpError`` while the other ops of the commit are still decoded.

In a ``#labels`` frame, one malformed label makes the whole frame ``Invalid`` (the error names the
label's index). Labels are signed moderation actions; dropping one quietly would lose it, while the
dead-lettered raw frame keeps every label of it for a replay once the cause is understood.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import libipld

from indexer import car
from indexer.errors import DecodeError
from indexer.events import (
    Account,
    Commit,
    DropReason,
    ErrorFrame,
    Header,
    Identity,
    Info,
    Invalid,
    Label,
    LabelEvent,
    Labels,
    OpError,
    RecordOp,
    RepoEvent,
    Skipped,
    SkipReason,
    Sync,
)

REPO_TYPES = frozenset({"#commit", "#sync", "#identity", "#account", "#info"})
LEGACY_REPO_TYPES = frozenset({"#handle", "#migrate", "#tombstone"})
LABEL_TYPES = frozenset({"#labels", "#info"})
OP_MESSAGE = 1
OP_ERROR = -1
ACTIONS = frozenset({"create", "update", "delete"})
SEQ_MAX = 2**63 - 1

# Syntax of the two halves of an op path, from the atproto NSID and Record Key specifications.
_NSID = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)
_NSID_MAX_LENGTH = 317
_RECORD_KEY = re.compile(r"[A-Za-z0-9._:~-]{1,512}")

# Encoded headers of the usual message types. A CBOR item determines its own end, so a frame that
# starts with one of these byte strings has exactly that header, and the generic walk is skipped.
_COMMON_HEADERS = [
    (libipld.encode_dag_cbor({"t": t, "op": OP_MESSAGE}), Header(op=OP_MESSAGE, t=t))
    for t in ("#commit", "#identity", "#account", "#sync", "#labels", "#info")
]


def decode_header(frame: bytes) -> Header:
    """Decode the header of a frame. Raises ``DecodeError(INVALID_FRAME)`` when it is malformed."""
    return _read_header(frame)[0]


def message_position(frame: bytes) -> tuple[str | None, int | None, str | None]:
    """Return the ``t``, ``seq`` and ``repo`` (did) of a frame without decoding it into an event.

    Used for a frame that is dead-lettered whole (one above the message size limit), so that the
    cursor can move past it. A part that cannot be read is None: decoding errors are caught here.
    """
    try:
        header, body_offset = _read_header(frame)
    except DecodeError:
        return None, None, None
    body = _readable_body(frame, body_offset)
    if body is None:
        return header.t, None, None
    did = body.get("repo", body.get("did"))
    return header.t, _valid_seq(body.get("seq")), did if type(did) is str else None


def _message_start(frame: bytes) -> tuple[str, int] | Invalid | ErrorFrame | Skipped:
    """Return a message frame's type and body offset, or the event of a frame that is not a message.

    That event is ``Invalid`` for an unreadable header, the decoded error frame for ``op`` -1, and
    ``Skipped(UNKNOWN_OP)`` for any other ``op``.
    """
    try:
        header, body_offset = _read_header(frame)
    except DecodeError as error:
        return Invalid(DropReason(error.reason), str(error), raw=frame)
    if header.op == OP_ERROR:
        return _decode_error_frame(frame, header, body_offset)
    if header.op != OP_MESSAGE or header.t is None:
        # _read_header rejects a message frame without 't', so the second test only informs mypyc.
        return Skipped(SkipReason.UNKNOWN_OP, header.t)
    return header.t, body_offset


def decode_repo_frame(
    frame: bytes,
    *,
    wanted: Callable[[str], bool] | None = None,
    verify_cids: bool = False,
) -> RepoEvent:
    """Decode one ``com.atproto.sync.subscribeRepos`` frame.

    ``wanted`` is called with the message type (``"#commit"``, ``"#identity"``, ...) of a known
    type. When it returns False the body is not decoded and the result is ``Skipped(FILTERED)``
    without a seq. With ``verify_cids``, each op's record block is hashed and a block that does not
    match its CID gives that op ``OpError(CID_MISMATCH)``.
    """
    start = _message_start(frame)
    if not isinstance(start, tuple):
        return start
    t, body_offset = start
    if t in LEGACY_REPO_TYPES:
        return Skipped(SkipReason.LEGACY_TYPE, t, _seq_if_readable(frame, body_offset))
    if t not in REPO_TYPES:
        return Skipped(SkipReason.UNKNOWN_TYPE, t, _seq_if_readable(frame, body_offset))
    if wanted is not None and not wanted(t):
        return Skipped(SkipReason.FILTERED, t)

    body: dict[str, Any] | None = None
    try:
        body = _read_body(frame, body_offset, t)
        if t == "#commit":
            return _commit(body, verify_cids=verify_cids)
        if t == "#sync":
            return _sync(body)
        if t == "#identity":
            return _identity(body)
        if t == "#account":
            return _account(body)
        return _info(body)
    except DecodeError as error:
        return _invalid(frame, t, body, error)


def decode_label_frame(frame: bytes) -> LabelEvent:
    """Decode one ``com.atproto.label.subscribeLabels`` frame.

    A ``#labels`` body without ``labels`` gives ``Labels(seq, [])``, which still advances the cursor.
    """
    start = _message_start(frame)
    if not isinstance(start, tuple):
        return start
    t, body_offset = start
    if t not in LABEL_TYPES:
        return Skipped(SkipReason.UNKNOWN_TYPE, t, _seq_if_readable(frame, body_offset))

    body: dict[str, Any] | None = None
    try:
        body = _read_body(frame, body_offset, t)
        if t == "#labels":
            return _labels(body)
        return _info(body)
    except DecodeError as error:
        return _invalid(frame, t, body, error)


# --- framing -------------------------------------------------------------------------------------


def _read_header(frame: bytes) -> tuple[Header, int]:
    """Return the header and the offset where the body starts."""
    if not frame:
        raise DecodeError(DropReason.INVALID_FRAME, "frame is empty")
    for encoded, header in _COMMON_HEADERS:
        if frame.startswith(encoded):
            return header, len(encoded)
    end = _item_end(frame, 0)
    try:
        decoded = libipld.decode_dag_cbor(frame[:end])
    except (ValueError, RecursionError) as error:
        raise DecodeError(DropReason.INVALID_FRAME, f"frame header is not valid DAG-CBOR: {error}") from None
    if not isinstance(decoded, dict):
        raise DecodeError(DropReason.INVALID_FRAME, f"frame header must be a map, got {_preview(decoded)}")
    op = decoded.get("op")
    t = decoded.get("t")
    if type(op) is not int:
        raise DecodeError(DropReason.INVALID_FRAME, f"frame header field 'op' must be an integer, got {_preview(op)}")
    if t is not None and type(t) is not str:
        raise DecodeError(DropReason.INVALID_FRAME, f"frame header field 't' must be a string, got {_preview(t)}")
    if op == OP_MESSAGE and t is None:
        raise DecodeError(DropReason.INVALID_FRAME, "frame header has op 1 but no message type 't'")
    return Header(op=op, t=t), end


def _item_end(data: bytes, offset: int) -> int:
    """Return the offset just after the CBOR item at ``offset``, without decoding it.

    Only the structure is walked; libipld validates the bytes afterwards. Raises
    ``DecodeError(INVALID_FRAME)`` when the data ends inside the item or uses indefinite lengths,
    which DAG-CBOR forbids.
    """
    pending = 1
    length = len(data)
    while pending:
        if offset >= length:
            # A string's declared length can carry offset past the end, so state both sizes.
            raise DecodeError(DropReason.INVALID_FRAME,
                              f"frame of {length} bytes ends inside a CBOR item: at least {offset + 1} bytes needed")
        initial = data[offset]
        offset += 1
        pending -= 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            argument = info
        elif info < 28:
            size = 1 << (info - 24)
            argument = int.from_bytes(data[offset : offset + size], "big")
            offset += size
        else:
            raise DecodeError(
                DropReason.INVALID_FRAME,
                f"unsupported CBOR item 0x{initial:02x} at byte {offset - 1} (indefinite length or reserved)",
            )
        if major in (2, 3):
            offset += argument
        elif major == 4:
            pending += argument
        elif major == 5:
            pending += 2 * argument
        elif major == 6:
            pending += 1
    if offset > length:
        raise DecodeError(DropReason.INVALID_FRAME,
                          f"frame of {length} bytes ends inside a CBOR item: {offset} bytes needed")
    return offset


def _read_body(frame: bytes, body_offset: int, t: str | None) -> dict[str, Any]:
    if body_offset >= len(frame):
        raise DecodeError(DropReason.INVALID_FRAME, f"{t} frame has a header but no body")
    try:
        body = libipld.decode_dag_cbor(frame[body_offset:])
    except (ValueError, RecursionError) as error:
        raise DecodeError(DropReason.INVALID_FRAME, _body_error_text(frame, body_offset, t, error)) from None
    if not isinstance(body, dict):
        raise DecodeError(DropReason.INVALID_BODY, f"{t} body must be a map, got {_preview(body)}")
    return body


def _body_error_text(frame: bytes, body_offset: int, t: str | None, error: Exception) -> str:
    try:
        body_end = _item_end(frame, body_offset)
    except DecodeError:
        return f"{t} body is not valid DAG-CBOR: {error}"
    if body_end < len(frame):
        return f"{t} frame has {len(frame) - body_end} trailing bytes after the body"
    return f"{t} body is not valid DAG-CBOR: {error}"


def _readable_body(frame: bytes, body_offset: int) -> dict[str, Any] | None:
    """Return the body decoded on its own (ignoring trailing bytes), or None when it cannot be read."""
    try:
        body_end = _item_end(frame, body_offset)
        body = libipld.decode_dag_cbor(frame[body_offset:body_end])
    except (DecodeError, ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _seq_if_readable(frame: bytes, body_offset: int) -> int | None:
    body = _readable_body(frame, body_offset)
    seq = body.get("seq") if body is not None else None
    return _valid_seq(seq)


def _valid_seq(value: Any) -> int | None:
    """Return ``value`` when it is a usable seq, else None.

    Every table stores seq as a PostgreSQL bigint, and a cursor must fit there too, so a seq
    outside 0 to 2**63 - 1 makes its frame invalid rather than crash the write.
    """
    return value if type(value) is int and 0 <= value <= SEQ_MAX else None


def _invalid(frame: bytes, t: str | None, body: dict[str, Any] | None, error: DecodeError) -> Invalid:
    """Build the dead-letter event, reading seq and did from whatever part of the body decoded."""
    if body is None:
        body = _readable_body(frame, _item_end(frame, 0)) if frame else None
    seq = did = None
    if body is not None:
        seq = _valid_seq(body.get("seq"))
        did_value = body.get("repo", body.get("did"))
        did = did_value if type(did_value) is str else None
    return Invalid(DropReason(error.reason), str(error), raw=frame, t=t, seq=seq, did=did)


def _decode_error_frame(frame: bytes, header: Header, body_offset: int) -> ErrorFrame | Invalid:
    body: dict[str, Any] | None = None
    try:
        body = _read_body(frame, body_offset, "error")
        fields = _Fields(body, "error frame")
        return ErrorFrame(error=fields.text("error"), message=fields.optional_text("message"))
    except DecodeError as error:
        return _invalid(frame, header.t, body, error)


# --- message bodies ------------------------------------------------------------------------------


class _Fields:
    """Typed access to a decoded body; each accessor raises ``DecodeError(INVALID_BODY)`` naming the field."""

    def __init__(self, body: dict[str, Any], where: str) -> None:
        self.body = body
        self.where = where

    def _get(self, name: str, kind: type, kind_name: str, *, required: bool) -> Any:
        value = self.body.get(name)
        if value is None:
            if required:
                raise DecodeError(DropReason.INVALID_BODY, f"{self.where} is missing required field '{name}'")
            return None
        # type() rather than isinstance(): bool is a subclass of int and must not pass as one.
        if type(value) is not kind:
            raise DecodeError(
                DropReason.INVALID_BODY,
                f"{self.where} field '{name}' must be {kind_name}, got {type(value).__name__} {_preview(value)}",
            )
        return value

    def integer(self, name: str) -> int:
        return self._get(name, int, "an integer", required=True)

    def seq(self) -> int:
        value = self.integer("seq")
        if _valid_seq(value) is None:
            raise DecodeError(
                DropReason.INVALID_BODY, f"{self.where} field 'seq' must be from 0 to 2**63 - 1, got {_preview(value)}"
            )
        return value

    def optional_integer(self, name: str) -> int | None:
        return self._get(name, int, "an integer", required=False)

    def text(self, name: str) -> str:
        return self._get(name, str, "a string", required=True)

    def optional_text(self, name: str) -> str | None:
        return self._get(name, str, "a string", required=False)

    def boolean(self, name: str) -> bool:
        return self._get(name, bool, "a boolean", required=True)

    def optional_boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, bool, "a boolean", required=False)
        return default if value is None else value

    def optional_bytes(self, name: str) -> bytes | None:
        return self._get(name, bytes, "a byte string", required=False)

    def list(self, name: str, *, required: bool = True) -> list[Any]:
        value = self._get(name, list, "an array", required=required)
        return [] if value is None else value

    def cid(self, name: str) -> str:
        value = self.optional_cid(name)
        if value is None:
            raise DecodeError(DropReason.INVALID_BODY, f"{self.where} is missing required field '{name}'")
        return value

    def optional_cid(self, name: str) -> str | None:
        """Return the CID link in field ``name`` as a string; None when absent or null."""
        value = self._get(name, bytes, "a CID link", required=False)
        if value is None:
            return None
        if not car.is_cid(value):
            raise DecodeError(
                DropReason.INVALID_BODY,
                f"{self.where} field '{name}' must be a CID link, got bytes {_preview(value)}",
            )
        return libipld.encode_cid(value)


def _commit(body: dict[str, Any], *, verify_cids: bool) -> Commit:
    commit = _usual_commit(body, verify_cids=verify_cids)
    if commit is not None:
        return commit
    return _checked_commit(body, verify_cids=verify_cids)


# The first four bytes of the CIDs atproto uses: CIDv1, dag-cbor or raw codec, sha2-256, 32 bytes.
_USUAL_CID_PREFIXES = frozenset({b"\x01\x71\x12\x20", b"\x01\x55\x12\x20"})
# Collections whose NSID syntax was already checked; bounded, because the input is untrusted.
_VALID_COLLECTIONS: set[str] = set()
_VALID_COLLECTIONS_MAX = 10_000


def _usual_cid_text(value: Any) -> str | None:
    """Return the CID string of a 36-byte sha2-256 CIDv1, or None for anything else (even a valid CID)."""
    if type(value) is bytes and len(value) == 36 and value[:4] in _USUAL_CID_PREFIXES:
        return libipld.encode_cid(value)
    return None


def _usual_commit(body: dict[str, Any], *, verify_cids: bool) -> Commit | None:
    """Decode a commit of the usual shape with no per-field error handling, or return None.

    This makes every check of ``_checked_commit``, without building messages. None means that
    something is unusual (a missing or mistyped field, a tooBig commit, an invalid path, a missing
    block, a CAR that does not split). ``_checked_commit`` then decodes it, and raises a
    ``DecodeError`` or sets ``op.error`` with a message that names the problem.
    """
    get = body.get
    seq, did, rev, since, time = _valid_seq(get("seq")), get("repo"), get("rev"), get("since"), get("time")
    blocks, too_big, rebase, raw_ops = get("blocks"), get("tooBig"), get("rebase"), get("ops")
    if (seq is None or type(did) is not str or type(rev) is not str or type(time) is not str
            or (since is not None and type(since) is not str) or type(blocks) is not bytes or not blocks
            or type(raw_ops) is not list or (too_big is not None and too_big is not False)
            or (rebase is not None and type(rebase) is not bool)):
        return None
    commit_cid_bytes = get("commit")
    commit_cid = _usual_cid_text(commit_cid_bytes)
    prev_data = get("prevData")
    if commit_cid is None or (prev_data is not None and (prev_data := _usual_cid_text(prev_data)) is None):
        return None
    try:
        car_blocks = car.read_car(blocks).blocks
    except DecodeError:
        return None
    ops = []
    for raw_op in raw_ops:
        op = _usual_op(raw_op, car_blocks, verify_cids=verify_cids)
        if op is None:
            return None
        ops.append(op)
    return Commit(seq=seq, did=did, rev=rev, since=since, commit_cid=commit_cid, time=time, ops=ops,
                  prev_data=prev_data, too_big=False, rebase=bool(rebase), blocks=blocks,
                  data=_commit_data(car_blocks, commit_cid_bytes))


def _commit_data(car_blocks: dict[bytes, bytes], commit_cid: Any) -> str | None:
    """Return the MST root CID named by the commit block, or None when it is absent or unreadable.

    The block's hash is not checked here. A forged block can therefore cause a needless refetch, or
    hide a missed commit; with verification on, the commit's signature check reports it.
    """
    block = car_blocks.get(commit_cid) if type(commit_cid) is bytes else None
    if block is None:
        return None
    try:
        commit = libipld.decode_dag_cbor(block)
    except (ValueError, RecursionError):
        return None
    return _usual_cid_text(commit.get("data")) if type(commit) is dict else None


def _usual_op(raw_op: Any, car_blocks: dict[bytes, bytes], *, verify_cids: bool) -> RecordOp | None:
    """Build one op of the usual shape, or return None to leave it to ``_record_op``."""
    if type(raw_op) is not dict:
        return None
    get = raw_op.get
    action, path, cid_bytes, prev = get("action"), get("path"), get("cid"), get("prev")
    # type() first: an unhashable action (a map, say) must not reach the set lookup.
    if type(path) is not str or type(action) is not str or action not in ACTIONS:
        return None
    if prev is not None and (prev := _usual_cid_text(prev)) is None:
        return None
    collection, slash, rkey = path.partition("/")
    if collection not in _VALID_COLLECTIONS:
        if split_path(path)[2] is not None:
            return None
        if len(_VALID_COLLECTIONS) < _VALID_COLLECTIONS_MAX:
            _VALID_COLLECTIONS.add(collection)
    if not slash or rkey in (".", "..") or not _RECORD_KEY.fullmatch(rkey):
        return None
    cid = None
    if cid_bytes is not None and (cid := _usual_cid_text(cid_bytes)) is None:
        return None
    if action == "delete":
        return RecordOp(action=action, collection=collection, rkey=rkey, cid=None, prev=prev)
    if cid_bytes is None or (block := car_blocks.get(cid_bytes)) is None:
        return None
    op = RecordOp(action=action, collection=collection, rkey=rkey, cid=cid, prev=prev, record_bytes=block)
    _decode_record(op, cid_bytes, block, verify_cids=verify_cids)
    return op


def _checked_commit(body: dict[str, Any], *, verify_cids: bool) -> Commit:
    """Decode a commit field by field, raising ``DecodeError`` that names the first bad field."""
    fields = _Fields(body, "#commit")
    too_big = fields.optional_boolean("tooBig", False)
    blocks = fields.optional_bytes("blocks")
    if blocks is None and not too_big:
        raise DecodeError(DropReason.INVALID_BODY, "#commit is missing required field 'blocks'")
    commit = Commit(
        seq=fields.seq(),
        did=fields.text("repo"),
        rev=fields.text("rev"),
        since=fields.optional_text("since"),
        commit_cid=fields.cid("commit"),
        time=fields.text("time"),
        ops=[],
        prev_data=fields.optional_cid("prevData"),
        too_big=too_big,
        rebase=fields.optional_boolean("rebase", False),
        blocks=blocks or b"",
    )
    raw_ops = fields.list("ops")
    # An empty `blocks` is read as "no blocks" rather than a broken CAR: tooBig commits may come
    # that way, and delete ops need no blocks.
    car_blocks = car.read_car(commit.blocks).blocks if commit.blocks else {}
    commit.ops = [
        _record_op(index, raw_op, car_blocks, too_big=too_big, verify_cids=verify_cids)
        for index, raw_op in enumerate(raw_ops)
    ]
    commit.data = _commit_data(car_blocks, body.get("commit"))
    return commit


def _record_op(
    index: int, raw_op: Any, car_blocks: dict[bytes, bytes], *, too_big: bool, verify_cids: bool
) -> RecordOp:
    """Build one op; a bad path or record becomes ``op.error``, a bad op structure raises."""
    where = f"#commit ops[{index}]"
    if not isinstance(raw_op, dict):
        raise DecodeError(DropReason.INVALID_BODY, f"{where} must be a map, got {_preview(raw_op)}")
    fields = _Fields(raw_op, where)
    action = fields.text("action")
    if action not in ACTIONS:
        raise DecodeError(
            DropReason.INVALID_BODY, f"{where} field 'action' must be create, update or delete, got {_preview(action)}"
        )
    path = fields.text("path")
    cid = fields.optional_cid("cid")
    if action != "delete" and cid is None:
        raise DecodeError(DropReason.INVALID_BODY, f"{where} is a {action} without a 'cid'")
    collection, rkey, path_error = split_path(path)
    op = RecordOp(
        action=action,
        collection=collection,
        rkey=rkey,
        cid=None if action == "delete" else cid,
        prev=fields.optional_cid("prev"),
    )
    if path_error is not None:
        op.error = OpError(DropReason.INVALID_PATH, f"{where} path {_preview(path)}: {path_error}")
    if action == "delete":
        return op

    cid_bytes = raw_op["cid"]
    block = car_blocks.get(cid_bytes)
    if block is None:
        reason = DropReason.TOO_BIG if too_big else DropReason.MISSING_BLOCK
        detail = "the tooBig commit did not include it" if too_big else "it is not among the commit's blocks"
        op.error = op.error or OpError(reason, f"record block {cid} of {path} is missing: {detail}")
        return op
    op.record_bytes = block
    _decode_record(op, cid_bytes, block, verify_cids=verify_cids)
    return op


def _decode_record(op: RecordOp, cid_bytes: bytes, block: bytes, *, verify_cids: bool) -> None:
    if verify_cids:
        try:
            car.verify_block(cid_bytes, block)
        except DecodeError as error:
            op.error = op.error or OpError(DropReason.CID_MISMATCH, str(error))
            return
    try:
        record = libipld.decode_dag_cbor(block)
    except (ValueError, RecursionError) as error:
        op.error = op.error or OpError(
            DropReason.INVALID_RECORD, f"record {op.cid} of {op.path} is not valid DAG-CBOR: {error}"
        )
        return
    if not isinstance(record, dict):
        op.error = op.error or OpError(
            DropReason.INVALID_RECORD, f"record {op.cid} of {op.path} must be a map, got {_preview(record)}"
        )
        return
    op.record = record


def _sync(body: dict[str, Any]) -> Sync:
    fields = _Fields(body, "#sync")
    blocks = fields.optional_bytes("blocks")
    if blocks is None:
        raise DecodeError(DropReason.INVALID_BODY, "#sync is missing required field 'blocks'")
    return Sync(
        seq=fields.seq(), did=fields.text("did"), rev=fields.text("rev"), time=fields.text("time"), blocks=blocks
    )


def _identity(body: dict[str, Any]) -> Identity:
    fields = _Fields(body, "#identity")
    return Identity(
        seq=fields.seq(), did=fields.text("did"), time=fields.text("time"), handle=fields.optional_text("handle")
    )


def _account(body: dict[str, Any]) -> Account:
    fields = _Fields(body, "#account")
    return Account(
        seq=fields.seq(),
        did=fields.text("did"),
        time=fields.text("time"),
        active=fields.boolean("active"),
        status=fields.optional_text("status"),
    )


def _info(body: dict[str, Any]) -> Info:
    fields = _Fields(body, "#info")
    return Info(name=fields.text("name"), message=fields.optional_text("message"))


def _labels(body: dict[str, Any]) -> Labels:
    fields = _Fields(body, "#labels")
    seq = fields.seq()
    labels = []
    for index, raw_label in enumerate(fields.list("labels", required=False)):
        where = f"#labels labels[{index}]"
        if not isinstance(raw_label, dict):
            raise DecodeError(DropReason.INVALID_BODY, f"{where} must be a map, got {_preview(raw_label)}")
        label_fields = _Fields(raw_label, where)
        labels.append(
            Label(
                src=label_fields.text("src"),
                uri=label_fields.text("uri"),
                val=label_fields.text("val"),
                cts=label_fields.text("cts"),
                ver=label_fields.optional_integer("ver"),
                cid=label_fields.optional_text("cid"),
                neg=label_fields.optional_boolean("neg", False),
                exp=label_fields.optional_text("exp"),
                sig=label_fields.optional_bytes("sig"),
            )
        )
    return Labels(seq=seq, labels=labels)


def split_path(path: str) -> tuple[str, str, str | None]:
    """Split an op path into ``(collection, rkey, error)``; ``error`` is None for a valid path.

    For an invalid path the halves are still returned as well as they can be split (at the first
    "/"; the rkey is "" when there is none), so the failure can be stored with the op.
    """
    collection, slash, rkey = path.partition("/")
    if not slash:
        return collection, rkey, 'it has no "/" between collection and rkey'
    if len(collection) > _NSID_MAX_LENGTH or not _NSID.fullmatch(collection):
        return collection, rkey, f"collection {_preview(collection)} is not a valid NSID"
    if rkey in (".", "..") or not _RECORD_KEY.fullmatch(rkey):
        return collection, rkey, f"rkey {_preview(rkey)} is not a valid record key"
    return collection, rkey, None


def _preview(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
