"""Measure firehose ingestion throughput, side by side, in one run, and print one table.

1. decode, our path: frames -> ``decode_repo_frame`` -> ``Batch.add`` (typed rows through
   ``records.row_for_record``, actor updates), no database; events/s;
2. decode with the atproto SDK: ``Frame.from_bytes`` + ``parse_subscribe_repos_message`` +
   ``CAR.from_bytes`` on the same frames; events/s (skipped when ``atproto`` is not installed);
3. raw write limit: the rows of step 1 written with plain ``COPY`` into the same tables of a fresh
   database, one transaction per batch; rows/s;
4. end to end: ``ReplayRelay`` (a child process) serves the frames over a local websocket to the
   real ``StreamIndexer`` (another child process), which writes into a fresh database with cursor
   commits. Reported: events/s, peak RSS of the indexer process, and the lag per batch (from the
   arrival of the batch's first event to its commit);
5. the ratios 1/2, 4/2 and 4/3;
6. with ``--verify record``: step 4 again with ``--verify off`` and ``--verify record`` on the
   recorded relay commits (re-sequenced and repeated, so that their signatures and proofs still
   verify) with a local PLC directory serving their recorded DID documents. After the first
   round the writes are rev-gated no-ops, so the two rates show the cost of verification, not a
   realistic write load.

The frames come from ``synthetic_stream`` (real recorded frames, re-sequenced; see there).
PostgreSQL is the embedded server in a temporary directory, or the server of ``DATABASE_URL``, on
which the benchmark creates and afterwards drops one scratch database per step (its user needs CREATEDB).

Run: ``.venv/bin/python scripts/bench_ingest.py --events 200000``
"""

from __future__ import annotations

import os

# Set before libipld decodes any CAR (see indexer.car); the SDK column runs with it too.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

import argparse
import asyncio
import gc
import multiprocessing
import platform
import resource
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import synthetic_stream  # noqa: E402

from indexer import db, frames, native  # noqa: E402
from indexer.ingest import DEFAULT_BATCH_SIZE  # noqa: E402
from indexer.store import Batch  # noqa: E402
from indexer.verifier import default_workers  # noqa: E402

ENDPOINT_NAME = "bench"


@dataclass
class Figures:
    """One measured rate; ``rate`` is None when the step did not run, with the reason in ``note``."""

    label: str
    rate: float | None
    unit: str
    note: str = ""
    extra: dict = field(default_factory=dict)


# --- machine and database -------------------------------------------------------------------------


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


class ScratchDatabases:
    """Creates migrated scratch databases on one server and drops them on ``close``."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.names: list[str] = []

    def create(self, purpose: str) -> str:
        name = f"bench_{purpose}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(libpq_url(with_database(self.server_url, "postgres")), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        url = with_database(self.server_url, name)
        db.upgrade(url)
        return url

    def close(self) -> None:
        with psycopg.connect(libpq_url(with_database(self.server_url, "postgres")), autocommit=True) as connection:
            for name in self.names:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()


def server_version(url: str) -> str:
    with psycopg.connect(libpq_url(url)) as connection:
        return connection.execute("SHOW server_version").fetchone()[0]


def machine_line(url: str, embedded_server: bool) -> str:
    where = "embedded, unix socket" if embedded_server else "DATABASE_URL"
    return (f"machine: {os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
            f"PostgreSQL {server_version(url)} ({where}), load average {os.getloadavg()[0]:.1f}, "
            f"indexer {native.summary()}")


# --- 1 and 2: decoding -----------------------------------------------------------------------------


def decode_ours(frame_list: list[bytes], batch_size: int) -> tuple[Figures, list[Batch]]:
    """Decode every frame and add it to batches, as the indexer does before writing.

    The timed pass drops each full batch, as the indexer does once it is written. Keeping 200,000
    events' rows made the pass about 1.8 times slower on a 2-core VM, from memory growth
    rather than decoding. A second, untimed pass builds the batches that step 3 writes.
    """
    from indexer.cli import tune_gc

    tune_gc()  # the collector settings of `indexer run`
    batch = Batch(endpoint=ENDPOINT_NAME)
    started = time.perf_counter()
    cpu_started = time.process_time()
    for frame in frame_list:
        batch.add(frames.decode_repo_frame(frame))
        if len(batch) >= batch_size:
            batch = Batch(endpoint=ENDPOINT_NAME)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    figures = Figures("1 decode, ours (frames -> rows)", len(frame_list) / elapsed, "events/s",
                      extra={"cpu_rate": len(frame_list) / cpu})
    return figures, _kept_batches(frame_list, batch_size)


def _kept_batches(frame_list: list[bytes], batch_size: int) -> list[Batch]:
    """Decode every frame into batches and keep them all, for step 3."""
    batches = []
    batch = Batch(endpoint=ENDPOINT_NAME)
    for frame in frame_list:
        batch.add(frames.decode_repo_frame(frame))
        if len(batch) >= batch_size:
            batches.append(batch)
            # Frozen, the kept objects are no longer walked by every later full collection.
            gc.freeze()
            batch = Batch(endpoint=ENDPOINT_NAME)
    if len(batch):
        batches.append(batch)
    return batches


def decode_sdk(frame_list: list[bytes]) -> Figures:
    """Decode every frame with the atproto SDK: frame, message model, and the commit's CAR."""
    label = "2 decode, atproto SDK"
    try:
        from atproto import CAR, firehose_models, parse_subscribe_repos_message
    except ImportError:
        return Figures(label, None, "events/s", "not installed: pip install -e '.[bench]'")
    started = time.perf_counter()
    cpu_started = time.process_time()
    for frame in frame_list:
        message = parse_subscribe_repos_message(firehose_models.Frame.from_bytes(frame))
        blocks = getattr(message, "blocks", None)
        if blocks:
            car = CAR.from_bytes(blocks)
            for op in message.ops:
                if op.cid is not None:
                    car.blocks.get(op.cid)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return Figures(label, len(frame_list) / elapsed, "events/s", extra={"cpu_rate": len(frame_list) / cpu})


