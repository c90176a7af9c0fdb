"""Websocket client for XRPC event streams (``subscribeRepos``, ``subscribeLabels``).

This module owns the connection: building the endpoint URL, connecting with the committed cursor,
receiving raw binary messages, noticing silent sockets and oversized messages, and reconnecting
with exponential backoff. It never decodes a frame; ``frames`` does that.

Logging uses the ``indexer.stream`` logger with one line per state change (connected,
disconnected, reconnecting, closed), never one per message. Every line carries the same ``extra``
keys: ``stream`` (the endpoint URL), ``cursor`` (the cursor the connection requested, None for the
live tip), ``error`` (what went wrong, or None) and ``delay`` (seconds until the next attempt, or
None). Lifecycle lines are INFO and upstream problems WARNING.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from indexer.errors import ConfigError, StreamError

logger = logging.getLogger("indexer.stream")

# The atproto event stream spec caps a frame at 5 MB. The default leaves headroom above that, so a
# slightly oversized frame still arrives whole and the decoder can dead-letter it with its seq.
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024
# A message above the limit that the server sends again after a reconnect is read whole once, up to
# this size, so that it can be dead-lettered with its seq and the cursor can move past it.
OVERSIZED_READ_MAX = 256 * 1024 * 1024

URL_EXAMPLE = "wss://bsky.network or wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"

_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_MESSAGE_SIZE = re.compile(r"Message size (\d+)")

# HTTP statuses that a retry can fix: timeouts, rate limits and server-side failures. Any other
# 4xx response means the URL or method is wrong, so the client raises StreamError instead.
_RETRYABLE_CLIENT_STATUSES = {408, 425, 429}


def endpoint_url(base: str, method: str) -> str:
    """Build the websocket URL of the XRPC subscription ``method`` on the service at ``base``.

    ``base`` may be ``ws://``, ``wss://``, ``http://`` (sent as ws) or ``https://`` (sent as wss),
    or a bare host such as ``bsky.network`` (sent as wss). It may already end in ``/xrpc`` or
    ``/xrpc/<method>``. Raises ConfigError naming the bad value for anything else, including a URL
    that names a different method or carries a query string.
    """
    text = base.strip()
    if not text:
        raise ConfigError(f"stream URL is empty; expected e.g. {URL_EXAMPLE}")
    if "://" not in text:
        text = "wss://" + text

    parts = urlsplit(text)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ConfigError(
            f"invalid stream URL {base!r}: scheme {parts.scheme!r} is not ws, wss, http or https; "
            f"expected e.g. {URL_EXAMPLE}"
        )
    _validate_host(base, parts)
    if parts.query or parts.fragment:
        raise ConfigError(
            f"invalid stream URL {base!r}: remove the query string or fragment (the cursor is "
            f"passed separately); expected e.g. {URL_EXAMPLE}"
        )

    path = _endpoint_path(base, parts.path, method)
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _validate_host(base: str, parts) -> None:
    hostname = parts.hostname
    if not hostname or not (_HOSTNAME.match(hostname) or _is_ip_address(hostname)):
        raise ConfigError(f"invalid stream URL {base!r}: missing or invalid host; expected e.g. {URL_EXAMPLE}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"invalid stream URL {base!r}: invalid port; expected e.g. {URL_EXAMPLE}") from None


def _is_ip_address(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def _endpoint_path(base: str, path: str, method: str) -> str:
    path = path.rstrip("/")
    segments = path.split("/")
    if len(segments) >= 2 and segments[-2] == "xrpc":
        if segments[-1] != method:
            raise ConfigError(
                f"invalid stream URL {base!r}: it names method {segments[-1]!r} but this stream "
                f"needs {method!r}; give the service URL without the /xrpc path"
            )
        return path
    if segments[-1] == "xrpc":
        return f"{path}/{method}"
    return f"{path}/xrpc/{method}"


@dataclass
class Backoff:
    """Exponential backoff with full jitter between connection attempts.

    Attempt n (counted from 0 since the last reset) waits a uniformly random time in
    ``[0, min(cap, base * 2**n)]`` seconds. Pass a seeded ``random.Random`` for reproducible delays.
    """

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ConfigError(f"backoff base must be above 0 seconds, got {self.base!r}")
        if not self.cap >= self.base:
            raise ConfigError(f"backoff cap ({self.cap!r} s) must be at least the base ({self.base!r} s)")

    def ceiling(self) -> float:
        """Return the upper bound in seconds of the next delay."""
        # The exponent is clamped so 2**n stays a small float long after the cap is reached.
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """Draw the delay in seconds before the next attempt and count the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the base delay, after a connection proved healthy."""
        self.attempt = 0


@dataclass
class StreamCounters:
    """Running totals since the client was created, for metrics."""

    connects: int = 0  # websocket handshakes that succeeded
    reconnects: int = 0  # connection attempts after the first one
    handshake_failures: int = 0  # HTTP responses other than 101 Switching Protocols, e.g. 503
    connect_errors: int = 0  # DNS, TCP or TLS failures and handshakes that timed out
    timeouts: int = 0  # connections dropped because nothing arrived within receive_timeout
    oversized: int = 0  # messages above max_message_size
    server_closes: int = 0  # connections the server closed, including after an error frame
    transport_errors: int = 0  # connections lost to a protocol or socket error
    binary_messages: int = 0  # frames yielded to the consumer
    text_messages: int = 0  # text messages, which XRPC streams never send, ignored


class _SilenceWatch:
    """Close a websocket that stays silent for ``timeout`` seconds (None: never).

    One timer task per connection replaces a timeout around every ``receive()``, because entering
    and leaving ``asyncio.timeout`` took 3.8 µs per message (measured on Python 3.11).
    ``heard()`` only records the time. Closing the websocket makes the pending ``receive()`` return,
    and ``expired`` distinguishes that close from a close by the server. While ``paused`` (the
    consumer is busy with a message, say waiting for a slow commit) the silence does not count.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float | None) -> None:
        self.expired = False
        self.paused = False
        self._ws = ws
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._task = asyncio.create_task(self._watch()) if timeout is not None else None

    def heard(self) -> None:
        """Record traffic now, and count silence again from here."""
        self._last = self._loop.time()
        self.paused = False

    def stop(self) -> None:
        """Cancel the timer; the connection stays as it is."""
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        assert self._timeout is not None
        while True:
            silent_for = self._loop.time() - self._last
            if self.paused:
                silent_for = 0.0
            elif silent_for >= self._timeout:
                break
            await asyncio.sleep(self._timeout - silent_for)
        self.expired = True
        await self._ws.close()


