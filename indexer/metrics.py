"""Prometheus metrics of running streams, served over HTTP by aiohttp.

``IndexerCollector`` reads the counters that ``StreamIndexer``, ``StreamClient`` and ``Store``
already keep, at scrape time, so indexing itself pays nothing for metrics. ``MetricsServer``
serves ``GET /metrics`` in the Prometheus text format, by default on ``127.0.0.1:9464``.

Every series carries a ``stream`` label: the endpoint URL of the relay or labeler stream.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from indexer.errors import ConfigError
from indexer.progress import event_lag

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:9464"

# Upper bounds in seconds of the batch commit latency buckets.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Collection NSIDs come from upstream, so a hostile repo could create unbounded label values.
# The first MAX_COLLECTIONS collections seen keep their own series; the rest are summed as "other".
MAX_COLLECTIONS = 200
OTHER_COLLECTION = "other"


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:9464`` for IPv6) into a host and port; port 0 picks a free one.

    Raises ConfigError naming the bad value.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"invalid --metrics-addr {text!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(
                f"invalid --metrics-addr {text!r}: the host must be an IP address or localhost, "
                f"e.g. {DEFAULT_ADDRESS}"
            ) from None
    return host, int(port_text)


class _CommitLatency:
    """Cumulative histogram of one stream's batch commit times, fed at scrape time.

    ``IngestCounters.commit_seconds`` keeps only the most recent 1000 commit times, and
    ``batches`` counts every commit, so the times added since the last scrape are the last
    ``batches - seen`` entries.
    """

    def __init__(self) -> None:
        self.bucket_counts = [0] * (len(COMMIT_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.seen = 0

    def update(self, commit_seconds: list[float], batches: int) -> None:
        new = batches - self.seen
        self.seen = batches
        # NOTE: when more than 1000 batches commit between two scrapes, the oldest of them are no
        # longer in commit_seconds and are missing from the histogram.
        for seconds in commit_seconds[-new:] if new > 0 else ():
            index = next((i for i, bound in enumerate(COMMIT_BUCKETS) if seconds <= bound), len(COMMIT_BUCKETS))
            self.bucket_counts[index] += 1
            self.total += seconds

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, COMMIT_BUCKETS), "+Inf"], self.bucket_counts):
            running += count
            cumulative.append((bound, running))
        return cumulative


class IndexerCollector:
    """A Prometheus collector reading the counters of ``StreamIndexer`` objects at each scrape.

    Scrapes must come from the event loop that runs the indexers (``MetricsServer`` does this),
    so the counters are never read halfway through an update.
    """

    def __init__(self, indexers: Sequence) -> None:
        self.indexers = list(indexers)
        self.latency = {indexer.endpoint: _CommitLatency() for indexer in self.indexers}
        self.collections: set[str] = set()

    def describe(self) -> list[Metric]:
        # Describing by collecting would feed the histograms outside a scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(UTC)
        families = _families()
        for indexer in self.indexers:
            self._collect_stream(indexer, families, now)
        yield from families.values()

    def _collect_stream(self, indexer, families: dict[str, Metric], now: datetime) -> None:
        stream = indexer.endpoint
        counters = indexer.counters
        families["received"].add_metric([stream], counters.received)
        families["indexed"].add_metric([stream], counters.indexed)
        families["replayed"].add_metric([stream], counters.replayed)
        families["batches"].add_metric([stream], counters.batches)
        families["rows"].add_metric([stream], indexer.store.rows_written)
        families["dead_letter_rows"].add_metric([stream], indexer.store.dead_letters_written)
        for kind, count in sorted(counters.events_by_kind.items()):
            families["events"].add_metric([stream, kind], count)
        for reason, count in sorted(counters.skipped.items()):
            families["skipped"].add_metric([stream, str(reason)], count)
        for reason, count in sorted(counters.dead_letters.items()):
            families["dead_letters"].add_metric([stream, str(reason)], count)
        for (collection, action), count in sorted(self._bounded_ops(counters.ops).items()):
            families["ops"].add_metric([stream, collection, action], count)

        latency = self.latency.setdefault(stream, _CommitLatency())
        latency.update(counters.commit_seconds, counters.batches)
        families["commit"].add_metric([stream], latency.buckets(), latency.total)

        if indexer.committed is not None:
            families["cursor"].add_metric([stream], indexer.committed)
        if counters.last_seq is not None:
            families["last_seq"].add_metric([stream], counters.last_seq)
        lag = event_lag(counters.last_event_time, now)
        if lag is not None:
            families["lag"].add_metric([stream], lag)

        client = indexer.client
        families["connected"].add_metric([stream], 1 if client.connected else 0)
        for counter in dataclasses.fields(client.counters):
            families["client"].add_metric([stream, counter.name], getattr(client.counters, counter.name))

    def _bounded_ops(self, ops) -> dict[tuple[str, str], int]:
        bounded: dict[tuple[str, str], int] = {}
        for (collection, action), count in ops.items():
            if collection not in self.collections and len(self.collections) < MAX_COLLECTIONS:
                self.collections.add(collection)
            name = collection if collection in self.collections else OTHER_COLLECTION
            bounded[(name, action)] = bounded.get((name, action), 0) + count
        return bounded


def _families() -> dict[str, Metric]:
    """Create the empty metric families of one scrape, keyed by a short local name."""
    stream = ["stream"]
    return {
        "received": CounterMetricFamily(
            "indexer_events_received", "Frames received from the stream, including replayed ones.", labels=stream),
        "indexed": CounterMetricFamily(
            "indexer_events_indexed", "Events committed to the database (written or dead-lettered).", labels=stream),
        "replayed": CounterMetricFamily(
            "indexer_events_replayed", "Events at or below the committed cursor, received again and skipped.",
            labels=stream),
        "events": CounterMetricFamily(
            "indexer_events_decoded", "Frames decoded, by event kind (Commit, Identity, Labels, Invalid, ...).",
            labels=["stream", "kind"]),
        "skipped": CounterMetricFamily(
            "indexer_events_skipped", "Frames, ops or labels counted and skipped, by skip reason.",
            labels=["stream", "reason"]),
        "dead_letters": CounterMetricFamily(
            "indexer_dead_letters", "Frames or ops dead-lettered by the decoder, by drop reason.",
            labels=["stream", "reason"]),
        "ops": CounterMetricFamily(
            "indexer_ops", "Repo ops and labels indexed, by collection and action ('other' past 200 collections).",
            labels=["stream", "collection", "action"]),
        "batches": CounterMetricFamily("indexer_batches_committed", "Batches committed.", labels=stream),
        "rows": CounterMetricFamily("indexer_record_rows_written", "Record rows written.", labels=stream),
        "dead_letter_rows": CounterMetricFamily(
            "indexer_dead_letter_rows_written", "Dead-letter rows written, including those from rejected rows.",
            labels=stream),
        "commit": HistogramMetricFamily(
            "indexer_batch_commit_seconds", "Time to write one batch and its cursor, in seconds.", labels=stream),
        "cursor": GaugeMetricFamily(
            "indexer_cursor", "Committed cursor: every event at or below this seq is in the database.", labels=stream),
        "last_seq": GaugeMetricFamily("indexer_last_received_seq", "Seq of the newest event received.", labels=stream),
        "lag": GaugeMetricFamily(
            "indexer_lag_seconds", "Seconds between now and the event time of the newest event received.",
            labels=stream),
        "connected": GaugeMetricFamily(
            "indexer_stream_connected", "1 while the websocket to the stream is open, else 0.", labels=stream),
        "client": CounterMetricFamily(
            "indexer_stream_client_events",
            "Connection events of the stream client: connects, reconnects, timeouts, handshake_failures, ...",
            labels=["stream", "event"]),
    }


def build_registry(indexers: Sequence) -> CollectorRegistry:
    """Create a registry with the indexers' metrics and the process, platform and GC metrics."""
    registry = CollectorRegistry()
    registry.register(IndexerCollector(indexers))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """An aiohttp server that serves ``GET /metrics`` from ``registry``.

    Use as ``async with MetricsServer(registry, host, port) as server``; ``server.port`` is the
    bound port (useful with port 0).
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> MetricsServer:
        """Bind and start serving; raise ConfigError when the address cannot be bound."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.requested_port}: {error.strerror or error}. "
                "Pick another --metrics-addr or pass --no-metrics."
            ) from None
        self.port = self._runner.addresses[0][1]
        log.info("serving metrics", extra={"endpoint": f"http://{self.host}:{self.port}/metrics"})
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> MetricsServer:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
