"""Build step: compile the modules of the hot data path to C extensions with mypyc.

The metadata lives in pyproject.toml; this file only adds the extensions. mypyc compiles the
type-annotated Python of ``indexer.native.COMPILED_MODULES`` as it is, so the same sources run
interpreted when nothing is compiled. Compiled, decoding a frame and checking a commit proof take
about 0.6 times the CPU time (docs/performance.md, "Compiled modules").

- ``INDEXER_PURE_PYTHON=1`` installs without compiling.
- Without a C compiler on PATH, when mypyc's type check fails, or when compiling fails, the install
  goes on without compiled modules. It prints a warning, which pip shows with ``-v``, and
  ``indexer run`` logs it at start. All modules are compiled or none: a shim without its shared
  library would not import.

Each build writes ``compiled_sources.json`` beside the modules it built: into the source tree for an
editable install, into the build directory for a wheel. It records whether the build compiled, why
not, and the SHA-256 of each compiled source and of the project modules they import, for
``indexer.native`` to compare with the files beside the compiled copies. Before building, the
extension files of an earlier build in the same place (for this Python version) are deleted.
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
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
# setup.py also runs for metadata (egg_info, dist_info): only these commands generate C code.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


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
    """Return the ``indexer.*`` modules that ``module`` imports directly (absolute or relative)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.ImportFrom):
            base = f"indexer.{node.module}" if node.level and node.module else (node.module or "indexer")
            if base == "indexer":
                found.update(f"indexer.{alias.name}" for alias in node.names)
            elif base.startswith("indexer."):
                found.add(base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("indexer."))
    return {name for name in found if _source(name).is_file()}


def _recorded_sources() -> dict[str, str]:
    """Return the digest of every compiled module and of every project module they import, transitively."""
    modules: set[str] = set()
    pending = list(native.COMPILED_MODULES)
    while pending:
        name = pending.pop()
        if name not in modules:
            modules.add(name)
            pending.extend(_project_imports(name))
    return {name: hashlib.sha256(_source(name).read_bytes()).hexdigest() for name in sorted(modules)}


def _write_record(package_dir: Path, compiled: bool, reason: str = "") -> None:
    record = {"compiled": compiled, "reason": reason,
              "compiled_modules": list(native.COMPILED_MODULES) if compiled else [],
              "sources": _recorded_sources() if compiled else {}}
    package_dir.mkdir(parents=True, exist_ok=True)
    package_dir.joinpath(native.MANIFEST_NAME).write_text(json.dumps(record, indent=1) + "\n")


def _remove_built(directory: Path) -> None:
    """Delete the extension files of an earlier build for this Python under ``directory``."""
    for built in [*directory.joinpath("indexer").glob(f"*{EXT_SUFFIX}"), *directory.glob(f"*__mypyc{EXT_SUFFIX}")]:
        built.unlink()


def _warn(message: str) -> None:
    print(f"indexer: {message}; installing without compiled modules (slower decoding)", file=sys.stderr)


class BuildAllOrNothing(build_ext):
    """Build the extensions; when any fails, remove those built and go on without them."""

    def run(self) -> None:
        target = ROOT if self.inplace else Path(self.build_lib)
        _remove_built(target)
        try:
            super().run()
        except Exception as error:  # compiler, linker and platform errors share no base class
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            # The error contains the whole compiler command line, so the record keeps only its type.
            _write_record(target / "indexer", False, f"compiling failed ({type(error).__name__}; "
                                                      "`pip install -v` shows why)")
            _warn(f"compiling failed ({error})")
            return
        _write_record(target / "indexer", True)


class BuildWithRecord(build_py):
    """Copy the package, and when there is nothing to compile, write the record with the reason."""

    def run(self) -> None:
        super().run()
        if self.distribution.ext_modules:
            return  # BuildAllOrNothing writes the record after the outcome is known
        editable = getattr(self, "editable_mode", False)
        target = ROOT if editable else Path(self.build_lib)
        _remove_built(target)
        _write_record(target / "indexer", False, NOT_COMPILED_REASON)


def extension_modules() -> tuple[list, str]:
    """Return the extensions to build, and the reason when there are none (empty otherwise)."""
    if not set(sys.argv[1:]) & BUILD_COMMANDS:
        return [], "not a build command"
    if native.pure_python_requested():
        return [], native.PURE_PYTHON_REQUESTED
    if not native.compiler_found():
        reason = "no C compiler found"
    else:
        try:
            from mypyc.build import mypycify
        except ImportError as error:
            reason = f"mypyc is not installed ({error})"
        else:
            return _mypycify(mypycify)
    _warn(reason)
    return [], reason


def _mypycify(mypycify) -> tuple[list, str]:
    paths = [str(_source(module).relative_to(ROOT)) for module in native.COMPILED_MODULES]
    # The build environment contains only the build requirements, so the dependencies' types count
    # as Any, and the project's other modules are read for their types without being checked.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    try:
        return mypycify([*options, *paths], opt_level="3", debug_level="1"), ""
    except SystemExit:
        # mypyc printed the type errors before exiting, and `pip install -v` shows them.
        reason = "mypyc's type check failed (`pip install -v` shows the errors)"
        _warn(reason)
        return [], reason


EXTENSIONS, NOT_COMPILED_REASON = extension_modules()
setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildAllOrNothing, "build_py": BuildWithRecord})
