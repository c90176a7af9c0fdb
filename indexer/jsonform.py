"""Convert decoded DAG-CBOR values to atproto's JSON form and back, and make strings storable.

atproto's JSON convention writes a CID link as ``{"$link": "<cid string>"}`` and a byte string as
``{"$bytes": "<base64, no padding>"}``. libipld 3.5 returns both as plain Python ``bytes`` (a link
is its binary CID without the leading 0x00), so the two have to be told apart here:

- Without the source block, a ``bytes`` value that is exactly one binary CID is taken as a link.
  libipld's encoder writes such bytes as a link too, so ``libipld.encode_dag_cbor(from_json(...))``
  gives back the original block for every canonically encoded block whose byte strings do not
  happen to be CIDs.
- With the source block (``to_json(value, block=...)``) the result is exact: the block's CBOR tags
  decide. A link's CID bytes are always preceded by the 0x00 prefix inside tag 42, and a byte
  string's content by the last byte of its length header, which is not 0x00 for lengths that are
  not a multiple of 256. When every occurrence of the CID bytes in the block agrees, that decides;
  otherwise the block is re-read here with its tags kept.

``to_json`` also removes U+0000 from every string and map key because PostgreSQL ``text`` and
``jsonb`` reject it, and reports how many characters it removed.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

import libipld

from indexer.car import is_cid

_NUL = "\x00"
_CID_TAG = 42


@dataclass(frozen=True, slots=True)
class JsonForm:
    """A JSON-compatible value and the number of U+0000 characters removed from its strings."""

    value: Any
    nul_chars_removed: int


@dataclass(frozen=True, slots=True)
class _Link:
    """A CID link read with its tag kept, so it cannot be mistaken for a byte string."""

    cid: bytes


def to_json(value: Any, *, block: bytes | None = None) -> JsonForm:
    """Convert a libipld-decoded value to atproto JSON form, removing U+0000 from strings.

    ``block`` is the DAG-CBOR the value was decoded from. When given, links and byte strings are
    told apart exactly by the block's tags; when None, a ``bytes`` value that is exactly one CID is
    written as a link (libipld's own encoding rule). Map keys stay strings; integers, floats, bools
    and None pass through. Removing U+0000 from two map keys can make them equal, and then the later
    key in the map wins.
    """
    if _holds_no_bytes_or_nul(value):
        # Most records (likes, follows, reposts, plain posts) have neither byte strings nor U+0000:
        # the decoded value already is the JSON form, so it is returned itself, not a copy.
        return JsonForm(value, 0)
    converter = _Converter(block)
    try:
        converted = converter.convert(value)
    except _AmbiguousCid:
        # Raised only when the block is known, so that it can be re-read with its tags.
        assert block is not None
        converter = _Converter(block, tagged=True)
        converted = converter.convert(_TaggedReader(block).read_all())
    return JsonForm(converted, converter.nul_chars_removed)


def _holds_no_bytes_or_nul(value: Any) -> bool:
    """Return True when ``value`` contains no ``bytes`` (links included) and no U+0000 in any string or map key."""
    kind = type(value)
    if kind is str:
        return _NUL not in value
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or _NUL in key:
                return False
            item_kind = type(item)
            if item_kind is str:
                if _NUL in item:
                    return False
            elif item_kind not in _SCALARS and not _holds_no_bytes_or_nul(item):
                return False
        return True
    if kind is list:
        return all(_holds_no_bytes_or_nul(item) for item in value)
    # Anything else, a subclass of str or dict included, takes the converting path.
    return kind in _SCALARS


_SCALARS = frozenset({int, float, bool, type(None)})


def from_json(value: Any) -> Any:
    """Convert atproto JSON form back to values that ``libipld.encode_dag_cbor`` accepts.

    ``{"$link": cid}`` becomes binary CID bytes and ``{"$bytes": base64}`` becomes bytes. Raises
    ValueError for a ``$link`` that is not a CID string or a ``$bytes`` that is not base64.
    """
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$link"), str):
            return cid_to_bytes(value["$link"])
        if len(value) == 1 and isinstance(value.get("$bytes"), str):
            encoded = value["$bytes"]
            return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def cid_to_bytes(cid: str) -> bytes:
    """Return the binary form of a CID string (multibase CIDv1, or base58btc CIDv0 ``Qm...``)."""
    if cid.startswith("Qm"):
        return libipld.decode_multibase("z" + cid)[1]
    decoded = libipld.decode_multibase(cid)[1]
    if not is_cid(decoded):
        raise ValueError(f"{cid!r} is not a CID string")
    return decoded


class _AmbiguousCid(Exception):
    """The same CID bytes are both a link and a byte string's content somewhere in the block."""


class _Converter:
    """One conversion pass that counts the U+0000 characters it removes.

    ``tagged`` means the input came from ``_TaggedReader``, so links are ``_Link`` and every
    ``bytes`` value is a byte string.
    """

    def __init__(self, block: bytes | None, *, tagged: bool = False) -> None:
        self.block = block
        self.tagged = tagged
        self.link_kinds: dict[bytes, bool] = {}  # CID bytes -> True when the block has it as a link
        self.nul_chars_removed = 0

    def convert(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, dict):
            return {self._text(key): self.convert(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.convert(item) for item in value]
        if isinstance(value, bytes):
            if self._is_link(value):
                return {"$link": libipld.encode_cid(value)}
            return {"$bytes": base64.b64encode(value).decode("ascii").rstrip("=")}
        if isinstance(value, _Link):
            return {"$link": libipld.encode_cid(value.cid)}
        return value

    def _text(self, text: str) -> str:
        if _NUL not in text:
            return text
        self.nul_chars_removed += text.count(_NUL)
        return text.replace(_NUL, "")

    def _is_link(self, value: bytes) -> bool:
        # NOTE: libipld 3.5 also accepts a tag-42 link with extra bytes after the CID; such a value
        # is not exactly one CID, so it is written as $bytes because a CID string cannot carry it.
        if self.tagged or not is_cid(value):
            return False
        if self.block is None:
            return True
        kind = self.link_kinds.get(value)
        if kind is None:
            kind = _link_kind_from_block(value, self.block)
            if kind is None:
                raise _AmbiguousCid
            self.link_kinds[value] = kind
        return kind


def _link_kind_from_block(cid: bytes, block: bytes) -> bool | None:
    """Return True if every occurrence of ``cid`` in ``block`` is a link, False if none is, else None."""
    if len(cid) % 256 == 0:
        return None
    preceded_by_zero = set()
    position = block.find(cid, 1)
    while position != -1:
        preceded_by_zero.add(block[position - 1] == 0)
        position = block.find(cid, position + 1)
    if len(preceded_by_zero) == 1:
        return preceded_by_zero.pop()
    return None


class _TaggedReader:
    """Re-read a DAG-CBOR block that libipld already accepted, keeping tag 42 as ``_Link``.

    Only reached for blocks where the same CID bytes appear both as a link and inside a byte string.
    Validation is left to libipld, which decoded the same block first.
    """

    def __init__(self, block: bytes) -> None:
        self.data = block
        self.offset = 0

    def read_all(self) -> Any:
        return self._item()

    def _head(self) -> tuple[int, int]:
        initial = self.data[self.offset]
        self.offset += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info
        size = 1 << (info - 24)
        argument = int.from_bytes(self.data[self.offset : self.offset + size], "big")
        self.offset += size
        return major, argument

    def _item(self) -> Any:
        initial = self.data[self.offset]
        if initial in (0xF4, 0xF5, 0xF6):
            self.offset += 1
            return {0xF4: False, 0xF5: True, 0xF6: None}[initial]
        if initial == 0xFB:
            (number,) = struct.unpack_from(">d", self.data, self.offset + 1)
            self.offset += 9
            return number
        major, argument = self._head()
        if major == 0:
            return argument
        if major == 1:
            return -1 - argument
        if major in (2, 3):
            raw = self.data[self.offset : self.offset + argument]
            self.offset += argument
            return raw if major == 2 else raw.decode("utf-8")
        if major == 4:
            return [self._item() for _ in range(argument)]
        if major == 5:
            return {self._item(): self._item() for _ in range(argument)}
        if major == 6 and argument == _CID_TAG:
            content = self._item()
            return _Link(content[1:])
        raise ValueError(f"unexpected CBOR item 0x{initial:02x} at byte {self.offset} of an accepted block")
