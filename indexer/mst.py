"""The atproto Merkle Search Tree (MST): key heights, node encoding, and edits on a partial tree.

A repo's records are the leaves of an MST whose root CID is the commit's ``data``. This module
owns what commit-proof checks need from the tree. It loads nodes lazily from a block mapping
(``cid bytes -> raw block bytes``, as read from a commit's CAR), inserts, updates and deletes
keys, and re-encodes changed nodes to compute the new root CID. Nodes that an edit never touches
stay unloaded and keep their CID, so a commit's partial tree is enough to edit near its keys.
Checking a Sync 1.1 commit proof runs this code once per commit, so decoding, checking and
encoding a node are written for speed (see ``Mst``).

Facts of the format (atproto "Repository" spec):

- A key's height is the number of leading zero bits of SHA-256(key), divided by 2 and rounded
  down. Layer 0 is the bottom; the root sits at the height of its highest key.
- A node is DAG-CBOR ``{"e": [entry, ...], "l": cid | null}``. Each entry is
  ``{"k": key suffix bytes, "p": shared prefix length with the previous key in the node,
  "t": cid | null, "v": record cid}``. ``l`` and ``t`` are always present, null when empty.
- A subtree pointer is null exactly when no key falls in its range. A node with no entries but a
  non-null ``l`` is a valid inner node. The root is never such a node: it is trimmed away.
- Node CIDs are CIDv1, codec dag-cbor (0x71), multihash sha2-256.

CIDs are handled as raw binary bytes (``0x01 0x71 0x12 0x20`` + digest for nodes), the form
libipld returns for links.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import NoReturn

import libipld

from indexer.errors import IndexerError

# CIDv1 (0x01), dag-cbor codec (0x71), sha2-256 multihash (0x12) with a 32-byte digest (0x20).
NODE_CID_PREFIX = b"\x01\x71\x12\x20"

# An MST key is "collection/rkey"; the repository spec caps it at 1024 bytes.
MAX_KEY_LENGTH = 1024

_NODE_FIELDS = frozenset(("e", "l"))
_sha256 = hashlib.sha256


class MstError(IndexerError):
    """An MST could not be read or edited."""


class MissingBlockError(MstError):
    """A node needed for the edit is not among the given blocks."""

    def __init__(self, cid: bytes) -> None:
        super().__init__(
            f"MST node {cid_to_str(cid)} is needed but missing from the commit's blocks; "
            "the commit does not carry enough of the tree to check its ops"
        )
        self.cid = cid


class InvalidNodeError(MstError):
    """A node block is undecodable, hashes to another CID, or breaks the MST's structure rules."""


class KeyStateError(MstError):
    """An edit does not fit the tree: inserting a key that exists, or removing one that does not."""


def key_height(key: bytes) -> int:
    """Return the MST layer of ``key``: leading zero bits of SHA-256(key), divided by 2."""
    # 256 minus the bit length of the digest read as an integer is its count of leading zero bits.
    return (256 - int.from_bytes(_sha256(key).digest(), "big").bit_length()) // 2


def common_prefix_length(left: bytes, right: bytes) -> int:
    """Return the number of leading bytes that ``left`` and ``right`` share."""
    limit = min(len(left), len(right))
    # The XOR of the two big-endian prefixes has one leading zero byte per shared byte. This runs
    # in C. A Python loop over the bytes would be the main cost of loading nodes.
    difference = int.from_bytes(left[:limit], "big") ^ int.from_bytes(right[:limit], "big")
    return limit - (difference.bit_length() + 7) // 8


def node_cid(block: bytes) -> bytes:
    """Return the binary CID of a DAG-CBOR block hashed with SHA-256."""
    return NODE_CID_PREFIX + _sha256(block).digest()


def cid_to_str(cid: bytes) -> str:
    """Return the base32 text form of a binary CID, for messages."""
    try:
        return libipld.encode_cid(cid)
    except ValueError:
        return cid.hex()


