"""A local relay that replays recorded frames over XRPC event-stream websockets.

Tests, benchmarks and offline try-outs point the indexer at it instead of a real relay. It serves
``/xrpc/com.atproto.sync.subscribeRepos`` and ``/xrpc/com.atproto.label.subscribeLabels`` from one
list of ``(seq, frame bytes)`` pairs and follows the atproto Event Stream rules for ``cursor``:

- cursor inside the retained window: the frames with ``seq >= cursor``, in recorded order;
- cursor more than one below the oldest frame's seq: an ``#info`` frame ``{name: "OutdatedCursor"}``,
  then all frames;
- cursor above the newest seq: an error frame ``FutureCursor``, then the connection is closed;
- no cursor: every frame by default (``NoCursor.ALL``, which tests and try-outs need), or only
  frames appended later (``NoCursor.TIP``, what a real relay does).

After the last frame the connection stays open and receives frames added with ``append()`` (the
live tip) unless ``close_at_end`` is set. ``ReplayRelay.faults`` injects failures, and
``ReplayRelay.connections`` records what every connection requested. The server binds 127.0.0.1.

Run ``python -m indexer.replay FILE_OR_DIRECTORY --port 8765`` for an offline try-out.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import libipld
from aiohttp import web

from indexer.errors import ConfigError

REPOS_METHOD = "com.atproto.sync.subscribeRepos"
LABELS_METHOD = "com.atproto.label.subscribeLabels"
HOST = "127.0.0.1"


class NoCursor(enum.StrEnum):
    """Choice of frames for a connection that sends no ``cursor`` parameter."""

    ALL = "all"  # every recorded frame, then the live tip
    TIP = "tip"  # only frames appended after the connection opened, as a real relay does


@dataclass
class Faults:
    """Failures to inject into the next connections, settable while the server runs.

    The ``*_after`` knobs count recorded frames sent on one connection (an ``#info`` frame does not
    count). When several are set, the smallest count fires first, and at equal counts the order of
    precedence is close, stall, error, truncate.
    """

    close_after: int | None = None  # close normally after N frames
    stall_after: int | None = None  # stop sending after N frames but keep the socket open
    error_after: int | None = None  # after N frames send an error frame, then close
    error: str = "ConsumerTooSlow"  # the ``error`` field of that error frame
    error_message: str = "stream consumer too slow"
    truncate_after: int | None = None  # after N frames send the next frame cut in half, then close
    reject_handshakes: int = 0  # reject this many next connection attempts with HTTP 503
    # How many further accepted connections the *_after knobs apply to (None: every one).
    # When it reaches 0 they are cleared, so the following connections replay normally.
    connections: int | None = None

    def action_at(self, sent: int) -> str | None:
        """Return the fault due after ``sent`` frames: close, stall, error, truncate, or None."""
        for action, count in (
            ("close", self.close_after),
            ("stall", self.stall_after),
            ("error", self.error_after),
            ("truncate", self.truncate_after),
        ):
            if count is not None and count == sent:
                return action
        return None


@dataclass
class ConnectionRecord:
    """Request and server response of one connection attempt."""

    path: str
    cursor: int | None  # the parsed cursor parameter, None when absent or invalid
    raw_cursor: str | None  # the cursor parameter as sent
    status: int = 101  # HTTP status of the handshake: 101, or 503 and 400 for rejections
    frames_sent: int = 0  # recorded frames sent, not counting #info, error or truncated frames
    outcome: str = ""  # why the server stopped: end, close, stall, error, truncate, future_cursor, ...
    # The faults this connection applies, None for a rejected handshake. Setting a ``*_after`` knob
    # here affects this open connection from its next frame on, and no other connection.
    faults: Faults | None = None


def info_frame(name: str, message: str | None = None) -> bytes:
    """Encode an ``#info`` message frame (header ``{op: 1, t: "#info"}``)."""
    body: dict[str, str] = {"name": name}
    if message is not None:
        body["message"] = message
    return libipld.encode_dag_cbor({"op": 1, "t": "#info"}) + libipld.encode_dag_cbor(body)


def error_frame(error: str, message: str | None = None) -> bytes:
    """Encode an error frame (header ``{op: -1}``), after which a server closes the stream."""
    body: dict[str, str] = {"error": error}
    if message is not None:
        body["message"] = message
    return libipld.encode_dag_cbor({"op": -1}) + libipld.encode_dag_cbor(body)


def frame_seq(frame: bytes) -> int | None:
    """Return the ``seq`` of a frame's body, or None when it has none or cannot be decoded."""
    try:
        objects = libipld.decode_dag_cbor_multi(frame)
    except (ValueError, RecursionError):
        return None
    if len(objects) < 2 or not isinstance(objects[1], dict):
        return None
    seq = objects[1].get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    return seq


