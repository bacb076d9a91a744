"""Builds the request path's modules to C with mypyc (sidecar/native.py says which and why).

Everything else is in pyproject.toml. `SIDECAR_PURE=1` builds a pure-Python package; so does a
machine where mypyc or the C compiler fails, with a warning: the sidecar then runs the same
sources interpreted, with half again as much CPU per request on the request path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _compiled_modules() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("_sidecar_native", ROOT / "sidecar" / "native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.COMPILED)


class _OptionalBuildExt(build_ext):
    """A failed C build leaves the pure-Python modules in place instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, a missing compiler, a linker error...
            _warn(f"compiling the request path failed ({exc}); installing it as pure Python")

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(f"compiling {ext.name} failed ({exc}); installing it as pure Python")


def _warn(message: str) -> None:
    print(f"sidecar: {message}", file=sys.stderr)


def _extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("SIDECAR_PURE", "") not in ("", "0"):
        return []
    if {"egg_info", "dist_info"} & set(sys.argv):
        return []  # metadata only: no need for mypyc's 15 s of code generation
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed; installing the request path as pure Python")
        return []
    try:
        # Its own mypy settings: the project's (pyproject.toml) load the pydantic plugin, which
        # an isolated build environment does not have; imports it cannot see are typed Any.
        return mypycify(["--config-file", str(ROOT / "mypyc.ini"), *_compiled_modules()],
                        group_name="sidecar_native", opt_level="3")
    except BaseException as exc:  # mypy reports type errors by SystemExit
        _warn(f"mypyc could not compile the request path ({exc!r}); installing it as pure Python")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": _OptionalBuildExt})