class Node:
    """One MST node at ``layer``. Never changed after creation, so its CID can be cached.

    Entry ``i`` is ``keys[i]`` (the full key), ``values[i]`` (its record CID) and ``rights[i]``
    (the subtree of keys between it and the next entry). Nodes share these lists with the nodes
    they were derived from, so no code changes a list in place after a node references it. ``cid`` is
    the CID the node was loaded from, or None until ``Mst`` encodes it. ``prefixes``, when not
    None, is the length each key shares with the one before it. Nodes derived from a loaded node
    carry these along (see ``_prefixes_without`` and ``_joined_prefixes``), so encoding them need
    not compare keys again.
    """

    __slots__ = ("layer", "left", "keys", "values", "rights", "cid", "prefixes")

    def __init__(
        self,
        layer: int,
        left: Subtree,
        keys: list[bytes],
        values: list[bytes],
        rights: list[Subtree],
        cid: bytes | None = None,
        prefixes: list[int] | None = None,
    ) -> None:
        self.layer = layer
        self.left = left
        self.keys = keys
        self.values = values
        self.rights = rights
        self.cid = cid
        self.prefixes = prefixes

    def gap(self, index: int) -> Subtree:
        """Return the subtree before entry ``index`` (``left`` for 0, else the previous entry's right)."""
        return self.left if index == 0 else self.rights[index - 1]

    def with_gap(self, index: int, subtree: Subtree) -> Node:
        """Return a copy whose gap ``index`` points at ``subtree``."""
        if index == 0:
            return Node(self.layer, subtree, self.keys, self.values, self.rights, None, self.prefixes)
        rights = self.rights.copy()
        rights[index - 1] = subtree
        return Node(self.layer, self.left, self.keys, self.values, rights, None, self.prefixes)


# A pointer to a subtree: a node in memory, the CID of a node not loaded yet, or None when empty.
Subtree = Node | bytes | None


def _nonempty(node: Node) -> Node | None:
    """Return None for a node with neither entries nor a left subtree, which must not exist."""
    if not node.keys and node.left is None:
        return None
    return node


def _wrap(subtree: Subtree, layer: int, target_layer: int) -> Subtree:
    """Put ``subtree`` (at ``layer``) under entry-less inner nodes up to ``target_layer``."""
    if subtree is None:
        return None
    while layer < target_layer:
        layer += 1
        subtree = Node(layer, subtree, [], [], [], None, [])
    return subtree


# Encoding.


def _encode_head(major: int, value: int) -> bytes:
    """Encode a CBOR item head with the shortest argument, as DAG-CBOR requires."""
    if value < 24:
        return bytes([major << 5 | value])
    if value < 0x100:
        return bytes([major << 5 | 24, value])
    if value < 0x10000:
        return bytes([major << 5 | 25]) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes([major << 5 | 26]) + value.to_bytes(4, "big")
    return bytes([major << 5 | 27]) + value.to_bytes(8, "big")


# Precomputed parts for the common case: a key of at most MAX_KEY_LENGTH bytes and links to
# 36-byte CIDs (every CIDv1 with a SHA-256 digest). Other entries go through _encode_entry.
# An entry is a 4-item map whose first field "k" is a byte string, so its opening depends only on
# the suffix length.
_ENTRY_OPENINGS = tuple(b"\xa4\x61k" + _encode_head(2, size) for size in range(MAX_KEY_LENGTH + 1))
_PREFIX_FIELDS = tuple(b"\x61p" + _encode_head(0, size) for size in range(MAX_KEY_LENGTH + 1))
# Tag 42 and the head of a 37-byte string: the 0x00 multibase prefix and a 36-byte CID.
_LINK_HEAD_36 = b"\xd8\x2a\x58\x25\x00"
_T_NULL = b"\x61t\xf6"
_T_LINK_36 = b"\x61t" + _LINK_HEAD_36
_V_LINK_36 = b"\x61v" + _LINK_HEAD_36


def _encode_link(cid: bytes | None) -> bytes:
    """Encode a CID link (tag 42 over 0x00 + binary CID), or CBOR null for None."""
    if cid is None:
        return b"\xf6"
    if len(cid) == 36:
        return _LINK_HEAD_36 + cid
    return b"\xd8\x2a" + _encode_head(2, len(cid) + 1) + b"\x00" + cid


def _encode_entry(suffix: bytes, prefix: int, value: bytes, right: bytes | None) -> bytes:
    """Encode one entry map of any size. Map keys are in DAG-CBOR order: k, p, t, v."""
    return b"".join((
        b"\xa4\x61k", _encode_head(2, len(suffix)), suffix,
        b"\x61p", _encode_head(0, prefix),
        b"\x61t", _encode_link(right),
        b"\x61v", _encode_link(value),
    ))


