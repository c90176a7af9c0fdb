"""Signature verification inside the indexing loop: recorded frames, a local PLC directory, real PostgreSQL.

The relay is a ``ReplayRelay`` and the PLC directory a ``FakeNetwork``, both on 127.0.0.1. The DID
documents served are the recorded ones of the commit authors, or documents built here from the
keys listed in the fixtures.
"""

from __future__ import annotations

import json
from typing import Any

import libipld
import psycopg
import pytest
from fake_network import FakeNetwork
from fixture_data import INDIGO_SCENARIOS, JETSTREAM_CORPUS, fixture_path, read_length_prefixed
from frame_builder import build_car, cid_for, message_frame
from ingest_harness import run_until, run_until_committed
from label_harness import labels_frame, signed_labels

from indexer import frames
from indexer.events import Commit, Sync
from indexer.ingest import LABELS_METHOD, REPOS_METHOD, StreamIndexer
from indexer.jsonform import from_json
from indexer.replay import ReplayRelay
from indexer.store import Store
from indexer.stream import StreamClient, endpoint_url
from indexer.verifier import EventVerifier, VerifyMode, VerifySettings

RECORD_TABLES = ("posts", "likes", "reposts", "follows", "blocks", "profiles", "records", "deletions")


# --- data -------------------------------------------------------------------------------------


def jetstream_frames() -> list[tuple[int, bytes]]:
    frame_list = read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))
    return [(libipld.decode_dag_cbor_multi(frame)[1]["seq"], frame) for frame in frame_list]


def jetstream_documents() -> dict[str, dict]:
    return json.loads(fixture_path(f"{JETSTREAM_CORPUS}/did_docs.json").read_text())


def split_frame(frame: bytes) -> tuple[dict, dict]:
    header, body = libipld.decode_dag_cbor_multi(frame)
    return header, body


def first_commit(frame_pairs: list[tuple[int, bytes]], collection: str) -> tuple[int, dict]:
    """Return the index and body of the first recorded commit with a create in ``collection``."""
    for index, (_, frame) in enumerate(frame_pairs):
        header, body = split_frame(frame)
        if header["t"] == "#commit" and body["ops"][0]["path"].startswith(collection + "/") \
                and body["ops"][0]["action"] == "create":
            return index, body
    raise AssertionError(f"no recorded commit creates a {collection} record")


def commit_frame_from(body: dict) -> bytes:
    return message_frame("#commit", libipld.encode_dag_cbor(body))