def assign_seqs(frames: Iterable[bytes]) -> list[tuple[int, bytes]]:
    """Pair each frame with its seq. A frame without one (``#info``, undecodable) keeps the previous seq.

    Frames before the first one with a seq get 0.
    """
    pairs = []
    previous = 0
    for frame in frames:
        seq = frame_seq(frame)
        if seq is not None:
            previous = seq
        pairs.append((previous, frame))
    return pairs


def load_length_prefixed(path: str | Path) -> list[tuple[int, bytes]]:
    """Read a file of ``[uint32 little-endian length][frame]`` records as ``(seq, frame)`` pairs.

    Raises ConfigError when the file ends inside a record.
    """
    data = Path(path).read_bytes()
    frames = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ConfigError(
                f"{path}: truncated length prefix at byte {offset}; "
                "the file is not [uint32 LE length][frame] records"
            )
        (length,) = struct.unpack_from("<I", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise ConfigError(
                f"{path}: record at byte {offset} declares {length} bytes but only {len(data) - offset - 4} remain; "
                "the file is truncated or not [uint32 LE length][frame] records"
            )
        frames.append(data[offset + 4 : end])
        offset = end
    return assign_seqs(frames)


def load_frame_directory(path: str | Path) -> list[tuple[int, bytes]]:
    """Read every ``*.bin`` file of a directory, one frame per file, in file-name order."""
    files = sorted(Path(path).glob("*.bin"))
    if not files:
        raise ConfigError(f"{path}: no .bin frame files found")
    return assign_seqs(file.read_bytes() for file in files)


def load_labels_file(path: str | Path) -> list[tuple[int, bytes]]:
    """Load labels in atproto JSON as ``#labels`` frames, one label per frame, with seq 1, 2, ...

    The file is a list of label objects, or an object whose ``labels`` list holds label objects
    or entries with a ``label`` key (the layout of the shared signed-labels fixture).
    """
    from indexer.jsonform import from_json

    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable JSON file of labels ({error})") from None
    entries = document.get("labels", []) if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a list of labels, or an object with a 'labels' list")
    frames = []
    for seq, entry in enumerate(entries, start=1):
        label = entry.get("label", entry) if isinstance(entry, dict) else entry
        body = libipld.encode_dag_cbor({"seq": seq, "labels": [from_json(label)]})
        frames.append((seq, libipld.encode_dag_cbor({"op": 1, "t": "#labels"}) + body))
    return frames


def load_did_documents(path: str | Path) -> dict[str, Any]:
    """Load DID documents from a JSON object {did: document}, or from the ``labelerDidDocuments`` of a labels file."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable JSON file of DID documents ({error})") from None
    if isinstance(document, dict) and isinstance(document.get("labelerDidDocuments"), dict):
        document = document["labelerDidDocuments"]
    if not isinstance(document, dict) or not all(key.startswith("did:") for key in document):
        raise ConfigError(f"{path}: expected a JSON object mapping each DID to its DID document")
    return document


def load_frames(path: str | Path) -> list[tuple[int, bytes]]:
    """Load a length-prefixed file, a directory of ``.bin`` files, or a ``.json`` file of labels."""
    source = Path(path)
    if source.is_dir():
        return load_frame_directory(source)
    if source.suffix == ".json" and source.is_file():
        return load_labels_file(source)
    if not source.is_file():
        raise ConfigError(
            f"{path}: no such file or directory; give a length-prefixed frames file or a directory of .bin frames"
        )
    return load_length_prefixed(source)


def _parse_cursor(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        cursor = int(raw)
    except ValueError:
        raise ValueError(f"invalid cursor {raw!r}: expected a non-negative integer") from None
    if cursor < 0:
        raise ValueError(f"invalid cursor {raw!r}: expected a non-negative integer")
    return cursor


class ReplayRelay:
    """An aiohttp server on 127.0.0.1 that replays frames to every websocket that connects.

    ``cursor_inclusive`` picks what a cursor means: True (the default) sends ``seq >= cursor``, so
    a client that passes its last processed seq receives that frame again. False sends
    ``seq > cursor``, as the reference PDS does (``requestSeqRange`` in @atproto/pds filters
    ``seq > earliestSeq``). Frames are replayed in the given order, which need not be sorted.
    """

    # Seconds the server waits for a client's reply to its close frame, and for handlers at shutdown.
    CLOSE_TIMEOUT = 2.0

    def __init__(
        self,
        frames: Iterable[tuple[int, bytes]],
        *,
        port: int = 0,
        no_cursor: NoCursor | str = NoCursor.ALL,
        close_at_end: bool = False,
        cursor_inclusive: bool = True,
        did_documents: Mapping[str, Any] | None = None,
    ) -> None:
        """``did_documents`` ({did: document}) are also served as a PLC directory does, at ``GET /{did}``."""
        self.did_documents = dict(did_documents or {})
        self._seqs: list[int] = []
        self._frames: list[bytes] = []
        for seq, frame in frames:
            self._seqs.append(seq)
            self._frames.append(frame)
        self.requested_port = port
        self.no_cursor = NoCursor(no_cursor)
        self.close_at_end = close_at_end
        self.cursor_inclusive = cursor_inclusive
        self.faults = Faults()
        self.connections: list[ConnectionRecord] = []
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._appended = asyncio.Event()

    @property
    def frame_count(self) -> int:
        return len(self._frames)

    @property
    def base_url(self) -> str:
        """``ws://127.0.0.1:PORT``, available after ``start()``."""
        if self.port is None:
            raise RuntimeError("ReplayRelay is not started; call start() or use it as an async context manager")
        return f"ws://{HOST}:{self.port}"

    def url(self, method: str = REPOS_METHOD) -> str:
        """Return the websocket URL of one subscription endpoint."""
        return f"{self.base_url}/xrpc/{method}"

    async def start(self) -> ReplayRelay:
        """Bind 127.0.0.1 and start serving. ``port`` then contains the bound port."""
        app = web.Application()
        app.router.add_get(f"/xrpc/{REPOS_METHOD}", self._handle)
        app.router.add_get(f"/xrpc/{LABELS_METHOD}", self._handle)
        app.router.add_get("/{did:did:[^/]+}", self._did_document)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.CLOSE_TIMEOUT)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.requested_port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Close every connection and stop listening. Safe to call more than once."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ReplayRelay:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def append(self, seq: int, frame: bytes) -> None:
        """Add a frame at the end. Connections waiting at the live tip receive it."""
        self._seqs.append(seq)
        self._frames.append(frame)
        woken, self._appended = self._appended, asyncio.Event()
        woken.set()

    async def _did_document(self, request: web.Request) -> web.Response:
        """Answer a PLC directory request: the DID document, or 404 as plc.directory does."""
        document = self.did_documents.get(request.match_info["did"])
        if document is None:
            return web.json_response({"message": f"DID not registered: {request.match_info['did']}"}, status=404)
        return web.json_response(document)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_cursor = request.query.get("cursor")
        record = ConnectionRecord(path=request.path, cursor=None, raw_cursor=raw_cursor)
        self.connections.append(record)
        if self.faults.reject_handshakes > 0:
            self.faults.reject_handshakes -= 1
            record.status = 503
            record.outcome = "rejected"
            return web.Response(status=503, text="replay relay: handshake rejected by fault injection\n")
        try:
            record.cursor = _parse_cursor(raw_cursor)
        except ValueError as error:
            record.status = 400
            record.outcome = "invalid_cursor"
            return web.json_response({"error": "InvalidRequest", "message": str(error)}, status=400)

        faults = record.faults = self._take_faults()
        ws = web.WebSocketResponse(timeout=self.CLOSE_TIMEOUT)
        await ws.prepare(request)
        # Reading is what processes the client's close frame and pings, so it runs all along.
        client_gone = asyncio.create_task(self._read_until_closed(ws))
        try:
            record.outcome = await self._replay(ws, client_gone, record, faults)
        except ConnectionError:  # aiohttp raises a bare ConnectionError for a peer that went away mid-send
            record.outcome = "client_gone"
        finally:
            client_gone.cancel()
            await ws.close()
        return ws

    def _take_faults(self) -> Faults:
        """Return the faults for a new connection and count it against ``Faults.connections``."""
        if self.faults.connections is not None and self.faults.connections <= 0:
            self.faults = Faults(reject_handshakes=self.faults.reject_handshakes)
        faults = replace(self.faults)
        if self.faults.connections is not None:
            self.faults.connections -= 1
            if self.faults.connections == 0:
                self.faults = Faults(reject_handshakes=self.faults.reject_handshakes)
        return faults

    async def _replay(
        self, ws: web.WebSocketResponse, client_gone: asyncio.Task, record: ConnectionRecord, faults: Faults
    ) -> str:
        """Send frames until a fault, the end, the client leaving or shutdown, and return which one."""
        index, prelude = self._start_index(record.cursor)
        if index is None:
            await ws.send_bytes(prelude)
            return "future_cursor"
        if prelude is not None:
            await ws.send_bytes(prelude)

        while True:
            if client_gone.done():
                return "client_gone"
            if self._stopping.is_set():
                return "server_stopped"
            action = faults.action_at(record.frames_sent)
            if action == "close":
                return "close"
            if action == "stall":
                await self._wait_any(client_gone)
                return "stall"
            if action == "error":
                await ws.send_bytes(error_frame(faults.error, faults.error_message))
                return "error"
            if index >= len(self._frames):
                if self.close_at_end:
                    return "end"
                await self._wait_any(client_gone, self._appended.wait())
                continue
            frame = self._frames[index]
            if action == "truncate":
                await ws.send_bytes(frame[: len(frame) // 2])
                return "truncate"
            await ws.send_bytes(frame)
            record.frames_sent += 1
            index += 1

    def _start_index(self, cursor: int | None) -> tuple[int | None, bytes | None]:
        """Return the index of the first frame to send and a frame to send before it.

        For a future cursor the index is None and the frame is the FutureCursor error frame.
        """
        if cursor is None:
            return (0 if self.no_cursor is NoCursor.ALL else len(self._frames)), None
        if not self._seqs:
            return 0, None
        newest = max(self._seqs)
        oldest = min(self._seqs)
        first_wanted = cursor if self.cursor_inclusive else cursor + 1
        if cursor > newest:
            message = f"cursor {cursor} is ahead of the newest seq {newest}"
            return None, error_frame("FutureCursor", message)
        # The client already has ``cursor`` itself, so only a seq missing between it and the oldest
        # retained one makes the cursor outdated, whether or not ``cursor`` is resent.
        if cursor + 1 < oldest:
            message = f"cursor {cursor} is older than the oldest retained seq {oldest}; replaying from there"
            return 0, info_frame("OutdatedCursor", message)
        index = next((i for i, seq in enumerate(self._seqs) if seq >= first_wanted), len(self._frames))
        return index, None

    async def _wait_any(self, client_gone: asyncio.Task, *others) -> None:
        """Wait until the client leaves, the server stops, or one of ``others`` finishes."""
        waiters = [asyncio.ensure_future(self._stopping.wait())]
        waiters.extend(asyncio.ensure_future(other) for other in others)
        try:
            await asyncio.wait([client_gone, *waiters], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    @staticmethod
    async def _read_until_closed(ws: web.WebSocketResponse) -> None:
        async for _message in ws:
            pass


async def _serve(frames: list[tuple[int, bytes]], args: argparse.Namespace) -> None:
    did_documents = {}
    for path in args.did_docs or ():
        did_documents.update(load_did_documents(path))
    relay = ReplayRelay(frames, port=args.port, no_cursor=args.no_cursor, close_at_end=args.close_at_end,
                        did_documents=did_documents)
    try:
        await relay.start()
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {HOST}:{args.port} ({error}); pass another --port, or 0 for a free one"
        ) from None
    try:
        seqs = [seq for seq, _frame in frames]
        print(f"replaying {len(frames)} frames (seq {min(seqs)} to {max(seqs)}) from {args.source}", flush=True)
        print(f"subscribeRepos:  {relay.url(REPOS_METHOD)}", flush=True)
        print(f"subscribeLabels: {relay.url(LABELS_METHOD)}", flush=True)
        if did_documents:
            print(f"PLC directory:   http://{HOST}:{relay.port} ({len(did_documents)} DID documents)", flush=True)
        print("press Ctrl-C to stop", flush=True)
        await asyncio.Event().wait()
    finally:
        await relay.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the replay relay from the command line until interrupted; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m indexer.replay",
        description="Replay recorded event-stream frames over websockets on 127.0.0.1, for offline try-outs.",
    )
    parser.add_argument(
        "source", help="a file of [uint32 little-endian length][frame] records, a directory of .bin frames, "
        "or a .json file of labels (served as #labels frames)"
    )
    parser.add_argument(
        "--did-docs", action="append", metavar="FILE",
        help="also answer PLC directory requests (GET /DID) from this JSON object of {did: document}, or from "
        "a labels file's labelerDidDocuments; repeatable",
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="TCP port to listen on; 0 picks a free one (default: 8765)"
    )
    parser.add_argument(
        "--no-cursor", choices=[mode.value for mode in NoCursor], default=NoCursor.ALL.value,
        help="what a connection without a cursor receives: all recorded frames, or only the live tip (default: all)",
    )
    parser.add_argument(
        "--close-at-end", action="store_true",
        help="close each connection after its last frame instead of keeping it open",
    )
    args = parser.parse_args(argv)

    try:
        frames = load_frames(args.source)
        if not frames:
            raise ConfigError(f"{args.source}: contains no frames")
        asyncio.run(_serve(frames, args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
