"""Build step: compile the modules of the hot data path to C extensions with mypyc.

The metadata lives in pyproject.toml; this file only adds the extensions. mypyc compiles the
type-annotated Python of ``indexer.native.COMPILED_MODULES`` as it is, so the same sources run
interpreted when nothing is compiled. Compiled, decoding a frame and checking a commit proof take
about 0.6 times the CPU time (docs/performance.md, "Compiled modules").

- ``INDEXER_PURE_PYTHON=1`` installs without compiling.
- Without a C compiler on PATH, without mypyc, or when compiling fails, the install goes on
  without compiled modules and prints a warning (pip shows it with ``-v``). ``indexer run`` then
  logs why at start. All modules are compiled or none: a shim without its shared library would
  not import.
- mypyc refuses code that fails its type check: the error names the file and line.

Every build records in ``indexer/compiled_sources.json`` whether it compiled and, if it did, the
SHA-256 of each compiled source and of the project modules they import. ``indexer.native`` compares
them with the files beside the compiled copies. An editable build first deletes the compiled copies
of the previous one (for this Python version), and a wheel build those left under ``build/``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
# setup.py also runs for metadata (egg_info, dist_info); only these commands compile.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
IN_PLACE_COMMANDS = {"editable_wheel", "develop"}


def _load_native():
    # Loaded by path: importing the package would import its dependencies, absent at build time.
    spec = importlib.util.spec_from_file_location("_indexer_native", ROOT / "indexer" / "native.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


native = _load_native()


def _source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def _project_imports(module: str) -> set[str]:
    """Return the ``indexer.*`` modules that ``module`` imports, whose types compiled code relies on."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "indexer":
            found.update(f"indexer.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.module.startswith("indexer."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("indexer."))
    return {name for name in found if _source(name).is_file()}


def _write_manifest(compiled: bool, reason: str = "") -> None:
    sources = {}
    if compiled:
        modules = set(native.COMPILED_MODULES).union(*(_project_imports(name) for name in native.COMPILED_MODULES))
        sources = {name: hashlib.sha256(_source(name).read_bytes()).hexdigest() for name in sorted(modules)}
    record = {"compiled": compiled, "reason": reason, "compiled_modules": list(native.COMPILED_MODULES) if compiled else [],
              "sources": sources}
    ROOT.joinpath("indexer", native.MANIFEST_NAME).write_text(json.dumps(record, indent=1) + "\n")


def _remove_built(directory: Path) -> None:
    """Delete the extension files of an earlier build for this Python under ``directory``."""
    for built in [*directory.joinpath("indexer").glob(f"*{EXT_SUFFIX}"), *directory.glob(f"*__mypyc{EXT_SUFFIX}")]:
        built.unlink()


def _warn(message: str) -> None:
    print(f"indexer: {message}; installing without compiled modules (slower decoding)", file=sys.stderr)


class BuildAllOrNothing(build_ext):
    """Build the extensions; when any fails, remove those built and go on without them."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # compiler, linker and platform errors have no common base
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.extensions = []
            # The whole compiler command line is in the error: the record keeps the gist.
            _write_manifest(False, f"compiling failed ({type(error).__name__}; `pip install -v` shows why)")
            _warn(f"compiling failed ({error})")


def extension_modules() -> list:
    commands = set(sys.argv[1:])
    if not commands & BUILD_COMMANDS:
        return []
    if commands & IN_PLACE_COMMANDS:
        _remove_built(ROOT)
    for build_lib in ROOT.joinpath("build").glob("lib*"):
        _remove_built(build_lib)
    if native.pure_python_requested():
        _write_manifest(False, native.PURE_PYTHON_REQUESTED)
        return []
    if not native.compiler_found():
        _write_manifest(False, "no C compiler found")
        _warn("no C compiler found")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as error:
        _write_manifest(False, f"mypyc is not installed: {error}")
        _warn("mypyc is not installed")
        return []
    _write_manifest(True)
    paths = [str(_source(module).relative_to(ROOT)) for module in native.COMPILED_MODULES]
    # The build environment holds only the build requirements: the dependencies' types count as Any,
    # and the project's other modules are read for their types without being checked.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    return mypycify([*options, *paths], opt_level="3", debug_level="1")


setup(ext_modules=extension_modules(), cmdclass={"build_ext": BuildAllOrNothing})
