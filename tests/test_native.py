"""The compiled hot modules: whether they were built, and whether a changed source is noticed."""

from __future__ import annotations

import dataclasses

import pytest

from indexer import native


def _compiled_builds() -> list[native.ModuleBuild]:
    return [build for build in native.module_builds() if build.compiled]


def _with_sources(build: native.Build, sources: dict[str, str]) -> native.Build:
    return dataclasses.replace(build, sources=sources)


def test_module_builds_include_every_listed_module():
    names = [build.module for build in native.module_builds()]

    assert set(native.COMPILED_MODULES) <= set(names)


def test_compiled_build_holds_every_listed_module():
    build = native.read_build()
    if not build.compiled:
        pytest.skip(f"installed without compiled modules: {build.reason}")

    assert native.summary() == f"compiled ({len(native.COMPILED_MODULES)} of {len(native.COMPILED_MODULES)} modules)"


def test_compiled_copy_of_another_source_is_stale(monkeypatch):
    compiled = _compiled_builds()
    if not compiled:
        pytest.skip("installed without compiled modules")
    build = native.read_build()
    other = {name: ("0" * 64 if name == compiled[0].module else digest) for name, digest in build.sources.items()}
    monkeypatch.setattr(native, "read_build", lambda: _with_sources(build, other))

    assert native.stale_modules() == [compiled[0].module]


def test_compiled_copy_missing_from_the_record_is_stale(monkeypatch):
    compiled = _compiled_builds()
    if not compiled:
        pytest.skip("installed without compiled modules")
    build = native.read_build()
    monkeypatch.setattr(native, "read_build", lambda: _with_sources(build, {}))

    assert native.stale_modules() == [module.module for module in compiled]


def test_changed_import_makes_copies_stale(monkeypatch):
    compiled = _compiled_builds()
    if not compiled:
        pytest.skip("installed without compiled modules")
    build = native.read_build()
    imported = [name for name in build.sources if name not in build.compiled_modules]
    assert "indexer.events" in imported
    other = dict(build.sources, **{"indexer.events": "0" * 64})
    monkeypatch.setattr(native, "read_build", lambda: _with_sources(build, other))

    assert native.stale_modules() == [module.module for module in compiled]


def test_stale_message_names_rebuild_command():
    message = native.stale_message(["indexer.frames"])

    assert "indexer.frames" in message
    assert "pip install -e ." in message
