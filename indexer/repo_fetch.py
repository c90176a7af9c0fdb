"""HTTP calls of repo backfill: ``com.atproto.sync.getRepo`` on a PDS, ``listRepos`` on a relay.

``RepoFetcher`` owns the politeness and retry rules:

- per host, at most ``host_concurrency`` requests at once and at most ``host_rate`` request
  starts per second;
- ``429`` waits for ``Retry-After`` (seconds or an HTTP date) or ``RateLimit-Reset`` (epoch
  seconds), capped at ``MAX_RATE_LIMIT_WAIT``, and pauses the whole host meanwhile;
- timeouts, connection errors, ``408`` and ``5xx`` are retried with exponential backoff, at most
  ``max_attempts`` attempts in all;
- the XRPC errors ``RepoDeactivated``, ``RepoTakendown``, ``RepoSuspended`` and ``RepoNotFound``
  raise ``RepoUnavailable``: a final per-repo state, never retried. Any other error raises ``FetchFailed``.

A repo is streamed to a file as it arrives, so its size in memory is one network chunk.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from indexer.errors import ConfigError, IndexerError
from indexer.resolve import LOCAL_HOSTS
from indexer.stream import Backoff

log = logging.getLogger(__name__)

GET_REPO = "com.atproto.sync.getRepo"
LIST_REPOS = "com.atproto.sync.listRepos"

# XRPC error names that are final per-repo states, mapped to the state stored for the repo.
FINAL_REPO_ERRORS = {
    "RepoDeactivated": "deactivated",
    "RepoTakendown": "takendown",
    "RepoSuspended": "suspended",
    "RepoNotFound": "not_found",
}
MAX_RATE_LIMIT_WAIT = 300.0  # seconds; a longer Retry-After is capped to this
MAX_ERROR_BODY = 64 * 1024
# NOTE: a guessed bound that stops a hostile PDS from filling the disk. Real repos are believed to
# be far smaller, but this number was not measured.
MAX_REPO_BYTES = 8 * 1024**3
CHUNK_BYTES = 256 * 1024

T = TypeVar("T")


class FetchFailed(IndexerError):
    """A request failed for good (non-retryable error, or retries exhausted)."""


class RepoUnavailable(IndexerError):
    """The PDS returned a final error for the repo; ``state`` is the per-repo state to record."""

    def __init__(self, state: str, error: str, message: str | None) -> None:
        super().__init__(f"{error}: {message}" if message else error)
        self.state = state
        self.error = error


class _Retry(Exception):
    """Internal: the attempt failed in a way a later attempt may not. ``wait`` None means backoff."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


@dataclass
class _Host:
    """Limits of one host: concurrent requests, spacing of request starts, and a 429 pause."""

    semaphore: asyncio.Semaphore
    interval: float
    next_start: float = 0.0
    paused_until: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class ListedRepo:
    """One entry of a listRepos page. ``active`` None means the relay sent no such field."""

    did: str
    rev: str | None
    active: bool | None
    status: str | None