# --- 3: raw COPY -----------------------------------------------------------------------------------


def copy_rows(url: str, batches: list[Batch]) -> Figures:
    """Write the rows of the batches with plain COPY into the real tables, a transaction per batch.

    Plain COPY cannot update, so a record row whose key an earlier batch wrote (an update, about
    0.5 % of rows) is left out.
    """
    from psycopg.types.json import Jsonb, set_json_dumps

    from indexer import schema
    from indexer.store import JSONB_COLUMNS, _written_columns, dump_json

    rows_written = 0
    copied: set[tuple] = set()
    started = time.perf_counter()
    with psycopg.connect(libpq_url(url)) as connection:
        set_json_dumps(dump_json, context=connection)  # the same JSON writer as the indexer
        for batch in batches:
            with connection.cursor() as cursor:
                tables = []
                for name, by_key in batch.records.items():
                    fresh = [row for key, row in by_key.items() if key not in copied]
                    copied.update(by_key)
                    tables.append((schema.metadata.tables[name], fresh))
                tables.append((schema.deletions, list(batch.deletions.values())))
                tables.extend((schema.metadata.tables[name], rows) for name, rows in batch.history.items())
                for table, rows in tables:
                    if not rows:
                        continue
                    columns = [name for name in _written_columns(table) if name in rows[0]]
                    names = ", ".join(f'"{name}"' for name in columns)
                    with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row([Jsonb(row[name]) if name in JSONB_COLUMNS and row[name] is not None
                                            else row[name] for name in columns])
                    rows_written += len(rows)
            connection.commit()
    elapsed = time.perf_counter() - started
    return Figures("3 raw COPY into the same tables", rows_written / elapsed, "rows/s",
                   extra={"rows": rows_written, "seconds": elapsed})


# --- 4: end to end ---------------------------------------------------------------------------------


def serve_relay(events: int, seed: int, did_count: int, ready) -> None:
    """Child process: build the same frames and serve them with ReplayRelay until terminated."""
    from indexer.replay import ReplayRelay

    pairs = synthetic_stream.build_frames(events, seed=seed, did_count=did_count)

    async def serve() -> None:
        relay = ReplayRelay(pairs)
        await relay.start()
        ready.send(relay.base_url)
        await asyncio.Event().wait()

    asyncio.run(serve())


