"""Build CAR files and stream frames in tests, including deliberately broken ones.

Everything here is synthetic: records and CIDs are made up by the test that calls it, and commit
blocks carry no valid signature. Real recorded frames live in the shared fixtures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import libipld

DAG_CBOR_CODEC = 0x71
SHA2_256 = 0x12
DEFAULT_TIME = "2026-01-02T03:04:05.678Z"


def varint(value: int) -> bytes:
    """Encode an unsigned LEB128 varint, as CAR section lengths are."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def cid_for(block: bytes, codec: int = DAG_CBOR_CODEC) -> bytes:
    """Return the binary CIDv1 (sha2-256) of ``block``."""
    return bytes([1, codec, SHA2_256, 32]) + hashlib.sha256(block).digest()


def build_car(roots: Iterable[bytes], blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Write a CAR v1 with the given root CIDs and ``(cid, block)`` sections, in order."""
    header = libipld.encode_dag_cbor({"version": 1, "roots": list(roots)})
    out = bytearray(varint(len(header)) + header)
    for cid, block in blocks:
        out += varint(len(cid) + len(block)) + cid + block
    return bytes(out)


def build_frame(header: Mapping[str, Any], body: Mapping[str, Any] | bytes | None) -> bytes:
    """Concatenate the DAG-CBOR header and body; ``body`` given as bytes is used verbatim, None omits it."""
    if body is None:
        encoded_body = b""
    elif isinstance(body, bytes):
        encoded_body = body
    else:
        encoded_body = libipld.encode_dag_cbor(dict(body))
    return libipld.encode_dag_cbor(dict(header)) + encoded_body


def record_block(record: Mapping[str, Any] | bytes) -> bytes:
    """Encode a record as DAG-CBOR; bytes are taken as an already encoded (possibly broken) block."""
    return record if isinstance(record, bytes) else libipld.encode_dag_cbor(dict(record))


def commit_body(
    seq: int,
    did: str,
    rev: str,
    ops: Iterable[tuple[str, str, Mapping[str, Any] | bytes | None]] = (),
    *,
    since: str | None = None,
    time: str = DEFAULT_TIME,
    omit_blocks_for: Iterable[str] = (),
    too_big: bool = False,
    include_blocks: bool = True,
) -> dict[str, Any]:
    """Build a ``#commit`` body whose CAR holds a commit block and each op's record block.

    ``ops`` are ``(action, path, record)`` with record None for deletes; a record given as bytes is
    used as its block verbatim. Paths in ``omit_blocks_for`` keep their op CID but lose their block.
    With ``include_blocks`` False, ``blocks`` is empty.
    """
    omitted = set(omit_blocks_for)
    commit_block = libipld.encode_dag_cbor(
        {"did": did, "version": 3, "data": cid_for(b"mst root"), "rev": rev, "prev": None, "sig": b"\x00" * 64}
    )
    commit_cid = cid_for(commit_block)
    sections = [(commit_cid, commit_block)]
    body_ops = []
    for action, path, record in ops:
        op: dict[str, Any] = {"action": action, "path": path, "cid": None}
        if record is not None:
            block = record_block(record)
            op["cid"] = cid_for(block)
            if path not in omitted:
                sections.append((op["cid"], block))
        body_ops.append(op)
    return {
        "seq": seq,
        "repo": did,
        "rev": rev,
        "since": since,
        "commit": commit_cid,
        "blocks": build_car([commit_cid], sections) if include_blocks else b"",
        "ops": body_ops,
        "prevData": cid_for(b"previous mst root"),
        "time": time,
        "tooBig": too_big,
        "rebase": False,
        "blobs": [],
    }


def commit_frame(
    seq: int,
    did: str,
    rev: str,
    ops: Iterable[tuple[str, str, Mapping[str, Any] | bytes | None]] = (),
    **options: Any,
) -> bytes:
    """Build a whole ``#commit`` frame; ``options`` are those of ``commit_body``."""
    return build_frame({"t": "#commit", "op": 1}, commit_body(seq, did, rev, ops, **options))


def message_frame(t: str, body: Mapping[str, Any] | bytes | None) -> bytes:
    """Build an ``op = 1`` frame of type ``t`` (``"#identity"``, ``"#labels"``, ...)."""
    return build_frame({"t": t, "op": 1}, body)


def error_frame(error: str, message: str | None = None) -> bytes:
    """Build an ``op = -1`` error frame, as a server sends before closing."""
    body = {"error": error} if message is None else {"error": error, "message": message}
    return build_frame({"op": -1}, body)


def label(
    src: str = "did:plc:labeler",
    uri: str = "at://did:plc:someone/app.bsky.feed.post/3kabc",
    val: str = "spam",
    cts: str = DEFAULT_TIME,
    **fields: Any,
) -> dict[str, Any]:
    """Build one label map (unsigned unless ``sig`` is passed)."""
    return {"ver": 1, "src": src, "uri": uri, "val": val, "cts": cts, **fields}