class RepoFetcher:
    """Fetch repos and repo listings politely; share one instance between all workers of a job."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        host_rate: float = 5.0,
        host_concurrency: int = 4,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        backoff: Callable[[], Backoff] = lambda: Backoff(base=1.0, cap=60.0),
        allow_local_http: bool = False,
        max_repo_bytes: int = MAX_REPO_BYTES,
    ) -> None:
        if host_rate <= 0:
            raise ConfigError(f"host rate must be above 0 requests per second, got {host_rate!r}")
        self.session = session
        self.host_rate = host_rate
        self.host_concurrency = host_concurrency
        self.max_attempts = max_attempts
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self.backoff = backoff
        self.allow_local_http = allow_local_http
        self.max_repo_bytes = max_repo_bytes
        self._hosts: dict[str, _Host] = {}

    def pds_url(self, endpoint: str) -> str:
        """Return the base URL of a PDS from its DID document endpoint; raise FetchFailed if unusable."""
        parts = urlsplit(endpoint.strip())
        hostname = parts.hostname or ""
        local_http = self.allow_local_http and parts.scheme == "http" and hostname in LOCAL_HOSTS
        if not (parts.scheme == "https" or local_http) or not hostname or parts.query or parts.fragment:
            raise FetchFailed(f"invalid PDS endpoint {endpoint!r} in the DID document: expected an https:// URL "
                              "without query or fragment")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    async def fetch_repo(self, pds_endpoint: str, did: str, destination: BinaryIO) -> int:
        """Write the CAR of ``did`` from ``getRepo`` on its PDS into ``destination``; return its size.

        ``destination`` is truncated before each attempt. Raises RepoUnavailable for a final
        per-repo error and FetchFailed when retries are exhausted or the error is not retryable.
        """
        url = f"{self.pds_url(pds_endpoint)}/xrpc/{GET_REPO}"

        async def attempt(response: aiohttp.ClientResponse) -> int:
            destination.seek(0)
            destination.truncate()
            size = 0
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                if size > self.max_repo_bytes:
                    raise FetchFailed(f"repo {did} from {url} is larger than {self.max_repo_bytes} bytes")
                destination.write(chunk)
            destination.flush()
            return size

        return await self._request(url, {"did": did}, attempt)

    async def list_repos(self, relay: str, cursor: str | None, limit: int = 1000) -> tuple[list[ListedRepo], str | None]:
        """Return one page of ``listRepos`` on ``relay`` and the cursor of the next page (None: last page)."""
        url = f"{relay_http_url(relay)}/xrpc/{LIST_REPOS}"
        params = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor

        async def attempt(response: aiohttp.ClientResponse) -> Any:
            try:
                return await response.json(content_type=None)
            except (ValueError, aiohttp.ContentTypeError) as error:
                raise FetchFailed(f"{url} returned a body that is not JSON: {error}") from None

        page = await self._request(url, params, attempt)
        return _listed_repos(url, page)

    async def _request(self, url: str, params: dict[str, str], on_success: Callable[[aiohttp.ClientResponse], Awaitable[T]]) -> T:
        host = self._host(url)
        backoff = self.backoff()
        attempts = 0
        rate_limited = 0
        while True:
            attempts += 1
            try:
                async with host.semaphore:
                    await self._wait_turn(host)
                    return await self._attempt(url, params, on_success)
            except _Retry as retry:
                if retry.wait is not None:
                    rate_limited += 1
                    host.paused_until = max(host.paused_until, time.monotonic() + retry.wait)
                    log.info("rate limited (429); pausing requests to this host", extra={"endpoint": url, "delay": round(retry.wait, 1)})
                    attempts -= 1  # a 429 is the server pacing us, not a failure
                    if rate_limited > 20:
                        raise FetchFailed(f"{url} returned 429 Too Many Requests 20 times; lower --host-rate") from None
                    continue
                if attempts >= self.max_attempts:
                    raise FetchFailed(f"{retry} (gave up after {attempts} attempts)") from None
                delay = backoff.next_delay()
                log.info("request failed; retrying", extra={"endpoint": url, "error": str(retry), "delay": round(delay, 2)})
                await asyncio.sleep(delay)

    async def _attempt(self, url: str, params: dict[str, str], on_success: Callable[[aiohttp.ClientResponse], Awaitable[T]]) -> T:
        try:
            async with self.session.get(url, params=params, timeout=self.timeout, allow_redirects=False) as response:
                if response.status == 200:
                    return await on_success(response)
                failure = await _status_error(url, response)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _Retry(f"request to {url} failed: {type(error).__name__}: {error}".rstrip(": ")) from None
        raise failure

    def _host(self, url: str) -> _Host:
        key = urlsplit(url).netloc
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(asyncio.Semaphore(self.host_concurrency), 1.0 / self.host_rate)
        return host

    @staticmethod
    async def _wait_turn(host: _Host) -> None:
        """Sleep until this host may start another request: after any 429 pause, spaced by the rate."""
        async with host.lock:
            now = time.monotonic()
            start = max(now, host.next_start, host.paused_until)
            host.next_start = start + host.interval
        if start > now:
            await asyncio.sleep(start - now)


async def _status_error(url: str, response: aiohttp.ClientResponse) -> Exception:
    """Return the exception for a non-200 response: RepoUnavailable, _Retry or FetchFailed."""
    body = await response.content.read(MAX_ERROR_BODY)
    error, message = _xrpc_error(body)
    if error in FINAL_REPO_ERRORS:
        return RepoUnavailable(FINAL_REPO_ERRORS[error], error, message)
    described = f"{url} returned HTTP {response.status}"
    if error:
        described += f" {error}"
    if message:
        described += f": {message}"
    if response.status == 429:
        return _Retry(described, wait=retry_after_seconds(response.headers))
    if response.status == 408 or response.status >= 500:
        return _Retry(described)
    return FetchFailed(described)


def _xrpc_error(body: bytes) -> tuple[str | None, str | None]:
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(decoded, dict):
        return None, None
    error, message = decoded.get("error"), decoded.get("message")
    return (error if isinstance(error, str) else None), (message if isinstance(message, str) else None)


def retry_after_seconds(headers: Any, *, now: float | None = None, default: float = 5.0) -> float:
    """Return how long to wait after a 429, from ``Retry-After`` or ``RateLimit-Reset``, capped.

    ``Retry-After`` is delta seconds or an HTTP date; ``RateLimit-Reset`` (sent by the reference
    PDS) is epoch seconds. Without either, ``default`` seconds.
    """
    now = time.time() if now is None else now
    wait: float | None = None
    retry_after = (headers.get("Retry-After") or "").strip()
    if retry_after:
        wait = _retry_after_value(retry_after, now)
    if wait is None and headers.get("RateLimit-Reset"):
        try:
            wait = float(headers["RateLimit-Reset"]) - now
        except ValueError:
            wait = None
    if wait is None:
        wait = default
    return min(max(wait, 0.0), MAX_RATE_LIMIT_WAIT)


def _retry_after_value(value: str, now: float) -> float | None:
    """Return the seconds a Retry-After value requests, or None when it is neither delta seconds nor a date."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return seconds if math.isfinite(seconds) else None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    except (ValueError, TypeError):
        return None


