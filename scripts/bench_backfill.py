"""Measure repo backfill throughput: records/s from repo CAR files into PostgreSQL.

The real repo exports among the fixtures hold about 650 records in all, so they are replicated:
each replica reads a CAR again from its bytes, walks its MST from the commit, decodes every record
and builds its row with ``records.row_for_record`` (``seq`` None, as for a repo export), under a
DID of its own, so every replica's records are distinct rows. The rows are written through
``Store.write`` in batches, one transaction per batch (staging ``COPY`` + rev-gated upsert).

NOTE: this drives ``Batch``/``Store`` directly with record rows, because no backfill module
existed when it was written. Once ``indexer.backfill`` offers a repo-to-database entry point, the
benchmark should call that instead, so that it measures the real backfill path.

Run: ``.venv/bin/python scripts/bench_backfill.py --records 200000``
"""

from __future__ import annotations

import os

os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import libipld

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synthetic_stream  # noqa: E402
from bench_ingest import ScratchDatabases, peak_rss, server_version  # noqa: E402

from indexer import car, db, mst, native, records  # noqa: E402
from indexer.store import Batch, Store  # noqa: E402

# Repo exports (com.atproto.sync.getRepo) among the fixtures; slices and empty repos are left out.
REPO_FILES = (
    "repos/jetstream_did-plc-53iucmf5ldftgqyf2ac7hmhd.repo.car",
    "repos/repostream_little.car",
    "repos/rsky_valid_repo.car",
    "repos/arroba_snarfed2.car",
    "repos/indigo_paul_staging.repo.car",
    "repos/indigo_fakermaker.repo.car",
    "repos/indigo_greenground.repo.car",
)


@dataclass(frozen=True)
class RepoFile:
    name: str
    data: bytes
    records: int


def repo_records(data: bytes, did: str) -> list[records.RecordRow]:
    """Return the rows of every record in one repo CAR, attributed to ``did``."""
    archive = car.read_car(data)
    commit = libipld.decode_dag_cbor(archive.blocks[archive.roots[0]])
    rev = commit.get("rev") or "2222222222222"  # v2 repos may lack rev; any TID keeps the rows valid
    tree = mst.Mst.load(commit["data"], archive.blocks)
    rows = []
    for key, cid in tree.items():
        collection, _slash, rkey = key.decode().partition("/")
        block = archive.blocks.get(cid)
        if block is None:
            continue
        record = libipld.decode_dag_cbor(block)
        rows.append(records.row_for_record(collection, did, rkey, libipld.encode_cid(cid), rev, None, record,
                                           block=block))
    return rows


def load_repos(root: Path) -> list[RepoFile]:
    repos = []
    for name in REPO_FILES:
        path = root / name
        if path.is_file():
            data = path.read_bytes()
            repos.append(RepoFile(name, data, len(repo_records(data, "did:plc:bench"))))
    return repos


def index_replicas(url: str, repos: list[RepoFile], target: int, batch_records: int) -> tuple[int, float]:
    """Index replicas until ``target`` records are written; return (records, seconds)."""
    store = Store(url, "repo", job="bench-backfill")
    store.connect()
    written = 0
    batch = Batch(endpoint="repo")
    batches = 0
    replica = 0
    started = time.perf_counter()
    while written < target:
        for repo in repos:
            did = f"did:plc:bench{replica:019d}"
            for row in repo_records(repo.data, did):
                key = (row.values["did"], row.values.get("collection", row.table.name), row.values["rkey"])
                batch.records.setdefault(row.table.name, {})[key] = row.values
                written += 1
                if written % batch_records == 0:
                    batches += 1
                    batch.cursor = batches  # a backfill job's progress marker; Store skips batches without one
                    store.write(batch)
                    batch = Batch(endpoint="repo")
            replica += 1
            if written >= target:
                break
    if batch.records:
        batch.cursor = batches + 1
        store.write(batch)
    elapsed = time.perf_counter() - started
    store.close()
    return written, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="records to index (default: 200000)")
    parser.add_argument("--batch-size", type=int, default=5000, help="records per committed batch (default: 5000)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="PostgreSQL server (default: DATABASE_URL, else an embedded server in a temporary directory)")
    parser.add_argument("--fixtures", help="real-data fixtures directory (default: INDEXER_FIXTURES or ../shared/fixtures)")
    args = parser.parse_args(argv)
    try:
        root = synthetic_stream.fixtures_root(args.fixtures)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    repos = load_repos(root)
    if not repos:
        print(f"error: no repo CAR files found under {root / 'repos'}", file=sys.stderr)
        return 2

    if args.database_url:
        server_url, where = db.normalize_url(args.database_url), "DATABASE_URL"
    else:
        from indexer import embedded

        server_url, where = embedded.start_scratch("indexer-bench-").url, "embedded, unix socket"
    databases = ScratchDatabases(server_url)
    try:
        written, elapsed = index_replicas(databases.create("backfill"), repos, args.records, args.batch_size)
        print(f"machine: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
              f"PostgreSQL {server_version(server_url)} ({where}), load average {os.getloadavg()[0]:.1f}, "
              f"indexer {native.summary()}")
        print(f"repos: {len(repos)} real repo CARs, {sum(repo.records for repo in repos)} records, replicated")
        print(f"{'backfill (CAR -> MST walk -> rows -> Store)':<48} {written / elapsed:>10,.0f} records/s  "
              f"{written:,} records in {elapsed:.1f} s, batch {args.batch_size}, "
              f"peak RSS {peak_rss() / 2**20:.0f} MB")
    finally:
        databases.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
