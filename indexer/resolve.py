"""DID resolution: find a repo's DID document, its PDS endpoint, handle and signing key.

``DidResolver.resolve(did)`` returns a ``DidDocument`` or a ``ResolveFailure``; it never raises for
a bad DID or a failing server (only for errors of the cache database). ``did:plc`` DIDs are read from a PLC directory
(``GET {plc_url}/{did}``), ``did:web`` DIDs from ``https://{host}/.well-known/did.json`` (atproto
allows only host-level did:web, so a DID with a path is rejected).

Results are cached in memory and, when a database URL is given, in the ``did_documents`` table:
a document for ``ttl``, a final failure (unknown DID, tombstoned DID, invalid document) for
``failure_ttl`` and only while the DID resolves through the same URL. A transient failure (timeout, connection error, 5xx, 429) is not cached, and the
last good document is returned instead when there is one, stale or not.

Plain http is used only for did:web hosts 127.0.0.1, ::1 and localhost, and only with
``allow_local_http`` (tests); everything else is https, except the configured PLC URL, which is
used as given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import aiohttp
import psycopg
from psycopg.types.json import Jsonb

log = logging.getLogger(__name__)

PLC_DIRECTORY = "https://plc.directory"
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
# DID documents are a few kilobytes; a larger response is not one.
MAX_DOCUMENT_BYTES = 256 * 1024
MEMORY_CACHE_SIZE = 100_000

_PLC_DID = re.compile(r"^did:plc:[a-z2-7]{24}$")
# Host-level did:web: a host name, optionally with a percent-encoded port ("%3A8080").
_WEB_DID = re.compile(r"^did:web:([A-Za-z0-9.-]+(?:%3[Aa][0-9]{1,5})?)$")


@dataclass(frozen=True, slots=True)
class DidDocument:
    """A resolved DID document. Fields that the document lacks are None."""

    did: str
    document: dict[str, Any]
    pds_endpoint: str | None  # serviceEndpoint of the #atproto_pds service
    handle: str | None  # first at:// entry of alsoKnownAs, unverified
    signing_key: str | None  # publicKeyMultibase of the #atproto verification method


@dataclass(frozen=True, slots=True)
class ResolveFailure:
    """The reason a DID could not be resolved. ``final`` means retrying soon will not help."""

    did: str
    error: str
    final: bool


class DidResolver:
    """Resolve DIDs with bounded concurrency, timeouts and a cache; use as an async context manager.

    ``database_url`` None keeps the cache in memory only. ``session`` is borrowed and left open;
    without it the resolver creates and closes its own.
    """

    def __init__(
        self,
        *,
        plc_url: str = PLC_DIRECTORY,
        database_url: str | None = None,
        ttl: timedelta = timedelta(hours=24),
        failure_ttl: timedelta = timedelta(hours=1),
        timeout: float = 10.0,
        max_concurrency: int = 16,
        allow_local_http: bool = False,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.database_url = database_url.replace("postgresql+psycopg://", "postgresql://", 1) if database_url else None
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.timeout = timeout
        self.allow_local_http = allow_local_http
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._session = session
        self._owns_session = session is None
        self._connection: psycopg.AsyncConnection | None = None
        self._connect_lock = asyncio.Lock()
        self._memory: OrderedDict[str, tuple[float, DidDocument | ResolveFailure]] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future] = {}
        # While the indexer decodes a batch, the event loop turns rarely, and each query on the one
        # cache connection waits for a turn. One query per DID made a hundred new DIDs take longer
        # than the verifier's key wait, so their events were stored unchecked. Lookups and writes
        # made in the same loop turn therefore share one round trip.
        self._lookups = _SharedRoundTrip(lambda dids: self._query_rows(list(dids)))
        self._writes = _SharedRoundTrip(lambda rows: self._write_rows(rows))

    async def __aenter__(self) -> DidResolver:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the database connection and the HTTP session if the resolver created it."""
        await self._lookups.aclose()
        await self._writes.aclose()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def resolve(self, did: str, *, refresh: bool = False) -> DidDocument | ResolveFailure:
        """Return the DID document of ``did``, from the cache when it is fresh.

        Concurrent calls for the same DID share one lookup. ``refresh`` fetches the document even
        when the cached one is fresh (after an ``#identity`` event, or a signature that does not
        match the cached key); a transient failure then still returns the cached document.
        """
        if refresh:
            return await self._resolve_uncached(did, refresh=True)
        cached = self._from_memory(did)
        if cached is not None:
            return cached
        pending = self._in_flight.get(did)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._in_flight[did] = future
        try:
            result = await self._resolve_uncached(did)
            future.set_result(result)
            return result
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters re-raise it, and none may exist
            raise
        finally:
            del self._in_flight[did]

    async def _resolve_uncached(self, did: str, refresh: bool = False) -> DidDocument | ResolveFailure:
        url = self.document_url(did)
        if isinstance(url, ResolveFailure):
            return url
        stored = await self._from_database(did, url)
        if stored is not None and stored[1] and not refresh:
            self._remember(did, stored[0])
            return stored[0]
        async with self._semaphore:
            result = await self._fetch(did, url)
        if isinstance(result, ResolveFailure) and not result.final:
            if stored is not None and isinstance(stored[0], DidDocument):
                log.warning("DID resolution failed; using the cached document",
                            extra={"did": did, "error": result.error})
                return stored[0]
            return result
        await self._store(did, result, url)
        self._remember(did, result)
        return result

    def document_url(self, did: str) -> str | ResolveFailure:
        """Return the URL the DID document of ``did`` is fetched from, or why there is none."""
        if _PLC_DID.match(did):
            return f"{self.plc_url}/{did}"
        web = _WEB_DID.match(did)
        if web:
            host = unquote(web.group(1))
            hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            scheme = "http" if self.allow_local_http and hostname in LOCAL_HOSTS else "https"
            return f"{scheme}://{host}/.well-known/did.json"
        if did.startswith("did:web:"):
            return ResolveFailure(did, f"unsupported did:web {did!r}: atproto allows only a host name, "
                                       "without a path", final=True)
        return ResolveFailure(did, f"invalid or unsupported DID {did!r}: expected did:plc:<24 base32 "
                                   "characters> or did:web:<host>", final=True)

    async def _fetch(self, did: str, url: str) -> DidDocument | ResolveFailure:
        session = self._ensure_session()
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                   allow_redirects=False) as response:
                if response.status != 200:
                    return _status_failure(did, url, response.status)
                body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as error:
            return ResolveFailure(did, f"fetching {url} failed: {type(error).__name__}: {error}".rstrip(": "),
                                  final=False)
        if len(body) > MAX_DOCUMENT_BYTES:
            return ResolveFailure(did, f"DID document at {url} is larger than {MAX_DOCUMENT_BYTES} bytes", final=True)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            return ResolveFailure(did, f"DID document at {url} is not valid JSON: {error}", final=True)
        return parse_document(did, document)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "indexer (atproto archival indexer)"})
        return self._session

    # --- cache ------------------------------------------------------------------------------

    def _from_memory(self, did: str) -> DidDocument | ResolveFailure | None:
        entry = self._memory.get(did)
        if entry is None:
            return None
        expires, result = entry
        if expires < asyncio.get_running_loop().time():
            del self._memory[did]
            return None
        self._memory.move_to_end(did)
        return result

    def _remember(self, did: str, result: DidDocument | ResolveFailure) -> None:
        ttl = self.ttl if isinstance(result, DidDocument) else self.failure_ttl
        self._memory[did] = (asyncio.get_running_loop().time() + ttl.total_seconds(), result)
        self._memory.move_to_end(did)
        while len(self._memory) > MEMORY_CACHE_SIZE:
            self._memory.popitem(last=False)

    async def _database(self) -> psycopg.AsyncConnection | None:
        if self.database_url is None:
            return None
        async with self._connect_lock:
            if self._connection is None or self._connection.closed:
                self._connection = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        return self._connection

    async def _from_database(self, did: str, url: str) -> tuple[DidDocument | ResolveFailure, bool] | None:
        """Return the stored result and whether it is still fresh, or None when nothing is stored.

        A stored result counts as fresh only if it came from ``url``: after ``--plc-url`` changes,
        the DID is fetched from the new directory at once. A stored document from elsewhere is
        still returned, as stale, so it serves when the new directory fails. Rows written before
        ``source_url`` existed (NULL) count as coming from ``url``.
        """
        if self.database_url is None:
            return None
        row = await self._stored_row(did)
        if row is None:
            return None
        document, error, fresh, failure_fresh, source_url = row
        if error is not None and failure_fresh and source_url == url:
            return ResolveFailure(did, error, final=True), True
        if document is None:
            return None
        parsed = parse_document(did, document)
        same_source = source_url is None or source_url == url
        return parsed, bool(fresh) and error is None and same_source

    async def _stored_row(self, did: str) -> tuple | None:
        """Return the cached row of ``did``, or None."""
        return await self._lookups.call(did, did)

    async def _query_rows(self, dids: list[str]) -> dict[str, tuple]:
        connection = await self._database()
        cursor = await connection.execute(
            "SELECT did, document, error, "
            "checked_at > now() - make_interval(secs => %s), checked_at > now() - make_interval(secs => %s), "
            "source_url FROM did_documents WHERE did = ANY(%s)",
            (self.ttl.total_seconds(), self.failure_ttl.total_seconds(), dids))
        return {row[0]: row[1:] for row in await cursor.fetchall()}

    async def _store(self, did: str, result: DidDocument | ResolveFailure, url: str) -> None:
        """Write ``result`` to the cache; return once it is written."""
        if self.database_url is None:
            return
        await self._writes.call(did, (result, url))

    async def _write_rows(self, rows: dict[str, tuple[DidDocument | ResolveFailure, str]]) -> dict:
        connection = await self._database()
        documents = [(did, Jsonb(result.document), result.pds_endpoint, result.handle, result.signing_key, url)
                     for did, (result, url) in rows.items() if isinstance(result, DidDocument)]
        failures = [(did, result.error, url) for did, (result, url) in rows.items()
                    if not isinstance(result, DidDocument)]
        async with connection.cursor() as cursor:
            if documents:
                await cursor.executemany(
                    "INSERT INTO did_documents (did, document, pds_endpoint, handle, signing_key, resolved_at, "
                    "checked_at, error, source_url) VALUES (%s, %s, %s, %s, %s, now(), now(), NULL, %s) "
                    "ON CONFLICT (did) DO UPDATE SET document = EXCLUDED.document, "
                    "pds_endpoint = EXCLUDED.pds_endpoint, handle = EXCLUDED.handle, "
                    "signing_key = EXCLUDED.signing_key, resolved_at = now(), checked_at = now(), error = NULL, "
                    "source_url = EXCLUDED.source_url",
                    documents)
            if failures:
                await cursor.executemany(
                    "INSERT INTO did_documents (did, checked_at, error, source_url) VALUES (%s, now(), %s, %s) "
                    "ON CONFLICT (did) DO UPDATE SET checked_at = now(), error = EXCLUDED.error, "
                    "source_url = EXCLUDED.source_url",
                    failures)
        return {}