def car_sections(car: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    from indexer.car import read_car

    parsed = read_car(car)
    return parsed.roots, list(parsed.blocks.items())


def with_record_edited(body: dict) -> dict:
    """Return a copy of a commit body whose first record block has one changed byte in createdAt."""
    roots, sections = car_sections(body["blocks"])
    record_cid = body["ops"][0]["cid"]
    edited = []
    for cid, block in sections:
        if cid == record_cid:
            assert b"2026-" in block
            block = block.replace(b"2026-", b"2027-", 1)
        edited.append((cid, block))
    return {**body, "blocks": build_car(roots, edited)}


def with_signature_flipped(body: dict) -> dict:
    """Return a copy of a commit body whose commit block carries a signature with one bit flipped.

    The commit block gets a new CID, set as the CAR root and the event's ``commit``, so only the
    signature is wrong.
    """
    roots, sections = car_sections(body["blocks"])
    commit = libipld.decode_dag_cbor(dict(sections)[roots[0]])
    signature = bytearray(commit["sig"])
    signature[5] ^= 0x01
    commit["sig"] = bytes(signature)
    block = libipld.encode_dag_cbor(commit)
    cid = cid_for(block)
    rest = [(other, data) for other, data in sections if other != roots[0]]
    return {**body, "commit": cid, "blocks": build_car([cid], [(cid, block), *rest])}


def sync_frame_from(body: dict, seq: int) -> bytes:
    """Build a #sync frame carrying the commit block of a recorded commit, as a relay sends it."""
    roots, sections = car_sections(body["blocks"])
    car = build_car(roots, [(roots[0], dict(sections)[roots[0]])])
    return message_frame("#sync", libipld.encode_dag_cbor(
        {"seq": seq, "did": body["repo"], "rev": body["rev"], "time": body["time"], "blocks": car}))


def identity_frame(seq: int, did: str) -> bytes:
    return message_frame("#identity", libipld.encode_dag_cbor({"seq": seq, "did": did, "time": "2026-07-04T14:40:00Z"}))


def key_document(did: str, multibase: str, fragment: str = "atproto") -> dict:
    """A DID document built here: one Multikey verification method ``#fragment``."""
    return {"id": did, "verificationMethod": [
        {"id": f"{did}#{fragment}", "type": "Multikey", "controller": did, "publicKeyMultibase": multibase}]}


def other_key(documents: dict[str, dict], did: str) -> str:
    """Return the #atproto key of some other author, for a document with the wrong key."""
    other = next(name for name in documents if name != did)
    return documents[other]["verificationMethod"][0]["publicKeyMultibase"]


# --- running ----------------------------------------------------------------------------------


def verify_settings(plc: FakeNetwork, mode: VerifyMode = VerifyMode.RECORD, workers: int = 0) -> VerifySettings:
    return VerifySettings(mode=mode, plc_url=plc.url, key_wait=10.0, workers=workers)


def build_indexer(database_url: str, relay: ReplayRelay, settings: VerifySettings, *,
                  method: str = REPOS_METHOD) -> StreamIndexer:
    endpoint = endpoint_url(relay.base_url, method)
    decode = frames.decode_repo_frame if method == REPOS_METHOD else frames.decode_label_frame

    def client_factory(cursor_source):
        return StreamClient(endpoint, method, cursor_source, receive_timeout=5.0)

    return StreamIndexer(Store(database_url, endpoint), client_factory, decode=decode, batch_interval=0.05,
                         verifier=EventVerifier(settings, database_url))


async def index_all(database_url: str, frame_pairs: list[tuple[int, bytes]], settings: VerifySettings,
                    method: str = REPOS_METHOD) -> StreamIndexer:
    async with ReplayRelay(frame_pairs) as relay:
        indexer = build_indexer(database_url, relay, settings, method=method)
        return await run_until_committed(indexer, frame_pairs[-1][0], timeout=60.0)


def query(database_url: str, sql: str, params: Any = None) -> list[tuple]:
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        return connection.execute(sql, params).fetchall()


def outcomes_by_table(database_url: str) -> dict[str, set]:
    return {table: set(query(database_url, f"SELECT verified, verify_reason FROM {table}")) for table in RECORD_TABLES}


# --- commits ----------------------------------------------------------------------------------


async def test_recorded_commits_all_verify(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents()) as plc:
        # One worker process: the default path, with pickling across processes.
        await index_all(database_url, frame_pairs, verify_settings(plc, workers=1))
    rows = query(database_url, "SELECT count(*) FROM (SELECT did FROM posts UNION ALL SELECT did FROM likes "
                               "UNION ALL SELECT did FROM reposts UNION ALL SELECT did FROM follows UNION ALL "
                               "SELECT did FROM blocks UNION ALL SELECT did FROM records UNION ALL "
                               "SELECT did FROM deletions) AS every_row")
    assert rows[0][0] == 112  # 110 commits with 112 ops
    for table, outcomes in outcomes_by_table(database_url).items():
        assert outcomes <= {(True, None)}, table


async def test_plc_down_stores_no_key(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents(), plc_status=503) as plc:
        indexer = await index_all(database_url, frame_pairs, verify_settings(plc))
    assert indexer.committed == frame_pairs[-1][0]
    for table, outcomes in outcomes_by_table(database_url).items():
        assert outcomes <= {(None, "no_key")}, table
    assert query(database_url, "SELECT count(*) FROM likes WHERE verified IS NULL")[0][0] == 78


@pytest.mark.parametrize(("edit", "reason"), [
    (with_record_edited, "record_mismatch"),
    (with_signature_flipped, "signature_mismatch"),
])
async def test_tampered_commit_fails_with_reason(database_url, edit, reason):
    frame_pairs = jetstream_frames()
    index, body = first_commit(frame_pairs, "app.bsky.feed.like")
    frame_pairs[index] = (frame_pairs[index][0], commit_frame_from(edit(body)))
    async with FakeNetwork(documents=jetstream_documents()) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc))
    rkey = body["ops"][0]["path"].split("/")[1]
    assert query(database_url, "SELECT verified, verify_reason FROM likes WHERE did = %s AND rkey = %s",
                 (body["repo"], rkey)) == [(False, reason)]
    assert query(database_url, "SELECT count(*) FROM likes WHERE verified")[0][0] == 77


