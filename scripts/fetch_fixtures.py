"""Download the shared real-data test fixtures from their public upstream repositories.

Usage: ``python scripts/fetch_fixtures.py [--dest DIR] [--only PREFIX] [--verify-only]``.

This script owns rebuilding the fixtures directory that ``tests/fixture_data.py`` looks for
(``INDEXER_FIXTURES``, else ``../shared/fixtures`` beside the checkout). Every file comes from a
pinned upstream commit listed in ``scripts/fixture_sources.json``, and every file written is
checked against the SHA-256 recorded there. Most files are copied byte for byte. Three
groups are derived from an upstream file:

* the Jetstream corpus (bluesky-social/jetstream ``internal/corpus/testdata``): the zstd
  ``frames.bin.zst`` window of 150 frames becomes ``frames.lp.bin`` with the last 112 frames,
  and the Jetstream lines and DID documents are cut down to those frames;
* ``mst-test-suite/tests-diff.tar.gz``: the ``tests/diff`` folder of DavidBuchanan314/mst-test-suite,
  taken from the GitHub source archive and re-packed in the recorded member order;
* ``labels/signed_labels.json`` has no upstream file, so the script prints how to obtain it.

Reading ``.zst`` files needs the optional ``zstandard`` package. Re-packing the tarball byte for
byte needs GNU ``gzip`` on PATH. Without it the tarball is still written, and its tar content
is checked instead of its gzip bytes.

Exit status: 0 when every requested file is present with the expected checksum (files that must
be obtained by hand are reported but do not count as failures), 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SOURCES_FILE = Path(__file__).resolve().parent / "fixture_sources.json"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
DEFAULT_ARCHIVE_BASE_URL = "https://codeload.github.com"
REQUEST_TIMEOUT_SECONDS = 120
DOWNLOAD_WORKERS = 8


class FetchError(Exception):
    """A download failed or an upstream file did not have the expected shape."""


@dataclass
class Outcome:
    """What happened to each requested fixture, for the final summary and exit status."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    manual: list[str] = field(default_factory=list)

    def fail(self, dest: str, reason: str) -> None:
        self.failed.append(dest)
        print(f"FAILED {dest}: {reason}", file=sys.stderr)


# --- locations and checksums -------------------------------------------------------------


def default_dest() -> Path:
    """Return the fixtures directory the tests read: ``INDEXER_FIXTURES``, else ``../shared/fixtures``."""
    configured = os.environ.get("INDEXER_FIXTURES")
    if configured:
        return Path(configured)
    return CHECKOUT.parent / "shared" / "fixtures"


def raw_url(base_url: str, repo: str, commit: str, path: str) -> str:
    """Return the raw-file URL of ``path`` in ``repo`` at ``commit`` (GitHub raw layout)."""
    return f"{base_url.rstrip('/')}/{repo}/{commit}/{path}"