def _prefix_lengths(keys: list[bytes]) -> list[int]:
    """Return the length each key shares with the key before it (0 for the first)."""
    prefixes = []
    previous = b""
    for key in keys:
        # common_prefix_length, inlined because this runs for every key of most changed nodes.
        limit = min(len(previous), len(key))
        difference = int.from_bytes(previous[:limit], "big") ^ int.from_bytes(key[:limit], "big")
        prefixes.append(limit - (difference.bit_length() + 7) // 8)
        previous = key
    return prefixes


def _prefixes_without(prefixes: list[int] | None, index: int) -> list[int] | None:
    """Return the shared prefix lengths of a node's keys after removing key ``index``.

    For sorted keys a < b < c, the prefix that a and c share is the shorter of the prefixes of
    (a, b) and (b, c). So removing b needs no key comparison.
    """
    if prefixes is None:
        return None
    if index + 1 == len(prefixes):
        return prefixes[:index]
    following = min(prefixes[index], prefixes[index + 1]) if index > 0 else 0
    return prefixes[:index] + [following] + prefixes[index + 2 :]


def _prefixes_with(keys: list[bytes], prefixes: list[int] | None, index: int, key: bytes) -> list[int] | None:
    """Return the shared prefix lengths of a node's keys after inserting ``key`` at ``index``."""
    if prefixes is None:
        return None
    inserted = [common_prefix_length(keys[index - 1], key) if index > 0 else 0]
    if index < len(keys):
        inserted.append(common_prefix_length(key, keys[index]))
    return prefixes[:index] + inserted + prefixes[index + 1 :]


def _prefixes_before(prefixes: list[int] | None, index: int) -> list[int] | None:
    """Return the shared prefix lengths of a node's keys before ``index``."""
    return None if prefixes is None else prefixes[:index]


def _prefixes_from(prefixes: list[int] | None, index: int) -> list[int] | None:
    """Return the shared prefix lengths of a node's keys from ``index`` on; the first key shares none."""
    if prefixes is None:
        return None
    return [0] + prefixes[index + 1 :] if index < len(prefixes) else []


def _joined_prefixes(
    low_keys: list[bytes], low_prefixes: list[int] | None, high_keys: list[bytes], high_prefixes: list[int] | None
) -> list[int] | None:
    """Return the shared prefix lengths of ``low_keys + high_keys``, both sorted, every low key first."""
    if low_prefixes is None or high_prefixes is None:
        return None
    if not low_keys or not high_keys:
        return low_prefixes + high_prefixes
    return low_prefixes + [common_prefix_length(low_keys[-1], high_keys[0])] + high_prefixes[1:]


def _encode(
    left: bytes | None,
    keys: list[bytes],
    prefixes: list[int] | None,
    values: list[bytes],
    rights: list[bytes | None],
) -> bytes:
    """Encode one node from its left CID and parallel lists of keys, shared prefix lengths (None
    to compute them), record CIDs and right CIDs."""
    if prefixes is None:
        prefixes = _prefix_lengths(keys)
    parts = [b"\xa2\x61e", _encode_head(4, len(keys))]
    for key, prefix, value, right in zip(keys, prefixes, values, rights):
        suffix = key[prefix:]
        if len(key) <= MAX_KEY_LENGTH and len(value) == 36:
            if right is None:
                parts += (_ENTRY_OPENINGS[len(suffix)], suffix, _PREFIX_FIELDS[prefix], _T_NULL, _V_LINK_36, value)
                continue
            if len(right) == 36:
                parts += (_ENTRY_OPENINGS[len(suffix)], suffix, _PREFIX_FIELDS[prefix], _T_LINK_36, right, _V_LINK_36, value)
                continue
        parts.append(_encode_entry(suffix, prefix, value, right))
    parts += (b"\x61l", _encode_link(left))
    return b"".join(parts)


def encode_node(left: bytes | None, entries: list[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """Encode one MST node as DAG-CBOR from its left CID and ``(key, value cid, right cid)`` entries.

    Keys are prefix-compressed against the previous key of the same node. This is written by hand
    rather than with ``libipld.encode_dag_cbor`` because libipld 3.5 encodes any byte string that
    parses as a CID as a link, and key suffixes are byte strings.
    """
    keys = [key for key, _, _ in entries]
    values = [value for _, value, _ in entries]
    rights = [right for _, _, right in entries]
    return _encode(left, keys, None, values, rights)


# Decoding.


def _height_bounds(height: int) -> tuple[bytes, bytes]:
    """Return ``(low, high)``: the SHA-256 digests of keys at ``height`` are those with low <= digest < high."""
    # Height h means 2h or 2h + 1 leading zero bits: 2**(254 - 2h) <= digest < 2**(256 - 2h).
    low = (1 << (254 - 2 * height)).to_bytes(32, "big") if height < 128 else bytes(32)
    # Every 32-byte digest sorts before 33 bytes of 0xff, so height 0 has no upper bound.
    high = (1 << (256 - 2 * height)).to_bytes(32, "big") if height > 0 else b"\xff" * 33
    return low, high


# Comparing digests as bytes with these bounds checks a key's height without converting to int.
_HEIGHT_BOUNDS = tuple(_height_bounds(height) for height in range(129))


def _decode_entries(
    cid: bytes, raw_entries: list, layer: int | None
) -> tuple[int, list[bytes], list[int], list[bytes], list[Subtree]]:
    """Expand the prefix-compressed entries of the node block ``cid`` into full keys.

    Returns the layer (for ``layer`` None, the height of the first key, or 0 without keys) and
    parallel lists of keys, shared prefix lengths, record CIDs and right subtree CIDs. Raises
    InvalidNodeError on a malformed entry, keys out of order, a shared prefix that is not maximal
    (which would re-encode to another CID, so the tree would not be canonical), or a key whose
    height is not the layer.
    """
    if layer is None:
        first = raw_entries[0] if raw_entries and type(raw_entries[0]) is dict else {}
        layer = key_height(first["k"]) if type(first.get("k")) is bytes and first.get("p") == 0 else 0
    low, high = _HEIGHT_BOUNDS[layer] if 0 <= layer <= 128 else (b"\xff" * 33, b"")
    keys: list[bytes] = []
    prefixes: list[int] = []
    values: list[bytes] = []
    rights: list[Subtree] = []
    previous = b""
    raw: object = None
    try:
        for raw in raw_entries:
            # Four fields, all found below (else KeyError), means exactly k, p, t and v.
            if type(raw) is not dict or len(raw) != 4:
                raise KeyError
            prefix, suffix, value, right = raw["p"], raw["k"], raw["v"], raw["t"]
            if type(prefix) is not int or type(suffix) is not bytes or type(value) is not bytes:
                raise InvalidNodeError(f"MST node {cid_to_str(cid)}: entry has wrongly typed p, k or v: {raw!r}")
            if right is not None and type(right) is not bytes:
                raise InvalidNodeError(f"MST node {cid_to_str(cid)}: entry 't' is not a link: {right!r}")
            # The key must sort after the previous one and share exactly ``prefix`` bytes with it:
            # either it extends the whole previous key, or its first differing byte is the greater one.
            if prefix == len(previous) and suffix:
                key = previous + suffix
            elif 0 <= prefix < len(previous) and suffix and suffix[0] > previous[prefix]:
                key = previous[:prefix] + suffix
            else:
                _reject_entry(cid, previous, prefix, suffix)
            if len(key) > MAX_KEY_LENGTH:
                raise InvalidNodeError(f"MST node {cid_to_str(cid)}: key length {len(key)} outside 1..{MAX_KEY_LENGTH}")
            if not low <= _sha256(key).digest() < high:
                raise InvalidNodeError(f"MST node {cid_to_str(cid)}: key {key!r} does not belong on layer {layer}")
            keys.append(key)
            prefixes.append(prefix)
            values.append(value)
            rights.append(right)
            previous = key
    except KeyError:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)}: entry must have exactly k, p, t, v: {raw!r}") from None
    return layer, keys, prefixes, values, rights


def _reject_entry(cid: bytes, previous: bytes, prefix: int, suffix: bytes) -> NoReturn:
    """Raise InvalidNodeError saying why an entry's key does not follow ``previous``."""
    if not 0 <= prefix <= len(previous):
        raise InvalidNodeError(f"MST node {cid_to_str(cid)}: prefix length {prefix} exceeds previous key")
    key = previous[:prefix] + suffix
    if not key:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)}: key length 0 outside 1..{MAX_KEY_LENGTH}")
    raise InvalidNodeError(f"MST node {cid_to_str(cid)}: keys out of order or prefix not maximal at {key!r}")