def serve_recorded(repeats: int, ready) -> None:
    """Child process: serve the recorded commits, repeated, and a PLC directory with their DID documents."""
    import json

    from aiohttp import web

    from indexer.replay import ReplayRelay

    root = synthetic_stream.fixtures_root()
    recorded = _recorded_jetstream(root)
    repeated = [frame for _ in range(repeats) for frame in recorded]
    pairs = [(seq, _with_seq(frame, seq)) for seq, frame in enumerate(repeated, start=1)]
    documents = json.loads((root / synthetic_stream.JETSTREAM_FRAMES).with_name("did_docs.json").read_text())

    async def document(request: web.Request) -> web.Response:
        found = documents.get(request.match_info["did"])
        return web.json_response(found) if found else web.Response(status=404)

    async def serve() -> None:
        relay = ReplayRelay(pairs)
        await relay.start()
        app = web.Application()
        app.router.add_get("/{did}", document)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.send((relay.base_url, f"http://127.0.0.1:{runner.addresses[0][1]}", len(pairs)))
        await asyncio.Event().wait()

    asyncio.run(serve())


def _recorded_jetstream(root: Path) -> list[bytes]:
    """Return the recorded relay frames that are commits (the ones verification checks)."""
    import libipld

    data = (root / synthetic_stream.JETSTREAM_FRAMES).read_bytes()
    frame_list, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "little")
        frame_list.append(data[offset + 4:offset + 4 + length])
        offset += 4 + length
    return [frame for frame in frame_list if libipld.decode_dag_cbor_multi(frame)[0].get("t") == "#commit"]


def _with_seq(frame: bytes, seq: int) -> bytes:
    """Re-encode ``frame`` with another seq; nothing signed changes."""
    import libipld

    header, body = libipld.decode_dag_cbor_multi(frame)
    body["seq"] = seq
    return libipld.encode_dag_cbor(header) + libipld.encode_dag_cbor(body)


def run_indexer(url: str, relay_base: str, stop_at_seq: int, batch_size: int, result,
                verify: tuple[str, str] | None = None) -> None:
    """Child process: run the real StreamIndexer until ``stop_at_seq``, then report its figures.

    ``verify`` is ``(mode, plc_url, workers)`` for the verification stage; None leaves it off.
    """
    from indexer.cli import tune_gc
    from indexer.ingest import REPOS_METHOD, StreamIndexer
    from indexer.store import Store
    from indexer.stream import StreamClient, endpoint_url
    from indexer.verifier import EventVerifier, VerifyMode, VerifySettings

    endpoint = endpoint_url(relay_base, REPOS_METHOD)
    store = Store(url, endpoint)

    def client_factory(cursor_source):
        return StreamClient(endpoint, REPOS_METHOD, cursor_source)

    verifier = None
    if verify is not None:
        verifier = EventVerifier(VerifySettings(mode=VerifyMode(verify[0]), plc_url=verify[1], workers=verify[2]), url)
    indexer = StreamIndexer(store, client_factory, batch_size=batch_size, stop_at_seq=stop_at_seq, verifier=verifier)
    tune_gc()  # as `indexer run` does
    started = time.perf_counter()
    cpu_started = time.process_time()
    asyncio.run(indexer.run())
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    store.close()
    result.send({
        "events": indexer.counters.indexed,
        "rows": store.rows_written,
        "seconds": elapsed,
        "cpu_seconds": cpu,  # this process only: not the verification workers
        "peak_rss": peak_rss(),
        "lags": list(indexer.counters.batch_lags),
        "batches": indexer.counters.batches,
        "verified": dict(verifier.counts) if verifier is not None else {},
    })


