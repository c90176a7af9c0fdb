"""The command line as an operator meets it: help with examples, environment variables, log lines
with fixed keys, and a database password that never appears in any output."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import pytest
import typer.main
from sqlalchemy.engine import make_url

from command_harness import clean_environment, run_until_committed
from fixture_archive import corpus_frames, query
from fixture_data import REPO_ROOT
from indexer.cli import app
from indexer.ingest import REPOS_METHOD
from indexer.replay import ReplayRelay

pytestmark = pytest.mark.timeout(90)

PASSWORD = "pw-7f3a9c-never-print-me"


def commands() -> list[tuple[str, object]]:
    """Return every leaf command of the CLI with its full name, e.g. ``dead-letters retry``."""
    found = []

    def walk(command, name: str) -> None:
        # typer 0.29 ships its own copy of click, so its classes are not click's: check by attribute.
        if hasattr(command, "commands"):
            for sub_name, sub in command.commands.items():
                walk(sub, f"{name} {sub_name}".strip())
        else:
            found.append((name, command))

    walk(typer.main.get_command(app), "")
    return found


def test_top_level_help_lists_examples():
    group = typer.main.get_command(app)
    for name in group.commands:
        assert f"indexer {name}" in group.epilog, name


@pytest.mark.parametrize("name, command", commands(), ids=[name for name, _ in commands()])
def test_command_help_has_example(name, command):
    assert f"Example: indexer {name}" in command.help


@pytest.mark.parametrize("name, command", commands(), ids=[name for name, _ in commands()])
def test_every_option_has_environment_variable(name, command):
    for parameter in command.params:
        if parameter.param_type_name == "option" and parameter.name != "help":
            assert parameter.envvar and parameter.envvar.startswith("INDEXER_"), f"{name} {parameter.opts}"


def with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


async def index_corpus(database_url: str, *options: str) -> tuple[int, str]:
    frames = corpus_frames()
    async with ReplayRelay(frames) as relay:
        return await run_until_committed(database_url, relay, frames[-1][0], *options)


def test_run_output_hides_password(database_url):
    code, output = asyncio.run(index_corpus(with_password(database_url), "--log-level", "debug"))
    assert code == 0, output
    assert "connected" in output
    assert PASSWORD not in output


def test_unreachable_database_error_hides_password():
    url = f"postgresql://indexer:{PASSWORD}@127.0.0.1:1/indexer"
    for args in (["status"], ["dead-letters", "list"], ["db", "current"]):
        completed = subprocess.run(
            [sys.executable, "-m", "indexer.cli", *args, "--database-url", url], cwd=REPO_ROOT,
            env=clean_environment(), capture_output=True, text=True, timeout=60)
        assert completed.returncode != 0, args
        assert "127.0.0.1" in completed.stderr, args
        assert PASSWORD not in completed.stdout + completed.stderr, args


def test_run_waits_for_unreachable_database():
    url = f"postgresql://indexer:{PASSWORD}@127.0.0.1:1/indexer"
    process = subprocess.Popen(
        [sys.executable, "-m", "indexer.cli", "run", "--no-labels", "--no-metrics", "--database-url", url],
        cwd=REPO_ROOT, env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stderr.readline()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert "database unavailable at start, retrying with backoff" in first_line
    assert "127.0.0.1" in first_line
    assert PASSWORD not in first_line + rest
    assert process.returncode != 0


def test_run_json_logs_carry_fixed_keys(database_url):
    code, output = asyncio.run(index_corpus(database_url, "--log-format", "json"))
    assert code == 0, output
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    connected = [entry for entry in entries if entry["message"] == "connected"]
    assert len(connected) == 1
    assert connected[0]["stream"].endswith(REPOS_METHOD)
    assert {"time", "level", "logger", "message"} <= set(entries[0])


def test_run_logs_one_line_per_state_change(database_url):
    code, output = asyncio.run(index_corpus(database_url, "--log-format", "json"))
    messages = [json.loads(line)["message"] for line in output.splitlines() if line.strip()]
    # 112 events were indexed, but lines are logged per state change, not per event.
    assert len(messages) < 20, messages
    assert messages.count("caught up with the stream") <= 1


def test_run_continues_when_metrics_port_taken(database_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = asyncio.run(index_corpus(database_url, "--metrics-addr", f"127.0.0.1:{port}"))
    assert code == 0, output
    assert "metrics are not served" in output
    assert query(database_url, "SELECT count(*) FROM likes") == [(78,)]
