"""Run the ``indexer`` command line as a subprocess, the way a user starts it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from fixture_archive import query
from fixture_data import REPO_ROOT
from indexer.ingest import REPOS_METHOD
from indexer.replay import ReplayRelay

RUN_TIMEOUT = 30.0  # seconds the subprocess may take to commit every frame


# Kept from the test session's environment: conftest points it at a refused local port, so a
# command that resolves DIDs never reaches plc.directory.
KEPT_SETTINGS = ("INDEXER_PLC_URL",)


def clean_environment() -> dict[str, str]:
    """Return this process's environment without ``DATABASE_URL`` and ``INDEXER_*`` (but KEPT_SETTINGS)."""
    environment = {key: value for key, value in os.environ.items()
                   if (not key.startswith("INDEXER_") or key in KEPT_SETTINGS) and key != "DATABASE_URL"}
    environment["RUST_LIB_BACKTRACE"] = "0"
    return environment


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``indexer ARGS`` in a subprocess with ``clean_environment()``; return its result, output as text."""
    return subprocess.run([sys.executable, "-m", "indexer.cli", *args], cwd=REPO_ROOT, env=clean_environment(),
                          capture_output=True, text=True, timeout=60)


async def run_until_committed(database_url: str, relay: ReplayRelay, last_seq: int, *options: str) -> tuple[int, str]:
    """Run ``indexer run`` on the relay until ``last_seq`` is committed, then SIGTERM it.

    Returns the exit code and the output (stdout and stderr together).
    """
    endpoint = relay.url(REPOS_METHOD)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "indexer.cli", "run", "--relay", relay.base_url, "--no-labels",
        "--database-url", database_url, "--metrics-addr", "127.0.0.1:0", *options,
        cwd=REPO_ROOT, env=clean_environment(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output = asyncio.create_task(process.stdout.read())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_TIMEOUT
    try:
        while process.returncode is None and loop.time() < deadline:
            rows = await asyncio.to_thread(query, database_url, "SELECT seq FROM cursors WHERE endpoint = %s",
                                           (endpoint,))
            if rows and rows[0][0] == last_seq:
                break
            await asyncio.sleep(0.1)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(RUN_TIMEOUT):
            code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return code, (await output).decode(errors="replace")
