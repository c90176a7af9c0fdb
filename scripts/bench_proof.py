"""Time the Sync 1.1 commit-proof check and the whole commit check on the recorded relay commits.

Reads the ``#commit`` frames of the jetstream corpus (110 real commits with ``prevData``), reads
each commit's CAR once, then calls ``verify_commit_proof`` and ``verify_commit_blocks`` on them
for ``--rounds`` rounds and prints the best round's CPU time per commit in µs. Every call starts
from the raw blocks, so nothing carries over from one call to the next. The fixtures directory is
``INDEXER_FIXTURES``, else ``../shared/fixtures`` beside the checkout.

Run: ``.venv/bin/python scripts/bench_proof.py --rounds 200``
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import libipld

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer import car, native  # noqa: E402
from indexer.crypto import signing_key  # noqa: E402
from indexer.verify import verify_commit_blocks, verify_commit_proof  # noqa: E402

CORPUS = "firehose/jetstream-corpus-2026-07-04"


def fixtures_root() -> Path:
    configured = os.environ.get("INDEXER_FIXTURES")
    root = Path(configured) if configured else Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
    if not (root / CORPUS / "frames.lp.bin").is_file():
        sys.exit(f"fixture {CORPUS}/frames.lp.bin not found under {root}; set INDEXER_FIXTURES")
    return root


def read_commits(root: Path) -> list[dict[str, Any]]:
    """Return the decoded ``#commit`` bodies of the length-prefixed frame file."""
    data = (root / CORPUS / "frames.lp.bin").read_bytes()
    bodies = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        header, body = libipld.decode_dag_cbor_multi(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
        if header.get("t") == "#commit" and body.get("prevData") is not None:
            bodies.append(body)
    return bodies


def time_per_commit(check, cases: list[tuple], rounds: int) -> float:
    """Return the best round's process CPU time per case, in µs."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time_ns()
        for case in cases:
            check(*case)
        best = min(best, time.process_time_ns() - start)
    return best / len(cases) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds over all commits; the best round counts")
    arguments = parser.parse_args()

    root = fixtures_root()
    documents = json.loads((root / CORPUS / "did_docs.json").read_text())
    keys = {did: signing_key(document, "atproto") for did, document in documents.items()}
    proof_cases = []
    commit_cases = []
    for body in read_commits(root):
        blocks = car.read_car(body["blocks"]).blocks
        data = libipld.decode_dag_cbor(blocks[body["commit"]])["data"]
        proof_cases.append((blocks, data, body["ops"], body["prevData"]))
        commit_cases.append(
            (blocks, body["commit"], keys[body["repo"]], body["repo"], body["rev"], body["ops"], body["prevData"])
        )

    failures = [case for case in proof_cases if not verify_commit_proof(*case).verified]
    if failures:
        sys.exit(f"{len(failures)} of {len(proof_cases)} recorded proofs do not verify")

    proof = time_per_commit(verify_commit_proof, proof_cases, arguments.rounds)
    whole = time_per_commit(verify_commit_blocks, commit_cases, max(1, arguments.rounds // 4))
    print(f"commits: {len(proof_cases)}, rounds: {arguments.rounds}, indexer {native.summary()}")
    print(f"verify_commit_proof:  {proof:7.1f} µs per commit")
    print(f"verify_commit_blocks: {whole:7.1f} µs per commit")


if __name__ == "__main__":
    main()
