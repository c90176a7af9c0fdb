"""A minimal CARv1 reader for tests, independent of ``indexer.car``, so that tests of MST and
verification code do not trust the package's own CAR reader."""

from __future__ import annotations

import libipld


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """Read an unsigned LEB128 varint at ``offset``; return ``(value, offset after it)``."""
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset


def car_blocks(car: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Return the first root and ``cid -> raw block`` of a CARv1 with CIDv1 sections."""
    header_length, offset = read_varint(car, 0)
    root = libipld.decode_dag_cbor(car[offset : offset + header_length])["roots"][0]
    offset += header_length
    blocks = {}
    while offset < len(car):
        section_length, offset = read_varint(car, offset)
        section = car[offset : offset + section_length]
        offset += section_length
        cid_end = 0
        for _ in range(3):  # CID version, codec, multihash code
            _, cid_end = read_varint(section, cid_end)
        digest_length, cid_end = read_varint(section, cid_end)
        cid_end += digest_length
        blocks[section[:cid_end]] = section[cid_end:]
    return root, blocks