def decode_node(cid: bytes, block: bytes | None, layer: int | None) -> Node:
    """Decode and check the node block ``cid`` (None when absent); ``layer`` None means it is the root.

    Raises MissingBlockError for an absent block. Raises InvalidNodeError when the block does not
    hash to ``cid``, is not a node, or breaks a structure rule: key order, maximal prefixes, every
    key on ``layer``, no subtrees below layer 0, and no empty node below the root.
    """
    if block is None:
        raise MissingBlockError(cid)
    if NODE_CID_PREFIX + _sha256(block).digest() != cid:
        raise InvalidNodeError(f"MST node block does not hash to its CID {cid_to_str(cid)}")
    try:
        raw = libipld.decode_dag_cbor(block)
    except (ValueError, RecursionError) as error:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)} is not valid DAG-CBOR: {error}") from error
    if type(raw) is not dict or raw.keys() != _NODE_FIELDS:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)} must be a map of exactly 'e' and 'l'")
    left, raw_entries = raw["l"], raw["e"]
    if left is not None and type(left) is not bytes:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)}: 'l' is not a link: {left!r}")
    if type(raw_entries) is not list:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)}: 'e' is not a list")
    is_root = layer is None
    layer, keys, prefixes, values, rights = _decode_entries(cid, raw_entries, layer)
    if not keys and left is None and not is_root:
        raise InvalidNodeError(f"MST node {cid_to_str(cid)} below the root is empty; an empty subtree must be null")
    if layer == 0:
        if rights.count(None) != len(rights):
            raise InvalidNodeError(f"MST node {cid_to_str(cid)} on layer 0 has a subtree")
        if left is not None:
            raise InvalidNodeError(f"MST node {cid_to_str(cid)} on layer 0 has a left subtree")
    return Node(layer, left, keys, values, rights, cid, prefixes)


