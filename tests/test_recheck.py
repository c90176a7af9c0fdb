"""Events stored unchecked (no key) are kept in verification_backlog and checked again later.

Recorded relay commits and real signed labels are indexed while the local PLC directory fails, then
``recheck_once`` runs once the directory serves the documents again.
"""

from __future__ import annotations

import asyncio

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
from indexer.recheck import decode_work, encode_work, recheck_once, recheck_periodically
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
    assert (summary.checked, summary.verified, summary.failed, summary.still_unchecked) == (110, 110, 0, 0)
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