def peak_rss() -> int:
    """Return this process's peak resident set size in bytes.

    Linux's ``ru_maxrss`` survives ``exec``, so in a spawned child it reports the parent's peak
    from before the fork; ``VmHWM`` belongs to the process's own address space.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def end_to_end(url: str, events: int, seed: int, did_count: int, batch_size: int) -> Figures:
    context = multiprocessing.get_context("spawn")
    ready_receiver, ready_sender = context.Pipe(duplex=False)
    # One frame more than measured: the indexer stops when it sees a seq above stop_at_seq.
    relay = context.Process(target=serve_relay, args=(events + 1, seed, did_count, ready_sender), daemon=True)
    relay.start()
    try:
        if not ready_receiver.poll(600):
            raise RuntimeError("the replay relay process did not start within 600 s")
        relay_base = ready_receiver.recv()
        result_receiver, result_sender = context.Pipe(duplex=False)
        indexer = context.Process(target=run_indexer, args=(url, relay_base, events, batch_size, result_sender))
        indexer.start()
        indexer.join()
        if indexer.exitcode != 0 or not result_receiver.poll():
            raise RuntimeError(f"the indexer process failed with exit code {indexer.exitcode}")
        outcome = result_receiver.recv()
    finally:
        relay.terminate()
        relay.join()
    lags = sorted(outcome["lags"])
    return Figures("4 end to end (relay -> indexer -> PostgreSQL)", outcome["events"] / outcome["seconds"],
                   "events/s", extra={**outcome, "p50": _percentile(lags, 0.5), "p99": _percentile(lags, 0.99)})


def end_to_end_verify(server_url: str, databases: ScratchDatabases, repeats: int, batch_size: int,
                      workers: int) -> dict[str, Figures]:
    """Step 6: the recorded commits end to end with --verify off and with --verify record."""
    context = multiprocessing.get_context("spawn")
    ready_receiver, ready_sender = context.Pipe(duplex=False)
    relay = context.Process(target=serve_recorded, args=(repeats, ready_sender), daemon=True)
    relay.start()
    results = {}
    try:
        if not ready_receiver.poll(600):
            raise RuntimeError("the replay relay process did not start within 600 s")
        relay_base, plc_url, count = ready_receiver.recv()
        for mode in ("off", "record"):
            url = databases.create(f"verify_{mode}")
            if mode == "record":
                asyncio.run(_warm_did_cache(url, plc_url))
            result_receiver, result_sender = context.Pipe(duplex=False)
            # The stop seq is the last one, so the run ends on the interval flush of its last batch.
            indexer = context.Process(target=run_indexer, args=(
                url, relay_base, count - 1, batch_size, result_sender, (mode, plc_url, workers)))
            indexer.start()
            indexer.join()
            if indexer.exitcode != 0 or not result_receiver.poll():
                raise RuntimeError(f"the indexer process failed with exit code {indexer.exitcode}")
            outcome = result_receiver.recv()
            results[mode] = Figures(f"6 recorded commits, --verify {mode}", outcome["events"] / outcome["seconds"],
                                    "events/s", extra=outcome)
    finally:
        relay.terminate()
        relay.join()
    return results


async def _warm_did_cache(url: str, plc_url: str) -> None:
    """Store the DID documents of the recorded commits in the database's cache before step 6 runs.

    Step 6 measures the checks, not the resolution. With a cold cache, the events of the first
    batches also wait for their DID documents, at most ``key_wait``. Those still unresolved then
    are stored unchecked, which would make ``--verify record`` look cheaper than it is.
    """
    import json

    from indexer.resolve import DidResolver

    path = (synthetic_stream.fixtures_root() / synthetic_stream.JETSTREAM_FRAMES).with_name("did_docs.json")
    async with DidResolver(plc_url=plc_url, database_url=url) as resolver:
        await asyncio.gather(*(resolver.resolve(did) for did in json.loads(path.read_text())))


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(fraction * len(values)))]


# --- report ----------------------------------------------------------------------------------------


def format_rate(figures: Figures) -> str:
    if figures.rate is None:
        return figures.note
    return f"{figures.rate:>10,.0f} {figures.unit}"


def ratio(numerator: Figures, denominator: Figures) -> str:
    if numerator.rate is None or denominator.rate is None:
        return "n/a"
    return f"{numerator.rate / denominator.rate:.2f}"


def print_table(machine: str, events: int, results: dict[str, Figures]) -> None:
    ours, sdk, copy, e2e = results["ours"], results["sdk"], results["copy"], results["e2e"]
    print(machine)
    print(f"events: {events:,} (synthetic_stream from recorded frames), batch size {results['batch_size']}")
    print()
    print(f"{'measure':<48} {'rate':>22}  notes")
    print(f"{ours.label:<48} {format_rate(ours):>22}  CPU-time rate {ours.extra['cpu_rate']:,.0f}/s")
    sdk_note = f"CPU-time rate {sdk.extra['cpu_rate']:,.0f}/s" if sdk.rate is not None else ""
    print(f"{sdk.label:<48} {format_rate(sdk):>22}  {sdk_note}")
    print(f"{copy.label:<48} {format_rate(copy):>22}  {copy.extra['rows']:,} rows")
    extra = e2e.extra
    lag = (f"lag per batch p50 {extra['p50'] * 1000:.0f} ms, p99 {extra['p99'] * 1000:.0f} ms"
           if extra["p50"] is not None else "no batches")
    # The same rows as step 3 (records, deletions, history) at the end-to-end event rate.
    e2e_rows = Figures("", e2e.rate * copy.extra["rows"] / events, "rows/s")
    cpu = extra["cpu_seconds"] / extra["events"] * 1e6
    print(f"{e2e.label:<48} {format_rate(e2e):>22}  {extra['events']:,} events, peak RSS {extra['peak_rss'] / 2**20:.0f} MB, "
          f"indexer process CPU {cpu:.0f} µs/event, {lag}")
    print(f"{'   same, in the rows of step 3':<48} {format_rate(e2e_rows):>22}")
    print(f"{'5 ratio 1/2 (our decode / SDK decode)':<48} {ratio(ours, sdk):>22}")
    print(f"{'5 ratio 4/2 (end to end / SDK decode)':<48} {ratio(e2e, sdk):>22}")
    print(f"{'5 ratio 4/3 (in rows/s)':<48} {ratio(e2e_rows, copy):>22}")


def print_verify(results: dict[str, Figures], workers: int) -> None:
    off, record = results["off"], results["record"]
    for figures in (off, record):
        counts = figures.extra["verified"]
        note = (f"verified true/false/null: {counts.get('true', 0)}/{counts.get('false', 0)}/{counts.get('null', 0)}, "
                f"{workers} worker processes") if counts else ""
        cpu = figures.extra["cpu_seconds"] / figures.extra["events"] * 1e6
        print(f"{figures.label:<48} {format_rate(figures):>22}  {figures.extra['events']:,} events, "
              f"indexer process CPU {cpu:.0f} µs/event {note}")
    print(f"{'6 ratio record / off':<48} {ratio(record, off):>22}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="number of events in the stream (default: 200000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic stream (default: 1)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"events per committed batch (default: {DEFAULT_BATCH_SIZE}, as indexer run)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="PostgreSQL server to use (default: DATABASE_URL, else an embedded server in a temporary directory)")
    parser.add_argument("--verify", choices=("off", "record"), default="off",
                        help="record: also run step 6, end to end with --verify off and record (default: off)")
    parser.add_argument("--verify-workers", type=int, default=default_workers(),
                        help=f"verification worker processes in step 6 (default: {default_workers()}, as indexer run)")
    parser.add_argument("--verify-repeats", type=int, default=300,
                        help="times the 110 recorded commits are replayed in step 6 (default: 300)")
    parser.add_argument("--fixtures", help="real-data fixtures directory (default: INDEXER_FIXTURES or ../shared/fixtures)")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error(f"--events must be at least 1, got {args.events}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fixtures:
        os.environ["INDEXER_FIXTURES"] = args.fixtures
    try:
        synthetic_stream.fixtures_root()
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    did_count = args.events // 4
    if args.database_url:
        server_url, embedded_server = db.normalize_url(args.database_url), False
    else:
        from indexer import embedded

        server_url, embedded_server = embedded.start_scratch("indexer-bench-").url, True
    databases = ScratchDatabases(server_url)
    try:
        print(f"building {args.events:,} frames ...", file=sys.stderr, flush=True)
        frame_list = [frame for _seq, frame in synthetic_stream.iter_frames(args.events, seed=args.seed, did_count=did_count)]
        results: dict = {"batch_size": args.batch_size}
        print("1/4 decoding, ours ...", file=sys.stderr, flush=True)
        results["ours"], batches = decode_ours(frame_list, args.batch_size)
        print("2/4 decoding, atproto SDK ...", file=sys.stderr, flush=True)
        results["sdk"] = decode_sdk(frame_list)
        del frame_list
        print("3/4 raw COPY ...", file=sys.stderr, flush=True)
        results["copy"] = copy_rows(databases.create("copy"), batches)
        del batches
        print("4/4 end to end ...", file=sys.stderr, flush=True)
        results["e2e"] = end_to_end(databases.create("e2e"), args.events, args.seed, did_count, args.batch_size)
        if args.verify == "record":
            print("6 end to end, --verify off and record ...", file=sys.stderr, flush=True)
            verify_results = end_to_end_verify(server_url, databases, args.verify_repeats, args.batch_size,
                                                args.verify_workers)
        print_table(machine_line(server_url, embedded_server), args.events, results)
        if args.verify == "record":
            print_verify(verify_results, args.verify_workers)
    finally:
        databases.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