async def test_swapped_key_fails_signature(database_url):
    frame_pairs = jetstream_frames()
    documents = jetstream_documents()
    _, body = first_commit(frame_pairs, "app.bsky.feed.post")
    did = body["repo"]
    documents[did] = key_document(did, other_key(documents, did))
    async with FakeNetwork(documents=documents) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc))
    assert query(database_url, "SELECT DISTINCT verified, verify_reason FROM posts WHERE did = %s", (did,)) == [
        (False, "signature_mismatch")]


async def test_enforce_dead_letters_failing_commit(database_url):
    frame_pairs = jetstream_frames()
    index, body = first_commit(frame_pairs, "app.bsky.feed.like")
    frame_pairs[index] = (frame_pairs[index][0], commit_frame_from(with_signature_flipped(body)))
    async with FakeNetwork(documents=jetstream_documents()) as plc:
        indexer = await index_all(database_url, frame_pairs, verify_settings(plc, VerifyMode.ENFORCE))
    assert query(database_url, "SELECT count(*) FROM likes WHERE did = %s", (body["repo"],)) == [(0,)]
    letters = query(database_url, "SELECT seq, did, reason, error FROM dead_letters")
    assert [(seq, did, reason) for seq, did, reason, _ in letters] == [
        (body["seq"], body["repo"], "signature_invalid")]
    assert letters[0][3].startswith("signature_mismatch: ")
    assert query(database_url, "SELECT count(*) FROM likes")[0][0] == 77
    assert indexer.committed == frame_pairs[-1][0]


async def test_unchecked_commit_is_kept_by_enforce(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents={}) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc, VerifyMode.ENFORCE))
    assert query(database_url, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert query(database_url, "SELECT count(*), bool_and(verified IS NULL) FROM likes") == [(78, True)]


async def test_events_count_moves_with_cursor(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents()) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc, VerifyMode.OFF))
    assert query(database_url, "SELECT events FROM cursors") == [(len(frame_pairs),)]


async def test_verify_off_leaves_rows_unchecked(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents()) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc, VerifyMode.OFF))
        assert plc.requests == []
    assert outcomes_by_table(database_url)["likes"] == {(None, None)}


# --- #sync and key rotation -------------------------------------------------------------------


async def test_key_rotation_after_identity_event(database_url):
    frame_pairs = jetstream_frames()
    documents = jetstream_documents()
    _, body = first_commit(frame_pairs, "app.bsky.feed.post")
    did = body["repo"]
    right_document = documents[did]
    documents[did] = key_document(did, other_key(documents, did))
    first = [(1, sync_frame_from(body, 1))]
    async with FakeNetwork(documents=documents) as plc, ReplayRelay(first) as relay:
        indexer = build_indexer(database_url, relay, verify_settings(plc))

        def rotate_then_wait(running: StreamIndexer) -> bool:
            if running.committed == 1 and relay.frame_count == 1:
                plc.documents[did] = right_document  # the account rotated its key in PLC
                relay.append(2, identity_frame(2, did))
                relay.append(3, sync_frame_from(body, 3))
            return running.committed is not None and running.committed >= 3

        await run_until(indexer, rotate_then_wait, timeout=30.0)
    assert query(database_url, "SELECT seq, verified, verify_reason FROM sync_events ORDER BY seq") == [
        (1, False, "signature_mismatch"), (3, True, None)]


