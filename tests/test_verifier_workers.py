"""Verification worker processes: they ignore Ctrl-C and do not outlive a killed indexer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

POOL_THEN_SLEEP = r"""
import concurrent.futures, multiprocessing, os, time
from indexer.verifier import prepare_worker
pool = concurrent.futures.ProcessPoolExecutor(
    1, mp_context=multiprocessing.get_context("spawn"), initializer=prepare_worker, initargs=(os.getpid(),))
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(60)
"""


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_pool_process() -> tuple[subprocess.Popen, int]:
    parent = subprocess.Popen([sys.executable, "-c", POOL_THEN_SLEEP], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    return parent, worker


@pytest.mark.timeout(60)
def test_worker_exits_when_indexer_killed():
    parent, worker = start_pool_process()

    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()

    deadline = time.monotonic() + 10
    while is_running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_running(worker)


@pytest.mark.timeout(60)
def test_worker_ignores_sigint():
    parent, worker = start_pool_process()
    try:
        os.kill(worker, signal.SIGINT)
        time.sleep(0.5)
        assert is_running(worker)
    finally:
        parent.kill()
        parent.wait()
