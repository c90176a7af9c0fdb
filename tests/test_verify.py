"""Commit signatures, Sync 1.1 commit proofs and label signatures, on real recorded data."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import libipld
from fixture_data import INDIGO_SCENARIOS, JETSTREAM_CORPUS, commit_bodies, fixture_path, read_length_prefixed
from plain_car import car_blocks

from indexer.crypto import VerifyFailure, parse_did_key, parse_multikey, signing_key
from indexer.events import Label, RecordOp
from indexer.verify import verify_commit, verify_commit_blocks, verify_commit_proof, verify_label, verify_record_blocks


def decode_base64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def jetstream_commits() -> list[dict[str, Any]]:
    """Return the decoded ``#commit`` bodies of the recorded relay frames."""
    return commit_bodies(read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin")))


def jetstream_keys() -> dict[str, Any]:
    documents = json.loads(fixture_path(f"{JETSTREAM_CORPUS}/did_docs.json").read_text())
    return {did: signing_key(document, "atproto") for did, document in documents.items()}


def first_multi_op_commit() -> dict[str, Any]:
    return next(body for body in jetstream_commits() if len(body["ops"]) > 1)


def first_commit_with(action: str) -> dict[str, Any]:
    return next(body for body in jetstream_commits() if body["ops"][0]["action"] == action)


def flip_byte(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


def check_commit(body: dict[str, Any], key: Any, blocks: dict[bytes, bytes] | None = None):
    blocks = car_blocks(body["blocks"])[1] if blocks is None else blocks
    return verify_commit_blocks(
        blocks, body["commit"], key, body["repo"], body["rev"], body["ops"], body.get("prevData")
    )


# Repo commits from the relay recording.


def test_recorded_commit_signatures_verify():
    commits = jetstream_commits()
    keys = jetstream_keys()
    assert len(commits) == 110
    for body in commits:
        result = check_commit(body, keys[body["repo"]])
        assert result.signature.verified is True, (body["seq"], result.signature)


def test_recorded_commit_proofs_verify():
    commits = jetstream_commits()
    keys = jetstream_keys()
    for body in commits:
        result = check_commit(body, keys[body["repo"]])
        assert result.proof.verified is True, (body["seq"], result.proof)


def test_recorded_record_blocks_verify():
    keys = jetstream_keys()
    for body in jetstream_commits():
        result = check_commit(body, keys[body["repo"]])
        assert result.records.verified is True, (body["seq"], result.records)


def test_record_ops_as_event_types_prove():
    # The decoder hands over RecordOp values with base32 text CIDs; those must prove the same way.
    for body in jetstream_commits()[:20]:
        ops = []
        for op in body["ops"]:
            collection, rkey = op["path"].split("/")
            cid = libipld.encode_cid(op["cid"]) if op["cid"] else None
            prev = libipld.encode_cid(op["prev"]) if op.get("prev") else None
            ops.append(RecordOp(op["action"], collection, rkey, cid, prev))
        commit = libipld.decode_dag_cbor(car_blocks(body["blocks"])[1][body["commit"]])
        data = libipld.encode_cid(commit["data"])
        prev_data = libipld.encode_cid(body["prevData"])
        result = verify_commit_proof(car_blocks(body["blocks"])[1], data, ops, prev_data)
        assert result.verified is True, (body["seq"], result)


def test_flipped_signature_byte_mismatches():
    body = jetstream_commits()[0]
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    commit["sig"] = flip_byte(commit["sig"], 5)
    key = jetstream_keys()[body["repo"]]
    result = verify_commit(libipld.encode_dag_cbor(commit), key, body["repo"], body["rev"])
    assert result.verified is False
    assert result.reason is VerifyFailure.SIGNATURE_MISMATCH


def test_high_s_commit_signature_is_rejected():
    # Negating s (s -> n - s) keeps the ECDSA signature valid but makes it high-S.
    secp256k1_order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    body = jetstream_commits()[0]
    commit = libipld.decode_dag_cbor(car_blocks(body["blocks"])[1][body["commit"]])
    key = jetstream_keys()[body["repo"]]
    assert key.algorithm == "ES256K"
    s = int.from_bytes(commit["sig"][32:], "big")
    commit["sig"] = commit["sig"][:32] + (secp256k1_order - s).to_bytes(32, "big")
    result = verify_commit(libipld.encode_dag_cbor(commit), key, body["repo"], body["rev"])
    assert result.reason is VerifyFailure.HIGH_S


def test_swapped_key_mismatches():
    commits = jetstream_commits()
    keys = jetstream_keys()
    body, other = commits[0], next(c for c in commits if c["repo"] != commits[0]["repo"])
    result = check_commit(body, keys[other["repo"]])
    assert result.signature.verified is False
    assert result.signature.reason is VerifyFailure.SIGNATURE_MISMATCH


def test_flipped_commit_block_is_invalid():
    body = jetstream_commits()[0]
    blocks = car_blocks(body["blocks"])[1]
    blocks[body["commit"]] = flip_byte(blocks[body["commit"]], 20)
    result = check_commit(body, jetstream_keys()[body["repo"]], blocks)
    assert result.signature.reason is VerifyFailure.INVALID_COMMIT
    assert result.proof.reason is VerifyFailure.INVALID_COMMIT


def test_flipped_record_block_mismatches():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    record_cid = body["ops"][0]["cid"]
    blocks[record_cid] = flip_byte(blocks[record_cid], 10)
    result = check_commit(body, jetstream_keys()[body["repo"]], blocks)
    assert result.records.verified is False
    assert result.records.reason is VerifyFailure.RECORD_MISMATCH
    assert result.signature.verified is True


def test_missing_record_block_is_reported():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    del blocks[body["ops"][0]["cid"]]
    assert verify_record_blocks(blocks, body["ops"]).reason is VerifyFailure.MISSING_RECORD_BLOCK


def test_flipped_mst_block_is_invalid():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    blocks[commit["data"]] = flip_byte(blocks[commit["data"]], 10)
    result = verify_commit_proof(blocks, commit["data"], body["ops"], body["prevData"])
    assert result.verified is False
    assert result.reason is VerifyFailure.INVALID_MST


def test_missing_commit_block_is_reported():
    body = jetstream_commits()[0]
    blocks = car_blocks(body["blocks"])[1]
    del blocks[body["commit"]]
    result = check_commit(body, jetstream_keys()[body["repo"]], blocks)
    assert result.signature.reason is VerifyFailure.MISSING_COMMIT_BLOCK
    assert result.proof.reason is VerifyFailure.MISSING_COMMIT_BLOCK


def test_other_repo_did_mismatches():
    commits = jetstream_commits()
    body, other = commits[0], next(c for c in commits if c["repo"] != commits[0]["repo"])
    block = car_blocks(body["blocks"])[1][body["commit"]]
    result = verify_commit(block, jetstream_keys()[body["repo"]], other["repo"], body["rev"])
    assert result.verified is False
    assert result.reason is VerifyFailure.DID_MISMATCH


def test_other_rev_mismatches():
    body = jetstream_commits()[0]
    block = car_blocks(body["blocks"])[1][body["commit"]]
    result = verify_commit(block, jetstream_keys()[body["repo"]], body["repo"], body["since"])
    assert result.reason is VerifyFailure.REV_MISMATCH


def test_unknown_key_is_unchecked():
    body = jetstream_commits()[0]
    result = check_commit(body, None)
    assert result.signature.verified is None
    assert result.signature.reason is VerifyFailure.NO_KEY
    assert result.proof.verified is True


def test_unparseable_key_is_bad_key():
    body = jetstream_commits()[0]
    result = check_commit(body, "did:key:zNotAKey")
    assert result.signature.verified is False
    assert result.signature.reason is VerifyFailure.BAD_KEY


# Commit proofs with ops or prevData altered.


def test_dropped_op_fails_proof():
    body = first_multi_op_commit()
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    result = verify_commit_proof(blocks, commit["data"], body["ops"][1:], body["prevData"])
    assert result.verified is False
    assert result.reason is VerifyFailure.PROOF_MISMATCH


def test_other_prev_data_fails_proof():
    body = jetstream_commits()[0]
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    result = verify_commit_proof(blocks, commit["data"], body["ops"], commit["data"])
    assert result.reason is VerifyFailure.PROOF_MISMATCH


def test_wrong_op_cid_mismatches_tree():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    ops = [dict(body["ops"][0], cid=body["prevData"])] + body["ops"][1:]
    result = verify_commit_proof(blocks, commit["data"], ops, body["prevData"])
    assert result.reason is VerifyFailure.OP_MISMATCH


def test_delete_of_present_key_mismatches():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    op = body["ops"][0]
    ops = [{"action": "delete", "path": op["path"], "cid": None, "prev": op["cid"]}]
    result = verify_commit_proof(blocks, commit["data"], ops, body["prevData"])
    assert result.reason is VerifyFailure.OP_MISMATCH


def test_delete_without_prev_is_invalid():
    body = first_commit_with("delete")
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    ops = [{key: value for key, value in op.items() if key != "prev"} for op in body["ops"]]
    result = verify_commit_proof(blocks, commit["data"], ops, body["prevData"])
    assert result.reason is VerifyFailure.INVALID_OP


def test_duplicate_op_path_is_invalid():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    result = verify_commit_proof(blocks, commit["data"], body["ops"] * 2, body["prevData"])
    assert result.reason is VerifyFailure.INVALID_OP


# Compiled verify code once raised TypeError here: a wrongly typed value from a decoded map must
# fail the check with a reason, as it does interpreted.
def proof_parts(action: str) -> tuple[dict[str, Any], dict[bytes, bytes], bytes]:
    """Return the first recorded commit with an op of ``action``, its blocks and its MST root."""
    body = first_commit_with(action)
    blocks = car_blocks(body["blocks"])[1]
    return body, blocks, libipld.decode_dag_cbor(blocks[body["commit"]])["data"]


def test_op_map_with_integer_cid_is_invalid():
    body, blocks, data = proof_parts("create")
    ops = [dict(body["ops"][0], cid=5)] + body["ops"][1:]
    result = verify_commit_proof(blocks, data, ops, body["prevData"])
    assert result.reason is VerifyFailure.INVALID_OP


def test_integer_prev_data_is_invalid():
    body, blocks, data = proof_parts("create")
    result = verify_commit_proof(blocks, data, body["ops"], 7)
    assert result.reason is VerifyFailure.INVALID_OP


def test_record_blocks_integer_cid_invalid():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    ops = [dict(body["ops"][0], cid=5)]
    result = verify_record_blocks(blocks, ops)
    assert result.reason is VerifyFailure.INVALID_OP


def test_removed_mst_block_is_reported():
    body = first_commit_with("create")
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    del blocks[commit["data"]]
    result = verify_commit_proof(blocks, commit["data"], body["ops"], body["prevData"])
    assert result.reason is VerifyFailure.MISSING_MST_BLOCK


def test_missing_prev_data_is_unchecked():
    body = jetstream_commits()[0]
    blocks = car_blocks(body["blocks"])[1]
    commit = libipld.decode_dag_cbor(blocks[body["commit"]])
    result = verify_commit_proof(blocks, commit["data"], body["ops"], None)
    assert result.verified is None
    assert result.reason is VerifyFailure.NO_PREV_DATA


# Commits from the indigo relay scenarios (atproto JSON).


def json_link(value: Any) -> Any:
    return value["$link"] if isinstance(value, dict) else value


def scenario_commits() -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """Return ``(file name, message, body, account key)`` for every #commit and #sync frame."""
    folder = fixture_path(INDIGO_SCENARIOS)
    frames = []
    for path in sorted(folder.glob("*.json")):
        scenario = json.loads(path.read_text())
        keys = {
            account["identity"]["did"]: account["identity"]["keys"]["atproto"]["publicKeyMultibase"]
            for account in scenario["accounts"]
        }
        for message in scenario["messages"]:
            header, body = message["frame"]["header"], message["frame"]["body"]
            if header["t"] in ("#commit", "#sync"):
                did = body.get("repo") or body["did"]
                frames.append((path.name, message, body, keys[did]))
    return frames


def scenario_commit_block(body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    car = decode_base64(body["blocks"]["$bytes"])
    header, _ = libipld.decode_car(car)
    _root, blocks = car_blocks(car)
    return blocks[header["roots"][0]], blocks


def test_scenario_signatures_verify():
    frames = scenario_commits()
    assert len(frames) == 26
    for name, _, body, key in frames:
        block, _ = scenario_commit_block(body)
        did = body.get("repo") or body["did"]
        result = verify_commit(block, parse_multikey(key), did, None)
        assert result.verified is True, (name, body["seq"], result)


def test_scenario_edited_revs_mismatch():
    # In rev_ordering.json the maintainers changed the frame's rev on two frames the relay drops,
    # leaving the signed commit unchanged.
    mismatched = []
    for name, message, body, key in scenario_commits():
        block, _ = scenario_commit_block(body)
        did = body.get("repo") or body["did"]
        result = verify_commit(block, key, did, body["rev"])
        if result.verified is not True:
            mismatched.append((name, message.get("drop"), result.reason))
    assert mismatched == [("rev_ordering.json", True, VerifyFailure.REV_MISMATCH)] * 2


def test_scenario_proofs_verify_or_are_unchecked():
    outcomes = set()
    for name, _, body, _ in scenario_commits():
        if "ops" not in body:
            continue
        block, blocks = scenario_commit_block(body)
        commit = libipld.decode_dag_cbor(block)
        ops = [dict(op, cid=json_link(op.get("cid")), prev=json_link(op.get("prev"))) for op in body["ops"]]
        prev_data = json_link(body.get("prevData"))
        result = verify_commit_proof(blocks, commit["data"], ops, prev_data)
        expected = VerifyFailure.NO_PREV_DATA if prev_data is None else None
        assert result.reason is expected, (name, body["seq"], result)
        outcomes.add(result.verified)
    assert outcomes == {True, None}


# Labels.


def signed_labels() -> list[dict[str, Any]]:
    """Return the real signed labels with ``sig`` as bytes, as a DAG-CBOR decoder yields them."""
    entries = json.loads(fixture_path("labels/signed_labels.json").read_text())["labels"]
    for entry in entries:
        entry["label"]["sig"] = decode_base64(entry["label"]["sig"]["$bytes"])
    return entries


def test_real_labels_verify():
    entries = signed_labels()
    assert len(entries) == 3
    for entry in entries:
        result = verify_label(entry["label"], entry["signingKey"])
        assert result.verified is True, entry["source"]


def test_label_signing_bytes_match_reference():
    for entry in signed_labels():
        if "signingBytesHex" not in entry:
            continue
        unsigned = {name: value for name, value in entry["label"].items() if name != "sig"}
        assert libipld.encode_dag_cbor(unsigned).hex() == entry["signingBytesHex"], entry["source"]


def test_labels_verify_as_event_type():
    for entry in signed_labels():
        label = Label(**entry["label"])
        result = verify_label(label, entry["signingKey"])
        assert result.verified is True, entry["source"]


def test_labeler_document_key_verifies_labels():
    data = json.loads(fixture_path("labels/signed_labels.json").read_text())
    document = data["labelerDidDocuments"]["did:plc:ar7c4by46qjdydhdevvrndac"]
    moderation = [entry for entry in signed_labels() if entry["label"]["src"] == "did:plc:ar7c4by46qjdydhdevvrndac"]
    assert len(moderation) == 2
    for entry in moderation:
        assert verify_label(entry["label"], signing_key(document, "atproto_label")).verified is True
        assert verify_label(entry["label"], signing_key(document, "atproto")).verified is False


def test_altered_label_value_mismatches():
    for entry in signed_labels():
        label = dict(entry["label"], val=entry["label"]["val"] + "x")
        result = verify_label(label, entry["signingKey"])
        assert result.verified is False, entry["source"]
        assert result.reason is VerifyFailure.SIGNATURE_MISMATCH, entry["source"]


def test_altered_label_signature_mismatches():
    for entry in signed_labels():
        label = dict(entry["label"], sig=flip_byte(entry["label"]["sig"], 5))
        result = verify_label(label, entry["signingKey"])
        assert result.reason is VerifyFailure.SIGNATURE_MISMATCH, entry["source"]


def test_swapped_label_key_mismatches():
    entries = signed_labels()
    indigo, moderation = entries[0], entries[1]
    assert indigo["signingKey"] != moderation["signingKey"]
    result = verify_label(indigo["label"], moderation["signingKey"])
    assert result.reason is VerifyFailure.SIGNATURE_MISMATCH


def test_negation_flag_is_signed():
    negation = signed_labels()[2]
    assert negation["label"]["neg"] is True
    label = Label(**negation["label"])
    result = verify_label(replace(label, neg=False), negation["signingKey"])
    assert result.reason is VerifyFailure.SIGNATURE_MISMATCH


def test_unsigned_label_is_reported():
    label = {name: value for name, value in signed_labels()[0]["label"].items() if name != "sig"}
    result = verify_label(label, signed_labels()[0]["signingKey"])
    assert result.verified is False
    assert result.reason is VerifyFailure.NO_SIGNATURE


def test_label_key_parses_as_did_key():
    for entry in signed_labels():
        assert parse_did_key(entry["signingKey"]).algorithm == "ES256K"


def test_label_integer_sig_bad_encoding():
    label = dict(signed_labels()[0]["label"], sig=12)
    result = verify_label(label, signed_labels()[0]["signingKey"])
    assert result.reason is VerifyFailure.BAD_SIGNATURE_ENCODING
