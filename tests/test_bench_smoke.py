"""Smoke tests of the benchmark scripts: each runs end to end with a tiny N and prints its table.

Speed is never asserted here; the figures of a tiny run mean nothing. The scripts use the test
session's PostgreSQL server through DATABASE_URL (they create and drop their own databases).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from fixture_data import JETSTREAM_CORPUS, REPO_ROOT, fixture_path

SCRIPTS = REPO_ROOT / "scripts"


def run_script(name: str, server_url: str, *args: str) -> subprocess.CompletedProcess:
    fixtures = fixture_path(JETSTREAM_CORPUS).parent.parent
    environment = {**os.environ, "DATABASE_URL": server_url, "INDEXER_FIXTURES": str(fixtures)}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          env=environment, timeout=240, check=False)


@pytest.fixture(scope="module")
def ingest_output(postgres_server_url) -> subprocess.CompletedProcess:
    return run_script("bench_ingest.py", postgres_server_url, "--events", "300", "--batch-size", "100")


def test_bench_ingest_exits_cleanly(ingest_output):
    assert ingest_output.returncode == 0, ingest_output.stderr


@pytest.mark.parametrize("row", [
    "1 decode, ours", "2 decode, atproto SDK", "3 raw COPY", "4 end to end",
    "ratio 1/2", "ratio 4/2", "ratio 4/3", "machine: ", "PostgreSQL ",
])
def test_bench_ingest_prints_row(ingest_output, row):
    assert row in ingest_output.stdout


def test_bench_ingest_sdk_column_state(ingest_output):
    sdk_line = next(line for line in ingest_output.stdout.splitlines() if "atproto SDK" in line)
    if importlib.util.find_spec("atproto") is None:
        assert "not installed" in sdk_line
    else:
        assert "events/s" in sdk_line


def test_bench_ingest_indexes_every_event(ingest_output, postgres_server_url):
    e2e_line = next(line for line in ingest_output.stdout.splitlines() if line.startswith("4 end to end"))
    assert " 300 events," in e2e_line


def test_bench_backfill_prints_rate(postgres_server_url):
    result = run_script("bench_backfill.py", postgres_server_url, "--records", "1500", "--batch-size", "500")
    assert result.returncode == 0, result.stderr
    assert "records/s" in result.stdout


def test_synthetic_stream_is_deterministic():
    fixture_path(JETSTREAM_CORPUS)
    sys.path.insert(0, str(SCRIPTS))
    import synthetic_stream

    first = synthetic_stream.build_frames(200, seed=7)
    second = synthetic_stream.build_frames(200, seed=7)
    assert first == second


def test_synthetic_stream_seqs_are_consecutive():
    fixture_path(JETSTREAM_CORPUS)
    sys.path.insert(0, str(SCRIPTS))
    import synthetic_stream

    seqs = [seq for seq, _frame in synthetic_stream.build_frames(200, seed=7, first_seq=10)]
    assert seqs == list(range(10, 210))


def test_synthetic_stream_records_are_distinct():
    fixture_path(JETSTREAM_CORPUS)
    sys.path.insert(0, str(SCRIPTS))
    import synthetic_stream

    from indexer import frames

    paths = []
    for _seq, frame in synthetic_stream.build_frames(300, seed=3):
        event = frames.decode_repo_frame(frame)
        paths.extend((event.did, op.path) for op in getattr(event, "ops", []) if op.action == "create")
    assert len(paths) == len(set(paths))
