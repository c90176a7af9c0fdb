"""Locate the shared real-data fixtures (recorded frames, repo CARs, signed labels, interop vectors).

They are other projects' files and are not part of this repository. Tests look in the directory named
by ``INDEXER_FIXTURES``, else ``../shared/fixtures`` beside the checkout, and skip with a hint when
neither exists.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import libipld
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FETCH_HINT = "run `python scripts/fetch_fixtures.py` or set INDEXER_FIXTURES to the fixtures directory"


def fixtures_root() -> Path | None:
    """Return the fixtures directory, or None when it is not on this machine."""
    configured = os.environ.get("INDEXER_FIXTURES")
    candidates = [Path(configured)] if configured else []
    candidates.append(REPO_ROOT.parent / "shared" / "fixtures")
    for candidate in candidates:
        if (candidate / "SOURCES.md").is_file():
            return candidate
    return None


def fixture_path(relative: str) -> Path:
    """Return the path of one fixture file, skipping the calling test when it is absent."""
    root = fixtures_root()
    if root is None:
        pytest.skip(f"real-data fixtures not found; {FETCH_HINT}")
    path = root / relative
    if not path.exists():
        pytest.skip(f"fixture {relative} not found under {root}; {FETCH_HINT}")
    return path


def read_length_prefixed(path: Path) -> list[bytes]:
    """Split a file of ``[uint32 little-endian length][frame bytes]`` records into frames."""
    data = path.read_bytes()
    frames = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        frames.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return frames


def commit_bodies(frames: list[bytes]) -> list[dict]:
    """Return the decoded bodies of the ``#commit`` frames among ``frames``, in order."""
    bodies = []
    for frame in frames:
        header, body = libipld.decode_dag_cbor_multi(frame)
        if header.get("t") == "#commit":
            bodies.append(body)
    return bodies


JETSTREAM_CORPUS = "firehose/jetstream-corpus-2026-07-04"
PROTORUNE_FRAMES = "firehose/protorune-2026-08-10"
INDIGO_SCENARIOS = "firehose/indigo-relay-scenarios-2025-04"
