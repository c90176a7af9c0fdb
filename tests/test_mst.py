"""MST heights, node encoding and edits, checked against the interop vectors and real repo exports."""

from __future__ import annotations

import base64
import json
import random
import tarfile
from itertools import permutations

import libipld
import pytest
from fixture_data import fixture_path
from plain_car import car_blocks

from indexer.mst import (
    InvalidNodeError,
    KeyStateError,
    MissingBlockError,
    Mst,
    common_prefix_length,
    encode_node,
    key_height,
    node_cid,
)

JETSTREAM_REPO = "repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd"


def cid_bytes(text: str) -> bytes:
    body = text.removeprefix("b").upper()
    return base64.b32decode(body + "=" * (-len(body) % 8))


def proof_fixtures() -> list[dict]:
    return json.loads(fixture_path("interop-tests/firehose/commit-proof-fixtures.json").read_text())


def test_key_heights_match_vectors():
    cases = json.loads(fixture_path("interop-tests/mst/key_heights.json").read_text())
    for case in cases:
        assert key_height(case["key"].encode()) == case["height"], case["key"]


def test_example_keys_have_named_heights():
    # Each example key names its height in its second character ("C2/..." sits on layer 2).
    keys = fixture_path("interop-tests/mst/example_keys.txt").read_text().split()
    assert len(keys) == 156
    for key in keys:
        assert key_height(key.encode()) == int(key[1]), key


def test_common_prefix_matches_vectors():
    cases = json.loads(fixture_path("interop-tests/mst/common_prefix.json").read_text())
    for case in cases:
        length = common_prefix_length(case["left"].encode(), case["right"].encode())
        assert length == case["len"], (case["left"], case["right"])


def test_node_encoding_matches_libipld():
    value = cid_bytes(proof_fixtures()[0]["leafValue"])
    entries = [(b"app.bsky.feed.like/3k", value, None), (b"app.bsky.feed.post/3j", value, value)]
    expected = libipld.encode_dag_cbor(
        {
            "l": value,
            "e": [
                {"p": 0, "k": b"app.bsky.feed.like/3k", "v": value, "t": None},
                {"p": 14, "k": b"post/3j", "v": value, "t": value},
            ],
        }
    )
    assert encode_node(value, entries) == expected


def test_empty_tree_matches_real_empty_repo():
    root, blocks = car_blocks(fixture_path("repos/repostream_empty.car").read_bytes())
    commit = libipld.decode_dag_cbor(blocks[root])
    assert Mst().root_cid() == commit["data"]
    assert list(Mst.load(commit["data"], blocks).items()) == []


def test_proof_fixture_roots_rebuild():
    for fixture in proof_fixtures():
        leaf = cid_bytes(fixture["leafValue"])
        tree = Mst.from_items({key.encode(): leaf for key in fixture["keys"]})
        assert tree.root_cid() == cid_bytes(fixture["rootBeforeCommit"]), fixture["comment"]
        for key in fixture["adds"]:
            tree.insert(key.encode(), leaf)
        for key in fixture["dels"]:
            tree.delete(key.encode())
        assert tree.root_cid() == cid_bytes(fixture["rootAfterCommit"]), fixture["comment"]


def test_proof_blocks_invert_in_any_order():
    for fixture in proof_fixtures():
        leaf = cid_bytes(fixture["leafValue"])
        after = set(fixture["keys"]) | set(fixture["adds"])
        after -= set(fixture["dels"])
        full_tree = Mst.from_items({key.encode(): leaf for key in sorted(after)})
        every_block = full_tree.encoded_blocks()
        proof = {cid_bytes(cid): every_block[cid_bytes(cid)] for cid in fixture["blocksInProof"]}
        inverse_ops = [("delete", key) for key in fixture["adds"]] + [("insert", key) for key in fixture["dels"]]
        for order in permutations(inverse_ops):
            partial = Mst.load(full_tree.root_cid(), proof)
            for action, key in order:
                if action == "delete":
                    partial.delete(key.encode())
                else:
                    partial.insert(key.encode(), leaf)
            assert partial.root_cid() == cid_bytes(fixture["rootBeforeCommit"]), (fixture["comment"], order)


