"""atproto JSON form of decoded records: links, byte strings, U+0000 removal, round trips."""

from __future__ import annotations

import libipld
from fixture_data import JETSTREAM_CORPUS, fixture_path, read_length_prefixed
from frame_builder import cid_for

from indexer.frames import decode_repo_frame
from indexer.jsonform import _Converter, cid_to_bytes, from_json, to_json

LINK = cid_for(b"some blob")
LINK_TEXT = libipld.encode_cid(LINK)


def byte_string(content: bytes) -> bytes:
    """Encode ``content`` as a plain CBOR byte string (major type 2), never as a tag-42 link."""
    assert len(content) < 256
    return (b"\x58" + bytes([len(content)]) if len(content) >= 24 else bytes([0x40 | len(content)])) + content


def test_link_becomes_dollar_link() -> None:
    block = libipld.encode_dag_cbor({"ref": LINK})
    converted = to_json(libipld.decode_dag_cbor(block), block=block)
    assert converted.value == {"ref": {"$link": LINK_TEXT}}


def test_bytes_become_unpadded_base64() -> None:
    converted = to_json({"sig": b"\x01\x02\x03\x04"})
    assert converted.value == {"sig": {"$bytes": "AQIDBA"}}


def test_cid_shaped_bytes_without_block_are_links() -> None:
    converted = to_json({"data": LINK})
    assert converted.value == {"data": {"$link": LINK_TEXT}}


def test_cid_shaped_bytes_with_block_stay_bytes() -> None:
    # {"data": <byte string whose content happens to be a CID>}
    block = b"\xa1\x64data" + byte_string(LINK)
    decoded = libipld.decode_dag_cbor(block)
    converted = to_json(decoded, block=block)
    assert converted.value == {"data": {"$bytes": libipld.encode_multibase("u", LINK)[1:]}}


def test_same_cid_as_link_and_bytes() -> None:
    # {"a": <link>, "b": <byte string with the same CID bytes>}: only the tags tell them apart
    link_encoding = libipld.encode_dag_cbor({"a": LINK})[3:]
    block = b"\xa2\x61a" + link_encoding + b"\x61b" + byte_string(LINK)
    decoded = libipld.decode_dag_cbor(block)
    assert decoded == {"a": LINK, "b": LINK}
    converted = to_json(decoded, block=block)
    assert converted.value["a"] == {"$link": LINK_TEXT}
    assert converted.value["b"] == {"$bytes": libipld.encode_multibase("u", LINK)[1:]}


def test_nul_removed_from_strings_and_keys() -> None:
    converted = to_json({"text": "a\x00b\x00", "nested": [{"k\x00ey": "x"}], "clean": "ok"})
    assert converted.value == {"text": "ab", "nested": [{"key": "x"}], "clean": "ok"}
    assert converted.nul_chars_removed == 3


def test_clean_value_reports_no_nul() -> None:
    assert to_json({"text": "plain", "n": 5, "f": 1.5, "b": True, "none": None}).nul_chars_removed == 0


def test_scalars_pass_through() -> None:
    value = {"n": -(2**63), "big": 2**64 - 1, "f": 1.5, "t": True, "none": None, "list": []}
    assert to_json(value).value == value


def test_from_json_restores_links_and_bytes() -> None:
    restored = from_json({"ref": {"$link": LINK_TEXT}, "sig": {"$bytes": "AQIDBA"}, "n": [1]})
    assert restored == {"ref": LINK, "sig": b"\x01\x02\x03\x04", "n": [1]}


def test_cid_v0_string_to_bytes() -> None:
    cid_v0 = LINK[2:]
    assert cid_to_bytes(libipld.encode_cid(cid_v0)) == cid_v0


def test_corpus_records_round_trip() -> None:
    frames = read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))
    checked = 0
    links = 0
    for frame in frames:
        for op in getattr(decode_repo_frame(frame), "ops", []):
            if op.record is None:
                continue
            converted = to_json(op.record, block=op.record_bytes)
            assert libipld.encode_dag_cbor(from_json(converted.value)) == op.record_bytes, op.path
            checked += 1
            links += '"$link"' in repr(converted.value).replace("'", '"')
    assert checked == 109
    assert links > 0


def test_plain_record_returned_as_is() -> None:
    like = {"$type": "app.bsky.feed.like", "createdAt": "2026-07-04T14:38:06Z",
            "subject": {"uri": "at://did:plc:abc/app.bsky.feed.post/3k", "cid": "bafyrei"}}
    assert to_json(like).value is like


def test_deep_bytes_still_converted() -> None:
    converted = to_json({"a": [{"b": [b"\x01\x02"]}]})
    assert converted.value == {"a": [{"b": [{"$bytes": "AQI"}]}]}


def test_deep_nul_still_removed() -> None:
    converted = to_json({"a": [[{"b": "x\x00"}]], "n": 1})
    assert converted.value == {"a": [[{"b": "x"}]], "n": 1}
    assert converted.nul_chars_removed == 1


def test_string_subclass_still_cleaned() -> None:
    class Text(str):
        pass

    assert to_json({"text": Text("a\x00b")}).value == {"text": "ab"}


def test_corpus_records_match_full_conversion() -> None:
    frames = read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))
    returned_as_is = 0
    for frame in frames:
        for op in getattr(decode_repo_frame(frame), "ops", []):
            if op.record is None:
                continue
            converted = to_json(op.record, block=op.record_bytes)
            assert converted.value == _Converter(op.record_bytes).convert(op.record), op.path
            returned_as_is += converted.value is op.record
    assert returned_as_is > 0
