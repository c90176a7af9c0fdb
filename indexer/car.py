"""Read CAR v1 archives (the ``blocks`` of a commit, a repo export) block by block.

A CAR v1 is a varint-prefixed DAG-CBOR header ``{version: 1, roots: [CID, ...]}`` followed by
sections, each a varint length then the CID bytes then the block bytes. This module splits the
sections and leaves the blocks undecoded, so a caller decodes only the blocks it needs and one
malformed record does not hide the others. ``libipld.decode_car`` is not used here for that reason:
it decodes every block (MST nodes too) and raises for the whole CAR on the first bad one.

Every malformed input raises ``DecodeError`` with ``DropReason.INVALID_CAR``, or
``DropReason.CID_MISMATCH`` when hash verification was requested and a block does not match.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import libipld

from indexer.errors import DecodeError
from indexer.events import DropReason

# With RUST_BACKTRACE=1 in the environment, libipld's decode_car captures a Rust backtrace on every
# call (its read loop ends on an end-of-input error), which makes it more than twice as slow. Rust reads
# this variable at the first capture, so it has to be set before any CAR is decoded.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

# A corrupt length prefix in a streamed CAR must not make us allocate gigabytes. Blocks in atproto
# repos are records (at most 1,000,000 bytes) and MST nodes, so this bound is far above real data.
MAX_SECTION_BYTES = 32 * 1024 * 1024

# The multiformats unsigned varint is at most 9 bytes (63 bits).
_MAX_VARINT_BYTES = 9

_SHA2_256 = 0x12
_IDENTITY_HASH = 0x00
_CIDV0_PREFIX = b"\x12\x20"
_CIDV0_LENGTH = 34


@dataclass(frozen=True, slots=True)
class Car:
    """A CAR v1 split into its roots and its blocks, keyed by raw CID bytes; blocks are undecoded."""

    roots: list[bytes]
    blocks: dict[bytes, bytes]


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """Read an unsigned LEB128 varint at ``offset``; return ``(value, offset after it)``.

    Raises ``DecodeError(INVALID_CAR)`` when the data ends inside the varint or it is longer than
    9 bytes.
    """
    first_two = data[offset : offset + 2]
    if first_two and first_two[0] < 0x80:
        return first_two[0], offset + 1
    if len(first_two) == 2 and first_two[1] < 0x80:
        return (first_two[0] & 0x7F) | (first_two[1] << 7), offset + 2
    value = 0
    shift = 0
    for index in range(offset, min(offset + _MAX_VARINT_BYTES, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    if len(data) - offset >= _MAX_VARINT_BYTES:
        raise DecodeError(DropReason.INVALID_CAR, f"varint at byte {offset} is longer than 9 bytes")
    raise DecodeError(DropReason.INVALID_CAR, f"data ends inside the varint at byte {offset}")


def read_cid(data: bytes, offset: int) -> int:
    """Return the offset just after the binary CID that starts at ``offset``.

    Accepts CIDv0 (a bare sha2-256 multihash, ``0x12 0x20`` + 32 bytes) and CIDv1 (varint version 1,
    varint codec, varint hash code, varint digest length, digest). Raises ``DecodeError(INVALID_CAR)``
    for any other version or when the data ends inside the CID.
    """
    head = data[offset : offset + 4]
    if len(head) == 4 and head[0] == 1 and head[1] < 0x80 and head[2] < 0x80 and head[3] < 0x80:
        # Fast path for the usual CIDv1 whose codec, hash code and digest length are one byte each.
        end = offset + 4 + head[3]
    elif head[:2] == _CIDV0_PREFIX:
        end = offset + _CIDV0_LENGTH
    else:
        version, position = read_varint(data, offset)
        if version != 1:
            raise DecodeError(DropReason.INVALID_CAR, f"unsupported CID version {version} at byte {offset}")
        _codec, position = read_varint(data, position)
        _hash_code, position = read_varint(data, position)
        digest_length, position = read_varint(data, position)
        end = position + digest_length
    if end > len(data):
        raise DecodeError(DropReason.INVALID_CAR, f"data ends inside the CID at byte {offset}")
    return end


def is_cid(value: bytes) -> bool:
    """Return True when ``value`` is exactly one binary CID, with no bytes before or after it."""
    try:
        return len(value) > 0 and read_cid(value, 0) == len(value)
    except DecodeError:
        return False


def verify_block(cid: bytes, block: bytes) -> None:
    """Check that ``block`` hashes to the digest in ``cid``.

    Supports sha2-256 (what atproto uses) and the identity multihash. Raises
    ``DecodeError(CID_MISMATCH)`` when the digest differs or the hash function is not supported.
    """
    if cid[:2] == _CIDV0_PREFIX:
        hash_code, digest = _SHA2_256, cid[2:]
    else:
        _version, position = read_varint(cid, 0)
        _codec, position = read_varint(cid, position)
        hash_code, position = read_varint(cid, position)
        _digest_length, position = read_varint(cid, position)
        digest = cid[position:]
    if hash_code == _SHA2_256:
        matches = hashlib.sha256(block).digest() == digest
    elif hash_code == _IDENTITY_HASH:
        matches = block == digest
    else:
        raise DecodeError(
            DropReason.CID_MISMATCH,
            f"cannot verify block {_cid_text(cid)}: multihash code 0x{hash_code:x} is not supported",
        )
    if not matches:
        raise DecodeError(DropReason.CID_MISMATCH, f"block bytes do not hash to their CID {_cid_text(cid)}")


def read_car(data: bytes, *, verify: bool = False) -> Car:
    """Split a whole CAR v1 held in memory into roots and undecoded blocks.

    With ``verify``, every block is hashed and checked against its CID. A CID that appears twice keeps
    its last block. Raises ``DecodeError(INVALID_CAR)`` for a truncated or malformed CAR, and
    ``DecodeError(CID_MISMATCH)`` when ``verify`` finds a block that does not match.
    """
    if not data:
        raise DecodeError(DropReason.INVALID_CAR, "CAR is empty: no header")
    header_length, offset = read_varint(data, 0)
    if offset + header_length > len(data):
        raise DecodeError(
            DropReason.INVALID_CAR,
            f"CAR header claims {header_length} bytes but {len(data) - offset} remain (truncated CAR)",
        )
    roots = _parse_header(data[offset : offset + header_length])
    offset += header_length

    blocks: dict[bytes, bytes] = {}
    data_length = len(data)
    while offset < data_length:
        section_start = offset
        # The checks below inline the common cases of read_varint and read_cid (a length of one
        # or two varint bytes, then a CIDv1 with one-byte codec, hash code and digest length):
        # this loop runs for every block of every commit, and the calls were a third of its time.
        first = data[offset]
        second = data[offset + 1] if offset + 1 < data_length else 0x80
        if first < 0x80:
            section_length, offset = first, offset + 1
        elif second < 0x80:
            section_length, offset = (first & 0x7F) | (second << 7), offset + 2
        else:
            section_length, offset = read_varint(data, offset)
        section_end = offset + section_length
        if section_length == 0 or section_end > data_length:
            raise DecodeError(
                DropReason.INVALID_CAR,
                f"section at byte {section_start} claims {section_length} bytes "
                f"but {data_length - offset} remain (truncated or corrupt CAR)",
            )
        if (section_length > 4 and data[offset] == 1 and data[offset + 1] < 0x80
                and data[offset + 2] < 0x80 and data[offset + 3] < 0x80):
            cid_end = offset + 4 + data[offset + 3]
            if cid_end > section_end:
                raise DecodeError(DropReason.INVALID_CAR, f"section at byte {section_start} ends inside its CID")
        else:
            cid_end = _section_cid_end(data, offset, section_start, section_end)
        cid = data[offset:cid_end]
        block = data[cid_end:section_end]
        if verify:
            verify_block(cid, block)
        blocks[cid] = block
        offset = section_end
    return Car(roots=roots, blocks=blocks)


class CarStream:
    """Iterate the blocks of a CAR v1 read from a binary file or a bytes object, one section at a time.

    The header is read when the object is created, so ``roots`` is available before iterating.
    Iterating yields ``(cid bytes, block bytes)`` pairs in file order and can be done once. Memory
    use is one section at a time. Malformed input raises ``DecodeError`` as ``read_car`` does.
    """

    def __init__(self, source: bytes | BinaryIO, *, verify: bool = False) -> None:
        self._stream: BinaryIO = _as_stream(source)
        self._verify = verify
        self._offset = 0
        header_length = self._read_length()
        if header_length is None:
            raise DecodeError(DropReason.INVALID_CAR, "CAR is empty: no header")
        header = self._read_exactly(header_length)
        self.roots: list[bytes] = _parse_header(header)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        while True:
            section_start = self._offset
            section_length = self._read_length()
            if section_length is None:
                return
            if section_length == 0:
                raise DecodeError(DropReason.INVALID_CAR, f"empty section at byte {section_start}")
            cid, block = _split_section(self._read_exactly(section_length), section_start)
            if self._verify:
                verify_block(cid, block)
            yield cid, block

    def _read_length(self) -> int | None:
        """Read a section length varint; return None at a clean end of input."""
        start = self._offset
        raw = bytearray()
        while True:
            byte = self._stream.read(1)
            if not byte:
                if raw:
                    raise DecodeError(DropReason.INVALID_CAR, f"data ends inside the varint at byte {start}")
                return None
            raw += byte
            self._offset += 1
            if byte[0] < 0x80 or len(raw) >= _MAX_VARINT_BYTES:
                break
        value, _end = read_varint(bytes(raw), 0)
        if value > MAX_SECTION_BYTES:
            raise DecodeError(
                DropReason.INVALID_CAR,
                f"length {value} at byte {start} is above the {MAX_SECTION_BYTES}-byte section limit "
                "(corrupt CAR?)",
            )
        return value

    def _read_exactly(self, length: int) -> bytes:
        start = self._offset
        data = self._stream.read(length)
        self._offset += len(data)
        if len(data) != length:
            raise DecodeError(
                DropReason.INVALID_CAR,
                f"section at byte {start} claims {length} bytes but only {len(data)} remain (truncated CAR)",
            )
        return data


def iter_blocks(source: bytes | BinaryIO, *, verify: bool = False) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(cid bytes, block bytes)`` for each section of a CAR v1, skipping past its header.

    Use ``CarStream`` instead when the roots are needed. Raises ``DecodeError`` as ``read_car`` does,
    at the point of iteration where the problem is reached.
    """
    yield from CarStream(source, verify=verify)