class Mst:
    """An MST over a block mapping, loaded lazily and edited in memory.

    Edits replace the nodes on the path they touch with new in-memory nodes. Untouched subtrees
    stay as CIDs, and ``root_cid`` encodes and hashes only the new nodes. ``blocks`` is only read.
    Every node that an edit or lookup reaches is decoded and checked by ``decode_node`` once, then
    kept for later edits. So an edit on a tampered tree fails with ``InvalidNodeError`` instead of
    producing a meaningless root. ``items`` does not keep the nodes it walks.
    """

    def __init__(self, blocks: Mapping[bytes, bytes] | None = None) -> None:
        """Create an empty tree reading nodes from ``blocks`` (cid bytes -> raw block bytes)."""
        self._blocks: Mapping[bytes, bytes] = blocks if blocks is not None else {}
        self._root: Subtree = None
        self._root_layer = 0
        self._loaded: dict[bytes, Node] = {}

    @classmethod
    def load(cls, root_cid: bytes, blocks: Mapping[bytes, bytes]) -> Mst:
        """Return the tree whose root node is ``root_cid``; raises MstError if the root is unusable."""
        tree = cls(blocks)
        root = decode_node(root_cid, blocks.get(root_cid), layer=None)
        if not root.keys and root.left is not None:
            raise InvalidNodeError(
                f"MST root {cid_to_str(root_cid)} has no entries but a left subtree; a root is always trimmed"
            )
        if root.keys:
            tree._loaded[root_cid] = root
            tree._root = root
            tree._root_layer = root.layer
        return tree

    @classmethod
    def from_items(cls, items: Mapping[bytes, bytes]) -> Mst:
        """Build the canonical tree holding ``items`` (key -> record CID) from nothing."""
        tree = cls()
        for key, value in items.items():
            tree.insert(key, value)
        return tree

    # Reading.

    def _resolve(self, subtree: Subtree, layer: int, keep: bool = True) -> Node | None:
        """Return the node that ``subtree`` points at, loading it when it is only a CID.

        ``keep`` False does not add a newly loaded node to the nodes kept for later edits.
        """
        if subtree is None or isinstance(subtree, Node):
            return subtree
        node = self._loaded.get(subtree)
        if node is None:
            if layer < 0:
                raise InvalidNodeError(f"MST node on layer 0 points below it, at {cid_to_str(subtree)}")
            node = decode_node(subtree, self._blocks.get(subtree), layer)
            if keep:
                self._loaded[subtree] = node
        elif node.layer != layer:
            # A valid tree contains each node once, so one CID reached on two layers means a forged tree.
            raise InvalidNodeError(f"MST node {cid_to_str(subtree)} is linked on layers {node.layer} and {layer}")
        return node

    def get(self, key: bytes) -> bytes | None:
        """Return the record CID stored at ``key``, or None when the key is absent."""
        node = self._resolve(self._root, self._root_layer)
        while node is not None:
            keys = node.keys
            index = bisect_left(keys, key)
            if index < len(keys) and keys[index] == key:
                return node.values[index]
            node = self._resolve(node.gap(index), node.layer - 1)
        return None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield every ``(key, record cid)`` in key order; needs every node's block."""
        yield from self._walk(self._root, self._root_layer)

    def _walk(self, subtree: Subtree, layer: int) -> Iterator[tuple[bytes, bytes]]:
        # keep=False: a whole repo's nodes would otherwise stay in memory until the tree is dropped.
        node = self._resolve(subtree, layer, keep=False)
        if node is None:
            return
        yield from self._walk(node.left, layer - 1)
        for key, value, right in zip(node.keys, node.values, node.rights):
            yield key, value
            yield from self._walk(right, layer - 1)

    # Editing.

    def insert(self, key: bytes, value: bytes) -> None:
        """Add ``key`` with record CID ``value``; raises KeyStateError if the key exists."""
        height = key_height(key)
        root = self._resolve(self._root, self._root_layer)
        if root is None:
            self._root = Node(height, None, [key], [value], [None], None, [0])
            self._root_layer = height
        elif height > root.layer:
            # The new key becomes the only entry of a new, higher root, splitting the old tree.
            below, above = self._split(root, root.layer, key)
            below = _wrap(below, root.layer, height - 1)
            above = _wrap(above, root.layer, height - 1)
            self._root = Node(height, below, [key], [value], [above], None, [0])
            self._root_layer = height
        else:
            self._root = self._insert(root, key, value, height)

    def _insert(self, node: Node, key: bytes, value: bytes, height: int) -> Node:
        keys = node.keys
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            raise KeyStateError(f"cannot insert {key!r}: the key is already in the MST")
        if height == node.layer:
            below, above = self._split(node.gap(index), node.layer - 1, key)
            left = node.left
            rights = node.rights[:index] + [above] + node.rights[index:]
            if index == 0:
                left = below
            else:
                rights[index - 1] = below
            values = node.values[:index] + [value] + node.values[index:]
            prefixes = _prefixes_with(keys, node.prefixes, index, key)
            return Node(node.layer, left, keys[:index] + [key] + keys[index:], values, rights, None, prefixes)
        child = self._resolve(node.gap(index), node.layer - 1)
        if child is None:
            leaf = Node(height, None, [key], [value], [None], None, [0])
            return node.with_gap(index, _wrap(leaf, height, node.layer - 1))
        return node.with_gap(index, self._insert(child, key, value, height))

    def _split(self, subtree: Subtree, layer: int, key: bytes) -> tuple[Subtree, Subtree]:
        """Split ``subtree`` (at ``layer``) into the parts holding keys below and above ``key``."""
        node = self._resolve(subtree, layer)
        if node is None:
            return None, None
        keys = node.keys
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            raise KeyStateError(f"cannot insert {key!r}: the key is already in the MST")
        gap_below, gap_above = self._split(node.gap(index), layer - 1, key)
        if index == 0:
            below = Node(layer, gap_below, [], [], [], None, [])
        else:
            rights = node.rights[:index]
            rights[-1] = gap_below
            below = Node(layer, node.left, keys[:index], node.values[:index], rights, None, _prefixes_before(node.prefixes, index))
        above = Node(
            layer, gap_above, keys[index:], node.values[index:], node.rights[index:], None, _prefixes_from(node.prefixes, index)
        )
        return _nonempty(below), _nonempty(above)

    def update(self, key: bytes, value: bytes) -> bytes:
        """Point ``key`` at record CID ``value``; return the CID it had. Raises KeyStateError if absent."""
        root = self._resolve(self._root, self._root_layer)
        if root is None:
            raise KeyStateError(f"cannot update {key!r}: the MST is empty")
        self._root, previous = self._update(root, key, value)
        return previous

    def _update(self, node: Node, key: bytes, value: bytes) -> tuple[Node, bytes]:
        keys = node.keys
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            values = node.values.copy()
            values[index] = value
            return Node(node.layer, node.left, keys, values, node.rights, None, node.prefixes), node.values[index]
        child = self._resolve(node.gap(index), node.layer - 1)
        if child is None:
            raise KeyStateError(f"cannot update {key!r}: the key is not in the MST")
        new_child, previous = self._update(child, key, value)
        return node.with_gap(index, new_child), previous

    def delete(self, key: bytes) -> bytes:
        """Remove ``key``; return its record CID. Raises KeyStateError if the key is absent."""
        root = self._resolve(self._root, self._root_layer)
        if root is None:
            raise KeyStateError(f"cannot delete {key!r}: the MST is empty")
        new_root, previous = self._delete(root, key)
        # Trim entry-less nodes off the top: the root always contains at least one key.
        layer = root.layer
        while new_root is not None and not new_root.keys:
            layer -= 1
            new_root = self._resolve(new_root.left, layer)
        self._root = new_root
        self._root_layer = new_root.layer if new_root is not None else 0
        return previous

    def _delete(self, node: Node, key: bytes) -> tuple[Node | None, bytes]:
        keys = node.keys
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            merged = self._merge(node.gap(index), node.rights[index], node.layer - 1)
            left = node.left
            rights = node.rights[:index] + node.rights[index + 1 :]
            if index == 0:
                left = merged
            else:
                rights[index - 1] = merged
            values = node.values[:index] + node.values[index + 1 :]
            prefixes = _prefixes_without(node.prefixes, index)
            remaining = Node(node.layer, left, keys[:index] + keys[index + 1 :], values, rights, None, prefixes)
            return _nonempty(remaining), node.values[index]
        child = self._resolve(node.gap(index), node.layer - 1)
        if child is None:
            raise KeyStateError(f"cannot delete {key!r}: the key is not in the MST")
        new_child, previous = self._delete(child, key)
        return _nonempty(node.with_gap(index, new_child)), previous

    def _merge(self, below: Subtree, above: Subtree, layer: int) -> Subtree:
        """Join two adjacent subtrees at ``layer``, every key of ``below`` sorting before ``above``."""
        if below is None:
            return above
        if above is None:
            return below
        low = self._resolve(below, layer)
        high = self._resolve(above, layer)
        assert low is not None and high is not None  # only None resolves to None
        count = len(low.keys)
        seam = self._merge(low.gap(count), high.left, layer - 1)
        left = low.left
        rights = low.rights + high.rights
        if count == 0:
            left = seam
        else:
            rights[count - 1] = seam
        prefixes = _joined_prefixes(low.keys, low.prefixes, high.keys, high.prefixes)
        return Node(layer, left, low.keys + high.keys, low.values + high.values, rights, None, prefixes)

    # Encoding.

    def root_cid(self) -> bytes:
        """Return the CID of the root node (of an empty node when the tree is empty)."""
        root = self._root
        if root is None:
            return node_cid(_encode(None, [], None, [], []))
        return root if isinstance(root, bytes) else self._node_cid(root, None)

    def encoded_blocks(self) -> dict[bytes, bytes]:
        """Return ``cid -> block bytes`` for every node held in memory (loaded or new)."""
        blocks: dict[bytes, bytes] = {}
        if self._root is None:
            empty = _encode(None, [], None, [], [])
            blocks[node_cid(empty)] = empty
        else:
            self._subtree_cid(self._root, blocks)
        return blocks

    def _subtree_cid(self, subtree: Subtree, sink: dict[bytes, bytes] | None) -> bytes | None:
        """Return the CID of ``subtree``, encoding in-memory nodes whose CID is not known yet.

        With a ``sink``, every in-memory node is encoded and added to it, known CID or not.
        """
        if subtree is None or isinstance(subtree, bytes):
            return subtree
        return self._node_cid(subtree, sink)

    def _node_cid(self, node: Node, sink: dict[bytes, bytes] | None) -> bytes:
        """Return the CID of ``node``, encoding it (and its in-memory subtrees) when needed; see ``_subtree_cid``."""
        if node.cid is not None and sink is None:
            return node.cid
        left = self._subtree_cid(node.left, sink)
        rights = [
            right if right is None or isinstance(right, bytes) else self._node_cid(right, sink)
            for right in node.rights
        ]
        block = _encode(left, node.keys, node.prefixes, node.values, rights)
        cid = node.cid = node_cid(block)
        if sink is not None:
            sink[cid] = block
        return cid
