"""The exception hierarchy of the package: every error the package raises derives from IndexerError.

User errors (bad configuration, unreachable database) are reported by the CLI as one clear line,
without a traceback. Errors in our own code (a constraint we violated, a schema mismatch) stop the
process loudly with a traceback.
"""


class IndexerError(Exception):
    """Root of every error raised by this package."""


class ConfigError(IndexerError):
    """Invalid or missing configuration: a bad URL, option or environment variable."""


class DatabaseUnavailable(IndexerError):
    """The database cannot be reached or refuses connections; callers may retry with backoff."""


class EmbeddedPostgresError(IndexerError):
    """The embedded PostgreSQL server could not be initialised or started."""


class StreamError(IndexerError):
    """A stream endpoint failed in a way that reconnecting will not fix."""


class FutureCursorError(StreamError):
    """The server says our stored cursor is ahead of its newest event.

    Continuing would silently rewind the archive, so the process stops and lets the operator decide.
    """


class DecodeError(IndexerError):
    """Bytes from upstream could not be decoded; carries the drop reason for the dead-letter row."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
