"""atproto signing keys and ECDSA signature checks, plus the result type every verifier returns.

atproto signs with ECDSA over SHA-256 on one of two curves: secp256k1 ("ES256K", multicodec
``secp256k1-pub`` 0xe7) and NIST P-256 ("ES256", multicodec ``p256-pub`` 0x1200). A public key
travels as a multibase string: ``z`` + base58btc of the unsigned-varint multicodec followed by
the 33-byte compressed point. ``did:key:`` prepends that string to form a DID. Signatures are the
64-byte raw ``r || s`` form, and atproto accepts only low-S signatures (``s <= n / 2``), so each
signed message has exactly one valid signature. DER-encoded signatures are rejected.

Key parsing is cached per multibase string because the same repo keys sign commit after commit.
secp256k1 signatures are checked with libsecp256k1 (``coincurve``) when it is installed: about
40 µs per check against about 500 µs with ``cryptography`` (measured on the 110 recorded relay
commits, 2-core x86_64, coincurve 21.0.0, cryptography 49.0.0). P-256 always uses ``cryptography``.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from indexer.errors import IndexerError

try:
    import coincurve
except ImportError:  # the slower cryptography backend verifies secp256k1 too
    coincurve = None

DID_KEY_PREFIX = "did:key:"
SIGNATURE_LENGTH = 64

# Group orders of the two curves, for the low-S rule (SEC 2, section 2.4.1; FIPS 186-4, D.1.2.3).
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# Unsigned-varint multicodec prefixes of compressed public keys.
SECP256K1_MULTICODEC = b"\xe7\x01"  # secp256k1-pub, 0xe7
P256_MULTICODEC = b"\x80\x24"  # p256-pub, 0x1200

# Verification method types of DID documents written before the "Multikey" type: their
# publicKeyMultibase carries the bare point, without a multicodec prefix.
LEGACY_METHOD_CURVES = {
    "EcdsaSecp256k1VerificationKey2019": "ES256K",
    "EcdsaSecp256r1VerificationKey2019": "ES256",
}

# Parsed keys kept in memory; one entry is a few hundred bytes. NOTE: sized by estimate (about
# the number of repos active within minutes of firehose traffic), not by measurement.
KEY_CACHE_SIZE = 16384

BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
BASE58_VALUES = {char: value for value, char in enumerate(BASE58_ALPHABET)}


class VerifyFailure(enum.StrEnum):
    """Reason a signature or commit proof did not verify, or could not be checked."""

    NO_KEY = "no_key"  # no signing key: none given, or the DID document has no such method
    BAD_KEY = "bad_key"  # the key string is not a supported multibase/did:key public key
    NO_SIGNATURE = "no_signature"  # the signed object carries no sig field
    BAD_SIGNATURE_ENCODING = "bad_signature_encoding"  # not 64 raw bytes (for example DER), or r/s out of range
    HIGH_S = "high_s"  # s above half the curve order: valid ECDSA, rejected by atproto
    SIGNATURE_MISMATCH = "signature_mismatch"  # well-formed, but not made by this key over these bytes
    INVALID_COMMIT = "invalid_commit"  # the commit block is not a DAG-CBOR commit object
    MISSING_COMMIT_BLOCK = "missing_commit_block"  # the commit CID is not among the blocks
    DID_MISMATCH = "did_mismatch"  # the commit is signed for another repo than the event names
    REV_MISMATCH = "rev_mismatch"  # the commit's rev differs from the event's rev
    NO_PREV_DATA = "no_prev_data"  # pre-Sync-1.1 commit: there is no previous root to prove against
    INVALID_OP = "invalid_op"  # an op cannot be inverted: bad action or path, missing cid or prev
    OP_MISMATCH = "op_mismatch"  # the tree contradicts an op (created key absent, deleted key present)
    MISSING_MST_BLOCK = "missing_mst_block"  # an MST node needed to invert the ops is not in the blocks
    INVALID_MST = "invalid_mst"  # an MST node is undecodable, misplaced or does not hash to its CID
    PROOF_MISMATCH = "proof_mismatch"  # inverting the ops does not give back prevData
    MISSING_RECORD_BLOCK = "missing_record_block"  # a create/update op's record block is not in the blocks
    RECORD_MISMATCH = "record_mismatch"  # a record block does not hash to the CID its op names


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of one check.

    ``verified`` is True when the check passed, False when it failed, and None when it could not
    run (``reason`` NO_KEY or NO_PREV_DATA). ``reason`` is None exactly when ``verified`` is True.
    ``detail`` is a human-readable message for logs and dead-letter rows.
    """

    verified: bool | None
    reason: VerifyFailure | None = None
    detail: str = ""

    @classmethod
    def failed(cls, reason: VerifyFailure, detail: str) -> Verification:
        return cls(False, reason, detail)

    @classmethod
    def unchecked(cls, reason: VerifyFailure, detail: str) -> Verification:
        return cls(None, reason, detail)


