"""The usual-shape commit decoder gives exactly what the field-by-field decoder gives, or defers to it."""

from __future__ import annotations

import copy

import pytest
from fixture_data import JETSTREAM_CORPUS, PROTORUNE_FRAMES, commit_bodies, fixture_path, read_length_prefixed

from indexer.errors import DecodeError
from indexer.frames import _checked_commit, _commit, _usual_commit


def corpus_commit_bodies() -> list[dict]:
    frames = read_length_prefixed(fixture_path(f"{JETSTREAM_CORPUS}/frames.lp.bin"))
    frames += [path.read_bytes() for path in sorted(fixture_path(PROTORUNE_FRAMES).glob("frame_*.bin"))]
    return commit_bodies(frames)


def outcome(decode, body: dict, *, verify_cids: bool = False):
    """Return the decoded commit, or the DecodeError's reason and message."""
    try:
        return decode(copy.deepcopy(body), verify_cids=verify_cids)
    except DecodeError as error:
        return (error.reason, str(error))


@pytest.mark.parametrize("verify_cids", [False, True])
def test_corpus_commits_decode_alike(verify_cids) -> None:
    bodies = corpus_commit_bodies()
    fast = 0
    for body in bodies:
        expected = outcome(_checked_commit, body, verify_cids=verify_cids)
        assert outcome(_commit, body, verify_cids=verify_cids) == expected, body.get("seq")
        fast += _usual_commit(copy.deepcopy(body), verify_cids=verify_cids) is not None
    assert fast > len(bodies) // 2


def first_create(body: dict) -> dict:
    return next(op for op in body["ops"] if op["action"] != "delete")


def odd_bodies(body: dict) -> dict[str, dict]:
    """Variants of one real commit body, each unusual in one way."""
    variants = {}

    def variant(name: str, change) -> None:
        changed = copy.deepcopy(body)
        change(changed)
        variants[name] = changed

    variant("negative seq", lambda b: b.update(seq=-1))
    variant("bool seq", lambda b: b.update(seq=True))
    variant("huge seq", lambda b: b.update(seq=2**63))
    variant("missing repo", lambda b: b.pop("repo"))
    variant("int rev", lambda b: b.update(rev=5))
    variant("int since", lambda b: b.update(since=5))
    variant("missing blocks", lambda b: b.pop("blocks"))
    variant("empty blocks", lambda b: b.update(blocks=b""))
    variant("truncated blocks", lambda b: b.update(blocks=b["blocks"][:-3]))
    variant("too big", lambda b: b.update(tooBig=True))
    variant("string rebase", lambda b: b.update(rebase="yes"))
    variant("bad commit cid", lambda b: b.update(commit=b"\x01\x71"))
    variant("bad prevData", lambda b: b.update(prevData=b"\x00\x01"))
    variant("ops not a list", lambda b: b.update(ops={}))
    variant("op not a map", lambda b: b["ops"].append("create"))
    variant("bad action", lambda b: first_create(b).update(action="upsert"))
    variant("map action", lambda b: first_create(b).update(action={}))
    variant("missing path", lambda b: first_create(b).pop("path"))
    variant("path without slash", lambda b: first_create(b).update(path="app.bsky.feed.like"))
    variant("invalid collection", lambda b: first_create(b).update(path="not an nsid/abc"))
    variant("invalid rkey", lambda b: first_create(b).update(path="app.bsky.feed.like/a b"))
    variant("dot rkey", lambda b: first_create(b).update(path="app.bsky.feed.like/.."))
    variant("create without cid", lambda b: first_create(b).pop("cid"))
    variant("cid not in blocks", lambda b: first_create(b).update(cid=b"\x01\x71\x12\x20" + bytes(32)))
    variant("bad op cid", lambda b: first_create(b).update(cid=b"\x01\x02"))
    variant("bad op prev", lambda b: first_create(b).update(prev=b"\x07"))
    variant("delete with bad cid", lambda b: b["ops"].append(
        {"action": "delete", "path": "app.bsky.feed.like/3k", "cid": b"\x09"}))
    return variants


def test_odd_commits_take_checked_path() -> None:
    body = next(body for body in corpus_commit_bodies() if any(op["action"] != "delete" for op in body["ops"]))
    for name, odd in odd_bodies(body).items():
        assert outcome(_usual_commit, odd) is None, name
        assert outcome(_commit, odd) == outcome(_checked_commit, odd), name
