"""Index one repo export (the CAR of ``com.atproto.sync.getRepo``) through the same writer as streams.

``index_repo`` reads the CAR from a file, walks the MST from the signed commit's ``data`` root, and
writes every record at the commit's ``rev`` with ``seq`` NULL, in batches, through ``Store``. The
writer's rev gate merges the export with live events: a record stored at a newer rev is kept, and
a record deleted at a rev not older than the export's stays deleted.

After the records, records of the repo that are indexed at an older rev but are absent from the
export are recorded as deleted at the export's rev (a ``deletions`` row with ``seq`` NULL, and the
typed row removed). That is what a resync needs, and it is equally true for any fetch.

Memory: the CAR is never held whole. One pass over the file builds an index from CID to file
position, and blocks are read back as the walk reaches them. The index costs roughly 150 bytes per
block (an estimate for CPython 3.11+ dicts of 36-byte keys).

Indexing a repo twice changes nothing the second time; an interrupted run can simply run again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import libipld

from indexer import car, schema
from indexer.errors import DatabaseUnavailable, DecodeError, IndexerError
from indexer.events import Commit, DropReason, OpError, RecordOp
from indexer.frames import split_path
from indexer.mst import Mst, MstError, cid_to_str
from indexer.store import CONNECTION_ERRORS, Batch, Store

log = logging.getLogger(__name__)

REPO_ENDPOINT = "repo"  # the dead_letters endpoint of inputs from repo exports
SUPPORTED_VERSION = 3
_LENGTH_BITS = 32


class RepoExportError(IndexerError):
    """The export cannot be indexed: unreadable CAR, wrong DID, unsupported version, broken MST."""


@dataclass(frozen=True, slots=True)
class RepoCommit:
    """The fields of a repo export's root commit that indexing uses."""

    did: str
    rev: str
    data: bytes  # MST root CID
    cid: str  # the commit's own CID, base32


@dataclass(slots=True)
class IndexedRepo:
    """Counts of one indexed export: its rev, records written (or gated), dead letters, deletions."""

    rev: str
    records: int = 0
    dead_letters: int = 0
    deleted: int = 0