class _SharedRoundTrip:
    """Run the calls made in one event-loop turn as one ``run`` call, which takes ``{key: item}``.

    ``run`` returns ``{key: result}``; a key it leaves out gets None. A later item for a key that is
    still waiting replaces the earlier one, and both callers get the one result. Calls made while
    ``run`` works go to the next round. An exception of ``run`` is raised in every caller of its
    round.
    """

    def __init__(self, run: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        self._run = run
        self._items: dict[str, Any] = {}
        self._futures: dict[str, asyncio.Future] = {}
        self._task: asyncio.Task | None = None

    async def call(self, key: str, item: Any) -> Any:
        self._items[key] = item
        future = self._futures.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._futures[key] = loop.create_future()
            if self._task is None or self._task.done():
                self._task = loop.create_task(self._run_rounds())
        # Shielded: a cancelled caller must not cancel the round that other callers wait for.
        return await asyncio.shield(future)

    async def aclose(self) -> None:
        """Cancel the running round, so every waiting caller gets CancelledError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        # A task cancelled before its first step never ran its own clean-up.
        self._cancel_waiting({})

    async def _run_rounds(self) -> None:
        running: dict[str, asyncio.Future] = {}
        try:
            await asyncio.sleep(0)  # the calls of this loop turn join the first round
            while self._futures:
                items, self._items = self._items, {}
                running, self._futures = self._futures, {}
                try:
                    results = await self._run(items)
                except Exception as error:
                    for future in running.values():
                        future.set_exception(error)
                        future.exception()  # mark retrieved: a caller may be gone
                    continue
                for key, future in running.items():
                    future.set_result(results.get(key))
        finally:
            self._cancel_waiting(running)

    def _cancel_waiting(self, running: dict[str, asyncio.Future]) -> None:
        for future in [*running.values(), *self._futures.values()]:
            if not future.done():
                future.cancel()
        self._items, self._futures = {}, {}


def _status_failure(did: str, url: str, status: int) -> ResolveFailure:
    if status == 404:
        return ResolveFailure(did, f"DID not found: {url} returned 404", final=True)
    if status == 410:
        return ResolveFailure(did, f"DID is tombstoned (deactivated): {url} returned 410", final=True)
    if status == 429 or status >= 500:
        return ResolveFailure(did, f"{url} returned HTTP {status}; retry later", final=False)
    return ResolveFailure(did, f"{url} returned HTTP {status}", final=True)


def parse_document(did: str, document: Any) -> DidDocument | ResolveFailure:
    """Check that ``document`` is the DID document of ``did`` and extract what atproto uses from it."""
    if not isinstance(document, dict):
        return ResolveFailure(did, f"DID document of {did} is not a JSON object", final=True)
    if document.get("id") != did:
        return ResolveFailure(did, f"DID document id {document.get('id')!r} does not match {did}", final=True)
    return DidDocument(
        did=did,
        document=document,
        pds_endpoint=_service_endpoint(did, document, "#atproto_pds", "AtprotoPersonalDataServer"),
        handle=_handle(document),
        signing_key=_verification_key(did, document, "#atproto"),
    )


def _matches_fragment(did: str, entry_id: Any, fragment: str) -> bool:
    return entry_id == fragment or entry_id == f"{did}{fragment}"


def _service_endpoint(did: str, document: dict, fragment: str, service_type: str) -> str | None:
    services = document.get("service")
    if not isinstance(services, list):
        return None
    for service in services:
        if (isinstance(service, dict) and _matches_fragment(did, service.get("id"), fragment)
                and service.get("type") == service_type and isinstance(service.get("serviceEndpoint"), str)):
            return service["serviceEndpoint"]
    return None


def _handle(document: dict) -> str | None:
    names = document.get("alsoKnownAs")
    if not isinstance(names, list):
        return None
    for name in names:
        if isinstance(name, str) and name.startswith("at://") and len(name) > len("at://"):
            return name[len("at://"):]
    return None


def _verification_key(did: str, document: dict, fragment: str) -> str | None:
    methods = document.get("verificationMethod")
    if not isinstance(methods, list):
        return None
    for method in methods:
        if (isinstance(method, dict) and _matches_fragment(did, method.get("id"), fragment)
                and isinstance(method.get("publicKeyMultibase"), str)):
            return method["publicKeyMultibase"]
    return None
