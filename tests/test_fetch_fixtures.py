"""scripts/fetch_fixtures.py against a local stand-in for GitHub raw files and source archives.

The stand-in server binds 127.0.0.1 and serves a tree built here from the shared fixtures. Files
that are byte-identical upstream are copied to their upstream raw URL paths. The upstream shapes
of the derived files are rebuilt from our copies. The Jetstream corpus gets test-made
stand-ins for the 38 frames, lines and DID documents that the fixtures do not contain, so the
script has something to drop. Those stand-ins are not real network data. The script runs as a
subprocess, as a user would run it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fixture_data import JETSTREAM_CORPUS, REPO_ROOT, fixtures_root

SCRIPT = REPO_ROOT / "scripts" / "fetch_fixtures.py"
SIGNED_LABELS = "labels/signed_labels.json"
HELD_BACK_FRAMES = 38


def load_script_module():
    spec = importlib.util.spec_from_file_location("fetch_fixtures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


fetch_fixtures = load_script_module()
SOURCES = json.loads(fetch_fixtures.SOURCES_FILE.read_text())
EXPECTED_SUMS = fetch_fixtures.expected_sums(SOURCES)


def sha256_of(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def shared_fixtures() -> Path:
    root = fixtures_root()
    if root is None:
        pytest.skip("shared fixtures not found; these tests build the upstream tree from them")
    return root


# --- the stand-in upstream tree ------------------------------------------------------------


def copy_plain_files(fixtures: Path, raw_dir: Path) -> None:
    for entry in SOURCES["files"]:
        target = raw_dir / entry["repo"] / entry["commit"] / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fixtures / entry["dest"], target)


def write_jetstream_upstream(fixtures: Path, raw_dir: Path) -> None:
    """Write upstream-shaped corpus files: our data plus stand-ins for the held-back part."""
    zstandard = pytest.importorskip("zstandard")
    spec = SOURCES["jetstream_corpus"]
    upstream = raw_dir / spec["repo"] / spec["commit"] / "internal" / "corpus" / "testdata"
    upstream.mkdir(parents=True, exist_ok=True)
    corpus = fixtures / JETSTREAM_CORPUS
    compress = zstandard.ZstdCompressor().compress

    # Stand-in frames for the held-back part of the window: copies of our first frames.
    frames = fetch_fixtures.split_length_prefixed((corpus / "frames.lp.bin").read_bytes())
    window = frames[:HELD_BACK_FRAMES] + frames
    (upstream / "frames.bin.zst").write_bytes(compress(fetch_fixtures.join_length_prefixed(window)))

    lines = (corpus / "expected_jetstream_v1.jsonl").read_bytes().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["commit"]["rev"] = "standinrev22"
    identity = {"did": first["did"], "time_us": 1, "kind": "identity",
                "identity": {"did": first["did"], "seq": 31527015359, "time": "2026-07-04T14:38:00.000Z"}}
    stand_ins = [json.dumps(first).encode() + b"\n", json.dumps(identity).encode() + b"\n"]
    (upstream / "expected_v1.jsonl").write_bytes(b"".join(stand_ins + lines + stand_ins[:1]))

    documents = json.loads((corpus / "did_docs.json").read_bytes())
    documents["did:plc:standinstandinstandin00"] = next(iter(documents.values()))
    (upstream / "did_docs.json.zst").write_bytes(compress(json.dumps(documents).encode()))


def write_mst_archive(fixtures: Path, archive_dir: Path) -> None:
    """Write a GitHub-style source archive holding the diff cases from our tarball, in another order."""
    spec = SOURCES["mst_diff_tarball"]
    target = archive_dir / spec["repo"] / "tar.gz" / spec["commit"]
    target.parent.mkdir(parents=True)
    top = f"mst-test-suite-{spec['commit']}/"
    with tarfile.open(fixtures / spec["dest"], mode="r:gz") as ours:
        # One sequential pass: seeking backwards in a gzip stream would decompress it again.
        contents = {member.name: ours.extractfile(member).read() for member in ours if member.isfile()}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name in sorted(contents, reverse=True):
            info = tarfile.TarInfo(top + name)
            info.size = len(contents[name])
            archive.addfile(info, io.BytesIO(contents[name]))
        readme = (fixtures / "mst-test-suite" / "README.md").read_bytes()
        info = tarfile.TarInfo(top + "README.md")
        info.size = len(readme)
        archive.addfile(info, io.BytesIO(readme))
    target.write_bytes(buffer.getvalue())


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (signature fixed by http.server)
        pass


def serve(directory: Path):
    """Start a threaded HTTP server for ``directory`` on 127.0.0.1; return (server, base URL)."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def upstream(shared_fixtures, tmp_path_factory):
    """Serve the full stand-in upstream tree; yield (raw base URL, archive base URL)."""
    root = tmp_path_factory.mktemp("upstream")
    copy_plain_files(shared_fixtures, root / "raw")
    write_jetstream_upstream(shared_fixtures, root / "raw")
    write_mst_archive(shared_fixtures, root / "archive")
    server, base = serve(root)
    yield f"{base}/raw", f"{base}/archive"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def full_fetch(upstream, tmp_path_factory):
    """Run one complete fetch into an empty directory; return (destination, completed process)."""
    dest = tmp_path_factory.mktemp("fetched")
    raw_base, archive_base = upstream
    done = run_script("--dest", str(dest), "--base-url", raw_base, "--archive-base-url", archive_base)
    return dest, done


# --- a complete fetch ----------------------------------------------------------------------


def test_fetch_exits_zero_when_complete(full_fetch):
    _dest, done = full_fetch
    assert done.returncode == 0, done.stderr