class CarFileBlocks(Mapping[bytes, bytes]):
    """The blocks of a CAR v1 file, read from disk on demand; keys are binary CIDs.

    Construction reads the file once to index it, raising ``DecodeError`` for a malformed CAR.
    The file must stay open while the mapping is used.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        file.seek(0)
        stream = car.CarStream(file)
        self.roots = stream.roots
        self._positions: dict[bytes, int] = {}
        for cid, block in stream:
            # The file position is the end of the section just read; pack (offset, length) in one int.
            offset = file.tell() - len(block)
            self._positions[cid] = (offset << _LENGTH_BITS) | len(block)

    def __getitem__(self, cid: bytes) -> bytes:
        packed = self._positions[cid]
        self._file.seek(packed >> _LENGTH_BITS)
        return self._file.read(packed & ((1 << _LENGTH_BITS) - 1))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._positions)

    def __len__(self) -> int:
        return len(self._positions)


def read_commit(blocks: CarFileBlocks, did: str) -> RepoCommit:
    """Decode and check the root commit of an export of ``did``; raise RepoExportError if unusable."""
    if len(blocks.roots) != 1:
        raise RepoExportError(f"repo export of {did} has {len(blocks.roots)} roots; expected exactly one commit")
    root = blocks.roots[0]
    block = blocks.get(root)
    if block is None:
        raise RepoExportError(f"repo export of {did} lacks its root commit block {cid_to_str(root)}")
    try:
        car.verify_block(root, block)
        commit = libipld.decode_dag_cbor(block)
    except (DecodeError, ValueError, RecursionError) as error:
        raise RepoExportError(f"root commit of the repo export of {did} is unreadable: {error}") from None
    if not isinstance(commit, dict):
        raise RepoExportError(f"root commit of the repo export of {did} is not a map")
    if commit.get("did") != did:
        raise RepoExportError(f"repo export requested for {did} is the repo of {commit.get('did')!r}")
    if commit.get("version") != SUPPORTED_VERSION:
        raise RepoExportError(f"repo export of {did} has version {commit.get('version')!r}; only version 3 "
                              "repos (which carry a rev) are supported")
    rev, data = commit.get("rev"), commit.get("data")
    if not isinstance(rev, str) or not isinstance(data, bytes):
        raise RepoExportError(f"root commit of the repo export of {did} lacks a string rev or a data CID")
    return RepoCommit(did=did, rev=rev, data=data, cid=cid_to_str(root))


def index_repo(store: Store, file: BinaryIO, did: str, *, batch_size: int = 2000) -> IndexedRepo:
    """Write every record of the export in ``file`` and the deletions it implies; return the counts.

    Raises RepoExportError when the export as a whole cannot be read. A single unreadable record
    becomes a dead letter (endpoint ``repo``, seq NULL) and the others are written.
    Idempotent: indexing the same export again changes nothing.
    """
    try:
        blocks = CarFileBlocks(file)
    except DecodeError as error:
        raise RepoExportError(f"repo export of {did} is not a readable CAR: {error}") from None
    commit = read_commit(blocks, did)
    result = IndexedRepo(rev=commit.rev)
    unreadable: set[tuple[str, str]] = set()
    batch = Batch(endpoint=REPO_ENDPOINT)
    try:
        for op in _record_ops(blocks, commit):
            batch.add(_single_op_commit(commit, op))
            if op.error is None:
                result.records += 1
            else:
                result.dead_letters += 1
                unreadable.add((op.collection, op.rkey))
            if len(batch) >= batch_size:
                store.write(batch)
                batch = Batch(endpoint=REPO_ENDPOINT)
    except MstError as error:
        raise RepoExportError(f"the MST of the repo export of {did} is broken: {error}") from None
    store.write(batch)
    result.deleted = _record_absent_records(store, commit, unreadable, batch_size)
    return result


def _record_ops(blocks: CarFileBlocks, commit: RepoCommit) -> Iterator[RecordOp]:
    """Yield a create op per MST leaf, in key order; an unreadable record gets ``op.error``."""
    for key, cid_bytes in Mst.load(commit.data, blocks).items():
        path = key.decode("utf-8", errors="replace")
        collection, rkey, path_error = split_path(path)
        cid = cid_to_str(cid_bytes)
        op = RecordOp(action="create", collection=collection, rkey=rkey, cid=cid)
        if path_error is not None:
            op.error = OpError(DropReason.INVALID_PATH, f"MST key {path!r}: {path_error}")
            yield op
            continue
        block = blocks.get(cid_bytes)
        if block is None:
            op.error = OpError(DropReason.MISSING_BLOCK, f"record block {cid} of {path} is missing from the export")
            yield op
            continue
        op.record_bytes = block
        _decode_record(op, cid_bytes, block)
        yield op


def _decode_record(op: RecordOp, cid_bytes: bytes, block: bytes) -> None:
    try:
        car.verify_block(cid_bytes, block)
        record = libipld.decode_dag_cbor(block)
    except DecodeError as error:
        op.error = OpError(error.reason, f"record {op.cid} of {op.path}: {error}")
        return
    except (ValueError, RecursionError) as error:
        op.error = OpError(DropReason.INVALID_RECORD, f"record {op.cid} of {op.path} is not valid DAG-CBOR: {error}")
        return
    if not isinstance(record, dict):
        op.error = OpError(DropReason.INVALID_RECORD, f"record {op.cid} of {op.path} is not a map")
        return
    op.record = record


def _single_op_commit(commit: RepoCommit, op: RecordOp) -> Commit:
    # One event per record, so that a batch the database rejects is split down to the one record.
    # seq None: rows from an export carry no stream position, and the batch moves no cursor.
    return Commit(seq=None, did=commit.did, rev=commit.rev, since=None, commit_cid=commit.cid, time=None,
                  ops=[op], blocks=op.record_bytes or b"", data=cid_to_str(commit.data))


def _record_absent_records(store: Store, commit: RepoCommit, unreadable: set[tuple[str, str]], batch_size: int) -> int:
    """Record as deleted at the export's rev every record stored at an older rev and absent from it.

    After the export is written, every record it contains is stored at its rev or newer, so the
    rows still older than it are exactly the records deleted before it. Unreadable records of the
    export are in it, so they are left alone.
    """
    absent = [key for key in _older_records(store, commit.did, commit.rev) if key not in unreadable]
    for start in range(0, len(absent), batch_size):
        batch = Batch(endpoint=REPO_ENDPOINT)
        for collection, rkey in absent[start:start + batch_size]:
            op = RecordOp(action="delete", collection=collection, rkey=rkey, cid=None)
            batch.add(_single_op_commit(commit, op))
        store.write(batch)
    if absent:
        log.info("records absent from the repo export recorded as deleted",
                 extra={"did": commit.did, "rev": commit.rev, "count": len(absent)})
    return len(absent)


def _older_records(store: Store, did: str, rev: str) -> list[tuple[str, str]]:
    selects = [f"SELECT '{collection}', rkey FROM {table.name} WHERE did = %(did)s AND rev < %(rev)s"
               for collection, table in schema.RECORD_TABLES.items()]
    selects.append("SELECT collection, rkey FROM records WHERE did = %(did)s AND rev < %(rev)s")
    store.connect()
    try:
        with store.connection.cursor() as cursor:
            cursor.execute(" UNION ALL ".join(selects), {"did": did, "rev": rev})
            found = [(collection, rkey) for collection, rkey in cursor.fetchall()]
        store.connection.commit()
    except CONNECTION_ERRORS as error:
        store.close()
        raise DatabaseUnavailable(f"reading the stored records of {did} failed: {error}") from error
    return found