def _as_stream(source: bytes | BinaryIO) -> BinaryIO:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return source


def _parse_header(header: bytes) -> list[bytes]:
    """Decode the CAR header and return its roots (raw CID bytes)."""
    if len(header) == 0:
        raise DecodeError(DropReason.INVALID_CAR, "CAR header is empty")
    try:
        decoded = libipld.decode_dag_cbor(header)
    except (ValueError, RecursionError) as error:
        raise DecodeError(DropReason.INVALID_CAR, f"CAR header is not valid DAG-CBOR: {error}") from None
    if not isinstance(decoded, dict):
        raise DecodeError(DropReason.INVALID_CAR, f"CAR header must be a map, got {_preview(decoded)}")
    version = decoded.get("version")
    if type(version) is not int or version != 1:
        raise DecodeError(DropReason.INVALID_CAR, f"CAR header version must be 1, got {_preview(version)}")
    roots = decoded.get("roots")
    if not isinstance(roots, list) or not all(isinstance(root, bytes) and is_cid(root) for root in roots):
        raise DecodeError(DropReason.INVALID_CAR, f"CAR header roots must be a list of CIDs, got {_preview(roots)}")
    return roots


def _section_cid_end(data: bytes, offset: int, section_start: int, section_end: int) -> int:
    """Return where the CID of the section starting at ``section_start`` ends; it must end inside it."""
    try:
        cid_end = read_cid(data, offset)
    except DecodeError as error:
        raise DecodeError(DropReason.INVALID_CAR, f"section at byte {section_start}: {error}") from None
    if cid_end > section_end:
        raise DecodeError(DropReason.INVALID_CAR, f"section at byte {section_start} ends inside its CID")
    return cid_end


def _split_section(section: bytes, section_start: int) -> tuple[bytes, bytes]:
    cid_end = _section_cid_end(section, 0, section_start, len(section))
    return section[:cid_end], section[cid_end:]


def _cid_text(cid: bytes) -> str:
    try:
        return libipld.encode_cid(cid)
    except ValueError:
        return "0x" + cid.hex()


def _preview(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
