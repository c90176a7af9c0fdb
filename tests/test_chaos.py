"""A CI-sized run of ``scripts/chaos.py``: faults injected, and no row lost or duplicated.

The script indexes a stream of 3,000 synthetic events twice with the real ``indexer run``
command, once cleanly and once under 5 kills, 6 websocket drops, a stall and a PostgreSQL
restart, on its own embedded server, then compares every table. The full proof is
``python scripts/chaos.py --events 100000``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fixture_data import JETSTREAM_CORPUS, REPO_ROOT, fixture_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def chaos_output() -> subprocess.CompletedProcess:
    fixtures = fixture_path(JETSTREAM_CORPUS).parent.parent
    environment = {**os.environ, "INDEXER_FIXTURES": str(fixtures)}
    environment.pop("DATABASE_URL", None)
    command = [sys.executable, str(REPO_ROOT / "scripts" / "chaos.py"), "--events", "3000", "--kills", "5",
               "--drops", "6", "--seed", "7", "--batch-size", "300"]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=280, check=False)


def test_chaos_run_exits_zero(chaos_output):
    assert chaos_output.returncode == 0, chaos_output.stdout + chaos_output.stderr


def test_chaos_run_loses_nothing(chaos_output):
    assert "\n0 lost, 0 duplicated\n" in chaos_output.stdout


def test_chaos_run_injects_every_fault(chaos_output):
    faults = re.search(r"faults injected: (.*)", chaos_output.stdout).group(1)

    assert "5 kill -9" in faults
    assert re.search(r"[1-9]\d* TCP cuts mid-message", faults)
    assert re.search(r"[1-9]\d* half messages", faults)
    assert "1 stalls" in faults
    assert "1 database restarts" in faults
    assert "NOT INJECTED" not in chaos_output.stdout


def test_chaos_run_compares_every_table(chaos_output):
    assert re.search(r"^likes +\d+ +\d+ +0 +0 +0", chaos_output.stdout, re.MULTILINE)
    assert re.search(r"^rows compared: [1-9]\d+", chaos_output.stdout, re.MULTILINE)
