"""Run the ``indexer`` command line as a subprocess, the way a user starts it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from fixture_archive import query
from fixture_data import REPO_ROOT
from indexer.ingest import REPOS_METHOD
from indexer.replay import ReplayRelay

RUN_TIMEOUT = 30.0  # seconds the subprocess may take to commit every frame


def clean_environment() -> dict[str, str]:
    """Return this process's environment without ``INDEXER_*`` and ``DATABASE_URL``, so only options count."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("INDEXER_") and key != "DATABASE_URL"}
    environment["RUST_LIB_BACKTRACE"] = "0"
    return environment


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