VERIFIED = Verification(True)


class InvalidKeyError(IndexerError):
    """A public key string could not be parsed; the message shows the value and why."""


@dataclass(frozen=True, slots=True, eq=False)
class PublicKey:
    """A parsed atproto signing key. ``algorithm`` is "ES256K" (secp256k1) or "ES256" (P-256)."""

    algorithm: str
    multibase: str
    key: ec.EllipticCurvePublicKey
    secp256k1: Any = None  # the same key as a coincurve.PublicKey, when coincurve is installed

    @property
    def did_key(self) -> str:
        """Return the key as a ``did:key:`` DID (the Multikey form, with multicodec)."""
        codec = SECP256K1_MULTICODEC if self.algorithm == "ES256K" else P256_MULTICODEC
        point = self.key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
        return DID_KEY_PREFIX + "z" + base58_encode(codec + point)

    def verify(self, message: bytes, signature: bytes) -> Verification:
        """Check a 64-byte low-S ``r || s`` signature over SHA-256(message)."""
        if len(signature) != SIGNATURE_LENGTH:
            return Verification.failed(
                VerifyFailure.BAD_SIGNATURE_ENCODING,
                f"signature is {len(signature)} bytes, expected {SIGNATURE_LENGTH} raw r||s bytes (DER is not accepted)",
            )
        order = SECP256K1_ORDER if self.algorithm == "ES256K" else P256_ORDER
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (0 < r < order and 0 < s < order):
            return Verification.failed(VerifyFailure.BAD_SIGNATURE_ENCODING, "signature r or s is outside 1..n-1")
        if s > order // 2:
            return Verification.failed(VerifyFailure.HIGH_S, "signature has a high S value, which atproto rejects")
        if self.secp256k1 is not None:
            # libsecp256k1 takes a normalised (low-S) compact signature, checked above.
            signature_object = coincurve.ecdsa.deserialize_compact(signature)
            valid = self.secp256k1.verify(coincurve.ecdsa.cdata_to_der(signature_object), message)
        else:
            valid = self._verify_with_cryptography(message, r, s)
        if not valid:
            return Verification.failed(
                VerifyFailure.SIGNATURE_MISMATCH, f"signature does not match the data for key {self.did_key}"
            )
        return VERIFIED

    def _verify_with_cryptography(self, message: bytes, r: int, s: int) -> bool:
        try:
            self.key.verify(encode_dss_signature(r, s), message, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True


_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_CURVES: dict[str, ec.EllipticCurve] = {"ES256K": ec.SECP256K1(), "ES256": ec.SECP256R1()}


def base58_decode(text: str) -> bytes:
    """Decode base58btc (Bitcoin alphabet); raises InvalidKeyError on a character outside it."""
    number = 0
    for char in text:
        value = BASE58_VALUES.get(char)
        if value is None:
            raise InvalidKeyError(f"invalid base58btc character {char!r} in {text!r}")
        number = number * 58 + value
    leading_zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * leading_zeros + body


def base58_encode(data: bytes) -> str:
    """Encode bytes as base58btc (Bitcoin alphabet)."""
    number = int.from_bytes(data, "big")
    chars = []
    while number:
        number, value = divmod(number, 58)
        chars.append(BASE58_ALPHABET[value])
    leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading_zeros + "".join(reversed(chars))


def _load_point(algorithm: str, point: bytes, source: str) -> PublicKey:
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[algorithm], point)
    except ValueError as error:
        raise InvalidKeyError(f"invalid {algorithm} public key point in {source!r}: {error}") from error
    fast_key = None
    if algorithm == "ES256K" and coincurve is not None:
        fast_key = coincurve.PublicKey(key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
    return PublicKey(algorithm, source, key, fast_key)


def _multibase_bytes(multibase: str) -> bytes:
    if not multibase.startswith("z"):
        raise InvalidKeyError(f"public key {multibase!r} is not base58btc multibase (must start with 'z')")
    return base58_decode(multibase[1:])


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def parse_multikey(multibase: str) -> PublicKey:
    """Parse a Multikey ``publicKeyMultibase`` (``z`` + base58btc of multicodec + compressed point).

    Raises InvalidKeyError naming the value when the encoding, the multicodec or the point is
    invalid. Results are cached per string.
    """
    data = _multibase_bytes(multibase)
    if data.startswith(SECP256K1_MULTICODEC):
        algorithm = "ES256K"
    elif data.startswith(P256_MULTICODEC):
        algorithm = "ES256"
    else:
        raise InvalidKeyError(
            f"public key {multibase!r} has multicodec prefix {data[:2].hex()}; "
            "only secp256k1-pub (e701) and p256-pub (8024) are atproto signing keys"
        )
    point = data[2:]
    if len(point) != 33:
        raise InvalidKeyError(f"public key {multibase!r} is {len(point)} bytes, expected a 33-byte compressed point")
    return _load_point(algorithm, point, multibase)


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def parse_legacy_multibase(multibase: str, algorithm: str) -> PublicKey:
    """Parse a pre-Multikey ``publicKeyMultibase``: the bare point (compressed or not) of ``algorithm``."""
    if algorithm not in _CURVES:
        raise InvalidKeyError(f"unsupported key algorithm {algorithm!r}; expected ES256K or ES256")
    return _load_point(algorithm, _multibase_bytes(multibase), multibase)


def parse_did_key(did_key: str) -> PublicKey:
    """Parse a ``did:key:z...`` DID into its public key; raises InvalidKeyError when invalid."""
    if not did_key.startswith(DID_KEY_PREFIX):
        raise InvalidKeyError(f"{did_key!r} is not a did:key (must start with {DID_KEY_PREFIX!r})")
    return parse_multikey(did_key[len(DID_KEY_PREFIX) :])


def parse_key(text: str) -> PublicKey:
    """Parse a ``did:key:`` DID or a Multikey multibase string; raises InvalidKeyError when invalid."""
    if text.startswith(DID_KEY_PREFIX):
        return parse_did_key(text)
    return parse_multikey(text)


def signing_key(did_document: Mapping[str, Any], fragment: str = "atproto") -> PublicKey | None:
    """Return the key of the verification method ``#fragment`` in a DID document.

    Use ``atproto`` for repo commits and ``atproto_label`` for a labeler's labels. The method id
    may be absolute (``did:plc:...#atproto``) or relative (``#atproto``). Returns None when the
    document has no such method. Raises InvalidKeyError when the method exists but its key is
    unusable (unknown type, missing or invalid publicKeyMultibase).
    """
    methods = did_document.get("verificationMethod")
    if not isinstance(methods, list):
        return None
    for method in methods:
        if not isinstance(method, Mapping):
            continue
        method_id = method.get("id")
        if not isinstance(method_id, str) or "#" not in method_id or method_id.rpartition("#")[2] != fragment:
            continue
        multibase = method.get("publicKeyMultibase")
        if not isinstance(multibase, str):
            raise InvalidKeyError(f"verification method {method_id!r} has no publicKeyMultibase string")
        method_type = method.get("type")
        if method_type == "Multikey":
            return parse_multikey(multibase)
        if method_type in LEGACY_METHOD_CURVES:
            return parse_legacy_multibase(multibase, LEGACY_METHOD_CURVES[method_type])
        raise InvalidKeyError(
            f"verification method {method_id!r} has type {method_type!r}; expected Multikey, "
            + " or ".join(LEGACY_METHOD_CURVES)
        )
    return None


def resolve_key(key: PublicKey | str | None) -> PublicKey | Verification:
    """Return ``key`` parsed, or the Verification that explains why there is no usable key.

    A string is a ``did:key:`` DID or a Multikey multibase. None gives an unchecked NO_KEY result,
    an unparseable string a failed BAD_KEY result.
    """
    if key is None:
        return Verification.unchecked(VerifyFailure.NO_KEY, "no signing key is known for this signer")
    if isinstance(key, PublicKey):
        return key
    try:
        return parse_key(key)
    except InvalidKeyError as error:
        return Verification.failed(VerifyFailure.BAD_KEY, str(error))