def test_real_repo_lists_expected_records():
    root, blocks = car_blocks(fixture_path(f"{JETSTREAM_REPO}.repo.car").read_bytes())
    commit = libipld.decode_dag_cbor(blocks[root])
    expected = [line.split("\t") for line in fixture_path(f"{JETSTREAM_REPO}.expected_records.tsv").read_text().splitlines()]
    items = list(Mst.load(commit["data"], blocks).items())
    assert [key.decode() for key, _ in items] == [path for path, _ in expected]
    assert [libipld.encode_cid(value) for _, value in items] == [cid for _, cid in expected]


@pytest.mark.parametrize("car", [f"{JETSTREAM_REPO}.repo.car", "repos/repostream_little.car", "repos/rsky_valid_repo.car"])
def test_real_repo_rebuilds_same_root(car):
    root, blocks = car_blocks(fixture_path(car).read_bytes())
    data = libipld.decode_dag_cbor(blocks[root])["data"]
    items = dict(Mst.load(data, blocks).items())
    assert len(items) > 0
    assert Mst.from_items(items).root_cid() == data


def test_deleting_every_key_empties_tree():
    root, blocks = car_blocks(fixture_path("repos/rsky_valid_repo.car").read_bytes())
    data = libipld.decode_dag_cbor(blocks[root])["data"]
    tree = Mst.load(data, blocks)
    for key, _ in list(tree.items()):
        tree.delete(key)
    assert tree.root_cid() == Mst().root_cid()


def test_update_changes_value_only():
    root, blocks = car_blocks(fixture_path("repos/rsky_valid_repo.car").read_bytes())
    data = libipld.decode_dag_cbor(blocks[root])["data"]
    tree = Mst.load(data, blocks)
    key, old_value = next(tree.items())
    new_value = node_cid(b"another record")
    assert tree.update(key, new_value) == old_value
    assert tree.get(key) == new_value
    assert tree.update(key, old_value) == new_value
    assert tree.root_cid() == data


def test_existing_key_insert_is_rejected():
    root, blocks = car_blocks(fixture_path("repos/rsky_valid_repo.car").read_bytes())
    tree = Mst.load(libipld.decode_dag_cbor(blocks[root])["data"], blocks)
    key, value = next(tree.items())
    with pytest.raises(KeyStateError, match="already in the MST"):
        tree.insert(key, value)


def test_absent_key_delete_is_rejected():
    root, blocks = car_blocks(fixture_path("repos/rsky_valid_repo.car").read_bytes())
    tree = Mst.load(libipld.decode_dag_cbor(blocks[root])["data"], blocks)
    with pytest.raises(KeyStateError, match="not in the MST"):
        tree.delete(b"app.bsky.feed.post/zzzzzzzzzzzzz")


def test_missing_node_block_is_reported():
    root, blocks = car_blocks(fixture_path(f"{JETSTREAM_REPO}.repo.car").read_bytes())
    data = libipld.decode_dag_cbor(blocks[root])["data"]
    partial = {cid: block for cid, block in blocks.items() if cid == data}
    tree = Mst.load(data, partial)
    with pytest.raises(MissingBlockError) as raised:
        list(tree.items())
    assert raised.value.cid in blocks


def test_flipped_node_byte_is_invalid():
    root, blocks = car_blocks(fixture_path(f"{JETSTREAM_REPO}.repo.car").read_bytes())
    data = libipld.decode_dag_cbor(blocks[root])["data"]
    tampered = bytearray(blocks[data])
    tampered[-5] ^= 0x01
    with pytest.raises(InvalidNodeError, match="does not hash to its CID"):
        Mst.load(data, {**blocks, data: bytes(tampered)})


def test_node_on_wrong_layer_is_invalid():
    fixture = proof_fixtures()[0]
    leaf = cid_bytes(fixture["leafValue"])
    # "A0/374913" has height 0, so a node holding it cannot have a subtree below it.
    block = encode_node(None, [(b"A0/374913", leaf, leaf)])
    with pytest.raises(InvalidNodeError, match="layer 0 has a subtree"):
        Mst.load(node_cid(block), {node_cid(block): block})


def test_empty_inner_node_is_invalid():
    fixture = proof_fixtures()[0]
    leaf = cid_bytes(fixture["leafValue"])
    # An empty subtree is written as null, so a node with no entries and no left link cannot sit below the root.
    empty = encode_node(None, [])
    root = encode_node(node_cid(empty), [(b"A1/076595", leaf, None)])
    blocks = {node_cid(empty): empty, node_cid(root): root}
    tree = Mst.load(node_cid(root), blocks)
    with pytest.raises(InvalidNodeError, match="below the root is empty"):
        list(tree.items())


