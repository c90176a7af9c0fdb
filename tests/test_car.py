"""CAR v1 reading: real commit and repo CARs, and truncated or corrupt ones built here."""

from __future__ import annotations

import io

import libipld
import pytest
from fixture_data import JETSTREAM_CORPUS, fixture_path, read_length_prefixed
from frame_builder import build_car, cid_for, varint

from indexer.car import CarStream, iter_blocks, read_car, read_cid, verify_block
from indexer.errors import DecodeError
from indexer.events import DropReason

RECORD = libipld.encode_dag_cbor({"$type": "app.bsky.feed.like", "createdAt": "2026-01-01T00:00:00Z"})
OTHER = libipld.encode_dag_cbor({"text": "second block"})


def small_car() -> bytes:
    return build_car([cid_for(RECORD)], [(cid_for(RECORD), RECORD), (cid_for(OTHER), OTHER)])


def corpus_cars() -> list[bytes]:
    frames = read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))
    bodies = [libipld.decode_dag_cbor_multi(frame)[1] for frame in frames]
    return [body["blocks"] for body in bodies if body.get("blocks")]


def test_corpus_cars_match_libipld() -> None:
    cars = corpus_cars()
    total = 0
    for data in cars:
        car = read_car(data, verify=True)
        header, decoded = libipld.decode_car(data)
        assert car.roots == header["roots"]
        assert set(car.blocks) == set(decoded)
        total += len(car.blocks)
    assert len(cars) == 110
    assert total == 1136


def test_blocks_stay_undecoded_bytes() -> None:
    car = read_car(small_car())
    assert car.blocks[cid_for(RECORD)] == RECORD
    assert car.blocks[cid_for(OTHER)] == OTHER
    assert car.roots == [cid_for(RECORD)]


def test_cid_v0_section_is_read() -> None:
    cid_v0 = cid_for(RECORD)[2:]  # drop version and codec: 0x12 0x20 + digest
    car = read_car(build_car([cid_for(RECORD)], [(cid_v0, RECORD)]), verify=True)
    assert car.blocks == {cid_v0: RECORD}


def test_cid_with_multibyte_varints_is_read() -> None:
    # codec 0x300 needs a two-byte varint; the identity hash (0x00) has the block as its digest
    cid = bytes([1]) + varint(0x300) + bytes([0x00]) + varint(len(OTHER)) + OTHER
    assert read_cid(cid + b"tail", 0) == len(cid)
    car = read_car(build_car([cid], [(cid, OTHER)]), verify=True)
    assert car.blocks == {cid: OTHER}


def test_car_cut_mid_block_is_invalid() -> None:
    data = small_car()
    with pytest.raises(DecodeError) as caught:
        read_car(data[:-5])
    assert caught.value.reason == DropReason.INVALID_CAR
    assert "truncated" in str(caught.value)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x05", b"\xff", b"\x05\xa1"], ids=repr)
def test_tiny_cars_are_invalid(data: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        read_car(data)
    assert caught.value.reason == DropReason.INVALID_CAR


def test_garbage_header_is_invalid() -> None:
    with pytest.raises(DecodeError) as caught:
        read_car(varint(3) + b"\xff\xff\xff")
    assert caught.value.reason == DropReason.INVALID_CAR
    assert "not valid DAG-CBOR" in str(caught.value)


def test_car_version_2_is_invalid() -> None:
    header = libipld.encode_dag_cbor({"version": 2, "roots": []})
    with pytest.raises(DecodeError) as caught:
        read_car(varint(len(header)) + header)
    assert "version must be 1" in str(caught.value)


def test_unknown_cid_version_is_invalid() -> None:
    bad_cid = bytes([2, 0x71, 0x12, 0x20]) + bytes(32)
    with pytest.raises(DecodeError) as caught:
        read_car(build_car([cid_for(RECORD)], [(bad_cid, RECORD)]))
    assert caught.value.reason == DropReason.INVALID_CAR
    assert "CID version 2" in str(caught.value)


def test_overlong_varint_is_invalid() -> None:
    with pytest.raises(DecodeError) as caught:
        read_car(b"\x80" * 12)
    assert "longer than 9 bytes" in str(caught.value)


def test_tampered_block_fails_verification() -> None:
    tampered = build_car([cid_for(RECORD)], [(cid_for(RECORD), RECORD[:-1] + b"X")])
    assert read_car(tampered).blocks[cid_for(RECORD)].endswith(b"X")
    with pytest.raises(DecodeError) as caught:
        read_car(tampered, verify=True)
    assert caught.value.reason == DropReason.CID_MISMATCH


def test_unsupported_hash_fails_verification() -> None:
    blake3_cid = bytes([1, 0x71, 0x1E, 0x20]) + bytes(32)
    with pytest.raises(DecodeError) as caught:
        verify_block(blake3_cid, RECORD)
    assert caught.value.reason == DropReason.CID_MISMATCH
    assert "0x1e is not supported" in str(caught.value)


def test_stream_yields_roots_and_blocks() -> None:
    stream = CarStream(io.BytesIO(small_car()), verify=True)
    assert stream.roots == [cid_for(RECORD)]
    assert list(stream) == [(cid_for(RECORD), RECORD), (cid_for(OTHER), OTHER)]


def test_stream_over_repo_export() -> None:
    path = fixture_path("repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd.repo.car")
    with path.open("rb") as file:
        streamed = dict(iter_blocks(file, verify=True))
    assert streamed == read_car(path.read_bytes()).blocks
    assert len(streamed) == 29


def test_stream_cut_mid_block_raises() -> None:
    blocks = iter_blocks(small_car()[:-5])
    assert next(blocks) == (cid_for(RECORD), RECORD)
    with pytest.raises(DecodeError) as caught:
        next(blocks)
    assert caught.value.reason == DropReason.INVALID_CAR


def test_stream_rejects_huge_section_length() -> None:
    header = libipld.encode_dag_cbor({"version": 1, "roots": []})
    data = varint(len(header)) + header + varint(1 << 40)
    with pytest.raises(DecodeError) as caught:
        list(iter_blocks(io.BytesIO(data)))
    assert "section limit" in str(caught.value)