def relay_http_url(relay: str) -> str:
    """Return the https (or http) base URL of a relay given as ws://, wss://, http(s):// or a host."""
    text = relay.strip().rstrip("/")
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    scheme = {"wss": "https", "https": "https", "ws": "http", "http": "http"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ConfigError(f"invalid relay URL {relay!r}: expected e.g. wss://bsky.network or https://bsky.network")
    path = parts.path
    if "/xrpc" in path:
        path = path[: path.index("/xrpc")]
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def _listed_repos(url: str, page: Any) -> tuple[list[ListedRepo], str | None]:
    if not isinstance(page, dict) or not isinstance(page.get("repos"), list):
        raise FetchFailed(f"{url} returned a page without a repos list: {str(page)[:200]}")
    repos = []
    for entry in page["repos"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("did"), str):
            log.warning("listRepos entry without a DID skipped", extra={"endpoint": url, "error": str(entry)[:200]})
            continue
        active = entry.get("active")
        status = entry.get("status")
        rev = entry.get("rev")
        repos.append(ListedRepo(
            did=entry["did"],
            rev=rev if isinstance(rev, str) else None,
            active=active if isinstance(active, bool) else None,
            status=status if isinstance(status, str) else None,
        ))
    cursor = page.get("cursor")
    return repos, (cursor if isinstance(cursor, str) and cursor and repos else None)