@dataclass(frozen=True, slots=True)
class OversizedMessage:
    """A message larger than ``max_message_size``, yielded by ``frames()`` in place of its bytes.

    aiohttp rejects such a message from its frame header without buffering it and closes the
    connection with code 1009, so its content (and therefore its seq) is unknown. The client then
    reconnects from the committed cursor as after any other disconnect.

    ``size`` is the declared message size in bytes, or None when aiohttp did not report it.
    ``cursor`` is the cursor the dropped connection requested (None for the live tip) and
    ``position`` counts the binary messages that connection delivered before this one.
    ``repeats`` is 1, or more when the previous oversized message had the same cursor and position,
    which means the server sent the same message again after a reconnect.

    ``frame`` is None, except on a connection after such a message. That connection raises its
    limit to the message's size (at most ``OVERSIZED_READ_MAX``) and yields the message read whole
    in ``frame``, so that the consumer can read its seq and move past it.
    """

    size: int | None
    limit: int
    cursor: int | None
    position: int
    repeats: int = 1
    frame: bytes | None = field(default=None, repr=False)

    def read_whole_next(self) -> bool:
        """Return True when the next connection accepts this message whole, should it come again.

        That needs a known size below ``OVERSIZED_READ_MAX``.
        """
        return self.frame is None and self.size is not None and self.limit < self.size < OVERSIZED_READ_MAX

    def sent_again(self) -> bool:
        """Return True when the server will send this message again after the reconnect.

        The reconnect requests the events after the committed cursor. That is the case when this
        connection had a cursor, or delivered events before this message. From the live tip with
        nothing delivered, the reconnect starts at the live tip again, where the message may be gone.
        """
        return self.cursor is not None or self.position > 0


CursorSource = Callable[[], "int | None | Awaitable[int | None]"]