def test_fetch_reproduces_every_downloadable_file(full_fetch):
    dest, _done = full_fetch
    wrong = [name for name, digest in EXPECTED_SUMS.items() if name != SIGNED_LABELS and sha256_of(dest / name) != digest]
    assert wrong == []


def test_fetch_reports_manual_file(full_fetch):
    dest, done = full_fetch
    assert not (dest / SIGNED_LABELS).exists()
    assert f"MANUAL {SIGNED_LABELS}" in done.stdout


def test_fetch_mentions_held_back_frames(full_fetch):
    _dest, done = full_fetch
    assert "first 38 frames" in done.stdout


def test_fetch_writes_sums_matching_shared(full_fetch, shared_fixtures):
    dest, _done = full_fetch
    written = set((dest / "SHA256SUMS").read_text().splitlines())
    shared = set((shared_fixtures / "SHA256SUMS").read_text().splitlines())
    assert written == shared


def test_fetch_writes_sources_marker(full_fetch):
    dest, _done = full_fetch
    # tests/fixture_data.py recognises a fixtures directory by this file.
    assert (dest / "SOURCES.md").is_file()


def test_rerun_keeps_correct_files(full_fetch, upstream):
    dest, _done = full_fetch
    raw_base, archive_base = upstream
    done = run_script("--dest", str(dest), "--base-url", raw_base, "--archive-base-url", archive_base, "--only", "repos/")
    assert done.returncode == 0, done.stderr
    assert " 0 written" in done.stdout


def test_only_limits_to_prefix(upstream, tmp_path):
    raw_base, archive_base = upstream
    done = run_script("--dest", str(tmp_path), "--base-url", raw_base, "--archive-base-url", archive_base, "--only", "records/")
    fixture_files = {
        str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()
    } - {"SHA256SUMS", "SOURCES.md"}
    assert done.returncode == 0, done.stderr
    assert fixture_files == {"records/indigo_feedpost_record.cbor", "records/indigo_post_richtext_link.cbor"}


def test_tarball_without_gnu_gzip_keeps_content(upstream, tmp_path):
    raw_base, archive_base = upstream
    spec = SOURCES["mst_diff_tarball"]
    env = dict(os.environ, PATH=str(tmp_path / "empty-path"))
    done = run_script(
        "--dest", str(tmp_path), "--base-url", raw_base, "--archive-base-url", archive_base, "--only", spec["dest"], env=env
    )
    tar_bytes = gzip.decompress((tmp_path / spec["dest"]).read_bytes())
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(tar_bytes).hexdigest() == spec["tar_sha256"]
    assert "GNU gzip not found" in done.stdout


# --- failures ------------------------------------------------------------------------------


@pytest.fixture
def records_upstream(shared_fixtures, tmp_path):
    """Serve only the records/ files upstream; the test may damage or remove them before fetching."""
    root = tmp_path / "upstream"
    entries = [entry for entry in SOURCES["files"] if entry["dest"].startswith("records/")]
    for entry in entries:
        target = root / "raw" / entry["repo"] / entry["commit"] / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_fixtures / entry["dest"], target)
    server, base = serve(root)
    yield f"{base}/raw", [root / "raw" / e["repo"] / e["commit"] / e["path"] for e in entries]
    server.shutdown()
    server.server_close()


def test_fetch_rejects_checksum_mismatch(records_upstream, tmp_path):
    raw_base, upstream_files = records_upstream
    damaged = upstream_files[0]
    damaged.write_bytes(damaged.read_bytes() + b"\x00")
    done = run_script("--dest", str(tmp_path / "out"), "--base-url", raw_base, "--only", "records/")
    assert done.returncode == 1
    assert "checksum mismatch" in done.stderr
    assert not (tmp_path / "out" / "records" / "indigo_feedpost_record.cbor").exists()


def test_fetch_reports_missing_upstream_file(records_upstream, tmp_path):
    raw_base, upstream_files = records_upstream
    upstream_files[1].unlink()
    done = run_script("--dest", str(tmp_path / "out"), "--base-url", raw_base, "--only", "records/")
    assert done.returncode == 1
    assert "HTTP 404" in done.stderr
    assert "records/indigo_post_richtext_link.cbor" in done.stderr


def test_verify_only_accepts_shared_fixtures(shared_fixtures):
    done = run_script("--verify-only", "--dest", str(shared_fixtures))
    assert done.returncode == 0, done.stderr


def test_verify_only_reports_corrupted_file(shared_fixtures, tmp_path):
    shutil.copytree(shared_fixtures / "records", tmp_path / "records")
    damaged = tmp_path / "records" / "indigo_feedpost_record.cbor"
    damaged.chmod(0o644)
    damaged.write_bytes(b"\x00" + damaged.read_bytes()[1:])
    done = run_script("--verify-only", "--dest", str(tmp_path), "--only", "records/")
    assert done.returncode == 1
    assert "records/indigo_feedpost_record.cbor: checksum mismatch" in done.stderr


# --- frame container -----------------------------------------------------------------------


def test_length_prefixed_round_trip(shared_fixtures):
    data = (shared_fixtures / JETSTREAM_CORPUS / "frames.lp.bin").read_bytes()
    frames = fetch_fixtures.split_length_prefixed(data)
    assert len(frames) == 112
    assert fetch_fixtures.join_length_prefixed(frames) == data


def test_length_prefixed_rejects_truncation(shared_fixtures):
    data = (shared_fixtures / JETSTREAM_CORPUS / "frames.lp.bin").read_bytes()
    with pytest.raises(fetch_fixtures.FetchError, match="truncated"):
        fetch_fixtures.split_length_prefixed(data[:-1])