def archive_url(archive_base_url: str, repo: str, commit: str) -> str:
    """Return the URL of the gzip source archive of ``repo`` at ``commit`` (GitHub codeload layout)."""
    return f"{archive_base_url.rstrip('/')}/{repo}/tar.gz/{commit}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    """Return the SHA-256 of a file, or None when the file does not exist."""
    if not path.is_file():
        return None
    return sha256_hex(path.read_bytes())


def fetch_bytes(url: str) -> bytes:
    """Download ``url`` and return the body. Raise FetchError naming the URL on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "indexer-fetch-fixtures"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise FetchError(f"download of {url} failed with HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"download of {url} failed: {exc}") from exc


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` through a temporary file, so an interrupted run never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def store_checked(dest_dir: Path, dest: str, data: bytes, expected: str, outcome: Outcome) -> None:
    """Write one fixture if its checksum is the expected one; otherwise record a failure."""
    actual = sha256_hex(data)
    if actual != expected:
        outcome.fail(dest, f"checksum mismatch: got sha256 {actual}, expected {expected}; file not written")
        return
    write_file(dest_dir / dest, data)
    outcome.written.append(dest)
    print(f"wrote  {dest}")


# --- Jetstream corpus: frame container and the subset that matches the kept frames -----


def split_length_prefixed(data: bytes) -> list[bytes]:
    """Split ``[uint32 little-endian length][frame bytes]`` records; raise FetchError on a truncated record."""
    frames = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise FetchError(f"frame container truncated: length prefix at byte {offset} is incomplete")
        (length,) = struct.unpack_from("<I", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise FetchError(f"frame container truncated: frame at byte {offset} claims {length} bytes")
        frames.append(data[offset + 4 : end])
        offset = end
    return frames


def join_length_prefixed(frames: list[bytes]) -> bytes:
    """Concatenate frames as ``[uint32 little-endian length][frame bytes]`` records."""
    return b"".join(struct.pack("<I", len(frame)) + frame for frame in frames)


def zstd_decompress(data: bytes) -> bytes:
    """Decompress a zstd stream; the optional ``zstandard`` package is imported only here."""
    try:
        import zstandard
    except ImportError as exc:
        raise FetchError(
            "the Jetstream corpus is zstd-compressed upstream and needs the zstandard package: "
            "run `pip install zstandard`, or pass --only with another prefix to skip it"
        ) from exc
    try:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    except zstandard.ZstdError as exc:
        raise FetchError(f"zstd decompression failed: {exc}") from exc


@dataclass
class FrameKeys:
    """Identifiers of the kept frames, used to pick the matching Jetstream lines and DID documents."""

    commits: set[tuple[str, str]] = field(default_factory=set)  # (repo did, commit rev)
    event_seqs: set[int] = field(default_factory=set)  # seq of #identity and #account frames

    @property
    def commit_dids(self) -> set[str]:
        return {did for did, _rev in self.commits}


def read_frame_keys(frames: list[bytes]) -> FrameKeys:
    """Decode each frame's DAG-CBOR header and body and collect its (did, rev) or seq."""
    import libipld  # a dependency of the indexer itself; imported late so --help works without it

    keys = FrameKeys()
    for frame in frames:
        header, body = libipld.decode_dag_cbor_multi(frame)[:2]
        kind = header.get("t")
        if kind == "#commit":
            keys.commits.add((body["repo"], body["rev"]))
        elif kind in ("#identity", "#account"):
            keys.event_seqs.add(body["seq"])
    return keys


def select_jetstream_lines(jsonl: bytes, keys: FrameKeys) -> bytes:
    """Keep, verbatim and in upstream order, the Jetstream v1 lines of the kept frames.

    Commit lines match by (did, commit.rev), so a commit with several ops keeps all its lines.
    Identity and account lines match by seq.
    """
    kept = []
    for line in jsonl.splitlines(keepends=True):
        if not line.strip():
            continue
        event = json.loads(line)
        kind = event.get("kind")
        if kind == "commit" and (event["did"], event["commit"]["rev"]) in keys.commits:
            kept.append(line)
        elif kind in ("identity", "account") and event[kind]["seq"] in keys.event_seqs:
            kept.append(line)
    return b"".join(kept)


def select_did_docs(did_docs_json: bytes, dids: set[str]) -> bytes:
    """Keep the DID documents of ``dids``, sorted by DID, as JSON indented by one space."""
    documents = json.loads(did_docs_json)
    missing = sorted(dids - documents.keys())
    if missing:
        raise FetchError(f"upstream did_docs.json.zst has no document for {len(missing)} commit DIDs, e.g. {missing[0]}")
    kept = {did: documents[did] for did in sorted(dids)}
    return json.dumps(kept, indent=1).encode()


def build_jetstream_corpus(spec: dict, fetch, requested: set[str]) -> dict[str, bytes]:
    """Download the upstream corpus files and return ``{dest: bytes}`` for the ``requested`` outputs."""
    frames_spec = spec["frames"]
    compressed = fetch(spec["repo"], spec["commit"], frames_spec["path"])
    upstream_sum = sha256_hex(compressed)
    if upstream_sum != frames_spec["upstream_sha256"]:
        # Not fatal by itself: the outputs are checked below, and this line says why they differ.
        print(
            f"note: {frames_spec['path']} has sha256 {upstream_sum}, "
            f"recorded {frames_spec['upstream_sha256']}; the derived files will likely not match"
        )
    frames = split_length_prefixed(zstd_decompress(compressed))
    if len(frames) != frames_spec["window_frames"]:
        print(f"note: {frames_spec['path']} holds {len(frames)} frames, recorded {frames_spec['window_frames']}")
    kept_frames = frames[-frames_spec["keep_last_frames"] :]

    outputs = {}
    if frames_spec["dest"] in requested:
        outputs[frames_spec["dest"]] = join_length_prefixed(kept_frames)
    lines_spec, docs_spec = spec["jetstream_lines"], spec["did_docs"]
    if not {lines_spec["dest"], docs_spec["dest"]} & requested:
        return outputs

    keys = read_frame_keys(kept_frames)
    if lines_spec["dest"] in requested:
        jsonl = fetch(spec["repo"], spec["commit"], lines_spec["path"])
        outputs[lines_spec["dest"]] = select_jetstream_lines(jsonl, keys)
    if docs_spec["dest"] in requested:
        did_docs = zstd_decompress(fetch(spec["repo"], spec["commit"], docs_spec["path"]))
        outputs[docs_spec["dest"]] = select_did_docs(did_docs, keys.commit_dids)
    return outputs


# --- mst-test-suite diff cases: re-pack tests/diff from the source archive --------------


def tarball_member_names(spec: dict) -> list[str]:
    """Return the file member names in the recorded order (stored as big-endian uint16 pair indexes)."""
    packed = base64.b64decode(spec["member_order_u16be_base64"])
    side = spec["pairs_per_side"]
    names = []
    for (index,) in struct.iter_unpack(">H", packed):
        names.append(spec["member_name"].format(first=index // side, second=index % side))
    return names


def extract_archive_files(archive: bytes, prefix: str) -> dict[str, bytes]:
    """Return ``{path: bytes}`` for regular files under ``prefix`` in a GitHub source archive.

    GitHub puts every path under one top folder (``REPO-COMMIT/``), which is stripped here.
    """
    contents = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as source:
        for member in source:
            _top, _, path = member.name.partition("/")
            if member.isfile() and path.startswith(prefix):
                contents[path] = source.extractfile(member).read()
    return contents


def pack_tarball(spec: dict, contents: dict[str, bytes]) -> bytes:
    """Write an uncompressed GNU tar with the recorded member order, owner, modes and mtime."""
    names = tarball_member_names(spec)
    missing = [name for name in names if name not in contents]
    if missing:
        raise FetchError(f"source archive lacks {len(missing)} of {len(names)} diff cases, e.g. {missing[0]}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in spec["directories"]:
            tar.addfile(tar_info(spec, name, tarfile.DIRTYPE, 0))
        for name in names:
            data = contents[name]
            tar.addfile(tar_info(spec, name, tarfile.REGTYPE, len(data)), io.BytesIO(data))
    return out.getvalue()


def tar_info(spec: dict, name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mtime = spec["mtime"]
    info.mode = int(spec["directory_mode" if kind == tarfile.DIRTYPE else "file_mode"], 8)
    info.uid = info.gid = 0
    info.uname, info.gname = spec["owner"], spec["group"]
    return info


def gzip_tarball(tar_bytes: bytes) -> tuple[bytes, bool]:
    """Compress the tar; return (bytes, True) when GNU ``gzip -n -6`` made them.

    The recorded tarball was compressed by GNU gzip at its default level without a name or
    timestamp, which Python's zlib does not reproduce byte for byte. Without GNU gzip the
    result is valid but has a different SHA-256.
    """
    gzip_program = shutil.which("gzip")
    if gzip_program is not None:
        version = subprocess.run([gzip_program, "--version"], capture_output=True, text=True, check=False)
        if version.returncode == 0 and "gzip" in version.stdout and "Free Software" in version.stdout:
            done = subprocess.run([gzip_program, "-n", "-6", "-c"], input=tar_bytes, capture_output=True, check=True)
            return done.stdout, True
    return gzip.compress(tar_bytes, compresslevel=6, mtime=0), False


def build_mst_diff_tarball(spec: dict, archive_base_url: str, outcome: Outcome, dest_dir: Path) -> None:
    """Fetch the mst-test-suite source archive and write the re-packed ``tests-diff.tar.gz``."""
    dest = spec["dest"]
    url = archive_url(archive_base_url, spec["repo"], spec["commit"])
    print(f"fetch  {url} (source archive for {dest})")
    try:
        contents = extract_archive_files(fetch_bytes(url), "tests/diff/")
        tar_bytes = pack_tarball(spec, contents)
    except (FetchError, tarfile.TarError, OSError) as exc:
        outcome.fail(dest, str(exc))
        return
    if sha256_hex(tar_bytes) != spec["tar_sha256"]:
        outcome.fail(dest, f"re-packed tar has sha256 {sha256_hex(tar_bytes)}, expected {spec['tar_sha256']}")
        return
    compressed, by_gnu_gzip = gzip_tarball(tar_bytes)
    write_file(dest_dir / dest, compressed)
    outcome.written.append(dest)
    if sha256_hex(compressed) == spec["sha256"]:
        print(f"wrote  {dest}")
        return
    # The tar inside is verified above, so only the compression differs from the recorded file.
    reason = "this gzip compresses differently" if by_gnu_gzip else "GNU gzip not found"
    print(f"wrote  {dest} ({reason}: tar content verified, gzip bytes differ from the recorded sha256)")


# --- driving a run -------------------------------------------------------------------------


def selected(dest: str, only: str | None) -> bool:
    return only is None or dest.startswith(only)


def fetch_plain_files(sources: dict, dest_dir: Path, base_url: str, only: str | None, outcome: Outcome) -> None:
    """Download the byte-identical files that are missing or differ from their recorded checksum."""
    pending = []
    for entry in sources["files"]:
        if not selected(entry["dest"], only):
            continue
        if file_sha256(dest_dir / entry["dest"]) == entry["sha256"]:
            outcome.unchanged.append(entry["dest"])
        else:
            pending.append(entry)

    def download(entry: dict) -> tuple[dict, bytes | FetchError]:
        try:
            return entry, fetch_bytes(raw_url(base_url, entry["repo"], entry["commit"], entry["path"]))
        except FetchError as exc:
            return entry, exc

    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
        for entry, result in pool.map(download, pending):
            if isinstance(result, FetchError):
                outcome.fail(entry["dest"], str(result))
            else:
                store_checked(dest_dir, entry["dest"], result, entry["sha256"], outcome)


def fetch_jetstream_corpus(sources: dict, dest_dir: Path, base_url: str, only: str | None, outcome: Outcome) -> None:
    """Build the Jetstream corpus outputs that are selected and not already correct."""
    spec = sources["jetstream_corpus"]
    outputs = [spec[part] for part in ("frames", "jetstream_lines", "did_docs")]
    requested = set()
    for output in outputs:
        if not selected(output["dest"], only):
            continue
        if file_sha256(dest_dir / output["dest"]) == output["sha256"]:
            outcome.unchanged.append(output["dest"])
        else:
            requested.add(output["dest"])
    if not requested:
        return

    def fetch(repo: str, commit: str, path: str) -> bytes:
        url = raw_url(base_url, repo, commit, path)
        print(f"fetch  {url}")
        return fetch_bytes(url)

    try:
        built = build_jetstream_corpus(spec, fetch, requested)
    except (FetchError, ValueError, KeyError) as exc:
        for dest in sorted(requested):
            outcome.fail(dest, f"could not derive it from the Jetstream corpus: {exc}")
        return
    for output in outputs:
        if output["dest"] in built:
            store_checked(dest_dir, output["dest"], built[output["dest"]], output["sha256"], outcome)
    print(f"note: {sources['held_back']}")


def fetch_tarball(sources: dict, dest_dir: Path, archive_base_url: str, only: str | None, outcome: Outcome) -> None:
    spec = sources["mst_diff_tarball"]
    if not selected(spec["dest"], only):
        return
    if tarball_matches(dest_dir / spec["dest"], spec):
        outcome.unchanged.append(spec["dest"])
        return
    build_mst_diff_tarball(spec, archive_base_url, outcome, dest_dir)


def tarball_matches(path: Path, spec: dict) -> bool:
    """Return True when the tarball has the recorded bytes, or at least the recorded tar content."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    if sha256_hex(data) == spec["sha256"]:
        return True
    try:
        return sha256_hex(gzip.decompress(data)) == spec["tar_sha256"]
    except (OSError, EOFError):
        return False


def report_manual_files(sources: dict, dest_dir: Path, only: str | None, outcome: Outcome) -> None:
    """Say which files must be obtained by hand; check them when they are already present."""
    for entry in sources["manual"]:
        dest = entry["dest"]
        if not selected(dest, only):
            continue
        actual = file_sha256(dest_dir / dest)
        if actual == entry["sha256"]:
            outcome.unchanged.append(dest)
        elif actual is not None:
            outcome.fail(dest, f"checksum mismatch: got sha256 {actual}, expected {entry['sha256']}")
        else:
            outcome.manual.append(dest)
            print(f"MANUAL {dest}: {entry['description']}")


def write_index_files(sources: dict, dest_dir: Path) -> None:
    """Write SHA256SUMS and a SOURCES.md provenance list when the directory has none.

    ``tests/fixture_data.py`` recognises a fixtures directory by its SOURCES.md, so a fetched
    directory needs one. An existing SOURCES.md (such as the original, longer one) is kept.
    """
    entries = expected_sums(sources)
    sums_path = dest_dir / "SHA256SUMS"
    if not sums_path.exists():
        lines = [f"{digest}  ./{dest}\n" for dest, digest in sorted(entries.items())]
        write_file(sums_path, "".join(lines).encode())
    readme_path = dest_dir / "SOURCES.md"
    if not readme_path.exists():
        write_file(readme_path, sources_markdown(sources).encode())


def sources_markdown(sources: dict) -> str:
    lines = [
        "# Test fixtures fetched by scripts/fetch_fixtures.py",
        "",
        "Every file is third-party public data, downloaded from the upstream commit listed below.",
        "Integrity: `sha256sum -c SHA256SUMS`.",
        "",
        "| file | upstream repository | commit | upstream path |",
        "|---|---|---|---|",
    ]
    for entry in sources["files"]:
        lines.append(f"| `{entry['dest']}` | {entry['repo']} | `{entry['commit']}` | `{entry['path']}` |")
    corpus = sources["jetstream_corpus"]
    for part in ("frames", "jetstream_lines", "did_docs"):
        output = corpus[part]
        lines.append(f"| `{output['dest']}` | {corpus['repo']} | `{corpus['commit']}` | `{output['path']}` (derived) |")
    tarball = sources["mst_diff_tarball"]
    lines.append(f"| `{tarball['dest']}` | {tarball['repo']} | `{tarball['commit']}` | `tests/diff/` (re-packed) |")
    lines += ["", sources["held_back"], ""]
    for entry in sources["manual"]:
        lines.append(f"Not downloadable: `{entry['dest']}`. {entry['description']}")
    return "\n".join(lines) + "\n"


def expected_sums(sources: dict) -> dict[str, str]:
    """Return ``{dest: sha256}`` for every fixture file described in the sources."""
    sums = {entry["dest"]: entry["sha256"] for entry in sources["files"] + sources["manual"]}
    for part in ("frames", "jetstream_lines", "did_docs"):
        output = sources["jetstream_corpus"][part]
        sums[output["dest"]] = output["sha256"]
    sums[sources["mst_diff_tarball"]["dest"]] = sources["mst_diff_tarball"]["sha256"]
    return sums


def verify_directory(sources: dict, dest_dir: Path, only: str | None) -> Outcome:
    """Check an existing fixtures directory against the recorded checksums without downloading."""
    outcome = Outcome()
    tarball_spec = sources["mst_diff_tarball"]
    manual_dests = {entry["dest"] for entry in sources["manual"]}
    for dest, digest in sorted(expected_sums(sources).items()):
        if not selected(dest, only) or dest in manual_dests:
            continue
        path = dest_dir / dest
        actual = file_sha256(path)
        if actual == digest or (dest == tarball_spec["dest"] and tarball_matches(path, tarball_spec)):
            outcome.unchanged.append(dest)
        elif actual is None:
            outcome.fail(dest, "missing")
        else:
            outcome.fail(dest, f"checksum mismatch: got sha256 {actual}, expected {digest}")
    report_manual_files(sources, dest_dir, only, outcome)
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="fixtures directory to fill (default: $INDEXER_FIXTURES, else ../shared/fixtures beside the checkout)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL,
                        help=f"raw-file server laid out as BASE/OWNER/REPO/COMMIT/PATH (default: {DEFAULT_BASE_URL})")
    parser.add_argument("--archive-base-url", default=DEFAULT_ARCHIVE_BASE_URL,
                        help=f"source-archive server laid out as BASE/OWNER/REPO/tar.gz/COMMIT (default: {DEFAULT_ARCHIVE_BASE_URL})")
    parser.add_argument("--only", metavar="PREFIX", default=None,
                        help="handle only fixtures whose path in the directory starts with PREFIX, e.g. repos/")
    parser.add_argument("--verify-only", action="store_true",
                        help="download nothing; check the files already in --dest against the recorded checksums")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dest_dir = args.dest if args.dest is not None else default_dest()
    sources = json.loads(SOURCES_FILE.read_text())
    if args.verify_only:
        outcome = verify_directory(sources, dest_dir, args.only)
    else:
        outcome = Outcome()
        fetch_plain_files(sources, dest_dir, args.base_url, args.only, outcome)
        fetch_jetstream_corpus(sources, dest_dir, args.base_url, args.only, outcome)
        fetch_tarball(sources, dest_dir, args.archive_base_url, args.only, outcome)
        report_manual_files(sources, dest_dir, args.only, outcome)
        write_index_files(sources, dest_dir)
    print(
        f"{dest_dir}: {len(outcome.written)} written, {len(outcome.unchanged)} already correct, "
        f"{len(outcome.manual)} to obtain by hand, {len(outcome.failed)} failed"
    )
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
