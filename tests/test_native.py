"""The compiled hot modules: whether they were built, and whether a changed source is noticed."""

from __future__ import annotations

import pytest

from indexer import native


def _compiled_builds() -> list[native.ModuleBuild]:
    return [build for build in native.module_builds() if build.compiled]


def test_module_builds_name_every_listed_module():
    assert [build.module for build in native.module_builds()] == list(native.COMPILED_MODULES)


@pytest.mark.skipif(not native.compiler_found(), reason="no C compiler: setup.py installs without compiling")
def test_install_with_a_compiler_compiles_every_listed_module():
    if native.pure_python_requested():
        pytest.skip("INDEXER_PURE_PYTHON is set: installed without compiling")

    assert native.summary() == f"compiled ({len(native.COMPILED_MODULES)} of {len(native.COMPILED_MODULES)} modules)"


def test_compiled_copy_of_another_source_is_stale(monkeypatch):
    compiled = _compiled_builds()
    if not compiled:
        pytest.skip("installed without compiled modules")
    monkeypatch.setattr(native, "_manifest", lambda: {build.module: "0" * 64 for build in compiled})

    assert native.stale_modules() == [build.module for build in compiled]


def test_compiled_copy_missing_from_the_manifest_is_stale(monkeypatch):
    compiled = _compiled_builds()
    if not compiled:
        pytest.skip("installed without compiled modules")
    monkeypatch.setattr(native, "_manifest", dict)

    assert native.stale_modules() == [build.module for build in compiled]


def test_stale_message_names_modules_and_the_rebuild_command():
    message = native.stale_message(["indexer.frames"])

    assert "indexer.frames" in message
    assert "pip install -e ." in message
