"""The compiled modules (mypyc C extensions): which ones run, and whether each still matches its source.

``setup.py`` compiles ``COMPILED_MODULES`` unless ``INDEXER_PURE_PYTHON`` is set, no C compiler is
found or compiling fails. It records what it built in ``MANIFEST_NAME``: whether it compiled, why
not, and the SHA-256 of each compiled source and of the project modules they import. Python imports
a compiled copy in preference to the ``.py`` file next to it. After an edit, an editable install
therefore keeps running the old code until ``pip install -e .`` runs again. ``stale_modules`` finds
such copies: `indexer run` warns about them, and the test suite refuses to start with them.

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


PURE_PYTHON_REQUESTED = "INDEXER_PURE_PYTHON is set"


@dataclass(frozen=True)
class Build:
    """The record ``setup.py`` wrote of the last build.

    ``reason`` is why nothing was compiled (empty when the build compiled). ``sources`` maps each
    compiled module, and each project module it imports, to the SHA-256 of the source it was
    built from.
    """

    compiled: bool
    reason: str
    compiled_modules: tuple[str, ...]
    sources: dict[str, str]


@dataclass(frozen=True)
class ModuleBuild:
    """The way one module was loaded (compiled or from its source), and whether that is still current.

    ``current`` is False for a compiled module when its source, or a project module it imports,
    differs from what the build recorded (or the build recorded nothing for it). A module that
    runs from its source is always current.
    """

    module: str
    compiled: bool
    current: bool


def read_build() -> Build:
    """Return what ``setup.py`` recorded; a missing or unreadable record reads as nothing compiled."""
    try:
        loaded = json.loads(Path(__file__).with_name(MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        loaded = None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("sources"), dict):
        return Build(False, "no build record (indexer/compiled_sources.json)", (), {})
    return Build(loaded.get("compiled") is True, str(loaded.get("reason", "")),
                 tuple(str(name) for name in loaded.get("compiled_modules", ())), loaded["sources"])


def module_builds() -> list[ModuleBuild]:
    """Import every module that is or was meant to be compiled, and report how each was loaded.

    Modules compiled by an earlier build whose list differed are included, because their compiled
    copies may still sit beside the sources.
    """
    build = read_build()
    names = list(dict.fromkeys([*COMPILED_MODULES, *build.compiled_modules, *_extension_modules()]))
    changed_imports = any(name not in build.compiled_modules for name in _changed_sources(build))
    return [_module_build(name, build, changed_imports) for name in names]


def stale_modules() -> list[str]:
    """Return the compiled modules that were built from other sources than the ones beside them."""
    return [module.module for module in module_builds() if not module.current]


def summary() -> str:
    """Return one line for logs and benchmark output, such as ``compiled (6 of 6 modules)``."""
    builds = module_builds()
    compiled = sum(module.compiled for module in builds)
    if compiled == 0:
        return f"pure Python ({read_build().reason or 'no compiled modules'})"
    stale = [module.module for module in builds if not module.current]
    line = f"compiled ({compiled} of {len(builds)} modules)"
    return f"{line}, out of date: {', '.join(stale)}" if stale else line


def changed_sources() -> list[str]:
    """Return the recorded modules whose source differs from the one the build read."""
    return _changed_sources(read_build())


def stale_message(stale: list[str]) -> str:
    """Return the message naming the out-of-date compiled copies, the changed sources and the rebuild command."""
    changed = changed_sources()
    cause = f" ({', '.join(changed)} changed since the build)" if changed else ""
    return (
        f"the compiled copies of {', '.join(stale)} are out of date{cause}, and Python runs them "
        "rather than the sources. Run `pip install -e .` again with the project's pip "
        "(`.venv/bin/pip` in the README) to rebuild them, or `INDEXER_PURE_PYTHON=1 pip install -e .` "
        "to remove them and run the sources."
    )


def pure_python_requested() -> bool:
    """Return True when ``INDEXER_PURE_PYTHON`` requests an install without compiled modules."""
    return os.environ.get("INDEXER_PURE_PYTHON", "").strip() not in ("", "0")


def compiler_found() -> bool:
    """Return True when the C compiler that extensions are built with is on PATH."""
    command = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return bool(command) and shutil.which(command[0]) is not None


def _extension_modules() -> list[str]:
    """Return the modules of this package that have a compiled copy beside their source."""
    package = Path(__file__).parent
    found: list[str] = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in package.glob(f"*{suffix}"):
            stem = path.name[: -len(suffix)]
            if "." not in stem:  # "frames.cpython-311-x86_64-linux-gnu.so" also ends with ".so"
                found.append(f"indexer.{stem}")
    return sorted(set(found))


def _source_digest(name: str) -> str | None:
    path = Path(__file__).parent / (name.rsplit(".", 1)[-1] + ".py")
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # installed without sources: nothing to compare


def _changed_sources(build: Build) -> list[str]:
    return [name for name, digest in build.sources.items() if _source_digest(name) not in (None, digest)]


def _module_build(name: str, build: Build, changed_imports: bool) -> ModuleBuild:
    module = importlib.import_module(name)
    if not Path(module.__file__ or "").name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return ModuleBuild(name, compiled=False, current=True)
    digest = _source_digest(name)
    if digest is None:
        return ModuleBuild(name, compiled=True, current=True)
    return ModuleBuild(name, compiled=True, current=build.sources.get(name) == digest and not changed_imports)
