"""The atproto Merkle Search Tree (MST): key heights, node encoding, and edits on a partial tree.

A repo's records are the leaves of an MST whose root CID is the commit's ``data``. This module
owns what commit-proof checks need from the tree. It loads nodes lazily from a block mapping
(``cid bytes -> raw block bytes``, as read from a commit's CAR), inserts, updates and deletes
keys, and re-encodes changed nodes to compute the new root CID. Nodes that an edit never touches
stay unloaded and keep their CID, so a commit's partial tree is enough to edit near its keys.

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
from dataclasses import dataclass, field

import libipld

from indexer.errors import IndexerError

# CIDv1 (0x01), dag-cbor codec (0x71), sha2-256 multihash (0x12) with a 32-byte digest (0x20).
NODE_CID_PREFIX = b"\x01\x71\x12\x20"

# An MST key is "collection/rkey"; the repository spec caps it at 1024 bytes.
MAX_KEY_LENGTH = 1024


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
    digest = hashlib.sha256(key).digest()
    zero_bits = 0
    for byte in digest:
        if byte == 0:
            zero_bits += 8
            continue
        zero_bits += 8 - byte.bit_length()
        break
    return zero_bits // 2


def common_prefix_length(left: bytes, right: bytes) -> int:
    """Return the number of leading bytes that ``left`` and ``right`` share."""
    limit = min(len(left), len(right))
    # The XOR of the two big-endian prefixes has one leading zero byte per shared byte. This runs
    # in C. A Python loop over the bytes would be the main cost of loading nodes.
    difference = int.from_bytes(left[:limit], "big") ^ int.from_bytes(right[:limit], "big")
    return limit - (difference.bit_length() + 7) // 8


def node_cid(block: bytes) -> bytes:
    """Return the binary CID of a DAG-CBOR block hashed with SHA-256."""
    return NODE_CID_PREFIX + hashlib.sha256(block).digest()


def cid_to_str(cid: bytes) -> str:
    """Return the base32 text form of a binary CID, for messages."""
    try:
        return libipld.encode_cid(cid)
    except ValueError:
        return cid.hex()


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of a node, its record CID, and the subtree of keys between it and the next entry."""

    key: bytes
    value: bytes
    right: Subtree


@dataclass(slots=True)
class Node:
    """One MST node at ``layer``. Never changed after creation, so its CID can be cached.

    ``cid`` is the CID the node was loaded from, or None until ``Mst`` encodes it.
    """

    layer: int
    left: Subtree
    entries: tuple[Entry, ...]
    cid: bytes | None = field(default=None, compare=False)

    def gap(self, index: int) -> Subtree:
        """Return the subtree before entry ``index`` (``left`` for 0, else the previous entry's right)."""
        return self.left if index == 0 else self.entries[index - 1].right

    def with_gap(self, index: int, subtree: Subtree) -> Node:
        """Return a copy whose gap ``index`` points at ``subtree``."""
        if index == 0:
            return Node(self.layer, subtree, self.entries)
        entries = list(self.entries)
        previous = entries[index - 1]
        entries[index - 1] = Entry(previous.key, previous.value, subtree)
        return Node(self.layer, self.left, tuple(entries))

    def keys(self) -> list[bytes]:
        return [entry.key for entry in self.entries]


# A pointer to a subtree: a node in memory, the CID of a node not loaded yet, or None when empty.
Subtree = Node | bytes | None


def _nonempty(node: Node) -> Node | None:
    """Return None for a node with neither entries nor a left subtree, which must not exist."""
    if not node.entries and node.left is None:
        return None
    return node


def _wrap(subtree: Subtree, layer: int, target_layer: int) -> Subtree:
    """Put ``subtree`` (at ``layer``) under entry-less inner nodes up to ``target_layer``."""
    if subtree is None:
        return None
    while layer < target_layer:
        layer += 1
        subtree = Node(layer, subtree, ())
    return subtree


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


