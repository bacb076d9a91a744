"""The request path runs compiled (sidecar/native.py), unless the build was asked not to."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from sidecar import native

ROOT = Path(native.__file__).resolve().parent.parent


def test_every_listed_module_exists() -> None:
    for name in native.COMPILED:
        assert (ROOT / name).is_file(), name


@pytest.mark.skipif(os.environ.get("SIDECAR_PURE", "") not in ("", "0"),
                    reason="built with SIDECAR_PURE")
def test_the_request_path_runs_compiled() -> None:
    # A build that fell back to pure Python (a compiler error) would still pass every other
    # test, a quarter slower: make setup printed why.
    assert native.compiled() == list(native.COMPILED)
    for name in native.COMPILED:
        module = importlib.import_module(name.removesuffix(".py").replace("/", "."))
        assert not str(module.__file__).endswith(".py"), module.__file__


def test_a_source_newer_than_its_build_is_stale(tmp_path: Path) -> None:
    compiled = native.compiled()
    if not compiled:
        pytest.skip("nothing compiled")
    source = ROOT / compiled[0]
    before = source.stat()
    built = max(path.stat().st_mtime for path in source.parent.glob(source.stem + ".*.so"))
    try:
        # Newer than its build, whatever the two were: a build made long after the source
        # was last edited is usual.
        os.utime(source, (before.st_atime, built + 60))
        assert compiled[0] in native.stale()
    finally:
        os.utime(source, (before.st_atime, before.st_mtime))
    assert native.stale() == []
