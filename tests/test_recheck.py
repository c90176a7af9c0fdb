"""Events stored unchecked (no key) are kept in verification_backlog and checked again later.

Recorded relay commits and real signed labels are indexed while the local PLC directory fails, then
``recheck_once`` runs once the directory serves the documents again.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures.process import BrokenProcessPool

import psycopg

from fake_network import FakeNetwork
from label_harness import labels_frame, signed_labels
from test_verify_pipeline import (
    RECORD_TABLES,
    index_all,
    jetstream_documents,
    jetstream_frames,
    labeler_documents,
    query,
    verify_settings,
)

from indexer import frames
from indexer.events import Commit
from indexer.ingest import LABELS_METHOD
from indexer import recheck
from indexer.crypto import Verification
from indexer.recheck import RecheckSummary, decode_work, encode_work, recheck_once, recheck_periodically
from indexer.verifier import EventVerifier, _job_for


def _row_outcomes(database_url: str) -> set:
    return {outcome for table in RECORD_TABLES
            for outcome in query(database_url, f"SELECT verified, verify_reason FROM {table}")}


def test_commit_work_survives_encoding():
    frame_pairs = jetstream_frames()
    commits = [event for event in (frames.decode_repo_frame(frame) for _, frame in frame_pairs)
               if isinstance(event, Commit)]
    for commit in commits:
        work = _job_for(commit).work
        assert decode_work("commit", encode_work(work)) == work


def test_label_work_survives_encoding():
    event = frames.decode_label_frame(labels_frame(1, signed_labels())[1])
    work = _job_for(event).work
    assert decode_work("labels", encode_work(work)) == work


async def test_commits_without_key_kept_in_backlog(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents(), plc_status=503) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc))
    backlog = query(database_url, "SELECT kind, count(*) FROM verification_backlog GROUP BY kind")
    assert backlog == [("commit", 110)]


async def test_recheck_verifies_rows_once_keys_resolve(database_url):
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents(), plc_status=503) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc))
        plc.plc_status = None
        async with EventVerifier(verify_settings(plc), database_url) as verifier:
            summary = await recheck_once(database_url, verifier)
    assert summary.checked == 110
    assert summary.verified == 110
    assert summary.failed == 0
    assert summary.still_unchecked == 0
    assert _row_outcomes(database_url) == {(True, None)}
    assert query(database_url, "SELECT count(*) FROM verification_backlog") == [(0,)]


async def test_recheck_without_key_keeps_entry(database_url):
    frame_pairs = jetstream_frames()[:5]
    async with FakeNetwork(documents=jetstream_documents(), plc_status=503) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc))
        async with EventVerifier(verify_settings(plc), database_url) as verifier:
            first = await recheck_once(database_url, verifier)
            second = await recheck_once(database_url, verifier)
    commits = query(database_url, "SELECT count(*), min(attempts), max(attempts) FROM verification_backlog")
    assert first.still_unchecked == commits[0][0]
    assert commits[0][1:] == (1, 1)
    assert second.checked == 0  # checked a moment ago: left for a later round
    assert _row_outcomes(database_url) <= {(None, "no_key")}


async def test_recheck_verifies_labels(database_url):
    labels = signed_labels()
    async with FakeNetwork(documents=labeler_documents(), plc_status=503) as plc:
        await index_all(database_url, [labels_frame(1, labels)], verify_settings(plc), method=LABELS_METHOD)
        plc.plc_status = None
        async with EventVerifier(verify_settings(plc), database_url) as verifier:
            summary = await recheck_once(database_url, verifier)
    assert summary.verified == 1
    assert query(database_url, "SELECT verified, verify_reason FROM labels") == [(True, None)] * len(labels)


async def test_periodic_recheck_drains_full_rounds_at_once(database_url, monkeypatch):
    monkeypatch.setattr(recheck, "ROUND_SIZE", 50)
    frame_pairs = jetstream_frames()
    async with FakeNetwork(documents=jetstream_documents(), plc_status=503) as plc:
        await index_all(database_url, frame_pairs, verify_settings(plc))
        plc.plc_status = None
        # The interval is far longer than the test: the rounds of 50, 50 and 10 run back to back.
        task = asyncio.create_task(recheck_periodically(database_url, verify_settings(plc), interval=3600))
        try:
            for _ in range(200):
                if query(database_url, "SELECT count(*) FROM verification_backlog") == [(0,)]:
                    break
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert query(database_url, "SELECT count(*) FROM verification_backlog") == [(0,)]
    assert _row_outcomes(database_url) == {(True, None)}


async def test_label_with_nul_settles_stored_row(database_url):
    # Regression (review): the labels row keeps val without U+0000 but the backlog keeps the label as
    # received, so the UPDATE sent the NUL, PostgreSQL rejected it, and every round failed.
    labels = signed_labels()
    with_nul = {**labels[0], "val": "porn\x00"}
    async with FakeNetwork(documents=labeler_documents(), plc_status=503) as plc:
        await index_all(database_url, [labels_frame(1, [with_nul]), labels_frame(2, [labels[1]])],
                        verify_settings(plc), method=LABELS_METHOD)
        plc.plc_status = None
        async with EventVerifier(verify_settings(plc), database_url) as verifier:
            summary = await recheck_once(database_url, verifier)
    assert summary.checked == 2
    assert query(database_url, "SELECT count(*) FROM verification_backlog") == [(0,)]
    assert query(database_url, "SELECT val, verified FROM labels ORDER BY seq") == [
        ("porn", False), (labels[1]["val"], True)]


async def test_label_src_with_nul_stored_unchecked(database_url):
    # Regression (review): the backlog row's did kept the NUL, its insert failed, and the batch split
    # dead-lettered the label that was stored before the backlog existed.
    labels = signed_labels()
    odd = {**labels[0], "src": labels[0]["src"] + "\x00"}
    async with FakeNetwork(documents=labeler_documents()) as plc:
        await index_all(database_url, [labels_frame(1, [odd])], verify_settings(plc), method=LABELS_METHOD)
    assert query(database_url, "SELECT reason FROM dead_letters") == []
    assert query(database_url, "SELECT verified, verify_reason FROM labels") == [(None, "no_key")]


async def test_keyless_entries_yield_to_unchecked_ones(database_url, monkeypatch):
    monkeypatch.setattr(recheck, "ROUND_SIZE", 3)
    labels = signed_labels()
    keyless = [{**labels[0], "src": "did:example:nokey", "val": f"v{index}"} for index in range(3)]
    async with FakeNetwork(documents={**jetstream_documents(), **labeler_documents()}, plc_status=503) as plc:
        await index_all(database_url, [labels_frame(index + 1, [label]) for index, label in enumerate(keyless)],
                        verify_settings(plc), method=LABELS_METHOD)
        await index_all(database_url, jetstream_frames()[:5], verify_settings(plc))
        plc.plc_status = None
        async with EventVerifier(verify_settings(plc), database_url) as verifier:
            for _ in range(4):
                await recheck_once(database_url, verifier, retry_after=0)
    left = query(database_url, "SELECT kind, count(*) FROM verification_backlog GROUP BY kind")
    assert left == [("labels", 3)]


async def test_entry_given_up_after_max_attempts(database_url, monkeypatch):
    monkeypatch.setattr(recheck, "MAX_ATTEMPTS", 2)
    labels = signed_labels()
    keyless = {**labels[0], "src": "did:example:nokey"}
    async with FakeNetwork(documents=labeler_documents()) as plc:
        await index_all(database_url, [labels_frame(1, [keyless])], verify_settings(plc), method=LABELS_METHOD)
        async with EventVerifier(verify_settings(plc), database_url) as verifier:
            first = await recheck_once(database_url, verifier, retry_after=0)
            second = await recheck_once(database_url, verifier, retry_after=0)
    assert first.given_up == 0
    assert second.given_up == 1
    assert query(database_url, "SELECT count(*) FROM verification_backlog") == [(0,)]
    assert query(database_url, "SELECT verified, verify_reason FROM labels") == [(None, "no_key")]


async def test_round_does_not_deadlock_with_writer(database_url):
    # Regression (review): one transaction for the whole round locked a like, then waited for a post
    # that a writer had deleted, while the writer went on to delete that like: a deadlock.
    async with FakeNetwork(documents=jetstream_documents(), plc_status=503) as plc:
        await index_all(database_url, jetstream_frames(), verify_settings(plc))
    like = query(database_url, "SELECT did, seq FROM likes ORDER BY seq LIMIT 1")[0]
    post = query(database_url, "SELECT did, seq FROM posts ORDER BY seq LIMIT 1")[0]
    endpoint = query(database_url, "SELECT endpoint FROM verification_backlog LIMIT 1")[0][0]
    verified = Verification(True, None, "")
    results = [(endpoint, seq, "commit", ("commit", b"", "", did, "", [], None), verified) for did, seq in (like, post)]
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url) as writer:
        writer.execute("DELETE FROM posts WHERE did = %s AND seq = %s", post)
        summary = RecheckSummary()
        round_thread = threading.Thread(target=recheck._store_outcomes, args=(url, results, summary))
        round_thread.start()
        await asyncio.sleep(0.5)  # the round waits for the post the writer locked
        writer.execute("DELETE FROM likes WHERE did = %s AND seq = %s", like)
        writer.commit()
        round_thread.join(timeout=10)
    assert not round_thread.is_alive()
    assert summary.deferred == 0
    assert query(database_url, "SELECT count(*) FROM likes WHERE did = %s AND seq = %s", like) == [(0,)]


async def test_failed_round_gets_new_verifier(database_url, monkeypatch):
    created = []
    rounds = []

    class CountedVerifier(EventVerifier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    async def failing_round(url, verifier, **options):
        rounds.append(verifier)
        raise BrokenProcessPool("a worker died")

    monkeypatch.setattr(recheck, "EventVerifier", CountedVerifier)
    monkeypatch.setattr(recheck, "recheck_once", failing_round)
    async with FakeNetwork(documents=jetstream_documents()) as plc:
        task = asyncio.create_task(recheck_periodically(database_url, verify_settings(plc), interval=0.05))
        for _ in range(100):
            if len(rounds) >= 2:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert rounds[0] is created[0]
    assert rounds[1] is created[1]
