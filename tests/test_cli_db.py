"""The `indexer db` commands and database selection, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from indexer import embedded

INDEXER = [sys.executable, "-m", "indexer.cli"]


def run_indexer(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*INDEXER, *args], env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "INDEXER_DATABASE_URL", "INDEXER_DATA_DIR")}
    env.update(extra)
    return env


def postgres_running_in(pgdata: Path) -> bool:
    for process in psutil.process_iter(attrs=["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.info["name"] == "postgres" and str(pgdata) in " ".join(cmdline):
            return True
    return False


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.slow
def test_embedded_upgrade_current_and_stop(data_dir):
    env = clean_env(INDEXER_DATA_DIR=str(data_dir))

    upgraded = run_indexer("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "migrated from empty to" in upgraded.stdout
    assert "Connect with:" in upgraded.stderr

    again = run_indexer("db", "upgrade", env=env)
    assert again.returncode == 0, again.stderr
    assert "already at revision" in again.stdout

    current = run_indexer("db", "current", env=env)
    assert current.returncode == 0, current.stderr
    assert "up to date" in current.stdout

    assert wait_until(lambda: not postgres_running_in(data_dir / "postgres"))


def test_database_url_upgrade_and_current(empty_database_url):
    env = clean_env(DATABASE_URL=empty_database_url.replace("postgresql+psycopg://", "postgresql://", 1))

    upgraded = run_indexer("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "Connect with:" not in upgraded.stderr

    current = run_indexer("db", "current", env=env)
    assert "up to date" in current.stdout


def test_option_overrides_environment(empty_database_url):
    env = clean_env(DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    result = run_indexer("db", "upgrade", "--database-url", empty_database_url, env=env)
    assert result.returncode == 0, result.stderr


def test_unsupported_url_scheme_is_clear_error():
    result = run_indexer("db", "current", "--database-url", "mysql://user:secret@localhost/db", env=clean_env())
    assert result.returncode == 2
    assert "unsupported database URL scheme 'mysql'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr


def test_unreachable_database_is_clear_error():
    url = "postgresql://user:hunter2@127.0.0.1:1/indexer"
    result = run_indexer("db", "upgrade", "--database-url", url, env=clean_env())
    assert result.returncode == 1
    assert "cannot connect to the database at postgresql+psycopg://user:***@127.0.0.1:1/indexer" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr


def test_help_lists_commands_with_examples():
    result = run_indexer("--help", env=clean_env())
    assert result.returncode == 0
    for command in ("db", "run"):
        assert command in result.stdout
    assert "Example" in result.stdout


def test_other_major_version_data_dir_is_refused(data_dir):
    pgdata = data_dir / "postgres"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("16\n")
    result = run_indexer("db", "current", env=clean_env(INDEXER_DATA_DIR=str(data_dir)))
    assert result.returncode == 1
    assert "created by PostgreSQL 16" in result.stderr
    assert "pg_upgrade" in result.stderr


def test_dead_handle_pids_are_pruned(tmp_path):
    pgdata = tmp_path / "postgres"
    pgdata.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead.pid, os.getpid()]))

    embedded.prune_dead_handle_pids(pgdata)

    assert json.loads((pgdata / ".handle_pids.json").read_text()) == [os.getpid()]


@pytest.mark.slow
def test_embedded_server_stops_after_sigterm_and_data_is_reused(data_dir):
    env = clean_env(INDEXER_DATA_DIR=str(data_dir))
    pgdata = data_dir / "postgres"
    assert run_indexer("db", "upgrade", env=env).returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from indexer import embedded; embedded.install_exit_signal_handlers(); "
            "embedded.start(); print('ready', flush=True); time.sleep(600)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert postgres_running_in(pgdata)
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=30)
    finally:
        holder.kill()

    assert wait_until(lambda: not postgres_running_in(pgdata))
    current = run_indexer("db", "current", env=env)
    assert "up to date" in current.stdout
