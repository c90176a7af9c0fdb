"""Which modules run compiled (mypyc C extensions), and whether each still matches its source.

``setup.py`` compiles ``COMPILED_MODULES`` (unless ``INDEXER_PURE_PYTHON`` is set or no C compiler
is found) and records the SHA-256 of each source it compiled in ``MANIFEST_NAME`` beside them.
Python imports a compiled copy in preference to the ``.py`` file next to it. After an edit, an editable install therefore keeps running the old
code until ``pip install -e .`` runs again. ``stale_modules`` finds such copies: `indexer run` warns
about them, and the test suite refuses to start with them.

This module imports only the standard library, because ``setup.py`` reads it before anything else
is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import json
import os
import shlex
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# The modules that decoding, row building and commit proofs spend their time in.
COMPILED_MODULES = (
    "indexer.car",
    "indexer.frames",
    "indexer.jsonform",
    "indexer.records",
    "indexer.mst",
    "indexer.verify",
)
MANIFEST_NAME = "compiled_sources.json"


@dataclass(frozen=True)
class ModuleBuild:
    """How one module of ``COMPILED_MODULES`` was loaded.

    ``current`` is False when the module runs compiled but its source changed after the build, or
    when the build recorded no digest for it. A module that runs from its source is always current.
    """

    module: str
    compiled: bool
    current: bool


def module_builds() -> list[ModuleBuild]:
    """Import every module of ``COMPILED_MODULES`` and report how each was loaded."""
    manifest = _manifest()
    return [_module_build(name, manifest) for name in COMPILED_MODULES]


def stale_modules() -> list[str]:
    """Return the modules whose compiled copy was built from another version of their source."""
    return [build.module for build in module_builds() if not build.current]


def summary() -> str:
    """Return one line for logs and benchmark output, such as ``compiled (6 of 6 modules)``."""
    builds = module_builds()
    compiled = sum(build.compiled for build in builds)
    if compiled == 0:
        return "pure Python (no compiled modules)"
    return f"compiled ({compiled} of {len(builds)} modules)"


def stale_message(stale: list[str]) -> str:
    """Say which compiled copies are out of date and how to rebuild them."""
    return (
        f"the compiled copies of {', '.join(stale)} were built from other sources than the ones "
        "beside them, and Python runs the compiled copies. Run `pip install -e .` again to rebuild "
        "them, or `INDEXER_PURE_PYTHON=1 pip install -e .` to remove them and run the sources."
    )


def pure_python_requested() -> bool:
    """Return True when ``INDEXER_PURE_PYTHON`` requests an install without compiled modules."""
    return os.environ.get("INDEXER_PURE_PYTHON", "").strip() not in ("", "0")


def compiler_found() -> bool:
    """Return True when the C compiler that extensions are built with is on PATH."""
    command = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return bool(command) and shutil.which(command[0]) is not None


def _module_build(name: str, manifest: dict[str, str]) -> ModuleBuild:
    module = importlib.import_module(name)
    location = Path(module.__file__ or "")
    if not location.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return ModuleBuild(name, compiled=False, current=True)
    source = location.with_name(name.rsplit(".", 1)[-1] + ".py")
    if not source.exists():
        return ModuleBuild(name, compiled=True, current=True)  # installed without sources: nothing to compare
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    return ModuleBuild(name, compiled=True, current=manifest.get(name) == digest)


def _manifest() -> dict[str, str]:
    path = Path(__file__).with_name(MANIFEST_NAME)
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
