"""Fuzzing the decoder and the writer with mutated real frames and generated ones.

The frame generators are those of ``scripts/fuzz_frames.py`` (which runs the same checks for
longer); hypothesis draws the seed of each one. Every frame goes through both stream decoders and,
for the events the indexer stores, into a ``Batch``; a sample is also written to the test
database. The rule: a frame ends as a decoded event, a counted skip or a dead letter, never an
exception. The hypothesis tests decode 10,000 frames in total, plus the big and deep ones.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixture_data import JETSTREAM_CORPUS, REPO_ROOT, fixture_path
from indexer.events import Invalid

pytestmark = pytest.mark.timeout(300)

SCRIPT = REPO_ROOT / "scripts" / "fuzz_frames.py"
_spec = importlib.util.spec_from_file_location("fuzz_frames", SCRIPT)
fuzz_frames = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_frames)

FRAMING_KINDS = ["truncated", "trailing", "header_only", "huge_length"]
FIELD_KINDS = ["wrong_type", "forbidden_cbor", "invalid_utf8", "replaced_bytes"]
GENERATED_KINDS = ["generated", "generated_labels", "random_bytes"]
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    fixture_path(JETSTREAM_CORPUS)  # skips the module's tests when the recorded frames are absent
    return fuzz_frames.load_corpus()


def frame_of(kind: str, seed: int, corpus: list[bytes]) -> bytes:
    return fuzz_frames.KINDS[kind](random.Random(seed), corpus)


@fuzz(3000)
@given(kind=st.sampled_from(FRAMING_KINDS), seed=SEEDS)
def test_broken_framing_dead_lettered(corpus, kind, seed):
    repo_outcome, _label_outcome = fuzz_frames.classify(frame_of(kind, seed, corpus))

    assert repo_outcome == "dead letter invalid_frame"


@fuzz(4000)
@given(kind=st.sampled_from(FIELD_KINDS), seed=SEEDS)
def test_bad_field_values_never_raise(corpus, kind, seed):
    repo_outcome, label_outcome = fuzz_frames.classify(frame_of(kind, seed, corpus))

    assert repo_outcome
    assert label_outcome


@fuzz(3000)
@given(kind=st.sampled_from(GENERATED_KINDS), seed=SEEDS)
def test_generated_frames_never_raise(corpus, kind, seed):
    repo_outcome, label_outcome = fuzz_frames.classify(frame_of(kind, seed, corpus))

    assert repo_outcome
    assert label_outcome


@fuzz(12)
@given(seed=SEEDS)
def test_big_frames_never_raise(corpus, seed):
    frame = fuzz_frames.big(random.Random(seed), corpus)
    repo_outcome, _label_outcome = fuzz_frames.classify(frame)

    assert len(frame) > 5 * 1024 * 1024
    assert repo_outcome in {"commit", "dead letter invalid_car", "dead letter invalid_frame"}


def test_deep_nesting_survives_in_child():
    """Deeply nested frames are decoded in a child process, so a native stack overflow would show."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--deep-child"], capture_output=True, text=True,
                            timeout=240, check=False)
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in lines] == list(fuzz_frames.deep_frames())
    assert all("dead letter" in line or "skipped" in line or "dead-lettered" in line for line in lines)


def test_decoding_keeps_memory_flat(corpus):
    """RSS after ten rounds of mixed frames (some of 5 MB) stays near its level after the first."""
    rng = random.Random(5)
    kinds = list(fuzz_frames.KINDS)

    def one_round() -> None:
        for index in range(300):
            fuzz_frames.classify(fuzz_frames.KINDS[kinds[index % len(kinds)]](rng, corpus))
        fuzz_frames.classify(fuzz_frames.big(rng, corpus))

    one_round()
    after_first = fuzz_frames.rss_mb()
    for _ in range(9):
        one_round()

    # NOTE: 48 MB leaves room for allocator noise around the 5 MB frames; a leak of one 5 MB
    # frame per round would exceed it.
    assert fuzz_frames.rss_mb() - after_first < 48


def test_fuzzed_frames_written_or_dead_lettered(corpus, database_url):
    rng = random.Random(11)
    kinds = list(fuzz_frames.KINDS)
    sample = [fuzz_frames.KINDS[kinds[index % len(kinds)]](rng, corpus) for index in range(500)]
    sample.append(fuzz_frames.big(rng, corpus))
    invalid_frames = {event.raw for event in fuzz_frames.events_for_store(sample) if isinstance(event, Invalid)}

    fuzz_frames.write_sample(database_url, sample)
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1)) as connection:
        stored_raw = {row[0] for row in connection.execute("SELECT raw FROM dead_letters WHERE raw IS NOT NULL")}

    assert invalid_frames
    assert invalid_frames <= stored_raw