def _encode_link(cid: bytes | None) -> bytes:
    """Encode a CID link (tag 42 over 0x00 + binary CID), or CBOR null for None."""
    if cid is None:
        return b"\xf6"
    return b"\xd8\x2a" + _encode_head(2, len(cid) + 1) + b"\x00" + cid


def encode_node(left: bytes | None, entries: list[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """Encode one MST node as DAG-CBOR from its left CID and ``(key, value cid, right cid)`` entries.

    Keys are prefix-compressed against the previous key of the same node. This is written by hand
    rather than with ``libipld.encode_dag_cbor`` because libipld 3.5 encodes any byte string that
    parses as a CID as a link, and key suffixes are byte strings.
    """
    parts = [b"\xa2", b"\x61e", _encode_head(4, len(entries))]
    previous_key = b""
    for key, value, right in entries:
        prefix = common_prefix_length(previous_key, key)
        suffix = key[prefix:]
        # Map keys in DAG-CBOR order: k, p, t, v.
        parts.append(b"\xa4\x61k")
        parts.append(_encode_head(2, len(suffix)) + suffix)
        parts.append(b"\x61p" + _encode_head(0, prefix))
        parts.append(b"\x61t" + _encode_link(right))
        parts.append(b"\x61v" + _encode_link(value))
        previous_key = key
    parts.append(b"\x61l" + _encode_link(left))
    return b"".join(parts)


def _decode_entries(cid: bytes, raw_entries: object) -> list[tuple[bytes, bytes, bytes | None]]:
    """Expand the prefix-compressed entries of the node block ``cid`` into full keys."""
    if not isinstance(raw_entries, list):
        raise InvalidNodeError(f"MST node {cid_to_str(cid)}: 'e' is not a list")
    entries = []
    previous_key = b""
    for raw in raw_entries:
        if not isinstance(raw, dict) or set(raw) != {"k", "p", "t", "v"}:
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: entry must have exactly k, p, t, v: {raw!r}")
        prefix, suffix, value, right = raw["p"], raw["k"], raw["v"], raw["t"]
        if not isinstance(prefix, int) or not isinstance(suffix, bytes) or not isinstance(value, bytes):
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: entry has wrongly typed p, k or v: {raw!r}")
        if right is not None and not isinstance(right, bytes):
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: entry 't' is not a link: {right!r}")
        if not 0 <= prefix <= len(previous_key):
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: prefix length {prefix} exceeds previous key")
        key = previous_key[:prefix] + suffix
        # A non-maximal prefix would re-encode to another CID, so the tree would not be canonical.
        if entries and (key <= previous_key or common_prefix_length(previous_key, key) != prefix):
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: keys out of order or prefix not maximal at {key!r}")
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: key length {len(key)} outside 1..{MAX_KEY_LENGTH}")
        entries.append((key, value, right))
        previous_key = key
    return entries


class Mst:
    """An MST over a block mapping, loaded lazily and edited in memory.

    Edits replace the nodes on the path they touch with new in-memory nodes; untouched subtrees
    stay as CIDs. ``blocks`` is only read. Every loaded block is checked to hash to its CID and to
    follow the structure rules (key order, layers, maximal prefixes), so an edit on a tampered
    tree fails with ``InvalidNodeError`` instead of producing a meaningless root.
    """

    def __init__(self, blocks: Mapping[bytes, bytes] | None = None) -> None:
        """Create an empty tree reading nodes from ``blocks`` (cid bytes -> raw block bytes)."""
        self._blocks: Mapping[bytes, bytes] = blocks if blocks is not None else {}
        self._root: Subtree = None
        self._root_layer = 0

    @classmethod
    def load(cls, root_cid: bytes, blocks: Mapping[bytes, bytes]) -> Mst:
        """Return the tree whose root node is ``root_cid``; raises MstError if the root is unusable."""
        tree = cls(blocks)
        root = tree._load_node(root_cid, layer=None)
        if not root.entries and root.left is not None:
            raise InvalidNodeError(
                f"MST root {cid_to_str(root_cid)} has no entries but a left subtree; a root is always trimmed"
            )
        if root.entries:
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

    def _load_node(self, cid: bytes, layer: int | None) -> Node:
        """Decode and check the node block ``cid``; ``layer`` None means it is the root."""
        block = self._blocks.get(cid)
        if block is None:
            raise MissingBlockError(cid)
        if not cid.startswith(NODE_CID_PREFIX) or node_cid(block) != cid:
            raise InvalidNodeError(f"MST node block does not hash to its CID {cid_to_str(cid)}")
        try:
            raw = libipld.decode_dag_cbor(block)
        except (ValueError, RecursionError) as error:
            raise InvalidNodeError(f"MST node {cid_to_str(cid)} is not valid DAG-CBOR: {error}") from error
        if not isinstance(raw, dict) or set(raw) != {"e", "l"}:
            raise InvalidNodeError(f"MST node {cid_to_str(cid)} must be a map of exactly 'e' and 'l'")
        left = raw["l"]
        if left is not None and not isinstance(left, bytes):
            raise InvalidNodeError(f"MST node {cid_to_str(cid)}: 'l' is not a link: {left!r}")
        entries = _decode_entries(cid, raw["e"])
        if layer is None:
            layer = key_height(entries[0][0]) if entries else 0
        for key, _, right in entries:
            if key_height(key) != layer:
                raise InvalidNodeError(f"MST node {cid_to_str(cid)}: key {key!r} does not belong on layer {layer}")
            if layer == 0 and right is not None:
                raise InvalidNodeError(f"MST node {cid_to_str(cid)} on layer 0 has a subtree")
        if layer == 0 and left is not None:
            raise InvalidNodeError(f"MST node {cid_to_str(cid)} on layer 0 has a left subtree")
        node_entries = tuple(Entry(key, value, right) for key, value, right in entries)
        return Node(layer, left, node_entries, cid)

    def _resolve(self, subtree: Subtree, layer: int) -> Node | None:
        """Return the node that ``subtree`` points at, loading it when it is only a CID."""
        if subtree is None or isinstance(subtree, Node):
            return subtree
        if layer < 0:
            raise InvalidNodeError(f"MST node on layer 0 points below it, at {cid_to_str(subtree)}")
        return self._load_node(subtree, layer)

    def get(self, key: bytes) -> bytes | None:
        """Return the record CID stored at ``key``, or None when the key is absent."""
        node = self._resolve(self._root, self._root_layer)
        while node is not None:
            keys = node.keys()
            index = bisect_left(keys, key)
            if index < len(keys) and keys[index] == key:
                return node.entries[index].value
            node = self._resolve(node.gap(index), node.layer - 1)
        return None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield every ``(key, record cid)`` in key order; needs every node's block."""
        yield from self._walk(self._root, self._root_layer)

    def _walk(self, subtree: Subtree, layer: int) -> Iterator[tuple[bytes, bytes]]:
        node = self._resolve(subtree, layer)
        if node is None:
            return
        yield from self._walk(node.left, layer - 1)
        for entry in node.entries:
            yield entry.key, entry.value
            yield from self._walk(entry.right, layer - 1)

    # Editing.

    def insert(self, key: bytes, value: bytes) -> None:
        """Add ``key`` with record CID ``value``; raises KeyStateError if the key exists."""
        height = key_height(key)
        root = self._resolve(self._root, self._root_layer)
        if root is None:
            self._root = Node(height, None, (Entry(key, value, None),))
            self._root_layer = height
        elif height > root.layer:
            # The new key becomes the only entry of a new, higher root, splitting the old tree.
            below, above = self._split(root, root.layer, key)
            below = _wrap(below, root.layer, height - 1)
            above = _wrap(above, root.layer, height - 1)
            self._root = Node(height, below, (Entry(key, value, above),))
            self._root_layer = height
        else:
            self._root = self._insert(root, key, value, height)

    def _insert(self, node: Node, key: bytes, value: bytes, height: int) -> Node:
        keys = node.keys()
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            raise KeyStateError(f"cannot insert {key!r}: the key is already in the MST")
        if height == node.layer:
            below, above = self._split(node.gap(index), node.layer - 1, key)
            entries = list(node.entries)
            entries.insert(index, Entry(key, value, above))
            return Node(node.layer, node.left, tuple(entries)).with_gap(index, below)
        child = self._resolve(node.gap(index), node.layer - 1)
        if child is None:
            leaf = Node(height, None, (Entry(key, value, None),))
            return node.with_gap(index, _wrap(leaf, height, node.layer - 1))
        return node.with_gap(index, self._insert(child, key, value, height))

    def _split(self, subtree: Subtree, layer: int, key: bytes) -> tuple[Subtree, Subtree]:
        """Split ``subtree`` (at ``layer``) into the parts holding keys below and above ``key``."""
        node = self._resolve(subtree, layer)
        if node is None:
            return None, None
        keys = node.keys()
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            raise KeyStateError(f"cannot insert {key!r}: the key is already in the MST")
        gap_below, gap_above = self._split(node.gap(index), layer - 1, key)
        below = Node(layer, node.left, node.entries[:index]).with_gap(index, gap_below)
        above = Node(layer, gap_above, node.entries[index:])
        return _nonempty(below), _nonempty(above)

    def update(self, key: bytes, value: bytes) -> bytes:
        """Point ``key`` at record CID ``value``; return the CID it had. Raises KeyStateError if absent."""
        root = self._resolve(self._root, self._root_layer)
        if root is None:
            raise KeyStateError(f"cannot update {key!r}: the MST is empty")
        self._root, previous = self._update(root, key, value)
        return previous

    def _update(self, node: Node, key: bytes, value: bytes) -> tuple[Node, bytes]:
        keys = node.keys()
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            entries = list(node.entries)
            previous = entries[index]
            entries[index] = Entry(key, value, previous.right)
            return Node(node.layer, node.left, tuple(entries)), previous.value
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
        while new_root is not None and not new_root.entries:
            layer -= 1
            new_root = self._resolve(new_root.left, layer)
        self._root = new_root
        self._root_layer = new_root.layer if new_root is not None else 0
        return previous

    def _delete(self, node: Node, key: bytes) -> tuple[Node | None, bytes]:
        keys = node.keys()
        index = bisect_left(keys, key)
        if index < len(keys) and keys[index] == key:
            removed = node.entries[index]
            merged = self._merge(node.gap(index), removed.right, node.layer - 1)
            entries = node.entries[:index] + node.entries[index + 1 :]
            return _nonempty(Node(node.layer, node.left, entries).with_gap(index, merged)), removed.value
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
        assert low is not None and high is not None
        seam = self._merge(low.gap(len(low.entries)), high.left, layer - 1)
        joined = Node(layer, low.left, low.entries + high.entries)
        return joined.with_gap(len(low.entries), seam)

    # Encoding.

    def root_cid(self) -> bytes:
        """Return the CID of the root node (of an empty node when the tree is empty)."""
        if self._root is None:
            return node_cid(encode_node(None, []))
        return self._subtree_cid(self._root, None)

    def encoded_blocks(self) -> dict[bytes, bytes]:
        """Return ``cid -> block bytes`` for every node held in memory (loaded or new)."""
        blocks: dict[bytes, bytes] = {}
        if self._root is None:
            empty = encode_node(None, [])
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
        if subtree.cid is not None and sink is None:
            return subtree.cid
        left = self._subtree_cid(subtree.left, sink)
        entries = [(entry.key, entry.value, self._subtree_cid(entry.right, sink)) for entry in subtree.entries]
        block = encode_node(left, entries)
        subtree.cid = node_cid(block)
        if sink is not None:
            sink[subtree.cid] = block
        return subtree.cid
