"""Build step: compile the modules of the hot data path to C extensions with mypyc.

The metadata lives in pyproject.toml; this file only adds the extensions. mypyc compiles the
type-annotated Python of ``indexer.native.COMPILED_MODULES`` as it is, so the same source runs
interpreted where no compiler is found. Compiled, decoding a frame into rows costs about half the
CPU time (docs/performance.md, "Compiled modules").

- ``INDEXER_PURE_PYTHON=1`` installs without compiling, and deletes compiled copies an earlier
  editable install left beside the sources (they would otherwise shadow the edited files).
- Without a C compiler on PATH the install goes on without compiling and prints a warning.
- mypyc refuses code that fails its type check: the error names the file and line.

Each build records the SHA-256 of every compiled source in ``indexer/compiled_sources.json``, so
that ``indexer.native`` can tell when a source changed after its compiled copy was built.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_native():
    # Loaded by path: importing the package would import its dependencies, absent at build time.
    spec = importlib.util.spec_from_file_location("_indexer_native", ROOT / "indexer" / "native.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_native = _load_native()
COMPILED_MODULES, MANIFEST_NAME = _native.COMPILED_MODULES, _native.MANIFEST_NAME


def _source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _remove_compiled_copies() -> None:
    """Delete the extension files an earlier in-place (editable) build left in the source tree.

    Every one goes, not only those of the current list: a module taken off the list would otherwise
    keep running from its old compiled copy.
    """
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for built in [*ROOT.joinpath("indexer").glob(f"*{suffix}"), *ROOT.glob(f"*__mypyc{suffix}")]:
            built.unlink()
    ROOT.joinpath("indexer", MANIFEST_NAME).unlink(missing_ok=True)


def _write_manifest() -> None:
    digests = {module: hashlib.sha256(_source(module).read_bytes()).hexdigest() for module in COMPILED_MODULES}
    ROOT.joinpath("indexer", MANIFEST_NAME).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def extension_modules() -> list:
    _remove_compiled_copies()
    if _native.pure_python_requested():
        return []
    if not _native.compiler_found():
        print("indexer: no C compiler found, installing without compiled modules (slower decoding)", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    _write_manifest()
    paths = [str(_source(module).relative_to(ROOT)) for module in COMPILED_MODULES]
    # The build environment holds only the build requirements: the dependencies' types count as Any,
    # and the project's other modules are read for their types without being checked.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    return mypycify([*options, *paths], opt_level="3", debug_level="1")


setup(ext_modules=extension_modules())