# --- indigo relay scenarios -------------------------------------------------------------------


def scenario_events() -> tuple[list[Any], dict[str, dict]]:
    """Return the decoded #commit and #sync events of the indigo scenarios, and documents of their accounts."""
    events, documents = [], {}
    for path in sorted(fixture_path(INDIGO_SCENARIOS).glob("*.json")):
        scenario = json.loads(path.read_text())
        for account in scenario["accounts"]:
            identity = account["identity"]
            documents[identity["did"]] = key_document(identity["did"], identity["keys"]["atproto"]["publicKeyMultibase"])
        for message in scenario["messages"]:
            header, body = message["frame"]["header"], message["frame"]["body"]
            if header["t"] in ("#commit", "#sync"):
                frame = message_frame(header["t"], libipld.encode_dag_cbor(from_json(body)))
                events.append(frames.decode_repo_frame(frame))
    return events, documents


async def test_scenario_commits_verify_with_their_keys():
    events, documents = scenario_events()
    assert len(events) == 26
    outcomes = []
    async with FakeNetwork(documents=documents) as plc:
        async with EventVerifier(verify_settings(plc)) as verifier:
            # Sequence numbers repeat across scenario files, so each event is checked on its own.
            for event in events:
                assert isinstance(event, (Commit, Sync))
                verifier.submit(event)
                result = await verifier.outcomes([event.seq])
                outcomes.append((event.seq, result[event.seq].verified, result[event.seq].reason))
    failed = [outcome for outcome in outcomes if outcome[1] is not True]
    # The maintainers edited the rev of two frames in rev_ordering.json, leaving the commit signed as it was.
    assert [(verified, reason) for _, verified, reason in failed] == [(False, "rev_mismatch")] * 2


# --- labels -----------------------------------------------------------------------------------


def labeler_documents() -> dict[str, dict]:
    data = json.loads(fixture_path("labels/signed_labels.json").read_text())
    documents = dict(data["labelerDidDocuments"])
    for entry in data["labels"]:
        src = entry["label"]["src"]
        if src not in documents:
            multibase = entry["signingKey"].removeprefix("did:key:")
            documents[src] = key_document(src, multibase, "atproto_label")
    return documents


async def test_signed_labels_verify(database_url):
    labels = signed_labels()
    async with FakeNetwork(documents=labeler_documents()) as plc:
        await index_all(database_url, [labels_frame(1, labels)], verify_settings(plc), method=LABELS_METHOD)
    assert query(database_url, "SELECT val, neg, verified, verify_reason FROM labels ORDER BY id") == [
        (label["val"], label.get("neg", False), True, None) for label in labels]


async def test_altered_labels_fail(database_url):
    labels = signed_labels()
    altered = [{**labels[0], "val": "replicant"}, {**labels[2], "neg": False}]
    async with FakeNetwork(documents=labeler_documents()) as plc:
        await index_all(database_url, [labels_frame(1, [labels[1], *altered])], verify_settings(plc),
                        method=LABELS_METHOD)
    assert query(database_url, "SELECT val, verified, verify_reason FROM labels ORDER BY id") == [
        ("!takedown", True, None), ("replicant", False, "signature_mismatch"),
        ("!takedown", False, "signature_mismatch")]


async def test_label_checked_with_label_key_only(database_url):
    labels = signed_labels()
    documents = labeler_documents()
    src = labels[1]["src"]
    # The same key published as #atproto (the repo key) does not count for labels.
    method = documents[src]["verificationMethod"]
    documents[src] = {**documents[src], "verificationMethod": [
        {**entry, "id": f"{src}#atproto"} for entry in method if entry["id"].endswith("#atproto_label")]}
    async with FakeNetwork(documents=documents) as plc:
        await index_all(database_url, [labels_frame(1, [labels[1]])], verify_settings(plc), method=LABELS_METHOD)
    assert query(database_url, "SELECT verified, verify_reason FROM labels") == [(None, "no_key")]