def suite_diff_cases(stride: int) -> list[dict]:
    """Return every ``stride``-th mst-diff case of mst-test-suite, in archive order."""
    cases = []
    # Read in one pass: seeking back in a gzip stream would decompress it again from the start.
    with tarfile.open(fixture_path("mst-test-suite/tests-diff.tar.gz"), mode="r|gz") as archive:
        index = 0
        for member in archive:
            if not member.name.endswith(".json"):
                continue
            if index % stride == 0:
                cases.append(json.load(archive.extractfile(member)))
            index += 1
    return cases


def test_suite_inductive_proofs_invert():
    # The suite's inductive proof is the set of nodes that undoing b's ops, in reverse order, needs.
    cars: dict[str, tuple[bytes, dict[bytes, bytes]]] = {}
    checked = 0
    for case in suite_diff_cases(stride=5):
        for name in ("mst_a", "mst_b"):
            path = case["inputs"][name]
            if path not in cars:
                cars[path] = car_blocks(fixture_path(f"mst-test-suite/{path.removeprefix('./')}").read_bytes())
        root_before, _ = cars[case["inputs"]["mst_a"]]
        root_after, blocks_after = cars[case["inputs"]["mst_b"]]
        ops = case["results"]["record_ops"]
        if not ops:
            continue
        proof = {cid_bytes(cid): blocks_after[cid_bytes(cid)] for cid in case["results"]["inductive_proof_nodes"]}
        tree = Mst.load(root_after, proof)
        for op in reversed(ops):
            key = op["rpath"].encode()
            if op["old_value"] is None:
                tree.delete(key)
            elif op["new_value"] is None:
                tree.insert(key, cid_bytes(op["old_value"]))
            else:
                tree.update(key, cid_bytes(op["old_value"]))
        assert tree.root_cid() == root_before, case["description"]
        checked += 1
    assert checked > 3000


def random_keys(rng: random.Random, count: int) -> list[bytes]:
    """Return distinct keys from a small alphabet, so that many share long prefixes or extend each other."""
    keys: set[bytes] = set()
    while len(keys) < count:
        collection = rng.choice((b"app.bsky.feed.like", b"app.bsky.feed.post", b"app.bsky.graph.follow"))
        rkey = bytes(rng.choice(b"23abz") for _ in range(rng.randint(1, 6)))
        keys.add(collection + b"/" + rkey)
    return sorted(keys)


@pytest.mark.parametrize("seed", range(12))
def test_random_edits_keep_canonical_nodes(seed):
    # Edited nodes reuse the shared prefix lengths of the nodes they come from. Loading the edited
    # tree's blocks checks that every prefix is the maximal one, and the root must match a rebuild.
    rng = random.Random(seed)
    keys = random_keys(rng, 300)
    items = {key: node_cid(key) for key in keys[:200]}
    original = Mst.from_items(items)
    blocks = original.encoded_blocks()
    tree = Mst.load(original.root_cid(), blocks)
    for key in rng.sample(keys, 120):
        action = rng.random()
        if key in items and action < 0.6:
            assert tree.delete(key) == items.pop(key)
        elif key in items:
            items[key] = node_cid(key + b"#updated")
            tree.update(key, items[key])
        else:
            items[key] = node_cid(key)
            tree.insert(key, items[key])
    root = tree.root_cid()
    # Untouched subtrees stay as CIDs, so their blocks come from the original tree.
    reloaded = Mst.load(root, {**blocks, **tree.encoded_blocks()})
    assert dict(reloaded.items()) == items
    assert Mst.from_items(items).root_cid() == root


@pytest.mark.parametrize("seed", range(6))
def test_edited_node_blocks_match_encode_node(seed):
    rng = random.Random(seed)
    keys = random_keys(rng, 120)
    tree = Mst.from_items({key: node_cid(key) for key in keys[:80]})
    for key in rng.sample(keys, 40):
        if tree.get(key) is None:
            tree.insert(key, node_cid(key))
        else:
            tree.delete(key)
    for cid, block in tree.encoded_blocks().items():
        node = libipld.decode_dag_cbor(block)
        entries = []
        previous = b""
        for entry in node["e"]:
            previous = previous[: entry["p"]] + entry["k"]
            entries.append((previous, entry["v"], entry["t"]))
        assert encode_node(node["l"], entries) == block
        assert node_cid(block) == cid
