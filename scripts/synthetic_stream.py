"""Build a long firehose of repo frames from the recorded real frames, for benchmarks and chaos tests.

Only about 120 real ``subscribeRepos`` frames are available, so a stream of N events is built by
re-using them. Every synthetic frame is a real frame with these fields rewritten and the frame
re-encoded with libipld:

- ``seq``: consecutive from ``first_seq``;
- ``repo``/``did``: drawn from a pool that starts with the recorded DIDs and continues with random
  ``did:plc:`` identifiers (skewed, so some accounts are much more active than others);
- ``rev``, ``since``, ``time``: a TID and an ISO time that grow by 500 µs per event (about the
  network's peak rate of 2,000 events/s), so every later commit of a DID has a newer rev;
- op ``path``: a fresh TID rkey per op, so every create is a distinct record. Delete and update
  ops name a record created earlier in the same stream, so a delete may carry another collection
  than the recorded delete op;
- ``action``: a post create is turned into an update of an earlier post for the update share.

The record blocks, their CIDs, the MST blocks and the commit block stay byte for byte as
recorded, so no record content is made up. As a consequence, the commit signatures, the commit
CIDs, ``prevData`` and the MST no longer match the rewritten fields: the stream is for throughput
and failure tests, not for verification. ``#identity`` and ``#account`` events are recorded ones
with a pooled DID and new ``seq`` and ``time``.

The same ``(n, seed)`` always gives the same frames. ``iter_frames`` generates them lazily, so a
caller can stream millions of events without holding them.

Import it from another script with ``sys.path.insert(0, "<checkout>/scripts")`` (a script in
``scripts/`` has that directory on its path already).
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libipld

JETSTREAM_FRAMES = "firehose/jetstream-corpus-2026-07-04/frames.lp.bin"
PROTORUNE_FRAMES = "firehose/protorune-2026-08-10"

LIKE = "app.bsky.feed.like"
POST = "app.bsky.feed.post"
REPOST = "app.bsky.feed.repost"
FOLLOW = "app.bsky.graph.follow"
BLOCK = "app.bsky.graph.block"

# Share of each kind of event. The create shares follow the live network as measured in 2025-26:
# about 60 % likes, 15 % posts, 15 % follows, 7 % reposts and 1 % blocks. Deletes are about 5 %
# and updates 1 %, as on the network, and identity and account events a little over 1 %.
DEFAULT_MIX: dict[str, float] = {
    f"create {LIKE}": 0.57,
    f"create {POST}": 0.14,
    f"create {FOLLOW}": 0.14,
    f"create {REPOST}": 0.066,
    f"create {BLOCK}": 0.01,
    "delete": 0.05,
    "update": 0.01,
    "#identity": 0.007,
    "#account": 0.007,
}

# 2026-07-04T14:38:07Z, the time of the recorded jetstream window.
DEFAULT_START = datetime(2026, 7, 4, 14, 38, 7, tzinfo=UTC)
EVENT_INTERVAL_US = 500

# Deletes and updates pick their target among this many recent creates.
_RECENT_CREATES = 20_000
_TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_DID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def fixtures_root(explicit: str | Path | None = None) -> Path:
    """Return the real-data fixtures directory.

    Looks at ``explicit``, then ``INDEXER_FIXTURES``, then ``../shared/fixtures`` beside the
    checkout. Raises FileNotFoundError naming the places tried when none contains ``SOURCES.md``.
    """
    candidates = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if os.environ.get("INDEXER_FIXTURES"):
        candidates.append(Path(os.environ["INDEXER_FIXTURES"]))
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures")
    for candidate in candidates:
        if (candidate / "SOURCES.md").is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"real-data fixtures not found (tried {tried}); set INDEXER_FIXTURES or pass --fixtures"
    )


def tid(microseconds: int, clock_id: int = 0) -> str:
    """Encode a TID: 53 bits of microseconds since the Unix epoch, then a 10-bit clock id."""
    value = (microseconds << 10) | (clock_id & 0x3FF)
    chars = []
    for _ in range(13):
        chars.append(_TID_ALPHABET[value & 0x1F])
        value >>= 5
    return "".join(reversed(chars))


@dataclass
class Templates:
    """The recorded frames, decoded and sorted by what they can stand for."""

    creates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # collection -> commit bodies
    deletes: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)  # recorded update commits
    identities: list[dict[str, Any]] = field(default_factory=list)
    accounts: list[dict[str, Any]] = field(default_factory=list)
    dids: list[str] = field(default_factory=list)  # recorded DIDs, in first-seen order


def read_recorded_frames(root: Path) -> list[bytes]:
    """Return the recorded jetstream-corpus frames followed by the protorune frames."""
    data = (root / JETSTREAM_FRAMES).read_bytes()
    frames = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        frames.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    frames.extend(path.read_bytes() for path in sorted((root / PROTORUNE_FRAMES).glob("*.bin")))
    return frames


def load_templates(root: Path | None = None) -> Templates:
    """Decode the recorded frames into templates; raises FileNotFoundError without fixtures."""
    templates = Templates()
    seen_dids: dict[str, None] = {}
    for frame in read_recorded_frames(root or fixtures_root()):
        header, body = libipld.decode_dag_cbor_multi(frame)
        kind = header.get("t")
        did = body.get("repo", body.get("did"))
        if isinstance(did, str):
            seen_dids.setdefault(did)
        if kind == "#identity":
            templates.identities.append(body)
        elif kind == "#account":
            templates.accounts.append(body)
        elif kind == "#commit":
            _sort_commit(templates, body)
    templates.dids = list(seen_dids)
    return templates


def _sort_commit(templates: Templates, body: dict[str, Any]) -> None:
    actions = {op["action"] for op in body["ops"]}
    collections = {op["path"].partition("/")[0] for op in body["ops"]}
    if actions == {"create"} and len(collections) == 1:
        templates.creates.setdefault(collections.pop(), []).append(body)
    elif actions == {"delete"} and len(body["ops"]) == 1:
        templates.deletes.append(body)
    elif actions == {"update"} and len(body["ops"]) == 1:
        templates.updates.append(body)


@dataclass(frozen=True, slots=True)
class CreatedRecord:
    did: str
    collection: str
    rkey: str
    cid: bytes


class StreamBuilder:
    """Generates synthetic frames one by one; see the module docstring for what is rewritten."""

    def __init__(
        self,
        templates: Templates,
        *,
        seed: int = 0,
        first_seq: int = 1,
        did_count: int = 100_000,
        mix: dict[str, float] | None = None,
        start: datetime = DEFAULT_START,
    ) -> None:
        self.templates = templates
        self.random = random.Random(seed)
        self.seq = first_seq
        self.mix = mix or DEFAULT_MIX
        self._kinds = list(self.mix)
        self._cumulative_weights = []
        total = 0.0
        for kind in self._kinds:
            total += self.mix[kind]
            self._cumulative_weights.append(total)
        self.start_us = int(start.timestamp() * 1_000_000)
        self.dids = self._did_pool(max(did_count, len(templates.dids)))
        self.last_rev: dict[str, str] = {}
        self.recent: list[CreatedRecord] = []
        self.kind_counts: dict[str, int] = dict.fromkeys(self._kinds, 0)

    def _did_pool(self, count: int) -> list[str]:
        pool = list(self.templates.dids)
        while len(pool) < count:
            pool.append("did:plc:" + "".join(self.random.choices(_DID_ALPHABET, k=24)))
        return pool

    def next_frame(self) -> tuple[int, bytes]:
        """Return ``(seq, frame bytes)`` of the next event."""
        seq = self.seq
        self.seq += 1
        micros = self.start_us + (seq * EVENT_INTERVAL_US)
        kind = self.random.choices(self._kinds, cum_weights=self._cumulative_weights)[0]
        if kind == "delete":
            target = self._pick_target()
            if target is None:
                kind = f"create {LIKE}"  # nothing to delete yet at the very start
            else:
                header, body = self._delete(target)
        elif kind == "update":
            header, body = self._update()
        if kind.startswith("create "):
            header, body = self._create(kind.removeprefix("create "), micros)
        elif kind in ("#identity", "#account"):
            header, body = self._account_event(kind)
        self.kind_counts[kind] += 1
        body["seq"] = seq
        body["time"] = _iso_time(micros)
        if header["t"] == "#commit":
            self._stamp_commit(body, micros)
        return seq, libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)

    def _pick_did(self) -> str:
        # Squaring a uniform draw favours the start of the pool: a few accounts are very active.
        return self.dids[int(len(self.dids) * self.random.random() ** 2)]

    def _pick_target(self) -> CreatedRecord | None:
        """Remove and return a random recent create, or None when there is none."""
        if not self.recent:
            return None
        index = self.random.randrange(len(self.recent))
        target = self.recent[index]
        # Swap-remove, so a record is deleted at most once.
        self.recent[index] = self.recent[-1]
        self.recent.pop()
        return target

    def _recent_post(self) -> CreatedRecord | None:
        for _ in range(8):
            if not self.recent:
                return None
            candidate = self.recent[self.random.randrange(len(self.recent))]
            if candidate.collection == POST:
                return candidate
        return None

    def _create(self, collection: str, micros: int) -> tuple[dict, dict]:
        template = self.random.choice(self.templates.creates[collection])
        body = dict(template)
        did = self._pick_did()
        body["repo"] = did
        ops = []
        for index, op in enumerate(template["ops"]):
            rkey = tid(micros, index + 1)
            ops.append({**op, "path": f"{collection}/{rkey}"})
            self._remember(CreatedRecord(did, collection, rkey, op["cid"]))
        body["ops"] = ops
        return {"t": "#commit", "op": 1}, body

    def _remember(self, record: CreatedRecord) -> None:
        if len(self.recent) < _RECENT_CREATES:
            self.recent.append(record)
        else:
            self.recent[self.random.randrange(_RECENT_CREATES)] = record

    def _delete(self, target: CreatedRecord) -> tuple[dict, dict]:
        template = self.random.choice(self.templates.deletes)
        body = dict(template)
        body["repo"] = target.did
        op = dict(template["ops"][0])
        op["path"] = f"{target.collection}/{target.rkey}"
        if "prev" in op:
            op["prev"] = target.cid
        body["ops"] = [op]
        return {"t": "#commit", "op": 1}, body

    def _update(self) -> tuple[dict, dict]:
        """Edit an earlier post with another recorded post's block, or replay a recorded update.

        A real edit changes the content too, so the new block being a different post is fine.
        """
        target = self._recent_post()
        if target is None or self.random.random() < 0.5:
            body = dict(self.random.choice(self.templates.updates))
            body["repo"] = self._pick_did()
            return {"t": "#commit", "op": 1}, body
        template = self.random.choice([t for t in self.templates.creates[POST] if len(t["ops"]) == 1])
        body = dict(template)
        body["repo"] = target.did
        op = {**template["ops"][0], "action": "update", "path": f"{POST}/{target.rkey}", "prev": target.cid}
        body["ops"] = [op]
        return {"t": "#commit", "op": 1}, body

    def _account_event(self, kind: str) -> tuple[dict, dict]:
        templates = self.templates.identities if kind == "#identity" else self.templates.accounts
        body = dict(self.random.choice(templates))
        body["did"] = self._pick_did()
        return {"t": kind, "op": 1}, body

    def _stamp_commit(self, body: dict[str, Any], micros: int) -> None:
        rev = tid(micros)
        did = body["repo"]
        body["since"] = self.last_rev.get(did, body.get("since"))
        body["rev"] = rev
        self.last_rev[did] = rev


def _iso_time(micros: int) -> str:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def iter_frames(
    n: int,
    *,
    seed: int = 0,
    first_seq: int = 1,
    did_count: int | None = None,
    templates: Templates | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``n`` synthetic ``(seq, frame)`` pairs; the same arguments always give the same frames.

    ``did_count`` is the size of the DID pool, by default a quarter of ``n`` (at least the recorded
    DIDs), so most accounts appear a few times, as in a few minutes of the live network.
    """
    builder = StreamBuilder(
        templates or load_templates(),
        seed=seed,
        first_seq=first_seq,
        did_count=did_count if did_count is not None else n // 4,
    )
    for _ in range(n):
        yield builder.next_frame()


def build_frames(n: int, **options: Any) -> list[tuple[int, bytes]]:
    """Return ``n`` synthetic ``(seq, frame)`` pairs as a list; see ``iter_frames``."""
    return list(iter_frames(n, **options))
