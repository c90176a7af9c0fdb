"""Key parsing and ECDSA signature checks against the atproto interop vectors and real DID documents."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fixture_data import JETSTREAM_CORPUS, fixture_path

from indexer.crypto import (
    InvalidKeyError,
    PublicKey,
    VerifyFailure,
    base58_decode,
    base58_encode,
    parse_did_key,
    parse_legacy_multibase,
    parse_multikey,
    resolve_key,
    signing_key,
)

CURVES = {"ES256K": ec.SECP256K1(), "ES256": ec.SECP256R1()}


def decode_base64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def signature_cases(tag: str | None) -> list[dict]:
    """Return the interop signature cases with ``tag``, or the valid ones when ``tag`` is None."""
    cases = json.loads(fixture_path("interop-tests/crypto/signature-fixtures.json").read_text())
    if tag is None:
        return [case for case in cases if case["validSignature"]]
    return [case for case in cases if tag in case["tags"]]


def both_key_forms(case: dict) -> list[PublicKey]:
    """Return the case's key parsed from its did:key and from its legacy publicKeyMultibase."""
    return [
        parse_did_key(case["publicKeyDid"]),
        parse_legacy_multibase(case["publicKeyMultibase"], case["algorithm"]),
    ]


def test_valid_interop_signatures_verify():
    cases = signature_cases(None)
    assert {case["algorithm"] for case in cases} == {"ES256", "ES256K"}
    for case in cases:
        for key in both_key_forms(case):
            result = key.verify(decode_base64(case["messageBase64"]), decode_base64(case["signatureBase64"]))
            assert result.verified is True, case["comment"]
            assert result.reason is None, case["comment"]


def test_high_s_signatures_are_rejected():
    cases = signature_cases("high-s")
    assert len(cases) == 2
    for case in cases:
        for key in both_key_forms(case):
            result = key.verify(decode_base64(case["messageBase64"]), decode_base64(case["signatureBase64"]))
            assert result.verified is False, case["comment"]
            assert result.reason is VerifyFailure.HIGH_S, case["comment"]


def test_der_signatures_are_rejected():
    cases = signature_cases("der-encoded")
    assert len(cases) == 2
    for case in cases:
        for key in both_key_forms(case):
            result = key.verify(decode_base64(case["messageBase64"]), decode_base64(case["signatureBase64"]))
            assert result.verified is False, case["comment"]
            assert result.reason is VerifyFailure.BAD_SIGNATURE_ENCODING, case["comment"]


def test_flipped_message_byte_mismatches():
    for case in signature_cases(None):
        message = bytearray(decode_base64(case["messageBase64"]))
        message[3] ^= 0x01
        result = parse_did_key(case["publicKeyDid"]).verify(bytes(message), decode_base64(case["signatureBase64"]))
        assert result.verified is False, case["comment"]
        assert result.reason is VerifyFailure.SIGNATURE_MISMATCH, case["comment"]


def test_signature_from_other_key_mismatches():
    valid = signature_cases(None)
    other_key = parse_did_key(signature_cases("der-encoded")[0]["publicKeyDid"])
    case = next(case for case in valid if case["algorithm"] == other_key.algorithm)
    assert other_key.did_key != case["publicKeyDid"]
    result = other_key.verify(decode_base64(case["messageBase64"]), decode_base64(case["signatureBase64"]))
    assert result.reason is VerifyFailure.SIGNATURE_MISMATCH


def test_out_of_range_r_is_bad_encoding():
    case = signature_cases(None)[0]
    signature = decode_base64(case["signatureBase64"])
    key = parse_did_key(case["publicKeyDid"])
    zero_r = key.verify(decode_base64(case["messageBase64"]), bytes(32) + signature[32:])
    all_ones_r = key.verify(decode_base64(case["messageBase64"]), b"\xff" * 32 + signature[32:])
    assert zero_r.reason is VerifyFailure.BAD_SIGNATURE_ENCODING
    assert all_ones_r.reason is VerifyFailure.BAD_SIGNATURE_ENCODING


@pytest.mark.parametrize("vectors", ["w3c_didkey_K256.json", "w3c_didkey_P256.json"])
def test_did_key_matches_private_key(vectors):
    cases = json.loads(fixture_path(f"interop-tests/crypto/{vectors}").read_text())
    for case in cases:
        if "privateKeyBytesHex" in case:
            private_bytes = bytes.fromhex(case["privateKeyBytesHex"])
        else:
            private_bytes = base58_decode(case["privateKeyBytesBase58"])
        key = parse_did_key(case["publicDidKey"])
        derived = ec.derive_private_key(int.from_bytes(private_bytes, "big"), CURVES[key.algorithm]).public_key()
        assert key.key.public_numbers() == derived.public_numbers(), case["publicDidKey"]
        assert key.did_key == case["publicDidKey"]


