"""Collector settings of the long-running commands (``indexer run`` and ``indexer backfill``)."""

from __future__ import annotations

import subprocess
import sys

PROBE = (
    "import gc; from indexer.cli import tune_gc; tune_gc(); "
    "print(gc.get_threshold()); print(gc.get_freeze_count() > 0)"
)


def test_tune_gc_raises_thresholds_and_freezes() -> None:
    # A child process: the settings are global and must not leak into this test session.
    output = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    threshold, frozen = output.splitlines()
    assert threshold == "(100000, 50, 1000)"
    assert frozen == "True"