class StreamClient:
    """A resilient connection to one XRPC event stream, yielding raw frames.

    ``cursor`` is called before every connection attempt and returns the committed cursor (None
    connects at the live tip). It may be a plain function or a coroutine function. Use as
    ``async with StreamClient(...) as client: async for item in client.frames(): ...``. Each item
    is the ``bytes`` of one binary websocket message or an ``OversizedMessage`` marker.
    """

    def __init__(
        self,
        url: str,
        method: str,
        cursor: CursorSource,
        *,
        receive_timeout: float | None = 60.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        backoff: Backoff | None = None,
        healthy_after: float = 30.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Configure the client. Nothing connects until ``frames()`` is iterated.

        ``receive_timeout`` (seconds, None disables it) is how long the socket may stay silent
        before the connection is recycled. Server pings count as traffic, but a quiet stream that
        sends no pings (a small labeler's, say) needs a larger value.

        ``healthy_after`` (seconds) is how long a connection must stay open, unless it delivered a
        message, for the backoff to reset. ``session`` is borrowed and left open. Without it the
        client creates and closes its own.
        """
        if max_message_size <= 0:
            raise ConfigError(f"max message size must be a positive number of bytes, got {max_message_size!r}")
        if receive_timeout is not None and receive_timeout <= 0:
            raise ConfigError(f"receive timeout must be above 0 seconds or None, got {receive_timeout!r}")
        self.url = endpoint_url(url, method)
        self.method = method
        self.receive_timeout = receive_timeout
        self.max_message_size = max_message_size
        self.backoff = backoff if backoff is not None else Backoff()
        self.healthy_after = healthy_after
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.counters = StreamCounters()
        self.connected = False
        self._cursor_source = cursor
        self._session = session
        self._owns_session = session is None
        self._closing = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._iterator: AsyncGenerator[bytes | OversizedMessage, None] | None = None
        self._last_oversized: OversizedMessage | None = None

    async def __aenter__(self) -> StreamClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    def frames(self) -> AsyncIterator[bytes | OversizedMessage]:
        """Return the iterator of received items, reconnecting until ``aclose()``.

        An exception raised by the consumer inside its ``async for`` (for example FutureCursorError
        after decoding an error frame) propagates unchanged, and ``aclose()`` then shuts the
        connection. Raises StreamError when the server rejects the handshake with a 4xx status
        that a retry cannot fix. Only one iterator may exist per client.
        """
        if self._iterator is not None:
            raise RuntimeError("frames() was already called on this StreamClient; create a new client")
        if self._closing.is_set():
            raise RuntimeError("this StreamClient is closed; create a new client")
        self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        """Close the connection and the iterator. Safe to call more than once and from any task."""
        if not self._closing.is_set():
            self._closing.set()
            self._log(logging.INFO, "stream closed", None)
        ws = self._ws
        if ws is not None:
            await ws.close()
        iterator = self._iterator
        # A running iterator wakes up from the closed socket or the closing event and returns
        # by itself. Only an iterator suspended at a yield has to be closed from here.
        if iterator is not None and not iterator.ag_running:
            await iterator.aclose()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> AsyncGenerator[bytes | OversizedMessage, None]:
        first_attempt = True
        while not self._closing.is_set():
            if not first_attempt:
                self.counters.reconnects += 1
            first_attempt = False

            cursor = await self._read_cursor()
            ws = await self._connect(cursor, self._read_limit())
            if ws is None:
                if not await self._wait_before_retry(cursor):
                    return
                continue

            loop = asyncio.get_running_loop()
            opened_at = loop.time()
            delivered = 0
            silence = _SilenceWatch(ws, self.receive_timeout)
            try:
                async with aclosing(self._receive(ws, cursor, silence)) as messages:
                    async for item in messages:
                        if isinstance(item, bytes):
                            delivered += 1
                        yield item
            finally:
                silence.stop()
                self._ws = None
                self.connected = False
                await ws.close()

            if self._closing.is_set():
                return
            if delivered > 0 or loop.time() - opened_at >= self.healthy_after:
                self.backoff.reset()
            if not await self._wait_before_retry(cursor):
                return

    async def _receive(
        self, ws: aiohttp.ClientWebSocketResponse, cursor: int | None, silence: _SilenceWatch
    ) -> AsyncGenerator[bytes | OversizedMessage, None]:
        """Yield the messages of one connection until it ends, and log how it ended."""
        position = 0
        while True:
            message = await ws.receive()
            silence.heard()

            if message.type is aiohttp.WSMsgType.BINARY:
                self.counters.binary_messages += 1
                position += 1
                # The time the consumer takes over a message is not silence of the server.
                silence.paused = True
                if len(message.data) > self.max_message_size:  # only with a raised limit
                    yield self._read_past_limit(message.data, cursor, position - 1)
                else:
                    yield message.data
                silence.heard()
            elif message.type is aiohttp.WSMsgType.PING:
                # The client sends the pong itself rather than through aiohttp's autoping, so that a ping
                # counts as traffic.
                try:
                    await ws.pong(message.data)
                except (aiohttp.ClientError, OSError) as error:
                    self.counters.transport_errors += 1
                    self._log(logging.WARNING, "disconnected: connection error", cursor, error=_describe(error))
                    return
            elif message.type is aiohttp.WSMsgType.TEXT:
                self.counters.text_messages += 1
            elif message.type is aiohttp.WSMsgType.PONG:
                pass  # traffic, which heard() has noted
            elif message.type is aiohttp.WSMsgType.ERROR:
                oversized = self._oversized_marker(message.data, cursor, position)
                if oversized is not None:
                    yield oversized
                    return
                self.counters.transport_errors += 1
                self._log(logging.WARNING, "disconnected: connection error", cursor, error=repr(message.data))
                return
            elif silence.expired:
                self.counters.timeouts += 1
                self._log(
                    logging.WARNING, "disconnected: no message within receive timeout", cursor,
                    error=f"receive timed out after {self.receive_timeout} s",
                )
                return
            else:
                # CLOSE, CLOSING or CLOSED: the server ended the connection, or aclose() did.
                if not self._closing.is_set():
                    self.counters.server_closes += 1
                    self._log(
                        logging.INFO, "disconnected: closed by server", cursor,
                        error=f"close code {ws.close_code}",
                    )
                return

    def _oversized_marker(self, error: object, cursor: int | None, position: int) -> OversizedMessage | None:
        """Count and log an oversized message, or return None when ``error`` is about something else."""
        if not (isinstance(error, aiohttp.WebSocketError) and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
            return None
        match = _MESSAGE_SIZE.search(str(error))
        size = int(match.group(1)) if match else None
        repeats = 1
        last = self._last_oversized
        if last is not None and (last.cursor, last.position) == (cursor, position):
            repeats = last.repeats + 1
        marker = OversizedMessage(size=size, limit=self.max_message_size, cursor=cursor, position=position,
                                  repeats=repeats)
        self._last_oversized = marker
        self.counters.oversized += 1
        self._log(
            logging.WARNING, "disconnected: message above max message size", cursor,
            error=f"message of {size} bytes exceeds limit {self.max_message_size} (position {position}, "
            f"seen {repeats} time(s))",
        )
        return marker

    def _read_limit(self) -> int:
        """Return the message size limit of the next connection (see ``OversizedMessage.frame``).

        The limit stays raised until a message is read whole. The cursor does not matter: it may
        have moved past the events before the message, which then comes first.
        """
        last = self._last_oversized
        if last is None or last.size is None or not last.read_whole_next():
            return self.max_message_size
        return last.size + 1  # aiohttp 3.14 also rejects a message of exactly the limit

    def _read_past_limit(self, frame: bytes, cursor: int | None, position: int) -> OversizedMessage:
        self._last_oversized = None
        self._log(logging.WARNING, "message above max message size read whole, to move past it", cursor,
                  error=f"message of {len(frame)} bytes exceeds limit {self.max_message_size} (position {position})")
        return OversizedMessage(size=len(frame), limit=self.max_message_size, cursor=cursor, position=position,
                                frame=frame)

    async def _connect(self, cursor: int | None, limit: int) -> aiohttp.ClientWebSocketResponse | None:
        """Open one websocket, or log the failure and return None when a retry may fix it.

        Raises StreamError for a 4xx handshake response other than 408, 425 and 429.
        """
        session = self._ensure_session()
        params = {"cursor": str(cursor)} if cursor is not None else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await session.ws_connect(
                    self.url,
                    params=params,
                    max_msg_size=limit,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.close_timeout),
                    autoping=False,  # see _messages
                )
        except aiohttp.WSServerHandshakeError as error:
            self.counters.handshake_failures += 1
            if 400 <= error.status < 500 and error.status not in _RETRYABLE_CLIENT_STATUSES:
                raise StreamError(
                    f"stream handshake with {self.url} was rejected with HTTP {error.status} "
                    f"({error.message}); a retry will not fix this, so check the URL and method"
                ) from error
            self._log(logging.WARNING, "connect failed: handshake rejected", cursor,
                      error=f"HTTP {error.status} {error.message}")
            return None
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            self.counters.connect_errors += 1
            self._log(logging.WARNING, "connect failed", cursor, error=_describe(error))
            return None

        if self._closing.is_set():
            await ws.close()
            return None
        self._ws = ws
        self.connected = True
        self.counters.connects += 1
        self._log(logging.INFO, "connected", cursor)
        return ws

    async def _wait_before_retry(self, cursor: int | None) -> bool:
        """Sleep for the next backoff delay, and return False when the client was closed meanwhile."""
        if self._closing.is_set():
            return False
        delay = self.backoff.next_delay()
        self._log(logging.INFO, f"reconnecting in {delay:.2f} s", cursor, delay=round(delay, 3))
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=delay)
        except TimeoutError:
            return True
        return False

    async def _read_cursor(self) -> int | None:
        value = self._cursor_source()
        if inspect.isawaitable(value):
            value = await value
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"stream cursor must be a non-negative integer or None, got {value!r}")
        return value

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _log(self, level: int, message: str, cursor: int | None, *, error: str | None = None,
             delay: float | None = None) -> None:
        logger.log(level, message, extra={"stream": self.url, "cursor": cursor, "error": error, "delay": delay})


def _describe(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, TimeoutError) and not text:
        return "handshake timed out"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