def test_did_key_algorithms_follow_multicodec():
    k256 = json.loads(fixture_path("interop-tests/crypto/w3c_didkey_K256.json").read_text())[0]
    p256 = json.loads(fixture_path("interop-tests/crypto/w3c_didkey_P256.json").read_text())[0]
    assert parse_did_key(k256["publicDidKey"]).algorithm == "ES256K"
    assert parse_did_key(p256["publicDidKey"]).algorithm == "ES256"


def test_parsed_keys_are_cached():
    did_key = json.loads(fixture_path("interop-tests/crypto/w3c_didkey_K256.json").read_text())[0]["publicDidKey"]
    multibase = did_key.removeprefix("did:key:")
    assert parse_multikey(multibase) is parse_multikey(multibase)
    assert parse_did_key(did_key) is parse_multikey(multibase)


def test_base58_round_trips_leading_zeros():
    data = b"\x00\x00\xe7\x01" + bytes(range(33))
    assert base58_decode(base58_encode(data)) == data
    assert base58_encode(b"\x00\x00") == "11"


def test_unsupported_multicodec_is_rejected():
    # An ed25519-pub (0xed) key: a valid did:key, but not an atproto signing key type.
    ed25519 = "z" + base58_encode(b"\xed\x01" + bytes(32))
    with pytest.raises(InvalidKeyError, match="multicodec prefix ed01"):
        parse_multikey(ed25519)


def test_malformed_key_strings_are_rejected():
    valid = json.loads(fixture_path("interop-tests/crypto/w3c_didkey_K256.json").read_text())[0]["publicDidKey"]
    with pytest.raises(InvalidKeyError, match="not a did:key"):
        parse_did_key("did:web:example.com")
    with pytest.raises(InvalidKeyError, match="must start with 'z'"):
        parse_multikey("m" + valid.removeprefix("did:key:z"))
    with pytest.raises(InvalidKeyError, match="base58btc character '0'"):
        parse_multikey("zQ3sh0")
    truncated = base58_decode(valid.removeprefix("did:key:z"))[:-1]
    with pytest.raises(InvalidKeyError, match="expected a 33-byte"):
        parse_multikey("z" + base58_encode(truncated))


def test_point_not_on_curve_is_rejected():
    # 0x02 prefix with x = 5 has no point on secp256k1 (5^3 + 7 = 132 is not a square mod p).
    not_on_curve = "z" + base58_encode(b"\xe7\x01\x02" + (5).to_bytes(32, "big"))
    with pytest.raises(InvalidKeyError, match="invalid ES256K public key point"):
        parse_multikey(not_on_curve)


def test_resolve_key_reports_missing_and_bad():
    missing = resolve_key(None)
    bad = resolve_key("did:key:zNotAKey")
    assert missing.verified is None
    assert missing.reason is VerifyFailure.NO_KEY
    assert bad.verified is False
    assert bad.reason is VerifyFailure.BAD_KEY


def test_signing_key_reads_real_did_documents():
    documents = json.loads(fixture_path(f"{JETSTREAM_CORPUS}/did_docs.json").read_text())
    assert len(documents) == 110
    for did, document in documents.items():
        key = signing_key(document, "atproto")
        method = next(m for m in document["verificationMethod"] if m["id"] == f"{did}#atproto")
        assert key is not None, did
        assert key.did_key == "did:key:" + method["publicKeyMultibase"], did


def test_signing_key_finds_labeler_fragment():
    labels = json.loads(fixture_path("labels/signed_labels.json").read_text())
    document = labels["labelerDidDocuments"]["did:plc:ar7c4by46qjdydhdevvrndac"]
    repo_key = signing_key(document, "atproto")
    label_key = signing_key(document, "atproto_label")
    assert label_key is not None
    assert repo_key is not None
    assert label_key.did_key != repo_key.did_key


def test_signing_key_absent_fragment_is_none():
    documents = json.loads(fixture_path(f"{JETSTREAM_CORPUS}/did_docs.json").read_text())
    document = next(iter(documents.values()))
    assert signing_key(document, "atproto_label") is None
    assert signing_key({"id": "did:plc:x"}, "atproto") is None


def test_signing_key_accepts_relative_method_id():
    documents = json.loads(fixture_path(f"{JETSTREAM_CORPUS}/did_docs.json").read_text())
    did, document = next(iter(documents.items()))
    method = dict(document["verificationMethod"][0], id="#atproto")
    key = signing_key({"id": did, "verificationMethod": [method]}, "atproto")
    assert key is not None
    assert key.did_key == "did:key:" + method["publicKeyMultibase"]


def test_signing_key_rejects_unknown_method_type():
    documents = json.loads(fixture_path(f"{JETSTREAM_CORPUS}/did_docs.json").read_text())
    did, document = next(iter(documents.items()))
    method = dict(document["verificationMethod"][0], type="JsonWebKey2020")
    with pytest.raises(InvalidKeyError, match="JsonWebKey2020"):
        signing_key({"id": did, "verificationMethod": [method]}, "atproto")
