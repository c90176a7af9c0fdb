"""Verification of repo commits and labels: signatures, and Sync 1.1 commit proofs.

Pure functions over bytes and decoded values; they never fetch keys or DID documents. Each returns
a ``Verification`` (see ``indexer.crypto``) instead of raising, so callers can record the reason
next to the event and decide per policy whether to drop it.

- A commit block is ``{did, version, data, rev, prev, sig}``. Its signature covers the DAG-CBOR
  encoding of the same map without ``sig``, made with the repo's ``#atproto`` key.
- A label is signed the same way, over the label without ``sig``, by the labeler's
  ``#atproto_label`` key.
- Sync 1.1 commit proof: a ``#commit`` carries the MST nodes that its ops changed, plus the
  neighbours that inverting them needs, and ``prevData``, the MST root before the commit. Applying
  the inverse of every op to the partial tree under the new root (``data``) must give back
  ``prevData``. This proves that the ops are complete and that they alone turned the previous
  tree into the new one, without holding the previous tree.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import libipld

from indexer.crypto import VERIFIED, PublicKey, Verification, VerifyFailure, resolve_key
from indexer.events import Label, RecordOp
from indexer.mst import (
    InvalidNodeError,
    KeyStateError,
    MissingBlockError,
    Mst,
    MstError,
    cid_to_str,
)

COMMIT_FIELDS = ("did", "version", "data", "rev", "sig")


def verify_commit(
    commit_block: bytes,
    key: PublicKey | str | None,
    expected_did: str,
    expected_rev: str | None,
) -> Verification:
    """Check a commit block's signature and that it belongs to ``expected_did`` at ``expected_rev``.

    ``key`` is the repo's ``#atproto`` key (a PublicKey, ``did:key:`` DID or Multikey string).
    ``expected_rev`` None skips the rev comparison. The did and rev are compared before the
    signature, so a commit replayed under another repo fails with DID_MISMATCH even when the key
    is unknown.
    """
    commit = _decode_commit(commit_block)
    if isinstance(commit, Verification):
        return commit
    if commit["did"] != expected_did:
        return Verification.failed(
            VerifyFailure.DID_MISMATCH, f"commit is for {commit['did']!r}, but the event is for {expected_did!r}"
        )
    if expected_rev is not None and commit["rev"] != expected_rev:
        return Verification.failed(
            VerifyFailure.REV_MISMATCH, f"commit has rev {commit['rev']!r}, but the event says {expected_rev!r}"
        )
    public_key = resolve_key(key)
    if isinstance(public_key, Verification):
        return public_key
    signature = commit.pop("sig")
    return public_key.verify(libipld.encode_dag_cbor(commit), signature)


def _decode_commit(commit_block: bytes) -> dict[str, Any] | Verification:
    """Decode a commit block and check its field types; returns a failed Verification if invalid."""
    try:
        commit = libipld.decode_dag_cbor(commit_block)
    except (ValueError, RecursionError) as error:
        return Verification.failed(VerifyFailure.INVALID_COMMIT, f"commit block is not valid DAG-CBOR: {error}")
    if not isinstance(commit, dict):
        return Verification.failed(VerifyFailure.INVALID_COMMIT, f"commit block is a {type(commit).__name__}, not a map")
    missing = [name for name in COMMIT_FIELDS if name not in commit]
    if missing:
        return Verification.failed(VerifyFailure.INVALID_COMMIT, f"commit block lacks field(s) {', '.join(missing)}")
    wrong = [name for name, kind in (("did", str), ("rev", str), ("data", bytes)) if not isinstance(commit[name], kind)]
    if wrong:
        return Verification.failed(VerifyFailure.INVALID_COMMIT, f"commit field(s) {', '.join(wrong)} have the wrong type")
    if not isinstance(commit["sig"], bytes):
        return Verification.failed(VerifyFailure.BAD_SIGNATURE_ENCODING, "commit 'sig' is not a byte string")
    return commit


def verify_label(label: Mapping[str, Any] | Label, key: PublicKey | str | None) -> Verification:
    """Check a label's signature with the labeler's ``#atproto_label`` key.

    ``label`` is either the decoded DAG-CBOR map as received (exact: every field the signer
    encoded, ``sig`` as bytes), or a ``Label``. A ``Label`` does not record whether ``neg: false``
    or ``ver`` were present upstream, so both encodings of ``neg`` are tried before reporting
    SIGNATURE_MISMATCH.
    """
    signature: object  # any value from a decoded map, checked below
    if isinstance(label, Label):
        fields = _label_fields(label)
        signature = label.sig
    else:
        fields = {name: value for name, value in label.items() if name != "sig"}
        signature = label.get("sig")
    if signature is None:
        return Verification.failed(VerifyFailure.NO_SIGNATURE, "label has no 'sig' field")
    if not isinstance(signature, bytes):
        return Verification.failed(VerifyFailure.BAD_SIGNATURE_ENCODING, "label 'sig' is not a byte string")
    public_key = resolve_key(key)
    if isinstance(public_key, Verification):
        return public_key
    result = public_key.verify(libipld.encode_dag_cbor(fields), signature)
    if result.reason is VerifyFailure.SIGNATURE_MISMATCH and isinstance(label, Label) and not label.neg:
        retry = public_key.verify(libipld.encode_dag_cbor({**fields, "neg": False}), signature)
        if retry.verified:
            return retry
    return result


def _label_fields(label: Label) -> dict[str, Any]:
    """Return the signed fields of a ``Label``, leaving out those that were absent upstream."""
    fields: dict[str, Any] = {"src": label.src, "uri": label.uri, "val": label.val, "cts": label.cts}
    optional = {"ver": label.ver, "cid": label.cid, "exp": label.exp}
    fields.update({name: value for name, value in optional.items() if value is not None})
    if label.neg:
        fields["neg"] = True
    return fields


@dataclass(frozen=True, slots=True)
class ProofOp:
    """One op in the form inversion needs: key bytes and binary CIDs (None where absent)."""

    action: str
    key: bytes
    cid: bytes | None
    prev: bytes | None


def verify_commit_proof(
    blocks: Mapping[bytes, bytes],
    data: object,
    ops: Iterable[RecordOp | Mapping[str, Any]],
    prev_data: object,
) -> Verification:
    """Check that inverting ``ops`` on the MST rooted at ``data`` gives ``prev_data`` (Sync 1.1).

    ``blocks`` maps binary CIDs to raw block bytes (the commit's CAR). ``data`` is the commit's
    new MST root. ``ops`` are ``RecordOp`` values or op maps as decoded from the frame
    (``action``, ``path``, ``cid``, ``prev``). CIDs may be binary or base32 text. Ops are inverted
    in the order given: a create is removed, an update restored to ``prev``, a delete re-inserted
    with ``prev``. ``prev_data`` None (a pre-Sync-1.1 commit) gives an unchecked NO_PREV_DATA
    result. ``blocks`` is not modified.
    """
    if prev_data is None:
        return Verification.unchecked(VerifyFailure.NO_PREV_DATA, "commit has no prevData, so its ops cannot be proven")
    try:
        root = _cid_bytes(data, "data")
        previous_root = _cid_bytes(prev_data, "prevData")
        proof_ops = [_proof_op(op) for op in ops]
    except ValueError as error:
        return Verification.failed(VerifyFailure.INVALID_OP, str(error))
    duplicate = _first_duplicate_key(proof_ops)
    if duplicate is not None:
        return Verification.failed(VerifyFailure.INVALID_OP, f"two ops touch the same path {duplicate!r}")
    try:
        tree = Mst.load(root, blocks)
        for op in proof_ops:
            _invert(tree, op)
        inverted_root = tree.root_cid()
    except MissingBlockError as error:
        return Verification.failed(VerifyFailure.MISSING_MST_BLOCK, str(error))
    except InvalidNodeError as error:
        return Verification.failed(VerifyFailure.INVALID_MST, str(error))
    except KeyStateError as error:
        return Verification.failed(VerifyFailure.OP_MISMATCH, str(error))
    except MstError as error:
        return Verification.failed(VerifyFailure.INVALID_MST, str(error))
    if inverted_root != previous_root:
        return Verification.failed(
            VerifyFailure.PROOF_MISMATCH,
            f"inverting the ops gives MST root {cid_to_str(inverted_root)}, but prevData is {cid_to_str(previous_root)}",
        )
    return VERIFIED


def _invert(tree: Mst, op: ProofOp) -> None:
    """Undo one op on ``tree``; raises KeyStateError when the tree contradicts the op."""
    # Each edit returns or checks the key's current CID, so no separate lookup walks the path.
    if op.action == "delete":
        assert op.prev is not None  # checked by _proof_op
        try:
            tree.insert(op.key, op.prev)
        except KeyStateError:
            raise KeyStateError(f"delete of {op.key!r}, but the new MST still contains it") from None
        return
    assert op.cid is not None  # checked by _proof_op
    try:
        if op.action == "create":
            current = tree.delete(op.key)
        else:
            assert op.prev is not None  # checked by _proof_op
            current = tree.update(op.key, op.prev)
    except KeyStateError:
        current = None
    if current != op.cid:
        found = cid_to_str(current) if current is not None else "nothing"
        raise KeyStateError(f"{op.action} of {op.key!r} to {cid_to_str(op.cid)}, but the new MST contains {found}")


def _proof_op(op: RecordOp | Mapping[str, Any], require_prev: bool = True) -> ProofOp:
    """Convert one op into a ProofOp; raises ValueError naming what is missing or invalid.

    ``require_prev`` False accepts an update or delete without ``prev`` (ops before Sync 1.1),
    which is enough for checks that need only the op's cid.
    """
    action: Any
    path: Any
    cid: Any
    prev: Any
    if isinstance(op, RecordOp):
        action, path, cid, prev = op.action, op.path, op.cid, op.prev
    else:
        action, path, cid, prev = op.get("action"), op.get("path"), op.get("cid"), op.get("prev")
    if not isinstance(path, str) or path.count("/") != 1 or path.startswith("/") or path.endswith("/"):
        raise ValueError(f"op path {path!r} is not 'collection/rkey'")
    if action not in ("create", "update", "delete"):
        raise ValueError(f"op on {path!r} has unknown action {action!r}")
    needs_cid = action != "delete"
    needs_prev = action != "create" and (require_prev or prev is not None)
    if needs_cid and cid is None:
        raise ValueError(f"{action} op on {path!r} has no cid")
    if needs_prev and prev is None:
        raise ValueError(f"{action} op on {path!r} has no prev, which Sync 1.1 requires to invert it")
    return ProofOp(
        action,
        path.encode(),
        _cid_bytes(cid, f"cid of {path}") if needs_cid else None,
        _cid_bytes(prev, f"prev of {path}") if needs_prev else None,
    )


def _first_duplicate_key(ops: list[ProofOp]) -> str | None:
    seen: set[bytes] = set()
    for op in ops:
        if op.key in seen:
            return op.key.decode(errors="replace")
        seen.add(op.key)
    return None


def _cid_bytes(value: object, name: str) -> bytes:
    """Return a CID as binary bytes from binary or base32 (``b...``) text; raises ValueError for anything else.

    ``value`` is typed ``object``: op maps come straight from decoded frames, and compiled code
    would raise TypeError on a wrongly typed value before this function could name it.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.startswith("b"):
        # libipld decodes in Rust, far faster than the pure-Python base64.b32decode. It reads only
        # lowercase base32, so other text takes the path below, which also words the error.
        try:
            base, cid = libipld.decode_multibase(value)
        except ValueError:
            base = None
        if base == "b":
            return cid
        text = value[1:].upper()
        try:
            return base64.b32decode(text + "=" * (-len(text) % 8))
        except ValueError as error:
            raise ValueError(f"{name} {value!r} is not a base32 CID: {error}") from error
    raise ValueError(f"{name} {value!r} is not a CID (binary, or base32 text starting with 'b')")


def verify_record_blocks(blocks: Mapping[bytes, bytes], ops: Iterable[RecordOp | Mapping[str, Any]]) -> Verification:
    """Check that every create and update op's record block is present and hashes to the op's cid.

    The signature and the MST cover record CIDs, not record bytes, so this check is what ties the
    delivered records to the signed commit. Only SHA-256 CIDs can be checked; others fail. Ops
    without ``prev`` (before Sync 1.1) are accepted.
    """
    try:
        proof_ops = [_proof_op(op, require_prev=False) for op in ops]
    except ValueError as error:
        return Verification.failed(VerifyFailure.INVALID_OP, str(error))
    for op in proof_ops:
        if op.cid is None:
            continue
        block = blocks.get(op.cid)
        path = op.key.decode(errors="replace")
        if block is None:
            return Verification.failed(
                VerifyFailure.MISSING_RECORD_BLOCK, f"record block {cid_to_str(op.cid)} of {op.action} {path!r} is missing"
            )
        if block_cid(op.cid, block) != op.cid:
            return Verification.failed(
                VerifyFailure.RECORD_MISMATCH, f"record block of {op.action} {path!r} does not hash to {cid_to_str(op.cid)}"
            )
    return VERIFIED


def block_cid(cid: bytes, block: bytes) -> bytes | None:
    """Return the CID that ``block`` hashes to under the CID version and codec of ``cid``.

    Returns None when ``cid`` is not a CIDv1 with a SHA-256 multihash, the only kind atproto uses.
    """
    if len(cid) != 36 or cid[0] != 0x01 or cid[2:4] != b"\x12\x20":
        return None
    return cid[:4] + hashlib.sha256(block).digest()


@dataclass(frozen=True, slots=True)
class CommitVerification:
    """The checks of one ``#commit``: signature, Sync 1.1 proof, and record blocks."""

    signature: Verification
    proof: Verification
    records: Verification


def verify_commit_blocks(
    blocks: Mapping[bytes, bytes],
    commit_cid: object,
    key: PublicKey | str | None,
    expected_did: str,
    expected_rev: str | None,
    ops: Iterable[RecordOp | Mapping[str, Any]],
    prev_data: object,
) -> CommitVerification:
    """Verify a ``#commit`` from its CAR blocks: find the commit block, check signature and proof.

    The commit block must be in ``blocks`` and hash to ``commit_cid``; otherwise all three results
    fail with MISSING_COMMIT_BLOCK or INVALID_COMMIT. The proof and the records are checked even
    when the signature fails, so each result stands on its own.
    """
    try:
        commit_key = _cid_bytes(commit_cid, "commit")
    except ValueError as error:
        failure = Verification.failed(VerifyFailure.INVALID_COMMIT, str(error))
        return CommitVerification(failure, failure, failure)
    block = blocks.get(commit_key)
    if block is None:
        failure = Verification.failed(
            VerifyFailure.MISSING_COMMIT_BLOCK, f"commit block {cid_to_str(commit_key)} is not among the blocks"
        )
        return CommitVerification(failure, failure, failure)
    if block_cid(commit_key, block) != commit_key:
        failure = Verification.failed(
            VerifyFailure.INVALID_COMMIT, f"commit block does not hash to its CID {cid_to_str(commit_key)}"
        )
        return CommitVerification(failure, failure, failure)
    ops = list(ops)
    records = verify_record_blocks(blocks, ops)
    signature = verify_commit(block, key, expected_did, expected_rev)
    commit = _decode_commit(block)
    if isinstance(commit, Verification):
        return CommitVerification(signature, commit, records)
    return CommitVerification(signature, verify_commit_proof(blocks, commit["data"], ops, prev_data), records)
